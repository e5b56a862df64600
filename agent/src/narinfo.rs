//! What a Nix client accepts in a narinfo and what it can verify, so the agent sends only
//! fields in the form Nix writes them and believes a signature only when it verifies: store
//! path base names (`<32 base-32 chars>-<name>`, Nix's `StorePath`), Nix's base-32, a path's
//! fingerprint, ed25519 signatures and public keys (`name:base64`, as in `trusted-public-keys`)
//! and content addresses (`fixed:…`, `text:…`) checked against the path they claim. Pure.

use sha2::{Digest, Sha256};

/// Nix's base-32 alphabet (no `e`, `o`, `u`, `t`).
const NIX32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";
/// The store directory every path here lives in.
pub const STORE_DIR: &str = "/nix/store";
/// Nix's longest store path name.
const MAX_NAME: usize = 211;

/// Nix's base-32 of `bytes` (the last byte first, as `nix hash to-base32` prints it).
pub fn nix32(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let len = (bytes.len() * 8 - 1) / 5 + 1;
    (0..len)
        .rev()
        .map(|n| {
            let b = n * 5;
            let (i, j) = (b / 8, b % 8);
            let lo = u16::from(bytes[i]) >> j;
            let hi = bytes.get(i + 1).map_or(0, |x| u16::from(*x) << (8 - j));
            char::from(NIX32[usize::from((lo | hi) & 0x1f)])
        })
        .collect()
}

/// The bytes of a Nix base-32 string of a hash `size` bytes long; `None` when it is not one.
pub fn nix32_decode(s: &str, size: usize) -> Option<Vec<u8>> {
    if size == 0 || s.len() != (size * 8 - 1) / 5 + 1 {
        return None;
    }
    let mut out = vec![0u8; size];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = NIX32.iter().position(|d| *d == c)? as u16;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        match out.get_mut(i + 1) {
            Some(next) => *next |= carry as u8,
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str, size: usize) -> Option<Vec<u8>> {
    if s.len() != size * 2 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..size)
        .map(|i| u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok())
        .collect()
}

/// A hash of `size` bytes in base 16 or Nix base-32 (what Nix writes in a store database and
/// a narinfo).
fn hash_bytes(s: &str, size: usize) -> Option<Vec<u8>> {
    hex_decode(s, size).or_else(|| nix32_decode(s, size))
}

/// `sha256:<base16 or base-32>` → the 32 bytes.
pub fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let v = hash_bytes(s.strip_prefix("sha256:")?, 32)?;
    v.try_into().ok()
}

/// Whether Nix's `StorePath` accepts `base` (`<hash>-<name>`, no directory). A name may start
/// with `.` (Nix 2.8 makes such paths, e.g. `builtins.toFile ".envrc"`), but not be `.` or
/// `..` or start with `.-` or `..-` (current Nix refuses those).
pub fn valid_base_name(base: &str) -> bool {
    let Some((hash, name)) = base.split_at_checked(32) else {
        return false;
    };
    let Some(name) = name.strip_prefix('-') else {
        return false;
    };
    hash.bytes().all(|c| NIX32.contains(&c))
        && !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name.starts_with(".-")
        && !name.starts_with("..-")
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
}

/// The base name of a full store path that Nix accepts; `None` for anything else.
pub fn base_name(path: &str) -> Option<&str> {
    let base = path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    valid_base_name(base).then_some(base)
}

/// What a signature signs: `1;<path>;sha256:<base-32>;<size>;<references, comma-separated>`.
pub fn fingerprint(
    path: &str,
    nar_hash: &[u8; 32],
    nar_size: u64,
    references: &[String],
) -> String {
    format!(
        "1;{path};sha256:{};{nar_size};{}",
        nix32(nar_hash),
        references.join(",")
    )
}

/// Why a public key could not be parsed (each message quotes the key as given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{0:?} is a key name, not a public key: give it as in nix.conf's trusted-public-keys (name:base64), e.g. \"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"")]
    NoColon(String),
    #[error("{0:?} has no key name before the ':'")]
    NoName(String),
    #[error("{0:?}: the key after the ':' is not base64")]
    NotBase64(String),
    #[error("{0:?}: an ed25519 public key is 32 bytes, this one is {1}")]
    Length(String, usize),
}

/// An ed25519 public key as Nix writes it in `trusted-public-keys`: `name:base64(32 bytes)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub name: String,
    key: [u8; 32],
}

impl PublicKey {
    /// Parse `name:base64`; the error says what is wrong, for the config's message.
    pub fn parse(s: &str) -> Result<PublicKey, KeyError> {
        use base64::Engine;
        let Some((name, b64)) = s.split_once(':') else {
            return Err(KeyError::NoColon(s.to_owned()));
        };
        if name.is_empty() {
            return Err(KeyError::NoName(s.to_owned()));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| KeyError::NotBase64(s.to_owned()))?;
        let key = <[u8; 32]>::try_from(bytes.as_slice())
            .map_err(|_| KeyError::Length(s.to_owned(), bytes.len()))?;
        Ok(PublicKey {
            name: name.to_owned(),
            key,
        })
    }

    /// Whether `sig` (`name:base64(64 bytes)`) is this key's signature of `fingerprint`.
    pub fn verifies(&self, fingerprint: &str, sig: &str) -> bool {
        use base64::Engine;
        let Some((name, b64)) = sig.split_once(':') else {
            return false;
        };
        if name != self.name {
            return false;
        }
        let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &self.key)
            .verify(fingerprint.as_bytes(), &sig)
            .is_ok()
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use base64::Engine;
        write!(
            f,
            "{}:{}",
            self.name,
            base64::engine::general_purpose::STANDARD.encode(self.key)
        )
    }
}

/// Signatures tried per key and path: anyone may attach signatures to a path, so a flood of
/// them named like a trusted key costs at most this many verifications.
const SIGS_PER_KEY: usize = 16;

/// The first of `keys` under which one of `sigs` verifies for `fingerprint`.
pub fn verified_by<'k>(keys: &'k [PublicKey], fingerprint: &str, sigs: &[&str]) -> Option<&'k str> {
    keys.iter()
        .find(|k| {
            let prefix = format!("{}:", k.name);
            sigs.iter()
                .filter(|s| s.starts_with(&prefix))
                .take(SIGS_PER_KEY)
                .any(|s| k.verifies(fingerprint, s))
        })
        .map(|k| k.name.as_str())
}

/// Nix's `makeStorePath`: the path of `name` whose identity is `ty` and `hash`.
fn make_store_path(ty: &str, hash: &[u8; 32], name: &str) -> String {
    let s = format!("{ty}:sha256:{}:{STORE_DIR}:{name}", hex(hash));
    let full = Sha256::digest(s.as_bytes());
    let mut short = [0u8; 20];
    for (i, b) in full.iter().enumerate() {
        short[i % 20] ^= b;
    }
    format!("{STORE_DIR}/{}-{name}", nix32(&short))
}

/// Whether the content address `ca` (as Nix renders it: `text:sha256:<h>`,
/// `fixed:[r:]<algo>:<h>`) is really the address of `path` with these `references` (full
/// paths, the path itself included when it refers to itself). A claim that does not compute
/// is not sent: a client then goes by the cache's signature alone.
pub fn ca_matches(ca: &str, path: &str, references: &[String]) -> bool {
    let Some(name) = base_name(path).and_then(|b| b.get(33..)) else {
        return false;
    };
    let mut sorted: Vec<&str> = references
        .iter()
        .map(String::as_str)
        .filter(|r| *r != path)
        .collect();
    sorted.sort_unstable();
    let self_ref = references.iter().any(|r| r == path);
    let with_refs = |ty: &str| {
        let mut t = ty.to_owned();
        for r in &sorted {
            t.push(':');
            t.push_str(r);
        }
        t
    };
    let expected = if let Some(h) = ca.strip_prefix("text:sha256:") {
        let Some(h) = hash_bytes(h, 32).and_then(|v| <[u8; 32]>::try_from(v).ok()) else {
            return false;
        };
        if self_ref {
            return false;
        }
        make_store_path(&with_refs("text"), &h, name)
    } else if let Some(rest) = ca.strip_prefix("fixed:") {
        let (recursive, rest) = match rest.strip_prefix("r:") {
            Some(r) => (true, r),
            None => (false, rest),
        };
        let Some((algo, h)) = rest.split_once(':') else {
            return false;
        };
        let size = match algo {
            "md5" => 16,
            "sha1" => 20,
            "sha256" => 32,
            "sha512" => 64,
            _ => return false,
        };
        let Some(h) = hash_bytes(h, size) else {
            return false;
        };
        if recursive && algo == "sha256" {
            let Ok(h) = <[u8; 32]>::try_from(h) else {
                return false;
            };
            let mut ty = with_refs("source");
            if self_ref {
                ty.push_str(":self");
            }
            make_store_path(&ty, &h, name)
        } else {
            if !references.is_empty() {
                return false;
            }
            let inner = format!(
                "fixed:out:{}{algo}:{}:",
                if recursive { "r:" } else { "" },
                hex(&h)
            );
            let inner: [u8; 32] = Sha256::digest(inner.as_bytes()).into();
            make_store_path("output:out", &inner, name)
        }
    } else {
        return false;
    };
    expected == path
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vectors from Debian's Nix 2.8: `nix-store --add`, `--add-fixed`, `builtins.toFile`,
    // `nix store sign`, read back from the store's database.
    const F: &str = "/nix/store/6h9lcbx523532ax1c5g2351w9bm8ykhy-f.txt";
    const T2: &str = "/nix/store/iq2y8ir06q55hpkigdv1mb4ggyv2ham4-t2.txt";
    const A: &str = "/nix/store/p3dqqv2am03ki267rq7fymnjyg6w7fd5-a.txt";

    #[test]
    fn base_32_round_trips_and_matches_nix() {
        let empty = hex_decode(
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            32,
        )
        .expect("hex");
        let s = nix32(&empty);
        assert_eq!(s, "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(nix32_decode(&s, 32), Some(empty));
        assert_eq!(nix32_decode("e", 1), None);
        assert_eq!(nix32_decode(&s[1..], 32), None);
    }

    #[test]
    fn base_names_as_nix_parses_them() {
        assert_eq!(
            base_name(T2),
            Some("iq2y8ir06q55hpkigdv1mb4ggyv2ham4-t2.txt")
        );
        for bad in [
            // What the database's deriver column holds: a full path is not a base name.
            "/nix/store/iq2y8ir06q55hpkigdv1mb4ggyv2ham4-t2.txt",
            "iq2y8ir06q55hpkigdv1mb4ggyv2ham4",
            "iq2y8ir06q55hpkigdv1mb4ggyv2ham4-",
            "eq2y8ir06q55hpkigdv1mb4ggyv2ham4-x",
            "iq2y8ir06q55hpkigdv1mb4ggyv2ham4-..",
            "iq2y8ir06q55hpkigdv1mb4ggyv2ham4-.-x",
            "iq2y8ir06q55hpkigdv1mb4ggyv2ham4-a b",
            "iq2y8ir06q55hpkigdv1mb4ggyv2ham4-a\u{7f}",
        ] {
            assert!(!valid_base_name(bad), "{bad:?}");
        }
        assert!(!valid_base_name(&format!(
            "iq2y8ir06q55hpkigdv1mb4ggyv2ham4-{}",
            "a".repeat(212)
        )));
        assert_eq!(
            base_name("/tmp/iq2y8ir06q55hpkigdv1mb4ggyv2ham4-t2.txt"),
            None
        );
    }

    #[test]
    fn a_signature_verifies_only_under_its_key_and_fingerprint() {
        let key =
            PublicKey::parse("test-1:96TLtxV8uPU7ogy55aMW4jNSwM01JBOVGc73jBEiYTY=").expect("key");
        let sig = "test-1:ctp+WjO9pF2SWDZCgyxmROy8ogk7safyN3np53VKeYsfyexPtHMN5oVPj32aBlFqn5uEG57mjUYmWsvzbPFKAg==";
        let hash =
            parse_sha256("sha256:84c6a6f2a9dd8655741e3c845640a1d1a814e4576b6fdfff62e8dd578b9957c9")
                .expect("hash");
        let fp = fingerprint(T2, &hash, 168, &[A.to_owned()]);
        assert!(key.verifies(&fp, sig));
        assert_eq!(
            verified_by(std::slice::from_ref(&key), &fp, &[sig]),
            Some("test-1")
        );
        // Another size, a forged one under the same name, another key's name: no.
        assert!(!key.verifies(&fingerprint(T2, &hash, 169, &[A.to_owned()]), sig));
        assert!(!key.verifies(&fp, "test-1:AAAA"));
        assert!(!key.verifies(&fp, &sig.replacen("test-1", "cache.nixos.org-1", 1)));
        let upstream =
            PublicKey::parse("cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=")
                .expect("key");
        assert_eq!(
            verified_by(&[upstream], &fp, &[sig, "cache.nixos.org-1:abc"]),
            None
        );
        assert_eq!(
            key.to_string(),
            "test-1:96TLtxV8uPU7ogy55aMW4jNSwM01JBOVGc73jBEiYTY="
        );
        // Two references: Nix signs them sorted (as store paths sort, by their bytes).
        let t3 = "/nix/store/24s49bzil10fakmc9lv1wg04sd5ka0l7-t3.txt";
        let b = "/nix/store/ly6g1qv655sgb0afmyb23i3xia410h4i-b.txt".to_owned();
        let h3 =
            parse_sha256("sha256:ab009df5add8efdf9a4ad6b359437c3bcb3e8a24be669e29def98b122d4243b2")
                .expect("hash");
        let sig3 = "test-1:Hte6b/KUYv0wMBeTl1caDJ4iXvAMBbw/T9cSKYhLM4zRETqj2/WNraaxH0EhiE0euW4SL6dXn9SJivsnki8dBA==";
        let mut refs = vec![A.to_owned(), b];
        assert!(!key.verifies(&fingerprint(t3, &h3, 216, &refs), sig3));
        refs.sort();
        assert!(key.verifies(&fingerprint(t3, &h3, 216, &refs), sig3));
        for bad in ["cache.nixos.org-1", ":AAAA", "k:not base64!", "k:AAAA"] {
            assert!(PublicKey::parse(bad).is_err(), "{bad}");
        }
        let said: Vec<String> = ["cache.nixos.org-1", ":AAAA", "k:not base64!", "k:AAAA"]
            .iter()
            .map(|s| PublicKey::parse(s).unwrap_err().to_string())
            .collect();
        assert_eq!(
            said,
            [
                "\"cache.nixos.org-1\" is a key name, not a public key: give it as in nix.conf's trusted-public-keys (name:base64), e.g. \"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"",
                "\":AAAA\" has no key name before the ':'",
                "\"k:not base64!\": the key after the ':' is not base64",
                "\"k:AAAA\": an ed25519 public key is 32 bytes, this one is 3",
            ]
        );
    }

    #[test]
    fn content_addresses_compute_as_nix_computes_them() {
        let none: &[String] = &[];
        assert!(ca_matches(
            "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
            F,
            none
        ));
        assert!(ca_matches(
            "fixed:r:sha256:1wj75pz01l7nvwlfdx70p07q1m7fh2pmm7q9hkczjiwz6ddg6bgf",
            "/nix/store/0g5hi4p0y3gydjkzcxk4iqr2ln76x0v0-d",
            none
        ));
        assert!(ca_matches(
            "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq",
            "/nix/store/d4b4lmbd433fa2xcdysz7p7zahnqh1z4-f.txt",
            none
        ));
        assert!(ca_matches(
            "fixed:r:sha1:p1ba2rv6xy8gsw1a5qyklja50kg53rlq",
            "/nix/store/1vahzixmrdamwc6p405pr67g2cc25dzl-d",
            none
        ));
        assert!(ca_matches(
            "text:sha256:01nmlj72cjacxg6314c8slpfny6d83h8vmnbmb5qxjz3xp9ns6wn",
            A,
            none
        ));
        assert!(ca_matches(
            "text:sha256:1zrbgjjvy4xn30awji79dzfph4j6abppfdyaww10c795wx3w6753",
            T2,
            &[A.to_owned()]
        ));
        // A claim for another path, other references, another kind: no.
        assert!(!ca_matches(
            "text:sha256:1zrbgjjvy4xn30awji79dzfph4j6abppfdyaww10c795wx3w6753",
            T2,
            none
        ));
        assert!(!ca_matches(
            "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
            A,
            none
        ));
        assert!(!ca_matches(
            "fixed:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
            F,
            none
        ));
        assert!(!ca_matches("fixed:r:sha256:garbage", F, none));
        assert!(!ca_matches("", F, none));
    }
}
