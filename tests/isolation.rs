//! Jobs that share a host cannot reach each other, and no job becomes root.
//!
//! Every attack runs from a hostile job **while** its victim is busy, and is first shown to have
//! run (the attacker's own record of what it tried, the victim waiting for it) before the test
//! asserts that it failed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::rig::{term, wait_exit, Rig};
use common::{privileged, stderr, stdout, Fixture};

use common::section;

fn wait_for(path: &Path, rig: &Rig, secs: u64) {
    common::wait_for_file(path, secs, || rig.log());
}

/// The agent's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_hostile_pull_request_cannot_reach_the_trusted_push_job_running_beside_it() {
    if !privileged("isolation-concurrent") {
        return;
    }
    let rig = Rig::new(&[("iso", "256Mi", 2)], "5s");
    // The trusted job holds a push token (opted in), the thing worth stealing.
    rig.with_attic(
        "http://127.0.0.1:9",
        "push_token_to_jobs = true\npublish = false\n",
    );
    let shared = common::shared_dir(rig.dir.path());
    let s = shared.display().to_string();
    rig.push_and_fork_pr_runs();
    let state = rig.dir.path().join("state");
    let work_root = rig.dir.path().join("work/iso");
    let attack = common::attacker();

    // The trusted job: it publishes where it is and what it got, then stays busy until the
    // attacker says it is done. Its hook runs while the attacker floods the agent.
    let mut push = rig.job(
        0,
        &format!(
            r#"echo $PPID > {s}/victim.pid
echo "$GITHUB_WORKSPACE" > {s}/victim.ws
cp "$XDG_CONFIG_HOME/attic/config.toml" {s}/victim.toml
echo victim-home-secret > "$HOME/.victim-home"
echo victim-tmp-secret > /tmp/victim-tmp
mkdir -p ../../keep && echo kept > ../../keep/file
touch {s}/victim.running
for i in $(seq 600); do [ -e {s}/attacked ] && break; sleep 0.1; done
echo "victim still sees: $(cat ../../keep/file)" > {s}/victim.after"#
        ),
    );
    push.env.insert("GITHUB_RUN_ID".into(), "101".into());
    push.env.insert("GITHUB_EVENT_NAME".into(), "push".into());
    push.env
        .insert("GITHUB_REF".into(), "refs/heads/main".into());
    // The flood is under way before the trusted job's hook runs.
    push.delay_ms = 2500;

    let mut pr = rig.job(
        0,
        &format!(
            r#"set +e
{attack} flood "$FLYWHEEL_HOOK_SOCKET" 512 > {s}/flood.txt 2>&1
{attack} idle "$FLYWHEEL_HOOK_SOCKET" 600 6 > {s}/idle.txt 2>&1 &
touch {s}/flooding
for i in $(seq 600); do [ -e {s}/victim.running ] && break; sleep 0.1; done
VPID=$(cat {s}/victim.pid)
WS=$(cat {s}/victim.ws)
VROOT=${{WS%/_work/*}}
{{
echo "attacker uid $(id -u) attacks pid $VPID root $VROOT while it runs: $(test -e {s}/victim.running && echo yes)"
echo "== credentials"; cat "$VROOT/.credentials"
echo "== attic config"; cat "$VROOT/.flywheel-xdg/attic/config.toml"
echo "== runner root"; ls -A "$VROOT"
echo "== victim home"; cat "$VROOT/home/.victim-home"
echo "== victim tmp"; cat /tmp/victim-tmp
echo "== environ"; cat /proc/$VPID/environ
echo "== proc root"; ls /proc/$VPID/root/
echo "== proc list"; ls /proc | grep -c '^[0-9]'; ls -l /proc/$VPID
echo "== ptrace"; {attack} ptrace $VPID
echo "== sockets"; echo "other runners' sockets: $(ls -A {state}/hook-sockets | wc -l)"
echo "== hook through proc root"; {attack} hook /proc/$VPID/root{state}/hook/socket
echo "== symlink in work root"; ln -s /etc {work}/planted
echo "== symlink in victim work"; ln -s / "$VROOT/_work/escape"; rm -rf "$VROOT/_work/keep"
echo "== signal"; kill -STOP $VPID
echo "== sudo"; sudo -n id -u
echo "== end"
}} > {s}/attack.log 2>&1
wait
touch {s}/attacked"#,
            attack = attack.display(),
            state = state.display(),
            work = work_root.display(),
        ),
    );
    pr.env.insert("GITHUB_RUN_ID".into(), "102".into());
    pr.env
        .insert("GITHUB_EVENT_NAME".into(), "pull_request".into());
    pr.env
        .insert("GITHUB_REF".into(), "refs/pull/5/merge".into());
    // Registration order decides which runner takes which job: the attacker's first, so it is
    // flooding before the victim's delayed job starts.
    rig.gh.push_job(pr);
    rig.gh.push_job(push);

    let agent = rig.start();
    let agent_pid = agent.id();
    wait_for(&shared.join("attacked"), &rig, 90);
    let peak_kib = peak_rss_kib(agent_pid);
    rig.wait("both jobs", Duration::from_secs(60), |st| {
        st.completed.len() >= 2
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");

    let attack_log = std::fs::read_to_string(shared.join("attack.log")).unwrap();
    // The attack ran while the victim was busy.
    assert!(
        attack_log.contains("while it runs: yes")
            && std::fs::read_to_string(shared.join("victim.after"))
                .unwrap()
                .contains("victim still sees: kept"),
        "{attack_log}"
    );
    let victim_toml = std::fs::read_to_string(shared.join("victim.toml")).unwrap();
    let token = victim_toml
        .lines()
        .find_map(|l| l.strip_prefix("token = \""))
        .and_then(|t| t.strip_suffix('"'))
        .expect("the trusted job got its push token despite the flood")
        .to_owned();
    assert!(
        !attack_log.contains(&token),
        "the attacker read the push token:\n{attack_log}"
    );
    // Files of the other job: the runner root is another user's, mode 0700.
    for what in [
        "credentials",
        "attic config",
        "runner root",
        "victim home",
        "symlink in victim work",
    ] {
        assert!(
            section(&attack_log, what).contains("Permission denied"),
            "{what}: {attack_log}"
        );
    }
    // /tmp is the job's own.
    assert!(
        section(&attack_log, "victim tmp").contains("No such file"),
        "{attack_log}"
    );
    // The other job's processes are invisible, not just unreadable.
    for what in ["environ", "proc root"] {
        assert!(
            section(&attack_log, what).contains("No such file"),
            "{what}: {attack_log}"
        );
    }
    let proc_list = section(&attack_log, "proc list");
    let own: u32 = proc_list.lines().next().unwrap().trim().parse().unwrap();
    assert!(
        own < 20 && proc_list.contains("No such file"),
        "the attacker sees only its own processes: {proc_list}"
    );
    assert!(
        section(&attack_log, "ptrace").contains("Operation not permitted"),
        "{attack_log}"
    );
    assert!(
        section(&attack_log, "signal").contains("Operation not permitted"),
        "{attack_log}"
    );
    // Other runners' hook sockets are hidden, and /proc/<pid>/root is closed.
    assert_eq!(
        section(&attack_log, "sockets").trim(),
        "other runners' sockets: 0",
        "{attack_log}"
    );
    assert!(
        section(&attack_log, "hook through proc root").contains("connect:"),
        "{attack_log}"
    );
    // No symlink where root works.
    assert!(
        section(&attack_log, "symlink in work root").contains("Permission denied"),
        "{attack_log}"
    );
    assert!(!work_root.join("planted").exists());
    // No way up to root.
    assert!(
        !section(&attack_log, "sudo")
            .lines()
            .any(|l| l.trim() == "0"),
        "{attack_log}"
    );

    // The flood: the agent read at most 16 KiB of 512 MiB, held at most 4 connections, and
    // stayed small; the trusted job's hook was answered (its token above) without delay.
    let flood = std::fs::read_to_string(shared.join("flood.txt")).unwrap();
    let sent: u64 = flood
        .split("sent ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{flood}"));
    assert!(sent < 64 << 20, "{flood}");
    assert!(flood.contains("at most 16384 bytes"), "{flood}");
    let idle = std::fs::read_to_string(shared.join("idle.txt")).unwrap();
    assert!(idle.contains("opened 600"), "the attack ran: {idle}");
    assert!(
        peak_kib < 64 * 1024,
        "the agent's peak RSS was {peak_kib} KiB during the flood"
    );
    assert!(
        log.contains("too many hook connections at once; closed the excess")
            && log.matches("too many hook connections").count() < 20,
        "the agent closed the excess connections, and said so in a few lines: {log}"
    );
    let hook_ms = hook_latency_ms(&log, "push: allowed");
    assert!(
        hook_ms < 2000,
        "the trusted job's hook took {hook_ms} ms during the flood:\n{log}"
    );
    eprintln!("trusted hook answered in {hook_ms} ms during the flood; agent peak RSS {peak_kib} KiB; flood: {flood}; idle: {idle}");

    assert!(log.contains("push: allowed (push to main of tinyland/flywheel)"));
    assert!(log.contains("push: denied (pull_request from a fork)"));
    let (cgroups, dirs) = rig.leftovers();
    assert!(
        cgroups.is_empty() && dirs.is_empty(),
        "{cgroups:?} {dirs:?}"
    );
}

/// Milliseconds from the fake listener's "Running job" line to the hook line containing
/// `marker`, for the runner whose hook printed it (text log: `runner=NAME` in each line).
fn hook_latency_ms(log: &str, marker: &str) -> u64 {
    let ts = |line: &str| -> u64 {
        // 2026-12-01T15:06:11.439145Z
        let t = line.split_whitespace().next().unwrap_or_default();
        let hms = t
            .split('T')
            .nth(1)
            .unwrap_or_default()
            .trim_end_matches('Z');
        let mut it = hms.split(':');
        let (h, m, s): (f64, f64, f64) = (
            it.next().unwrap_or("0").parse().unwrap_or(0.0),
            it.next().unwrap_or("0").parse().unwrap_or(0.0),
            it.next().unwrap_or("0").parse().unwrap_or(0.0),
        );
        ((h * 3600.0 + m * 60.0 + s) * 1000.0) as u64
    };
    let runner_of = |line: &str| -> Option<String> {
        let i = line.find("runner=")? + "runner=".len();
        Some(line[i..].split_whitespace().next()?.to_owned())
    };
    let end = log
        .lines()
        .find(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} in the log:\n{log}"));
    let runner = runner_of(end).unwrap_or_else(|| panic!("no runner in {end:?}"));
    let start = log
        .lines()
        .find(|l| l.contains("Running job") && runner_of(l).as_deref() == Some(&runner))
        .unwrap_or_else(|| panic!("no Running job line of {runner}"));
    ts(end).saturating_sub(ts(start))
}

#[test]
fn a_caller_outside_the_runners_job_is_refused_and_does_not_use_up_its_answer() {
    if !privileged("isolation-hook-peer") {
        return;
    }
    let rig = Rig::new(&[("peer", "128Mi", 1)], "5s");
    let shared = common::shared_dir(rig.dir.path());
    let mut job = rig.job(0, &format!("echo started > {}/done", shared.display()));
    // The job arrives late: the test calls the runner's hook socket first.
    job.delay_ms = 3000;
    rig.gh.push_job(job);
    let agent = rig.start();
    let sockets = rig.dir.path().join("state/hook-sockets");
    let t = Instant::now();
    let socket = loop {
        let found = std::fs::read_dir(&sockets)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("socket"))
            .find(|p| p.exists());
        if let Some(s) = found {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{}", rig.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    // The test process: root, but not in the runner's job cgroup.
    let o = Command::new(common::attacker())
        .arg("hook")
        .arg(&socket)
        .output()
        .unwrap();
    let said = stdout(&o);
    assert!(
        said.contains("answer") && said.contains("not a process of this runner's job"),
        "the call ran and was refused: {said}"
    );
    rig.wait("the job", Duration::from_secs(30), |s| {
        !s.completed.is_empty()
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("refused a hook connection from outside this runner's job"),
        "{log}"
    );
    // The job's own hook was answered afterwards: its one answer was not used up.
    assert!(log.contains("flywheel: lane "), "{log}");
    assert!(!log.contains("already answered"), "{log}");
}

#[test]
fn a_user_with_sudo_rights_cannot_become_root_inside_a_job() {
    if !privileged("isolation-sudo") {
        return;
    }
    let sudo = Path::new("/usr/bin/sudo");
    assert!(
        sudo.exists(),
        "sudo is missing: install it (apt-get install sudo); .ci/run does"
    );
    // A throwaway user in group sudo, with sudoers rights of its own as well.
    let user = "fwt-sudo";
    if nix::unistd::User::from_name(user).unwrap().is_none() {
        let st = Command::new("useradd")
            .args([
                "--system",
                "--user-group",
                "--groups",
                "sudo",
                "--shell",
                "/bin/sh",
                user,
            ])
            .status()
            .unwrap();
        assert!(st.success() || st.code() == Some(9));
    }
    std::fs::write(
        "/etc/sudoers.d/fwt-sudo",
        format!("{user} ALL=(ALL:ALL) NOPASSWD:ALL\n"),
    )
    .unwrap();
    // Outside the agent the rights are real: the attack would work.
    let direct = Command::new("runuser")
        .args(["-u", user, "--", "sudo", "-n", "id", "-u"])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&direct).trim(),
        "0",
        "the throwaway user can become root outside a job: {}",
        stderr(&direct)
    );
    let f = Fixture::new("sudo", "128Mi", "");
    let o = f.exec(
        &["--user", user],
        &[
            "sh",
            "-c",
            "id -G; grep NoNewPrivs /proc/self/status; sudo -n id -u; echo sudo-exit=$?",
        ],
    );
    let out = stdout(&o);
    let err = stderr(&o);
    let _ = std::fs::remove_file("/etc/sudoers.d/fwt-sudo");
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    // sudo ran, and did not make anyone root.
    assert!(err.contains("sudo:"), "sudo ran: {out}{err}");
    assert!(out.contains("sudo-exit=1"), "{out}{err}");
    assert!(!out.lines().any(|l| l.trim() == "0"), "{out}{err}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    let sudo_gid = nix::unistd::Group::from_name("sudo").unwrap().unwrap().gid;
    let groups = out.lines().next().unwrap();
    assert!(
        !groups.split_whitespace().any(|g| g == sudo_gid.to_string()),
        "the job kept group sudo: {groups}"
    );
    // And root itself is refused outright.
    let o = f.exec(&["--user", "root"], &["id", "-u"]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains("is root (uid 0)"), "{}", stderr(&o));
}

#[test]
fn a_tag_named_like_the_default_branch_is_told_apart_by_githubs_answer() {
    if !privileged("isolation-tag") {
        return;
    }
    let rig = Rig::new(&[("tag", "128Mi", 1)], "5s");
    rig.with_attic("http://127.0.0.1:9", "");
    let shared = common::shared_dir(rig.dir.path());
    // A push of the tag `main`: GitHub's run says head_branch "main", like a branch push.
    let tag_commit = "7a9".repeat(13) + "7";
    rig.gh.with(|st| {
        st.runs.push(fake_github::FakeRun {
            repository: "tinyland/flywheel".into(),
            repository_id: 10,
            default_branch: "main".into(),
            id: 301,
            run_attempt: 1,
            event: "push".into(),
            head_branch: "main".into(),
            head_sha: tag_commit.clone(),
            head_repository: "tinyland/flywheel".into(),
            head_repository_id: 10,
            jobs: Vec::new(),
        });
        st.branches.insert(
            ("tinyland/flywheel".into(), "main".into()),
            vec![format!("{:040x}", 1), format!("{:040x}", 2)],
        );
    });
    // The job's environment even claims the branch.
    let mut job = rig.job(
        0,
        &format!(
            "echo \"xdg=${{XDG_CONFIG_HOME:-none}}\" > {}/tag.txt",
            shared.display()
        ),
    );
    job.env.insert("GITHUB_RUN_ID".into(), "301".into());
    job.env.insert("GITHUB_EVENT_NAME".into(), "push".into());
    job.env
        .insert("GITHUB_REF".into(), "refs/heads/main".into());
    rig.gh.push_job(job);
    let agent = rig.start();
    rig.wait("the job", Duration::from_secs(30), |st| {
        !st.completed.is_empty()
    });
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    // GitHub was asked about the commit, and its answer made the job read-only.
    rig.gh.with(|st| assert_eq!(st.count("compare-commits"), 1));
    assert!(
        log.contains("push: denied (push of commit 7a97a97, which is not on main: a tag or another ref named like the default branch)"),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(shared.join("tag.txt"))
            .unwrap()
            .trim(),
        "xdg=none"
    );
}

/// One run of the network attack: a trusted job serving on its loopback and on every address,
/// and beside it a hostile job trying to reach that, the agent's `/metrics`, a service on the
/// host's loopback and a link-local address; both try the "internet". Returns the attacker's
/// record, what the trusted job reached, and the job links the agent logged.
fn network_attack(
    network: &str,
    net: &common::netns::Internet,
    metrics: &str,
    host_service: &str,
) -> (String, String, Vec<String>) {
    let isolated = network == "isolated";
    let lane_extra = if isolated {
        // The test's DNS server: the host's resolver is not the test's to send queries to.
        format!("network = \"isolated\"\ndns = [\"{}\"]", net.remote)
    } else {
        "network = \"host\"".to_owned()
    };
    let f = Fixture::new("net", "128Mi", &lane_extra);
    let shared = common::shared_dir(f.dir.path());
    let s = shared.display();
    let a = common::attacker();
    let a = a.display();
    let pool = common::runner_pool();
    let (trusted_user, hostile_user) = (pool.replace("{n}", "10"), pool.replace("{n}", "11"));
    let by_name = |what: &str| {
        if isolated {
            format!(
                "echo '== {what} by name'; {a} connect {}:{}",
                common::netns::NAME,
                common::netns::PORT
            )
        } else {
            // With the host's network the name would go to the host's resolver: not tried.
            "true".to_owned()
        }
    };
    let trusted = format!(
        r#"{a} serve 127.0.0.1:0 trusted-loopback {s}/port.loopback & P1=$!
{a} serve 0.0.0.0:0 trusted-any {s}/port.any & P2=$!
for i in $(seq 100); do [ -e {s}/port.loopback ] && [ -e {s}/port.any ] && break; sleep 0.05; done
{a} source {server} > {s}/trusted.addr
{{ echo '== remote by address'; {a} connect {server}; {by_name}; }} > {s}/trusted.out 2>&1
sleep 0.3; touch {s}/trusted.ready
for i in $(seq 300); do [ -e {s}/attacked ] && break; sleep 0.1; done
kill $P1 $P2"#,
        server = net.server(),
        by_name = by_name("remote"),
    );
    let hostile = format!(
        r#"for i in $(seq 300); do [ -e {s}/trusted.ready ] && break; sleep 0.1; done
T=$(cat {s}/trusted.addr); PL=$(cat {s}/port.loopback); PA=$(cat {s}/port.any)
{{
echo "hostile job at $({a} source {server}) attacks $T while it runs: $(test -e {s}/trusted.ready && echo yes)"
echo '== trusted loopback'; {a} connect 127.0.0.1:$PL
echo "== trusted on the host's address"; {a} connect {host}:$PA
echo '== trusted on its own address'; {a} connect $T:$PA
echo '== agent metrics'; {a} connect {metrics}
echo "== host loopback service"; {a} connect {host_service}
echo '== link-local'; {a} connect {link_local}:{port}
echo '== remote by address'; {a} connect {server}
{by_name}
echo '== end'
}} > {s}/attack.log 2>&1
touch {s}/attacked"#,
        server = net.server(),
        host = net.host,
        link_local = net.link_local,
        port = common::netns::PORT,
        by_name = by_name("remote"),
    );
    let mut t = f
        .exec_cmd(&["--user", &trusted_user], &["sh", "-c", &trusted])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let h = f
        .exec(&["--user", &hostile_user], &["sh", "-c", &hostile])
        .clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    while t.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the trusted job did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = t.wait_with_output().unwrap();
    assert_eq!(h.status.code(), Some(0), "{}", stderr(&h));
    assert_eq!(t.status.code(), Some(0), "{}", stderr(&t));
    let links = [stderr(&t), stderr(&h)]
        .iter()
        .filter_map(|l| {
            let i = l.find("link=")? + "link=".len();
            Some(l[i..].split_whitespace().next()?.to_owned())
        })
        .collect();
    (
        std::fs::read_to_string(shared.join("attack.log")).unwrap(),
        std::fs::read_to_string(shared.join("trusted.out")).unwrap(),
        links,
    )
}

#[test]
fn a_pull_request_job_reaches_the_internet_but_nothing_of_the_host_or_the_job_beside_it() {
    if !privileged("isolation-network") {
        return;
    }
    let net = common::netns::Internet::new();
    // A service on the host's loopback (a local cache's admin port, a test database).
    let svc = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host_service = svc.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        use std::io::Write;
        for mut c in svc.incoming().flatten() {
            let _ = writeln!(c, "host-loopback-secret");
        }
    });
    // The agent's /metrics (a `run` agent of its own, on the host's loopback).
    let rig = Rig::new(&[("metrics", "128Mi", 1)], "5s");
    let agent = rig.start();
    let t0 = Instant::now();
    let metrics = loop {
        if let Some(a) = common::metrics_address(&rig.log()) {
            break a;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", rig.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    let attacks = [
        ("trusted loopback", "trusted-loopback"),
        ("trusted on the host's address", "trusted-any"),
        ("trusted on its own address", "trusted-any"),
        ("agent metrics", "HTTP/1.0 200"),
        ("host loopback service", "host-loopback-secret"),
        ("link-local", "remote-ok"),
    ];

    // Today's behaviour (the host's network): every attack works.
    let (log, trusted, _) = network_attack("host", &net, &metrics, &host_service);
    assert!(log.contains("while it runs: yes"), "{log}");
    for (what, answer) in attacks {
        assert!(
            section(&log, what).contains(&format!("got {answer}")),
            "with network = \"host\" the attack on {what} works:\n{log}"
        );
    }
    assert!(section(&trusted, "remote by address").contains("got remote-ok"));

    // A network namespace per job: every attack fails; the internet is still there.
    let (log, trusted, links) = network_attack("isolated", &net, &metrics, &host_service);
    assert!(log.contains("while it runs: yes"), "{log}");
    assert!(
        log.lines()
            .next()
            .unwrap()
            .contains("hostile job at 10.213."),
        "the hostile job sends from its own address: {log}"
    );
    for (what, _) in attacks {
        assert!(
            section(&log, what).contains("refused or unreachable"),
            "{what}:\n{log}"
        );
    }
    for (who, record) in [("hostile", &log), ("trusted", &trusted)] {
        for what in ["remote by address", "remote by name"] {
            assert!(
                section(record, what).contains("got remote-ok"),
                "the {who} job reaches the internet ({what}):\n{record}"
            );
        }
    }
    eprintln!("with a network namespace per job:\n{log}{trusted}");
    // Each job's veth pair went with its namespace.
    assert_eq!(links.len(), 2, "{links:?}");
    let t = Instant::now();
    for link in &links {
        while Path::new(&format!("/sys/class/net/{link}")).exists() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{link} outlived its job"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A lane that allows the link-local range (a cloud's metadata service) reaches it.
    let f = Fixture::new(
        "meta",
        "128Mi",
        &format!(
            "network = \"isolated\"\nallow_metadata = true\ndns = [\"{}\"]",
            net.remote
        ),
    );
    let o = f.exec(
        &["--user", &common::runner_pool().replace("{n}", "12")],
        &[
            &common::attacker().display().to_string(),
            "connect",
            &format!("{}:{}", net.link_local, common::netns::PORT),
        ],
    );
    assert!(
        stdout(&o).contains("got remote-ok"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, alog) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{alog}");
}

#[test]
fn a_runner_in_a_network_of_its_own_is_answered_by_its_hook_socket_and_reaches_out() {
    if !privileged("isolation-runner-network") {
        return;
    }
    let net = common::netns::Internet::new();
    let rig = Rig::new(&[("netr", "128Mi", 1)], "5s");
    let cfg = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        cfg.replace(
            "network = \"host\"",
            &format!("network = \"isolated\"\ndns = [\"{}\"]", net.remote),
        ),
    )
    .unwrap();
    let shared = common::shared_dir(rig.dir.path());
    let s = shared.display();
    let a = common::attacker();
    let a = a.display();
    // The listener itself cannot tell the fake GitHub (on the test's loopback) that it is busy
    // or done: the job's network is its own. Its hooks still reach the agent (a Unix socket).
    rig.gh.push_job(rig.job(
        0,
        &format!(
            "{a} source {server} > {s}/addr; {a} connect {server} > {s}/remote; {a} connect 127.0.0.1:9 >> {s}/remote; touch {s}/done",
            server = net.server()
        ),
    ));
    let agent = rig.start();
    wait_for(&shared.join("done"), &rig, 60);
    term(&agent, nix::sys::signal::Signal::SIGTERM);
    let (code, log) = wait_exit(&rig, agent, Duration::from_secs(30));
    assert_eq!(code, 0, "{log}");
    let addr = std::fs::read_to_string(shared.join("addr")).unwrap();
    assert!(addr.starts_with("10.213."), "{addr}");
    let remote = std::fs::read_to_string(shared.join("remote")).unwrap();
    assert!(remote.contains("got remote-ok"), "{remote}");
    assert!(remote.contains("refused or unreachable"), "{remote}");
    // The job-started hook was answered through the job's own namespace.
    assert!(log.contains("flywheel: lane "), "{log}");
    assert!(
        log.contains("the job's network namespace is linked"),
        "{log}"
    );
}
