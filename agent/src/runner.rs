//! `flywheel-agent run`: keep each lane's pool of just-in-time runners full (bare metal), or run
//! the one runner ARC handed this pod (ARC mode). Every runner runs inside a job envelope of its
//! lane, as the unprivileged runner user; the agent stays root and outside every job cgroup.
//! A runner's own life, registration to deregistration, is `crate::job::lifecycle`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flywheel_jit_config::{jitfile, Client, Deleted, Secret};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use crate::cgroup::CgroupManager;
use crate::config::{HostFacts, Lane};
use crate::envelope::{JobOutcome, JobProbe, Stop};
use crate::job::agent::{Agent, Pool, Registration};
use crate::job::lifecycle::{self, Ended};

pub use crate::job::{runner_dotenv, runner_name, PoolStats, RunContext, RunError};

/// The three escalating stops of `run`: drain (first SIGTERM), stop (second), kill (third).
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    pub drain: CancellationToken,
    pub stop: CancellationToken,
    pub kill: CancellationToken,
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
    let file = jitfile::runner_file(&jit).map_err(RunError::JitConfig)?;
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
    let world = Agent::new(&ctx, lane, probe, stop, Registration::Given { name, jit });
    let ended = lifecycle::run(&world).await;
    watcher.abort();
    match ended {
        Ended::Ran { outcome, .. } => outcome,
        // ARC registered it: never refused, never drained here.
        Ended::NotRegistered(e) => Err(RunError::Register(e)),
        Ended::Drained => Err(RunError::Drained),
    }
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
    RegistrationFailed(crate::job::RegisterError),
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
    let reserve = ctx.cfg.admission_reserve_bytes();
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

/// One runner of the pool: its whole life is [`lifecycle::run`], its end told to the pool loop.
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
    let world = Agent::new(
        &ctx,
        lane,
        probe,
        stop,
        Registration::Pool(Pool {
            github,
            prefix,
            slot,
            drain,
            stats,
        }),
    );
    match lifecycle::run(&world).await {
        Ended::NotRegistered(e) => End::RegistrationFailed(e),
        Ended::Drained => End::Drained,
        Ended::Ran {
            name,
            outcome: Ok(outcome),
        } => End::Exited {
            name,
            outcome: Box::new(outcome),
        },
        Ended::Ran {
            name,
            outcome: Err(e),
        } => End::AgentFailed {
            name,
            error: e.to_string(),
        },
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
