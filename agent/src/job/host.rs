//! A runner job's hook service on the host: its socket directory, its job's netrc, the serving
//! task; and their removal after the job with its daemon's record and build logs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;

use super::answers::{Answers, RunnerHooks};
use super::{RunContext, RunError};
use crate::config::Lane;
use crate::envelope::{self, JobProbe};
use crate::hooks::HookEvent;
use crate::receipt::{Receipt, Scope, Thing, What};

/// A runner's hook service: its socket directory, its job's netrc, the serving task.
#[derive(Debug)]
pub struct Hooks {
    pub mount: envelope::HookMount,
    pub netrc: PathBuf,
    pub serving: tokio::task::JoinHandle<()>,
    pub answers: Answers,
    /// The runner job's receipt: the socket directory and netrc are in it before they exist,
    /// and the envelope records the job's own host changes in it.
    pub receipt: Receipt,
}

impl Hooks {
    /// Make the socket directory and the job's (empty, root-only) netrc, each in `receipt`
    /// before it exists, and serve the socket: its requests become `events`. What was made is
    /// removed again when a step fails.
    pub fn start(
        ctx: &RunContext,
        lane: &Lane,
        name: &str,
        probe: &JobProbe,
        bazel: Option<Arc<crate::bazel::JobCache>>,
        events: mpsc::Sender<HookEvent>,
        receipt: Receipt,
    ) -> Result<Hooks, RunError> {
        let state = &ctx.cfg.agent.state_dir;
        let all = crate::hooks::sockets_dir(state);
        // A short name of its own: a socket's path must fit in 108 bytes whatever the runner
        // is called (the runner's name is in the agent's log beside it).
        let dir = all.join(format!("{:016x}", fastrand::u64(..)));
        tracing::debug!(runner = %name, socket = %dir.join("socket").display(), "the runner's hook socket");
        let netrc_dir = state.join("netrc");
        let netrc = netrc_dir.join(format!("{name}.netrc"));
        let setup = |e: std::io::Error| {
            let _ = crate::workdir::remove_tree(&dir);
            let _ = std::fs::remove_file(&netrc);
            RunError::Hooks(e)
        };
        std::fs::create_dir_all(&all).map_err(setup)?;
        std::fs::set_permissions(&all, std::os::unix::fs::PermissionsExt::from_mode(0o711))
            .map_err(setup)?;
        std::fs::create_dir_all(&netrc_dir).map_err(setup)?;
        std::fs::set_permissions(
            &netrc_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(setup)?;
        let recorded = |what: What, path: &PathBuf| {
            receipt
                .record(Scope::Runner, what, Thing::Tree { path: path.clone() })
                .map_err(|e| {
                    let _ = crate::workdir::remove_tree(&dir);
                    let _ = std::fs::remove_file(&netrc);
                    RunError::Receipt(e)
                })
        };
        recorded(What::Netrc, &netrc)?;
        std::fs::write(&netrc, "").map_err(setup)?;
        recorded(What::HookSocket, &dir)?;
        std::fs::set_permissions(&netrc, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(setup)?;
        let answers = Answers::new(RunnerHooks {
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
        });
        let member = {
            let probe = probe.clone();
            Arc::new(move |pid| probe.contains(pid))
        };
        let serving =
            crate::hooks::serve(&dir, name, member, events, &ctx.background).map_err(setup)?;
        Ok(Hooks {
            mount: envelope::HookMount {
                dir,
                seen: crate::hooks::socket_seen(state),
                all,
            },
            netrc,
            serving,
            answers,
            receipt,
        })
    }

    /// After the job (whose envelope published what the completed hook could not, before it
    /// released the slot): stop serving and walk back what the receipt holds of the runner's:
    /// its daemon's build logs and record of what it built (as many as the job made: on a
    /// blocking thread), the job's netrc, the socket.
    pub async fn finish(self) {
        self.serving.abort();
        let remove = removal(self.receipt, Duration::ZERO);
        if let Err(e) = tokio::task::spawn_blocking(remove).await {
            warn!(error = %e, "cannot remove the runner's hook socket, netrc and build logs");
        }
    }

    /// [`Hooks::finish`] for a lifecycle dropped before its end: the same removal, on a thread
    /// of its own (there may be no runtime left to run it), once the job's own teardown (the
    /// envelope's guard, on a thread of its own too) has emptied and removed its cgroup.
    pub fn abandon(self) {
        self.serving.abort();
        let remove = removal(self.receipt, ABANDON_WAIT);
        if let Err(e) = std::thread::Builder::new()
            .name("hooks-abandon".into())
            .spawn(remove)
        {
            warn!(error = %e, "cannot remove the runner's hook socket, netrc and build logs");
        }
    }
}

/// How long a dropped runner job's removal waits for its job's teardown: past any
/// `agent.teardown_deadline` a configuration takes.
const ABANDON_WAIT: Duration = Duration::from_secs(15 * 60);

/// Walk back the runner's entries of `receipt` (blocking) once the job's cgroup is gone,
/// waiting up to `wait` for that: its processes (the daemon writing its record and logs, the
/// runner using its socket) may still run until then. A cgroup still there after `wait` keeps
/// them for the next start's reconciliation.
pub fn removal(receipt: Receipt, wait: Duration) -> impl FnOnce() + Send + 'static {
    move || {
        let t = std::time::Instant::now();
        while receipt.cgroup_pending() && t.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(100));
        }
        if receipt.cgroup_pending() {
            warn!("kept the runner's hook socket, netrc and build logs: its job's cgroup is not removed yet; the next start removes them");
            return;
        }
        let errors = receipt.undo(Some(Scope::Runner), &mut crate::receipt::Plain);
        if !errors.is_empty() {
            warn!(errors = %crate::receipt::joined(&errors), "cannot remove the runner's hook socket, netrc and build logs");
        }
    }
}
