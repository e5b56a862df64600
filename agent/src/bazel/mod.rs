//! The Bazel remote cache as an acceleration layer: every job reads, only trusted jobs write,
//! enforced by the agent, outside the job.
//!
//! Each job of a lane with `[lane.bazel]` gets an HTTP cache endpoint of its own on the
//! loopback of its own network namespace (`BAZEL_REMOTE_CACHE=http://127.0.0.1:<port>/<token>`,
//! every path starting with the job's own random token): the
//! agent makes the listening socket inside that namespace (on a short-lived thread that joined
//! it; a socket stays in the namespace it was made in whichever thread uses it) and serves it
//! from its own runtime, so no other job and nothing on the host can reach it, and the
//! upstream is reached from the agent's (the host's) network. Reads (`GET`/`HEAD
//! /ac/<sha256>`, `/cas/<sha256>`) go to the lane's upstream for every job; writes (`PUT`) go
//! upstream only when the trust decision at job-started allowed the job to publish, with a
//! write credential only the agent holds, and a CAS blob only when it hashes to its name. An
//! untrusted job's writes are read, counted and answered `200` without being forwarded.
//! Whatever the upstream does (down, slow, 5xx, 401), the job's build goes on: a read that
//! fails is a miss, a write that fails is dropped; both are counted.

mod client;
pub mod conf;
mod guard;
mod memory;
mod proxy;

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flywheel_jit_config::Secret;

pub use conf::BazelSettings;
pub use guard::{Cause, Guard, Unused};

/// Why a lane's Bazel cache cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum BazelError {
    #[error("{path}: {why}")]
    Credential { path: String, why: String },
    #[error("cannot listen for the job's bazel cache endpoint in its network namespace: {0}")]
    Bind(std::io::Error),
    #[error("cannot make the bazel upstream's http client: {0}")]
    Client(String),
}

/// A lane's upstream, with the credentials read once at start.
#[derive(Debug)]
pub struct Upstream {
    pub lane: String,
    pub settings: BazelSettings,
    http: client::Client,
    /// The CAS blobs it served, kept (`memory_cache`).
    memory: memory::Memory,
    /// Whether it refuses writes without credentials (`guard`).
    guard: Mutex<guard::GuardState>,
    /// Told when a probe has answered.
    guard_changed: tokio::sync::Notify,
}

impl Upstream {
    /// Read the lane's credentials (each a regular file of root's, mode 0600) and make the
    /// client.
    pub fn new(lane: &str, s: &BazelSettings) -> Result<Arc<Upstream>, BazelError> {
        let read = s
            .read_credential_file
            .as_deref()
            .map(read_credential)
            .transpose()?;
        let write = s
            .write_credential_file
            .as_deref()
            .map(read_credential)
            .transpose()?;
        Upstream::with_credentials(lane, s, read, write)
    }

    /// The upstream of lane `lane` with these credentials (`user:password`).
    fn with_credentials(
        lane: &str,
        s: &BazelSettings,
        read: Option<Secret<String>>,
        write: Option<Secret<String>>,
    ) -> Result<Arc<Upstream>, BazelError> {
        let http = client::Client::new(&s.upstream, s.timeout, read.as_ref(), write.as_ref())
            .map_err(BazelError::Client)?;
        Ok(Arc::new(Upstream {
            lane: lane.to_owned(),
            settings: s.clone(),
            http,
            memory: memory::Memory::new(s.memory_cache_bytes),
            guard: Mutex::new(guard::GuardState::default()),
            guard_changed: tokio::sync::Notify::new(),
        }))
    }

    /// Whether a trusted job's writes can go upstream at all.
    pub fn can_write(&self) -> bool {
        self.http.can_write()
    }
}

/// Each lane's upstream, by lane name.
pub type Upstreams = std::collections::HashMap<String, Arc<Upstream>>;

/// The upstreams of every lane with `[lane.bazel]` (its name and settings), their credentials
/// read.
pub fn upstreams<'a>(
    lanes: impl IntoIterator<Item = (&'a str, &'a BazelSettings)>,
) -> Result<Upstreams, BazelError> {
    let mut out = Upstreams::new();
    for (name, b) in lanes {
        out.insert(name.to_owned(), Upstream::new(name, b)?);
    }
    Ok(out)
}

/// The runtime every job's endpoint is served on: a thread of its own (`flywheel-bazel`), so a
/// build's burst of cache requests neither waits behind nor holds up the agent's runtime
/// (hooks, `/metrics`, the jobs' supervision). One thread, not a pool: a request passes between
/// the job's connection task and the upstream connection's task several times (the request,
/// its answer, the pieces of its body), and on one thread each pass is a wake on the same
/// thread instead of one across threads (bench/bazel-cache.sh: about 10 us less agent CPU per
/// request than two workers). Nothing on it blocks; a flood of one job's requests shares it
/// with the others' task by task, as it shared two workers.
fn runtime() -> std::io::Result<tokio::runtime::Handle> {
    // Started once, by whoever comes first; built, run and kept on its own thread (never
    // built or dropped on another runtime's thread).
    static RT: std::sync::OnceLock<Result<tokio::runtime::Handle, String>> =
        std::sync::OnceLock::new();
    RT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("flywheel-bazel".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = tx.send(Ok(rt.handle().clone()));
                        rt.block_on(std::future::pending::<()>());
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            })
            .map_err(|e| e.to_string())?;
        rx.recv()
            .map_err(|_| "its thread ended before it started".to_owned())?
    })
    .clone()
    .map_err(|e| std::io::Error::other(format!("cannot start the bazel endpoints' runtime: {e}")))
}

/// 128 random bits from the system's generator, as hex.
fn token() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // The kernel's generator does not fail once the system is up; never a fixed token.
        b = fastrand::u128(..).to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn endpoint(s: &BazelSettings) -> String {
    format!("http://127.0.0.1:{}", s.port)
}

/// A credential file: `user:password` on one line, a regular file of root's that no one else
/// can read or write. The file opened is what is checked (`fstat` of the descriptor), so a
/// symlink is followed to it: a Kubernetes Secret volume's files are links
/// (`cred -> ..data/cred`), swapped on rotation; a link to a file that is not root's and
/// private is refused as the file itself would be.
pub fn read_credential(path: &Path) -> Result<Secret<String>, BazelError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let err = |why: String| BazelError::Credential {
        path: path.display().to_string(),
        why,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    let m = f.metadata().map_err(|e| err(e.to_string()))?;
    if !m.is_file() || m.uid() != 0 || m.mode() & 0o077 != 0 {
        return Err(err(format!(
            "must be a regular file of root's with mode 0600 (it is uid {}, mode {:o}): chown root: and chmod 0600 it",
            m.uid(),
            m.mode() & 0o7777
        )));
    }
    let mut text = String::new();
    f.take(4096)
        .read_to_string(&mut text)
        .map_err(|e| err(e.to_string()))?;
    let text = Secret::new(text);
    let line = text.expose().trim();
    match line.split_once(':') {
        Some((u, _)) if !u.is_empty() && !line.contains('\n') => Ok(Secret::new(line.to_owned())),
        _ => Err(err(
            "must hold one line user:password (as for HTTP basic authentication)".into(),
        )),
    }
}

/// What one job's endpoint did.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    memory_hits: AtomicU64,
    misses: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    writes: AtomicU64,
    writes_dropped: AtomicU64,
    writes_refused: AtomicU64,
    upstream_failures: AtomicU64,
    /// Why requests were not served from the upstream (`unused_code`), the last one.
    unused: std::sync::atomic::AtomicU8,
}

/// What one job's endpoint did, at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Reads answered with the entry: by the upstream, or from the agent's memory.
    pub hits: u64,
    /// Of those, answered from the agent's memory (`memory_cache`) without asking the
    /// upstream.
    pub from_memory: u64,
    /// Reads it did not have (or could not answer: see `upstream_failures`).
    pub misses: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Writes that went upstream.
    pub writes: u64,
    /// Writes answered and not forwarded: the job is not trusted, or the upstream failed.
    pub writes_dropped: u64,
    /// Writes refused: a blob that does not hash to its name, too large, cut off.
    pub writes_refused: u64,
    /// Upstream answers that were not answers: down, slow, 5xx, 401/403.
    pub upstream_failures: u64,
    /// The job's writes were allowed to go upstream.
    pub trusted: bool,
    /// The agent holds a write credential for the lane's cache.
    pub can_write: bool,
    /// The job did not use the lane's cache, and why: it took a write without credentials,
    /// or did not refuse one.
    pub unused: Option<Unused>,
}

/// How fast a job's writes that go nowhere (an untrusted job's, or any to an upstream not
/// used) are read, in bytes per second, after a first burst of as many: a job that floods its
/// endpoint with writes slows its own uploads, not the endpoint runtime every job shares.
/// Bazel's uploads of a large build stay far below it.
const DROPPED_BYTES_PER_SEC: u64 = 64 << 20;

/// A token bucket: `rate` bytes a second, at most `burst` saved up.
#[derive(Debug)]
struct Budget {
    rate: f64,
    burst: f64,
    /// Bytes that may pass now (negative: owed), as of when.
    left: Mutex<(f64, Option<std::time::Instant>)>,
}

impl Budget {
    fn new(rate: u64, burst: u64) -> Budget {
        Budget {
            rate: rate as f64,
            burst: burst as f64,
            left: Mutex::new((burst as f64, None)),
        }
    }

    /// Take `n` bytes at `now`: how long to wait before reading on (zero within the budget).
    fn take(&self, n: u64, now: std::time::Instant) -> std::time::Duration {
        let Ok(mut g) = self.left.lock() else {
            return std::time::Duration::ZERO;
        };
        let since =
            g.1.map_or(0.0, |t| now.saturating_duration_since(t).as_secs_f64());
        let left = (g.0 + since * self.rate).min(self.burst) - n as f64;
        *g = (left, Some(now));
        if left >= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f64(-left / self.rate)
        }
    }
}

/// The state a job's endpoint shares with its connections.
#[derive(Debug)]
struct Shared {
    upstream: Arc<Upstream>,
    /// The first segment of every path the job's endpoint serves (128 random bits, hex): the
    /// job's own, in its `BAZEL_REMOTE_CACHE`. Where a network is shared after all (an ARC pod
    /// on the node's network), another job that reaches the port still cannot name this job's
    /// cache, nor write through it.
    token: String,
    writes: AtomicBool,
    counters: Counters,
    telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    /// The pace of the job's writes that go nowhere.
    dropped_budget: Budget,
}

/// How an upstream failed, for the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Down,
    Slow,
    ServerError,
    Denied,
    /// The upstream was not used: it took, or did not refuse, a write without credentials.
    NotUsed(Unused),
    Other,
}

impl Failure {
    fn label(self) -> &'static str {
        match self {
            Failure::Down => "down",
            Failure::Slow => "slow",
            Failure::ServerError => "5xx",
            Failure::Denied => "denied",
            Failure::NotUsed(Unused::Open) => "open_to_anonymous_writes",
            Failure::NotUsed(Unused::Unverified) => "unverified",
            Failure::Other => "other",
        }
    }
}

impl Shared {
    fn add(&self, c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    fn hit(&self) {
        self.add(&self.counters.hits, 1);
        self.metric(|t, l| t.bazel_read(l, "hit"));
    }
    fn memory_hit(&self) {
        self.add(&self.counters.hits, 1);
        self.add(&self.counters.memory_hits, 1);
        self.metric(|t, l| t.bazel_read(l, "hit_memory"));
    }
    fn miss(&self) {
        self.add(&self.counters.misses, 1);
        self.metric(|t, l| t.bazel_read(l, "miss"));
    }
    fn read_bytes(&self, n: u64) {
        self.add(&self.counters.bytes_read, n);
        self.metric(|t, l| t.bazel_bytes(l, "read", n));
    }
    fn written(&self, n: u64) {
        self.add(&self.counters.writes, 1);
        self.add(&self.counters.bytes_written, n);
        self.metric(|t, l| {
            t.bazel_write(l, "forwarded");
            t.bazel_bytes(l, "written", n);
        });
    }
    fn dropped(&self) {
        self.add(&self.counters.writes_dropped, 1);
        self.metric(|t, l| t.bazel_write(l, "dropped"));
    }
    fn refused(&self) {
        self.add(&self.counters.writes_refused, 1);
        self.metric(|t, l| t.bazel_write(l, "refused"));
    }
    fn failed(&self, f: Failure, detail: &str) {
        self.add(&self.counters.upstream_failures, 1);
        if let Failure::NotUsed(u) = f {
            let code = match u {
                Unused::Open => 1,
                Unused::Unverified => 2,
            };
            self.counters.unused.store(code, Ordering::Relaxed);
        }
        self.metric(|t, l| t.bazel_upstream_failure(l, f.label()));
        tracing::debug!(lane = %self.upstream.lane, failure = f.label(), detail, "the bazel upstream failed; the job's build goes on without it");
    }
    fn metric(&self, f: impl FnOnce(&crate::telemetry::Telemetry, &str)) {
        if let Some(t) = &self.telemetry {
            f(t, &self.upstream.lane);
        }
    }
    fn writes_allowed(&self) -> bool {
        self.writes.load(Ordering::SeqCst)
    }
}

/// One job's cache endpoint: its trust, its counters, its serving task. Read-only until
/// [`JobCache::allow_writes`]; stops serving when [`JobCache::stop`]ped or dropped.
#[derive(Debug)]
pub struct JobCache {
    shared: Arc<Shared>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl JobCache {
    pub fn new(
        upstream: Arc<Upstream>,
        telemetry: Option<Arc<crate::telemetry::Telemetry>>,
    ) -> Arc<JobCache> {
        Arc::new(JobCache {
            shared: Arc::new(Shared {
                upstream,
                token: token(),
                writes: AtomicBool::new(false),
                counters: Counters::default(),
                telemetry,
                dropped_budget: Budget::new(DROPPED_BYTES_PER_SEC, DROPPED_BYTES_PER_SEC),
            }),
            task: Mutex::new(None),
        })
    }

    /// The job's `BAZEL_REMOTE_CACHE`: its endpoint and its own first path segment.
    pub fn endpoint(&self) -> String {
        format!(
            "{}{}",
            endpoint(&self.shared.upstream.settings),
            self.base_path()
        )
    }

    /// `/<token>`: what every path of this job's endpoint starts with.
    pub fn base_path(&self) -> String {
        format!("/{}", self.shared.token)
    }

    /// The trust decision allowed this job to publish: its writes go upstream (with the
    /// agent's write credential, when it holds one).
    pub fn allow_writes(&self) {
        self.shared.writes.store(true, Ordering::SeqCst);
    }

    pub fn tally(&self) -> Tally {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Tally {
            hits: g(&c.hits),
            from_memory: g(&c.memory_hits),
            misses: g(&c.misses),
            bytes_read: g(&c.bytes_read),
            bytes_written: g(&c.bytes_written),
            writes: g(&c.writes),
            writes_dropped: g(&c.writes_dropped),
            writes_refused: g(&c.writes_refused),
            upstream_failures: g(&c.upstream_failures),
            trusted: self.shared.writes_allowed(),
            can_write: self.shared.upstream.can_write(),
            unused: match c.unused.load(Ordering::Relaxed) {
                1 => Some(Unused::Open),
                2 => Some(Unused::Unverified),
                _ => None,
            },
        }
    }

    /// The line for the job's log at job-started.
    pub fn started_line(&self) -> String {
        let s = &self.shared;
        let hint = endpoint(&s.upstream.settings);
        match s.upstream.guard_seen() {
            Some(Guard::Open(_)) => return format!("flywheel: bazel cache {hint}: not used: the lane's cache takes writes without credentials, so anything may have written it (every read is a miss, every write dropped)"),
            Some(Guard::Unverified(why, Cause::Other)) => return format!("flywheel: bazel cache {hint}: not used: the lane's cache did not refuse a write without credentials ({why}); every read is a miss, every write dropped"),
            _ => {}
        }
        match (s.writes_allowed(), s.upstream.can_write()) {
            (true, true) => format!("flywheel: bazel cache {hint}: reads and writes go to the lane's cache"),
            (true, false) => format!("flywheel: bazel cache {hint}: reads only (this agent holds no write credential for the lane's cache)"),
            (false, _) => format!("flywheel: bazel cache {hint}: reads only; this job's writes are answered and dropped (not a trusted job)"),
        }
    }

    /// Listen on `127.0.0.1:<port>` inside the network namespace `netns` and serve this job
    /// from the current runtime until [`JobCache::stop`].
    pub fn start(&self, netns: RawFd, bg: &crate::tasks::Background) -> Result<(), BazelError> {
        let listener =
            bind_in(netns, self.shared.upstream.settings.port).map_err(BazelError::Bind)?;
        self.serve(listener, bg)
    }

    /// Serve this job on `listener` until [`JobCache::stop`].
    pub fn serve(
        &self,
        listener: std::net::TcpListener,
        bg: &crate::tasks::Background,
    ) -> Result<(), BazelError> {
        listener.set_nonblocking(true).map_err(BazelError::Bind)?;
        let handle = runtime().map_err(BazelError::Bind)?;
        // Registered with the endpoints' own runtime, where it is served.
        let listener = {
            let _in = handle.enter();
            tokio::net::TcpListener::from_std(listener).map_err(BazelError::Bind)?
        };
        // Ask the upstream about anonymous writes now (when due), so the job's first request
        // rarely waits for it.
        let up = self.shared.upstream.clone();
        handle.spawn(async move {
            up.guard_now();
        });
        let task = proxy::spawn(listener, self.shared.clone(), bg, &handle);
        if let Ok(mut t) = self.task.lock() {
            if let Some(old) = t.replace(task) {
                old.abort();
            }
        }
        Ok(())
    }

    /// Stop serving: the listening socket and every connection close (the socket held the
    /// job's network namespace: it goes with it).
    pub fn stop(&self) {
        if let Some(t) = self.task.lock().ok().and_then(|mut t| t.take()) {
            t.abort();
        }
    }
}

impl Drop for JobCache {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A listening socket on `127.0.0.1:port` of the network namespace `netns`, made on a thread
/// of its own (a network namespace is a thread's; the agent's threads stay in the host's).
/// The socket stays in that namespace whichever thread accepts on it.
pub fn bind_in(netns: RawFd, port: u16) -> std::io::Result<std::net::TcpListener> {
    std::thread::Builder::new()
        .name("flywheel-bazel".into())
        .spawn(move || {
            // SAFETY: setns(2) of this short-lived thread only; `netns` is open for the call.
            if unsafe { libc::setns(netns, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port))
        })?
        .join()
        .map_err(|_| std::io::Error::other("the bind thread panicked"))?
}

#[cfg(test)]
mod tests;
