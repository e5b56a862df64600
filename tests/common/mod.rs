//! Shared helpers for the integration tests: a per-test configuration in a tempdir, the
//! agent binary, and the rule for privileged tests (skip only with a reason, never in CI).
#![allow(dead_code)]

pub mod bazel;
pub mod netns;
pub mod nixtar;
pub mod podman;
pub mod rig;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const AGENT: &str = env!("CARGO_BIN_EXE_flywheel-agent");

/// True when this test can use real cgroups. A missing capability skips the test with a printed
/// reason; under CI=true it fails instead.
pub fn privileged(test: &str) -> bool {
    let why = if !nix::unistd::geteuid().is_root() {
        Some("needs root (cgroups, mounts, setuid)")
    } else if !Path::new("/sys/fs/cgroup").is_dir() {
        Some("no /sys/fs/cgroup")
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: {why}, and CI must not skip privileged tests"
            );
            eprintln!("SKIP {test}: {why}");
            false
        }
    }
}

/// Where tests keep what their jobs must see: not under `/tmp` or `/var/tmp`, which every job
/// gets privately, so a job would not see a test's directory there. It is the filesystem of
/// their own that `tests/setup.sh` mounts, so that how full the host's disk is never decides
/// whether Nix or the agent collects a test's warm store; without it (setup not run, or not
/// root) the directory above it on the host's disk, except under CI, which must have it.
pub fn test_base() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let top = PathBuf::from("/var/lib/flywheel-tests");
    let scratch = top.join("fs");
    let mounted = match (std::fs::metadata(&scratch), std::fs::metadata(&top)) {
        (Ok(s), Ok(t)) => s.dev() != t.dev(),
        _ => false,
    };
    if mounted {
        return scratch;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is not a filesystem of its own: run tests/setup.sh (as root) first",
        scratch.display()
    );
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        eprintln!(
            "note: {} is not mounted (tests/setup.sh mounts it): the tests' stores are on the host's disk, where a nearly full disk has Nix collect them",
            scratch.display()
        )
    });
    std::fs::create_dir_all(&top).expect("mkdir /var/lib/flywheel-tests");
    top
}

/// The lane setting of the tests' jobs unless a test says otherwise: the host's network (the
/// fakes listen on the test's loopback, and tests/vm's kernel has no nf_tables); the network
/// tests give their lanes `network = "isolated"`.
pub fn network_line(lane_extra: &str) -> &'static str {
    if lane_extra.contains("network =") {
        ""
    } else {
        "network = \"host\""
    }
}

/// A temporary directory the job user (`nobody`) can traverse (mode 0755), outside `/tmp`.
pub fn open_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(test_base())
        .expect("tempdir");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    dir
}

/// `<root>/shared`, writable by every user (mode 1777): where a job run as `nobody` leaves
/// what the test then reads.
pub fn shared_dir(root: &Path) -> PathBuf {
    let shared = root.join("shared");
    std::fs::create_dir(&shared).expect("mkdir shared");
    std::fs::set_permissions(
        &shared,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("chmod");
    shared
}

/// A unique lane name for one test, so that tests running at once can tell their jobs apart.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A config file with one lane and short graces, its state and work directories in a tempdir.
#[derive(Debug)]
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub lane: String,
    pub config: PathBuf,
}

impl Fixture {
    /// `lane_extra` is appended inside the `[[lane]]` table (before any `[lane.hints]`).
    pub fn new(prefix: &str, memory: &str, lane_extra: &str) -> Fixture {
        Self::with_tail(prefix, memory, lane_extra, "")
    }

    pub fn with_tail(prefix: &str, memory: &str, lane_extra: &str, tail: &str) -> Fixture {
        let dir = open_tempdir("flywheel-test");
        let lane = unique(prefix);
        let config = dir.path().join("agent.toml");
        let text = format!(
            r#"[agent]
state_dir = "{state}"
teardown_grace = "300ms"
stop_grace = "2s"

[[lane]]
name = "{lane}"
memory = "{memory}"
max_runners = 2
pids_max = 512
min_free = "1Mi"
work_root = "{work}"
nix = false
{network}
{lane_extra}
{tail}
"#,
            network = network_line(lane_extra),
            state = dir.path().join("state").display(),
            work = dir.path().join("work").display(),
        );
        std::fs::write(&config, text).expect("write config");
        Fixture { dir, lane, config }
    }

    pub fn work_root(&self) -> PathBuf {
        self.dir.path().join("work")
    }

    /// `flywheel-agent exec --lane LANE --config FILE [extra...] -- cmd...`
    pub fn exec_cmd(&self, extra: &[&str], cmd: &[&str]) -> Command {
        let mut c = Command::new(AGENT);
        c.args(["exec", "--lane", &self.lane, "--config"])
            .arg(&self.config)
            .args(extra)
            .arg("--")
            .args(cmd)
            .env("FLYWHEEL_LOG", "info")
            .env("FLYWHEEL_LOG_FORMAT", "text");
        c
    }

    pub fn exec(&self, extra: &[&str], cmd: &[&str]) -> Output {
        self.exec_cmd(extra, cmd).output().expect("run agent")
    }

    /// Job cgroups of this fixture's lane that still exist, in any hierarchy.
    pub fn leftover_cgroups(&self) -> Vec<String> {
        let mgr =
            flywheel_agent::cgroup::detect(Path::new("/sys/fs/cgroup"), None).expect("detect");
        mgr.list()
            .expect("list")
            .into_iter()
            .filter(|n| n.starts_with(&format!("{}.", self.lane)))
            .collect()
    }

    /// Entries left in the work root.
    pub fn leftover_work(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.work_root()) {
            Ok(rd) => rd.map(|e| e.expect("entry").path()).collect(),
            Err(_) => Vec::new(),
        }
    }
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                out.push(pid);
            }
        }
    }
    out
}

/// Start `sh -c script` inside a job cgroup (it joins before it executes), like the agent does.
pub fn spawn_in(job: &dyn flywheel_agent::cgroup::JobCgroup, script: &str) -> std::process::Child {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let files: Vec<std::fs::File> = job
        .procs_files()
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .expect("open cgroup.procs")
        })
        .collect();
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script]);
    // SAFETY: only write(2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn in cgroup");
    drop(files);
    child
}

/// The fake listener binary, built once (it is a workspace member, not a dependency).
pub fn fake_listener() -> PathBuf {
    fake_runner_bins().join("fake-runner-listener")
}

/// `fw-attack`, what a hostile job's step runs against a neighbour (tests/fake-runner).
pub fn attacker() -> PathBuf {
    fake_runner_bins().join("fw-attack")
}

/// The directory of the fake-runner crate's binaries, built once.
fn fake_runner_bins() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let target_dir = Path::new(AGENT)
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .to_path_buf();
        let profile_dir = Path::new(AGENT)
            .parent()
            .expect("profile dir")
            .to_path_buf();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "fake-runner", "--bins"])
            .env("CARGO_TARGET_DIR", &target_dir);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let ok = cmd.status().expect("cargo build fake-runner");
        assert!(ok.success(), "building the fake listener failed");
        profile_dir
    })
    .clone()
}

/// One section of an attacker's record: the lines after `== name` up to the next `==`.
pub fn section<'a>(log: &'a str, name: &str) -> &'a str {
    let start = log
        .find(&format!("== {name}\n"))
        .unwrap_or_else(|| panic!("the attacker never tried {name:?}:\n{log}"));
    let rest = &log[start + name.len() + 4..];
    if rest.starts_with("== ") {
        return "";
    }
    &rest[..rest.find("\n== ").map_or(rest.len(), |i| i + 1)]
}

/// Wait for `path` to exist, showing `log()` on a timeout.
pub fn wait_for_file(path: &Path, secs: u64, log: impl Fn() -> String) {
    let t = std::time::Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(secs),
            "timed out waiting for {}\n{}",
            path.display(),
            log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The address `run` serves `/metrics` on, from its log (the rigs listen on port 0).
pub fn metrics_address(log: &str) -> Option<String> {
    log.lines()
        .find(|l| l.contains("serving /metrics"))
        .and_then(|l| {
            let i = l.find("address=")? + "address=".len();
            Some(l[i..].split_whitespace().next()?.to_owned())
        })
}

/// GET a URL on loopback (plain HTTP/1.1), returning the body.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The runner user pool of the tests: `fwt-0` … `fwt-15`, created once (as root) like the
/// sysusers file creates `runner-0` …. Returns the `runner.user` template.
pub fn runner_pool() -> &'static str {
    static DONE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        for n in 0..16 {
            let name = format!("fwt-{n}");
            if nix::unistd::User::from_name(&name).ok().flatten().is_some() {
                continue;
            }
            let st = Command::new("useradd")
                .args([
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    &name,
                ])
                .status()
                .expect("run useradd");
            // 9: created meanwhile by another test process.
            assert!(
                st.success() || st.code() == Some(9),
                "useradd {name} failed: {st}"
            );
        }
    });
    "fwt-{n}"
}

/// The job's memory points (MiB) of a job summary's memory chart: its first `line [...]`.
pub fn memory_points(md: &str) -> Vec<u64> {
    let line = md
        .lines()
        .find(|l| l.trim_start().starts_with("line ["))
        .unwrap_or_else(|| panic!("no memory chart: {md}"));
    line.trim()
        .trim_start_matches("line [")
        .trim_end_matches(']')
        .split(", ")
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{v:?} in {line}")))
        .collect()
}
