//! An agent SIGKILLed at each phase of a runner job and of an `exec` job leaves nothing behind
//! once an agent starts again (no cgroup, job directory, hook socket, netrc, store view or
//! receipt), and loses no slot: the next job gets it.
//!
//! The kill is the agent's own failpoint (`FLYWHEEL_KILL_AT`, debug builds only), which SIGKILLs
//! it just before the named receipt entry is recorded (so every earlier entry is recorded and
//! made) or at the named phase (`launched`, `teardown`): killing from the test once an entry
//! appears would race the agent, which makes the next one microseconds later, and could not
//! tell which of the two states it caught.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::rig::{term, wait_exit, Rig};
use common::{privileged, AGENT};

/// A runner job's phases, in the order the agent reaches them (its receipt's entries, then
/// the job running, then its teardown).
const RUNNER_PHASES: [&str; 7] = [
    "netrc",
    "hook-socket",
    "slot",
    "cgroup",
    "job-dir",
    "launched",
    "teardown",
];

/// An `exec` job's.
const EXEC_PHASES: [&str; 5] = ["slot", "cgroup", "job-dir", "launched", "teardown"];

/// Files and directories of `dir` (empty when it does not exist).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().display().to_string())
        .collect()
}

/// Everything a job may leave in the rig's state directory and work root, and its cgroups.
fn left(rig: &Rig) -> Vec<String> {
    let state = rig.dir.path().join("state");
    let (cgroups, dirs) = rig.leftovers();
    let mut all: Vec<String> = cgroups.into_iter().map(|c| format!("cgroup {c}")).collect();
    all.extend(dirs.iter().map(|d| d.display().to_string()));
    for sub in [
        "receipts",
        "netrc",
        "hook-sockets",
        "nix-views",
        "nix-sockets",
        "nix-logs",
        "nix-tmp",
    ] {
        all.extend(entries(&state.join(sub)));
    }
    all
}

fn killed_at(log: &str, phase: &str) -> bool {
    log.lines()
        .any(|l| l.contains("FLYWHEEL_KILL_AT") && l.contains(&format!("failpoint=\"{phase}\"")))
}

/// After the first agent died at `phase` (leaving `before`): a second agent reconciles, runs
/// the next job in the lane's one slot, drains, and leaves nothing.
fn restart_leaves_nothing(rig: &Rig, phase: &str, before: &[String]) {
    let done_before = rig.gh.with(|s| s.completed.len());
    let second = rig.start();
    rig.gh.push_job(rig.job(0, "echo the-next-job"));
    // The lane has one slot: the next job runs only if the killed agent's slot came back.
    rig.wait(
        &format!("the next job after a kill at {phase}"),
        Duration::from_secs(60),
        |s| s.completed.len() > done_before,
    );
    term(&second, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(rig, second, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    let after = left(rig);
    eprintln!("killed at {phase}: left {before:#?}; after the restart: {after:?}");
    assert!(
        after.is_empty(),
        "killed at {phase}, left behind after a restart: {after:#?}\n(before the restart: {before:#?})\n{log}"
    );
}

#[test]
fn a_runner_agent_killed_at_each_phase_leaves_nothing_and_loses_no_slot() {
    if !privileged("receipts-runner") {
        return;
    }
    for phase in RUNNER_PHASES {
        let rig = Rig::new(&[("r", "128Mi", 1)], "2s");
        // A job for the first agent's runner (it reaches teardown only once one ran).
        rig.gh.push_job(rig.job(0, "echo the-first-job"));
        let first = rig.start_with(&[("FLYWHEEL_KILL_AT", phase)]);
        let (code, log) = wait_exit(&rig, first, Duration::from_secs(60));
        assert_eq!(code, -1, "killed by a signal at {phase}: {log}");
        assert!(killed_at(&log, phase), "the failpoint {phase} ran: {log}");
        // The premise: the killed agent left its job's receipt (and, from the slot on, what
        // it recorded there).
        let before = left(&rig);
        let receipts = entries(&rig.dir.path().join("state/receipts"));
        assert_eq!(receipts.len(), 1, "at {phase}: {before:#?}");
        let text = std::fs::read_to_string(&receipts[0]).unwrap();
        let recorded = |what: &str| text.contains(&format!("\"what\": \"{what}\""));
        let i = RUNNER_PHASES.iter().position(|p| *p == phase).unwrap();
        for earlier in &RUNNER_PHASES[..i.min(5)] {
            assert!(recorded(earlier), "at {phase}, {earlier} recorded: {text}");
        }
        if i >= 4 {
            let (cgroups, _) = rig.leftovers();
            assert_eq!(cgroups.len(), 1, "at {phase}, the job's cgroup is left");
        }
        restart_leaves_nothing(&rig, phase, &before);
    }
}

#[test]
fn an_exec_job_killed_at_each_phase_leaves_nothing_and_loses_no_slot() {
    if !privileged("receipts-exec") {
        return;
    }
    for phase in EXEC_PHASES {
        let rig = Rig::new(&[("r", "128Mi", 1)], "2s");
        // A command that outlives its agent unless the restart kills it.
        let cmd: &[&str] = if phase == "teardown" {
            &["true"]
        } else {
            &["sleep", "300"]
        };
        // Its output to a file: the command the agent leaves behind keeps a pipe open.
        let out_path = rig.dir.path().join(format!("exec-{phase}.log"));
        let out = std::fs::File::create(&out_path).unwrap();
        let t = Instant::now();
        let mut exec = Command::new(AGENT)
            .args(["exec", "--lane", &rig.lanes[0], "--config"])
            .arg(&rig.config)
            .arg("--")
            .args(cmd)
            .env("FLYWHEEL_LOG", "info")
            .env("FLYWHEEL_LOG_FORMAT", "text")
            .env("FLYWHEEL_KILL_AT", phase)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("run exec");
        let status = loop {
            if let Some(st) = exec.try_wait().unwrap() {
                break st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "exec at {phase} hangs"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let log = std::fs::read_to_string(&out_path).unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "killed at {phase}: {log}"
        );
        assert!(killed_at(&log, phase), "the failpoint {phase} ran: {log}");
        let before = left(&rig);
        assert_eq!(
            entries(&rig.dir.path().join("state/receipts")).len(),
            1,
            "the premise at {phase}: a receipt left: {before:#?}"
        );
        let i = EXEC_PHASES.iter().position(|p| *p == phase).unwrap();
        if i >= 2 {
            let (cgroups, _) = rig.leftovers();
            assert_eq!(cgroups.len(), 1, "at {phase}, the job's cgroup is left");
        }
        if i >= 3 {
            let (_, dirs) = rig.leftovers();
            assert_eq!(dirs.len(), 1, "at {phase}, the job's directory is left");
        }
        restart_leaves_nothing(&rig, phase, &before);
    }
}
