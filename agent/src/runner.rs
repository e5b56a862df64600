//! `flywheel-agent run`: keep each lane's pool of just-in-time runners full (bare metal), or run
//! the one runner ARC handed this pod (ARC mode). Every runner runs inside a job envelope of its
//! lane, as the unprivileged runner user; the agent stays root and outside every job cgroup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flywheel_jit_config::{jitfile, Client, Deleted, Secret};
use nix::sys::signal::Signal;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use crate::cgroup::CgroupManager;
use crate::config::{Config, HostFacts, Lane};
use crate::envelope::{
    self, JobOutcome, JobProbe, JobSpec, RunnerRoot, Stop, StopMode, UserChoice,
};
use crate::hints;
use crate::reaper::Reaper;
use crate::receipt::{Receipt, Scope, Thing, What};

/// The three escalating stops of `run`: drain (first SIGTERM), stop (second), kill (third).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub stop: CancellationToken,
    pub kill: CancellationToken,
}

/// Everything a runner needs, shared by the pool.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub cfg: Arc<Config>,
    pub mgr: Arc<dyn CgroupManager>,
    pub reaper: Reaper,
    pub host: HostFacts,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// For trust decisions (and, in pool mode, registration).
    pub github: Option<Arc<Client>>,
    pub attic: crate::hooks::AtticCredential,
    /// Each lane's Bazel upstream (lanes with `[lane.bazel]`), credentials read at start.
    pub bazel: crate::bazel::Upstreams,
    /// The root-owned hook scripts (job-started, job-completed).
    pub hook_scripts: (std::path::PathBuf, std::path::PathBuf),
    /// Every background task of the agent (hook servers, log pumps, watchers).
    pub background: crate::tasks::Background,
}

/// A runner's hook service: its socket directory, its job's netrc, the serving task.
struct Hooks {
    mount: envelope::HookMount,
    netrc: std::path::PathBuf,
    serving: crate::hooks::Serving,
    /// The runner job's receipt: the socket directory and netrc are in it before they exist.
    receipt: Receipt,
}

impl Hooks {
    fn start(
        ctx: &RunContext,
        lane: &Lane,
        name: &str,
        probe: &JobProbe,
        bazel: Option<Arc<crate::bazel::JobCache>>,
        receipt: Receipt,
    ) -> Result<Hooks, RunError> {
        let state = &ctx.cfg.agent.state_dir;
        let all = crate::hooks::sockets_dir(state);
        // A short name of its own: a socket's path must fit in 108 bytes whatever the runner
        // is called (the runner's name is in the agent's log beside it).
        let dir = all.join(format!("{:016x}", fastrand::u64(..)));
        tracing::debug!(runner = %name, socket = %dir.join("socket").display(), "the runner's hook socket");
        let netrc_dir = state.join("netrc");
        let setup = |e: std::io::Error| RunError::Setup(format!("runner hooks: {e}"));
        std::fs::create_dir_all(&all).map_err(setup)?;
        std::fs::set_permissions(&all, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .map_err(setup)?;
        std::fs::create_dir_all(&netrc_dir).map_err(setup)?;
        std::fs::set_permissions(
            &netrc_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(setup)?;
        let netrc = netrc_dir.join(format!("{name}.netrc"));
        receipt
            .record(
                Scope::Runner,
                What::Netrc,
                Thing::Tree {
                    path: netrc.clone(),
                },
            )
            .map_err(|e| RunError::Setup(e.to_string()))?;
        std::fs::write(&netrc, "").map_err(setup)?;
        receipt
            .record(
                Scope::Runner,
                What::HookSocket,
                Thing::Tree { path: dir.clone() },
            )
            .map_err(|e| RunError::Setup(e.to_string()))?;
        std::fs::set_permissions(&netrc, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(setup)?;
        let serving = crate::hooks::serve(
            &dir,
            crate::hooks::RunnerHooks {
                runner_name: name.to_owned(),
                lane: lane.clone(),
                bigger_lane: crate::envelope::bigger_lane(&ctx.cfg, &lane.name, lane.memory_bytes)
                    .map(|(n, b)| (n.to_owned(), b)),
                host_cpus: ctx.host.cpus,
                probe: probe.clone(),
                netrc: netrc.clone(),
                github: ctx.github.clone(),
                attic: ctx.cfg.attic.clone(),
                credential: ctx.attic.clone(),
                telemetry: ctx.telemetry.clone(),
                bazel,
            },
            &ctx.background,
        )
        .map_err(setup)?;
        Ok(Hooks {
            mount: envelope::HookMount {
                dir,
                seen: crate::hooks::socket_seen(state),
                all,
            },
            netrc,
            serving,
            receipt,
        })
    }

    /// After the job (whose envelope published what the completed hook could not, before it
    /// released the slot): stop serving and walk back what the receipt holds of the runner's:
    /// its daemon's build logs and record of what it built (as many as the job made: on a
    /// blocking thread), the job's netrc, the socket.
    async fn finish(self) {
        self.serving.task.abort();
        let receipt = self.receipt;
        let removed = tokio::task::spawn_blocking(move || {
            receipt.undo(Some(Scope::Runner), &mut crate::receipt::Plain)
        })
        .await;
        match removed {
            Ok(errors) if errors.is_empty() => {}
            Ok(errors) => {
                warn!(errors = %errors.join("; "), "cannot remove the runner's hook socket, netrc and build logs")
            }
            Err(e) => {
                warn!(error = %e, "cannot remove the runner's hook socket, netrc and build logs")
            }
        }
    }
}

/// Record a finished runner job in the metrics (with the store paths its daemon added).
fn record(ctx: &RunContext, runner: &str, o: &JobOutcome) {
    ctx.telemetry.job_finished(runner, &o.report, &o.timings);
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Envelope(#[from] envelope::EnvelopeError),
    #[error("the JIT config handed to this pod is unusable: {0}")]
    JitConfig(String),
}

/// What the listener's exit code means (actions/runner `ReturnCode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerExit {
    Done,
    Terminated,
    Retryable,
    Updating,
    SessionConflict,
    ConfigRefreshed,
    VersionDeprecated,
    Other(i32),
}

impl ListenerExit {
    pub fn from_code(code: i32) -> ListenerExit {
        match code {
            0 => ListenerExit::Done,
            1 => ListenerExit::Terminated,
            2 => ListenerExit::Retryable,
            3 | 4 => ListenerExit::Updating,
            5 => ListenerExit::SessionConflict,
            6 => ListenerExit::ConfigRefreshed,
            7 => ListenerExit::VersionDeprecated,
            c => ListenerExit::Other(c),
        }
    }
    /// Does this exit count against the lane (back off before the next runner)?
    pub fn is_failure(self) -> bool {
        !matches!(self, ListenerExit::Done | ListenerExit::ConfigRefreshed)
    }
}

/// The runner's `.env`: single-line values only (the listener splits at the first `=`, no
/// quoting). Multi-line hints (`NIX_CONFIG`) reach the runner through its environment.
pub fn runner_dotenv(lane: &Lane, host_cpus: u32) -> Vec<(String, String)> {
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    // The listener loads `.env` over its own environment (actions/runner, Runner.Listener's
    // LoadAndSetEnv), and every step inherits it: the lane's Nix must be first on this PATH,
    // so `type -p nix` (install-nix-action) and `nix --version` (nix-installer-action) find it
    // and those actions install nothing.
    let path = if lane.nix {
        format!(
            "{}:{path}",
            lane.nix_store
                .join("var/nix/profiles/default/bin")
                .display()
        )
    } else {
        path
    };
    let mut v = vec![
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("PATH".to_owned(), path),
        (
            "ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE".to_owned(),
            "1".to_owned(),
        ),
    ];
    v.extend(
        hints::job_env(lane, lane.memory_bytes, host_cpus)
            .into_iter()
            .filter(|(_, val)| !val.contains('\n')),
    );
    v
}

fn runner_spec(
    ctx: &RunContext,
    lane: &Lane,
    jit: Secret<String>,
    name: &str,
    probe: JobProbe,
    hooks: &Hooks,
    arc: bool,
) -> JobSpec {
    let mut dotenv = runner_dotenv(lane, ctx.host.cpus);
    dotenv.push((
        "ACTIONS_RUNNER_HOOK_JOB_STARTED".into(),
        ctx.hook_scripts.0.display().to_string(),
    ));
    dotenv.push((
        "ACTIONS_RUNNER_HOOK_JOB_COMPLETED".into(),
        ctx.hook_scripts.1.display().to_string(),
    ));
    dotenv.push((
        "FLYWHEEL_HOOK_SOCKET".into(),
        hooks.mount.seen.join("socket").display().to_string(),
    ));
    let nix = lane.nix.then(|| {
        let mut n = crate::envelope::nix_job(&ctx.cfg, lane);
        n.netrc = Some(hooks.netrc.clone());
        // Its trust is known only at job-started: the store and daemon come then.
        n.at_job_started = true;
        n
    });
    JobSpec {
        lane: lane.clone(),
        memory_bytes: lane.memory_bytes,
        work_root: lane.work_root.clone(),
        user: Some(UserChoice::Slot),
        slot: None,
        slot_fallback: arc,
        command: vec!["bin/Runner.Listener".into(), "run".into()],
        host_cpus: ctx.host.cpus,
        runner: Some(RunnerRoot {
            install_dir: ctx.cfg.runner.install_dir.clone(),
            dotenv,
        }),
        secret_env: vec![("ACTIONS_RUNNER_INPUT_JITCONFIG".to_owned(), jit)],
        log_output: Some(name.to_owned()),
        stop_mode: StopMode {
            signal: Signal::SIGINT,
            whole_job: false,
        },
        probe: Some(probe),
        nix,
        hook: Some(hooks.mount.clone()),
        background: ctx.background.clone(),
        before_release: None,
        receipt: Some(hooks.receipt.clone()),
        bazel: None,
    }
}

/// `<prefix>-<lane>-<6 hex>`: unique per attempt.
pub fn runner_name(prefix: &str, lane: &str) -> String {
    format!("{prefix}-{lane}-{:06x}", fastrand::u32(..0x100_0000))
}

/// The host name, reduced to what a runner name may hold.
pub fn default_prefix() -> String {
    let h = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "flywheel".into());
    let s: String = h
        .split('.')
        .next()
        .unwrap_or("flywheel")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    if s.is_empty() {
        "flywheel".into()
    } else {
        s
    }
}

/// The memory runners may use: the host's, or the limit of the cgroup the agent makes jobs
/// under (its service's or pod's) when lower.
pub fn capacity_bytes(host: &HostFacts, mgr: &dyn CgroupManager) -> u64 {
    host.memory_bytes
        .min(mgr.base_memory_limit().unwrap_or(u64::MAX))
}

// ---- ARC mode --------------------------------------------------------------------------------

/// Run the one runner whose JIT config ARC put in this pod's environment; return the
/// listener's exit status.
pub async fn run_arc(
    ctx: RunContext,
    jit: Secret<String>,
    lane: &Lane,
    shutdown: Shutdown,
) -> Result<JobOutcome, RunError> {
    let (c, d) = crate::reconcile::local(&ctx.cfg, ctx.mgr.clone()).await;
    if c + d > 0 {
        info!(cgroups = c, dirs = d, "cleaned up after an earlier run");
    }
    let file = jitfile::runner_file(&jit).map_err(|e| RunError::JitConfig(e.to_string()))?;
    let name = file.agent_name.clone();
    info!(runner = %name, lane = %lane.name, "ARC mode: running the runner this pod was given");
    let probe = JobProbe::default();
    ctx.telemetry.runner_started(&name, lane, probe.clone());
    let stop = Stop::default();
    let watcher = {
        let (probe, stop, grace) = (probe.clone(), stop.clone(), ctx.cfg.runner.drain_grace);
        ctx.background.spawn(async move {
            shutdown.drain.cancelled().await;
            if probe.busy() {
                info!(grace = ?grace, "draining: the runner is busy; letting its job finish");
                tokio::select! {
                    () = tokio::time::sleep(grace) => {}
                    () = shutdown.stop.cancelled() => {}
                    () = wait_idle(&probe) => {}
                }
            }
            stop.graceful.cancel();
            shutdown.kill.cancelled().await;
            stop.now.cancel();
        })
    };
    let outcome = run_runner(&ctx, lane, &name, jit, probe, stop, true).await;
    watcher.abort();
    outcome
}

/// One registered runner's life, the same in the pool and under ARC: its hook service, its
/// listener run as a job of the lane, the hooks' last work, the runner's record. The caller
/// registered it (or ARC did) and deletes its registration when that is due.
async fn run_runner(
    ctx: &RunContext,
    lane: &Lane,
    name: &str,
    jit: Secret<String>,
    probe: JobProbe,
    stop: Stop,
    arc: bool,
) -> Result<JobOutcome, RunError> {
    // The job's Bazel cache endpoint: read-only until its job-started hook says otherwise.
    let bazel = ctx
        .bazel
        .get(&lane.name)
        .map(|up| crate::bazel::JobCache::new(up.clone(), Some(ctx.telemetry.clone())));
    let receipt = match Receipt::create(&crate::receipt::dir(&ctx.cfg.agent.state_dir), &lane.name)
    {
        Ok(r) => r,
        Err(e) => {
            ctx.telemetry.runner_ended(name);
            return Err(RunError::Setup(e.to_string()));
        }
    };
    let hooks = match Hooks::start(ctx, lane, name, &probe, bazel.clone(), receipt.clone()) {
        Ok(h) => h,
        Err(e) => {
            // What it made before it failed (a netrc) goes now, not at the next start.
            let _ = tokio::task::spawn_blocking(move || {
                receipt.undo(Some(Scope::Runner), &mut crate::receipt::Plain)
            })
            .await;
            ctx.telemetry.runner_ended(name);
            return Err(e);
        }
    };
    let mut spec = runner_spec(ctx, lane, jit, name, probe, &hooks, arc);
    spec.bazel = bazel;
    spec.before_release = Some(
        hooks
            .serving
            .leftover(ctx.cfg.runner.drain_grace, stop.clone()),
    );
    let outcome = envelope::run_job(&ctx.cfg, ctx.mgr.as_ref(), spec, stop, &ctx.reaper).await;
    hooks.finish().await;
    ctx.telemetry.runner_ended(name);
    match &outcome {
        Ok(o) => record(ctx, name, o),
        Err(_) => ctx.telemetry.infrastructure_failure(&lane.name),
    }
    Ok(outcome?)
}

async fn wait_idle(probe: &JobProbe) {
    while probe.busy() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---- pool mode -------------------------------------------------------------------------------

/// One runner the pool started.
#[derive(Debug)]
struct Handle {
    lane: usize,
    name: Arc<Mutex<Option<(String, u64)>>>,
    probe: JobProbe,
    stop: Stop,
    stopping: bool,
    /// A delete of this idle runner is in flight (draining).
    deleting: bool,
}

/// What a drain-time delete of an idle runner came to: the runner task's id, its name, GitHub's
/// answer.
type DeleteDone = (
    tokio::task::Id,
    String,
    Result<Deleted, flywheel_jit_config::GitHubError>,
);

/// How a runner task ended.
#[derive(Debug)]
enum End {
    RegistrationFailed(String),
    Drained,
    Exited {
        name: String,
        outcome: Box<JobOutcome>,
    },
    AgentFailed {
        name: String,
        error: String,
    },
}

#[derive(Debug, Default, Clone, Copy)]
struct LaneState {
    failures: u32,
    not_before: Option<Instant>,
    refused_logged: bool,
}

/// Per-pool counters, for tests and the closing numbers.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Unix ms of the pool loop's last turn (the watchdog's evidence of life).
    pub heartbeat: Arc<std::sync::atomic::AtomicU64>,
    /// Registrations that failed.
    pub registration_failures: std::sync::atomic::AtomicU64,
    pub registered: std::sync::atomic::AtomicU64,
    pub finished: std::sync::atomic::AtomicU64,
    /// Microseconds from a JIT config received to its listener started, summed.
    pub launch_us: std::sync::atomic::AtomicU64,
}

/// Keep every lane at `max_runners` until drained. Returns after a clean drain.
pub async fn run_pool(
    ctx: RunContext,
    github: Arc<Client>,
    shutdown: Shutdown,
    ready: Option<tokio::sync::oneshot::Sender<()>>,
    stats: Arc<PoolStats>,
) -> Result<(), RunError> {
    let prefix = ctx
        .cfg
        .runner
        .name_prefix
        .clone()
        .unwrap_or_else(default_prefix);
    let (c, d) = crate::reconcile::local(&ctx.cfg, ctx.mgr.clone()).await;
    let r = crate::reconcile::github(&github, &prefix).await;
    info!(cgroups = c, dirs = d, runners = r, prefix = %prefix, "startup reconciliation done");

    let capacity = capacity_bytes(&ctx.host, ctx.mgr.as_ref());
    let reserve = ctx.cfg.agent.reserve_bytes;
    let mut lanes: Vec<LaneState> = vec![LaneState::default(); ctx.cfg.lanes.len()];
    let mut handles: HashMap<tokio::task::Id, Handle> = HashMap::new();
    let mut tasks: JoinSet<End> = JoinSet::new();
    let mut draining: Option<Instant> = None;
    let mut ready = ready;
    let mut stopping_all = false;
    // GitHub calls never sit in this loop: drain-time deletes run here, their answers come back
    // as events.
    let mut deletes: JoinSet<DeleteDone> = JoinSet::new();

    loop {
        stats.heartbeat.store(
            crate::notify::now_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
        // Ready (systemd READY=1) once the first registration has an answer, good or bad.
        let answered = stats.registered.load(std::sync::atomic::Ordering::Relaxed)
            + stats
                .registration_failures
                .load(std::sync::atomic::Ordering::Relaxed);
        if answered > 0 {
            if let Some(tx) = ready.take() {
                let _ = tx.send(());
            }
        }
        // Fill the lanes.
        if draining.is_none() {
            for (i, lane) in ctx.cfg.lanes.iter().enumerate() {
                if lane.unavailable.is_some() {
                    continue;
                }
                loop {
                    let running = handles.values().filter(|h| h.lane == i).count() as u32;
                    if running >= lane.max_runners {
                        break;
                    }
                    if lanes[i].not_before.is_some_and(|t| Instant::now() < t) {
                        break;
                    }
                    let used: u64 = handles
                        .values()
                        .map(|h| ctx.cfg.lanes[h.lane].memory_bytes)
                        .sum();
                    if used + lane.memory_bytes + reserve > capacity {
                        if !lanes[i].refused_logged {
                            ctx.telemetry.admission_refused(&lane.name);
                            warn!(lane = %lane.name, used, envelope = lane.memory_bytes, reserve, capacity, "admission: no room for another runner of this lane until a job ends");
                            lanes[i].refused_logged = true;
                        }
                        break;
                    }
                    lanes[i].refused_logged = false;
                    let h = Handle {
                        lane: i,
                        name: Arc::default(),
                        probe: JobProbe::default(),
                        stop: Stop::default(),
                        stopping: false,
                        deleting: false,
                    };
                    let fut = runner_task(
                        ctx.clone(),
                        github.clone(),
                        i,
                        prefix.clone(),
                        h.name.clone(),
                        h.probe.clone(),
                        h.stop.clone(),
                        shutdown.drain.clone(),
                        stats.clone(),
                    );
                    let id = tasks
                        .spawn(fut.instrument(info_span!("runner", lane = %lane.name)))
                        .id();
                    handles.insert(id, h);
                }
            }
        }
        if draining.is_some() && tasks.is_empty() {
            info!("drained: no runner left");
            return Ok(());
        }

        let deadline = draining.map(|t| t + ctx.cfg.runner.drain_grace);
        let far = Instant::now() + Duration::from_secs(86400);
        tokio::select! {
            Some(joined) = tasks.join_next_with_id() => {
                let (id, end) = match joined {
                    Ok((id, end)) => (id, end),
                    Err(e) => (e.id(), End::AgentFailed { name: String::new(), error: e.to_string() }),
                };
                let Some(h) = handles.remove(&id) else { continue };
                let lane = &ctx.cfg.lanes[h.lane];
                let st = &mut lanes[h.lane];
                match end {
                    End::Exited { name, outcome } => {
                        let exit = ListenerExit::from_code(outcome.code);
                        stats.finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let oom = outcome.report.oom.is_some();
                        match exit {
                            ListenerExit::Done | ListenerExit::ConfigRefreshed => info!(lane = %lane.name, runner = %name, code = outcome.code, "runner finished"),
                            ListenerExit::VersionDeprecated => error!(lane = %lane.name, runner = %name, "the runner version is deprecated (exit 7): install a current actions/runner in runner.install_dir"),
                            ListenerExit::Updating => error!(lane = %lane.name, runner = %name, code = outcome.code, "the runner wants to update itself: pin runner.install_dir to a current actions/runner release"),
                            ListenerExit::SessionConflict => warn!(lane = %lane.name, runner = %name, "session conflict (exit 5): another listener used this runner's registration"),
                            ListenerExit::Terminated | ListenerExit::Retryable | ListenerExit::Other(_) => warn!(lane = %lane.name, runner = %name, code = outcome.code, oom, "runner failed"),
                        }
                        if let Some(v) = outcome.report.oom_verdict() {
                            warn!(lane = %lane.name, runner = %name, "{v}");
                        }
                        if exit.is_failure() && !h.stopping && !oom {
                            st.failures = st.failures.saturating_add(if exit == ListenerExit::VersionDeprecated { 6 } else { 1 });
                        } else {
                            st.failures = 0;
                        }
                    }
                    End::RegistrationFailed(e) => {
                        stats.registration_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        st.failures = st.failures.saturating_add(1);
                        warn!(lane = %lane.name, error = %e, "cannot register a runner");
                    }
                    End::AgentFailed { name, error } => {
                        st.failures = st.failures.saturating_add(1);
                        error!(lane = %lane.name, runner = %name, error = %error, "the agent could not run this runner");
                    }
                    End::Drained => {}
                }
                if st.failures > 0 {
                    let wait = ctx.cfg.runner.backoff.saturating_mul(1u32 << (st.failures - 1).min(10)).min(Duration::from_secs(300));
                    warn!(lane = %lane.name, failures = st.failures, wait_ms = wait.as_millis() as u64, "backing off before the next runner of this lane");
                    st.not_before = Some(Instant::now() + wait);
                } else {
                    st.not_before = None;
                }
            }
            () = shutdown.drain.cancelled(), if draining.is_none() => {
                draining = Some(Instant::now());
                info!(runners = handles.len(), grace = ?ctx.cfg.runner.drain_grace, "draining: no new runners; idle runners are removed, busy ones may finish");
                for (id, h) in handles.iter_mut() {
                    drain_one(&github, *id, h, &mut deletes);
                }
            }
            Some(Ok((id, name, answer))) = deletes.join_next(), if !deletes.is_empty() => {
                if let Some(h) = handles.get_mut(&id) {
                    drained_one(h, &name, answer);
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or(far).into()), if deadline.is_some() && !stopping_all => {
                warn!(runners = handles.len(), "drain grace is over: stopping the remaining runners");
                stopping_all = true;
                for h in handles.values_mut() {
                    h.stopping = true;
                    h.stop.graceful.cancel();
                }
            }
            () = shutdown.stop.cancelled(), if !stopping_all => {
                warn!("second signal: stopping every runner now");
                stopping_all = true;
                if draining.is_none() { draining = Some(Instant::now()); }
                for h in handles.values_mut() {
                    h.stopping = true;
                    h.stop.graceful.cancel();
                }
            }
            () = shutdown.kill.cancelled() => {
                for h in handles.values() {
                    h.stop.now.cancel();
                }
            }
            () = tokio::time::sleep(Duration::from_millis(250)) => {
                // Re-check drain candidates: a runner that finished registering while draining.
                if draining.is_some() && !stopping_all {
                    for (id, h) in handles.iter_mut().filter(|(_, h)| !h.stopping) {
                        drain_one(&github, *id, h, &mut deletes);
                    }
                }
            }
        }
    }
}

/// While draining: an idle runner is deleted on GitHub (so no job lands on it) and stopped.
/// The delete runs as a task of `deletes`; [`drained_one`] acts on its answer.
fn drain_one(
    github: &Arc<Client>,
    id: tokio::task::Id,
    h: &mut Handle,
    deletes: &mut JoinSet<DeleteDone>,
) {
    if h.stopping || h.deleting || h.probe.busy() {
        return;
    }
    let known = h.name.lock().ok().and_then(|g| g.clone());
    let Some((name, runner_id)) = known else {
        return;
    };
    h.deleting = true;
    let github = github.clone();
    deletes.spawn(async move {
        let answer = github.delete_runner(runner_id).await;
        (id, name, answer)
    });
}

fn drained_one(
    h: &mut Handle,
    name: &str,
    answer: Result<Deleted, flywheel_jit_config::GitHubError>,
) {
    h.deleting = false;
    match answer {
        Ok(Deleted::Busy) => info!(runner = %name, "busy on GitHub: letting its job finish"),
        Ok(_) => {
            info!(runner = %name, "idle: removed from GitHub and stopped");
            // Deleted: the runner's task need not delete it again.
            if let Ok(mut g) = h.name.lock() {
                *g = None;
            }
            h.stopping = true;
            h.stop.graceful.cancel();
        }
        Err(e) => {
            warn!(runner = %name, error = %e, "cannot delete an idle runner while draining; stopping it");
            h.stopping = true;
            h.stop.graceful.cancel();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn runner_task(
    ctx: RunContext,
    github: Arc<Client>,
    lane_idx: usize,
    prefix: String,
    slot: Arc<Mutex<Option<(String, u64)>>>,
    probe: JobProbe,
    stop: Stop,
    drain: CancellationToken,
    stats: Arc<PoolStats>,
) -> End {
    let lane = &ctx.cfg.lanes[lane_idx];
    let gh = match &ctx.cfg.github {
        Some(g) => g,
        None => return End::RegistrationFailed("no [github] configured".into()),
    };
    let key = format!("(registering {:08x})", fastrand::u32(..));
    ctx.telemetry.runner_started(&key, lane, probe.clone());
    let t_reg = Instant::now();
    let reg = github
        .register(
            |_| runner_name(&prefix, &lane.name),
            gh.runner_group_id,
            &lane.labels,
            "_work",
        )
        .await;
    ctx.telemetry
        .observe_phase(&lane.name, "registration", "none", t_reg.elapsed());
    let jit = match reg {
        Ok(j) => j,
        Err(e) => {
            ctx.telemetry.runner_ended(&key);
            return End::RegistrationFailed(e.to_string());
        }
    };
    ctx.telemetry.runner_named(&key, &jit.runner.name);
    let received = Instant::now();
    let name = jit.runner.name.clone();
    let id = jit.runner.id;
    stats
        .registered
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if drain.is_cancelled() {
        // Registered as the drain began: deleted here, and never published in the slot, so
        // the drain does not delete it a second time (GitHub would answer 404).
        let _ = github.delete_runner(id).await;
        ctx.telemetry.runner_ended(&name);
        return End::Drained;
    }
    // No await between the look at the drain and this: the pool loop sees either no name
    // (and leaves the runner to this task) or the name (and deletes it itself).
    if let Ok(mut g) = slot.lock() {
        *g = Some((name.clone(), id));
    }
    info!(runner = %name, id, "registered; starting its listener");
    // Launch latency: from the JIT config in hand to the listener's process started (the
    // envelope says when; nothing polls the cgroup).
    let watch = {
        let (probe, stats) = (probe.clone(), stats.clone());
        ctx.background.spawn(async move {
            probe.wait_launched().await;
            let us = u64::try_from(received.elapsed().as_micros()).unwrap_or(u64::MAX);
            stats
                .launch_us
                .fetch_add(us, std::sync::atomic::Ordering::Relaxed);
        })
    };
    let stopped_by_us = stop.graceful.clone();
    let res = run_runner(&ctx, lane, &name, jit.encoded, probe, stop, false).await;
    watch.abort();
    match res {
        Ok(outcome) => {
            // An ephemeral runner that ran its job is removed by GitHub; anything else may
            // still be registered.
            let still_registered = slot.lock().map(|g| g.is_some()).unwrap_or(true);
            if still_registered && (outcome.code != 0 || stopped_by_us.is_cancelled()) {
                match github.delete_runner(id).await {
                    Ok(Deleted::Deleted) => info!(runner = %name, "deleted its registration"),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(runner = %name, error = %e, "cannot delete the runner's registration")
                    }
                }
            }
            End::Exited {
                name,
                outcome: Box::new(outcome),
            }
        }
        Err(e) => {
            let _ = github.delete_runner(id).await;
            End::AgentFailed {
                name,
                error: e.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_exit_codes() {
        assert_eq!(ListenerExit::from_code(0), ListenerExit::Done);
        assert_eq!(ListenerExit::from_code(4), ListenerExit::Updating);
        assert_eq!(ListenerExit::from_code(7), ListenerExit::VersionDeprecated);
        assert!(!ListenerExit::Done.is_failure());
        assert!(!ListenerExit::ConfigRefreshed.is_failure());
        assert!(ListenerExit::Retryable.is_failure());
        assert!(ListenerExit::from_code(137).is_failure());
    }

    #[test]
    fn names() {
        let n = runner_name("sting", "tinyland-nix");
        assert!(
            n.starts_with("sting-tinyland-nix-") && n.len() == "sting-tinyland-nix-".len() + 6,
            "{n}"
        );
        let p = default_prefix();
        assert!(
            !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "{p}"
        );
    }
}
