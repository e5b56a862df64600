//! The job envelope: run one command as one job of a lane.
//!
//! `phases.rs` is the only place that orders a job's phases: **setup** (slot, fast-local
//! check, Nix bootstrap, cgroup, fresh `_work`), **run** (the command joins its cgroup before
//! it executes; signals to the agent stop it), **teardown** (SIGTERM with a grace, kill the
//! whole cgroup, wait until empty, remove the cgroup and `_work`, release the slot), which a
//! guard runs whatever happened before it. The mechanisms are beside it: `spawn` (fork and
//! exec), `launch`, `mounts`, `env`, `root`, `daemon`, `pumps`, `probe`. All the `unsafe` is
//! in `spawn`, `confine`, `pidns`, `userns` and `view`; this module holds the types they share.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flywheel_jit_config::Secret;
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use crate::cgroup::CgroupError;
use crate::config::{Config, Lane};
use crate::reaper::Exit;
use crate::receipt::{Receipt, ReceiptError};
use crate::report::JobReport;
use crate::scratch::ScratchError;
use crate::slot::SlotError;

mod confine;
mod daemon;
mod deferred;
mod env;
mod launch;
mod mounts;
mod phases;
mod pidns;
mod probe;
mod pumps;
mod root;
mod spawn;
mod userns;
mod view;

pub use daemon::{build_logs, built_list, nix_job};
pub use phases::run_job;
pub use probe::{JobFacts, JobProbe, Kills, StoreOpenError, SAMPLE_INTERVAL};
pub use userns::is_daemon_root;

/// How long teardown waits for a killed job's cgroup to empty before giving up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::jobuser::{JobUser, UserError};

/// Who a job runs as.
#[derive(Debug, Clone)]
pub enum UserChoice {
    /// This user (`exec --user`).
    Named(JobUser),
    /// The user of the job's runner slot (`runner.user` with `{n}`, see
    /// [`Config::slot_user`]), so jobs that run at once never share a uid.
    Slot,
}

/// One job to run.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub lane: Lane,
    pub memory_bytes: u64,
    /// The work root the job sees (the lane's, or `--work-root`).
    pub work_root: PathBuf,
    /// `None`: the job runs as the agent's own user.
    pub user: Option<UserChoice>,
    pub slot: Option<u32>,
    /// ARC mode: when every node-local slot of the lane is busy, run on the pod-local store
    /// instead of failing.
    pub slot_fallback: bool,
    /// The command; for a runner job a relative program is resolved in the runner root.
    pub command: Vec<OsString>,
    pub host_cpus: u32,
    /// Set for a GitHub runner: the job directory becomes the runner root.
    pub runner: Option<RunnerRoot>,
    /// Variables only this job's first process gets (the JIT config); never logged.
    pub secret_env: Vec<(String, Secret<String>)>,
    /// Send the command's output to the agent's log, with this runner name, instead of
    /// inheriting the agent's stdout and stderr.
    pub log_output: Option<String>,
    /// How a graceful stop is asked for.
    pub stop_mode: StopMode,
    /// Filled with the job's cgroup while it runs, for callers that ask whether it is busy.
    pub probe: Option<JobProbe>,
    /// Give the job a nix-daemon of its own, inside its cgroup.
    pub nix: Option<NixJob>,
    /// The runner's hook socket directory and where the job sees it (all others hidden).
    pub hook: Option<HookMount>,
    /// Where the job's own tasks (log pumps, memory sampler) are spawned.
    pub background: crate::tasks::Background,
    /// Run once the job's processes are gone, before its slot's store is collected and the
    /// slot handed on.
    pub before_release: Option<std::sync::Arc<dyn BeforeRelease>>,
    /// The job's Bazel cache endpoint, served in its network namespace while it runs.
    pub bazel: Option<std::sync::Arc<crate::bazel::JobCache>>,
    /// The receipt of the job's host changes, when its caller began it (a runner's, with its
    /// hook service); else the job begins its own.
    pub receipt: Option<Receipt>,
}

/// Work on a job's store that must be done after its processes are gone but before its
/// outputs can be collected or its slot handed to the next job (a runner's: publishing what a
/// cancelled trusted job built). Returns a line for the log.
pub trait BeforeRelease: Send + Sync + std::fmt::Debug {
    fn run(
        &self,
        after: Released,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + '_>>;
}

/// What [`BeforeRelease`] is told of the job.
#[derive(Debug, Clone, Copy)]
pub struct Released {
    /// What is left of the job's teardown deadline.
    pub left: Duration,
    /// The kernel OOM-killed something in the job.
    pub oom: bool,
}

/// A runner's hook socket in its mount namespace.
#[derive(Debug, Clone)]
pub struct HookMount {
    pub dir: PathBuf,
    pub seen: PathBuf,
    pub all: PathBuf,
}

/// A job's own nix-daemon: started inside the job's cgroup (so its builds count against the
/// envelope and die at teardown), listening on a socket only this job can reach.
#[derive(Debug, Clone)]
pub struct NixJob {
    /// The nix-daemon binary.
    pub daemon: PathBuf,
    /// `NIX_CONF_DIR` of the daemon: the directory of the lane's `nix.conf`.
    pub conf_dir: PathBuf,
    /// Holds every job's socket directory; hidden (an empty tmpfs) inside jobs.
    pub sockets: PathBuf,
    /// Holds every job's build log directory (root-only); a job sees only its own, read-only,
    /// at `<nix_store>/var/log/nix`.
    pub logs: PathBuf,
    /// Where the job finds its daemon's socket directory (`<nix>/var/nix/daemon-socket`,
    /// which also hides any host daemon's socket).
    pub socket_seen: PathBuf,
    /// The shared build-user pool, and where the daemon sees it.
    pub userpool: PathBuf,
    pub userpool_seen: PathBuf,
    /// The store root as the job and its daemon see it (`nix_store`, `/nix`): the one
    /// place besides its socket directory, record and `/tmp` the daemon may write.
    pub store_seen: PathBuf,
    /// The daemon writes a layer of the job's own over the store (kernel overlayfs, lower =
    /// the store read-only), discarded at teardown: for a job not trusted to publish.
    pub throwaway: bool,
    /// A runner's job: its store and daemon come at job-started, when its trust is known
    /// ([`JobProbe::open_store`]): the shared store for a trusted job, a throwaway layer
    /// (`throwaway` ignored) for any other. Until then the job sees no store at all.
    pub at_job_started: bool,
    /// A root-only netrc of this job's cache credentials (read by its daemon only).
    pub netrc: Option<PathBuf>,
    /// What the daemon's mount namespace covers with an empty tmpfs (`state_dir`, every
    /// lane's work and slot roots: other jobs' sockets, records, directories), its own paths
    /// under them bound back (`confine.rs`); and the agent's secret files, each covered by
    /// `/dev/null` there.
    pub hidden: Vec<PathBuf>,
}

/// The runner root: `<work_root>/<job>/`, owned by the job's user. The installation's
/// directories (`bin`, `externals`) are bind-mounted into it read-only in the job's mount
/// namespace, so the listener finds its root from its own path without copying anything, and
/// cannot change its binaries.
#[derive(Debug, Clone)]
pub struct RunnerRoot {
    pub install_dir: PathBuf,
    /// Lines of the runner's `.env` (`KEY=VALUE`, no quoting).
    pub dotenv: Vec<(String, String)>,
}

/// A graceful stop: `signal` to the command itself (a runner listener cancels its job on
/// SIGINT) or to every process of the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopMode {
    pub signal: Signal,
    pub whole_job: bool,
}

impl Default for StopMode {
    fn default() -> Self {
        StopMode {
            signal: Signal::SIGTERM,
            whole_job: true,
        }
    }
}

/// How the agent's owner stops a running job: `graceful` sends SIGTERM and waits the stop
/// grace; `now` kills the cgroup at once.
#[derive(Debug, Clone, Default)]
pub struct Stop {
    pub graceful: CancellationToken,
    pub now: CancellationToken,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timings {
    pub setup: Duration,
    pub run: Duration,
    pub teardown: Duration,
}

/// What became of a job.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub job: String,
    pub slot: u32,
    /// The exit status to report: the command's own, 126/127 when it could not be started.
    pub code: i32,
    pub exit: Option<Exit>,
    /// Why the command could not be started (code 126 or 127).
    pub launch_error: Option<String>,
    /// The job was stopped by a signal to the agent.
    pub stopped: bool,
    pub timings: Timings,
    /// What the job did to its envelope and its store: what the summary, the metrics and
    /// `exec` show.
    pub report: JobReport,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Slot(#[from] SlotError),
    #[error("fast-local check failed: {0}")]
    Scratch(#[from] ScratchError),
    #[error("job cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not start the job: {0}")]
    Spawn(io::Error),
    #[error(transparent)]
    Bazel(#[from] crate::bazel::BazelError),
    #[error("teardown failed: {0}")]
    Teardown(TeardownError),
    #[error("nix: {0}")]
    Nix(NixSetupError),
    #[error(transparent)]
    Net(#[from] crate::netns::NetError),
    #[error(transparent)]
    Receipt(#[from] ReceiptError),
}

// `Teardown` and `Nix` carry their errors typed but do not name them as their source: their
// message already holds the inner one's, and `{:#}` (how `exec` prints an error) would say it
// twice.
impl From<TeardownError> for EnvelopeError {
    fn from(e: TeardownError) -> Self {
        EnvelopeError::Teardown(e)
    }
}

impl From<NixSetupError> for EnvelopeError {
    fn from(e: NixSetupError) -> Self {
        EnvelopeError::Nix(e)
    }
}

/// What a job's teardown reports.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    #[error("the teardown task failed: {0}")]
    Task(tokio::task::JoinError),
    #[error("the job's teardown did not finish within agent.teardown_deadline ({0:?}): its files are still being removed in the background")]
    Deadline(Duration),
    /// What the job's receipt could not undo (it keeps those entries for the next start).
    #[error("{}", crate::receipt::joined(.0))]
    NotUndone(Vec<crate::receipt::UndoError>),
}

/// Why a job's Nix (its bootstrap, its own nix-daemon, its store) could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NixSetupError {
    #[error("the bootstrap's thread failed: {0}")]
    BootstrapThread(tokio::task::JoinError),
    #[error("{0}")]
    Bootstrap(crate::nixboot::NixError),
    #[error("{0}")]
    Advisory(crate::advisory::Refusal),
    #[error("the store {} cannot be mounted idmapped ({cause}), which a job's nix-daemon in a user namespace of its own needs: keep the lane's nix_store on a filesystem that supports idmapped mounts (ext4, xfs, btrfs; tmpfs from Linux 6.3), every filesystem mounted below it included", store.display())]
    NoIdmap { store: PathBuf, cause: io::Error },
    #[error("all {} id ranges for jobs' nix-daemons are in use (locks in {}): wait for jobs to end", crate::idrange::RANGES, .0.display())]
    IdRangesInUse(PathBuf),
    #[error("a store opened at job-started needs the runner's probe")]
    NoProbe,
    #[error("the job's store cannot wait for its job-started hook: the job has ended, or a store is already waiting")]
    StoreNotArmed,
    #[error("the store {} has filesystems mounted below it ({}), which an untrusted job's layer (kernel overlayfs) cannot show: keep the lane's nix_store on one filesystem", store.display(), below.join(", "))]
    MountsBelow { store: PathBuf, below: Vec<String> },
    #[error("{} is not a plain directory (a symlink planted by a job's daemon?): repair the store", .0.display())]
    NotADirectory(PathBuf),
}

fn io_at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> EnvelopeError + 'a {
    move |source| EnvelopeError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// A job name unique on this host: lane, slot, pid and time.
fn job_name(lane: &str, slot: u32) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{lane}.s{slot}.{}.{:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}

/// The smallest lane with a larger envelope than `lane`'s, to suggest after an OOM.
pub fn bigger_lane<'a>(cfg: &'a Config, lane: &str, memory_bytes: u64) -> Option<(&'a str, u64)> {
    cfg.lanes
        .iter()
        .filter(|l| l.name != lane && l.memory_bytes > memory_bytes && l.unavailable.is_none())
        .min_by_key(|l| l.memory_bytes)
        .map(|l| (l.name.as_str(), l.memory_bytes))
}

fn now_unix_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn command_name(cmd: &[OsString]) -> String {
    cmd.first()
        .map(|c| {
            Path::new(c)
                .file_name()
                .unwrap_or(c)
                .to_string_lossy()
                .into_owned()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_teardown_and_nix_errors_say_what_their_strings_said() {
        let e = EnvelopeError::from(TeardownError::Deadline(Duration::from_secs(30)));
        assert_eq!(e.to_string(), "teardown failed: the job's teardown did not finish within agent.teardown_deadline (30s): its files are still being removed in the background");
        let e = EnvelopeError::from(TeardownError::NotUndone(vec![
            crate::receipt::UndoError::Cgroup("a".into()),
            crate::receipt::UndoError::Cgroup("b".into()),
        ]));
        assert_eq!(e.to_string(), "teardown failed: a; b");
        let e = EnvelopeError::from(NixSetupError::MountsBelow {
            store: PathBuf::from("/nix"),
            below: vec!["/nix/a".into(), "/nix/b".into()],
        });
        assert_eq!(e.to_string(), "nix: the store /nix has filesystems mounted below it (/nix/a, /nix/b), which an untrusted job's layer (kernel overlayfs) cannot show: keep the lane's nix_store on one filesystem");
        let e = EnvelopeError::from(NixSetupError::IdRangesInUse(PathBuf::from("/s/ids")));
        assert_eq!(e.to_string(), format!("nix: all {} id ranges for jobs' nix-daemons are in use (locks in /s/ids): wait for jobs to end", crate::idrange::RANGES));
        let e = EnvelopeError::from(NixSetupError::NoIdmap {
            store: PathBuf::from("/nix"),
            cause: io::Error::from_raw_os_error(libc::EINVAL),
        });
        assert!(e.to_string().starts_with("nix: the store /nix cannot be mounted idmapped (Invalid argument (os error 22)), which"), "{e}");
        // The inner error is not also the source: `{:#}` says it once.
        assert!(std::error::Error::source(&e).is_none());
        let e = EnvelopeError::from(NixSetupError::NotADirectory(PathBuf::from("/nix/var")));
        assert_eq!(e.to_string(), "nix: /nix/var is not a plain directory (a symlink planted by a job's daemon?): repair the store");
    }
}
