//! Agent-side publishing to Attic: the store paths a trusted job's daemon built, with their
//! runtime closure, uploaded by the agent itself — no job process ever holds a push credential.
//!
//! Attic's own upload protocol (what `attic push` sends): `POST /_api/v1/get-missing-paths`
//! with the hash parts, then for each missing path `PUT /_api/v1/upload-path` with the path's
//! upload info in `X-Attic-Nar-Info` (or, past 4 KiB, a preamble whose size is in
//! `X-Attic-Nar-Info-Preamble-Size`) and its NAR streamed from the job's store as the body.
//! Each request carries a token minted for it alone: push on the one cache, expiring minutes
//! later, held in memory only.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flywheel_jit_config::Secret;
use serde::{Deserialize, Serialize};

use crate::attic::{self, SigningKey, TokenRequest};

/// How long a publishing token is valid: minted per request, unused after it.
const TOKEN_VALIDITY: Duration = Duration::from_secs(300);
/// Upload info past this size goes into a preamble instead of a header (as `attic push` does).
const HEADER_LIMIT: usize = 4096;
/// NAR bytes in flight between the archiver and the upload.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("attic refused the token for cache {cache:?} ({status}): check that attic.signing_key_file is the server's token key and that the cache exists; the token grants push on {cache:?} only")]
    Refused { cache: String, status: u16 },
    #[error("attic at {server}: {detail}")]
    Server { server: String, detail: String },
    #[error("cannot mint a publishing token: {0}")]
    Token(String),
    #[error("the job's store database: {0}")]
    Store(String),
}

impl PublishError {
    /// The reason label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Refused { .. } => "refused",
            PublishError::Server { .. } => "server",
            PublishError::Token(_) => "token",
            PublishError::Store(_) => "store",
        }
    }
}

/// A store path to publish, from the job's store database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// `/nix/store/<hash>-<name>`.
    pub path: String,
    /// `sha256:<64 hex>`.
    pub nar_hash: String,
    pub nar_size: u64,
    /// Base names (`<hash>-<name>`).
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
}

impl PathInfo {
    pub fn base(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
    pub fn hash_part(&self) -> &str {
        self.base().split('-').next().unwrap_or("")
    }
}

/// The paths to publish for a job: the out paths its daemon built (`built`, as the daemon's
/// post-build hook recorded them — on a shared store other jobs build too) and their runtime
/// closure, less paths signed by an upstream key.
pub fn to_publish(
    nix_root: &Path,
    built: &[String],
    upstream_keys: &[String],
) -> Result<Vec<PathInfo>, PublishError> {
    let db = nix_root.join("var/nix/db/db.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| PublishError::Store(e.to_string()))?;
    let err = |e: rusqlite::Error| PublishError::Store(e.to_string());
    let mut by_path = conn
        .prepare("SELECT id FROM ValidPaths WHERE path = ?1")
        .map_err(err)?;
    // The hook records the derivation it built (Nix 2.8 leaves OUT_PATHS empty) and, where
    // Nix gives them, the out paths: a derivation stands for its outputs the daemon built.
    let mut outputs = conn
        .prepare("SELECT id FROM ValidPaths WHERE deriver = ?1 AND ultimate = 1")
        .map_err(err)?;
    let mut todo: Vec<i64> = Vec::new();
    for p in built.iter().filter(|p| p.starts_with("/nix/store/")) {
        if p.ends_with(".drv") {
            todo.extend(
                outputs
                    .query_map([p], |r| r.get::<_, i64>(0))
                    .map_err(err)?
                    .flatten(),
            );
        } else if let Ok(id) = by_path.query_row([p], |r| r.get(0)) {
            todo.push(id);
        }
    }
    let mut refs = conn
        .prepare("SELECT reference FROM Refs WHERE referrer = ?1")
        .map_err(err)?;
    let mut info = conn
        .prepare("SELECT path, hash, narSize, deriver, sigs, ca FROM ValidPaths WHERE id = ?1")
        .map_err(err)?;
    let mut names = conn
        .prepare("SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?1")
        .map_err(err)?;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        let (path, hash, size, deriver, sigs, ca): (
            String,
            String,
            Option<i64>,
            Option<String>,
            Option<String>,
            Option<String>,
        ) = info
            .query_row([id], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .map_err(err)?;
        let sigs: Vec<String> = sigs
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if sigs.iter().any(|s| {
            upstream_keys
                .iter()
                .any(|k| s.starts_with(&format!("{k}:")))
        }) {
            // The upstream cache has it, and so has every client of this cache.
            continue;
        }
        let references: Vec<String> = names
            .query_map([id], |r| r.get::<_, String>(0))
            .map_err(err)?
            .filter_map(Result::ok)
            .map(|p| p.rsplit('/').next().unwrap_or(&p).to_owned())
            .collect();
        for r in refs
            .query_map([id], |r| r.get::<_, i64>(0))
            .map_err(err)?
            .flatten()
        {
            todo.push(r);
        }
        out.push(PathInfo {
            path,
            nar_hash: hash,
            nar_size: u64::try_from(size.unwrap_or(0)).unwrap_or(0),
            references,
            deriver,
            sigs,
            ca,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// What a publication did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Published {
    /// Paths the job built (with their closure) that the cache lacked and now has.
    pub uploaded: u64,
    /// NAR bytes sent.
    pub bytes: u64,
    /// Paths the cache already had (before, or deduplicated on upload).
    pub deduplicated: u64,
    pub elapsed: Duration,
    /// Paths that vanished or could not be read: named, skipped.
    pub skipped: Vec<String>,
}

#[derive(Debug, Serialize)]
struct MissingRequest<'a> {
    cache: &'a str,
    store_path_hashes: Vec<&'a str>,
}

#[derive(Debug, Deserialize)]
struct MissingResponse {
    missing_paths: Vec<String>,
}

#[derive(Debug, Serialize)]
struct UploadInfo<'a> {
    cache: &'a str,
    store_path_hash: &'a str,
    store_path: &'a str,
    references: &'a [String],
    system: Option<&'a str>,
    deriver: Option<&'a str>,
    sigs: &'a [String],
    ca: Option<&'a str>,
    nar_hash: &'a str,
    nar_size: u64,
}

#[derive(Debug, Deserialize)]
struct UploadResponse {
    kind: String,
}

/// How the agent proves its right to push.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Mint a token per request (the server's token key).
    Sign(SigningKey),
    /// A static push token (`attic.push_token_file`), kept in memory.
    Static(Secret<String>),
}

/// Who publishes where.
#[derive(Debug, Clone)]
pub struct Publisher {
    pub http: reqwest::Client,
    /// The Attic server's base URL.
    pub server: String,
    pub cache: String,
    pub auth: Auth,
    /// Recorded in the tokens as the uploader.
    pub sub: String,
}

impl Publisher {
    fn token(&self) -> Result<Secret<String>, PublishError> {
        match &self.auth {
            Auth::Static(t) => Ok(t.clone()),
            Auth::Sign(key) => attic::mint(
                key,
                &TokenRequest {
                    cache: self.cache.clone(),
                    sub: self.sub.clone(),
                    validity: TOKEN_VALIDITY,
                    push: true,
                },
            )
            .map_err(|e| PublishError::Token(e.to_string())),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    fn server_err(&self, detail: impl Into<String>) -> PublishError {
        PublishError::Server {
            server: self.server.clone(),
            detail: detail.into(),
        }
    }

    async fn check(&self, r: reqwest::Response) -> Result<reqwest::Response, PublishError> {
        let status = r.status().as_u16();
        match status {
            200..=299 => Ok(r),
            401 | 403 => Err(PublishError::Refused {
                cache: self.cache.clone(),
                status,
            }),
            _ => {
                let body = r.text().await.unwrap_or_default();
                Err(self.server_err(format!(
                    "answered {status}: {}",
                    body.chars().take(300).collect::<String>()
                )))
            }
        }
    }

    /// [`Publisher::publish`], again after 1, 2 and 4 s when the server failed (down, slow,
    /// 5xx); a refusal (401/403) is not retried: it is a configuration problem.
    pub async fn publish_with_retries(
        &self,
        paths: &[PathInfo],
        nix_root: &Path,
    ) -> Result<Published, PublishError> {
        let mut wait = Duration::from_secs(1);
        let mut tries = 0;
        loop {
            match self.publish(paths, nix_root).await {
                Err(PublishError::Server { .. }) if tries < 3 => {
                    tries += 1;
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                r => return r,
            }
        }
    }

    /// Upload `paths` (from the store at `nix_root` as the agent sees it) that the cache lacks.
    pub async fn publish(
        &self,
        paths: &[PathInfo],
        nix_root: &Path,
    ) -> Result<Published, PublishError> {
        let t = Instant::now();
        let mut done = Published::default();
        if paths.is_empty() {
            return Ok(done);
        }
        let token = self.token()?;
        let r = self
            .http
            .post(self.url("/_api/v1/get-missing-paths"))
            .bearer_auth(token.expose())
            .json(&MissingRequest {
                cache: &self.cache,
                store_path_hashes: paths.iter().map(PathInfo::hash_part).collect(),
            })
            .send()
            .await
            .map_err(|e| self.server_err(e.without_url().to_string()))?;
        let missing: MissingResponse = self
            .check(r)
            .await?
            .json()
            .await
            .map_err(|e| self.server_err(format!("get-missing-paths: {e}")))?;
        done.deduplicated = (paths.len() - missing.missing_paths.len().min(paths.len())) as u64;
        for p in paths
            .iter()
            .filter(|p| missing.missing_paths.iter().any(|m| m == p.hash_part()))
        {
            let on_disk = nix_root.join("store").join(p.base());
            if std::fs::symlink_metadata(&on_disk).is_err() {
                done.skipped.push(format!("{} (gone)", p.path));
                continue;
            }
            match self.upload(p, on_disk).await {
                Ok(true) => {
                    done.uploaded += 1;
                    done.bytes += p.nar_size;
                }
                Ok(false) => done.deduplicated += 1,
                Err(UploadError::Publish(e)) => return Err(e),
                Err(UploadError::Dump(e)) => done.skipped.push(format!("{} ({e})", p.path)),
            }
        }
        done.elapsed = t.elapsed();
        Ok(done)
    }

    /// Upload one path; `Ok(false)` when Attic deduplicated it.
    async fn upload(&self, p: &PathInfo, on_disk: PathBuf) -> Result<bool, UploadError> {
        let info = serde_json::to_vec(&UploadInfo {
            cache: &self.cache,
            store_path_hash: p.hash_part(),
            store_path: &p.path,
            references: &p.references,
            system: None,
            deriver: p.deriver.as_deref(),
            sigs: &p.sigs,
            ca: p.ca.as_deref().filter(|c| !c.is_empty()),
            nar_hash: &p.nar_hash,
            nar_size: p.nar_size,
        })
        .map_err(|e| UploadError::Publish(self.server_err(e.to_string())))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
        let preamble = (info.len() > HEADER_LIMIT).then(|| info.clone());
        // The NAR is produced by a blocking thread into a bounded channel: a path of any size
        // is streamed with at most a few chunks in memory.
        let dumper = tokio::task::spawn_blocking(move || {
            let mut w = ChannelWriter {
                tx,
                buf: Vec::with_capacity(CHUNK),
            };
            if let Some(pre) = preamble {
                w.buf.extend_from_slice(&pre);
            }
            let r = crate::nar::dump(&on_disk, &mut w).and_then(|()| w.flush_chunk());
            if let Err(e) = &r {
                let _ =
                    w.tx.blocking_send(Err(std::io::Error::other(e.to_string())));
            }
            r
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let token = self.token().map_err(UploadError::Publish)?;
        let mut req = self
            .http
            .put(self.url("/_api/v1/upload-path"))
            .bearer_auth(token.expose())
            .header("content-type", "application/octet-stream");
        req = if info.len() > HEADER_LIMIT {
            req.header("x-attic-nar-info-preamble-size", info.len().to_string())
        } else {
            req.header(
                "x-attic-nar-info",
                String::from_utf8_lossy(&info).into_owned(),
            )
        };
        let sent = req.body(reqwest::Body::wrap_stream(stream)).send().await;
        let dumped = dumper.await.map_err(|e| UploadError::Dump(e.to_string()))?;
        if let Err(e) = dumped {
            return Err(UploadError::Dump(e.to_string()));
        }
        let r =
            sent.map_err(|e| UploadError::Publish(self.server_err(e.without_url().to_string())))?;
        let r = self.check(r).await.map_err(UploadError::Publish)?;
        let answer: UploadResponse = r
            .json()
            .await
            .map_err(|e| UploadError::Publish(self.server_err(format!("upload-path: {e}"))))?;
        Ok(answer.kind != "Deduplicated")
    }
}

#[derive(Debug)]
enum UploadError {
    Publish(PublishError),
    /// The path could not be archived (vanished, unreadable): skipped, named.
    Dump(String),
}

struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn flush_chunk(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::other("the upload stopped"))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush_chunk()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One line for the job's "Complete runner" block.
pub fn line(p: &Published, server: &str, cache: &str) -> String {
    let mut s = format!(
        "published {} paths ({}, {} deduplicated) to {}/{} in {:.1} s",
        p.uploaded,
        crate::size::Bytes(p.bytes),
        p.deduplicated,
        server.trim_end_matches('/'),
        cache,
        p.elapsed.as_secs_f64()
    );
    if !p.skipped.is_empty() {
        s.push_str(&format!("; skipped {}", p.skipped.join(", ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    /// A store with one real path (`<hash>-hello`, a file) in a database with Nix's schema.
    fn store(root: &Path) -> PathInfo {
        let base = "0123456789abcdfghijklmnpqrsvwxyz-hello";
        std::fs::create_dir_all(root.join("store")).expect("mkdir");
        std::fs::create_dir_all(root.join("var/nix/db")).expect("mkdir");
        std::fs::write(root.join("store").join(base), "hello\n").expect("write");
        let mut nar = Vec::new();
        crate::nar::dump(&root.join("store").join(base), &mut nar).expect("nar");
        let hash: String = sha2::Sha256::digest(&nar)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let c = rusqlite::Connection::open(root.join("var/nix/db/db.sqlite")).expect("db");
        c.execute_batch(
            "CREATE TABLE ValidPaths (id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, path TEXT UNIQUE NOT NULL, hash TEXT NOT NULL, registrationTime INTEGER NOT NULL, deriver TEXT, narSize INTEGER, ultimate INTEGER, sigs TEXT, ca TEXT);
             CREATE TABLE Refs (referrer INTEGER NOT NULL, reference INTEGER NOT NULL, PRIMARY KEY (referrer, reference));",
        )
        .expect("schema");
        c.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate) VALUES (?1, ?2, 1, '/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv', ?3, 1)",
            rusqlite::params![format!("/nix/store/{base}"), format!("sha256:{hash}"), nar.len() as i64],
        )
        .expect("insert");
        c.execute(
            "INSERT INTO ValidPaths (path, hash, registrationTime, narSize, ultimate, sigs) VALUES ('/nix/store/zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-glibc', 'sha256:00', 1, 8, 0, 'cache.nixos.org-1:abc')",
            [],
        )
        .expect("insert");
        c.execute("INSERT INTO Refs (referrer, reference) VALUES (1, 2)", [])
            .expect("ref");
        let paths = to_publish(
            root,
            &["/nix/store/0123456789abcdfghijklmnpqrsvwxyz-hello.drv".to_owned()],
            &["cache.nixos.org-1".to_owned()],
        )
        .expect("to publish");
        assert_eq!(
            paths.len(),
            1,
            "the upstream-signed reference is not published"
        );
        assert_eq!(
            paths[0].references,
            vec!["zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz-glibc"]
        );
        paths[0].clone()
    }

    fn publisher(url: &str, secret: &[u8]) -> Publisher {
        Publisher {
            http: reqwest::Client::new(),
            server: url.to_owned(),
            cache: "main".into(),
            auth: Auth::Sign(SigningKey::Hs256(Secret::new(secret.to_vec()))),
            sub: "test".into(),
        }
    }

    #[test]
    fn uploads_deduplicates_refuses_and_skips_as_attic_says() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        let secret = b"0123456789abcdef0123456789abcdef".to_vec();
        let attic = fake_attic::FakeAttic::start(&secret, &["main"]);
        let t = tempfile::tempdir().expect("tempdir");
        let p = store(t.path());
        rt.block_on(async {
            let ok = publisher(&attic.url, &secret);
            let done = ok
                .publish(std::slice::from_ref(&p), t.path())
                .await
                .expect("published");
            assert_eq!((done.uploaded, done.deduplicated), (1, 0));
            assert_eq!(done.bytes, p.nar_size);
            // Again: the cache has it.
            let again = ok
                .publish(std::slice::from_ref(&p), t.path())
                .await
                .expect("again");
            assert_eq!((again.uploaded, again.deduplicated), (0, 1));
            // A token the server does not accept: a configuration problem, named.
            let wrong = publisher(&attic.url, b"another key, not the server's one");
            let e = wrong
                .publish(std::slice::from_ref(&p), t.path())
                .await
                .expect_err("refused");
            assert!(
                matches!(e, PublishError::Refused { status: 401, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("\"main\""), "{e}");
            // A path whose NAR is not what the database says: the server refuses it.
            let mut lying = p.clone();
            lying.nar_hash = format!("sha256:{}", "0".repeat(64));
            lying.path = "/nix/store/1123456789abcdfghijklmnpqrsvwxyz-hello".into();
            std::fs::copy(
                t.path().join("store").join(p.base()),
                t.path().join("store").join(lying.base()),
            )
            .expect("copy");
            let e = ok.publish(&[lying], t.path()).await.expect_err("bad hash");
            assert!(e.to_string().contains("NarHash mismatch"), "{e}");
            // A path that vanished is skipped and named.
            let mut gone = p.clone();
            gone.path = "/nix/store/2123456789abcdfghijklmnpqrsvwxyz-gone".into();
            let done = ok.publish(&[gone], t.path()).await.expect("skips");
            assert_eq!(done.uploaded, 0);
            assert!(
                done.skipped[0].contains("-gone (gone)"),
                "{:?}",
                done.skipped
            );
        });
        // What the fake stored is byte for byte the NAR.
        let stored = attic.with(|s| s.caches["main"].clone());
        let mut nar = Vec::new();
        crate::nar::dump(&t.path().join("store").join(p.base()), &mut nar).expect("nar");
        assert_eq!(stored[p.hash_part()].nar, nar);
    }
}
