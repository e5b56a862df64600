//! The job envelope: run one command as one job of a lane.
//!
//! Phases, all in this file: **setup** (slot, fast-local check, cgroup, fresh `_work`),
//! **run** (the command joins its cgroup before it executes; signals to the agent stop it),
//! **teardown** (SIGTERM with a grace, kill the whole cgroup, wait until empty, remove the
//! cgroup and `_work`, release the slot). Teardown runs whatever happened before it.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flywheel_jit_config::Secret;
use nix::sys::signal::Signal;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::cgroup::{CgroupError, CgroupManager, JobCgroup, Limits, Stats, JOBS_DIR};
use crate::config::{Config, Lane};
use crate::hints;
use crate::reaper::{Exit, Reaper};
use crate::scratch::{self, ScratchError};
use crate::slot::{self, SlotError};
use crate::verdict::{self, Killed, KmsgWatch, OomFacts};
use crate::workdir;

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
    /// Where the job finds its daemon's socket directory (`<nix>/var/nix/daemon-socket`,
    /// which also hides any host daemon's socket).
    pub socket_seen: PathBuf,
    /// The shared build-user pool, and where the daemon sees it.
    pub userpool: PathBuf,
    pub userpool_seen: PathBuf,
    /// A root-only netrc of this job's cache credentials (read by its daemon only).
    pub netrc: Option<PathBuf>,
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

/// A running job's cgroup (every read goes through the [`JobCgroup`] trait), and how many
/// processes the job has when idle (the command, plus its nix-daemon).
#[derive(Debug, Clone, Default)]
pub struct JobProbe(
    std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<dyn JobCgroup>>>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    std::sync::Arc<std::sync::Mutex<JobFacts>>,
    std::sync::Arc<std::sync::Mutex<Kills>>,
);

/// The kernel log watch of a running job and the OOM kills read from it so far (the hook reads
/// it while the job runs, teardown after: both see every kill).
#[derive(Debug, Default)]
pub struct Kills {
    watch: Option<KmsgWatch>,
    /// The job cgroup's path suffix in the kernel's records.
    suffix: String,
    seen: Vec<Killed>,
}

/// What the agent records of a running job for its summary.
#[derive(Debug, Clone, Default)]
pub struct JobFacts {
    /// Unix seconds (fractional) when the job's cgroup was made.
    pub started_unix: f64,
    /// Memory over time, sampled from the job's cgroup.
    pub samples: Option<crate::summary::Samples>,
    /// The job's Nix store as the agent sees it (a slot's, or the lane's).
    pub nix_root: Option<PathBuf>,
    /// Where the job's daemon records the out paths it built.
    pub built: Option<PathBuf>,
}

/// How often a job's memory is sampled at first (merged to coarser steps for long jobs).
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

impl JobProbe {
    /// The facts recorded so far.
    pub fn facts(&self) -> JobFacts {
        self.3.lock().map(|f| f.clone()).unwrap_or_default()
    }

    fn with_facts(&self, f: impl FnOnce(&mut JobFacts)) {
        if let Ok(mut g) = self.3.lock() {
            f(&mut g);
        }
    }

    /// Sample the job's memory every [`SAMPLE_INTERVAL`] until the task is aborted.
    fn sample(&self, bg: &crate::tasks::Background) -> tokio::task::JoinHandle<()> {
        let probe = self.clone();
        bg.spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                if let Some(v) = probe.memory_current() {
                    probe.with_facts(|f| {
                        f.samples
                            .get_or_insert_with(|| crate::summary::Samples::new(SAMPLE_INTERVAL))
                            .push(v);
                    });
                }
            }
        })
    }

    fn set(&self, cg: Option<std::sync::Arc<dyn JobCgroup>>) {
        if let Ok(mut g) = self.0.lock() {
            *g = cg;
        }
    }
    fn cgroup(&self) -> Option<std::sync::Arc<dyn JobCgroup>> {
        self.0.lock().ok()?.clone()
    }
    fn add_note(&self, note: String) {
        if let Ok(mut g) = self.2.lock() {
            g.push(note);
        }
    }
    /// The job's setup lines (its store, the Nix bootstrap warm or cold), once set up.
    pub fn notes(&self) -> Vec<String> {
        self.2.lock().map(|g| g.clone()).unwrap_or_default()
    }
    /// The job's peak memory so far.
    pub fn peak_bytes(&self) -> Option<u64> {
        self.cgroup()?.stats().ok()?.peak_bytes
    }
    fn watch_kmsg(&self, w: KmsgWatch, job: &str) {
        if let Ok(mut k) = self.4.lock() {
            *k = Kills {
                watch: Some(w),
                suffix: format!("/{JOBS_DIR}/{job}"),
                seen: Vec::new(),
            };
        }
    }

    /// The processes the OOM killer killed in the job so far (from the kernel log).
    pub fn killed(&self) -> Vec<Killed> {
        let Ok(mut k) = self.4.lock() else {
            return Vec::new();
        };
        let Kills {
            watch,
            suffix,
            seen,
        } = &mut *k;
        if let Some(w) = watch.as_mut() {
            seen.extend(w.killed(suffix));
        }
        seen.clone()
    }

    /// Forks the pids limit refused so far.
    pub fn pids_hits(&self) -> u64 {
        self.cgroup()
            .and_then(|cg| cg.stats().ok())
            .map_or(0, |s| s.pids_max_hits)
    }

    /// OOM kills in the job so far.
    pub fn oom_kills(&self) -> u64 {
        self.cgroup()
            .and_then(|cg| cg.stats().ok())
            .map_or(0, |s| s.oom_kills)
    }
    fn set_idle(&self, n: usize) {
        self.1.store(n, std::sync::atomic::Ordering::Relaxed);
    }
    /// Processes in the job now (0 when it is not running).
    pub fn processes(&self) -> usize {
        self.cgroup()
            .and_then(|cg| cg.pids().ok())
            .map_or(0, |p| p.len())
    }
    /// Whether process `pid` is in the running job's cgroup.
    pub fn contains(&self, pid: i32) -> bool {
        self.cgroup().is_some_and(|cg| cg.contains(pid))
    }

    /// The running job's name (its cgroup's name).
    pub fn job_name(&self) -> Option<String> {
        Some(self.cgroup()?.name().to_owned())
    }

    /// The running job's memory use now.
    pub fn memory_current(&self) -> Option<u64> {
        self.cgroup()?.memory_current()
    }

    /// A runner is busy when its listener has company beyond its nix-daemon: a worker and the
    /// job's processes.
    pub fn busy(&self) -> bool {
        self.processes() > self.1.load(std::sync::atomic::Ordering::Relaxed).max(1)
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
    pub stats: Stats,
    /// The OOM verdict, when the kernel OOM-killed anything in the job.
    pub verdict: Option<String>,
    /// A note when the pids cap refused forks.
    pub pids_note: Option<String>,
    /// Why the command could not be started (code 126 or 127).
    pub launch_error: Option<String>,
    /// The job was stopped by a signal to the agent.
    pub stopped: bool,
    pub timings: Timings,
    /// Whether Nix was warm or cold, and the bootstrap's own time (never part of `run`).
    pub nix: Option<NixSummary>,
    /// Unix seconds when the command started (for the store paths it added).
    pub started_unix: u64,
    /// On a slot lane, the store the job started on: `warm`, `cold` or `pod_local`.
    pub store: Option<&'static str>,
    /// The job's memory over time.
    pub samples: Option<crate::summary::Samples>,
    /// The derivations its daemon built (Nix lanes).
    pub builds: Vec<crate::summary::Build>,
    /// The job's Nix store as the agent sees it (Nix lanes).
    pub nix_root: Option<PathBuf>,
    /// What the job's daemon built, as its post-build hook recorded it.
    pub built: Vec<String>,
}

impl JobOutcome {
    /// The job's summary: memory over time, builds, bootstrap, verdicts.
    pub fn report(&self, lane: &str, envelope_bytes: u64) -> crate::summary::Report {
        let mut samples = self.samples.clone();
        // A spike between two samples (an OOM is often one) still shows: the peak closes the
        // chart.
        if let (Some(s), Some(peak)) = (samples.as_mut(), self.stats.peak_bytes) {
            s.close_with_peak(peak);
        }
        let paths = self
            .nix_root
            .as_deref()
            .and_then(|r| crate::store::job_paths(r, &self.built, self.started_unix));
        crate::summary::Report {
            lane: lane.to_owned(),
            envelope_bytes,
            peak_bytes: self.stats.peak_bytes,
            samples,
            builds: self.builds.clone(),
            bootstrap: self.nix.as_ref().map(|n| n.text.clone()),
            store: None,
            cache: paths.map(|(built, subst)| crate::summary::cache_kind(built, subst).to_owned()),
            paths,
            oom: self.verdict.clone(),
            pids: self.pids_note.clone(),
            published: None,
            elapsed: self.timings.run,
        }
    }
}

/// The Nix bootstrap of a job, reported apart from the job.
#[derive(Debug, Clone)]
pub struct NixSummary {
    pub cold: bool,
    pub elapsed: Duration,
    pub text: String,
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
    #[error("teardown failed: {0}")]
    Teardown(String),
    #[error("nix: {0}")]
    Nix(String),
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

/// A mount made in a job's private mount namespace.
#[derive(Debug, Clone)]
enum Mount {
    Bind {
        src: PathBuf,
        dst: PathBuf,
        readonly: bool,
    },
    /// An empty tmpfs that hides what is below `dst`.
    Hide { dst: PathBuf },
    /// A private tmpfs on `/tmp` (made at `stage`, a root-only directory outside `/tmp`, then
    /// moved), with the directories in `keep` (the agent's own paths under `/tmp`, if any)
    /// bound back into it.
    PrivateTmp { stage: PathBuf, keep: Vec<PathBuf> },
    /// A `/proc` of its own with `hidepid=invisible`: the job sees only its user's processes.
    Proc,
}

/// `/tmp`, which every job gets privately.
const TMP: &str = "/tmp";

/// The agent's own paths under `/tmp` (only in odd setups and tests) that a job's mounts or
/// exec need: they are bound back into its private `/tmp`. Outermost first, no nesting.
fn tmp_keep(paths: &[&Path]) -> Vec<PathBuf> {
    let mut keep: Vec<PathBuf> = paths
        .iter()
        .filter(|p| p.starts_with(TMP) && **p != Path::new(TMP) && p.is_dir())
        .map(|p| p.to_path_buf())
        .collect();
    keep.sort();
    keep.dedup();
    let all = keep.clone();
    keep.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    keep
}

/// Describe the store a job gets, for its log: which node-local slot and whether it is warm.
/// A slot whose last holder died is checked first, and wiped when it is not sound (the job
/// then bootstraps cold).
fn store_note(
    lane: &Lane,
    slot: &slot::Slot,
    slot_nix: Option<&Path>,
) -> Option<(String, &'static str)> {
    let Some(nix) = slot_nix else {
        return lane.slot_root.as_ref().map(|_| {
            (format!(
                "store: all {} node-local slots of lane {} are busy: this job runs on a pod-local store (cold, still correct)",
                lane.slots, lane.name
            ), "pod_local")
        });
    };
    let mut checked = String::new();
    if slot.dirty {
        match crate::store::check(nix) {
            Ok(took) => {
                checked = format!(
                    "; its last holder died, the store was checked in {:.0} ms",
                    took.as_secs_f64() * 1e3
                )
            }
            Err(e) => {
                warn!(slot = slot.index, error = %e, "the slot's store is not sound after its holder died; wiping it");
                let _ = workdir::remove_tree(nix);
                checked = format!("; its last holder died and the store was wiped ({e})");
            }
        }
    }
    let idle = slot
        .idle_secs
        .map(|s| format!(", last used {s} s ago"))
        .unwrap_or_default();
    let receipt = crate::nixboot::receipt_path(nix).exists();
    Some(match crate::store::size(nix) {
        Some((paths, bytes)) if paths > 0 && receipt => (
            format!(
                "store: node-local slot {} of lane {}: warm ({paths} paths, {}{idle}){checked}",
                slot.index,
                lane.name,
                crate::size::Bytes(bytes)
            ),
            "warm",
        ),
        _ => (
            format!(
                "store: node-local slot {} of lane {}: cold (empty){checked}",
                slot.index, lane.name
            ),
            "cold",
        ),
    })
}

/// Run one job of a lane to completion.
pub async fn run_job(
    cfg: &Config,
    mgr: &dyn CgroupManager,
    spec: JobSpec,
    stop: Stop,
    reaper: &Reaper,
) -> Result<JobOutcome, EnvelopeError> {
    let span = match &spec.log_output {
        Some(runner) => {
            info_span!("job", lane = %spec.lane.name, runner = %runner, job = tracing::field::Empty)
        }
        None => info_span!("job", lane = %spec.lane.name, job = tracing::field::Empty),
    };
    run_job_inner(cfg, mgr, spec, stop, reaper, span.clone())
        .instrument(span)
        .await
}

async fn run_job_inner(
    cfg: &Config,
    mgr: &dyn CgroupManager,
    spec: JobSpec,
    stop: Stop,
    reaper: &Reaper,
    span: tracing::Span,
) -> Result<JobOutcome, EnvelopeError> {
    let t0 = Instant::now();
    let lane = &spec.lane;
    let probe = spec.probe.clone().unwrap_or_default();
    let setup_span = info_span!("setup");
    let mut entered = setup_span.enter();

    let slot = slot::acquire(&cfg.agent.state_dir, lane, spec.slot, spec.slot_fallback)?;
    let job = job_name(&lane.name, slot.index);
    span.record("job", job.as_str());

    let slot_dirs = lane
        .slot_root
        .as_ref()
        .filter(|_| slot.node_local)
        .map(|root| slot::slot_dirs(root, slot.index));
    let store_line = store_note(
        lane,
        &slot,
        slot_dirs.as_ref().map(|(nix, _)| nix.as_path()),
    );
    let store_kind = store_line.as_ref().map(|(_, kind)| *kind);
    if let Some((line, _)) = &store_line {
        info!(slot = slot.index, node_local = slot.node_local, "{line}");
        probe.add_note(line.clone());
    }
    let (phys_work_root, phys_nix) = match &slot_dirs {
        Some((nix, work)) => (work.clone(), nix.clone()),
        None => (spec.work_root.clone(), lane.nix_store.clone()),
    };
    let work_scratch = scratch::check(&phys_work_root, lane.min_free_bytes)?;
    // The store is scratch only for a job that uses Nix (`exec --no-nix` or a lane without
    // Nix may sit on a container's overlayfs /nix).
    let nix_scratch = match &spec.nix {
        Some(_) => Some(scratch::check(&phys_nix, lane.min_free_bytes)?),
        None => None,
    };
    info!(
        work = %work_scratch.inspected.display(), work_fs = %work_scratch.fs,
        nix = %nix_scratch.as_ref().map_or_else(|| "-".into(), |s| s.inspected.display().to_string()),
        nix_fs = %nix_scratch.as_ref().map_or("-", |s| s.fs.as_str()),
        slot = slot.index, "fast-local scratch ok"
    );
    let nix_report = match &spec.nix {
        Some(_) => {
            let t = Instant::now();
            let on_slot = slot_dirs.as_ref().map(|_| slot.index);
            // The bootstrap unpacks, hashes and runs programs: a blocking thread's work, its
            // children watched by the reaper. The setup span is left while it runs, so the
            // runtime's other tasks are not attributed to it.
            let (cfg2, lane2, cpus, sp) =
                (cfg.clone(), lane.clone(), spec.host_cpus, reaper.clone());
            let in_span = tracing::Span::current();
            drop(entered);
            let r = tokio::task::spawn_blocking(move || {
                in_span
                    .in_scope(|| crate::nixboot::ensure_for_job(&cfg2, &lane2, on_slot, cpus, &sp))
            })
            .await;
            entered = setup_span.enter();
            let r = r
                .map_err(|e| EnvelopeError::Nix(format!("the bootstrap's thread failed: {e}")))?
                .map_err(|e| EnvelopeError::Nix(e.to_string()))?;
            info!(cold = r.cold, "{}", r.summary());
            probe.add_note(r.summary());
            Some(NixSummary {
                cold: r.cold,
                elapsed: t.elapsed(),
                text: r.summary(),
            })
        }
        None => None,
    };
    let stage = cfg.agent.state_dir.join("job-tmp");
    std::fs::create_dir_all(&stage).map_err(io_at("create", &stage))?;
    std::fs::set_permissions(&stage, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io_at("chmod", &stage))?;
    let exe = std::env::current_exe().unwrap_or_default();
    let exe_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let install_dir = spec.runner.as_ref().map(|r| r.install_dir.clone());
    let mut keep_candidates: Vec<&Path> = vec![
        &spec.work_root,
        &phys_work_root,
        &phys_nix,
        &lane.nix_store,
        &cfg.agent.state_dir,
        &exe_dir,
    ];
    keep_candidates.extend(install_dir.as_deref());
    for d in [&phys_work_root, &spec.work_root] {
        std::fs::create_dir_all(d).map_err(io_at("create", d))?;
    }
    let mut binds = vec![Mount::PrivateTmp {
        stage,
        keep: tmp_keep(&keep_candidates),
    }];
    if let Some((nix, work)) = &slot_dirs {
        for dir in [nix, work, &lane.nix_store, &spec.work_root] {
            std::fs::create_dir_all(dir).map_err(io_at("create", dir))?;
        }
        binds.push(Mount::Bind {
            src: nix.clone(),
            dst: lane.nix_store.clone(),
            readonly: false,
        });
        binds.push(Mount::Bind {
            src: work.clone(),
            dst: spec.work_root.clone(),
            readonly: false,
        });
    }
    if let Some(root) = &lane.slot_root {
        // Other slots' stores, work roots and locks are none of the job's business.
        binds.push(Mount::Hide { dst: root.clone() });
    }

    let user = match &spec.user {
        None => None,
        Some(UserChoice::Named(u)) => Some(u.clone()),
        Some(UserChoice::Slot) => Some(JobUser::lookup(
            &cfg.slot_user(&lane.name, slot.index),
            &cfg.runner.groups,
        )?),
    };
    if let Some(u) = &user {
        let mut owned: Vec<&Path> = vec![exe.as_path()];
        if let Some(r) = &spec.runner {
            owned.push(&r.install_dir);
        }
        u.refuse_owning(&owned)?;
        info!(user = %u.name, uid = u.uid, "the job runs as");
    }
    let (uid, gid) = user.as_ref().map_or_else(
        || {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        },
        |u| (u.uid, u.gid),
    );
    let limits = Limits {
        memory_bytes: spec.memory_bytes,
        pids_max: lane.pids_max,
        oom_group: lane.oom_group,
    };
    probe.watch_kmsg(KmsgWatch::start(), &job);
    let cg: std::sync::Arc<dyn JobCgroup> = mgr.create(&job, &limits)?.into();
    probe.set(Some(cg.clone()));
    probe.with_facts(|f| {
        *f = JobFacts {
            started_unix: now_unix_f64(),
            samples: None,
            nix_root: spec.nix.as_ref().map(|_| phys_nix.clone()),
            built: spec.nix.as_ref().map(|n| built_list(n, &job)),
        }
    });
    let sampler = probe.sample(&spec.background);
    drop(entered);
    // From here on, teardown runs whatever happens: the guard holds the cgroup, what to remove
    // after it and the slot, and tears them down itself if this future ends early.
    let (slot_index, slot_node_local, lock_fd) = (slot.index, slot.node_local, slot.lock_fd());
    let mut guard = JobGuard {
        cg: cg.clone(),
        cleanup: Vec::new(),
        slot: Some(slot),
        armed: true,
    };
    let launched = launch(
        &spec,
        user.as_ref(),
        cg.as_ref(),
        &phys_work_root,
        binds,
        &job,
        (uid, gid),
        lock_fd,
        &mut guard.cleanup,
        reaper,
        &span,
    )
    .instrument(setup_span.clone())
    .await;
    let setup = t0.elapsed();

    let t_run = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut stopped = false;
    let mut pumps = Vec::new();
    let (exit, launch_error, code) = match launched {
        Ok(Launched::Running { pid, exit, output }) => {
            let exit = supervise(
                pid,
                exit,
                cg.as_ref(),
                &stop,
                spec.stop_mode,
                cfg,
                &mut stopped,
            )
            .instrument(info_span!("run", pid))
            .await;
            // The log pumps end when every writer of the pipes is gone, and a process the job
            // left behind (a step's `cmd &`, the job's nix-daemon) may hold them: they are
            // awaited after teardown has emptied the cgroup, never before it.
            pumps = output;
            (Some(exit), None, exit.code())
        }
        Ok(Launched::Failed { code, message }) => (None, Some(message), code),
        Err(e) => {
            // Setup failed after the cgroup existed: tear down, then report the setup error.
            let torn = teardown(&mut guard, cfg, &stop, reaper).await;
            sampler.abort();
            probe.set(None);
            keep_slot_if_torn_badly(&torn, lane, slot_index, slot_node_local);
            return Err(e);
        }
    };
    let run = t_run.elapsed();
    sampler.abort();
    let facts = probe.facts();
    let built_record = facts.built.as_deref().map(read_built).unwrap_or_default();
    let builds = facts
        .nix_root
        .as_deref()
        .map(|root| crate::store::builds_since(root, facts.started_unix, &built_record))
        .unwrap_or_default();

    let t_down = Instant::now();
    let torn = teardown(&mut guard, cfg, &stop, reaper)
        .instrument(info_span!("teardown"))
        .await;
    for mut task in pumps {
        // A writer outside the job (none is expected) cannot hold the runner up.
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    probe.set(None);
    keep_slot_if_torn_badly(&torn, lane, slot_index, slot_node_local);
    let stats = torn?;
    if slot_dirs.is_some() && spec.nix.is_some() {
        // Still holding the slot, its job gone: nothing live uses the store.
        let (cfg2, lane2, sp) = (cfg.clone(), lane.clone(), reaper.clone());
        let gc = tokio::task::spawn_blocking(move || {
            crate::nixboot::gc_slot(&cfg2, &lane2, slot_index, &sp)
        })
        .await;
        match gc {
            Ok(Ok(Some(done))) => info!("{done}"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot collect the slot's garbage; its disk may fill"),
            Err(e) => warn!(error = %e, "the slot's garbage collection failed; its disk may fill"),
        }
    }
    drop(guard);
    let teardown_time = t_down.elapsed();

    let verdict = (stats.oom_kills > 0).then(|| {
        let mut killed = probe.killed();
        if killed.is_empty() && exit == Some(Exit::Signal(libc::SIGKILL)) {
            killed.push(Killed {
                pid: 0,
                name: command_name(&spec.command),
            });
            killed.retain(|k| !k.name.is_empty());
        }
        verdict::oom_verdict(&OomFacts {
            lane: &lane.name,
            envelope_bytes: spec.memory_bytes,
            stats,
            killed,
            bigger_lane: bigger_lane(cfg, &lane.name, spec.memory_bytes),
            building: builds
                .iter()
                .filter(|b| b.failed)
                .map(|b| b.name.clone())
                .collect(),
            parallel: spec.nix.as_ref().map(|_| {
                (
                    hints::parallelism(lane, spec.memory_bytes, spec.host_cpus).max_jobs,
                    lane.memory_per_build_bytes,
                )
            }),
        })
    });
    let pids_note = (stats.pids_max_hits > 0)
        .then(|| verdict::pids_note(&lane.name, lane.pids_max, stats.pids_max_hits));
    let timings = Timings {
        setup,
        run,
        teardown: teardown_time,
    };
    info!(
        exit = code,
        oom_kills = stats.oom_kills,
        peak_bytes = stats.peak_bytes.unwrap_or(0),
        setup_ms = ms(timings.setup),
        run_ms = ms(timings.run),
        teardown_ms = ms(timings.teardown),
        stopped,
        "job finished"
    );
    Ok(JobOutcome {
        job,
        slot: slot_index,
        code,
        exit,
        stats,
        verdict,
        pids_note,
        launch_error,
        stopped,
        timings,
        nix: nix_report,
        started_unix,
        store: store_kind,
        samples: facts.samples,
        builds,
        nix_root: facts.nix_root,
        built: built_record,
    })
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

enum Launched {
    Running {
        pid: i32,
        exit: oneshot::Receiver<Exit>,
        output: Vec<tokio::task::JoinHandle<()>>,
    },
    Failed {
        code: i32,
        message: String,
    },
}

fn cstring(p: &OsStr) -> Result<CString, EnvelopeError> {
    CString::new(p.as_bytes())
        .map_err(|_| EnvelopeError::Spawn(io::Error::other("path contains a NUL byte")))
}

/// The job's environment: of the agent's only the fixed base and what the lane names
/// (`hints::passes_to_job`), plus the user's identity and private HOME, the lane's hints and
/// the job's own secret variables.
fn job_environment(
    spec: &JobSpec,
    user: Option<&JobUser>,
    home: &Path,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| hints::passes_to_job(&k.to_string_lossy(), &spec.lane.pass_env))
        .collect();
    let mut set = |k: &str, v: OsString| {
        env.retain(|(n, _)| n != k);
        env.push((k.into(), v));
    };
    set("TMPDIR", TMP.into());
    if let Some(u) = user {
        // A fresh HOME in the job's directory: nothing an earlier job left in a home
        // (~/.config/nix, ~/.gitconfig) reaches this one.
        set("HOME", home.as_os_str().to_owned());
        set("USER", u.name.clone().into());
        set("LOGNAME", u.name.clone().into());
    }
    for (k, v) in hints::job_env(&spec.lane, spec.memory_bytes, spec.host_cpus) {
        set(&k, v.into());
    }
    if let Some(n) = &spec.nix {
        set(
            "NIX_REMOTE",
            format!("unix://{}/socket", n.socket_seen.display()).into(),
        );
    }
    for (k, v) in &spec.secret_env {
        set(k, v.expose().clone().into());
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    if spec.nix.is_some() {
        // The job finds nix, nix-build, … of the pinned release first.
        let profile_bin = spec.lane.nix_store.join("var/nix/profiles/default/bin");
        for (k, v) in env.iter_mut().filter(|(k, _)| k == "PATH") {
            let _ = k;
            let mut p = profile_bin.clone().into_os_string();
            p.push(":");
            p.push(&*v);
            *v = p;
        }
    }
    env
}

/// Make the runner root while it is still root's (mode 0700): `.env`, and empty mount points
/// for the installation's directories. Nothing here follows a symlink: the directory was just
/// created by root in a root-owned work root, and files are created exclusively.
fn prepare_runner_root(
    root: &Path,
    r: &RunnerRoot,
) -> Result<Vec<(PathBuf, PathBuf)>, EnvelopeError> {
    let mut mounts = Vec::new();
    let entries = std::fs::read_dir(&r.install_dir)
        .map_err(io_at("read the runner installation", &r.install_dir))?;
    for entry in entries {
        let entry = entry.map_err(io_at("read the runner installation", &r.install_dir))?;
        let name = entry.file_name();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if !is_dir || name == "_work" || name == "_diag" || name == workdir::HOME {
            continue;
        }
        let point = root.join(&name);
        std::fs::create_dir(&point).map_err(io_at("create", &point))?;
        mounts.push((entry.path(), point));
    }
    if !mounts
        .iter()
        .any(|(src, _)| src.file_name().is_some_and(|n| n == "bin"))
    {
        return Err(EnvelopeError::Io {
            what: "find bin/Runner.Listener in",
            path: r.install_dir.clone(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    let mut dotenv = String::new();
    for (k, v) in &r.dotenv {
        dotenv.push_str(k);
        dotenv.push('=');
        dotenv.push_str(v);
        dotenv.push('\n');
    }
    let env_file = root.join(".env");
    workdir::write_new(&env_file, dotenv.as_bytes(), 0o644).map_err(io_at("write", &env_file))?;
    Ok(mounts)
}

/// Log a child's output line by line with the job's span.
fn log_lines(
    fd: OwnedFd,
    stream: &'static str,
    span: tracing::Span,
    bg: &crate::tasks::Background,
) -> io::Result<tokio::task::JoinHandle<()>> {
    log_lines_at(fd, stream, tracing::Level::INFO, span, bg)
}

fn log_lines_at(
    fd: OwnedFd,
    stream: &'static str,
    level: tracing::Level,
    span: tracing::Span,
    bg: &crate::tasks::Background,
) -> io::Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    /// A line longer than this is logged in pieces: a job's output never grows the agent.
    const MAX_LINE: u64 = 64 << 10;
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?;
    Ok(bg.spawn(
        async move {
            // Bytes, not text: a job may print anything (a build tool's binary output), and the
            // pipe must be read to its end whatever comes, or the writer dies of EPIPE.
            let mut reader = tokio::io::BufReader::new(rx);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match (&mut reader)
                    .take(MAX_LINE)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(0) => return,
                    Ok(_) => {
                        if buf.last() == Some(&b'\n') {
                            buf.pop();
                        }
                        if buf.last() == Some(&b'\r') {
                            buf.pop();
                        }
                        let line = String::from_utf8_lossy(&buf);
                        if level == tracing::Level::DEBUG {
                            tracing::debug!(stream, "{line}");
                        } else {
                            info!(stream, "{line}");
                        }
                    }
                    Err(_) => break,
                }
            }
            // A read error: keep the pipe drained to its end all the same.
            let _ = tokio::io::copy(&mut reader, &mut tokio::io::sink()).await;
        }
        .instrument(span),
    ))
}

/// One mount-namespace operation of a child, with its strings made before the fork.
enum Op {
    Bind {
        src: CString,
        dst: CString,
        readonly: bool,
    },
    Tmpfs {
        dst: CString,
        opts: &'static CStr,
    },
    Mkdir {
        path: CString,
    },
    Move {
        src: CString,
        dst: CString,
    },
    Proc,
}

/// What a child does between fork and exec, prepared before the fork.
struct ChildSetup {
    procs: Vec<OwnedFd>,
    ops: Vec<Op>,
    ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    cwd: CString,
    no_new_privs: bool,
    /// A descriptor the child keeps across exec (the slot's lock, for the job's daemon).
    inherit: Option<i32>,
}

impl ChildSetup {
    fn new(
        cg: &dyn JobCgroup,
        mounts: &[Mount],
        user: Option<&JobUser>,
        cwd: &Path,
        no_new_privs: bool,
    ) -> Result<ChildSetup, EnvelopeError> {
        let mut procs = Vec::new();
        for f in cg.procs_files() {
            let fd = std::fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .map_err(io_at("open", &f))?;
            procs.push(OwnedFd::from(fd));
        }
        let c = |p: &Path| cstring(p.as_os_str());
        let mut ops = Vec::with_capacity(mounts.len());
        for mount in mounts {
            match mount {
                Mount::Bind { src, dst, readonly } => ops.push(Op::Bind {
                    src: c(src)?,
                    dst: c(dst)?,
                    readonly: *readonly,
                }),
                Mount::Hide { dst } => ops.push(Op::Tmpfs {
                    dst: c(dst)?,
                    opts: c"mode=0755,size=64k",
                }),
                Mount::PrivateTmp { stage, keep } => {
                    ops.push(Op::Tmpfs {
                        dst: c(stage)?,
                        opts: c"mode=1777",
                    });
                    for k in keep {
                        let rel = k.strip_prefix(TMP).unwrap_or(k);
                        let mut at = stage.clone();
                        for part in rel.components() {
                            at.push(part);
                            ops.push(Op::Mkdir { path: c(&at)? });
                        }
                        ops.push(Op::Bind {
                            src: c(k)?,
                            dst: c(&at)?,
                            readonly: false,
                        });
                    }
                    ops.push(Op::Move {
                        src: c(stage)?,
                        dst: c(Path::new(TMP))?,
                    });
                }
                Mount::Proc => ops.push(Op::Proc),
            }
        }
        let ids = user.map(|u| {
            (
                u.uid as libc::uid_t,
                u.gid as libc::gid_t,
                u.groups
                    .iter()
                    .map(|g| *g as libc::gid_t)
                    .collect::<Vec<_>>(),
            )
        });
        Ok(ChildSetup {
            procs,
            ops,
            ids,
            cwd: cstring(cwd.as_os_str())?,
            no_new_privs,
            inherit: None,
        })
    }

    /// Install the pre-exec hook: join the cgroup, enter a private mount namespace with the
    /// mounts, drop to the user, forbid new privileges, change directory. Failures write a
    /// byte to `fail_fd`.
    fn install(self, cmd: &mut std::process::Command, fail_fd: i32) {
        let ChildSetup {
            procs,
            ops,
            ids,
            cwd,
            no_new_privs,
            inherit,
        } = self;
        // Runs in the forked child before exec: only async-signal-safe system calls on data
        // prepared before the fork; it allocates nothing.
        let hook = move || {
            let fail = || {
                let err = io::Error::last_os_error();
                // SAFETY: writing one byte to a pipe we own.
                unsafe { libc::write(fail_fd, b"x".as_ptr().cast(), 1) };
                Err(err)
            };
            for fd in &procs {
                // SAFETY: "0" moves the calling process into this cgroup.
                if unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                    return fail();
                }
            }
            if !ops.is_empty() {
                // SAFETY: plain system calls with NUL-terminated strings made before the fork.
                unsafe {
                    if libc::unshare(libc::CLONE_NEWNS) != 0 {
                        return fail();
                    }
                    if libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    {
                        return fail();
                    }
                    for op in &ops {
                        if !child_mount(op) {
                            return fail();
                        }
                    }
                }
            }
            if let Some((uid, gid, groups)) = &ids {
                // SAFETY: dropping privileges: groups, then gid, then uid.
                unsafe {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0
                    {
                        return fail();
                    }
                }
            }
            // SAFETY: prctl with constant arguments; inherited by every descendant, irrevocable.
            if no_new_privs && unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return fail();
            }
            if let Some(fd) = inherit {
                // SAFETY: fcntl on a descriptor the parent keeps open across the fork.
                if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
                    return fail();
                }
            }
            // SAFETY: chdir with a NUL-terminated path.
            if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
                return fail();
            }
            Ok(())
        };
        // SAFETY: `hook` obeys the rules for code between fork and exec (see above).
        unsafe {
            cmd.pre_exec(hook);
        }
    }
}

/// One mount operation in the forked child. Async-signal-safe: system calls only.
///
/// # Safety
/// Call only in a child between fork and exec, inside its own mount namespace.
unsafe fn child_mount(op: &Op) -> bool {
    let null = std::ptr::null();
    // SAFETY: (for each call) NUL-terminated strings made before the fork, or null.
    unsafe {
        match op {
            Op::Bind { src, dst, readonly } => {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    null.cast(),
                ) == 0
                    && (!readonly
                        || libc::mount(
                            null,
                            dst.as_ptr(),
                            null,
                            libc::MS_BIND
                                | libc::MS_REMOUNT
                                | libc::MS_RDONLY
                                | libc::MS_NOSUID
                                | libc::MS_NODEV,
                            null.cast(),
                        ) == 0)
            }
            Op::Tmpfs { dst, opts } => {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    dst.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    opts.as_ptr().cast(),
                ) == 0
            }
            Op::Mkdir { path } => {
                libc::mkdir(path.as_ptr(), 0o755) == 0 || *libc::__errno_location() == libc::EEXIST
            }
            Op::Move { src, dst } => {
                libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_MOVE, null.cast()) == 0
            }
            // A /proc of its own: processes of other users (other jobs, the agent, daemons)
            // are invisible, not just unreadable.
            Op::Proc => {
                libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"hidepid=invisible".as_ptr().cast(),
                ) == 0
            }
        }
    }
}

/// A pipe whose write end the pre-exec hook uses to tell agent-side failures from exec errors.
fn fail_pipe() -> Result<(OwnedFd, OwnedFd), EnvelopeError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(|e| EnvelopeError::Spawn(e.into()))
}

fn agent_side_failure(fail_r: &OwnedFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: reading from the non-blocking pipe we own.
    unsafe { libc::read(fail_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) == 1 }
}

/// What a job's daemon recorded it built (derivations, out paths).
pub fn read_built(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .map(|t| t.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Where a job's daemon records the out paths it built (root-only, hidden from jobs).
pub fn built_list(nix: &NixJob, job: &str) -> PathBuf {
    nix.sockets.join(format!("{job}.built"))
}

/// Start the job's own nix-daemon inside its cgroup (and its slot's mounts), as root, and wait
/// for its socket. Returns the socket directory.
#[allow(clippy::too_many_arguments)]
async fn start_nix_daemon(
    nix: &NixJob,
    cg: &dyn JobCgroup,
    slot_mounts: &[Mount],
    job: &str,
    hold: Option<i32>,
    reaper: &Reaper,
    job_span: &tracing::Span,
    bg: &crate::tasks::Background,
    cleanup: &mut Vec<PathBuf>,
) -> Result<PathBuf, EnvelopeError> {
    let dir = nix
        .sockets
        .join(format!("{job}.{:016x}", fastrand::u64(..)));
    std::fs::create_dir_all(&nix.sockets).map_err(io_at("create", &nix.sockets))?;
    std::fs::set_permissions(
        &nix.sockets,
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .map_err(io_at("chmod", &nix.sockets))?;
    std::fs::create_dir(&dir).map_err(io_at("create", &dir))?;
    // Removed with the job, whatever happens next (a daemon that will not start included).
    cleanup.push(dir.clone());
    let socket = dir.join("socket");
    // What this daemon builds, recorded by Nix's post-build hook (run by the daemon after each
    // successful build): the only paths the agent may publish for this job. A shared store
    // also holds other jobs' builds.
    let hook = nix.sockets.join("post-build.sh");
    workdir::write_atomic(
        &hook,
        b"#!/bin/sh\n# Written by flywheel-agent: the job's nix-daemon records what it built.\nprintf '%s\\n' $DRV_PATH $OUT_PATHS >> \"$FLYWHEEL_BUILT\"\n",
        0o755,
    )
    .map_err(io_at("write", &hook))?;
    let mut conf = format!("post-build-hook = {}", hook.display());
    if let Some(n) = &nix.netrc {
        conf.push_str(&format!("\nnetrc-file = {}", n.display()));
    }
    let mut cmd = std::process::Command::new(&nix.daemon);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("NIX_DAEMON_SOCKET_PATH", &socket)
        .env("NIX_CONF_DIR", &nix.conf_dir)
        .env("NIX_CONFIG", conf)
        .env("FLYWHEEL_BUILT", built_list(nix, job))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (fail_r, fail_w) = fail_pipe()?;
    let mut setup = ChildSetup::new(cg, slot_mounts, None, Path::new("/"), false)?;
    // The daemon holds the slot as long as it lives: a job orphaned by a killed agent keeps
    // its slot, and no other job gets the store while it runs.
    setup.inherit = hold;
    setup.install(&mut cmd, fail_w.as_raw_fd());
    let spawned = reaper.spawn(|| {
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        Ok((pid, child))
    });
    drop(cmd);
    let (pid, mut child, mut exit) = spawned.map_err(|e| {
        if agent_side_failure(&fail_r) {
            EnvelopeError::Spawn(e)
        } else {
            EnvelopeError::Io {
                what: "start the job's nix-daemon",
                path: nix.daemon.clone(),
                source: e,
            }
        }
    })?;
    for (out, stream) in [
        (child.stdout.take().map(OwnedFd::from), "nix-daemon"),
        (child.stderr.take().map(OwnedFd::from), "nix-daemon"),
    ] {
        if let Some(fd) = out {
            // The daemon logs each connection; keep those lines at debug level.
            let _ = log_lines_at(fd, stream, tracing::Level::DEBUG, job_span.clone(), bg);
        }
    }
    drop(child);
    // Readiness, not polling: inotify says when the socket is bound; the reaper says when the
    // daemon died instead.
    let waited = crate::ready::appears(&socket, Duration::from_secs(10), &mut exit).await;
    match waited {
        Ok(()) => {}
        Err(crate::ready::Appear::Gone) => {
            return Err(EnvelopeError::Io {
                what: "the job's nix-daemon exited before listening",
                path: nix.daemon.clone(),
                source: io::Error::other("see the agent log"),
            })
        }
        Err(crate::ready::Appear::TimedOut) => {
            return Err(EnvelopeError::Io {
                what: "the job's nix-daemon did not listen within 10 s",
                path: socket,
                source: io::Error::from(io::ErrorKind::TimedOut),
            })
        }
        Err(crate::ready::Appear::Io(e)) => {
            return Err(EnvelopeError::Io {
                what: "watch for the job's nix-daemon's socket",
                path: dir,
                source: e,
            })
        }
    }
    info!(pid, socket = %socket.display(), "the job's nix-daemon is listening");
    Ok(dir)
}

/// Create the job's directory and start the command inside the cgroup.
#[allow(clippy::too_many_arguments)]
async fn launch(
    spec: &JobSpec,
    user: Option<&JobUser>,
    cg: &dyn JobCgroup,
    phys_work_root: &Path,
    mut mounts: Vec<Mount>,
    job: &str,
    (uid, gid): (u32, u32),
    hold: Option<i32>,
    cleanup: &mut Vec<PathBuf>,
    reaper: &Reaper,
    job_span: &tracing::Span,
) -> Result<Launched, EnvelopeError> {
    let job_dir = workdir::create(phys_work_root, job, uid, gid)
        .map_err(io_at("create the job's directory under", phys_work_root))?;
    cleanup.push(job_dir.clone());
    let root_seen = spec.work_root.join(job);
    let mut cwd_path = root_seen.join(workdir::WORK);
    let mut command = spec.command.clone();
    if let Some(n) = &spec.nix {
        // The daemon runs as root with the host's /tmp and /proc: only the job's own mounts.
        let mut daemon_mounts: Vec<Mount> = mounts
            .iter()
            .filter(|m| matches!(m, Mount::Bind { .. } | Mount::Hide { .. }))
            .cloned()
            .collect();
        for d in [&n.userpool, &n.userpool_seen] {
            std::fs::create_dir_all(d).map_err(io_at("create", d))?;
        }
        daemon_mounts.push(Mount::Bind {
            src: n.userpool.clone(),
            dst: n.userpool_seen.clone(),
            readonly: false,
        });
        let dir = start_nix_daemon(
            n,
            cg,
            &daemon_mounts,
            job,
            hold,
            reaper,
            job_span,
            &spec.background,
            cleanup,
        )
        .await?;
        if spec.hook.is_none() {
            // A runner's record outlives its job until the agent has published from it.
            cleanup.push(built_list(n, job));
        }
        if let Some(p) = &spec.probe {
            p.set_idle(2);
        }
        mounts.push(Mount::Bind {
            src: dir,
            dst: n.socket_seen.clone(),
            readonly: false,
        });
        mounts.push(Mount::Hide {
            dst: n.sockets.clone(),
        });
    }
    if let Some(h) = &spec.hook {
        std::fs::create_dir_all(&h.seen).map_err(io_at("create", &h.seen))?;
        mounts.push(Mount::Bind {
            src: h.dir.clone(),
            dst: h.seen.clone(),
            readonly: false,
        });
        mounts.push(Mount::Hide { dst: h.all.clone() });
    }
    if let Some(r) = &spec.runner {
        for (src, point) in prepare_runner_root(&job_dir, r)? {
            let rel = point.strip_prefix(&job_dir).unwrap_or(&point).to_path_buf();
            mounts.push(Mount::Bind {
                src,
                dst: root_seen.join(rel),
                readonly: true,
            });
        }
        cwd_path = root_seen.clone();
        if let Some(first) = command.first_mut() {
            if Path::new(first).is_relative() {
                *first = root_seen.join(&first).into_os_string();
            }
        }
    }
    // Everything root writes into the job's directory is written; now it becomes the user's.
    workdir::hand_over(&job_dir, uid, gid)
        .map_err(io_at("hand the job's directory over to its user", &job_dir))?;
    mounts.push(Mount::Proc);
    let home = root_seen.join(workdir::HOME);

    let Some(program) = command.first().cloned() else {
        return Ok(Launched::Failed {
            code: 127,
            message: "no command given".into(),
        });
    };
    let mut cmd = std::process::Command::new(&program);
    cmd.args(&command[1..])
        .env_clear()
        .envs(job_environment(spec, user, &home));
    if spec.log_output.is_some() {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
    }
    let (fail_r, fail_w) = fail_pipe()?;
    ChildSetup::new(cg, &mounts, user, &cwd_path, true)?.install(&mut cmd, fail_w.as_raw_fd());
    let spawned = reaper.spawn(|| {
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        Ok((pid, child))
    });
    drop(cmd);
    match spawned {
        Ok((pid, mut child, exit)) => {
            let mut output = Vec::new();
            if let Some(out) = child.stdout.take() {
                output.push(
                    log_lines(
                        OwnedFd::from(out),
                        "stdout",
                        job_span.clone(),
                        &spec.background,
                    )
                    .map_err(EnvelopeError::Spawn)?,
                );
            }
            if let Some(err) = child.stderr.take() {
                output.push(
                    log_lines(
                        OwnedFd::from(err),
                        "stderr",
                        job_span.clone(),
                        &spec.background,
                    )
                    .map_err(EnvelopeError::Spawn)?,
                );
            }
            // The child is reaped by the Reaper, never by std.
            drop(child);
            Ok(Launched::Running { pid, exit, output })
        }
        Err(e) => {
            if agent_side_failure(&fail_r) {
                return Err(EnvelopeError::Spawn(e));
            }
            drop(fail_w);
            let name = program.to_string_lossy();
            Ok(match e.kind() {
                io::ErrorKind::NotFound => Launched::Failed {
                    code: 127,
                    message: format!("command not found: {name}"),
                },
                _ => Launched::Failed {
                    code: 126,
                    message: format!("command cannot be executed: {name}: {e}"),
                },
            })
        }
    }
}

fn signal_all(cg: &dyn JobCgroup, sig: nix::sys::signal::Signal) {
    if let Err(e) = cg.signal(sig) {
        warn!(error = %e, signal = %sig, "cannot list the job's processes to signal them");
    }
}

/// Wait for the command; a graceful stop sends the stop signal and waits the stop grace, a
/// second (or an immediate) stop kills the cgroup.
async fn supervise(
    pid: i32,
    mut exit: oneshot::Receiver<Exit>,
    cg: &dyn JobCgroup,
    stop: &Stop,
    mode: StopMode,
    cfg: &Config,
    stopped: &mut bool,
) -> Exit {
    enum Ev {
        Exited(Exit),
        Graceful,
        Kill,
    }
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut killed = false;
    loop {
        let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let ev = tokio::select! {
            e = &mut exit => Ev::Exited(e.unwrap_or(Exit::Signal(libc::SIGKILL))),
            () = stop.graceful.cancelled(), if deadline.is_none() && !killed => Ev::Graceful,
            () = stop.now.cancelled(), if !killed => Ev::Kill,
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && !killed => Ev::Kill,
        };
        match ev {
            Ev::Exited(e) => return e,
            Ev::Graceful => {
                *stopped = true;
                warn!(grace = ?cfg.agent.stop_grace, signal = %mode.signal, whole_job = mode.whole_job, "stopping the job; the cgroup is killed after the grace");
                if mode.whole_job {
                    signal_all(cg, mode.signal);
                } else {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), mode.signal);
                }
                deadline = Some(tokio::time::Instant::now() + cfg.agent.stop_grace);
            }
            Ev::Kill => {
                *stopped = true;
                killed = true;
                warn!("killing the job's cgroup");
                if let Err(e) = cg.kill_all() {
                    warn!(error = %e, "cgroup kill failed; sending SIGKILL to each process");
                    signal_all(cg, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

/// A job from the moment its cgroup exists: the cgroup, what to remove after it, the slot.
/// [`teardown`] finishes it in the documented order within `agent.teardown_deadline`;
/// dropped unfinished (a panic, a cancelled future, an early return), it tears the job down on
/// a thread of its own and releases the slot only after that.
struct JobGuard {
    cg: std::sync::Arc<dyn JobCgroup>,
    cleanup: Vec<PathBuf>,
    slot: Option<slot::Slot>,
    armed: bool,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        let slot = self.slot.take();
        if !self.armed {
            return;
        }
        let (cg, cleanup) = (self.cg.clone(), std::mem::take(&mut self.cleanup));
        warn!(
            job = cg.name(),
            "the job ended without its teardown (a panic or a cancelled task); tearing it down now"
        );
        let spawned = std::thread::Builder::new()
            .name("flywheel-teardown".into())
            .spawn(move || {
                let drained = cg.kill_and_drain(DRAIN_TIMEOUT);
                let errors = remove_after_drain(cg.as_ref(), drained, &cleanup);
                if !errors.is_empty() {
                    tracing::error!(job = cg.name(), errors = %errors.join("; "), "the job's late teardown left things behind");
                }
                drop(slot);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the job's late teardown; its cgroup and directory are left for the next start's reconciliation");
        }
    }
}

/// A teardown that failed leaves a node-local slot's store and work possibly in use: no other
/// job gets the slot until an operator has looked (`flywheel-agent status` shows it).
fn keep_slot_if_torn_badly<T>(
    torn: &Result<T, EnvelopeError>,
    lane: &Lane,
    index: u32,
    node_local: bool,
) {
    if let (Err(e), Some(root)) = (torn, lane.slot_root.as_ref().filter(|_| node_local)) {
        slot::mark_unusable(root, index, &e.to_string());
        warn!(
            slot = index,
            "the slot is marked unusable until its leftovers are gone"
        );
    }
}

/// Tear a job down in the documented order — SIGTERM and the grace, the cgroup kill, the wait
/// until it is empty, the counters, `rmdir`, the job's directories — all within
/// `agent.teardown_deadline` from now.
async fn teardown(
    guard: &mut JobGuard,
    cfg: &Config,
    stop: &Stop,
    reaper: &Reaper,
) -> Result<Stats, EnvelopeError> {
    let start = Instant::now();
    let deadline = start + cfg.agent.teardown_deadline;
    let cg = guard.cg.clone();
    reaper.reap();
    if !cg.is_empty()? {
        signal_all(cg.as_ref(), nix::sys::signal::Signal::SIGTERM);
        let grace_end = start + cfg.agent.teardown_grace.min(cfg.agent.teardown_deadline);
        let mut pause = Duration::from_micros(500);
        while Instant::now() < grace_end && !stop.now.is_cancelled() {
            reaper.reap();
            if cg.is_empty()? {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
    // The kill, the wait for an empty cgroup and the removal of a job's tree (100k files is
    // seconds) block: they run off the async thread, which keeps serving the other runners,
    // the hooks, /metrics and the watchdog. Nothing there starts a child process, so the
    // reaper cannot take a status meant for it. From here the blocking task owns the
    // teardown: the guard is disarmed.
    let left = deadline.saturating_duration_since(Instant::now());
    let (cg2, cleanup) = (cg.clone(), std::mem::take(&mut guard.cleanup));
    guard.armed = false;
    let task = tokio::task::spawn_blocking(move || {
        let drained = cg2.kill_and_drain(DRAIN_TIMEOUT.min(left));
        let stats = cg2.stats().unwrap_or_default();
        (stats, remove_after_drain(cg2.as_ref(), drained, &cleanup))
    });
    let (stats, errors) = match tokio::time::timeout(left, task).await {
        Ok(done) => {
            done.map_err(|e| EnvelopeError::Teardown(format!("the teardown task failed: {e}")))?
        }
        Err(_) => {
            return Err(EnvelopeError::Teardown(format!(
                "the job's teardown did not finish within agent.teardown_deadline ({:?}): its files are still being removed in the background",
                cfg.agent.teardown_deadline
            )))
        }
    };
    reaper.reap();
    if errors.is_empty() {
        Ok(stats)
    } else {
        Err(EnvelopeError::Teardown(errors.join("; ")))
    }
}

/// After the kill: remove the cgroup and the job's directories — only when the cgroup is
/// empty. With processes left, everything is kept (removing a tree under a live process is
/// the race the removal is not built for) and the errors say what was kept.
fn remove_after_drain(
    cg: &dyn JobCgroup,
    drained: Result<(), CgroupError>,
    cleanup: &[PathBuf],
) -> Vec<String> {
    let mut errors = Vec::new();
    if let Err(e) = drained {
        errors.push(e.to_string());
        let kept: Vec<String> = cleanup
            .iter()
            .filter(|d| d.exists())
            .map(|d| d.display().to_string())
            .collect();
        if !kept.is_empty() {
            errors.push(format!(
                "kept {} while processes of the job remain; remove them once they are gone",
                kept.join(", ")
            ));
        }
        return errors;
    }
    if let Err(e) = cg.remove() {
        errors.push(e.to_string());
    }
    for dir in cleanup {
        if let Err(e) = workdir::remove_tree(dir) {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{Result as CgResult, Stats};

    /// A job cgroup that cannot be emptied (a process stuck in the kernel).
    #[derive(Debug)]
    struct Stuck {
        removed: std::sync::atomic::AtomicBool,
    }

    impl JobCgroup for Stuck {
        fn name(&self) -> &str {
            "stuck"
        }
        fn procs_files(&self) -> Vec<PathBuf> {
            vec![PathBuf::from("/fake/stuck/cgroup.procs")]
        }
        fn pids(&self) -> CgResult<Vec<i32>> {
            Ok(vec![424242])
        }
        fn stats(&self) -> CgResult<Stats> {
            Ok(Stats::default())
        }
        fn memory_current(&self) -> Option<u64> {
            None
        }
        fn kill_all(&self) -> CgResult<()> {
            Ok(())
        }
        fn remove(&self) -> CgResult<()> {
            self.removed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn a_cgroup_that_cannot_be_emptied_keeps_the_job_directory() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("job");
        std::fs::create_dir_all(dir.join("_work")).expect("mkdir");
        let cg = Stuck {
            removed: std::sync::atomic::AtomicBool::new(false),
        };
        let drained = cg.kill_and_drain(Duration::from_millis(20));
        assert!(drained.is_err(), "the fake cannot be emptied");
        let errors = remove_after_drain(&cg, drained, std::slice::from_ref(&dir));
        assert!(dir.join("_work").is_dir(), "kept under a live process");
        assert!(!cg.removed.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            errors
                .iter()
                .any(|e| e.contains("kept") && e.contains("job")),
            "{errors:?}"
        );
        // Emptied: both go.
        let errors = remove_after_drain(&cg, Ok(()), std::slice::from_ref(&dir));
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!dir.exists());
        assert!(cg.removed.load(std::sync::atomic::Ordering::SeqCst));
    }
}
