//! Shared helpers for the integration tests: a per-test configuration in a tempdir, the
//! agent binary, and the rule for privileged tests (skip only with a reason, never in CI).
#![allow(dead_code)]

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
        let dir = tempfile::Builder::new()
            .prefix("flywheel-test")
            .tempdir()
            .expect("tempdir");
        // The job user must be able to reach its _work.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
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
{lane_extra}
{tail}
"#,
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
