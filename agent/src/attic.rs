//! Attic tokens: minted per job in Attic's format, for the shortest useful time and the least
//! privilege. `exp` is always set (Attic accepts a token without one forever); the claim names
//! exactly one cache (no wildcard); permission bits are the integers 0/1 Attic requires.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use flywheel_jit_config::Secret;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
pub enum AtticError {
    #[error("attic signing key {path}: {why}")]
    Key { path: String, why: String },
    #[error("cannot sign the attic token: {0}")]
    Sign(String),
    #[error("attic cache name {0:?} must be a plain name (letters, digits, '-', '_', '.'), not a pattern")]
    Cache(String),
}

/// The Attic server's signing key: its HS256 secret (the base64 form of
/// `token-hs256-secret-base64`) or an RSA private key PEM (RS256).
#[derive(Debug, Clone)]
pub enum SigningKey {
    Hs256(Secret<Vec<u8>>),
    Rs256(Secret<Vec<u8>>),
}

impl SigningKey {
    pub fn load(path: &Path) -> Result<SigningKey, AtticError> {
        let err = |why: String| AtticError::Key {
            path: path.display().to_string(),
            why,
        };
        let raw = Secret::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
        let text = String::from_utf8_lossy(raw.expose()).trim().to_owned();
        if text.starts_with("-----BEGIN") {
            flywheel_jit_config::validate_app_key(text.as_bytes()).map_err(err)?;
            return Ok(SigningKey::Rs256(Secret::new(text.into_bytes())));
        }
        let secret = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(|e| err(format!("neither an RSA private key PEM nor base64 (Attic's token-hs256-secret-base64): {e}")))?;
        if secret.len() < 32 {
            return Err(err(format!(
                "the HS256 secret has {} bytes; use at least 32",
                secret.len()
            )));
        }
        Ok(SigningKey::Hs256(Secret::new(secret)))
    }
}

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    pub cache: String,
    pub sub: String,
    pub validity: Duration,
    pub push: bool,
}

/// Mint one token.
pub fn mint(key: &SigningKey, req: &TokenRequest) -> Result<Secret<String>, AtticError> {
    if req.cache.is_empty()
        || !req
            .cache
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(AtticError::Cache(req.cache.clone()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut perms = serde_json::Map::new();
    perms.insert("r".into(), json!(1));
    if req.push {
        perms.insert("w".into(), json!(1));
    }
    let claims = json!({
        "sub": req.sub,
        "iat": now,
        "nbf": now,
        "exp": now + req.validity.as_secs().max(60),
        "https://jwt.attic.rs/v1": { "caches": { req.cache.clone(): perms } },
    });
    let (alg, enc) = match key {
        SigningKey::Hs256(s) => (
            jsonwebtoken::Algorithm::HS256,
            jsonwebtoken::EncodingKey::from_secret(s.expose()),
        ),
        SigningKey::Rs256(pem) => (
            jsonwebtoken::Algorithm::RS256,
            jsonwebtoken::EncodingKey::from_rsa_pem(pem.expose())
                .map_err(|e| AtticError::Sign(e.to_string()))?,
        ),
    };
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), &claims, &enc)
        .map(Secret::new)
        .map_err(|e| AtticError::Sign(e.to_string()))
}

/// The attic client's config for one job: `$XDG_CONFIG_HOME/attic/config.toml`.
pub fn client_config(server: &str, token: &Secret<String>) -> Secret<String> {
    Secret::new(format!(
        "default-server = \"flywheel\"\n\n[servers.flywheel]\nendpoint = \"{server}\"\ntoken = \"{}\"\n",
        token.expose()
    ))
}

/// A netrc entry for Nix's reads from the cache (`machine HOST password TOKEN`).
pub fn netrc(server: &str, token: &Secret<String>) -> Secret<String> {
    let host = server
        .split("://")
        .nth(1)
        .unwrap_or(server)
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    Secret::new(format!("machine {host}\npassword {}\n", token.expose()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(
        token: &str,
        key: &jsonwebtoken::DecodingKey,
        alg: jsonwebtoken::Algorithm,
    ) -> serde_json::Value {
        let mut v = jsonwebtoken::Validation::new(alg);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "nbf", "sub"]);
        jsonwebtoken::decode::<serde_json::Value>(token, key, &v)
            .expect("verifies")
            .claims
    }

    fn hs_key() -> (tempfile::NamedTempFile, Vec<u8>) {
        let secret: Vec<u8> = (0u8..48).collect();
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(
            f.path(),
            base64::engine::general_purpose::STANDARD.encode(&secret),
        )
        .expect("write");
        (f, secret)
    }

    #[test]
    fn hs256_push_token_has_attics_exact_layout() {
        let (f, secret) = hs_key();
        let key = SigningKey::load(f.path()).expect("key");
        let req = TokenRequest {
            cache: "tinyland".into(),
            sub: "flywheel:tinyland/flywheel:run/77/1:runner/r1".into(),
            validity: Duration::from_secs(3600),
            push: true,
        };
        let t = mint(&key, &req).expect("mint");
        let c = decode(
            t.expose(),
            &jsonwebtoken::DecodingKey::from_secret(&secret),
            jsonwebtoken::Algorithm::HS256,
        );
        let caches = c["https://jwt.attic.rs/v1"]["caches"]
            .as_object()
            .expect("caches");
        assert_eq!(caches.len(), 1, "exactly one cache");
        assert_eq!(
            c["https://jwt.attic.rs/v1"]["caches"]["tinyland"],
            json!({"r": 1, "w": 1}),
            "integer bits"
        );
        assert!(c["exp"].as_u64().expect("exp") > c["nbf"].as_u64().expect("nbf"));
        assert_eq!(
            c["exp"].as_u64().unwrap() - c["nbf"].as_u64().unwrap(),
            3600
        );
        assert_eq!(c["sub"], "flywheel:tinyland/flywheel:run/77/1:runner/r1");
        let header = jsonwebtoken::decode_header(t.expose()).expect("header");
        assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);
        // A wrong key does not verify.
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_required_spec_claims(&["exp"]);
        assert!(jsonwebtoken::decode::<serde_json::Value>(
            t.expose(),
            &jsonwebtoken::DecodingKey::from_secret(b"another key entirely, 32 bytes!!"),
            &v
        )
        .is_err());
    }

    #[test]
    fn pull_token_cannot_write() {
        let (f, secret) = hs_key();
        let key = SigningKey::load(f.path()).expect("key");
        let t = mint(
            &key,
            &TokenRequest {
                cache: "c".into(),
                sub: "s".into(),
                validity: Duration::from_secs(60),
                push: false,
            },
        )
        .expect("mint");
        let c = decode(
            t.expose(),
            &jsonwebtoken::DecodingKey::from_secret(&secret),
            jsonwebtoken::Algorithm::HS256,
        );
        assert_eq!(c["https://jwt.attic.rs/v1"]["caches"]["c"], json!({"r": 1}));
    }

    #[test]
    fn rs256_tokens_verify_with_the_public_key() {
        let (private, public) = fake_github::app_key();
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), &private).expect("write");
        let key = SigningKey::load(f.path()).expect("key");
        assert!(matches!(key, SigningKey::Rs256(_)));
        let t = mint(
            &key,
            &TokenRequest {
                cache: "tinyland".into(),
                sub: "s".into(),
                validity: Duration::from_secs(600),
                push: true,
            },
        )
        .expect("mint");
        let c = decode(
            t.expose(),
            &jsonwebtoken::DecodingKey::from_rsa_pem(&public).expect("pub"),
            jsonwebtoken::Algorithm::RS256,
        );
        assert_eq!(c["https://jwt.attic.rs/v1"]["caches"]["tinyland"]["w"], 1);
    }

    #[test]
    fn bad_keys_and_patterns_are_refused() {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), "c2hvcnQ=").expect("write");
        assert!(SigningKey::load(f.path())
            .unwrap_err()
            .to_string()
            .contains("at least 32"));
        std::fs::write(f.path(), "not base64 !!!").expect("write");
        assert!(SigningKey::load(f.path()).is_err());
        let (k, _) = hs_key();
        let key = SigningKey::load(k.path()).expect("key");
        for bad in ["*", "tiny*", "", "a b"] {
            assert!(
                mint(
                    &key,
                    &TokenRequest {
                        cache: bad.into(),
                        sub: "s".into(),
                        validity: Duration::from_secs(60),
                        push: true
                    }
                )
                .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn netrc_and_client_config() {
        let t = Secret::new("TOKEN".to_owned());
        assert_eq!(
            netrc("https://attic.example:8080/cache", &t).expose(),
            "machine attic.example\npassword TOKEN\n"
        );
        assert!(client_config("https://attic.example", &t)
            .expose()
            .contains("endpoint = \"https://attic.example\"\ntoken = \"TOKEN\""));
        assert_eq!(format!("{:?}", client_config("x", &t)), "[redacted]");
    }
}
