//! The ARC image built from the Containerfile with a real engine (podman, runc) on stand-in
//! bases, then run the way ARC runs the `runner` container: the agent as PID 1, privileged, a
//! memory limit above the lane's envelope, `FLYWHEEL_CONFIG` choosing the lane's config and the
//! JIT config in `ACTIONS_RUNNER_INPUT_JITCONFIG`; `/nix`, `_work` and the slot root as volumes,
//! as in the Helm values. The runner is the fake `Runner.Listener` against the fake GitHub.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::podman::{arc_image, engine, podman, zombies_of, Container};
use common::rig::register_directly;
use common::{nixtar, unique};
use fake_github::{FakeGitHub, FakeJob};

/// The container's memory limit and the lane's envelope inside it (scaled down from 8Gi + the
/// reserve for this machine).
const POD_MEMORY: &str = "512m";
const ENVELOPE: u64 = 192 << 20;

struct Pod {
    gh: FakeGitHub,
    dir: tempfile::TempDir,
    lane: String,
    shared: PathBuf,
}

impl Pod {
    fn new(drain_grace: &str) -> Pod {
        let gh = FakeGitHub::start();
        let dir = common::open_tempdir("flywheel-pod");
        let lane = unique("pod").replace('-', "x");
        for d in ["nix", "work", "slots"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
        }
        let shared = common::shared_dir(dir.path());
        std::fs::write(
            dir.path().join("lane.toml"),
            format!(
                r#"# The lane's config as the Helm values mount it (images/arc/), scaled down.
[agent]
state_dir = "/run/flywheel-agent"
stop_grace = "2s"
teardown_grace = "500ms"
reserve = "64Mi"

[metrics]
# Pods share the host's network here (the fakes listen on its loopback); in Kubernetes each
# pod has its own and keeps the default port.
listen = "127.0.0.1:0"

[runner]
install_dir = "/home/runner"
user = "runner-{{n}}"
drain_grace = "{drain_grace}"
lane = "{lane}"

{nix}
[[lane]]
name = "{lane}"
labels = ["{lane}"]
memory = "{ENVELOPE}"
max_runners = 1
pids_max = 1024
min_free = "1Mi"
work_root = "/home/runner/_work"
nix_store = "/nix"
slot_root = "/var/lib/flywheel/slots/{lane}"
slots = 2
slot_max_size = "2Gi"
network = "pod"
"#,
                nix = nixtar::image_nix_section(),
            ),
        )
        .expect("config");
        Pod {
            gh,
            dir,
            lane,
            shared,
        }
    }

    fn job(&self, script: &str) -> FakeJob {
        common::rig::fake_job(&self.lane, script)
    }

    /// `podman run` as ARC runs the runner container; the JIT config reaches podman through its
    /// environment, never its argv.
    fn run(&self, runner: &str) -> Container {
        let jit = register_directly(&self.gh, &self.lane, runner);
        let name = format!("{}-{runner}", self.lane);
        let p = |s: &str| self.dir.path().join(s).display().to_string();
        let mut c = podman();
        c.args([
            "run",
            "-d",
            "--name",
            &name,
            "--privileged",
            "--network",
            "host",
        ])
        .args(["--memory", POD_MEMORY, "--memory-swap", POD_MEMORY])
        .args(["-e", "FLYWHEEL_CONFIG=/etc/flywheel-agent/lane.toml"])
        .args(["-e", &format!("FLYWHEEL_LANE={}", self.lane)])
        .args(["-e", "FLYWHEEL_LOG_FORMAT=text"])
        .args(["-e", "ACTIONS_RUNNER_INPUT_JITCONFIG"])
        .env("ACTIONS_RUNNER_INPUT_JITCONFIG", &jit)
        .args([
            "-v",
            &format!("{}:/etc/flywheel-agent/lane.toml:ro", p("lane.toml")),
        ])
        .args(["-v", &format!("{}:/nix", p("nix"))])
        .args(["-v", &format!("{}:/home/runner/_work", p("work"))])
        .args(["-v", &format!("{}:/var/lib/flywheel/slots", p("slots"))])
        .args(["-v", &format!("{}:/shared", self.shared.display())])
        .arg(arc_image());
        common::podman::ok(c);
        Container(name)
    }

    fn wait_for(&self, c: &Container, file: &str) {
        let t = Instant::now();
        while !self.shared.join(file).exists() {
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "no {file} from the job:\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn the_image_runs_a_job_in_its_envelope_below_the_pod_with_nix_and_no_way_to_root() {
    if !engine("image-job") {
        return;
    }
    let pod = Pod::new("30s");
    // Orphans that die at once (re-parented to the agent, PID 1), then a marker; the job waits
    // for the test before it ends.
    pod.gh.push_job(pod.job(
        r#"echo "user=$(id -un) groups=$(id -Gn)"
if sudo -n id -u; then echo "sudo-gave-root"; else echo "sudo-refused"; fi
grep -E ':memory:|^0::' /proc/self/cgroup | sed 's/^/cgroup=/'
out=$(nix-build --no-out-link -E 'derivation { name = "in-pod"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "echo built-in-pod > $out" ]; }')
cat "$out"
for i in 1 2 3 4 5 6; do (sleep 0.1 &); done; sleep 0.5
touch /shared/ready
until [ -e /shared/go ]; do sleep 0.05; done
echo job-done"#,
    ));
    let c = pod.run("image-a");
    pod.wait_for(&c, "ready");
    let logs = c.logs();
    assert!(logs.contains("user=runner-0"), "{logs}");
    let groups = logs
        .lines()
        .find_map(|l| l.split_once(" groups=").map(|(_, r)| r.to_owned()))
        .and_then(|r| r.split(" stream=").next().map(str::to_owned))
        .unwrap_or_else(|| panic!("no groups line: {logs}"));
    assert_eq!(
        groups, "runner-0",
        "the job user is in no group but its own"
    );
    // The attack ran (sudo was called) and failed.
    assert!(logs.contains("sudo-refused"), "{logs}");
    assert!(!logs.contains("sudo-gave-root"), "{logs}");
    assert!(
        logs.contains("built-in-pod"),
        "Nix works in the pod: {logs}"
    );
    assert!(
        logs.contains("bootstrap") && logs.contains(nixtar::VERSION),
        "the pinned tarball was verified and installed in the pod: {logs}"
    );
    // The job's cgroup lies below the container's, with the lane's limit.
    let id = c.inspect("{{.Id}}");
    let line = logs
        .lines()
        .find_map(|l| l.split_once("cgroup=").map(|(_, r)| r.to_owned()))
        .and_then(|r| r.split(" stream=").next().map(str::to_owned))
        .unwrap_or_else(|| panic!("no cgroup line: {logs}"));
    let path = line.splitn(3, ':').nth(2).expect("cgroup path").to_owned();
    assert!(
        path.contains(&id[..12]) && path.contains(&pod.lane),
        "job cgroup {path} below container {id}"
    );
    let limit_file = if line.starts_with("0::") {
        format!("/sys/fs/cgroup{path}/memory.max")
    } else {
        format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
    };
    let limit: u64 = std::fs::read_to_string(&limit_file)
        .unwrap_or_else(|e| panic!("{limit_file}: {e}"))
        .trim()
        .parse()
        .expect("limit");
    assert_eq!(limit, ENVELOPE, "{limit_file}");
    // PID 1 reaped the orphans: they existed (the marker comes after they ended) and no
    // zombie is left under the agent.
    std::thread::sleep(Duration::from_millis(300));
    let zombies = zombies_of(c.pid1());
    assert!(zombies.is_empty(), "zombies under PID 1: {zombies:?}");
    std::fs::write(pod.shared.join("go"), "").expect("go");
    let code = c.wait(Duration::from_secs(60));
    let logs = c.logs();
    assert_eq!(
        code, 0,
        "the container exits with the listener's status: {logs}"
    );
    assert!(logs.contains("job-done"), "{logs}");
    pod.gh.with(|s| {
        assert_eq!(
            s.completed.first().map(|x| x.1.as_str()),
            Some("succeeded"),
            "{:?}",
            s.completed
        )
    });
}

#[test]
fn a_job_over_its_envelope_gets_the_verdict_and_the_pod_survives() {
    if !engine("image-oom") {
        return;
    }
    let pod = Pod::new("30s");
    let mut job = pod.job(
        r#"cat > hog.nix <<'EOF'
derivation { name = "hog"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "exec /usr/bin/tail /dev/zero" ]; }
EOF
nix-build hog.nix --no-out-link"#,
    );
    job.listener_exit = 3;
    pod.gh.push_job(job);
    let c = pod.run("image-oom");
    let code = c.wait(Duration::from_secs(120));
    let logs = c.logs();
    assert!(
        logs.contains("flywheel: out of memory")
            && logs.contains("while building `hog`")
            && logs.contains(&format!("`{}`", pod.lane)),
        "{logs}"
    );
    assert!(
        logs.contains("node pid "),
        "the kernel's pid is named as the node's: {logs}"
    );
    assert!(!logs.contains("lost communication"), "{logs}");
    assert_eq!(
        c.inspect("{{.State.OOMKilled}}"),
        "false",
        "the pod was not OOM-killed"
    );
    assert_eq!(
        code, 3,
        "the container exits with the listener's status: {logs}"
    );
    pod.gh.with(|s| {
        assert_eq!(
            s.completed.first().map(|x| x.1.as_str()),
            Some("failed"),
            "{:?}",
            s.completed
        )
    });
}

#[test]
fn podman_stop_drains_the_busy_runner_then_the_agent_exits() {
    if !engine("image-stop") {
        return;
    }
    let pod = Pod::new("2s");
    pod.gh
        .push_job(pod.job("touch /shared/ready; sleep 300; echo never"));
    let c = pod.run("image-stop");
    pod.wait_for(&c, "ready");
    let t = Instant::now();
    let mut stop = podman();
    stop.args(["stop", "-t", "60", &c.0]);
    common::podman::ok(stop);
    let took = t.elapsed();
    let logs = c.logs();
    assert_eq!(
        c.inspect("{{.State.ExitCode}}"),
        "0",
        "SIGTERM drained and the agent exited on its own (137 would be podman's SIGKILL): {logs}"
    );
    assert!(
        took < Duration::from_secs(30),
        "stopped after the 2 s drain grace, not the job's 300 s: {took:?}"
    );
    assert!(logs.contains("draining"), "{logs}");
    assert!(!logs.contains("never"), "{logs}");
    pod.gh.with(|s| {
        assert_eq!(
            s.completed.first().map(|x| x.1.as_str()),
            Some("cancelled"),
            "{:?}",
            s.completed
        )
    });
}
