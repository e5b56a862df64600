//! What a runner job runs in its envelope: the listener, its `.env`, its hooks, its store.

use flywheel_jit_config::Secret;
use nix::sys::signal::Signal;

use super::host::Hooks;
use super::RunContext;
use crate::config::Lane;
use crate::envelope::{JobProbe, JobSpec, RunnerRoot, StopMode, UserChoice};
use crate::hints;

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

pub(super) fn runner_spec(
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
        bazel: None,
        receipt: Some(hooks.receipt.clone()),
    }
}
