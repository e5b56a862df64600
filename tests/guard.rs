//! A job whose future is dropped mid-run (a panic above it, a cancelled task) is still torn
//! down: its processes killed, its cgroup and directory removed. Its own test binary, because
//! the agent's reaper makes the process a child subreaper that reaps every child.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{privileged, processes_with, unique, Fixture};
use flywheel_agent::config::{parse, HostFacts, Origin};
use flywheel_agent::envelope::{run_job, JobProbe, JobSpec, Stop, StopMode};
use flywheel_agent::reaper::Reaper;

#[test]
fn a_job_whose_future_is_dropped_is_still_torn_down() {
    if !privileged("dropped-job") {
        return;
    }
    let f = Fixture::new("dropped", "128Mi", "");
    let text = std::fs::read_to_string(&f.config).unwrap();
    let cfg = parse(&text, &Origin::File(f.config.clone()), &HostFacts::detect()).unwrap();
    let lane = cfg.lanes.iter().find(|l| l.name == f.lane).unwrap().clone();
    let marker = unique("dropped-marker");
    let probe = JobProbe::default();
    let spec = JobSpec {
        memory_bytes: lane.memory_bytes,
        work_root: lane.work_root.clone(),
        lane,
        user: None,
        slot: None,
        slot_fallback: false,
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("sleep 300; : {marker}").into(),
        ],
        host_cpus: 1,
        runner: None,
        secret_env: Vec::new(),
        log_output: Some("dropped".into()),
        stop_mode: StopMode::default(),
        probe: Some(probe.clone()),
        nix: None,
        hook: None,
        background: flywheel_agent::tasks::Background::new(),
        before_release: None,
        receipt: None,
        bazel: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let reaper = Reaper::start().unwrap();
        let mgr = flywheel_agent::cgroup::detect(Path::new("/sys/fs/cgroup"), None).unwrap();
        let job = run_job(&cfg, mgr.as_ref(), spec, Stop::default(), &reaper);
        tokio::pin!(job);
        let t = Instant::now();
        while probe.processes() == 0 {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the job never started"
            );
            tokio::select! {
                r = &mut job => panic!("the job ended on its own: {r:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        // The job runs: its shell is alive, its cgroup and directory exist. (Right after the
        // shell joined, it may be forking `sleep`: for a moment the child has its command
        // line too.)
        let t = Instant::now();
        while processes_with(&marker).len() != 1 && t.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(processes_with(&marker).len(), 1, "the job's shell runs");
        assert_eq!(f.leftover_cgroups().len(), 1, "{:?}", f.leftover_cgroups());
        assert_eq!(f.leftover_work().len(), 1, "{:?}", f.leftover_work());
        // Leaving this block drops the job's future in the middle of its run.
    });
    let t = Instant::now();
    while !(processes_with(&marker).is_empty()
        && f.leftover_cgroups().is_empty()
        && f.leftover_work().is_empty())
    {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "not torn down after the drop: processes {:?}, cgroups {:?}, work {:?}",
            processes_with(&marker),
            f.leftover_cgroups(),
            f.leftover_work()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
