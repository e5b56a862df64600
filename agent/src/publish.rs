//! Agent-side publishing to Attic: the store paths a trusted job's daemon built, with their
//! runtime closure, uploaded by the agent itself — no job process ever holds a push credential.
//!
//! Attic's own upload protocol (what `attic push` sends): `POST /_api/v1/get-missing-paths`
//! with the hash parts, then for each missing path `PUT /_api/v1/upload-path` with the path's
//! upload info in `X-Attic-Nar-Info` (or, past 4 KiB, a preamble whose size is in
//! `X-Attic-Nar-Info-Preamble-Size`) and its NAR streamed from the job's store as the body.
//! Each request carries a token minted for it alone: push on the one cache, expiring minutes
//! later, held in memory only.
//!
//! What is sent is what the agent computed or verified, in the form Nix writes it: the NAR
//! from the store (by descriptors, see `nar`), its hash and size checked against the store's
//! database before the upload is allowed to complete, references as base names, a content
//! address only when it computes to the path; never the database's deriver or signature
//! strings (anyone who can talk to a daemon can add those). A path counts as the upstream's
//! only when one of its signatures verifies under `attic.upstream_keys`.

use std::ffi::OsStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flywheel_jit_config::Secret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::attic::{self, SigningKey, TokenRequest};
use crate::narinfo::{self, PublicKey};

/// How long a publishing token is valid: minted per request, unused after it.
const TOKEN_VALIDITY: Duration = Duration::from_secs(300);
/// Upload info past this size goes into a preamble instead of a header (as `attic push` does).
const HEADER_LIMIT: usize = 4096;
/// NAR bytes in flight between the archiver and the upload.
const CHUNK: usize = 64 * 1024;
/// Tries of a request the server failed (down, slow, 5xx, 429): the first and three more.
const TRIES: u32 = 4;
/// Failures named in a job's line; the rest are counted.
const NAMED_FAILURES: usize = 5;
/// The most of an error answer's body the agent reads.
const ERROR_BODY: usize = 4096;
/// The most of a successful answer's body (a small JSON object) the agent reads.
const ANSWER_BODY: usize = 64 * 1024;

/// At most `limit` bytes of a response's body.
async fn bounded_body(mut r: reqwest::Response, limit: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        let room = limit.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    Ok(body)
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("attic refused the token for cache {cache:?} ({status}): check that attic.signing_key_file is the server's token key and that the cache exists; the token grants push on {cache:?} only")]
    Refused { cache: String, status: u16 },
    #[error("attic at {server}: {detail}")]
    Server { server: String, detail: String },
    #[error("cannot mint a publishing token: {0}")]
    Token(String),
    /// The job's store as files (its `store` directory).
    #[error("the job's store: {0}")]
    Store(String),
    #[error("the job's store database: {0}")]
    Database(#[from] crate::store::StoreError),
}

impl PublishError {
    /// The reason label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            PublishError::Refused { .. } => "refused",
            PublishError::Server { .. } => "server",
            PublishError::Token(_) => "token",
            PublishError::Store(_) | PublishError::Database(_) => "store",
        }
    }
}

/// A store path to publish: what the agent read from the job's store database and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// `/nix/store/<hash>-<name>`, a name Nix accepts.
    pub path: String,
    /// The database's NAR hash; the streamed NAR must match it.
    pub nar_hash: [u8; 32],
    pub nar_size: u64,
    /// Full store paths.
    pub references: Vec<String>,
    /// The database's content address, only when it computes to `path`.
    pub ca: Option<String>,
}

impl PathInfo {
    pub fn base(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or(&self.path)
    }
    pub fn hash_part(&self) -> &str {
        self.base().split('-').next().unwrap_or("")
    }
    fn reference_names(&self) -> Vec<&str> {
        self.references
            .iter()
            .map(|r| r.rsplit('/').next().unwrap_or(r))
            .collect()
    }
}

/// A path that was not published, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub path: String,
    pub reason: String,
}

/// What a job's publication is made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    pub paths: Vec<PathInfo>,
    /// Paths left out because a signature verified under an upstream key (their closures
    /// too: the upstream cache has those).
    pub upstream: u64,
    /// Paths the database describes in a form no client would accept.
    pub unusable: Vec<Failed>,
}

/// The paths to publish for a job: the out paths its daemon built (`built`, as the daemon's
/// post-build hook recorded them — on a shared store other jobs build too) and their runtime
/// closure, less paths whose signature verifies under an upstream key. The closure is walked
/// on the store's blocking thread.
pub async fn to_publish(
    nix_root: &Path,
    built: &[String],
    upstream: &[PublicKey],
) -> Result<Selection, PublishError> {
    let (root, built, upstream) = (nix_root.to_owned(), built.to_vec(), upstream.to_vec());
    let sel = crate::store::blocking(move |b| select(&b.open(&root)?, &built, &upstream)).await??;
    Ok(sel)
}

fn select(
    db: &crate::store::Db,
    built: &[String],
    upstream: &[PublicKey],
) -> Result<Selection, crate::store::StoreError> {
    let conn = db.conn();
    let mut by_path = conn.prepare("SELECT id FROM ValidPaths WHERE path = ?1")?;
    // The hook records the derivation it built (Nix 2.8 leaves OUT_PATHS empty) and, where
    // Nix gives them, the out paths: a derivation stands for its outputs the daemon built.
    let mut outputs =
        conn.prepare("SELECT id FROM ValidPaths WHERE deriver = ?1 AND ultimate = 1")?;
    let mut todo: Vec<i64> = Vec::new();
    for p in built.iter().filter(|p| p.starts_with("/nix/store/")) {
        if p.ends_with(".drv") {
            todo.extend(outputs.query_map([p], |r| r.get::<_, i64>(0))?.flatten());
        } else if let Ok(id) = by_path.query_row([p], |r| r.get(0)) {
            todo.push(id);
        }
    }
    let mut info =
        conn.prepare("SELECT path, hash, narSize, sigs, ca FROM ValidPaths WHERE id = ?1")?;
    let mut refs = conn.prepare(
        "SELECT v.id, v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?1",
    )?;
    let mut seen = std::collections::BTreeSet::new();
    let mut sel = Selection::default();
    while let Some(id) = todo.pop() {
        if !seen.insert(id) {
            continue;
        }
        type Row = (String, String, Option<i64>, Option<String>, Option<String>);
        let (path, hash, size, sigs, ca): Row = info.query_row([id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?;
        let mut references: Vec<String> = Vec::new();
        let mut below: Vec<i64> = Vec::new();
        for row in refs.query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))? {
            let (rid, rpath) = row?;
            below.push(rid);
            references.push(rpath);
        }
        references.sort();
        let unusable = |reason: String| Failed {
            path: path.clone(),
            reason,
        };
        let (Some(nar_hash), Some(nar_size)) = (
            narinfo::parse_sha256(&hash),
            size.and_then(|s| u64::try_from(s).ok()).filter(|s| *s > 0),
        ) else {
            sel.unusable.push(unusable(format!(
                "the store database gives no usable NAR hash and size ({hash:?}, {size:?})"
            )));
            continue;
        };
        if narinfo::base_name(&path).is_none()
            || references.iter().any(|r| narinfo::base_name(r).is_none())
        {
            sel.unusable.push(unusable(
                "a name Nix does not accept as a store path".into(),
            ));
            continue;
        }
        let sigs = sigs.unwrap_or_default();
        let sigs: Vec<&str> = sigs.split_whitespace().collect();
        let fingerprint = narinfo::fingerprint(&path, &nar_hash, nar_size, &references);
        if narinfo::verified_by(upstream, &fingerprint, &sigs).is_some() {
            // The upstream cache signed it, and has its closure: every client of this cache
            // trusts that cache.
            sel.upstream += 1;
            continue;
        }
        todo.extend(below);
        let ca = ca
            .filter(|c| !c.is_empty())
            .filter(|c| narinfo::ca_matches(c, &path, &references));
        sel.paths.push(PathInfo {
            path,
            nar_hash,
            nar_size,
            references,
            ca,
        });
    }
    sel.paths = dependencies_first(sel.paths);
    Ok(sel)
}

/// `paths` ordered so that every path comes after the paths it refers to (as `nix copy`
/// uploads), ties by name: a cache that an interrupted publication left behind never holds a
/// path without its references.
fn dependencies_first(mut paths: Vec<PathInfo>) -> Vec<PathInfo> {
    paths.sort_by(|a, b| a.path.cmp(&b.path));
    let index: std::collections::HashMap<String, usize> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| (p.path.clone(), i))
        .collect();
    let mut state = vec![0u8; paths.len()]; // 0 new, 1 on the stack, 2 placed
    let mut order = Vec::with_capacity(paths.len());
    for root in 0..paths.len() {
        // An explicit stack of (path, next reference to look at): closures can be deep.
        let mut stack = vec![(root, 0usize)];
        while let Some((i, next)) = stack.pop() {
            if next == 0 {
                if state[i] != 0 {
                    continue;
                }
                state[i] = 1;
            }
            let deps = &paths[i].references;
            match deps[next.min(deps.len())..]
                .iter()
                .position(|r| index.get(r).is_some_and(|&j| state[j] == 0))
            {
                Some(k) => {
                    let j = index[&deps[next + k]];
                    stack.push((i, next + k + 1));
                    stack.push((j, 0));
                }
                None => {
                    state[i] = 2;
                    order.push(i);
                }
            }
        }
    }
    let mut slots: Vec<Option<PathInfo>> = paths.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

/// What became of a job's builds at its end: published (to that server's cache), or why not.
/// Facts, rendered where they are shown (`Display`: the job's log and summary line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Published {
        done: Published,
        server: String,
        cache: String,
    },
    NotPublished(Unpublished),
    /// The completed hook's publication, still under way at the job's end, finished after it.
    FinishedAfter,
    /// Publishing (the completed hook's, or the one after the job) did not finish within
    /// `secs`: what was not uploaded stays unpublished.
    TimedOut {
        waited_for_hook: bool,
        secs: u64,
    },
    /// Published (or not) after the job by the envelope, not by the completed hook.
    AfterTheJob(Box<Outcome>),
}

/// Why nothing of a job was published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unpublished {
    #[error("the lane has no cache")]
    NoCache,
    #[error("the job ran out of memory (attic.publish_after_oom = false)")]
    AfterOom,
    #[error("the job had no Nix store")]
    NoStore,
    #[error("this agent holds no push credential")]
    NoCredential,
    #[error("the job built nothing")]
    BuiltNothing,
    /// What it built could not be told, or the publication failed (the error's text).
    #[error("{0}")]
    Failed(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Published {
                done,
                server,
                cache,
            } => f.write_str(&line(done, server, cache)),
            Outcome::NotPublished(why) => write!(f, "nothing published: {why}"),
            Outcome::FinishedAfter => {
                f.write_str("after the job: the completed hook's publication finished")
            }
            Outcome::TimedOut {
                waited_for_hook: true,
                secs,
            } => write!(
                f,
                "left unpublished: the completed hook's publication did not finish within {secs} s"
            ),
            Outcome::TimedOut {
                waited_for_hook: false,
                secs,
            } => write!(
                f,
                "left unpublished: publishing did not finish within {secs} s"
            ),
            Outcome::AfterTheJob(o) => write!(f, "after the job: {o}"),
        }
    }
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
    /// Paths left to the upstream cache (a signature verified).
    pub upstream: u64,
    pub elapsed: Duration,
    /// Paths not published, each with its reason; the others went up.
    pub failed: Vec<Failed>,
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

/// Attic's upload info, with only what the agent computed or verified: no deriver, no
/// signatures (the cache signs with its own key).
#[derive(Debug, Serialize)]
struct UploadInfo<'a> {
    cache: &'a str,
    store_path_hash: &'a str,
    store_path: &'a str,
    references: Vec<&'a str>,
    system: Option<&'a str>,
    deriver: Option<&'a str>,
    sigs: [&'a str; 0],
    ca: Option<&'a str>,
    nar_hash: String,
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

/// How long publishing may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The wait before the first retry of a failed request; doubled for each retry.
    pub backoff: Duration,
    /// Every upload's deadline is this plus one second per `min_rate` bytes of its NAR.
    pub deadline: Duration,
    pub min_rate: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            backoff: Duration::from_secs(1),
            deadline: Duration::from_secs(60),
            min_rate: 1 << 20,
        }
    }
}

impl Limits {
    fn upload_deadline(&self, nar_size: u64) -> Duration {
        self.deadline + Duration::from_secs(nar_size / self.min_rate.max(1))
    }
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
    pub limits: Limits,
}

/// Why one request failed.
#[derive(Debug)]
enum Failure {
    /// 401/403: a configuration problem; nothing more is tried.
    Refused(PublishError),
    /// The server failed (unreachable, slow, 5xx, 429): tried again.
    Transient(String),
    /// This path cannot be published (the store's copy, or the server's 4xx about it).
    Path(String),
}

impl Publisher {
    fn token(&self) -> Result<Secret<String>, Failure> {
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
            .map_err(|e| Failure::Refused(PublishError::Token(e.to_string()))),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.trim_end_matches('/'))
    }

    /// A response's status as a failure, with a bounded excerpt of its body.
    async fn check(&self, r: reqwest::Response) -> Result<reqwest::Response, Failure> {
        let status = r.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(r);
        }
        if status == 401 || status == 403 {
            return Err(Failure::Refused(PublishError::Refused {
                cache: self.cache.clone(),
                status,
            }));
        }
        let body = bounded_body(r, ERROR_BODY).await.unwrap_or_default();
        let detail = format!(
            "answered {status}: {}",
            String::from_utf8_lossy(&body)
                .chars()
                .filter(|c| !c.is_control())
                .take(300)
                .collect::<String>()
        );
        Err(if status >= 500 || status == 429 {
            Failure::Transient(detail)
        } else {
            Failure::Path(detail)
        })
    }

    /// `attempt` until it succeeds, fails for good, or failed [`TRIES`] times (waiting
    /// `limits.backoff`, doubled each time).
    async fn retrying<T, F, Fut>(&self, mut attempt: F) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        let mut wait = self.limits.backoff;
        for _ in 1..TRIES {
            match attempt().await {
                Err(Failure::Transient(_)) => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                r => return r,
            }
        }
        attempt().await
    }

    async fn missing(&self, paths: &[PathInfo]) -> Result<Vec<String>, Failure> {
        let token = self.token()?;
        let r = self
            .http
            .post(self.url("/_api/v1/get-missing-paths"))
            .timeout(self.limits.deadline)
            .bearer_auth(token.expose())
            .json(&MissingRequest {
                cache: &self.cache,
                store_path_hashes: paths.iter().map(PathInfo::hash_part).collect(),
            })
            .send()
            .await
            .map_err(|e| Failure::Transient(e.without_url().to_string()))?;
        let body = bounded_body(self.check(r).await?, 16 << 20)
            .await
            .map_err(|e| Failure::Transient(format!("get-missing-paths: {}", e.without_url())))?;
        let answer: MissingResponse = serde_json::from_slice(&body)
            .map_err(|e| Failure::Transient(format!("get-missing-paths: {e}")))?;
        Ok(answer.missing_paths)
    }

    /// Upload what `sel` holds (from the store at `nix_root` as the agent sees it) that the
    /// cache lacks. A path that fails is named with its reason and the others still go up;
    /// only a refused credential or a server that never answers `get-missing-paths` fails the
    /// whole publication.
    pub async fn publish(
        &self,
        sel: &Selection,
        nix_root: &Path,
    ) -> Result<Published, PublishError> {
        let t = Instant::now();
        let mut done = Published {
            upstream: sel.upstream,
            failed: sel.unusable.clone(),
            ..Published::default()
        };
        if sel.paths.is_empty() {
            return Ok(done);
        }
        let missing = match self.retrying(|| self.missing(&sel.paths)).await {
            Ok(m) => m,
            Err(Failure::Refused(e)) => return Err(e),
            Err(Failure::Transient(d) | Failure::Path(d)) => {
                return Err(PublishError::Server {
                    server: self.server.clone(),
                    detail: d,
                })
            }
        };
        let missing: std::collections::HashSet<String> = missing.into_iter().collect();
        let store = crate::workdir::open_dir_at(None, nix_root.join("store").as_os_str())
            .map(Arc::new)
            .map_err(|e| PublishError::Store(format!("{}: {e}", nix_root.display())))?;
        // Paths that did not go up: what refers to them does not go up either.
        let mut not_up: std::collections::HashSet<String> =
            sel.unusable.iter().map(|f| f.path.clone()).collect();
        for p in &sel.paths {
            if let Some(r) = p.references.iter().find(|r| not_up.contains(*r)) {
                not_up.insert(p.path.clone());
                done.failed.push(Failed {
                    path: p.path.clone(),
                    reason: format!("it refers to {r}, which was not published"),
                });
                continue;
            }
            if !missing.contains(p.hash_part()) {
                done.deduplicated += 1;
                continue;
            }
            match self.retrying(|| self.upload(p, store.clone())).await {
                Ok(true) => {
                    done.uploaded += 1;
                    done.bytes += p.nar_size;
                }
                Ok(false) => done.deduplicated += 1,
                Err(Failure::Refused(e)) => return Err(e),
                Err(Failure::Transient(reason) | Failure::Path(reason)) => {
                    not_up.insert(p.path.clone());
                    done.failed.push(Failed {
                        path: p.path.clone(),
                        reason,
                    })
                }
            }
        }
        done.elapsed = t.elapsed();
        Ok(done)
    }

    /// Upload one path within its deadline; `Ok(false)` when Attic deduplicated it.
    async fn upload(&self, p: &PathInfo, store: Arc<OwnedFd>) -> Result<bool, Failure> {
        let info = serde_json::to_vec(&UploadInfo {
            cache: &self.cache,
            store_path_hash: p.hash_part(),
            store_path: &p.path,
            references: p.reference_names(),
            system: None,
            deriver: None,
            sigs: [],
            ca: p.ca.as_deref(),
            nar_hash: format!("sha256:{}", narinfo::hex(&p.nar_hash)),
            nar_size: p.nar_size,
        })
        .map_err(|e| Failure::Path(e.to_string()))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(4);
        let preamble = (info.len() > HEADER_LIMIT).then(|| info.clone());
        let (name, want) = (p.base().to_owned(), (p.nar_hash, p.nar_size));
        let deadline = self.limits.upload_deadline(p.nar_size);
        let handle = tokio::runtime::Handle::current();
        // The NAR is produced by a blocking thread into a bounded channel: a path of any size
        // is streamed with at most a few chunks in memory, and the last one is held back until
        // the whole NAR hashed to what the database says. A chunk nobody takes within the
        // deadline ends the archiver too.
        let dumper = tokio::task::spawn_blocking(move || {
            let mut w = NarSender::new(tx, preamble.unwrap_or_default(), handle, deadline);
            let dumped = crate::nar::dump_at(store.as_fd(), OsStr::new(&name), &mut w);
            let r = match dumped {
                Err(_) if w.stopped => Err(Archive::Stopped),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(Archive::Store("gone from the store".to_owned()))
                }
                Err(e) => Err(Archive::Store(e.to_string())),
                Ok(()) => w.finish(want),
            };
            if let Err(Archive::Store(e)) = &r {
                let _ = w.tx.try_send(Err(std::io::Error::other(e.clone())));
            }
            r
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|chunk| (chunk, rx))
        });
        let token = self.token()?;
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
        // One deadline for the whole exchange: sending, the answer and its body.
        let exchange = async {
            let r = req
                .body(reqwest::Body::wrap_stream(stream))
                .send()
                .await
                .map_err(|e| Failure::Transient(e.without_url().to_string()))?;
            let body = bounded_body(self.check(r).await?, ANSWER_BODY)
                .await
                .map_err(|e| Failure::Transient(format!("upload-path: {}", e.without_url())))?;
            serde_json::from_slice::<UploadResponse>(&body)
                .map_err(|e| Failure::Transient(format!("upload-path: {e}")))
        };
        let answered = tokio::time::timeout(deadline, exchange).await;
        // The request is over and its body dropped: the archiver ends at once (or within the
        // deadline if something still holds the body).
        let archived = match tokio::time::timeout(deadline, dumper).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(Archive::Store(format!("archiving failed: {e}"))),
            Err(_) => Err(Archive::Stopped),
        };
        // What the store's copy says first (it is this path's fault, and is not retried), then
        // what the server said.
        if let Err(Archive::Store(reason)) = archived {
            return Err(Failure::Path(reason));
        }
        match answered {
            Err(_) => Err(Failure::Transient(format!(
                "no answer within {} s",
                deadline.as_secs_f64().ceil()
            ))),
            Ok(Err(f)) => Err(f),
            Ok(Ok(_)) if archived.is_err() => Err(Failure::Transient(
                "the server answered before the whole NAR was sent".into(),
            )),
            Ok(Ok(answer)) => Ok(answer.kind != "Deduplicated"),
        }
    }
}

/// Why the archiver stopped.
#[derive(Debug)]
enum Archive {
    /// The request ended first (answered, failed or timed out): its outcome says why.
    Stopped,
    /// The store's copy: gone, changed, not archivable, not what the database says.
    Store(String),
}

/// The upload's body, from the archiver: chunks into a bounded channel, every NAR byte hashed,
/// the last chunk sent only once the NAR is known to be what the database says.
struct NarSender {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    held: Option<Vec<u8>>,
    hash: Sha256,
    size: u64,
    handle: tokio::runtime::Handle,
    /// How long one chunk may wait to be taken.
    patience: Duration,
    /// The request stopped taking chunks.
    stopped: bool,
}

impl NarSender {
    fn new(
        tx: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
        preamble: Vec<u8>,
        handle: tokio::runtime::Handle,
        patience: Duration,
    ) -> Self {
        let mut buf = preamble;
        buf.reserve(CHUNK);
        NarSender {
            tx,
            buf,
            held: None,
            hash: Sha256::new(),
            size: 0,
            handle,
            patience,
            stopped: false,
        }
    }

    fn send(&mut self, chunk: Vec<u8>) -> std::io::Result<()> {
        let sent = self
            .handle
            .block_on(self.tx.send_timeout(Ok(chunk), self.patience));
        if sent.is_err() {
            self.stopped = true;
            return Err(std::io::Error::other("the upload stopped"));
        }
        Ok(())
    }

    /// Send what is held back if the NAR is the database's.
    fn finish(&mut self, (hash, size): ([u8; 32], u64)) -> Result<(), Archive> {
        let got: [u8; 32] = std::mem::take(&mut self.hash).finalize().into();
        if (got, self.size) != (hash, size) {
            return Err(Archive::Store(format!(
                "the store's copy is not what its database says (NAR sha256:{}, {} bytes; the database says sha256:{}, {} bytes): not uploaded",
                narinfo::hex(&got),
                self.size,
                narinfo::hex(&hash),
                size
            )));
        }
        for chunk in [self.held.take(), Some(std::mem::take(&mut self.buf))]
            .into_iter()
            .flatten()
            .filter(|c| !c.is_empty())
        {
            self.send(chunk).map_err(|_| Archive::Stopped)?;
        }
        Ok(())
    }
}

impl std::io::Write for NarSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.hash.update(data);
        self.size += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
            if let Some(previous) = self.held.replace(chunk) {
                self.send(previous)?;
            }
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One line for the job's "Complete runner" block; failures named (a few, bounded).
pub fn line(p: &Published, server: &str, cache: &str) -> String {
    let mut s = format!(
        "published {} paths ({}, {} deduplicated",
        p.uploaded,
        crate::size::Bytes(p.bytes),
        p.deduplicated,
    );
    if p.upstream > 0 {
        s.push_str(&format!(", {} left to the upstream cache", p.upstream));
    }
    s.push_str(&format!(
        ") to {}/{} in {:.1} s",
        server.trim_end_matches('/'),
        cache,
        p.elapsed.as_secs_f64()
    ));
    if !p.failed.is_empty() {
        let named: Vec<String> = p
            .failed
            .iter()
            .take(NAMED_FAILURES)
            .map(|f| {
                let clean = |t: &str, n: usize| -> String {
                    t.chars().filter(|c| !c.is_control()).take(n).collect()
                };
                format!("{} ({})", clean(&f.path, 300), clean(&f.reason, 200))
            })
            .collect();
        s.push_str(&format!(
            "; {} not published: {}",
            p.failed.len(),
            named.join(", ")
        ));
        if p.failed.len() > NAMED_FAILURES {
            s.push_str(&format!(" and {} more", p.failed.len() - NAMED_FAILURES));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_outcome_reads_as_the_lines_it_replaced() {
        let nothing = Outcome::NotPublished(Unpublished::NoCache);
        assert_eq!(
            nothing.to_string(),
            "nothing published: the lane has no cache"
        );
        assert_eq!(
            Outcome::NotPublished(Unpublished::AfterOom).to_string(),
            "nothing published: the job ran out of memory (attic.publish_after_oom = false)"
        );
        assert_eq!(
            Outcome::AfterTheJob(Box::new(nothing)).to_string(),
            "after the job: nothing published: the lane has no cache"
        );
        assert_eq!(
            Outcome::TimedOut {
                waited_for_hook: true,
                secs: 30
            }
            .to_string(),
            "left unpublished: the completed hook's publication did not finish within 30 s"
        );
        assert_eq!(
            Outcome::TimedOut {
                waited_for_hook: false,
                secs: 30
            }
            .to_string(),
            "left unpublished: publishing did not finish within 30 s"
        );
        let done = Published {
            uploaded: 2,
            bytes: 2048,
            deduplicated: 1,
            ..Published::default()
        };
        let o = Outcome::Published {
            done: done.clone(),
            server: "http://attic:8080/".into(),
            cache: "main".into(),
        };
        assert_eq!(o.to_string(), line(&done, "http://attic:8080/", "main"));
        assert!(o
            .to_string()
            .starts_with("published 2 paths (2.0 KiB, 1 deduplicated) to http://attic:8080/main"));
    }

    const DRV: &str = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-top.drv";

    /// A store in a tempdir with Nix's schema: paths with real contents and NAR hashes.
    struct Store {
        dir: tempfile::TempDir,
        db: rusqlite::Connection,
    }

    impl Store {
        fn new() -> Store {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir_all(dir.path().join("store")).expect("mkdir");
            std::fs::create_dir_all(dir.path().join("var/nix/db")).expect("mkdir");
            let db =
                rusqlite::Connection::open(dir.path().join("var/nix/db/db.sqlite")).expect("db");
            db.execute_batch(
                "CREATE TABLE ValidPaths (id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, path TEXT UNIQUE NOT NULL, hash TEXT NOT NULL, registrationTime INTEGER NOT NULL, deriver TEXT, narSize INTEGER, ultimate INTEGER, sigs TEXT, ca TEXT);
                 CREATE TABLE Refs (referrer INTEGER NOT NULL, reference INTEGER NOT NULL, PRIMARY KEY (referrer, reference));",
            )
            .expect("schema");
            Store { dir, db }
        }

        fn root(&self) -> &Path {
            self.dir.path()
        }

        /// Add `<hash>-<name>` holding `content`, built by `DRV` when `ultimate`.
        fn add(
            &self,
            hash: char,
            name: &str,
            content: &str,
            refs: &[i64],
            sigs: &str,
        ) -> (i64, String) {
            let base = format!("{}-{name}", hash.to_string().repeat(32));
            let on_disk = self.root().join("store").join(&base);
            std::fs::write(&on_disk, content).expect("write");
            let mut nar = Vec::new();
            crate::nar::dump(&on_disk, &mut nar).expect("nar");
            let path = format!("/nix/store/{base}");
            self.db
                .execute(
                    "INSERT INTO ValidPaths (path, hash, registrationTime, deriver, narSize, ultimate, sigs) VALUES (?1, ?2, 1, ?3, ?4, 1, ?5)",
                    rusqlite::params![
                        path,
                        format!("sha256:{}", narinfo::hex(&Sha256::digest(&nar))),
                        DRV,
                        nar.len() as i64,
                        sigs
                    ],
                )
                .expect("insert");
            let id = self.db.last_insert_rowid();
            for r in refs {
                self.db
                    .execute(
                        "INSERT INTO Refs (referrer, reference) VALUES (?1, ?2)",
                        [id, *r],
                    )
                    .expect("ref");
            }
            (id, path)
        }

        /// The fingerprint of a path as the database describes it.
        fn fingerprint(&self, id: i64) -> String {
            let (path, hash, size): (String, String, i64) = self
                .db
                .query_row(
                    "SELECT path, hash, narSize FROM ValidPaths WHERE id = ?1",
                    [id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .expect("row");
            let mut refs: Vec<String> = self
                .db
                .prepare("SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference WHERE r.referrer = ?1")
                .expect("sql")
                .query_map([id], |r| r.get(0))
                .expect("refs")
                .map(|r| r.expect("ref"))
                .collect();
            refs.sort();
            narinfo::fingerprint(
                &path,
                &narinfo::parse_sha256(&hash).expect("hash"),
                size as u64,
                &refs,
            )
        }
    }

    /// An upstream cache's key pair (`name`, seed 7s).
    fn upstream(name: &str) -> (ring::signature::Ed25519KeyPair, PublicKey) {
        use base64::Engine;
        let kp = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).expect("seed");
        let pk = ring::signature::KeyPair::public_key(&kp).as_ref().to_vec();
        let key = PublicKey::parse(&format!(
            "{name}:{}",
            base64::engine::general_purpose::STANDARD.encode(pk)
        ))
        .expect("key");
        (kp, key)
    }

    fn sign(kp: &ring::signature::Ed25519KeyPair, name: &str, fingerprint: &str) -> String {
        use base64::Engine;
        format!(
            "{name}:{}",
            base64::engine::general_purpose::STANDARD.encode(kp.sign(fingerprint.as_bytes()))
        )
    }

    fn publisher(url: &str, secret: &[u8]) -> Publisher {
        Publisher {
            http: reqwest::Client::new(),
            server: url.to_owned(),
            cache: "main".into(),
            auth: Auth::Sign(SigningKey::Hs256(Secret::new(secret.to_vec()))),
            sub: "test".into(),
            limits: Limits {
                backoff: Duration::from_millis(10),
                deadline: Duration::from_secs(5),
                min_rate: 1 << 20,
            },
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    /// A signature named like the upstream's is attacker input (a client can add signatures
    /// to any path): only one that verifies leaves a path, and its closure, to the upstream.
    #[test]
    fn only_a_signature_that_verifies_leaves_a_path_to_the_upstream() {
        let st = Store::new();
        let (kp, key) = upstream("cache.nixos.org-1");
        let (below, below_path) = st.add('b', "below", "below\n", &[], "");
        let (claimed, claimed_path) = st.add('c', "claimed", "claimed\n", &[below], "");
        // Named like the upstream's key, signed by another (the attacker's own key), plus a
        // string with a DEL byte: neither verifies.
        let (attacker, _) = {
            let kp = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[9; 32]).expect("seed");
            (kp, ())
        };
        let forged = sign(&attacker, "cache.nixos.org-1", &st.fingerprint(claimed));
        st.db
            .execute(
                "UPDATE ValidPaths SET sigs = ?1 WHERE id = ?2",
                rusqlite::params![format!("{forged} cache.nixos.org-1:a\u{7f}b"), claimed],
            )
            .expect("sigs");
        let (genuine, genuine_path) = st.add('g', "glibc", "glibc\n", &[], "");
        let real = sign(&kp, "cache.nixos.org-1", &st.fingerprint(genuine));
        st.db
            .execute(
                "UPDATE ValidPaths SET sigs = ?1 WHERE id = ?2",
                rusqlite::params![real, genuine],
            )
            .expect("sigs");
        let (_, top) = st.add('x', "top", "top\n", &[claimed, genuine], "");
        let sel = rt()
            .block_on(to_publish(
                st.root(),
                &[DRV.to_owned()],
                std::slice::from_ref(&key),
            ))
            .expect("select");
        let chosen: Vec<&str> = sel.paths.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(sel.upstream, 1, "{chosen:?}");
        assert!(!chosen.contains(&genuine_path.as_str()), "{chosen:?}");
        for p in [&top, &claimed_path, &below_path] {
            assert!(
                chosen.contains(&p.as_str()),
                "{p} is missing from {chosen:?}"
            );
        }
        let t = sel.paths.iter().find(|p| p.path == top).expect("top");
        assert_eq!(t.references, {
            let mut r = vec![claimed_path.clone(), genuine_path.clone()];
            r.sort();
            r
        });
    }

    /// What goes up is what Nix's narinfo parser accepts: the strict fake would refuse a
    /// full-path deriver or a signature string; the agent sends neither.
    #[test]
    fn uploads_carry_only_what_the_agent_computed_and_attic_signs_them() {
        let st = Store::new();
        let (dep, dep_path) = st.add('d', "dep", "dep\n", &[], "x:\u{7f}");
        let (_, top) = st.add('x', "top", "top\n", &[dep], "cache.nixos.org-1:AAAA");
        let attic = fake_attic::FakeAttic::start(SECRET, &["main"]);
        let sel = rt()
            .block_on(to_publish(st.root(), &[DRV.to_owned()], &[]))
            .expect("select");
        let done = rt()
            .block_on(publisher(&attic.url, SECRET).publish(&sel, st.root()))
            .expect("published");
        assert_eq!(
            (done.uploaded, done.deduplicated),
            (2, 0),
            "{:?}",
            done.failed
        );
        assert!(done.failed.is_empty(), "{:?}", done.failed);
        let stored = attic.with(|s| s.caches["main"].clone());
        let t = stored
            .values()
            .find(|s| s.info["store_path"] == top.as_str())
            .expect("top");
        assert_eq!(t.info["deriver"], serde_json::Value::Null);
        assert_eq!(t.info["sigs"], serde_json::json!([]));
        assert_eq!(
            t.info["references"],
            serde_json::json!([dep_path.trim_start_matches("/nix/store/")])
        );
        let mut nar = Vec::new();
        crate::nar::dump(
            &st.root()
                .join("store")
                .join(top.trim_start_matches("/nix/store/")),
            &mut nar,
        )
        .expect("nar");
        assert_eq!(t.nar, nar);
        // Again: the cache has both.
        let again = rt()
            .block_on(publisher(&attic.url, SECRET).publish(&sel, st.root()))
            .expect("again");
        assert_eq!((again.uploaded, again.deduplicated), (0, 2));
        // A token the server does not accept: a configuration problem, named.
        let e = rt()
            .block_on(
                publisher(&attic.url, b"another key, not the server's one")
                    .publish(&sel, st.root()),
            )
            .expect_err("refused");
        assert!(
            matches!(e, PublishError::Refused { status: 401, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("\"main\""), "{e}");
    }

    /// One path that cannot go up is named with its reason; the others still go up.
    #[test]
    fn a_failing_path_is_named_and_the_others_go_up() {
        let st = Store::new();
        let (_, good) = st.add('a', "good", "good\n", &[], "");
        // Its file changed after it was registered (same size, 4 chunks): the NAR is not the
        // database's. What refers to it does not go up either.
        let (changed_id, changed) = st.add('b', "changed", &"r".repeat(4 * CHUNK), &[], "");
        std::fs::write(
            st.root()
                .join("store")
                .join(changed.trim_start_matches("/nix/store/")),
            "s".repeat(4 * CHUNK),
        )
        .expect("write");
        let (_, above) = st.add('h', "above", "above\n", &[changed_id], "");
        // A FIFO where a file was: never opened for reading, never blocks.
        let (_, fifo) = st.add('c', "fifo", "x\n", &[], "");
        let fifo_disk = st
            .root()
            .join("store")
            .join(fifo.trim_start_matches("/nix/store/"));
        std::fs::remove_file(&fifo_disk).expect("rm");
        nix::unistd::mkfifo(&fifo_disk, nix::sys::stat::Mode::from_bits_truncate(0o644))
            .expect("fifo");
        // Gone from the store.
        let (_, gone) = st.add('d', "gone", "gone\n", &[], "");
        std::fs::remove_file(
            st.root()
                .join("store")
                .join(gone.trim_start_matches("/nix/store/")),
        )
        .expect("rm");
        // The server fails this one every time (bounded retries).
        let (_, flaky) = st.add('f', "flaky", "flaky\n", &[], "");
        let attic = fake_attic::FakeAttic::start(SECRET, &["main"]);
        attic.with(|s| s.fail_uploads_of = Some("-flaky".into()));
        let sel = rt()
            .block_on(to_publish(st.root(), &[DRV.to_owned()], &[]))
            .expect("select");
        assert_eq!(sel.paths.len(), 6);
        let started = Instant::now();
        let done = rt()
            .block_on(publisher(&attic.url, SECRET).publish(&sel, st.root()))
            .expect("published");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(done.uploaded, 1, "{:?}", done.failed);
        let reason = |p: &str| {
            done.failed
                .iter()
                .find(|f| f.path == p)
                .map(|f| f.reason.clone())
                .unwrap_or_else(|| panic!("{p} not among {:?}", done.failed))
        };
        assert!(
            reason(&changed).contains("not what its database says"),
            "{}",
            reason(&changed)
        );
        assert!(
            reason(&fifo).contains("neither a file"),
            "{}",
            reason(&fifo)
        );
        assert!(
            reason(&gone).contains("gone from the store"),
            "{}",
            reason(&gone)
        );
        assert!(
            reason(&above).contains("which was not published"),
            "{}",
            reason(&above)
        );
        assert!(
            reason(&flaky).contains("answered 500"),
            "{}",
            reason(&flaky)
        );
        // The flaky path was tried TRIES times, the changed one never completed an upload.
        let (calls, stored, bad) =
            attic.with(|s| (s.calls.clone(), s.caches["main"].clone(), s.bad_bodies));
        // The changed NAR never reached the server whole.
        assert_eq!(bad, 0);
        assert_eq!(
            calls.iter().filter(|c| c.2 == 500).count(),
            TRIES as usize,
            "{calls:?}"
        );
        assert_eq!(stored.len(), 1);
        assert!(stored
            .values()
            .all(|s| s.info["store_path"] == good.as_str()));
        let line = line(&done, &attic.url, "main");
        assert!(line.contains("5 not published"), "{line}");
    }

    /// A server that never answers an upload does not hold the publication forever.
    #[test]
    fn every_upload_has_a_deadline() {
        let st = Store::new();
        // Larger than what the channel and the socket buffers hold: the archiver is stuck
        // sending when the deadline comes.
        st.add('a', "slow", &"x".repeat(16 << 20), &[], "");
        let attic = fake_attic::FakeAttic::start(SECRET, &["main"]);
        attic.with(|s| s.stall_uploads = true);
        let sel = rt()
            .block_on(to_publish(st.root(), &[DRV.to_owned()], &[]))
            .expect("select");
        let mut p = publisher(&attic.url, SECRET);
        p.limits.deadline = Duration::from_millis(500);
        p.limits.min_rate = u64::MAX;
        let started = Instant::now();
        let done = rt()
            .block_on(p.publish(&sel, st.root()))
            .expect("published");
        // Four tries of 0.5 s and the waits between them.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(done.uploaded, 0);
        assert!(
            done.failed[0].reason.contains("no answer within"),
            "{:?}",
            done.failed
        );
    }

    /// Paths go up after what they refer to, whatever their names.
    #[test]
    fn dependencies_go_up_first() {
        let st = Store::new();
        let (z, z_path) = st.add('z', "zlib", "z\n", &[], "");
        let (m, m_path) = st.add('m', "mid", "m\n", &[z], "");
        let (_, a_path) = st.add('a', "app", "a\n", &[m, z], "");
        let attic = fake_attic::FakeAttic::start(SECRET, &["main"]);
        let sel = rt()
            .block_on(to_publish(st.root(), &[DRV.to_owned()], &[]))
            .expect("select");
        let order: Vec<&str> = sel.paths.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(order, [z_path.as_str(), m_path.as_str(), a_path.as_str()]);
        rt().block_on(publisher(&attic.url, SECRET).publish(&sel, st.root()))
            .expect("published");
        assert_eq!(attic.with(|s| s.uploads.clone()), [z_path, m_path, a_path]);
    }

    /// Many failures: the line stays short and says how many were left out.
    #[test]
    fn the_line_names_a_few_failures_and_counts_the_rest() {
        let p = Published {
            failed: (0..40)
                .map(|i| Failed {
                    path: format!("/nix/store/{i:032}-x"),
                    reason: format!("{}\n::error::injected", "r".repeat(1000)),
                })
                .collect(),
            ..Published::default()
        };
        let l = line(&p, "http://a", "c");
        assert!(
            l.contains("40 not published") && l.ends_with("and 35 more"),
            "{l}"
        );
        assert!(l.len() < 2000, "{}", l.len());
        assert!(!l.contains('\n'), "{l}");
    }
}
