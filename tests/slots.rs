//! Warm stores for ARC's one-pod-per-job: pods of a lane on one node reuse node-local slot
//! stores. Each "pod" is an agent in ARC mode in its own mount namespace with a pod-local
//! `/nix`, `/etc/nix`, state and work directory; all pods of the node share one slot volume.
//! Real Nix (Debian's nix-bin), real cgroups, the fake GitHub and the fake listener.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::nixtar::{shared_userpool, tarball, ACKNOWLEDGED, VERSION};
use common::rig::register_directly;
use common::{fake_listener, privileged, unique, AGENT};
use fake_github::{FakeGitHub, FakeJob};

/// One node: the fake GitHub, the runner installation, the shared slot volume.
struct Node {
    dir: tempfile::TempDir,
    gh: FakeGitHub,
    lane: String,
    slots: u32,
    /// Appended to the lane.
    lane_extra: String,
    pods: std::cell::Cell<u32>,
}

/// A pod: its agent and its directory (agent.log inside).
struct Pod {
    n: u32,
    dir: PathBuf,
    child: Child,
    /// The name of its own cgroups (`POD_CGROUP-<lane>-<n>`), removed when it has finished.
    cgroup: Option<String>,
}

/// A derivation every job of a test builds: the first job on a store builds it, later jobs on
/// the same store find it.
const BUILD: &str = r#"cat > slot-test.nix <<'EOF'
derivation { name = "slot-test"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo built > $out" ]; }
EOF
nix-build slot-test.nix --no-out-link > nix-build.txt 2>&1; rc=$?
cat nix-build.txt
echo "nix-build rc=$rc builds=$(grep -c 'will be built' nix-build.txt) fetches=$(grep -c 'will be fetched' nix-build.txt)"
"#;

impl Node {
    fn new(slots: u32) -> Node {
        let dir = common::open_tempdir("flywheel-node");
        let install = dir.path().join("install");
        std::fs::create_dir_all(install.join("bin")).unwrap();
        std::fs::copy(fake_listener(), install.join("bin/Runner.Listener")).unwrap();
        std::fs::create_dir(dir.path().join("slots")).unwrap();
        common::runner_pool();
        let _ = tarball();
        // Runs 101 (a push to main, trusted: its builds warm the slot) and 102 (a fork's pull
        // request, which writes only a throwaway layer).
        let gh = FakeGitHub::start();
        common::rig::push_and_fork_pr_runs(&gh);
        std::fs::write(dir.path().join("app.pem"), fake_github::app_key().0).unwrap();
        Node {
            dir,
            gh,
            lane: unique("arcslot"),
            slots,
            lane_extra: String::new(),
            pods: std::cell::Cell::new(0),
        }
    }

    fn slot_root(&self) -> PathBuf {
        self.dir.path().join("slots")
    }

    /// Start a pod whose job, a trusted push to main, runs `script` (after building the test
    /// derivation).
    fn start(&self, script: &str) -> Pod {
        self.start_as(("101", "push", "refs/heads/main"), script)
    }

    /// Start a pod whose job is a fork's pull request.
    fn start_pr(&self, script: &str) -> Pod {
        self.start_as(("102", "pull_request", "refs/pull/5/merge"), script)
    }

    /// Start a pod whose job is of run `run` (id, event, ref) and runs `script`.
    fn start_as(&self, run: (&str, &str, &str), script: &str) -> Pod {
        self.start_in(run, script, false)
    }

    /// Start a pod, in a PID namespace of its own when `own_pids` (as every pod under ARC is:
    /// its agent sees none of the other pods' processes).
    fn start_in(&self, run: (&str, &str, &str), script: &str, own_pids: bool) -> Pod {
        let n = self.pods.get();
        self.pods.set(n + 1);
        let pod = self.dir.path().join(format!("pod-{n}"));
        for d in ["nix", "etc-nix", "state", "work"] {
            std::fs::create_dir_all(pod.join(d)).unwrap();
        }
        let t = tarball();
        let p = |s: &str| pod.join(s).display().to_string();
        let config = pod.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"[agent]
state_dir = "{state}"
teardown_grace = "300ms"
stop_grace = "2s"
reserve = "64Mi"

[metrics]
listen = ""

[github]
api_url = "{api}"
scope = "org"
target = "tinyland"
app_id = "{app_id}"
private_key_file = "{app_key}"

[attic]
publish_repositories = ["tinyland/flywheel"]

[runner]
install_dir = "{install}"
user = "{user}"
drain_grace = "5s"

[nix]
tarball = "{tarball}"
sha256 = "{sha}"
version = "{VERSION}"
{ACKNOWLEDGED}
netrc_file = "{netrc}"
sandbox = false
substituters = []
trusted_public_keys = []
userpool = "{userpool}"

[[lane]]
name = "{lane}"
labels = ["{lane}"]
memory = "256Mi"
max_runners = 1
slots = {slots}
slot_root = "{slot_root}"
pids_max = 1024
min_free = "1Mi"
work_root = "{work}"
nix_conf = "{conf}"
network = "host"
{extra}
"#,
                state = p("state"),
                install = self.dir.path().join("install").display(),
                user = common::runner_pool(),
                tarball = t.path.display(),
                sha = t.sha256,
                netrc = p("etc-nix/netrc"),
                userpool = shared_userpool().display(),
                lane = self.lane,
                slots = self.slots,
                slot_root = self.slot_root().display(),
                work = p("work"),
                conf = p("etc-nix/nix.conf"),
                extra = self.lane_extra,
                api = self.gh.url,
                app_id = fake_github::APP_ID,
                app_key = self.dir.path().join("app.pem").display(),
            ),
        )
        .unwrap();
        self.gh.push_job(FakeJob {
            labels: vec![self.lane.clone()],
            script: format!("{BUILD}{script}"),
            env: [
                ("GITHUB_REPOSITORY", "tinyland/flywheel"),
                ("GITHUB_RUN_ID", run.0),
                ("GITHUB_RUN_ATTEMPT", "1"),
                ("GITHUB_EVENT_NAME", run.1),
                ("GITHUB_REF", run.2),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
            ..FakeJob::default()
        });
        let jit = register_directly(&self.gh, &self.lane, &format!("{}-pod-{n}", self.lane));
        let log = std::fs::File::create(pod.join("agent.log")).unwrap();
        // The pod: a mount namespace whose /nix is the pod's own (ARC's emptyDir).
        let pid_args: &[&str] = if own_pids {
            &["--pid", "--fork", "--mount-proc", "--kill-child"]
        } else {
            &[]
        };
        // A pod in a PID namespace of its own gets cgroups of its own too, as a container
        // does: its agent's job cgroups are made under them.
        let cg_name = own_pids.then(|| format!("{POD_CGROUP}-{}-{n}", self.lane));
        let cgroup = if let Some(name) = &cg_name {
            format!(
                r#"while IFS=: read -r _ c p; do case "$c" in memory|pids|freezer) d=/sys/fs/cgroup/$c$p ;; "") d=/sys/fs/cgroup/unified$p; [ -d /sys/fs/cgroup/unified ] || d=/sys/fs/cgroup$p ;; *) continue ;; esac; mkdir -p "$d/{name}" && echo 0 > "$d/{name}/cgroup.procs" || exit 1; done < /proc/self/cgroup && "#
            )
        } else {
            String::new()
        };
        let child = Command::new("unshare")
            .arg("-m")
            .args(pid_args)
            .args([
                "--",
                "sh",
                "-c",
                &format!(
                    "{cgroup}mount --make-rprivate / && mount --bind \"$0\" /nix && exec \"$@\""
                ),
            ])
            .arg(pod.join("nix"))
            .arg(AGENT)
            .args(["run", "--config"])
            .arg(&config)
            .env("ACTIONS_RUNNER_INPUT_JITCONFIG", jit)
            .env("FLYWHEEL_LANE", &self.lane)
            .env("FLYWHEEL_LOG", "info")
            .env("FLYWHEEL_LOG_FORMAT", "text")
            .env_remove("NIX_REMOTE")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Pod {
            n,
            dir: pod,
            child,
            cgroup: cg_name,
        }
    }
}

/// The cgroup a pod in a PID namespace of its own is moved to (`-<n>`), under the test's own.
const POD_CGROUP: &str = "flywheel-test-pod";

impl Pod {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Wait for the pod to end; its exit code and log.
    fn finish(mut self) -> (i32, String) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                if let Some(name) = &self.cgroup {
                    // Its agent's own cgroups (`flywheel-jobs`) first, then the pod's.
                    let _ = Command::new("find")
                        .args(["/sys/fs/cgroup", "-maxdepth", "8", "-depth", "-type", "d"])
                        .args(["-path", &format!("*/{name}*"), "-exec", "rmdir", "{}", ";"])
                        .status();
                }
                return (st.code().unwrap_or(-1), self.log());
            }
            if t.elapsed() > Duration::from_secs(120) {
                let _ = self.child.kill();
                panic!("pod {} did not end:\n{}", self.n, self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for(&self, what: &str) {
        let t = Instant::now();
        while !self.log().contains(what) {
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "pod {} never logged {what:?}:\n{}",
                self.n,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The slot a pod's job got, from its store line; `None` for a pod-local store.
fn slot_of(log: &str) -> Option<u32> {
    let line = log.lines().find(|l| l.contains("store: "))?;
    let i = line.find("node-local slot ")? + "node-local slot ".len();
    line[i..].split_whitespace().next()?.parse().ok()
}

fn builds(log: &str) -> &str {
    log.lines()
        .find_map(|l| {
            let i = l.find("nix-build rc=")?;
            Some(l[i..].split(" stream=").next().unwrap_or(&l[i..]))
        })
        .unwrap_or_else(|| panic!("the job never ran nix-build:\n{log}"))
}

#[test]
fn pods_reuse_node_local_slots_warm_and_never_share_one() {
    if !privileged("arc-slots") {
        return;
    }
    let node = Node::new(2);

    // The first pod: a cold slot, the derivation is built.
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("cold (empty)"), "{log}");
    assert!(log.contains("cold bootstrap"), "{log}");
    assert_eq!(builds(&log), "nix-build rc=0 builds=1 fetches=0", "{log}");
    let first = slot_of(&log).expect("a node-local slot");

    // The next pod gets the same (most recently used) slot, warm: nothing built or fetched.
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    assert_eq!(slot_of(&log), Some(first), "{log}");
    assert!(log.contains(": warm ("), "{log}");
    assert!(log.contains("nix 2.8.0-flywheel: warm"), "{log}");
    assert_eq!(builds(&log), "nix-build rc=0 builds=0 fetches=0", "{log}");
    // The job block shows it too (the job-started hook's lines).
    assert!(
        log.contains(&format!(
            "flywheel: store: node-local slot {first} of lane {}: warm",
            node.lane
        )),
        "{log}"
    );

    // Two pods at once get different slots; a third finds both busy and runs pod-local.
    let a = node.start("echo job-is-running; sleep 4");
    let b = node.start("echo job-is-running; sleep 4");
    a.wait_for("job-is-running");
    b.wait_for("job-is-running");
    // `status` (from inside any pod of the node) lists the slots, their stores and holders.
    let st = Command::new(AGENT)
        .args(["status", "--json", "--config"])
        .arg(a.dir.join("agent.toml"))
        .output()
        .unwrap();
    let st: serde_json::Value = serde_json::from_slice(&st.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&st.stderr)));
    let slots = st["lanes"][0]["slots"].as_array().unwrap();
    assert_eq!(slots.len(), 2, "{st}");
    for sl in slots {
        assert!(
            sl["holder"].as_str().is_some_and(|h| h.contains("pid")),
            "{st}"
        );
        assert!(sl["paths"].as_u64().unwrap() > 0, "{st}");
        assert!(sl["bytes"].as_u64().unwrap() > 0, "{st}");
    }
    let c = node.start("");
    let (code_c, log_c) = c.finish();
    let (code_a, log_a) = a.finish();
    let (code_b, log_b) = b.finish();
    assert_eq!((code_a, code_b, code_c), (0, 0, 0), "{log_a}{log_b}{log_c}");
    let (sa, sb) = (slot_of(&log_a), slot_of(&log_b));
    assert!(sa.is_some() && sb.is_some() && sa != sb, "{sa:?} {sb:?}");
    assert!(
        log_c.contains("all 2 node-local slots of lane") && log_c.contains("pod-local store"),
        "{log_c}"
    );
    assert_eq!(
        builds(&log_c),
        "nix-build rc=0 builds=1 fetches=0",
        "cold but correct: {log_c}"
    );
    node.gh.with(|s| {
        assert!(
            s.completed.iter().all(|(_, r, _)| r == "succeeded"),
            "{:?}",
            s.completed
        )
    });
}

#[test]
fn a_pod_killed_mid_job_frees_its_slot_and_the_next_pod_checks_and_reuses_it() {
    if !privileged("arc-slots-kill") {
        return;
    }
    let node = Node::new(1);
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    // A pod killed while its job runs (the node drains, the pod is evicted): its agent, the
    // listener, the job and the job's nix-daemon all die at once.
    let mut doomed = node.start("echo job-is-running; sleep 60");
    doomed.wait_for("job-is-running");
    let pid = doomed.child.id() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = doomed.child.wait();
    let mgr = flywheel_agent::cgroup::detect(Path::new("/sys/fs/cgroup"), None).unwrap();
    let mut killed = 0;
    for name in mgr.list().unwrap() {
        if name.starts_with(&format!("{}.", node.lane)) {
            mgr.open(&name).destroy(Duration::from_secs(10)).unwrap();
            killed += 1;
        }
    }
    assert_eq!(killed, 1, "the pod's job was running when it was killed");
    assert!(
        flywheel_agent::slot::holder(&node.slot_root(), 0).is_some(),
        "the killed pod left its holder marker"
    );

    // The next pod takes the slot (its lock died with its holder), checks it, reuses it warm.
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    assert_eq!(slot_of(&log), Some(0), "{log}");
    assert!(
        log.contains("its last holder died, the store was checked in"),
        "{log}"
    );
    assert!(log.contains(": warm ("), "{log}");
    assert_eq!(builds(&log), "nix-build rc=0 builds=0 fetches=0", "{log}");
    assert!(flywheel_agent::slot::holder(&node.slot_root(), 0).is_none());
}

/// Pods of a node share the slot volume but not their PID namespaces: a pod's startup sweep
/// never takes another pod's running job for a leftover (the pid in its name is nobody in this
/// pod), and it does clear what a dead pod left in a free slot, whichever slot that is.
#[test]
fn a_pods_startup_sweep_clears_free_slots_only_never_another_pods_running_job() {
    if !privileged("arc-slots-sweep") {
        return;
    }
    let node = Node::new(2);
    let shared = common::shared_dir(node.dir.path());
    let go = shared.join("go");
    // Pod A's job holds slot 0 until the test says go.
    let a = node.start(&format!(
        "echo job-a-is-running; i=0; while [ ! -e {g} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        g = go.display()
    ));
    a.wait_for("job-a-is-running");
    let work0 = flywheel_agent::slot::slot_dirs(&node.slot_root(), 0).1;
    let jobs_of = |work: &Path| -> Vec<String> {
        std::fs::read_dir(work)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{}.s", node.lane)))
            .collect()
    };
    let running = jobs_of(&work0);
    assert_eq!(
        running.len(),
        1,
        "pod A's job directory in slot 0: {running:?}"
    );
    // What a pod that died in slot 1 left: its job directory, its lock file and holder marker.
    let work1 = flywheel_agent::slot::slot_dirs(&node.slot_root(), 1).1;
    let left = work1.join(format!("{}.s1.4242.0123456789ab", node.lane));
    std::fs::create_dir_all(left.join("_work/repo")).unwrap();
    std::fs::write(left.join("_work/repo/file"), "left by a dead pod").unwrap();
    let locks = flywheel_agent::slot::locks_dir(&node.slot_root());
    std::fs::write(locks.join("slot-1.lock"), "").unwrap();
    std::fs::write(locks.join("slot-1.holder"), "pid 1 on a-dead-pod since 0").unwrap();
    // Pod B starts in a PID namespace of its own: pod A's agent is nobody there.
    let b = node.start_in(("101", "push", "refs/heads/main"), "", true);
    let (code, log) = b.finish();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("removed a job directory left by an earlier run")
            && log.contains(&left.display().to_string()),
        "pod B cleared slot 1's leftover: {log}"
    );
    assert!(!left.exists());
    assert_eq!(
        jobs_of(&work0),
        running,
        "pod B left pod A's running job alone: {log}"
    );
    assert!(!log.contains(&running[0]), "{log}");
    std::fs::write(&go, "").unwrap();
    let (code, log) = a.finish();
    assert_eq!(code, 0, "{log}");
    assert_eq!(slot_of(&log), Some(0), "{log}");
}

#[test]
fn twenty_pods_on_a_node_with_enough_slots_start_warm() {
    if !privileged("arc-slots-warm-ratio") {
        return;
    }
    let node = Node::new(2);
    let mut warm = 0;
    for i in 0..20 {
        let (code, log) = node.start("").finish();
        assert_eq!(code, 0, "pod {i}: {log}");
        if log.contains(": warm (") && builds(&log).ends_with("builds=0 fetches=0") {
            warm += 1;
        }
    }
    eprintln!("{warm} of 20 pods started on a warm store");
    assert!(warm >= 18, "only {warm} of 20 pods started warm");
}

#[test]
fn an_untrusted_job_in_a_slot_leaves_nothing_a_later_job_would_trust() {
    if !privileged("arc-slots-trust") {
        return;
    }
    let node = Node::new(1);
    // An unsigned export of a path the slot's store does not have.
    let src = common::open_tempdir("flywheel-untrusted");
    let expr = src.path().join("evil.nix");
    std::fs::write(&expr, format!("derivation {{ name = \"evil\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {} > $out\" ]; }}", unique("evil"))).unwrap();
    let evil = common::nixtar::sh(&format!("nix-build {} --no-out-link", expr.display()));
    let export = src.path().join("evil.export");
    common::nixtar::sh(&format!("nix-store --export {evil} > {}", export.display()));
    std::fs::set_permissions(&export, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

    // A trusted job warms the slot first.
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    // The untrusted job (a fork's pull request): build (through the daemon, sandboxed), import
    // unsigned, write the store directly, add a content-addressed file.
    let (code, log) = node
        .start_pr(&format!(
            "set +e\necho \"== import\"; nix-store --import < {export} 2>&1\necho \"== direct\"; touch /nix/store/planted 2>&1; mkdir /nix/store/$(basename {evil}) 2>&1\necho \"== add\"; echo x > f; nix-store --add f\necho \"== done\"",
            export = export.display()
        ))
        .finish();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("== done"), "the attempts ran: {log}");
    assert!(
        log.contains("signature"),
        "the unsigned import was refused: {log}"
    );
    assert!(
        log.contains("Permission denied") || log.contains("Read-only"),
        "{log}"
    );

    // The next job in the same slot: every path in its store was built by the daemon
    // (`ultimate`), is content-addressed, came with the verified bootstrap, or carries a
    // signature — and the lane trusts no key here, so none may carry one.
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    assert_eq!(builds(&log), "nix-build rc=0 builds=0 fetches=0", "{log}");
    let (slot_nix, _) = flywheel_agent::slot::slot_dirs(&node.slot_root(), 0);
    let receipt: serde_json::Value = serde_json::from_slice(
        &std::fs::read(flywheel_agent::nixboot::receipt_path(&slot_nix)).unwrap(),
    )
    .unwrap();
    let bootstrap: Vec<String> = receipt["store_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("/nix/store/{}", p.as_str().unwrap()))
        .collect();
    let db = rusqlite::Connection::open_with_flags(
        slot_nix.join("var/nix/db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut q = db
        .prepare("SELECT path, ultimate, sigs, ca FROM ValidPaths")
        .unwrap();
    /// path, ultimate, sigs, ca
    type Row = (String, Option<i64>, Option<String>, Option<String>);
    let rows: Vec<Row> = q
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert!(rows.len() > bootstrap.len(), "the jobs' paths are there");
    let untrusted: Vec<&String> = rows
        .iter()
        .filter(|(p, ultimate, sigs, ca)| {
            ultimate != &Some(1)
                && ca.as_deref().unwrap_or("").is_empty()
                && !bootstrap.contains(p)
                && sigs.as_deref().unwrap_or("").is_empty()
        })
        .map(|(p, ..)| p)
        .collect();
    assert!(
        untrusted.is_empty(),
        "paths nobody vouches for: {untrusted:?}"
    );
    assert!(
        !rows.iter().any(|(p, ..)| p == &evil),
        "the unsigned import is not in the store"
    );
    assert!(!slot_nix.join("store/planted").exists());
}

#[test]
fn a_slot_over_its_size_cap_is_collected_after_the_job_and_keeps_its_nix() {
    if !privileged("arc-slots-gc") {
        return;
    }
    let mut node = Node::new(1);
    node.lane_extra = "slot_max_size = \"1Ki\"".into();
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    assert_eq!(builds(&log), "nix-build rc=0 builds=1 fetches=0", "{log}");
    let gc = log
        .lines()
        .find(|l| l.contains("garbage-collected"))
        .unwrap_or_else(|| panic!("no garbage collection after the job:\n{log}"));
    eprintln!("{gc}");
    // The next job: the pinned Nix survived (a warm bootstrap), the job's garbage did not.
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("nix 2.8.0-flywheel: warm"), "{log}");
    assert_eq!(builds(&log), "nix-build rc=0 builds=1 fetches=0", "{log}");
}

/// A fork's pull request in a warm slot, between two trusted pushes: it reads the warm store
/// (nothing of it built again), builds X and adds a path in a layer of its own; afterwards the
/// slot's database has none of it, no layer is left, and the next trusted job finds X invalid
/// and builds it itself.
#[test]
fn a_fork_prs_pod_reads_the_warm_slot_and_writes_only_its_layer() {
    if !privileged("arc-slots-layer") {
        return;
    }
    let node = Node::new(1);
    let shared = common::shared_dir(node.dir.path());
    let tag = unique("slotx").replace('-', "");
    std::fs::write(
        shared.join("x.nix"),
        format!("derivation {{ name = \"x-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo built-by-the-pr > $out\" ]; }}\n"),
    )
    .unwrap();
    let s = shared.display();
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    assert_eq!(builds(&log), "nix-build rc=0 builds=1 fetches=0", "{log}");

    let (code, log) = node
        .start_pr(&format!(
            "X=$(nix-build {s}/x.nix --no-out-link) && nix-store --check-validity $X && echo \"prjob: built $X\"\n\
             echo content-{tag} > ca-file; CA=$(nix-store --add ca-file) && echo \"prjob: added $CA\"\n\
             echo $X $CA > {s}/pr-paths"
        ))
        .finish();
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("flywheel: store: not trusted to publish"),
        "{log}"
    );
    // It read the warm slot: what the slot had was neither built nor fetched again.
    assert_eq!(builds(&log), "nix-build rc=0 builds=0 fetches=0", "{log}");
    let paths = std::fs::read_to_string(shared.join("pr-paths")).unwrap();
    let paths: Vec<&str> = paths.split_whitespace().collect();
    assert_eq!(paths.len(), 2, "{paths:?}\n{log}");
    assert!(log.contains(&format!("prjob: built {}", paths[0])), "{log}");
    assert!(log.contains(&format!("prjob: added {}", paths[1])), "{log}");
    let (slot_nix, slot_work) = flywheel_agent::slot::slot_dirs(&node.slot_root(), 0);
    let db = rusqlite::Connection::open_with_flags(
        slot_nix.join("var/nix/db/db.sqlite"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    for p in &paths {
        let n: i64 = db
            .query_row(
                "SELECT count(*) FROM ValidPaths WHERE path = ?1",
                [p],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 0, "{p} is in the slot's store");
        assert!(
            !slot_nix.join(p.trim_start_matches("/nix/")).exists(),
            "{p}"
        );
    }
    drop(db);
    let layers: Vec<_> = std::fs::read_dir(&slot_work)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".layer"))
        .collect();
    assert!(layers.is_empty(), "{layers:?}");

    let (code, log) = node
        .start(&format!(
            "for p in {x} {ca}; do nix-store --check-validity $p 2>/dev/null && echo \"pushjob: valid $p\" || echo \"pushjob: invalid $p\"; done\n\
             nix-build {s}/x.nix --no-out-link > x.txt 2>&1; echo \"pushjob: x builds=$(grep -c 'will be built' x.txt)\"",
            x = paths[0],
            ca = paths[1]
        ))
        .finish();
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("flywheel: store: trusted"), "{log}");
    assert_eq!(builds(&log), "nix-build rc=0 builds=0 fetches=0", "{log}");
    for p in &paths {
        assert!(log.contains(&format!("pushjob: invalid {p}")), "{log}");
    }
    assert!(log.contains("pushjob: x builds=1"), "{log}");
}

/// An earlier job's daemon (compromised) left `var/log` in the slot's store as a symlink to a
/// directory of the host: the next job's setup refuses the store instead of creating or
/// mounting anything where it points, and once the symlink is gone the slot is used again.
#[test]
fn a_symlink_planted_in_a_slots_store_is_never_followed_by_the_agent() {
    if !privileged("arc-slots-symlink") {
        return;
    }
    let node = Node::new(1);
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    let (slot_nix, _) = flywheel_agent::slot::slot_dirs(&node.slot_root(), 0);
    let target = common::open_tempdir("flywheel-planted");
    let log_dir = slot_nix.join("var/log");
    std::fs::rename(&log_dir, slot_nix.join("var/log.moved")).unwrap();
    std::os::unix::fs::symlink(target.path(), &log_dir).unwrap();

    let (_, log) = node.start("echo job-ran").finish();
    assert!(log.contains("not a plain directory"), "{log}");
    assert!(!log.contains("job-ran"), "{log}");
    assert_eq!(
        std::fs::read_dir(target.path()).unwrap().count(),
        0,
        "something was made where the symlink points"
    );

    std::fs::remove_file(&log_dir).unwrap();
    std::fs::rename(slot_nix.join("var/log.moved"), &log_dir).unwrap();
    let (code, log) = node.start("").finish();
    assert_eq!(code, 0, "{log}");
    assert_eq!(builds(&log), "nix-build rc=0 builds=0 fetches=0", "{log}");
}
