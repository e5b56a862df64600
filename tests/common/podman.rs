//! A real container engine (Debian's podman, runc) for the deploy tests: the stand-in bases
//! (tests/deploy/standins.sh), the image built from the Containerfile, containers run and
//! removed. Settings for these machines are in tests/deploy/containers.conf (REFERENCE §11).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::nixtar;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo")
        .to_path_buf()
}

/// True when podman and mmdebstrap are here; otherwise the test is skipped with a reason, and
/// under CI=true it fails instead.
pub fn engine(test: &str) -> bool {
    if !super::privileged(test) {
        return false;
    }
    let missing: Vec<&str> = ["podman", "mmdebstrap", "runc"]
        .into_iter()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {missing:?} missing, and CI must not skip the deploy tests"
    );
    eprintln!("SKIP {test}: {missing:?} not installed (the README's test command installs them)");
    false
}

/// `podman ARGS`, with this project's engine settings.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.env(
        "CONTAINERS_CONF",
        repo().join("tests/deploy/containers.conf"),
    );
    c
}

pub fn ok(mut c: Command) -> String {
    let o: Output = c.output().expect("podman");
    assert!(
        o.status.success(),
        "{c:?}: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

/// The stand-in bases: `debian`, `rust`, `runner`, `systemd` → image names.
pub fn standins() -> &'static BTreeMap<String, String> {
    static S: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    S.get_or_init(|| {
        let t = Instant::now();
        let mut c = Command::new(repo().join("tests/deploy/standins.sh"));
        c.arg(super::fake_listener()).env(
            "CONTAINERS_CONF",
            repo().join("tests/deploy/containers.conf"),
        );
        let out = ok(c);
        eprintln!("stand-in bases ready in {:?}", t.elapsed());
        out.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

/// Serves one file over HTTP on loopback (what `ADD <url>` fetches at build time), forever.
fn serve(file: PathBuf) -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "http://{}/{}",
        l.local_addr().expect("addr"),
        file.file_name().expect("name").to_string_lossy()
    );
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let body = std::fs::read(&file).unwrap_or_default();
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/x-xz\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(&body);
        }
    });
    url
}

/// The ARC image, built from the Containerfile on the stand-in bases with the test Nix tarball
/// as the pinned release. Cached by podman's layer cache.
pub fn arc_image() -> &'static str {
    static I: OnceLock<String> = OnceLock::new();
    I.get_or_init(|| {
        let s = standins();
        let t = nixtar::tarball();
        let url = serve(t.path.clone());
        let name = "localhost/flywheel-runner:test".to_owned();
        let started = Instant::now();
        let mut c = podman();
        c.args([
            "build",
            "--format",
            "docker",
            "--pull=never",
            "--network",
            "host",
        ])
        .arg("-v")
        .arg(format!(
            "{}:/usr/local/cargo/registry",
            cargo_home().join("registry").display()
        ))
        .arg("--build-arg")
        .arg(format!("BUILD_BASE={}", s["rust"]))
        .arg("--build-arg")
        .arg(format!("NIX_BASE={}", s["debian"]))
        .arg("--build-arg")
        .arg(format!("RUNNER_BASE={}", s["runner"]))
        .arg("--build-arg")
        .arg(format!("NIX_VERSION={}", nixtar::VERSION))
        .arg("--build-arg")
        .arg(format!("NIX_SHA256={}", t.sha256))
        .arg("--build-arg")
        .arg(format!("NIX_URL={url}"))
        .args(["-t", &name, "-f"])
        .arg(repo().join("Containerfile"))
        .arg(repo());
        let o = c.output().expect("podman build");
        assert!(
            o.status.success(),
            "podman build: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        eprintln!("image {name} built in {:?}", started.elapsed());
        name
    })
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .expect("CARGO_HOME or HOME")
}

/// A container that is removed when dropped.
pub struct Container(pub String);

impl Container {
    pub fn inspect(&self, format: &str) -> String {
        let mut c = podman();
        c.args(["inspect", "--format", format, &self.0]);
        ok(c)
    }

    pub fn logs(&self) -> String {
        let o = podman()
            .args(["logs", &self.0])
            .output()
            .expect("podman logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }

    /// Waits for the container to exit; its exit code.
    pub fn wait(&self, timeout: Duration) -> i32 {
        let t = Instant::now();
        loop {
            if self.inspect("{{.State.Status}}") == "exited" {
                return self.inspect("{{.State.ExitCode}}").parse().expect("code");
            }
            assert!(
                t.elapsed() < timeout,
                "{} did not exit in {timeout:?}:\n{}",
                self.0,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `podman exec` in the container.
    pub fn exec(&self, args: &[&str]) -> Output {
        podman()
            .arg("exec")
            .arg(&self.0)
            .args(args)
            .output()
            .expect("podman exec")
    }

    /// The container's PID 1 as the host sees it.
    pub fn pid1(&self) -> i32 {
        self.inspect("{{.State.Pid}}").parse().expect("pid")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman().args(["rm", "-f", "-t", "0", &self.0]).output();
    }
}

/// Zombie children of process `pid` (state Z in `/proc/<child>/stat`).
pub fn zombies_of(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …: comm may hold spaces, so split after its last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r.to_owned()) else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<i32>().ok()));
        if state == Some("Z") && ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}
