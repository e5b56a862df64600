//! cgroup v2-only behaviour, on a real v2 kernel. This binary is not in `cargo test`'s default
//! set (`test = false`): CI runs it inside a VM with `tests/vm/run-in-vm.sh` as cargo's runner,
//! and every test fails when the host is not pure cgroup v2.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{stderr, stdout, unique, Fixture};
use flywheel_agent::cgroup::{self, Layout, Limits};

fn require_v2() -> Box<dyn cgroup::CgroupManager> {
    assert!(nix::unistd::geteuid().is_root(), "the v2 tests need root");
    let mgr = cgroup::detect(Path::new("/sys/fs/cgroup"), None).expect("detect");
    assert_eq!(
        mgr.layout(),
        Layout::V2,
        "not a pure cgroup v2 host: run with CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER=tests/vm/run-in-vm.sh"
    );
    mgr
}

/// This process's cgroup directory, and the base the agent uses (its leaf stripped).
fn own_and_base() -> (String, PathBuf) {
    let own = std::fs::read_to_string("/proc/self/cgroup").expect("read");
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("v2 line")
        .to_owned();
    let base = own
        .strip_suffix("/flywheel-agent")
        .unwrap_or(&own)
        .to_owned();
    (
        own,
        Path::new("/sys/fs/cgroup").join(base.trim_start_matches('/')),
    )
}

fn controllers(path: &Path) -> String {
    std::fs::read_to_string(path.join("cgroup.subtree_control")).expect("subtree_control")
}

#[test]
fn the_agent_moves_into_a_leaf_before_delegating_in_a_cgroup_it_did_not_create() {
    require_v2();
    let (_, base) = own_and_base();
    assert_ne!(
        base,
        Path::new("/sys/fs/cgroup"),
        "the VM runs the tests in a non-root cgroup"
    );
    let f = Fixture::new("deleg", "64Mi", "");
    let o = f.exec(&[], &["true"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (own_after, base_after) = own_and_base();
    assert_eq!(base_after, base);
    assert!(
        own_after.ends_with("/flywheel-agent"),
        "this process was moved into the leaf: {own_after}"
    );
    let procs = std::fs::read_to_string(base.join("cgroup.procs")).expect("procs");
    assert!(
        procs.trim().is_empty(),
        "no process left in the delegating cgroup: {procs:?}"
    );
    for dir in [base.clone(), base.join("flywheel-jobs")] {
        let c = controllers(&dir);
        assert!(
            c.contains("memory") && c.contains("pids"),
            "{}: {c}",
            dir.display()
        );
    }
}

#[test]
fn job_cgroup_files_carry_the_envelope() {
    require_v2();
    let f = Fixture::new("files", "64Mi", "");
    let script = "d=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); cat $d/memory.max $d/memory.swap.max $d/pids.max $d/memory.oom.group";
    let o = f.exec(&[], &["sh", "-c", script]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{}\n0\n512\n0\n", 64u64 << 20));
}

#[test]
fn oom_is_read_from_memory_events_with_memory_peak() {
    let mgr = require_v2();
    let job = mgr
        .create(
            &unique("v2oom"),
            &Limits {
                memory_bytes: 64 << 20,
                pids_max: 64,
                oom_group: false,
            },
        )
        .expect("create");
    let mut child = common::spawn_in(job.as_ref(), "exec tail /dev/zero");
    let status = child.wait().expect("wait");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    let stats = job.stats().expect("stats");
    assert!(stats.oom_kills >= 1, "{stats:?}");
    let peak = stats.peak_bytes.expect("memory.peak");
    assert!(peak > 32 << 20 && peak <= 64 << 20, "{peak}");
    // The sampler's read of the high-water mark alone is the same file.
    assert_eq!(job.memory_peak(), Some(peak));
    job.destroy(Duration::from_secs(10)).expect("destroy");
}

#[test]
fn cgroup_kill_tears_down_setsid_leftovers() {
    let mgr = require_v2();
    let job = mgr
        .create(
            &unique("v2kill"),
            &Limits {
                memory_bytes: 64 << 20,
                pids_max: 64,
                oom_group: false,
            },
        )
        .expect("create");
    let mut child = common::spawn_in(
        job.as_ref(),
        "setsid sleep 300 & (setsid sh -c 'trap \"\" TERM; sleep 300' &); sleep 0.3",
    );
    child.wait().expect("wait");
    assert!(
        job.pids().expect("pids").len() >= 2,
        "leftovers are running"
    );
    let dir = Path::new("/sys/fs/cgroup")
        .join(
            own_and_base()
                .1
                .strip_prefix("/sys/fs/cgroup")
                .expect("under mount"),
        )
        .join("flywheel-jobs")
        .join(job.name());
    assert!(
        dir.join("cgroup.kill").exists(),
        "this kernel has cgroup.kill"
    );
    job.kill_and_drain(Duration::from_secs(10))
        .expect("drained");
    assert!(job.is_empty().expect("empty"));
    job.remove().expect("remove");
    assert!(!dir.exists());
}

#[test]
fn pids_max_refuses_forks_and_counts_them() {
    let mgr = require_v2();
    let job = mgr
        .create(
            &unique("v2pids"),
            &Limits {
                memory_bytes: 64 << 20,
                pids_max: 16,
                oom_group: false,
            },
        )
        .expect("create");
    let mut child = common::spawn_in(
        job.as_ref(),
        "for i in $(seq 40); do sleep 5 & done; exit 0",
    );
    child.wait().expect("wait");
    assert!(job.pids().expect("pids").len() <= 16);
    assert!(job.stats().expect("stats").pids_max_hits > 0);
    job.destroy(Duration::from_secs(10)).expect("destroy");
}

#[test]
fn oom_group_lane_kills_the_whole_job() {
    require_v2();
    let f = Fixture::new("group", "64Mi", "oom_group = true");
    let o = f.exec(&[], &["sh", "-c", "tail /dev/zero; exit 3"]);
    let err = stderr(&o);
    assert_eq!(
        o.status.code(),
        Some(137),
        "memory.oom.group=1 kills the shell too: {err}"
    );
    assert!(err.contains("out of memory"), "{err}");
}
