//! The Bazel tests' real things: Debian's `bazel-bootstrap` as the client, and nginx from
//! Debian as the cache the way teams run one (reads open, `PUT` behind basic auth: `dav_methods
//! PUT` + `limit_except GET HEAD { auth_basic … }`), beside servers that fail each way an
//! upstream fails (5xx, 401 for everything, slow: `echo_sleep` of Debian's echo module).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BAZEL: &str = "/usr/bin/bazel";
const NGINX: &str = "/usr/sbin/nginx";
const HTPASSWD: &str = "/usr/bin/htpasswd";
const ECHO_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_echo_module.so";

/// The cache's ports: reads open and writes authenticated; 503 for everything; 401 for
/// everything; an answer after 30 s.
pub const CACHE: u16 = 8081;
pub const FAILS_5XX: u16 = 8082;
pub const FAILS_401: u16 = 8083;
pub const SLOW: u16 = 8084;
/// A cache that takes writes without credentials (root `<dir>/open`): the misconfiguration
/// the agent refuses to use.
pub const OPEN: u16 = 8085;

/// True when bazel, nginx (with its echo module) and htpasswd are here (tests/setup.sh installs
/// them). Missing ones skip the test with the reason; under CI=true they fail it.
pub fn tools(test: &str) -> bool {
    let missing: Vec<&str> = [BAZEL, NGINX, HTPASSWD, ECHO_MODULE]
        .into_iter()
        .filter(|p| !Path::new(p).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {missing:?} missing (tests/setup.sh installs bazel-bootstrap, nginx-light, libnginx-mod-http-echo, apache2-utils), and CI must not skip"
    );
    eprintln!("SKIP {test}: {missing:?} missing (run tests/setup.sh)");
    false
}

pub struct Nginx {
    child: Child,
    /// Where the cache keeps `ac/` and `cas/`.
    pub root: PathBuf,
    pub addr: Ipv4Addr,
    /// The writer's password (user `writer`), for the agent's credential file.
    pub password: String,
}

impl Nginx {
    /// nginx on `addr`, inside the network namespace `netns` (`ip netns exec`) when given.
    pub fn start(dir: &Path, netns: Option<&str>, addr: Ipv4Addr) -> Nginx {
        let root = dir.join("cache");
        for d in ["cache/ac", "cache/cas", "open/ac", "open/cas", "tmp"] {
            std::fs::create_dir_all(dir.join(d)).expect("mkdir");
        }
        let password = format!("pw-{:016x}", fastrand::u64(..));
        let htpasswd = dir.join("htpasswd");
        let o = Command::new(HTPASSWD)
            .arg("-bc")
            .arg(&htpasswd)
            .args(["writer", &password])
            .output()
            .expect("htpasswd");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let conf = dir.join("nginx.conf");
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                r#"load_module {ECHO_MODULE};
daemon off;
user root root;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp;
    client_max_body_size 1g;
    server {{
        listen {addr}:{CACHE};
        root {root};
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            limit_except GET HEAD {{
                auth_basic "bazel cache";
                auth_basic_user_file {htpasswd};
            }}
        }}
    }}
    server {{
        listen {addr}:{FAILS_5XX};
        location / {{ return 503; }}
    }}
    server {{
        listen {addr}:{FAILS_401};
        location / {{
            auth_basic "closed";
            auth_basic_user_file {htpasswd};
        }}
    }}
    server {{
        listen {addr}:{OPEN};
        root {open};
        location / {{
            dav_methods PUT;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
        }}
    }}
    server {{
        listen {addr}:{SLOW};
        location / {{ echo_sleep 30; echo late; }}
    }}
}}
"#,
                root = root.display(),
                open = dir.join("open").display(),
                htpasswd = htpasswd.display(),
            ),
        )
        .expect("nginx.conf");
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, NGINX]);
                c
            }
            None => Command::new(NGINX),
        };
        let child = c
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nginx");
        let n = Nginx {
            child,
            root,
            addr,
            password,
        };
        let t = Instant::now();
        loop {
            let up = match netns {
                Some(ns) => Command::new("ip")
                    .args(["netns", "exec", ns, "cat", "/proc/net/tcp"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default(),
                None => std::fs::read_to_string("/proc/net/tcp").unwrap_or_default(),
            };
            // Listening on the slow server's port (the last one nginx binds), in hex.
            if up.contains(&format!(":{SLOW:04X} 00000000:0000 0A")) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "nginx did not listen: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        n
    }

    pub fn url(&self, port: u16) -> String {
        format!("http://{}:{port}", self.addr)
    }

    /// Entries of `ac/` or `cas/`.
    pub fn entries(&self, kind: &str) -> Vec<String> {
        Self::entries_in(&self.root, kind)
    }

    /// Entries of `ac/` or `cas/` of the open cache ([`OPEN`]).
    pub fn open_entries(&self, kind: &str) -> Vec<String> {
        Self::entries_in(&self.root.with_file_name("open"), kind)
    }

    fn entries_in(root: &Path, kind: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(root.join(kind))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for Nginx {
    /// SIGTERM to the master, which ends its workers (a SIGKILL would leave them behind).
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The write credential file the agent reads: root's, 0600.
pub fn credential_file(dir: &Path, nginx: &Nginx) -> PathBuf {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let p = dir.join("bazel-write.cred");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .expect("credential file");
    writeln!(f, "writer:{}", nginx.password).expect("write");
    p
}

/// A small workspace: two genrules, one reading the other's output.
pub fn workspace(dir: &Path) -> PathBuf {
    let ws = dir.join("ws");
    std::fs::create_dir_all(&ws).expect("mkdir");
    std::fs::write(ws.join("WORKSPACE"), "workspace(name = \"fw\")\n").expect("write");
    std::fs::write(
        ws.join("BUILD"),
        r#"genrule(name = "a", outs = ["a.txt"], cmd = "echo hello-a > $@")
genrule(name = "b", srcs = [":a"], outs = ["b.txt"], cmd = "cat $(location :a) > $@; echo hello-b >> $@")
"#,
    )
    .expect("write");
    for p in [&ws, &ws.join("WORKSPACE"), &ws.join("BUILD")] {
        let mode = if p.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .expect("chmod");
    }
    ws
}

/// A job's shell lines: copy the workspace into the job's HOME and build TARGETS through
/// `$BAZEL_REMOTE_CACHE` (or `cache` when given), `bazel`'s output to `log`, its status after.
pub fn build_lines(ws: &Path, targets: &str, cache: Option<&str>, log: &Path) -> String {
    let cache = cache.unwrap_or("$BAZEL_REMOTE_CACHE");
    format!(
        r#"rm -rf "$HOME/ws" && cp -r {ws} "$HOME/ws" && cd "$HOME/ws"
set +e
{BAZEL} --batch --output_user_root="$HOME/.bazel" build --remote_cache={cache} --remote_timeout=60 --spawn_strategy=local {targets} > {log} 2>&1
echo "bazel exit $?" >> {log}
set -e
cd - >/dev/null"#,
        ws = ws.display(),
        log = log.display(),
    )
}

/// sha256 of `bytes`, hex: a CAS blob's name.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
