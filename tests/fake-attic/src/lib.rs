//! A fake Attic server for tests, as strict as the real one where the agent talks to it
//! (zhaofengli/attic; `../shared/REFERENCE.md` §7, §7a):
//!
//! - tokens: HS256 JWTs verified with the server's secret; `exp` required and checked (no
//!   leeway), `nbf` checked; rights from `https://jwt.attic.rs/v1` → `caches`: the exact cache
//!   name wins, else the first matching `*` pattern in claim order; bits are integers (`true`
//!   does not count). An invalid token is anonymous. No right at all on the cache → 401; some
//!   right but not the one needed → 403.
//! - `POST /_api/v1/get-missing-paths` (`w`): `{"cache", "store_path_hashes"}` →
//!   `{"missing_paths"}`.
//! - `PUT /_api/v1/upload-path` (`w`): the upload info in `X-Attic-Nar-Info` or as a preamble
//!   of `X-Attic-Nar-Info-Preamble-Size` bytes; the NAR streamed as the rest of the body,
//!   checked against `nar_hash` (`sha256:` + hex or Nix base32) and `nar_size`; references
//!   must be base names; the store path must match its hash part. → `{"kind": "Uploaded" |
//!   "Deduplicated", "file_size", "frac_deduplicated"}`. Errors are `{"code", "error",
//!   "message"}`.
//! - Every field that ends up in a narinfo is parsed as Nix's `nar-info.cc` parses it (Nix
//!   2.8 and 2.34 alike): `store_path`, each reference and the deriver must be store path base
//!   names (`<32 base-32 chars>-<name>`, name characters `[A-Za-z0-9+-._?=]`, at most 211,
//!   not `.` or `..` nor starting with `.-` or `..-`); a deriver of `unknown-deriver` or none is none; `ca` must be a
//!   content address (`text:sha256:…`, `fixed:[r:]<algo>:…`); a signature must be
//!   `name:base64`. What Nix would refuse is refused here with 400, so a test can never pass
//!   on a narinfo a real client cannot use.
//! - Reads, as a public cache serves them: `GET /<cache>/nix-cache-info`,
//!   `/<cache>/<hash>.narinfo` (signed, as Attic signs, by the cache's own ed25519 key named
//!   after the cache: [`FakeAttic::public_key`]) and `/<cache>/nar/<hash>.nar`
//!   (`Compression: none`), so a real Nix client substitutes from it.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One stored path.
#[derive(Debug, Clone)]
pub struct Stored {
    pub info: Value,
    pub nar: Vec<u8>,
    /// The token's `sub` that uploaded it.
    pub uploader: String,
}

#[derive(Debug, Default)]
pub struct State {
    pub secret: Vec<u8>,
    /// cache → store path hash → stored path.
    pub caches: BTreeMap<String, BTreeMap<String, Stored>>,
    /// Every Authorization header value seen (to prove where tokens went).
    pub tokens_seen: Vec<String>,
    /// (method, path, status) of every request.
    pub calls: Vec<(String, String, u16)>,
    /// Largest request body held in memory at once (the fake streams and hashes).
    pub max_chunk: usize,
    /// Drop NAR bytes after hashing them (benchmarks of large paths); `Stored::nar` stays empty.
    pub discard_nars: bool,
    /// Never answer an upload (a server that hangs): tests of the agent's deadline.
    pub stall_uploads: bool,
    /// Answer uploads of store paths whose name contains this with a 500.
    pub fail_uploads_of: Option<String>,
    /// The seed of the caches' signing key.
    pub seed: [u8; 32],
    /// Store paths stored, in the order their uploads completed.
    pub uploads: Vec<String>,
    /// Uploads whose whole body arrived with a NAR that is not what their info said.
    pub bad_bodies: u32,
}

#[derive(Debug)]
pub struct FakeAttic {
    pub url: String,
    state: Arc<Mutex<State>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl FakeAttic {
    /// Serve on loopback with `caches` existing, tokens signed with `secret` (HS256).
    pub fn start(secret: &[u8], caches: &[&str]) -> FakeAttic {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            secret: secret.to_vec(),
            seed: Sha256::digest(secret).into(),
            caches: caches
                .iter()
                .map(|c| ((*c).to_owned(), BTreeMap::new()))
                .collect(),
            ..State::default()
        }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = axum::Router::new().fallback(handle).with_state(st);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        FakeAttic {
            url,
            state,
            _shutdown: tx,
        }
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().expect("state"))
    }

    /// The public key that signs `cache`'s narinfos, as `trusted-public-keys` takes it.
    pub fn public_key(&self, cache: &str) -> String {
        use base64::Engine;
        let kp = keypair(&self.with(|s| s.seed));
        format!(
            "{cache}:{}",
            base64::engine::general_purpose::STANDARD
                .encode(ring::signature::KeyPair::public_key(&kp))
        )
    }
}

fn keypair(seed: &[u8; 32]) -> ring::signature::Ed25519KeyPair {
    ring::signature::Ed25519KeyPair::from_seed_unchecked(seed).expect("ed25519 seed")
}

fn error(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        axum::Json(json!({"code": status, "error": code, "message": message})),
    )
        .into_response()
}

/// The rights a token grants on `cache`: `None` for an invalid or absent token.
fn rights(secret: &[u8], headers: &HeaderMap, cache: &str) -> (Option<Value>, String) {
    let Some(token) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return (None, String::new());
    };
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.leeway = 0;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp"]);
    let Ok(data) =
        jsonwebtoken::decode::<Value>(token, &jsonwebtoken::DecodingKey::from_secret(secret), &v)
    else {
        return (None, String::new());
    };
    let sub = data.claims["sub"].as_str().unwrap_or_default().to_owned();
    let caches = &data.claims["https://jwt.attic.rs/v1"]["caches"];
    let Some(map) = caches.as_object() else {
        return (None, sub);
    };
    if let Some(r) = map.get(cache) {
        return (Some(r.clone()), sub);
    }
    for (pattern, r) in map {
        if let Some(prefix) = pattern.strip_suffix('*') {
            if cache.starts_with(prefix) {
                return (Some(r.clone()), sub);
            }
        }
    }
    (None, sub)
}

/// 401 without any right on the cache, 403 with some but not `bit`; `None` when allowed.
fn require(r: &Option<Value>, bit: &str) -> Option<Response> {
    let Some(r) = r else {
        return Some(error(401, "Unauthorized", "no right on this cache"));
    };
    (r[bit].as_i64() != Some(1))
        .then(|| error(403, "Forbidden", &format!("the token lacks `{bit}`")))
}

const NIX32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

fn nix32(hash: &[u8]) -> String {
    let len = (hash.len() * 8 - 1) / 5 + 1;
    (0..len)
        .rev()
        .map(|n| {
            let b = n * 5;
            let (i, j) = (b / 8, b % 8);
            let lo = u16::from(hash[i]) >> j;
            let hi = if i + 1 < hash.len() {
                u16::from(hash[i + 1]) << (8 - j)
            } else {
                0
            };
            NIX32[usize::from((lo | hi) & 0x1f)] as char
        })
        .collect()
}

fn nix32_decode(s: &str, size: usize) -> Option<Vec<u8>> {
    if s.len() != (size * 8 - 1) / 5 + 1 {
        return None;
    }
    let mut out = vec![0u8; size];
    for (n, c) in s.bytes().rev().enumerate() {
        let d = NIX32.iter().position(|x| *x == c)? as u16;
        let (i, j) = (n * 5 / 8, n * 5 % 8);
        out[i] |= (d << j) as u8;
        let carry = d >> (8 - j);
        match out.get_mut(i + 1) {
            Some(x) => *x |= carry as u8,
            None if carry != 0 => return None,
            None => {}
        }
    }
    Some(out)
}

/// Nix's `StorePath(baseName)`: what `References:` and `Deriver:` entries must be.
fn store_path_name_ok(base: &str) -> bool {
    let (Some(hash), Some(rest)) = (base.get(..32), base.get(32..)) else {
        return false;
    };
    let Some(name) = rest.strip_prefix('-') else {
        return false;
    };
    hash.bytes().all(|c| NIX32.contains(&c))
        && !name.is_empty()
        && name.len() <= 211
        && name != "."
        && name != ".."
        && !name.starts_with(".-")
        && !name.starts_with("..-")
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
}

/// Nix's `parseContentAddress`.
fn ca_ok(ca: &str) -> bool {
    let hash_ok = |algo: &str, h: &str| {
        let size = match algo {
            "md5" => 16,
            "sha1" => 20,
            "sha256" => 32,
            "sha512" => 64,
            _ => return false,
        };
        (h.len() == size * 2 && h.bytes().all(|c| c.is_ascii_hexdigit()))
            || nix32_decode(h, size).is_some()
    };
    if let Some(h) = ca.strip_prefix("text:sha256:") {
        return hash_ok("sha256", h);
    }
    let Some(rest) = ca.strip_prefix("fixed:") else {
        return false;
    };
    let rest = rest.strip_prefix("r:").unwrap_or(rest);
    rest.split_once(':').is_some_and(|(a, h)| hash_ok(a, h))
}

/// What Nix's narinfo parser would refuse in this upload info, if anything.
fn narinfo_fields_refused(info: &Value) -> Option<String> {
    let store_path = info["store_path"].as_str().unwrap_or_default();
    match store_path.strip_prefix("/nix/store/") {
        Some(b) if store_path_name_ok(b) => {}
        _ => {
            return Some(format!(
                "store_path {store_path:?} is not a store path Nix accepts"
            ))
        }
    }
    let Some(refs) = info["references"].as_array() else {
        return Some("references must be a list".into());
    };
    for r in refs {
        if !r.as_str().is_some_and(store_path_name_ok) {
            return Some(format!(
                "reference {r} is not a store path base name (<hash>-<name>): Nix's narinfo parser refuses it"
            ));
        }
    }
    match &info["deriver"] {
        Value::Null => {}
        Value::String(d) if d == "unknown-deriver" || store_path_name_ok(d) => {}
        d => {
            return Some(format!(
                "deriver {d} is not a store path base name: Nix's narinfo parser refuses it (\"illegal base-32 character\")"
            ))
        }
    }
    match &info["ca"] {
        Value::Null => {}
        Value::String(c) if ca_ok(c) => {}
        c => return Some(format!("ca {c} is not a content address")),
    }
    let sigs_ok = info["sigs"].as_array().is_some_and(|a| {
        a.iter().all(|s| {
            s.as_str().is_some_and(|s| {
                s.split_once(':').is_some_and(|(n, b)| {
                    !n.is_empty()
                        && n.bytes().all(|c| c.is_ascii_graphic())
                        && base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b)
                            .is_ok()
                })
            })
        })
    });
    if !sigs_ok {
        return Some("sigs must be a list of name:base64 signatures".into());
    }
    None
}

/// The narinfo of a stored path, as Attic serves it (signed with the cache's key).
fn narinfo(cache: &str, stored: &Stored, seed: &[u8; 32]) -> String {
    let i = &stored.info;
    let path = i["store_path"].as_str().unwrap_or_default();
    let hash_part = i["store_path_hash"].as_str().unwrap_or_default();
    let digest: [u8; 32] = Sha256::digest(&stored.nar).into();
    let nar_hash = format!("sha256:{}", nix32(&digest));
    let size = stored.nar.len();
    let refs: Vec<&str> = i["references"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let full: Vec<String> = refs.iter().map(|r| format!("/nix/store/{r}")).collect();
    let fingerprint = format!("1;{path};{nar_hash};{size};{}", full.join(","));
    let sig = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        keypair(seed).sign(fingerprint.as_bytes()),
    );
    let mut text = format!(
        "StorePath: {path}\nURL: nar/{hash_part}.nar\nCompression: none\nFileHash: {nar_hash}\nFileSize: {size}\nNarHash: {nar_hash}\nNarSize: {size}\nReferences: {}\n",
        refs.join(" ")
    );
    if let Some(d) = i["deriver"].as_str() {
        text.push_str(&format!("Deriver: {d}\n"));
    }
    if let Some(c) = i["ca"].as_str() {
        text.push_str(&format!("CA: {c}\n"));
    }
    text.push_str(&format!("Sig: {cache}:{sig}\n"));
    text
}

/// `GET /<cache>/…`: what a Nix client reads.
fn read(state: &Arc<Mutex<State>>, path: &str) -> Response {
    let s = state.lock().expect("state");
    let Some((cache, rest)) = path.trim_start_matches('/').split_once('/') else {
        return error(404, "NotFound", "no such endpoint");
    };
    let Some(c) = s.caches.get(cache) else {
        return error(404, "NoSuchCache", "no such cache");
    };
    let text = |t: String| ([("content-type", "text/x-nix-narinfo")], t).into_response();
    if rest == "nix-cache-info" {
        return text("StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n".into());
    }
    if let Some(hash) = rest.strip_suffix(".narinfo") {
        return match c.get(hash) {
            Some(stored) => text(narinfo(cache, stored, &s.seed)),
            None => error(404, "NoSuchObject", "no such path"),
        };
    }
    if let Some(hash) = rest
        .strip_prefix("nar/")
        .and_then(|r| r.strip_suffix(".nar"))
    {
        return match c.get(hash) {
            Some(stored) => stored.nar.clone().into_response(),
            None => error(404, "NoSuchObject", "no such NAR"),
        };
    }
    error(404, "NotFound", "no such endpoint")
}

async fn handle(
    AxState(state): AxState<Arc<Mutex<State>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let path = uri.path().to_owned();
    let resp = match (method.as_str(), path.as_str()) {
        ("POST", "/_api/v1/get-missing-paths") => missing(&state, &headers, body).await,
        ("PUT", "/_api/v1/upload-path") => upload(&state, &headers, body).await,
        ("GET" | "HEAD", p) if !p.starts_with("/_api/") => read(&state, p),
        _ => error(404, "NotFound", "no such endpoint"),
    };
    let mut s = state.lock().expect("state");
    if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        s.tokens_seen.push(a.to_owned());
    }
    s.calls
        .push((method.to_string(), path, resp.status().as_u16()));
    resp
}

async fn missing(state: &Arc<Mutex<State>>, headers: &HeaderMap, body: Body) -> Response {
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return error(400, "BadRequest", "body too large");
    };
    let Ok(req) = serde_json::from_slice::<Value>(&bytes) else {
        return error(400, "BadRequest", "not JSON");
    };
    let cache = req["cache"].as_str().unwrap_or_default().to_owned();
    let s = state.lock().expect("state");
    let (r, _) = rights(&s.secret, headers, &cache);
    if let Some(e) = require(&r, "w") {
        return e;
    }
    let Some(c) = s.caches.get(&cache) else {
        return error(404, "NoSuchCache", "no such cache");
    };
    let missing: Vec<Value> = req["store_path_hashes"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|h| h.as_str().is_some_and(|h| !c.contains_key(h)))
        .collect();
    axum::Json(json!({"missing_paths": missing})).into_response()
}

async fn upload(state: &Arc<Mutex<State>>, headers: &HeaderMap, body: Body) -> Response {
    let mut stream = body.into_data_stream();
    let mut pending: Vec<u8> = Vec::new();
    let info: Value = if let Some(h) = headers.get("x-attic-nar-info") {
        match serde_json::from_slice(h.as_bytes()) {
            Ok(v) => v,
            Err(e) => return error(400, "BadRequest", &format!("X-Attic-Nar-Info: {e}")),
        }
    } else if let Some(n) = headers
        .get("x-attic-nar-info-preamble-size")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        while pending.len() < n {
            match stream.next().await {
                Some(Ok(chunk)) => pending.extend_from_slice(&chunk),
                _ => return error(400, "BadRequest", "the body ended inside the preamble"),
            }
        }
        let rest = pending.split_off(n);
        let v = match serde_json::from_slice(&pending) {
            Ok(v) => v,
            Err(e) => return error(400, "BadRequest", &format!("preamble: {e}")),
        };
        pending = rest;
        v
    } else {
        return error(
            400,
            "BadRequest",
            "no upload info (X-Attic-Nar-Info or a preamble)",
        );
    };
    let cache = info["cache"].as_str().unwrap_or_default().to_owned();
    let (r, sub) = {
        let s = state.lock().expect("state");
        rights(&s.secret, headers, &cache)
    };
    if let Some(e) = require(&r, "w") {
        return e;
    }
    let store_path = info["store_path"].as_str().unwrap_or_default();
    let hash_part = info["store_path_hash"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let base = store_path.strip_prefix("/nix/store/").unwrap_or("");
    if hash_part.len() != 32 || !base.starts_with(&format!("{hash_part}-")) {
        return error(
            400,
            "BadRequest",
            "store_path does not match store_path_hash",
        );
    }
    if let Some(why) = narinfo_fields_refused(&info) {
        return error(400, "BadRequest", &why);
    }
    let (stall, fail) = {
        let s = state.lock().expect("state");
        (s.stall_uploads, s.fail_uploads_of.clone())
    };
    if stall {
        std::future::pending::<()>().await;
    }
    if fail.is_some_and(|f| store_path.contains(&f)) {
        return error(500, "InternalServerError", "storage backend failed");
    }
    // Stream and hash the NAR.
    let discard = state.lock().expect("state").discard_nars;
    let mut size = pending.len() as u64;
    let mut h = Sha256::new();
    let mut nar = Vec::new();
    let mut max_chunk = pending.len();
    h.update(&pending);
    nar.extend_from_slice(&pending);
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return error(400, "BadRequest", "the body broke off");
        };
        max_chunk = max_chunk.max(chunk.len());
        h.update(&chunk);
        size += chunk.len() as u64;
        if !discard {
            nar.extend_from_slice(&chunk);
        }
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let want = info["nar_hash"].as_str().unwrap_or_default();
    let ok_hash = want == format!("sha256:{hex}") || want == format!("sha256:{}", nix32(&digest));
    if !ok_hash {
        state.lock().expect("state").bad_bodies += 1;
        return error(
            400,
            "BadRequest",
            &format!("NarHash mismatch: the NAR is sha256:{hex}, the info says {want}"),
        );
    }
    if info["nar_size"].as_u64() != Some(size) {
        return error(
            400,
            "BadRequest",
            &format!("NarSize mismatch: the NAR is {size} bytes"),
        );
    }
    let mut s = state.lock().expect("state");
    s.max_chunk = s.max_chunk.max(max_chunk);
    let Some(c) = s.caches.get_mut(&cache) else {
        return error(404, "NoSuchCache", "no such cache");
    };
    let kind = if c.contains_key(&hash_part) {
        "Deduplicated"
    } else {
        "Uploaded"
    };
    let stored_path = store_path.to_owned();
    c.entry(hash_part).or_insert(Stored {
        info: info.clone(),
        nar,
        uploader: sub,
    });
    s.uploads.push(stored_path);
    axum::Json(json!({"kind": kind, "file_size": size, "frac_deduplicated": if kind == "Deduplicated" { 1.0 } else { 0.0 }}))
        .into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn nix32_of_a_known_hash() {
        // sha256 of the empty string, as `nix hash to-base32` prints it.
        let d: Vec<u8> = (0..32)
            .map(|i| {
                u8::from_str_radix(
                    &"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
                        [i * 2..i * 2 + 2],
                    16,
                )
                .unwrap()
            })
            .collect();
        assert_eq!(
            super::nix32(&d),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }
}
