//! `flywheel-agent run` end to end: the fake GitHub, the fake Runner.Listener, real cgroups.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::rig::{hs256_secret, register_directly, term, wait_exit, Rig};
use common::{privileged, AGENT};
use fake_github::Injection;

#[test]
fn two_lanes_stay_at_target_across_many_jobs_through_faults() {
    if !privileged("run-pool") {
        return;
    }
    let rig = Rig::new(&[("a", "128Mi", 2), ("b", "128Mi", 1)], "5s");
    for i in 0..8 {
        rig.gh.push_job(rig.job(
            0,
            &format!("echo job-a-{i} as $(id -un) in $PWD; sleep 0.2"),
        ));
    }
    for i in 0..4 {
        rig.gh
            .push_job(rig.job(1, &format!("echo job-b-{i}; sleep 0.2")));
    }
    // Faults on the way: a lost answer (then 409), a rate limit, a truncated body, a 5xx.
    rig.gh.inject(Injection {
        endpoint: "generate-jitconfig",
        status: 502,
        apply: true,
        ..Injection::default()
    });
    rig.gh.inject(Injection {
        endpoint: "generate-jitconfig",
        status: 429,
        headers: vec![("retry-after".into(), "1".into())],
        ..Injection::default()
    });
    rig.gh.inject(Injection {
        endpoint: "generate-jitconfig",
        status: 201,
        body: "{\"runner\": {\"id\": 9".into(),
        ..Injection::default()
    });
    let agent = rig.start();
    rig.wait("12 jobs done", Duration::from_secs(90), |s| {
        s.completed.len() >= 12
    });
    // Steady state: the lanes are back at target.
    rig.wait("lanes refilled", Duration::from_secs(20), |s| {
        let alive = |l: &str| {
            s.runners
                .values()
                .filter(|r| r.labels.iter().any(|x| x == l))
                .count()
        };
        alive(&rig.lanes[0]) == 2 && alive(&rig.lanes[1]) == 1
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "clean drain exits 0:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        log.contains("job-a-0 as fwt-"),
        "listener output is in the agent's log with its runner: {log}"
    );
    assert!(log.contains("runner="), "{log}");
    rig.gh.with(|s| {
        assert!(s.completed.iter().all(|(_, r, _)| r == "succeeded"), "{:?}", s.completed);
        assert_eq!(s.max_alive.get(&rig.lanes[0]), Some(&2), "lane a never above its target");
        assert_eq!(s.max_alive.get(&rig.lanes[1]), Some(&1), "lane b never above its target");
        for r in &s.registrations {
            assert!(r.name.starts_with(&format!("{}-", rig.prefix)), "{}", r.name);
            assert_eq!(r.labels.len(), 1);
            assert!(rig.lanes.contains(&r.labels[0]));
            assert_eq!(r.runner_group_id, 1);
        }
        assert_eq!(s.count("create-installation-token"), 1, "one installation token served every registration");
        let statuses: Vec<u16> = s.calls.iter().filter(|c| c.endpoint == "generate-jitconfig").map(|c| c.status).collect();
        let lost = statuses.iter().position(|c| *c == 502).expect("the injected 502");
        assert!(statuses[lost..].contains(&409), "the lost answer was recovered through 409: {statuses:?}");
        assert!(statuses.contains(&429));
        assert!(s.runners.is_empty(), "drain removed the idle runners: {:?}", s.runners);
        // API calls per runner in steady state: one generate-jitconfig for each runner that ran a
        // job; deletions only for the idle runners removed by the drain and the 409 recovery.
        let finished = s.completed.len();
        let deletes = s.count("delete-runner");
        assert!(
            deletes <= 3 + 1,
            "deletes {deletes}: finished runners are not deleted again\ncalls: {:?}\n{log}",
            s.calls.iter().map(|c| (c.endpoint, c.status)).collect::<Vec<_>>()
        );
        eprintln!(
            "figures: registrations={} completed={finished} generate-jitconfig calls={} (incl. injected faults) delete calls={deletes} total calls={}",
            s.registrations.len(),
            s.count("generate-jitconfig"),
            s.calls.len()
        );
    });
    let (cgroups, dirs) = rig.leftovers();
    assert!(cgroups.is_empty(), "{cgroups:?}");
    assert!(dirs.is_empty(), "{dirs:?}");
}

#[test]
fn sigterm_lets_a_busy_runner_finish_and_removes_idle_ones() {
    if !privileged("run-drain") {
        return;
    }
    let rig = Rig::new(&[("busy", "128Mi", 1), ("idle", "128Mi", 2)], "60s");
    let shared = common::shared_dir(rig.dir.path());
    // The job ends only once the test says so, after SIGTERM: it is busy during the drain on
    // any machine.
    rig.gh.push_job(rig.job(
        0,
        &format!(
            "until [ -e {}/go ]; do sleep 0.05; done; echo finished-in-drain",
            shared.display()
        ),
    ));
    let mut agent = rig.start();
    rig.wait("the job is running", Duration::from_secs(30), |s| {
        s.runners.values().any(|r| r.busy)
    });
    rig.wait("idle lane full", Duration::from_secs(30), |s| {
        s.runners
            .values()
            .filter(|r| r.labels.contains(&rig.lanes[1]))
            .count()
            == 2
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        agent.try_wait().expect("wait").is_none(),
        "the drain waits for the busy job: {}",
        rig.log()
    );
    std::fs::write(shared.join("go"), "").expect("go");
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    rig.gh.with(|s| {
        assert_eq!(s.completed.len(), 1, "{:?}", s.completed);
        assert_eq!(
            s.completed[0].1, "succeeded",
            "the busy job finished, not cancelled"
        );
        assert!(
            s.runners.is_empty(),
            "idle runners deleted: {:?}",
            s.runners
        );
    });
    assert!(log.contains("finished-in-drain"), "{log}");
    let (cgroups, dirs) = rig.leftovers();
    assert!(
        cgroups.is_empty() && dirs.is_empty(),
        "{cgroups:?} {dirs:?}"
    );
}

#[test]
fn a_busy_runner_past_the_drain_grace_is_stopped() {
    if !privileged("run-drain-grace") {
        return;
    }
    let rig = Rig::new(&[("slow", "128Mi", 1)], "1s");
    rig.gh.push_job(rig.job(0, "sleep 60"));
    let agent = rig.start();
    rig.wait("the job is running", Duration::from_secs(30), |s| {
        s.runners.values().any(|r| r.busy)
    });
    let t = Instant::now();
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "stopped after the 1 s grace, not after the job's 60 s"
    );
    rig.gh.with(|s| {
        assert_eq!(
            s.completed.first().map(|c| c.1.as_str()),
            Some("cancelled"),
            "{:?}",
            s.completed
        )
    });
    let (cgroups, dirs) = rig.leftovers();
    assert!(
        cgroups.is_empty() && dirs.is_empty(),
        "{cgroups:?} {dirs:?}"
    );
}

#[test]
fn a_second_signal_stops_busy_runners_without_waiting_for_the_grace() {
    if !privileged("run-second-signal") {
        return;
    }
    let rig = Rig::new(&[("hurry", "128Mi", 1)], "60s");
    rig.gh.push_job(rig.job(0, "sleep 60"));
    let agent = rig.start();
    rig.wait("the job is running", Duration::from_secs(30), |s| {
        s.runners.values().any(|r| r.busy)
    });
    let t = Instant::now();
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "did not wait the 60 s drain grace: {:?}",
        t.elapsed()
    );
    assert!(log.contains("second signal"), "{log}");
    let (cgroups, dirs) = rig.leftovers();
    assert!(
        cgroups.is_empty() && dirs.is_empty(),
        "{cgroups:?} {dirs:?}"
    );
}

#[test]
fn sigkill_then_restart_leaves_no_stale_runner_cgroup_or_work() {
    if !privileged("run-restart") {
        return;
    }
    let rig = Rig::new(&[("r", "128Mi", 2)], "5s");
    let first = rig.start();
    let first_pid = first.id();
    rig.wait("first agent's runners", Duration::from_secs(30), |s| {
        s.runners.len() == 2
    });
    let old: Vec<String> = rig
        .gh
        .with(|s| s.runners.values().map(|r| r.name.clone()).collect());
    // Let the listeners start inside their cgroups, then kill the agent without warning.
    std::thread::sleep(Duration::from_millis(500));
    term(&first, nix::sys::signal::Signal::SIGKILL);
    let _ = wait_exit(&rig, first, Duration::from_secs(10));
    let (cgroups, _) = rig.leftovers();
    assert!(
        !cgroups.is_empty(),
        "the killed agent left its runners' cgroups (the test's premise)"
    );

    let second = rig.start();
    rig.wait("second agent's runners", Duration::from_secs(30), |s| {
        s.runners.len() == 2 && s.runners.values().all(|r| !old.contains(&r.name))
    });
    let (cgroups, dirs) = rig.leftovers();
    let stale = |n: &str| n.contains(&format!(".{first_pid}."));
    assert!(
        !cgroups.iter().any(|c| stale(c)),
        "old cgroups removed: {cgroups:?}"
    );
    assert!(
        !dirs.iter().any(|d| stale(&d.display().to_string())),
        "old work removed: {dirs:?}"
    );
    term(&second, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, second, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("deleted a runner left by an earlier run"),
        "{log}"
    );
    rig.gh.with(|s| assert!(s.runners.is_empty()));
    let (cgroups, dirs) = rig.leftovers();
    assert!(
        cgroups.is_empty() && dirs.is_empty(),
        "{cgroups:?} {dirs:?}"
    );
}

#[test]
fn arc_mode_runs_the_given_runner_and_exits_with_its_status() {
    if !privileged("arc") {
        return;
    }
    let rig = Rig::new(&[("arc", "128Mi", 1)], "5s");
    // No [github] in ARC mode: the pod has only the JIT config.
    let cfg = std::fs::read_to_string(&rig.config).expect("read");
    let start = cfg.find("[github]").expect("github");
    let end = cfg.find("[runner]").expect("runner");
    std::fs::write(&rig.config, format!("{}{}", &cfg[..start], &cfg[end..])).expect("write");

    for (exit, script) in [(0u8, "echo arc-job"), (7, "true"), (2, "true")] {
        let mut job = rig.job(0, script);
        job.listener_exit = exit;
        rig.gh.push_job(job);
        // What ARC does: generate a JIT config and hand it to the pod.
        let jit = register_directly(&rig.gh, &rig.lanes[0], &format!("arc-{exit}"));
        let out = Command::new(AGENT)
            .args(["run", "--config"])
            .arg(&rig.config)
            .env("ACTIONS_RUNNER_INPUT_JITCONFIG", &jit)
            .env("FLYWHEEL_LANE", &rig.lanes[0])
            .env("FLYWHEEL_LOG_FORMAT", "text")
            .output()
            .expect("run");
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(i32::from(exit)), "{log}");
        assert!(!log.contains(&jit), "the JIT config never reaches the log");
    }
    assert!(rig
        .gh
        .with(|s| s.completed.iter().any(|(_, r, _)| r == "succeeded")));
    let (cgroups, dirs) = rig.leftovers();
    assert!(
        cgroups.is_empty() && dirs.is_empty(),
        "{cgroups:?} {dirs:?}"
    );
    rig.gh.with(|s| {
        assert_eq!(
            s.count("generate-jitconfig"),
            3,
            "only the controller registered runners"
        );
        assert_eq!(
            s.count("list-runners") + s.count("delete-runner"),
            0,
            "the agent itself never called GitHub"
        );
    });
}

#[test]
fn run_refuses_a_config_without_what_it_needs() {
    let rig = Rig::new(&[("x", "128Mi", 1)], "5s");
    let cfg = std::fs::read_to_string(&rig.config).expect("read");
    std::fs::write(
        &rig.config,
        cfg.replace("private_key_file", "private_key_filez"),
    )
    .expect("write");
    let o = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&rig.config)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown field `private_key_filez`"));
    // A host whose cgroups cannot hold a job: 78 too, so that systemd does not restart it
    // every RestartSec.
    if privileged("run-no-cgroups") {
        std::fs::write(
            &rig.config,
            format!("{cfg}\n[cgroup]\nmount = \"/var/empty\"\n"),
        )
        .expect("write");
        let o = Command::new(AGENT)
            .args(["run", "--config"])
            .arg(&rig.config)
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(78), "{err}");
        assert!(err.contains("this host cannot run jobs"), "{err}");
    }
    std::fs::write(
        &rig.config,
        cfg.replace(
            &rig.dir.path().join("app.pem").display().to_string(),
            "/nonexistent/app.pem",
        ),
    )
    .expect("write");
    let o = Command::new(AGENT)
        .args(["check-config", "--config"])
        .arg(&rig.config)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(78));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("github.private_key_file /nonexistent/app.pem")
            && err.contains("agent.toml:15:20: "),
        "{err}"
    );
    std::fs::write(
        rig.dir.path().join("bad.pem"),
        "-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    std::fs::write(
        &rig.config,
        cfg.replace(
            &rig.dir.path().join("app.pem").display().to_string(),
            &rig.dir.path().join("bad.pem").display().to_string(),
        ),
    )
    .expect("write");
    let o = Command::new(AGENT)
        .args(["check-config", "--config"])
        .arg(&rig.config)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not an RSA private key"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn systemd_gets_ready_watchdog_and_stopping() {
    if !privileged("sd-notify") {
        return;
    }
    let rig = Rig::new(&[("notify", "128Mi", 1)], "5s");
    let sock_path = rig.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let agent = rig.start_with(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);
    let mut seen = Vec::<String>::new();
    let t = Instant::now();
    let mut buf = [0u8; 512];
    while !(seen.iter().any(|m| m.contains("READY=1"))
        && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no READY/WATCHDOG: {seen:?}\n{}",
            rig.log()
        );
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        rig.gh.with(|s| !s.registrations.is_empty()),
        "READY came after the first registration"
    );
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    while !seen.iter().any(|m| m.contains("STOPPING=1")) && t.elapsed() < Duration::from_secs(10) {
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(seen.iter().any(|m| m.contains("STOPPING=1")), "{seen:?}");
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
}

/// ARC mode with the agent as PID 1 of a new PID namespace (a pod's entrypoint).
fn arc_rig(drain_grace: &str) -> Rig {
    let rig = Rig::new(&[("pid1", "128Mi", 1)], drain_grace);
    let cfg = std::fs::read_to_string(&rig.config).expect("read");
    let (start, end) = (
        cfg.find("[github]").expect("github"),
        cfg.find("[runner]").expect("runner"),
    );
    std::fs::write(&rig.config, format!("{}{}", &cfg[..start], &cfg[end..])).expect("write");
    rig
}

fn start_as_pid1(rig: &Rig, jit: &str) -> (Child, i32) {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(rig.log_path())
        .expect("log");
    let child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            "--",
            AGENT,
            "run",
            "--config",
        ])
        .arg(&rig.config)
        .env("ACTIONS_RUNNER_INPUT_JITCONFIG", jit)
        .env("FLYWHEEL_LANE", &rig.lanes[0])
        .env("FLYWHEEL_LOG_FORMAT", "text")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("unshare");
    // The agent is unshare's only child; its pid here is what a pod's PID 1 is outside.
    let t = Instant::now();
    let agent = loop {
        let kids = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", child.id()))
            .unwrap_or_default();
        if let Some(p) = kids
            .split_whitespace()
            .next()
            .and_then(|p| p.parse::<i32>().ok())
        {
            break p;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the agent never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let status = std::fs::read_to_string(format!("/proc/{agent}/status")).unwrap_or_default();
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        nspid.trim_end().ends_with("\t1"),
        "the agent is PID 1 in its namespace: {nspid:?}"
    );
    (child, agent)
}

fn zombie_children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let after = stat
            .rsplit_once(')')
            .map(|(_, r)| r.trim().to_owned())
            .unwrap_or_default();
        let mut f = after.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|x| x.parse::<i32>().ok()));
        if state == Some("Z") && ppid == Some(pid) {
            out.push(p);
        }
    }
    out
}

#[test]
fn as_pid1_the_agent_reaps_orphans_and_exits_with_the_listeners_status() {
    if !privileged("pid1") {
        return;
    }
    let rig = arc_rig("5s");
    let shared = common::shared_dir(rig.dir.path());
    // Orphans that die at once, re-parented to the agent (PID 1 of the pod): then a marker.
    let mut job = rig.job(
        0,
        &format!(
            "for i in 1 2 3 4 5 6; do (sleep 0.1 &); done; sleep 0.5; touch {}/orphaned; sleep 2; echo orphans-made",
            shared.display()
        ),
    );
    job.listener_exit = 2;
    rig.gh.push_job(job);
    let jit = register_directly(&rig.gh, &rig.lanes[0], "pid1-a");
    let (child, agent) = start_as_pid1(&rig, &jit);
    // The orphans existed and died before this look (the marker comes after they exited).
    let t = Instant::now();
    while !shared.join("orphaned").exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", rig.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        zombie_children(agent).is_empty(),
        "orphans were reaped: {:?}",
        zombie_children(agent)
    );
    let (code, log) = wait_exit(&rig, child, Duration::from_secs(30));
    assert_eq!(code, 2, "the pod exits with the listener's status: {log}");
    assert!(log.contains("orphans-made"), "{log}");
}

#[test]
fn as_pid1_sigterm_drains_and_exits_with_the_listeners_status() {
    if !privileged("pid1-drain") {
        return;
    }
    let rig = arc_rig("1s");
    rig.gh.push_job(rig.job(0, "sleep 30"));
    let jit = register_directly(&rig.gh, &rig.lanes[0], "pid1-b");
    let (child, agent) = start_as_pid1(&rig, &jit);
    rig.wait("the job is running", Duration::from_secs(20), |s| {
        s.runners.values().any(|r| r.busy)
    });
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal");
    let (code, log) = wait_exit(&rig, child, Duration::from_secs(30));
    assert_eq!(
        code, 0,
        "the listener cancelled its job and exited 0: {log}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "the 1 s drain grace, then the listener's SIGINT"
    );
    assert!(log.contains("draining: the runner is busy"), "{log}");
    assert_eq!(
        rig.gh.with(|s| s.completed.first().map(|c| c.1.clone())),
        Some("cancelled".into())
    );
}

#[test]
fn status_json_shows_the_running_job_with_its_lane_and_envelope() {
    if !privileged("status") {
        return;
    }
    // The job outlives every check however slow the machine; SIGTERM ends it after 1 s.
    let rig = Rig::new(&[("st", "192Mi", 1)], "1s");
    rig.gh.push_job(rig.job(0, "sleep 120"));
    let agent = rig.start();
    rig.wait("the job is running", Duration::from_secs(30), |s| {
        s.runners.values().any(|r| r.busy)
    });
    let t = Instant::now();
    let status = loop {
        let o = Command::new(AGENT)
            .args(["status", "--json", "--config"])
            .arg(&rig.config)
            .output()
            .expect("status");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let busy = v["lanes"][0]["runners"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["state"] == "busy"));
        if busy || t.elapsed() > Duration::from_secs(30) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["mode"], "pool");
    let lane = &status["lanes"][0];
    assert_eq!(lane["name"], rig.lanes[0].as_str());
    assert_eq!(lane["memory_bytes"], 192u64 << 20);
    let r = lane["runners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["state"] == "busy")
        .unwrap_or_else(|| panic!("a busy runner: {status}"));
    assert_eq!(r["envelope_bytes"], 192u64 << 20);
    assert!(
        r["job"]
            .as_str()
            .is_some_and(|j| j.starts_with(&format!("{}.s", rig.lanes[0]))),
        "{r}"
    );
    assert!(
        r["memory_current_bytes"].as_u64().is_some_and(|m| m > 0),
        "{r}"
    );
    assert!(r["name"].as_str().unwrap().starts_with(&rig.prefix));
    // The text form says the same (asked until it does: a failure shows the agent's log).
    let t = Instant::now();
    loop {
        let text = Command::new(AGENT)
            .args(["status", "--config"])
            .arg(&rig.config)
            .output()
            .expect("status");
        let text = String::from_utf8_lossy(&text.stdout).into_owned();
        if text.contains("busy") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{text}\n--- json ---\n{status}\n--- agent log ---\n{}",
            rig.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
}

#[test]
fn github_faults_during_the_trust_lookup_are_retried_and_a_lookup_that_fails_closes_the_cache() {
    if !privileged("trust-faults") {
        return;
    }
    let rig = Rig::new(&[("tfault", "128Mi", 1)], "5s");
    rig.with_attic(
        "http://127.0.0.1:9",
        "push_token_to_jobs = true\ntoken_validity = \"1h\"\npublish = false\n",
    );
    rig.push_and_fork_pr_runs();
    let push_job = |tag: &str| {
        let mut j = rig.job(0, &format!("echo trust-{tag} ran"));
        j.env.insert("GITHUB_RUN_ID".into(), "101".into());
        j.env.insert("GITHUB_EVENT_NAME".into(), "push".into());
        j.env.insert("GITHUB_REF".into(), "refs/heads/main".into());
        j
    };
    // The first push job's lookup meets a 5xx, then a rate limit, then an answer.
    rig.gh.inject(Injection {
        endpoint: "get-run",
        status: 502,
        ..Injection::default()
    });
    rig.gh.inject(Injection {
        endpoint: "get-run",
        status: 429,
        headers: vec![("retry-after".into(), "1".into())],
        ..Injection::default()
    });
    rig.gh.push_job(push_job("a"));
    // The second job is handed to the next runner at its registration; it starts 3 s later,
    // after this test has put the next fault in place.
    let mut b = push_job("b");
    b.delay_ms = 3000;
    rig.gh.push_job(b);
    let agent = rig.start();
    rig.wait("the first job", Duration::from_secs(60), |s| {
        !s.completed.is_empty()
    });
    rig.gh.with(|s| {
        assert!(s.injections.is_empty(), "both faults were met");
        assert!(
            s.calls
                .iter()
                .filter(|c| c.endpoint == "get-run")
                .map(|c| c.status)
                .collect::<Vec<_>>()
                .starts_with(&[502, 429, 200]),
            "{:?}",
            s.calls
        );
    });
    // The second's lookup fails for good (GitHub refuses): the job runs, read-only.
    rig.gh.inject(Injection {
        endpoint: "get-run",
        status: 404,
        body: "{\"message\": \"Not Found\"}".into(),
        ..Injection::default()
    });
    rig.wait("the second job", Duration::from_secs(60), |s| {
        s.completed.len() >= 2
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("trust-a ran") && log.contains("trust-b ran"),
        "{log}"
    );
    let verdicts: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("trust decided"))
        .collect();
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    assert!(
        verdicts[0].contains("push: allowed (push to main of tinyland/flywheel)"),
        "the faults were retried through: {verdicts:?}"
    );
    assert!(
        verdicts[1].contains("push: denied") && verdicts[1].contains("GitHub could not be asked"),
        "a failed lookup is a denial: {verdicts:?}"
    );
    assert!(
        log.contains("::warning title=Not published to the cache"),
        "the run's page says why: {log}"
    );
    rig.gh.with(|s| {
        assert!(
            s.completed.iter().all(|(_, r, _)| r == "succeeded"),
            "{:?}",
            s.completed
        );
    });
}

#[test]
fn a_push_to_main_gets_a_push_token_a_fork_pr_does_not_and_nothing_remains() {
    if !privileged("credentials") {
        return;
    }
    let rig = Rig::new(&[("cred", "128Mi", 1)], "5s");
    rig.with_attic(
        "http://127.0.0.1:9",
        "push_token_to_jobs = true\ntoken_validity = \"1h\"\npublish = false\n",
    );
    let shared = common::shared_dir(rig.dir.path());
    rig.push_and_fork_pr_runs();
    let sockets = rig.dir.path().join("state/hook-sockets");
    let mut push = rig.job(0, &format!(
        "cat \"$XDG_CONFIG_HOME/attic/config.toml\" > {s}/a.toml; stat -c %a \"$XDG_CONFIG_HOME/attic/config.toml\" > {s}/a.mode; {agent} hook job-started > {s}/a.replay 2>&1; ls -A {sockets} | wc -l > {s}/a.others",
        s = shared.display(),
        agent = AGENT,
        sockets = sockets.display()
    ));
    push.env.insert("GITHUB_RUN_ID".into(), "101".into());
    push.env.insert("GITHUB_EVENT_NAME".into(), "push".into());
    push.env
        .insert("GITHUB_REF".into(), "refs/heads/main".into());
    let mut pr = rig.job(
        0,
        &format!(
            "echo \"xdg=${{XDG_CONFIG_HOME:-none}}\" > {}/b.txt",
            shared.display()
        ),
    );
    pr.env.insert("GITHUB_RUN_ID".into(), "102".into());
    pr.env
        .insert("GITHUB_EVENT_NAME".into(), "pull_request".into());
    pr.env
        .insert("GITHUB_REF".into(), "refs/pull/5/merge".into());
    rig.gh.push_job(push);
    rig.gh.push_job(pr);

    let agent = rig.start();
    rig.wait("both jobs", Duration::from_secs(60), |s| {
        s.completed.len() >= 2
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");

    // What the job logs say ("Set up runner").
    assert!(
        log.contains("push: allowed (push to main of tinyland/flywheel)"),
        "{log}"
    );
    assert!(
        log.contains("push: denied (pull_request from a fork)"),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "flywheel: lane {}, memory envelope 128.0 MiB",
            rig.lanes[0]
        )),
        "{log}"
    );
    assert!(
        log.contains("flywheel: cache http://127.0.0.1:9/tinyland"),
        "{log}"
    );
    assert!(
        log.contains("flywheel: fits: peak ") && log.contains(" of the 128.0 MiB envelope (")
            || log.contains("flywheel: peak memory unknown"),
        "the completed hook reports the peak: {log}"
    );

    // The trusted job got a push token in Attic's format, in a 0600 file only it can read.
    let cfg_text = std::fs::read_to_string(shared.join("a.toml"))
        .expect("the trusted job saw its attic config");
    let token = cfg_text
        .lines()
        .find_map(|l| l.strip_prefix("token = \""))
        .and_then(|t| t.strip_suffix('"'))
        .expect("a token")
        .to_owned();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_required_spec_claims(&["exp", "nbf", "sub"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(&hs256_secret()),
        &v,
    )
    .expect("verifies")
    .claims;
    assert_eq!(
        claims["https://jwt.attic.rs/v1"]["caches"],
        serde_json::json!({"tinyland": {"r": 1, "w": 1}})
    );
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["nbf"].as_u64().unwrap(),
        3600
    );
    assert!(
        claims["sub"]
            .as_str()
            .unwrap()
            .contains("tinyland/flywheel:run/101/1:runner/"),
        "{claims}"
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("a.mode"))
            .unwrap()
            .trim(),
        "600"
    );
    // No second answer, and no other runner's socket in sight.
    assert!(std::fs::read_to_string(shared.join("a.replay"))
        .unwrap()
        .contains("already answered"));
    assert_eq!(
        std::fs::read_to_string(shared.join("a.others"))
            .unwrap()
            .trim(),
        "0"
    );
    // The pull request got nothing.
    assert_eq!(
        std::fs::read_to_string(shared.join("b.txt"))
            .unwrap()
            .trim(),
        "xdg=none"
    );

    // Residue: the token is nowhere but in the copy the test made.
    assert!(!log.contains(&token), "the token reached the agent's log");
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(env) = std::fs::read(e.path().join("environ")) {
            assert!(
                !String::from_utf8_lossy(&env).contains(&token),
                "the token is in {}/environ",
                e.path().display()
            );
        }
    }
    let (cgroups, dirs) = rig.leftovers();
    assert!(
        cgroups.is_empty() && dirs.is_empty(),
        "{cgroups:?} {dirs:?}"
    );
    for d in ["state/netrc", "state/hook-sockets"] {
        let left: Vec<_> = std::fs::read_dir(rig.dir.path().join(d))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{d}: {left:?}");
    }
}

#[test]
fn on_a_private_cache_an_untrusted_job_gets_a_pull_only_token_its_steps_cannot_read() {
    if !privileged("credentials-private") {
        return;
    }
    let rig = Rig::new(&[("priv", "128Mi", 1)], "5s");
    rig.with_attic("http://attic.test:8080", "public = false\n");
    let shared = common::shared_dir(rig.dir.path());
    rig.gh.with(|s| {
        s.runs.push(fake_github::FakeRun {
            repository: "tinyland/flywheel".into(),
            repository_id: 10,
            default_branch: "main".into(),
            id: 201,
            run_attempt: 1,
            event: "pull_request".into(),
            head_branch: "feature".into(),
            head_sha: format!("{:040x}", 201),
            head_repository: "tinyland/flywheel".into(),
            head_repository_id: 10,
            jobs: Vec::new(),
        })
    });
    let netrc_dir = rig.dir.path().join("state/netrc");
    let mut pr = rig.job(
        0,
        &format!(
            "cat {}/* > {s}/read.txt 2>&1 || echo denied >> {s}/read.txt; touch {s}/ready; sleep 2",
            netrc_dir.display(),
            s = shared.display()
        ),
    );
    pr.env.insert("GITHUB_RUN_ID".into(), "201".into());
    pr.env
        .insert("GITHUB_EVENT_NAME".into(), "pull_request".into());
    pr.env
        .insert("GITHUB_REF".into(), "refs/pull/7/merge".into());
    rig.gh.push_job(pr);
    let agent = rig.start();
    let t = Instant::now();
    while !shared.join("ready").exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "{}", rig.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // While the job runs, its daemon's netrc holds a pull-only token.
    let netrc: String = std::fs::read_dir(&netrc_dir)
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(
        netrc.starts_with("machine attic.test\npassword "),
        "{netrc:?}"
    );
    let token = netrc
        .lines()
        .nth(1)
        .unwrap()
        .trim_start_matches("password ")
        .to_owned();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_required_spec_claims(&["exp"]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(&hs256_secret()),
        &v,
    )
    .unwrap()
    .claims;
    assert_eq!(
        claims["https://jwt.attic.rs/v1"]["caches"],
        serde_json::json!({"tinyland": {"r": 1}}),
        "pull only"
    );
    let read = std::fs::read_to_string(shared.join("read.txt")).unwrap();
    assert!(
        read.contains("denied") && !read.contains(&token),
        "the job's steps cannot read the netrc: {read}"
    );
    rig.wait("the job", Duration::from_secs(30), |s| {
        !s.completed.is_empty()
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("push: denied (pull_request)"), "{log}");
    assert!(!log.contains(&token));
    assert_eq!(
        std::fs::read_dir(&netrc_dir).unwrap().count(),
        0,
        "the netrc is gone after the job"
    );
}

#[test]
fn under_kubernetes_logs_are_json_lines_carrying_lane_runner_and_job() {
    if !privileged("json-logs") {
        return;
    }
    let rig = Rig::new(&[("json", "128Mi", 1)], "5s");
    rig.gh.push_job(rig.job(0, "echo hello-from-the-job"));
    // No --log-format and no FLYWHEEL_LOG_FORMAT: detected from the pod's environment.
    let log = std::fs::File::create(rig.log_path()).expect("log");
    let agent = Command::new(AGENT)
        .args(["run", "--config"])
        .arg(&rig.config)
        .env("KUBERNETES_SERVICE_HOST", "10.0.0.1")
        .env_remove("FLYWHEEL_LOG_FORMAT")
        .env("FLYWHEEL_LOG", "info")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start");
    rig.wait("the job", Duration::from_secs(30), |s| {
        !s.completed.is_empty()
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, text) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{text}");
    let mut job_lines = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string(),
            "{line}"
        );
        if line.contains("hello-from-the-job") {
            let span = &v["span"];
            assert_eq!(span["lane"], rig.lanes[0].as_str(), "{line}");
            assert!(
                span["runner"]
                    .as_str()
                    .is_some_and(|r| r.starts_with(&rig.prefix)),
                "{line}"
            );
            assert!(
                span["job"]
                    .as_str()
                    .is_some_and(|j| j.starts_with(&rig.lanes[0])),
                "{line}"
            );
            job_lines += 1;
        }
    }
    assert_eq!(job_lines, 1, "the job's output line: {text}");
}

#[test]
fn a_job_that_hits_its_process_limit_gets_a_warning_and_a_summary() {
    if !privileged("pids-annotation") {
        return;
    }
    let rig = Rig::new(&[("pids", "256Mi", 1)], "5s");
    // More processes than the lane's pids_max (1024) at once: forks are refused.
    rig.gh.push_job(rig.job(
        0,
        "set +e; for i in $(seq 1200); do sleep 3 & done 2>/dev/null; wait; true",
    ));
    let agent = rig.start();
    rig.wait("the job", Duration::from_secs(60), |s| {
        !s.completed.is_empty()
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("::warning title=Process limit reached on lane ")
            && log.contains("hit its process limit of 1024"),
        "{log}"
    );
    let summary = rig.gh.with(|s| s.summaries.values().next().cloned());
    let summary = summary.expect("the runner uploaded the job summary");
    assert!(
        summary.contains("> [!WARNING]") && summary.contains("process limit of 1024"),
        "{summary}"
    );
    assert!(summary.contains("xychart-beta"), "{summary}");
}

#[test]
fn a_process_the_job_left_behind_does_not_hold_the_runner_up() {
    if !privileged("run-leftover-process") {
        return;
    }
    let rig = Rig::new(&[("bg", "128Mi", 1)], "5s");
    // The background `sleep` keeps the listener's stdout open after the job and the listener
    // have ended: the agent must still tear the runner down and bring up the next one.
    rig.gh.push_job(rig.job(0, "sleep 317 & echo bg-started"));
    let agent = rig.start();
    rig.wait("the job completed", Duration::from_secs(30), |s| {
        s.completed.len() == 1
    });
    rig.wait("the next runner registered", Duration::from_secs(30), |s| {
        s.registrations.len() >= 2 && !s.runners.is_empty()
    });
    assert!(rig.log().contains("bg-started"), "{}", rig.log());
    let left = common::processes_with("sleep 317");
    assert!(left.is_empty(), "the job's leftover was killed: {left:?}");
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
}

#[test]
fn a_listener_that_exits_1_at_once_is_retried_with_backoff_and_leaks_nothing() {
    if !privileged("run-listener-crash-loop") {
        return;
    }
    let rig = Rig::new(&[("crash", "128Mi", 2)], "5s");
    // A broken runner installation: every listener exits 1 before it does anything.
    let listener = rig.dir.path().join("install/bin/Runner.Listener");
    std::fs::write(
        &listener,
        "#!/bin/sh\necho 'listener: broken install' >&2\nexit 1\n",
    )
    .expect("write");
    let mut agent = rig.start();
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        agent.try_wait().expect("wait").is_none(),
        "the agent stays up: {}",
        rig.log()
    );
    let log = rig.log();
    // It tried, failed, and backed off: a few registrations in 6 s, not a tight loop.
    let regs = rig.gh.with(|s| s.registrations.len());
    eprintln!("{regs} registrations in 6 s");
    assert!(regs >= 3, "it kept trying: {regs}\n{log}");
    assert!(
        regs <= 24,
        "{regs} registrations in 6 s is a tight loop\n{log}"
    );
    assert!(log.contains("backing off"), "the operator is told: {log}");
    assert!(log.contains("listener: broken install"), "{log}");
    // Nothing leaks: GitHub holds at most the lane's runners, no job cgroup or root is left
    // beyond the runners alive now.
    rig.gh.with(|s| {
        assert!(s.runners.len() <= 2, "{:?}", s.runners);
        assert!(s.completed.is_empty(), "{:?}", s.completed);
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    rig.gh.with(|s| {
        assert!(
            s.runners.is_empty(),
            "deleted on the way out: {:?}",
            s.runners
        )
    });
    let (cgroups, dirs) = rig.leftovers();
    assert!(
        cgroups.is_empty() && dirs.is_empty(),
        "{cgroups:?} {dirs:?}"
    );
}

#[test]
fn a_slow_github_during_the_drain_does_not_starve_the_watchdog() {
    if !privileged("drain-slow-github") {
        return;
    }
    let rig = Rig::new(&[("slowgh", "128Mi", 2)], "30s");
    let sock_path = rig.dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("bind");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let agent = rig.start_with(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ]);
    rig.wait("both runners registered", Duration::from_secs(30), |s| {
        s.runners.len() == 2
    });
    std::thread::sleep(Duration::from_millis(500));
    // GitHub takes 3 s for each delete of the drain's idle runners.
    for _ in 0..2 {
        rig.gh.inject(fake_github::Injection {
            endpoint: "delete-runner",
            status: 204,
            delay_ms: 3000,
            apply: true,
            ..fake_github::Injection::default()
        });
    }
    let mut buf = [0u8; 512];
    while sock.recv(&mut buf).is_ok() {}
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let t = Instant::now();
    let mut pings = 0;
    while t.elapsed() < Duration::from_millis(2500) {
        if let Ok(n) = sock.recv(&mut buf) {
            pings += usize::from(String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1"));
        }
    }
    // The deletes were in flight the whole time (the drain ends only after them).
    assert!(
        rig.gh.with(|s| s.runners.len()) == 2,
        "the deletes had not answered yet"
    );
    assert!(
        pings >= 3,
        "the pool loop kept turning while GitHub was slow: {pings} pings in 2.5 s\n{}",
        rig.log()
    );
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(
        rig.gh.with(|s| s.runners.is_empty()),
        "both idle runners deleted"
    );
}

#[test]
fn a_job_that_prints_bytes_that_are_not_utf8_keeps_its_log() {
    if !privileged("run-binary-output") {
        return;
    }
    let rig = Rig::new(&[("bin", "128Mi", 1)], "5s");
    // A build tool's binary output and a 300 kB line, then more lines: the log goes on (the
    // long line in 64 KiB pieces), the job finishes.
    rig.gh.push_job(rig.job(
        0,
        "printf 'before\\n\\377\\376 binary\\n'; head -c 300000 /dev/zero | tr '\\0' x; echo; sleep 0.3; echo after-binary",
    ));
    let agent = rig.start();
    rig.wait("the job completed", Duration::from_secs(30), |s| {
        !s.completed.is_empty()
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("after-binary") && log.contains("\u{fffd}\u{fffd} binary"),
        "the lines after the binary ones reached the log: {log}"
    );
    let longest = log
        .lines()
        .flat_map(|l| l.split(|c| c != 'x').map(str::len))
        .max()
        .unwrap_or(0);
    assert!(
        longest > 60_000 && longest <= 64 << 10,
        "the long line was logged in pieces of at most 64 KiB: {longest}"
    );
    rig.gh.with(|s| {
        assert_eq!(
            s.completed.first().map(|c| c.1.as_str()),
            Some("succeeded"),
            "{:?}",
            s.completed
        )
    });
}
