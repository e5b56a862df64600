//! Facts about a Nix store from its database (`<nix>/var/nix/db/db.sqlite`), read-only: what a
//! job added, how big a slot's store is, whether a store whose holder died is still sound, what
//! a job's publication is made of, and when a slot's store needs garbage collection.
//!
//! Every read goes through this facade and runs on a blocking thread. The reads are linear in
//! what a store or a job holds (a shared store's paths, a job's record and its build logs, a
//! closure to publish), and the agent's runtime is one thread that also answers the hooks,
//! `/metrics` and `status`. The reads are methods of [`Blocking`], which only [`blocking`]
//! makes, on a blocking thread, and a [`Db`] cannot leave it: code on the runtime has no way
//! to call them but through the `async` functions here.

mod db;

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a store could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No database (the store was never bootstrapped) or one SQLite cannot open.
    #[error("cannot open the store database: {0}")]
    Open(#[source] rusqlite::Error),
    #[error("cannot read the store database: {0}")]
    Read(#[from] rusqlite::Error),
    #[error("the store database cannot be checked: {0}")]
    Unchecked(#[source] rusqlite::Error),
    /// SQLite's `quick_check` verdict.
    #[error("the store database is damaged: {0}")]
    Damaged(String),
    #[error("the store database has {0} references to unregistered paths")]
    Dangling(i64),
    /// The blocking thread panicked or the runtime is shutting down.
    #[error("the store read did not finish: {0}")]
    Thread(String),
    /// The database's directory could not be given a path of root's alone.
    #[error("cannot set up a private path to the store database: {0}")]
    Private(#[source] std::io::Error),
}

/// A store's database directory, open, and how to open it again (by descriptor, following no
/// symlink) from another mount namespace.
pub struct HeldDir {
    pub dir: std::os::fd::OwnedFd,
    pub reopen: Box<dyn FnOnce() -> std::io::Result<std::os::fd::OwnedFd> + Send>,
}

impl std::fmt::Debug for HeldDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldDir")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Proof that the code holding it runs on a blocking thread, not the agent's runtime: the
/// store's blocking reads are its methods, and only [`blocking`] makes one.
#[derive(Debug)]
pub struct Blocking {
    _off_runtime: (),
}

/// Run `f` on a blocking thread (in the caller's tracing span) with a [`Blocking`] to read the
/// store with; the runtime thread only awaits it.
pub async fn blocking<T, F>(f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Blocking) -> T + Send + 'static,
{
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| f(&Blocking { _off_runtime: () })))
        .await
        .map_err(|e| StoreError::Thread(e.to_string()))
}

/// An open, read-only store database, for reads the facade does not name (the closure walk of
/// a publication). Not `Send`: it stays on the blocking thread that opened it.
pub struct Db {
    conn: rusqlite::Connection,
    _here: PhantomData<*const ()>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
    }
}

impl Db {
    pub fn conn(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

/// What a job's daemon built, read in one go: its record (derivations and out paths, as its
/// post-build hook wrote them), its builds (from its build logs) and the paths it added
/// (built, substituted).
#[derive(Debug, Clone, Default)]
pub struct JobBuilds {
    pub built: Vec<String>,
    pub builds: Vec<crate::timeline::Build>,
    pub paths: Option<(u64, u64)>,
}

/// Where a job's reads look: its store, its daemon's build logs and record.
#[derive(Debug, Clone, Default)]
pub struct JobStore {
    pub nix_root: Option<PathBuf>,
    pub build_logs: Option<PathBuf>,
    pub record: Option<PathBuf>,
}

impl Blocking {
    /// One consistent copy of the store database `db` at `into`, opened by its path (SQLite's
    /// `VACUUM INTO`, a read transaction; waits up to 10 s for a writer's lock). Only for
    /// tests: a layer's snapshot goes through [`Blocking::snapshot_held`].
    #[cfg(test)]
    pub fn snapshot(&self, db: &Path, into: &Path) -> Result<(), StoreError> {
        db::snapshot(db, into)
    }

    /// [`Blocking::snapshot`] of the `db.sqlite` in `held`, opened through `via` (an empty
    /// directory of root's), never through a path a job's daemon could change: see
    /// [`db::snapshot_held`].
    pub fn snapshot_held(&self, held: HeldDir, via: &Path, into: &Path) -> Result<(), StoreError> {
        db::snapshot_held(held, via, into)
    }

    /// See [`check`].
    pub fn check(&self, nix_root: &Path) -> Result<Duration, StoreError> {
        db::check(nix_root)
    }

    /// See [`size`].
    pub fn size(&self, nix_root: &Path) -> Result<(u64, u64), StoreError> {
        db::size(nix_root)
    }

    /// See [`job_paths`].
    pub fn job_paths(
        &self,
        nix_root: &Path,
        built: &[String],
        since: u64,
    ) -> Result<(u64, u64), StoreError> {
        db::job_paths(nix_root, built, since)
    }

    /// See [`builds_since`].
    pub fn builds_since(
        &self,
        nix_root: &Path,
        logs: &Path,
        since: f64,
        built: &[String],
    ) -> Vec<crate::timeline::Build> {
        db::builds_since(nix_root, logs, since, built)
    }

    /// See [`job_builds`].
    pub fn job_builds(&self, job: &JobStore, since: f64, paths_since: u64) -> JobBuilds {
        let built = job.record.as_deref().map(read_built).unwrap_or_default();
        let builds = match (&job.nix_root, &job.build_logs) {
            (Some(root), Some(logs)) => self.builds_since(root, logs, since, &built),
            _ => Vec::new(),
        };
        let paths = job
            .nix_root
            .as_deref()
            .and_then(|root| self.job_paths(root, &built, paths_since).ok());
        JobBuilds {
            built,
            builds,
            paths,
        }
    }

    /// The store's database, open read-only.
    pub fn open(&self, nix_root: &Path) -> Result<Db, StoreError> {
        Ok(Db {
            conn: db::open(nix_root)?,
            _here: PhantomData,
        })
    }

    /// Free and total bytes of the filesystem holding `path`.
    pub fn fs_space(&self, path: &Path) -> Option<(u64, u64)> {
        let v = nix::sys::statvfs::statvfs(path).ok()?;
        #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
        let (avail, blocks, frag) = (
            v.blocks_available() as u64,
            v.blocks() as u64,
            v.fragment_size() as u64,
        );
        Some((avail.saturating_mul(frag), blocks.saturating_mul(frag)))
    }
}

/// Check a store whose holder died mid-job before it is reused: the database passes SQLite's
/// `quick_check` (structure, indexes, no torn pages; a hot journal is rolled back by opening
/// it) and every registered path's reference points at a registered path. Returns how long it
/// took. A store without a database is fine (it gets a cold bootstrap).
pub async fn check(nix_root: &Path) -> Result<Duration, StoreError> {
    let root = nix_root.to_owned();
    blocking(move |b| b.check(&root)).await?
}

/// Valid paths in a store and the sum of their NAR sizes; [`StoreError::Open`] without a
/// database.
pub async fn size(nix_root: &Path) -> Result<(u64, u64), StoreError> {
    let root = nix_root.to_owned();
    blocking(move |b| b.size(&root)).await?
}

/// Store paths a job's daemon added: (built, substituted). Built: the outputs of what its
/// post-build hook recorded (`built`: derivations and out paths) — on a shared store other
/// jobs build in the same seconds. Substituted: paths registered since `since` (unix seconds)
/// that nobody built here, less the bootstrap's own (the receipt's).
pub async fn job_paths(
    nix_root: &Path,
    built: Vec<String>,
    since: u64,
) -> Result<(u64, u64), StoreError> {
    let root = nix_root.to_owned();
    blocking(move |b| b.job_paths(&root, &built, since)).await?
}

/// The derivations a job's daemon built (or started building) since `since` (unix seconds,
/// fractional), from its own build log directory `logs`, with start and end relative to
/// `since`; `built` is its record. A build it started whose output another daemon registered
/// first (a shared store) is left out.
pub async fn builds_since(
    nix_root: &Path,
    logs: &Path,
    since: f64,
    built: Vec<String>,
) -> Result<Vec<crate::timeline::Build>, StoreError> {
    let (root, logs) = (nix_root.to_owned(), logs.to_owned());
    blocking(move |b| b.builds_since(&root, &logs, since, &built)).await
}

/// A job's record, builds (those since `since`, unix seconds, fractional) and paths (those
/// registered since `paths_since`), as far as its store and logs can be read: builds only with
/// both a store and logs, paths only when the database could be read.
pub async fn job_builds(
    job: JobStore,
    since: f64,
    paths_since: u64,
) -> Result<JobBuilds, StoreError> {
    blocking(move |b| b.job_builds(&job, since, paths_since)).await
}

/// A job's record of what its daemon built (see [`read_built`]): up to
/// 16 MiB a job writes, read on a blocking thread.
pub async fn record(file: Option<PathBuf>) -> Result<Vec<String>, StoreError> {
    blocking(move |_| file.as_deref().map(read_built).unwrap_or_default()).await
}

/// What a job's daemon recorded it built (derivations, out paths).
fn read_built(file: &Path) -> Vec<String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    // The job's daemon writes it: never through a symlink, never more than `BUILT_MAX`.
    let mut text = String::new();
    let _ = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(file)
        .and_then(|f| f.take(BUILT_MAX).read_to_string(&mut text));
    text.split_whitespace().map(str::to_owned).collect()
}

/// The most of a build record the agent reads (about 100,000 store paths).
const BUILT_MAX: u64 = 16 << 20;

impl crate::nixboot::SlotStore for Blocking {
    fn fs_space(&self, path: &Path) -> Option<(u64, u64)> {
        Blocking::fs_space(self, path)
    }
    fn size(&self, nix_root: &Path) -> Option<(u64, u64)> {
        Blocking::size(self, nix_root).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::db::tests::fake_db;
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// The facade answers what the blocking reads answer, from a blocking thread.
    #[test]
    fn the_facade_answers_what_the_reads_answer() {
        let t = tempfile::tempdir().expect("tempdir");
        fake_db(t.path(), 5000);
        let c = rusqlite::Connection::open(t.path().join("var/nix/db/db.sqlite")).expect("db");
        c.execute(
            "UPDATE ValidPaths SET deriver = '/nix/store/x-a.drv', registrationTime = 2000000000 WHERE id <= 10",
            [],
        )
        .expect("deriver");
        // Its last output registered later: the build ended then.
        c.execute(
            "UPDATE ValidPaths SET registrationTime = 2000000100 WHERE id = 3",
            [],
        )
        .expect("time");
        drop(c);
        // Build logs: one of the recorded derivation (registered), one that failed.
        let logs = t.path().join("logs");
        std::fs::create_dir_all(logs.join("drvs/x-")).expect("logs");
        std::fs::write(logs.join("drvs/x-/a.drv"), "log").expect("log");
        std::fs::write(logs.join("drvs/x-/b.drv"), "log").expect("log");
        let record = t.path().join("record");
        std::fs::write(
            &record,
            "/nix/store/x-a.drv\n/nix/store/00000000000000000000000000000042-p\n",
        )
        .expect("record");
        let built = read_built(&record);
        let root = t.path().to_owned();
        let rt = rt();
        let on_runtime = std::thread::current().id();
        let (size, checked, paths, builds, job) = rt.block_on(async {
            let thread = blocking(|_| std::thread::current().id())
                .await
                .expect("thread");
            assert_ne!(thread, on_runtime, "the read ran on the runtime's thread");
            (
                size(&root).await.expect("size"),
                check(&root).await.is_ok(),
                job_paths(&root, built.clone(), 0).await.expect("paths"),
                builds_since(&root, &logs, 0.0, built.clone())
                    .await
                    .expect("builds"),
                job_builds(
                    JobStore {
                        nix_root: Some(root.clone()),
                        build_logs: Some(logs.clone()),
                        record: Some(record.clone()),
                    },
                    0.0,
                    0,
                )
                .await
                .expect("job"),
            )
        });
        assert_eq!(size, db::size(&root).expect("size"));
        assert_eq!(size, (5000, 5000 * 100_000));
        assert!(checked && db::check(&root).is_ok());
        assert_eq!(paths, db::job_paths(&root, &built, 0).expect("paths"));
        let direct = db::builds_since(&root, &logs, 0.0, &built);
        assert_eq!(builds, direct);
        assert_eq!(builds.len(), 2, "{builds:?}");
        let a = builds.iter().find(|b| b.name == "a").expect("a");
        assert!(!a.failed && a.end == 2_000_000_100.0, "{a:?}");
        assert!(
            builds.iter().any(|b| b.name == "b" && b.failed),
            "{builds:?}"
        );
        assert_eq!(job.built, built);
        assert_eq!(job.builds, direct);
        assert_eq!(job.paths, Some(paths));
    }

    /// Errors arrive typed, as the reads made them.
    #[test]
    fn errors_are_typed() {
        let t = tempfile::tempdir().expect("tempdir");
        let rt = rt();
        let none = t.path().join("none");
        assert!(matches!(rt.block_on(size(&none)), Err(StoreError::Open(_))));
        assert!(matches!(
            rt.block_on(job_paths(&none, Vec::new(), 0)),
            Err(StoreError::Open(_))
        ));
        // A store without a database is sound (it gets a cold bootstrap).
        rt.block_on(check(&none)).expect("no database");
        fake_db(t.path(), 100);
        let c = rusqlite::Connection::open(t.path().join("var/nix/db/db.sqlite")).expect("db");
        c.execute("DELETE FROM ValidPaths WHERE id = 5", [])
            .expect("delete");
        drop(c);
        assert!(matches!(
            rt.block_on(check(t.path())),
            Err(StoreError::Dangling(2))
        ));
        // A job without a store: nothing read, nothing failed.
        let job = rt
            .block_on(job_builds(JobStore::default(), 0.0, 0))
            .expect("job");
        assert!(job.built.is_empty() && job.builds.is_empty() && job.paths.is_none());
        // A read that panics is an error of the facade, not of the runtime.
        let r: Result<(), _> = rt.block_on(blocking(|_| panic!("a read failed")));
        assert!(matches!(r, Err(StoreError::Thread(_))), "{r:?}");
    }
}
