//! The Nix bootstrap and Nix builds inside the envelope, with real Nix (Debian's nix-bin):
//! real store paths, a real per-job nix-daemon, real signatures, a binary cache on loopback.
//! Every test runs the agent in a private mount namespace with a fresh directory on `/nix`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{privileged, stderr, stdout, unique, AGENT};

use common::nixtar::{sh, shared_userpool, tarball, ACKNOWLEDGED, VERSION};

struct Rig {
    dir: tempfile::TempDir,
    lane: String,
    config: PathBuf,
}

impl Rig {
    fn new(hints: &str, sha256: Option<&str>) -> Rig {
        let t = tarball();
        let dir = common::open_tempdir("flywheel-nixtest");
        for d in ["fresh-nix", "etc-nix", "work"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
            std::fs::set_permissions(
                dir.path().join(d),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .expect("chmod");
        }
        let lane = unique("nixl");
        let config = dir.path().join("agent.toml");
        let p = |s: &str| dir.path().join(s).display().to_string();
        std::fs::write(
            &config,
            format!(
                r#"[agent]
state_dir = "{state}"
teardown_grace = "300ms"

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
memory = "256Mi"
max_runners = 2
pids_max = 1024
min_free = "1Mi"
work_root = "{work}"
nix_conf = "{conf}"
{network}
{hints}
"#,
                network = common::network_line(hints),
                state = p("state"),
                tarball = t.path.display(),
                sha = sha256.unwrap_or(&t.sha256),
                netrc = p("etc-nix/netrc"),
                work = p("work"),
                conf = p("etc-nix/nix.conf"),
                userpool = shared_userpool().display(),
            ),
        )
        .expect("config");
        Rig { dir, lane, config }
    }

    /// A bootstrapped rig whose lane builds with `sandbox = true`.
    fn sandboxed() -> Rig {
        let rig = Rig::new("", None);
        let text = std::fs::read_to_string(&rig.config).unwrap();
        std::fs::write(
            &rig.config,
            text.replace("sandbox = false", "sandbox = true"),
        )
        .unwrap();
        assert!(rig.bootstrap().status.success());
        rig
    }

    /// A rig whose store is bootstrapped.
    fn bootstrapped() -> Rig {
        let rig = Rig::new("", None);
        let o = rig.bootstrap();
        assert!(o.status.success(), "{}", stderr(&o));
        rig
    }

    fn fresh(&self) -> PathBuf {
        self.dir.path().join("fresh-nix")
    }

    /// The agent with ARGS, in a private mount namespace whose `/nix` is this rig's fresh one.
    fn agent(&self, args: &[&str]) -> Command {
        self.agent_in("--make-rprivate", "exec \"$@\"", args)
    }

    /// [`Rig::agent`] with `/` and `/nix` made `propagation` (`--make-rshared`: as systemd
    /// gives a service) in the agent's namespace, the agent run by the shell line `then`
    /// (`"$@"` is the agent with ARGS).
    fn agent_in(&self, propagation: &str, then: &str, args: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.args([
            "-m",
            "--",
            "sh",
            "-c",
            &format!("mount {propagation} / && mount --bind \"$0\" /nix && {then}"),
        ])
        .arg(self.fresh())
        .arg(AGENT)
        .args(args)
        .env("FLYWHEEL_LOG", "info")
        .env("FLYWHEEL_LOG_FORMAT", "text")
        .env_remove("NIX_REMOTE");
        c
    }

    fn bootstrap(&self) -> Output {
        self.agent(&[
            "nix",
            "bootstrap",
            "--config",
            self.config.to_str().unwrap(),
        ])
        .output()
        .expect("run")
    }

    fn exec(&self, user: Option<&str>, script: &str) -> Output {
        self.exec_with(user, &[], script)
    }

    fn exec_with(&self, user: Option<&str>, extra: &[&str], script: &str) -> Output {
        self.exec_command(user, extra, script)
            .output()
            .expect("run")
    }

    /// The `exec` of SCRIPT as USER, not yet started.
    fn exec_command(&self, user: Option<&str>, extra: &[&str], script: &str) -> Command {
        let mut args = vec![
            "exec",
            "--lane",
            &self.lane,
            "--config",
            self.config.to_str().unwrap(),
        ];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        args.extend(extra);
        args.extend(["--", "sh", "-c", script]);
        self.agent(&args)
    }
}

#[test]
fn cold_install_then_warm_then_drift_is_repaired() {
    if !privileged("nix-bootstrap") {
        return;
    }
    let rig = Rig::new("", None);
    let o = rig.bootstrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{}{}", out, stderr(&o));
    assert!(
        out.contains("cold bootstrap")
            && out.contains("verify")
            && out.contains("unpack")
            && out.contains("register")
            && out.contains("configure"),
        "{out}"
    );
    let fresh = rig.fresh();
    let nix_name = Path::new(&tarball().nix_out)
        .file_name()
        .unwrap()
        .to_owned();
    let nix_path = fresh.join("store").join(&nix_name);
    assert!(nix_path.join("bin/nix-daemon").exists());
    let meta = std::fs::metadata(&nix_path).expect("meta");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        (meta.uid(), meta.mode() & 0o777),
        (0, 0o555),
        "root-owned, read-only"
    );
    assert!(
        fresh.join("var/nix/db/db.sqlite").exists(),
        "registered with --load-db"
    );
    assert_eq!(
        std::fs::canonicalize(fresh.join("var/nix/profiles/default")).unwrap(),
        Path::new("/nix/store").join(&nix_name),
        "profile points into /nix"
    );
    let conf_path = rig.dir.path().join("etc-nix/nix.conf");
    let conf = std::fs::read_to_string(&conf_path).expect("conf");
    assert!(
        conf.contains("\ntrusted-users = root\n") && conf.contains("\nnetrc-file = "),
        "{conf}"
    );
    let receipt: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fresh.join("var/flywheel-agent/receipt.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(receipt["version"], VERSION);
    assert_eq!(receipt["tarball_sha256"], tarball().sha256.as_str());
    for phase in ["verify", "unpack", "register", "configure"] {
        assert!(receipt["timings_ms"][phase].is_number(), "{receipt}");
    }

    // Warm: nothing changes.
    let before = std::fs::metadata(&conf_path).unwrap().modified().unwrap();
    let receipt_before = std::fs::read(fresh.join("var/flywheel-agent/receipt.json")).unwrap();
    let o = rig.bootstrap();
    assert!(o.status.success());
    assert!(stdout(&o).contains(": warm"), "{}", stdout(&o));
    assert_eq!(
        std::fs::metadata(&conf_path).unwrap().modified().unwrap(),
        before
    );
    assert_eq!(
        std::fs::read(fresh.join("var/flywheel-agent/receipt.json")).unwrap(),
        receipt_before
    );

    // Drift: an edited nix.conf and a missing store path are repaired.
    std::fs::write(&conf_path, format!("{conf}trusted-users = nobody\n")).unwrap();
    let dep = std::fs::read_dir(fresh.join("store"))
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with("flywheel-test-dep")
        })
        .unwrap()
        .path();
    std::fs::set_permissions(&dep, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::remove_file(&dep).unwrap();
    let o = rig.bootstrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("cold bootstrap")
            && out.contains("was edited")
            && out.contains("1 store paths are missing"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(&conf_path).unwrap(),
        conf,
        "nix.conf restored byte for byte"
    );
    assert!(dep.exists());
    assert!(stdout(&rig.bootstrap()).contains(": warm"));

    // A store path left writable (an install that stopped between moving it in and making it
    // read-only, or a write to the store) is finished on the next run, not skipped.
    std::fs::set_permissions(
        &nix_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::chown(&nix_path, Some(65534), None).unwrap();
    let o = rig.bootstrap();
    let out = stdout(&o);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("1 store paths are not read-only and root's")
            && out.contains("made 1 store paths read-only and root's"),
        "{out}"
    );
    let meta = std::fs::metadata(&nix_path).expect("meta");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (0, 0o555));
    assert!(stdout(&rig.bootstrap()).contains(": warm"));
}

#[test]
fn a_nix_with_an_unacknowledged_advisory_runs_no_jobs_daemon_and_an_acknowledged_one_is_said() {
    if !privileged("nix-advisory") {
        return;
    }
    let rig = Rig::bootstrapped();
    let acknowledged = std::fs::read_to_string(&rig.config).unwrap();
    // The host's Nix 2.8 with no advisory acknowledged: the job never starts.
    std::fs::write(&rig.config, acknowledged.replace(ACKNOWLEDGED, "")).unwrap();
    let o = rig.exec(None, "echo the-job-ran");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains(&format!("nix {VERSION} is affected by CVE-2026-39860"))
            && err.contains("fixed in 2.34.5, 2.33.4, 2.32.7, 2.31.4, 2.30.4, 2.29.3, 2.28.6")
            && err.contains("acknowledged_advisories = [\"CVE-2026-39860\"]"),
        "the error names the advisory, its fixed releases and the way out: {err}"
    );
    assert!(!stdout(&o).contains("the-job-ran"), "the job never ran");
    assert!(
        !err.contains("the job's nix-daemon is listening"),
        "no daemon was started: {err}"
    );
    // One of the two acknowledged is not enough.
    std::fs::write(
        &rig.config,
        acknowledged.replace(
            ACKNOWLEDGED,
            "acknowledged_advisories = [\"CVE-2026-39860\"]",
        ),
    )
    .unwrap();
    let o = rig.exec(None, "echo the-job-ran");
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is affected by CVE-2024-27297"),
        "{}",
        stderr(&o)
    );
    // Both acknowledged: the job runs, and its log says with what.
    std::fs::write(&rig.config, &acknowledged).unwrap();
    let o = rig.exec(None, "echo the-job-ran");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(stdout(&o).contains("the-job-ran"));
    for id in ["CVE-2026-39860", "CVE-2024-27297"] {
        assert!(
            err.contains(&format!("runs with an acknowledged advisory: {id}")),
            "the job's log says it runs with {id} acknowledged: {err}"
        );
    }
}

#[test]
fn a_jobs_daemon_that_will_not_start_fails_the_job_at_once_and_leaks_nothing() {
    if !privileged("nix-daemon-fails") {
        return;
    }
    let rig = Rig::new("", None);
    let o = rig.bootstrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // The store's nix-daemon replaced by one that refuses to start (root may; jobs may not).
    let daemon = std::fs::canonicalize(rig.fresh().join("var/nix/profiles/default"))
        .unwrap()
        .strip_prefix("/nix")
        .map(|p| rig.fresh().join(p).join("bin/nix-daemon"))
        .unwrap();
    let store_dir = daemon.parent().unwrap().to_path_buf();
    std::fs::set_permissions(
        &store_dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::remove_file(&daemon).unwrap();
    std::fs::write(
        &daemon,
        "#!/bin/sh\necho 'nix-daemon: refusing to start' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&daemon, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
    let t = std::time::Instant::now();
    let o = rig.exec(None, "echo the-job-ran");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("exited before listening"),
        "the error says the daemon died: {err}"
    );
    assert!(!stdout(&o).contains("the-job-ran"), "the job never ran");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(8),
        "the daemon's exit ends the wait, not the 10 s timeout: {:?}",
        t.elapsed()
    );
    let work: Vec<_> = std::fs::read_dir(rig.dir.path().join("work"))
        .unwrap()
        .collect();
    assert!(work.is_empty(), "no job directory left: {work:?}");
    // Only this rig's jobs use its state directory: no daemon's socket directory is left.
    let sockets: Vec<_> = std::fs::read_dir(rig.dir.path().join("state/nix-sockets"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect()
        })
        .unwrap_or_default();
    assert!(sockets.is_empty(), "no socket directory left: {sockets:?}");
}

#[test]
fn a_wrong_hash_changes_nothing() {
    if !privileged("nix-hash") {
        return;
    }
    let rig = Rig::new(
        "",
        Some("0000000000000000000000000000000000000000000000000000000000000000"),
    );
    let o = rig.bootstrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(
        err.contains("refusing to install") && err.contains(&tarball().sha256),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(rig.fresh()).unwrap().count(),
        0,
        "the fresh /nix is still empty"
    );
    assert!(!rig.dir.path().join("etc-nix/nix.conf").exists());
}

#[test]
fn a_nix_build_that_blows_the_envelope_is_killed_inside_it() {
    if !privileged("nix-oom") {
        return;
    }
    let rig = Rig::new("", None);
    let script = r#"cat > hog.nix <<'EOF'
derivation { name = "hog"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "exec /usr/bin/tail /dev/zero" ]; }
EOF
echo NIX_REMOTE=$NIX_REMOTE
nix-build hog.nix --no-out-link"#;
    let summary = rig.dir.path().join("summary.md");
    let o = rig.exec_with(
        Some("nobody"),
        &["--summary", summary.to_str().unwrap()],
        script,
    );
    let err = stderr(&o);
    assert_ne!(o.status.code(), Some(0), "{err}");
    // The verdict names the derivation that was building.
    assert!(err.contains("while building `hog`"), "{err}");
    // The summary: the verdict first, memory up to the envelope, the build marked as not
    // finished.
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(md.starts_with("### ❌ Out of memory: peak "), "{md}");
    assert!(err.contains("flywheel: out of memory: peak "), "{err}");
    let points = common::memory_points(&md);
    let top = points.iter().copied().max().unwrap();
    assert!(
        top >= 240,
        "the chart reaches the 256 MiB envelope: {points:?}"
    );
    assert!(
        md.contains("> [!CAUTION]") && md.contains("while building `hog`"),
        "{md}"
    );
    assert!(
        md.lines()
            .any(|l| l.trim_start().starts_with("✗ hog") && l.contains(":crit, ")),
        "the timeline marks the killed build: {md}"
    );
    assert!(md.contains("Not finished (failed or killed): hog"), "{md}");
    assert!(
        err.contains("cold bootstrap"),
        "exec bootstrapped Nix first: {err}"
    );
    assert!(
        err.contains("out of memory") && err.contains("256.0 MiB"),
        "the envelope reported the build's OOM: {err}"
    );
    assert!(
        stdout(&o).contains("NIX_REMOTE=unix:///nix/var/nix/daemon-socket/socket"),
        "{}",
        stdout(&o)
    );
    // The next job finds Nix warm, and its bootstrap time is reported apart from the job.
    let o = rig.exec(None, "true");
    assert!(stderr(&o).contains(": warm (verified in"), "{}", stderr(&o));
}

/// Two builds at once under the job's daemon, one holding 40 MiB, the other growing 16 MiB at
/// a time until the kernel kills it: the summary and the OOM annotation name the build that
/// used the memory, with its memory and the other build's, and the advice follows it.
#[test]
fn an_oom_names_the_build_that_used_the_memory_and_the_one_beside_it() {
    if !privileged("nix-oom-by-build") {
        return;
    }
    let rig = Rig::new("", None);
    // Builders run with no PATH: every tool by its absolute path. The grower stops when its
    // `tail` is killed; the holder holds its 40 MiB until Nix stops it.
    let script = r#"cat > two.nix <<'EOF'
let
  build = name: cmd: derivation { inherit name; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" cmd ]; };
in [
  (build "grower" "while /usr/bin/head -c 16M /dev/zero; do /usr/bin/sleep 0.2; done | /usr/bin/tail >/dev/null")
  (build "holder" "{ /usr/bin/head -c 40M /dev/zero; /usr/bin/sleep 12; } | /usr/bin/tail >/dev/null")
]
EOF
nix-build two.nix --no-out-link --max-jobs 2"#;
    let summary = rig.dir.path().join("summary.md");
    let o = rig
        .exec_command(
            Some("nobody"),
            &["--summary", summary.to_str().unwrap()],
            script,
        )
        .env("GITHUB_ACTIONS", "true")
        .output()
        .expect("run");
    let (err, out) = (stderr(&o), stdout(&o));
    assert_ne!(o.status.code(), Some(0), "{err}");
    let md = std::fs::read_to_string(&summary).unwrap();
    assert!(
        md.starts_with("### ❌ Out of memory: peak "),
        "{md}\n--- stdout:\n{out}\n--- stderr:\n{err}"
    );
    // The grower was killed, and the gantt labels it with its memory.
    assert!(md.contains("✗ grower ("), "{md}");
    // The annotation: the grower first, with its memory, then the holder with less.
    let annotation = out
        .lines()
        .find(|l| l.starts_with("::error title=Out of memory"))
        .unwrap_or_else(|| panic!("no annotation: {out}\n{err}"));
    let mib = |after: &str| -> f64 {
        let rest = annotation
            .split(after)
            .nth(1)
            .unwrap_or_else(|| panic!("{after:?} not in {annotation}"));
        let figure = rest.split(" MiB").next().unwrap();
        figure
            .parse()
            .unwrap_or_else(|_| panic!("{figure:?} in {annotation}"))
    };
    let grower = mib("`grower` used ");
    let holder = mib("`holder` used ");
    assert!(
        annotation.contains(" of the 256.0 MiB envelope while `holder` used "),
        "{annotation}"
    );
    assert!(
        (36.0..=60.0).contains(&holder),
        "the holder held 40 MiB: {annotation}"
    );
    assert!(
        grower > 100.0 && grower <= 256.0 && grower > 2.0 * holder,
        "the grower used the memory: {annotation}"
    );
    assert!(
        annotation.contains("`grower` alone used ")
            && annotation.contains("2 Nix builds ran at once here"),
        "the advice follows the build that used the memory: {annotation}"
    );
    assert!(err.contains("`grower` used "), "exec says it too: {err}");
    assert!(
        err.contains("flywheel: memory by build (sampled): grower "),
        "{err}"
    );
    // The summary's table: the grower first, the holder after it.
    let table = md
        .split("**Memory by build**")
        .nth(1)
        .unwrap_or_else(|| panic!("no memory table: {md}"));
    let (g, h) = (table.find("`grower`"), table.find("`holder`"));
    assert!(g.is_some() && h.is_some() && g < h, "{md}");
    println!("{md}\n{annotation}");
}

/// A static file server on loopback for a binary cache directory; returns its URL.
fn serve(dir: PathBuf) -> String {
    serve_on(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), dir)
}

/// [`serve`] from the test's "internet" namespace.
fn serve_in(dir: PathBuf, net: &common::netns::Internet) -> String {
    let (ns, addr) = (format!("/run/netns/{}", net.ns), net.remote);
    let listener = std::thread::spawn(move || {
        let f = std::fs::File::open(ns).unwrap();
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        std::net::TcpListener::bind((addr, 0)).unwrap()
    })
    .join()
    .unwrap();
    serve_on(listener, dir)
}

fn serve_on(listener: std::net::TcpListener, dir: PathBuf) -> String {
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut s = stream;
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .trim_start_matches('/')
                    .to_owned();
                let file = dir.join(&path);
                match (path.contains(".."), std::fs::read(&file)) {
                    (false, Ok(body)) => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(&body);
                    }
                    _ => {
                        let _ = write!(s, "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    }
                }
            });
        }
    });
    url
}

/// Build a unique path with the host's Nix, sign it with a fresh key, copy it to a file cache.
/// Returns (store path, cache dir, public key).
fn signed_cache(tag: &str, root: &Path) -> (String, PathBuf, String) {
    let keys = root.join(format!("keys-{tag}"));
    std::fs::create_dir_all(&keys).unwrap();
    let (sk, pk) = (keys.join("sk"), keys.join("pk"));
    sh(&format!(
        "nix-store --generate-binary-cache-key {tag}-1 {} {}",
        sk.display(),
        pk.display()
    ));
    let expr = root.join(format!("{tag}.nix"));
    std::fs::write(&expr, format!("derivation {{ name = \"subst-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {} > $out\" ]; }}", unique(tag))).unwrap();
    let path = sh(&format!("nix-build {} --no-out-link", expr.display()));
    sh(&format!(
        "nix --extra-experimental-features nix-command store sign --key-file {} {path}",
        sk.display()
    ));
    let cache = root.join(format!("cache-{tag}"));
    sh(&format!(
        "nix --extra-experimental-features nix-command copy --to file://{}/cache {path}",
        cache.display()
    ));
    (
        path,
        cache,
        std::fs::read_to_string(pk).unwrap().trim().to_owned(),
    )
}

#[test]
fn jobs_substitute_from_the_lanes_signed_cache_and_refuse_unknown_keys() {
    if !privileged("nix-substitute") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (good_path, good_cache, good_pk) = signed_cache("good", root.path());
    let (bad_path, bad_cache, _) = signed_cache("bad", root.path());
    let good_url = serve(good_cache);
    let bad_url = serve(bad_cache);

    let rig = Rig::new(&format!("[lane.hints]\nattic_server = \"{good_url}\"\nattic_cache = \"cache\"\nattic_public_key = \"{good_pk}\"\n"), None);
    let o = rig.exec(
        Some("nobody"),
        &format!("nix-store -r {good_path} && cat {good_path}"),
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "substituted through the job's daemon: {}{}",
        stdout(&o),
        stderr(&o)
    );
    assert!(rig
        .fresh()
        .join("store")
        .join(Path::new(&good_path).file_name().unwrap())
        .exists());

    // A cache whose paths are signed by a key the lane does not trust.
    let rig = Rig::new(&format!("[lane.hints]\nattic_server = \"{bad_url}\"\nattic_cache = \"cache\"\nattic_public_key = \"{good_pk}\"\n"), None);
    let o = rig.exec(Some("nobody"), &format!("nix-store -r {bad_path}"));
    assert_ne!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!rig
        .fresh()
        .join("store")
        .join(Path::new(&bad_path).file_name().unwrap())
        .exists());
}

#[test]
fn a_jobs_daemon_substitutes_through_the_jobs_network_never_from_the_hosts_loopback() {
    if !privileged("nix-network") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (lo_path, lo_cache, lo_pk) = signed_cache("netlo", root.path());
    let (net_path, net_cache, net_pk) = signed_cache("netin", root.path());
    let net = common::netns::Internet::new();
    let on_loopback = serve(lo_cache);
    let on_internet = serve_in(net_cache, &net);
    let lane = |network: &str, url: &str, pk: &str| {
        format!("{network}\n[lane.hints]\nattic_server = \"{url}\"\nattic_cache = \"cache\"\nattic_public_key = \"{pk}\"\n")
    };
    let isolated = format!("network = \"isolated\"\ndns = [\"{}\"]", net.remote);
    let in_store = |rig: &Rig, path: &str| {
        rig.fresh()
            .join("store")
            .join(Path::new(path).file_name().unwrap())
            .exists()
    };
    // The host's network: the job's daemon substitutes from a cache on the host's loopback.
    let rig = Rig::new(&lane("network = \"host\"", &on_loopback, &lo_pk), None);
    let o = rig.exec(Some("nobody"), &format!("nix-store -r {lo_path}"));
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(in_store(&rig, &lo_path));
    // The job's own network: its daemon is in it, so the host's loopback is out of reach...
    let rig = Rig::new(&lane(&isolated, &on_loopback, &lo_pk), None);
    let o = rig.exec(Some("nobody"), &format!("nix-store -r {lo_path}"));
    assert_ne!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(!in_store(&rig, &lo_path));
    // ...and a cache out there is not.
    let rig = Rig::new(&lane(&isolated, &on_internet, &net_pk), None);
    let o = rig.exec(Some("nobody"), &format!("nix-store -r {net_path}"));
    assert_eq!(o.status.code(), Some(0), "{}{}", stdout(&o), stderr(&o));
    assert!(in_store(&rig, &net_path));
}

#[test]
fn the_job_user_cannot_import_unsigned_paths_or_reach_another_jobs_daemon() {
    if !privileged("nix-isolation") {
        return;
    }
    // Where the job can read it: not under /tmp, which every job gets privately.
    let root = common::open_tempdir("flywheel-unsigned");
    let expr = root.path().join("u.nix");
    std::fs::write(&expr, format!("derivation {{ name = \"unsigned\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {} > $out\" ]; }}", unique("u"))).unwrap();
    let path = sh(&format!("nix-build {} --no-out-link", expr.display()));
    let export = root.path().join("unsigned.export");
    sh(&format!("nix-store --export {path} > {}", export.display()));
    std::fs::set_permissions(&export, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

    let rig = Rig::new("", None);
    assert!(rig.bootstrap().status.success());
    let o = rig.exec(
        Some("nobody"),
        &format!("nix-store --import < {}", export.display()),
    );
    assert_ne!(
        o.status.code(),
        Some(0),
        "an untrusted user imported an unsigned path: {}",
        stdout(&o)
    );
    // The import ran (it read the export) and the daemon refused it for its signature.
    assert!(
        stderr(&o).contains("signature"),
        "the import was attempted and refused: {}",
        stderr(&o)
    );
    assert!(!rig
        .fresh()
        .join("store")
        .join(Path::new(&path).file_name().unwrap())
        .exists());

    // Two jobs at once: the second sees neither the first's socket nor the socket directory.
    let shared = common::shared_dir(rig.dir.path());
    let ready = shared.join("ready");
    let mut first = rig
        .exec_command(
            Some("nobody"),
            &[],
            &format!("touch {}; sleep 4", ready.display()),
        )
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !ready.exists() {
        assert!(t.elapsed().as_secs() < 20, "first job never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let sockets = rig.dir.path().join("state/nix-sockets");
    let theirs: Vec<PathBuf> = std::fs::read_dir(&sockets)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.path().join("socket"))
        .collect();
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    let probe = format!(
        "ls -A {} | wc -l; test -e {} && echo reachable || echo hidden",
        sockets.display(),
        theirs[0].display()
    );
    let o = rig.exec(Some("nobody"), &probe);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(out, "0\nhidden\n", "another job's daemon is out of reach");
    let _ = first.wait();
}

/// A log file a child's stdout and stderr both append to.
fn log_file(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// Wait until `path` exists (a job's marker, a socket).
fn wait_for(path: &Path, what: &str) {
    let t = std::time::Instant::now();
    while !path.exists() {
        assert!(t.elapsed().as_secs() < 30, "{what} never appeared");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The hijack of issue 22, with `sandbox = false`: the attacker job's non-sandboxed builder runs
/// in its daemon's mount namespace, opens another daemon's socket directory with `O_PATH`, and
/// passes the descriptor over an abstract socket to the job, which connects through
/// `/proc/self/fd/N/socket` and has that daemon build its derivation. Now no other job's
/// socket directory is in a daemon's namespace at all (`state_dir` is hidden there): the
/// builder's open fails, and the walls behind it are tested with a descriptor the test hands
/// the job itself.
#[test]
fn a_descriptor_passed_by_a_builder_does_not_reach_another_jobs_daemon() {
    if !privileged("nix-socket-hijack") {
        return;
    }
    let rig = Rig::bootstrapped();
    common::runner_pool();
    let (trusted_user, attacker_user) = ("fwt-14", "fwt-15");
    let shared = common::shared_dir(rig.dir.path());
    // The attacker's tool, where builders and jobs can run it.
    let tool = rig.dir.path().join("fw-attack");
    std::fs::copy(common::attacker(), &tool).unwrap();
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let sockets = rig.dir.path().join("state/nix-sockets");
    let tag = unique("hijack");
    // As a packaged host has it (systemd/flywheel-agent.tmpfiles.conf: `state_dir` 0755), so
    // that the builder can walk to `nix-sockets` (0711) as it could in production.
    std::fs::create_dir_all(rig.dir.path().join("state")).unwrap();
    std::fs::set_permissions(
        rig.dir.path().join("state"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    // The trusted job: it uses its daemon once (so that its log shows whom the daemon
    // accepted), then waits until the test is done.
    let (ready, stop) = (shared.join("ready"), shared.join("stop"));
    let trusted_log = rig.dir.path().join("trusted.log");
    let mut trusted = rig
        .exec_command(
            Some(trusted_user),
            &[],
            &format!(
                "nix-store -q --references {} >/dev/null && touch {}; i=0; while [ ! -e {} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
                tarball().nix_out,
                ready.display(),
                stop.display()
            ),
        )
        .env("FLYWHEEL_LOG", "debug")
        .stdout(log_file(&trusted_log))
        .stderr(log_file(&trusted_log))
        .spawn()
        .unwrap();
    wait_for(&ready, "the trusted job");
    // Socket directories have 16 hex digits for a name (`<job>.logs` are build logs).
    let theirs: Vec<PathBuf> = std::fs::read_dir(&sockets)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir() && !e.file_name().to_string_lossy().contains('.'))
        .map(|e| e.path())
        .collect();
    assert_eq!(theirs.len(), 1, "{theirs:?}");
    let target = theirs[0].clone();
    let meta = std::fs::metadata(&target).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.mode() & 0o7777, 0o700, "the socket directory is 0700");
    assert_eq!(
        meta.uid(),
        nix::unistd::User::from_name(trusted_user)
            .unwrap()
            .unwrap()
            .uid
            .as_raw(),
        "the socket directory is the trusted job user's"
    );

    // The attack, as the attacker job runs it against DIR; VICTIM is what it makes the
    // other daemon build. `by_builder`: the descriptor comes from the job's builder, else from
    // the test (root, in the host's namespace).
    let attack = |dir: &Path, n: &str, by_builder: bool| -> (String, PathBuf) {
        let victim = rig.dir.path().join(format!("victim-{n}.nix"));
        let passer = rig.dir.path().join(format!("passer-{n}.nix"));
        let victim_name = format!("victim-{tag}-{n}");
        std::fs::write(&victim, format!("derivation {{ name = \"{victim_name}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo planted-by-the-attacker > $out\" ]; }}")).unwrap();
        std::fs::write(&passer, format!("derivation {{ name = \"passer-{tag}-{n}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"{} passfd {} {tag}-{n} > $out 2>&1\" ]; }}", tool.display(), dir.display())).unwrap();
        for f in [&victim, &passer] {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
        }
        let handed = (!by_builder).then(|| {
            Command::new(&tool)
                .arg("passfd")
                .arg(dir)
                .arg(format!("{tag}-{n}"))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        });
        let builder = if by_builder {
            // A builder that sent nothing leaves nothing to wait for.
            format!(
                "out=\"$(nix-build --no-out-link {})\"; cat \"$out\"; grep -q ': sent' \"$out\" || kill $!",
                passer.display()
            )
        } else {
            "true".to_owned()
        };
        let o = rig.exec(
            Some(attacker_user),
            &format!(
                "{tool} recvfd {tag}-{n} \"$(command -v nix-build)\" --no-out-link {victim} 2>&1 & \
                 {builder}; wait",
                tool = tool.display(),
                victim = victim.display(),
            ),
        );
        let handed = handed
            .map(|h| stdout(&h.wait_with_output().unwrap()))
            .unwrap_or_default();
        let built = std::fs::read_dir(rig.fresh().join("store"))
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().ends_with(&victim_name))
            .map(|e| e.path())
            .unwrap_or_default();
        (format!("{handed}{}{}", stdout(&o), stderr(&o)), built)
    };

    // 1. Against the old layout (directory 0755, socket 0666, every user allowed, visible in
    // every daemon's namespace), a daemon the test runs beside the agent's on the same store:
    // the attack drives it.
    let decoy = rig.dir.path().join(format!("old-layout-{tag}"));
    std::fs::create_dir(&decoy).unwrap();
    std::fs::set_permissions(&decoy, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let decoy_log = rig.dir.path().join("decoy.log");
    let mut old = Command::new("unshare")
        .args([
            "-m",
            "--",
            "sh",
            "-c",
            "mount --make-rprivate / && mount --bind \"$0\" /nix && exec /usr/bin/nix-daemon",
        ])
        .arg(rig.fresh())
        .env("NIX_DAEMON_SOCKET_PATH", decoy.join("socket"))
        .env("NIX_CONF_DIR", rig.dir.path().join("etc-nix"))
        .env("NIX_CONFIG", "allowed-users = *")
        .stdout(log_file(&decoy_log))
        .stderr(log_file(&decoy_log))
        .spawn()
        .unwrap();
    wait_for(&decoy.join("socket"), "the old-layout daemon's socket");
    let (out, built) = attack(&decoy, "old", true);
    let _ = old.kill();
    let _ = old.wait();
    assert!(
        out.contains(&format!("passfd {}: sent", decoy.display()))
            && out.contains("connect: connected"),
        "the builder passed the descriptor and the job connected through it: {out}"
    );
    assert!(
        built.is_file(),
        "the old-layout daemon built the attacker's derivation: {out}"
    );
    let decoy_said = std::fs::read_to_string(&decoy_log).unwrap();
    assert!(
        decoy_said.contains(&format!("user {attacker_user}")),
        "the old-layout daemon accepted the attacker: {decoy_said}"
    );

    // 2. Against the trusted job's daemon: the builder finds no socket directory of another
    // job; handed one, the job's walk through it is refused.
    let (out, built) = attack(&target, "hidden", true);
    assert!(
        out.contains(&format!(
            "passfd {}: open: No such file or directory",
            target.display()
        )),
        "the builder does not see the trusted job's socket directory: {out}"
    );
    assert_eq!(
        built,
        PathBuf::new(),
        "nothing was built for the attacker: {out}"
    );
    let (out, built) = attack(&target, "new", false);
    assert!(
        out.contains(&format!("passfd {}: sent", target.display()))
            && out.contains(&format!("got {}", target.display())),
        "the job got a descriptor of the trusted job's socket directory: {out}"
    );
    assert!(
        out.contains("connect: Permission denied"),
        "the job cannot connect through the descriptor: {out}"
    );
    assert_eq!(
        built,
        PathBuf::new(),
        "nothing was built for the attacker: {out}"
    );

    // The trusted daemon logs every connection it accepts or refuses (at debug level): it
    // accepted its job's user, and never saw the attacker.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let said = std::fs::read_to_string(&trusted_log).unwrap();
    assert!(
        said.contains("accepted connection from pid")
            && said.contains(&format!("user {trusted_user}")),
        "the trusted daemon's log shows the connections it accepted: {said}"
    );
    assert!(
        !said.contains(attacker_user),
        "the trusted daemon never saw the attacker's connection: {said}"
    );

    // 3. A second line: were the directory open, the daemon would still refuse the attacker.
    std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let (out, built) = attack(&target, "open", false);
    assert!(
        out.contains("connect: connected"),
        "the walk was allowed this time: {out}"
    );
    assert!(
        out.contains("cannot open connection to remote store"),
        "the attacker's client was cut off: {out}"
    );
    assert_eq!(
        built,
        PathBuf::new(),
        "nothing was built for the attacker: {out}"
    );

    std::fs::write(&stop, "").unwrap();
    let st = trusted.wait().unwrap();
    let said = std::fs::read_to_string(&trusted_log).unwrap();
    assert!(st.success(), "{said}");
    // The daemon names the user as it sees it: a host user outside its user namespace has
    // the kernel's overflow uid there (`nobody`), never the job's user's uid.
    assert!(
        said.contains(&format!(
            "user '{attacker_user}' is not allowed to connect to the Nix daemon"
        )) || said.contains("user 'nobody' is not allowed to connect to the Nix daemon"),
        "the daemon refused the user other than its job's: {said}"
    );
    assert!(
        !said
            .lines()
            .any(|l| l.contains("accepted connection") && l.contains(attacker_user)),
        "the trusted daemon accepted no one but its job's user: {said}"
    );
}

/// The pid in a job's "the job's nix-daemon is listening pid=N" log line.
fn daemon_pid(log: &Path) -> String {
    let t = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(pid) = text
            .lines()
            .filter(|l| l.contains("the job's nix-daemon is listening"))
            .find_map(|l| l.split("pid=").nth(1)?.split(' ').next().map(str::to_owned))
        {
            return pid;
        }
        assert!(t.elapsed().as_secs() < 30, "no daemon pid in {text}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A daemon escape, as code that took over a job's nix-daemon would try it: enter the
/// daemon's namespaces with its capabilities and write outside the job. First against a root
/// process of the host (what the daemon was before: root in the host's mount namespace), then
/// against a job's daemon. The compromised job is untrusted (its daemon writes a layer), and
/// it also goes for its neighbour's daemon by the two routes a daemon beside another has: the
/// neighbour's store written through `/proc/<neighbour daemon>/root` (the same capabilities,
/// so the kernel allows it in a shared PID namespace), and the neighbour's socket under
/// `state_dir/nix-sockets` connected to (through a read-only mount it works). Builds are
/// sandboxed: the compromised job's build is running, and the escape writes a kernel setting
/// through its sandbox's own `/proc` (`/proc/<builder>/root/proc/sys/…`, writable, in a user
/// namespace the daemon's root owns), which a daemon that is root of the host could; its
/// daemon is root of a user namespace of its own (`userns.rs`), and the neighbour's (trusted)
/// output in the shared store is root's on disk all the same.
#[test]
fn code_running_as_a_jobs_daemon_cannot_write_outside_the_job() {
    if !privileged("nix-daemon-escape") {
        return;
    }
    // Sandboxed builds, as in production: the compromised job's build is running while the
    // escape runs, and its sandbox's `/proc` is a route of its own (below).
    let rig = Rig::sandboxed();
    common::runner_pool();
    let shared = common::shared_dir(rig.dir.path());
    let tag = unique("escape");
    // The builder: a static busybox the jobs' builds take into the store (a job's user may not
    // name sandbox paths).
    std::fs::create_dir(shared.join("bb")).unwrap();
    std::fs::copy("/bin/busybox", shared.join("bb/busybox")).unwrap();
    let build = |what: &str, script: &str| {
        let expr = shared.join(format!("{what}.nix"));
        std::fs::write(
            &expr,
            format!(
                "derivation {{ name = \"{tag}-{what}\"; system = \"x86_64-linux\"; builder = \"${{./bb}}/busybox\"; args = [ \"sh\" \"-c\" \"{script}\" ]; }}"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&expr, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        expr
    };
    // The neighbour (trusted) builds into the shared store; the compromised job's build runs
    // until the job ends.
    let trusted_build = build("trusted", "echo built > $out");
    let sleeper = build(
        "sleeper",
        &format!("while :; do ${{./bb}}/busybox sleep 1; done; : {tag}-builder"),
    );
    // Two jobs: the neighbour, whose directory and socket the escape goes for, and the
    // compromised one, whose daemon it runs as.
    let mut jobs = Vec::new();
    for (user, name, extra, first) in [
        (
            "fwt-12",
            "neighbour",
            &[][..],
            format!(
                "nix-build --no-out-link {} > {} || exit 1",
                trusted_build.display(),
                shared.join("trusted-out").display()
            ),
        ),
        (
            "fwt-13",
            "compromised",
            &["--untrusted"][..],
            format!("nix-build --no-out-link {} &", sleeper.display()),
        ),
    ] {
        let log = rig.dir.path().join(format!("{name}.log"));
        let ready = shared.join(format!("{name}-ready"));
        let child = rig
            .exec_command(
                Some(user),
                extra,
                &format!(
                    "touch {} _work-sentinel 2>/dev/null\n{first}\ntouch {}; i=0; while [ ! -e {} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
                    shared.join(format!("{name}-cwd")).display(),
                    ready.display(),
                    shared.join("stop").display()
                ),
            )
            .stdout(log_file(&log))
            .stderr(log_file(&log))
            .spawn()
            .unwrap();
        let t = std::time::Instant::now();
        while !ready.exists() {
            assert!(
                t.elapsed().as_secs() < 60,
                "the {name} job never got ready: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        jobs.push((child, log));
    }
    use std::os::unix::fs::MetadataExt;
    // A trusted job's output in the shared store is root's on disk, as it always was.
    let out = std::fs::read_to_string(shared.join("trusted-out")).unwrap();
    let out = out.trim();
    let on_disk = rig
        .fresh()
        .join(out.strip_prefix("/nix/").unwrap_or_else(|| panic!("{out}")));
    let m = std::fs::symlink_metadata(&on_disk).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), std::fs::read_to_string(&on_disk).unwrap()),
        (0, 0, "built\n".to_owned()),
        "the trusted job's output {} is root's on disk",
        on_disk.display()
    );
    // The compromised job's build, running in its sandbox: its pid in the daemon's PID
    // namespace (the second of its `NSpid`).
    let t = std::time::Instant::now();
    let builder = loop {
        let found = std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let marker = format!("{tag}-builder");
            if !String::from_utf8_lossy(&cmdline).contains(&marker) {
                return None;
            }
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let nspid = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
            nspid.split_whitespace().nth(1).map(str::to_owned)
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(
            t.elapsed().as_secs() < 60,
            "the compromised job's sandboxed build never ran: {}",
            std::fs::read_to_string(&jobs[1].1).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let neighbour_uid = nix::unistd::User::from_name("fwt-12")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let owned_by = |dir: &Path| -> PathBuf {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.is_dir() && std::fs::metadata(p).unwrap().uid() == neighbour_uid)
            .unwrap_or_else(|| panic!("no directory of the neighbour in {}", dir.display()))
    };
    let neighbour_work = owned_by(&rig.dir.path().join("work")).join("_work");
    let neighbour_sockets = owned_by(&rig.dir.path().join("state/nix-sockets"));
    assert!(neighbour_work.is_dir() && neighbour_sockets.is_dir());
    let sentinel = PathBuf::from(format!("/etc/flywheel-sentinel-{tag}"));
    std::fs::write(&sentinel, "original\n").unwrap();
    let targets = |n: &str| -> Vec<PathBuf> {
        vec![
            sentinel.clone(),
            PathBuf::from(format!("/etc/flywheel-new-{tag}-{n}")),
            rig.dir.path().join(format!("state/escape-{n}")),
            neighbour_sockets.join(format!("escape-{n}")),
            neighbour_work.join(format!("escape-{n}")),
            // Out through a root process of the host (this test: pid 1 of a container
            // host may hold capabilities the test lacks).
            PathBuf::from(format!(
                "/proc/{}/root{}",
                std::process::id(),
                sentinel.display()
            )),
        ]
    };
    let escape = |pid: &str, paths: &[PathBuf]| -> String {
        let o = Command::new(common::attacker())
            .arg("escape")
            .arg(pid)
            .args(paths)
            .output()
            .unwrap();
        stdout(&o)
    };

    // The neighbour's daemon: its store (the shared one, writable to it) through its
    // `/proc/<pid>/root`, and its socket.
    let neighbour_daemon = daemon_pid(&jobs[0].1);
    let via_proc = |n: &str| {
        PathBuf::from(format!(
            "/proc/{neighbour_daemon}/root/nix/var/nix/escape-{tag}-{n}"
        ))
    };
    let landed_in_store = |n: &str| rig.fresh().join(format!("var/nix/escape-{tag}-{n}"));
    // There already, so that what a write through the daemon's root would do is an overwrite:
    // no process outside the daemon's user namespace can create a file through its (idmapped)
    // store, the host's root included.
    for n in ["host", "daemon"] {
        std::fs::write(landed_in_store(n), "").unwrap();
    }
    let neighbour_socket = format!("connect:{}", neighbour_sockets.join("socket").display());
    let routes = |n: &str| vec![via_proc(n), PathBuf::from(&neighbour_socket)];
    // A kernel setting, as a write into `kernel/core_pattern` would be (harmless here: the
    // NIS domain name, put back).
    let setting = PathBuf::from("/proc/sys/kernel/domainname");
    let domain = std::fs::read_to_string(&setting).unwrap();
    // A disk, as `/dev/sda` would be: a loop device over a file of the test's.
    let disk_img = rig.dir.path().join("disk.img");
    std::fs::write(&disk_img, vec![0u8; 1 << 20]).unwrap();
    let losetup = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&disk_img)
        .output()
        .unwrap();
    assert!(losetup.status.success(), "losetup: {}", stderr(&losetup));
    let disk = PathBuf::from(stdout(&losetup).trim());
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(disk.clone());
    let disk_head = || std::fs::read(&disk_img).unwrap()[..8].to_vec();

    // 1. As root in the host's namespaces with a root process's capabilities: every write lands.
    let mut host = Command::new("sleep").arg("30").spawn().unwrap();
    let mut paths = targets("host");
    paths.extend(routes("host"));
    paths.push(setting.clone());
    paths.push(disk.clone());
    let out = escape(&host.id().to_string(), &paths);
    let _ = host.kill();
    let _ = host.wait();
    assert!(out.contains("entered its namespaces"), "{out}");
    let changed = std::fs::read_to_string(&setting).unwrap();
    std::fs::write(&setting, domain.trim_end()).unwrap();
    assert!(
        out.contains(&format!("write {}: ok", setting.display())) && changed == "escaped\n",
        "a process like the old daemon writes a kernel setting: {out}"
    );
    assert!(
        out.contains(&format!("write {}: ok", disk.display())) && disk_head() == b"escaped\n",
        "a process like the old daemon writes a disk through its device node: {out}"
    );
    std::fs::write(&disk_img, vec![0u8; 1 << 20]).unwrap();
    for t in targets("host") {
        assert!(
            out.contains(&format!("write {}: ok", t.display())),
            "a process like the old daemon writes {}: {out}",
            t.display()
        );
    }
    for t in targets("host").iter().skip(1).take(4) {
        std::fs::remove_file(t).unwrap();
    }
    // Both routes work from a process beside the daemons (the attack runs).
    assert!(
        out.contains(&format!("write {}: ok", via_proc("host").display()))
            && std::fs::read_to_string(landed_in_store("host")).unwrap() == "escaped\n",
        "a process beside the neighbour's daemon writes its store through /proc: {out}"
    );
    std::fs::remove_file(landed_in_store("host")).unwrap();
    assert!(
        out.contains(&format!(
            "connect {}: ok",
            &neighbour_socket["connect:".len()..]
        )),
        "a process beside the neighbour's daemon connects to its socket: {out}"
    );
    std::fs::write(&sentinel, "original\n").unwrap();

    // 2. As the compromised job's daemon: nothing outside the job is written.
    let pid = daemon_pid(&jobs[1].1);
    // The daemon is the first process of a PID namespace of its own.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NSpid:") && l.split_whitespace().last() == Some("1")),
        "{status}"
    );
    let daemon_tmp = rig.dir.path().join("state/nix-tmp");
    let mut paths = targets("daemon");
    // The control: the daemon's own /tmp is writable, and it is the job's private one.
    paths.push(PathBuf::from(format!("/tmp/escape-{tag}")));
    paths.extend(routes("daemon"));
    paths.push(setting.clone());
    paths.push(disk.clone());
    // The route through its build's sandbox: the sandbox's own `/proc`, mounted in a user
    // namespace the daemon's root owns, writable; what the kernel allows there is the
    // writer's (the host's root would set the host's settings, `kernel/core_pattern`
    // included).
    let through_sandbox = PathBuf::from(format!("/proc/{builder}/root/proc/sys/kernel/domainname"));
    paths.push(through_sandbox.clone());
    // The same route reaches the running build (the control that it was taken): its build
    // directory, the build user's, is the daemon's to write.
    let into_build = PathBuf::from(format!("/proc/{builder}/root/build/escape-{tag}"));
    paths.push(into_build.clone());
    // Its build-user pool is its layer's copy: a file it plants there (a lock held forever,
    // a symlink a trusted daemon would follow, a setuid file) never reaches the shared pool.
    let in_pool = PathBuf::from(format!("/nix/var/nix/userpool/escape-{tag}"));
    paths.push(in_pool.clone());
    let out = escape(&pid, &paths);
    assert!(
        out.lines()
            .any(|l| l == format!("write {}: ok", in_pool.display())),
        "the daemon writes its own pool: {out}"
    );
    assert!(
        !shared_userpool().join(format!("escape-{tag}")).exists(),
        "the untrusted daemon's write landed in the shared build-user pool: {out}"
    );
    eprintln!("{out}");
    let now = std::fs::read_to_string(&setting).unwrap();
    if now != domain {
        std::fs::write(&setting, domain.trim_end()).unwrap();
    }
    assert!(
        out.lines()
            .any(|l| l == format!("write {}: ok", into_build.display())),
        "the daemon's namespaces reach the running build through /proc/<builder>/root: {out}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("write {}: ", through_sandbox.display())))
        .unwrap_or_default()
        .to_owned();
    assert!(
        (line.ends_with("Permission denied (os error 13)")
            || line.ends_with("Operation not permitted (os error 1)"))
            && now == domain,
        "the daemon cannot set the host's kernel settings through its sandbox's /proc: {out}"
    );
    // It is not root of the host: its uids and gids there are others, and it is in a user
    // namespace other than the host's (its capabilities are that namespace's).
    for key in ["Uid:", "Gid:"] {
        let ids: Vec<u32> = status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{status}"))
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        assert!(
            ids.len() == 4 && ids.iter().all(|&id| id != 0),
            "the daemon's {key} in the host's namespace: {ids:?}"
        );
    }
    // (Compared with this test's, root of the host: pid 1 of a container host or a VM may
    // hold capabilities the test lacks, and then its `ns/` is out of the test's reach.)
    let userns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    assert!(
        userns(&pid) != userns("self"),
        "the daemon is in a user namespace of its own: {:?}",
        userns(&pid)
    );
    assert!(
        out.contains(&format!(
            "write {}: Read-only file system",
            setting.display()
        )) && now == domain,
        "the daemon cannot write a kernel setting (/proc/sys is read-only to it): {out}"
    );
    let line = out
        .lines()
        .find(|l| l.starts_with(&format!("write {}: ", disk.display())))
        .unwrap_or_default();
    assert!(
        !line.is_empty() && !line.ends_with(": ok") && disk_head() == vec![0u8; 8],
        "the daemon cannot write a disk (its /dev holds no disk): {out}"
    );
    assert!(
        out.contains("entered its namespaces"),
        "the escape ran: {out}"
    );
    assert!(
        out.contains(&format!("write /tmp/escape-{tag}: ok")),
        "the daemon's own /tmp is writable: {out}"
    );
    let landed: Vec<PathBuf> = std::fs::read_dir(&daemon_tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path().join(format!("escape-{tag}")))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(
        landed.len(),
        1,
        "it landed in the job's private /tmp: {out}"
    );
    for t in targets("daemon") {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("write {}: ", t.display())))
            .unwrap_or_default();
        assert!(
            !line.is_empty() && !line.ends_with(": ok"),
            "the daemon cannot write {}: {out}",
            t.display()
        );
    }
    assert_eq!(std::fs::read_to_string(&sentinel).unwrap(), "original\n");
    for t in targets("daemon").iter().skip(1).take(4) {
        assert!(!t.exists(), "{} was not created", t.display());
    }
    // Neither route reaches the neighbour's daemon from the compromised one's namespaces.
    let line = |prefix: String| {
        out.lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_default()
            .to_owned()
    };
    let written = line(format!("write {}: ", via_proc("daemon").display()));
    assert!(
        !written.is_empty() && !written.ends_with(": ok"),
        "the daemon cannot write its neighbour's store through /proc: {out}"
    );
    assert!(
        std::fs::read_to_string(landed_in_store("daemon"))
            .unwrap()
            .is_empty(),
        "the neighbour's store is unchanged: {out}"
    );
    let connected = line(format!(
        "connect {}: ",
        &neighbour_socket["connect:".len()..]
    ));
    assert!(
        !connected.is_empty() && !connected.ends_with(": ok"),
        "the daemon cannot connect to its neighbour's socket: {out}"
    );
    let _ = std::fs::remove_file(&sentinel);
    std::fs::write(shared.join("stop"), "").unwrap();
    for (mut child, log) in jobs {
        assert!(
            child.wait().unwrap().success(),
            "{}",
            std::fs::read_to_string(log).unwrap()
        );
    }
}

/// A job user's daemon runs in a user namespace of its own and writes the store through an
/// idmapped mount, every filesystem below the store's included: with one below it that cannot
/// be idmapped (ramfs here; the store's own filesystem passed the fast-local check, and those
/// it allows can be) the job fails at setup, saying so, and runs nothing.
#[test]
fn a_store_that_cannot_be_idmapped_fails_the_job_at_setup_saying_so() {
    if !privileged("nix-idmap-refused") {
        return;
    }
    let rig = Rig::bootstrapped();
    common::runner_pool();
    std::fs::create_dir(rig.fresh().join("var/below")).unwrap();
    // Mounted in the agent's namespace, below its `/nix`.
    let o = rig
        .agent_in(
            "--make-rprivate",
            "mount -t ramfs ramfs /nix/var/below && exec \"$@\"",
            &[
                "exec",
                "--lane",
                &rig.lane,
                "--config",
                rig.config.to_str().unwrap(),
                "--user",
                "fwt-10",
                "--",
                "sh",
                "-c",
                "echo the-job-ran",
            ],
        )
        .output()
        .unwrap();
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(
        !o.status.success() && !out.contains("the-job-ran"),
        "the job did not run: {out}{err}"
    );
    assert!(
        err.contains("cannot be mounted idmapped")
            && err.contains(
                "keep the lane's nix_store on a filesystem that supports idmapped mounts"
            ),
        "it says why and what to do: {err}"
    );
}

#[test]
fn a_jobs_per_user_profiles_and_gc_roots_go_with_the_job() {
    if !privileged("nix-per-user") {
        return;
    }
    let rig = Rig::bootstrapped();
    common::runner_pool();
    let user = "fwt-11";
    // The daemon makes the user's per-user directories at its first connection; the user can
    // leave things there (a profile generation, a root keeping a path alive).
    let o = rig.exec(
        Some(user),
        &format!(
            "nix-store -q --references {} >/dev/null && for k in profiles gcroots; do d=/nix/var/nix/$k/per-user/{user}; ls -d $d && ln -s {} $d/planted && echo planted $k; done",
            tarball().nix_out,
            tarball().nix_out
        ),
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(
        out.contains("planted profiles") && out.contains("planted gcroots"),
        "the job wrote into its per-user directories: {out}"
    );
    for k in ["profiles", "gcroots"] {
        let d = rig.fresh().join(format!("var/nix/{k}/per-user/{user}"));
        assert!(!d.exists(), "{} outlived the job", d.display());
        assert!(
            rig.fresh().join(format!("var/nix/{k}/per-user")).is_dir(),
            "only the user's own directory went"
        );
    }
}

/// Nix's sandbox (mount, pid and user namespaces, a `/proc` of its own, `pivot_root`) works
/// inside the confined daemon: a read-only mount namespace, no `CAP_SYS_PTRACE`, … (production
/// runs with `sandbox = true`; the other tests run without it because their builders use the
/// host's dynamically linked `/bin/sh`; busybox is static).
#[test]
fn a_sandboxed_build_runs_under_the_confined_daemon() {
    if !privileged("nix-sandbox") {
        return;
    }
    let rig = Rig::sandboxed();
    let expr = rig.dir.path().join("sandboxed.nix");
    std::fs::write(
        &expr,
        format!(
            "derivation {{ name = \"{}\"; system = \"x86_64-linux\"; builder = \"/bin/busybox\"; args = [ \"sh\" \"-c\" \"mount > $out; ls /proc/1/ >> $out; echo built-in-the-sandbox >> $out\" ]; }}",
            unique("sandboxed")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&expr, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    // As root, a trusted Nix user: it may name the sandbox's extra path.
    let o = rig.exec(
        None,
        &format!(
            "cat \"$(nix-build --option sandbox-paths /bin/busybox {} --no-out-link)\"",
            expr.display()
        ),
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("built-in-the-sandbox"), "{out}");
    // It was the sandbox: a root of its own with its own /proc.
    assert!(
        out.lines().any(|l| l.contains(" on /proc type proc")),
        "the sandbox mounted its own /proc: {out}"
    );
    assert!(
        !out.contains(&rig.dir.path().display().to_string()),
        "the host's paths are not in the sandbox: {out}"
    );
}

/// An untrusted job (`exec --untrusted`) builds, adds a content-addressed path, signs paths
/// and so writes its daemon's layer; a trusted job on the same store afterwards finds none of
/// it, and the store below never changed.
#[test]
fn an_untrusted_jobs_store_writes_are_a_layer_thrown_away_at_teardown() {
    if !privileged("nix-throwaway-layer") {
        return;
    }
    let rig = Rig::bootstrapped();
    let shared = common::shared_dir(rig.dir.path());
    let tag = unique("layer");
    let expr = rig.dir.path().join("x.nix");
    std::fs::write(&expr, format!("derivation {{ name = \"x-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo built-by-the-pr > $out\" ]; }}")).unwrap();
    let file = rig.dir.path().join(format!("ca-{tag}"));
    std::fs::write(&file, format!("content-addressed {tag}\n")).unwrap();
    for f in [&expr, &file] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    }
    let db = rig.fresh().join("var/nix/db/db.sqlite");
    let db_before = std::fs::read(&db).unwrap();
    let store_before = std::fs::read_dir(rig.fresh().join("store"))
        .unwrap()
        .count();
    let nix_out = &tarball().nix_out;
    let o = rig.exec_with(
        Some("nobody"),
        &["--untrusted"],
        &format!(
            "X=$(nix-build --no-out-link {expr}) && nix-store --check-validity $X && echo valid-in-the-job $X; \
             CA=$(nix-store --add {file}) && echo added $CA; \
             nix-store --generate-binary-cache-key pr-1 /tmp/sk /tmp/pk; \
             nix --extra-experimental-features nix-command store sign --key-file /tmp/sk $X {nix_out} && echo signed || echo signing-refused; \
             nix --extra-experimental-features nix-command path-info --sigs {nix_out}; \
             echo $X $CA > {paths}",
            expr = expr.display(),
            file = file.display(),
            paths = shared.join("paths").display(),
        ),
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(
        out.contains("valid-in-the-job /nix/store/"),
        "the job built X in its layer: {out}"
    );
    assert!(
        out.contains("added /nix/store/"),
        "the job added a path: {out}"
    );
    eprintln!("untrusted job: {out}");
    let paths = std::fs::read_to_string(shared.join("paths")).unwrap();
    let paths: Vec<&str> = paths.split_whitespace().collect();
    assert_eq!(paths.len(), 2, "{paths:?}");

    // Gone with the job: its layer, and nothing of it below.
    let layers: Vec<_> = std::fs::read_dir(rig.dir.path().join("work"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".layer"))
        .collect();
    assert!(layers.is_empty(), "the layer was removed: {layers:?}");
    assert_eq!(
        std::fs::read(&db).unwrap(),
        db_before,
        "the store's database never changed"
    );
    assert_eq!(
        std::fs::read_dir(rig.fresh().join("store"))
            .unwrap()
            .count(),
        store_before,
        "no path was added to the store"
    );

    // A trusted job on the same store: none of it is there, valid or not; no signature stuck.
    let o = rig.exec(
        None,
        &format!(
            "for p in {} {}; do nix-store --check-validity $p 2>/dev/null && echo valid $p || echo invalid $p; test -e $p && echo exists $p; done; \
             nix --extra-experimental-features nix-command path-info --sigs {nix_out}",
            paths[0], paths[1]
        ),
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    for p in &paths {
        assert!(
            out.contains(&format!("invalid {p}")),
            "{p} is not valid: {out}"
        );
        assert!(
            !out.contains(&format!("exists {p}")),
            "{p} is not there: {out}"
        );
    }
    assert!(
        !out.contains("pr-1:"),
        "no signature of the job's key: {out}"
    );
}

/// Sum of the samples of `name` whose label set contains every fragment.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_after_an_oom_a_local_build_a_substitution_and_cold_and_warm_bootstraps() {
    if !privileged("nix-metrics") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let (subst_path, cache, pk) = signed_cache("metrics", root.path());
    let cache_url = serve(cache);
    let gh = fake_github::FakeGitHub::start();
    let rig = Rig::new(&format!("[lane.hints]\nattic_server = \"{cache_url}\"\nattic_cache = \"cache\"\nattic_public_key = \"{pk}\"\n"), None);
    let install = rig.dir.path().join("install");
    std::fs::create_dir_all(install.join("bin")).unwrap();
    std::fs::copy(common::fake_listener(), install.join("bin/Runner.Listener")).unwrap();
    let key = rig.dir.path().join("app.pem");
    std::fs::write(&key, fake_github::app_key().0).unwrap();
    let cfg = std::fs::read_to_string(&rig.config)
        .unwrap()
        .replace("max_runners = 2", "max_runners = 1");
    std::fs::write(
        &rig.config,
        format!(
            "{cfg}\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[github]\napi_url = \"{}\"\nscope = \"org\"\ntarget = \"tinyland\"\napp_id = \"{}\"\nprivate_key_file = \"{}\"\n\n[runner]\ninstall_dir = \"{}\"\nuser = \"nobody\"\nname_prefix = \"metrics\"\ndrain_grace = \"5s\"\nbackoff = \"100ms\"\n",
            gh.url,
            fake_github::APP_ID,
            key.display(),
            install.display()
        ),
    )
    .unwrap();
    let job = |script: String| fake_github::FakeJob {
        labels: vec![rig.lane.clone()],
        script,
        ..Default::default()
    };
    gh.push_job(job("printf '%s' 'derivation { name = \"hog\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"exec /usr/bin/tail /dev/zero\" ]; }' > hog.nix; nix-build hog.nix --no-out-link".into()));
    // The seed's workflows, unchanged: install-nix-action stops when `type -p nix` finds one,
    // nix-installer-action when `nix --version` exits 0, setup-flywheel keeps the lane's
    // ATTIC_SERVER, nix-job skips `sudo apt-get install xz-utils` when xz is there.
    let seed = r#"if p=$(type -p nix); then echo "Aborting: Nix is already installed at $p"; else echo "would install nix with sudo"; fi
nix --version >/dev/null && echo "nix-installer-action: nix is installed, skipping"
echo "ATTIC_SERVER=${ATTIC_SERVER:-unset}"
command -v xz >/dev/null && echo "xz is there" || echo "would sudo apt-get install xz-utils"
"#;
    gh.push_job(job(format!(
        "{seed}printf '%s' 'derivation {{ name = \"local\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo {} > $out\" ]; }}' > local.nix; nix-build local.nix --no-out-link",
        unique("local")
    )));
    gh.push_job(job(format!("nix-store -r {subst_path}")));

    let (mut agent, log_path) = run_until_completed(&rig, &gh, 3);
    let text_log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text_log.contains(
            "Aborting: Nix is already installed at /nix/var/nix/profiles/default/bin/nix"
        ) && text_log.contains("nix-installer-action: nix is installed, skipping")
            && text_log.contains(&format!("ATTIC_SERVER={cache_url}"))
            && text_log.contains("xz is there"),
        "the seed's workflow steps find the lane's Nix, hints and tools: {text_log}"
    );
    // The job summaries the runner uploaded, and the OOM's annotation in the hook's output.
    let summaries: Vec<String> = gh.with(|s| s.summaries.values().cloned().collect());
    assert_eq!(summaries.len(), 3, "{summaries:?}");
    let oom = summaries
        .iter()
        .find(|m| m.contains("[!CAUTION]"))
        .unwrap_or_else(|| panic!("no summary tells of the OOM: {summaries:?}"));
    assert!(
        oom.lines()
            .any(|l| l.trim_start().starts_with("✗ hog") && l.contains(":crit, "))
            && oom.contains("while building `hog`"),
        "{oom}"
    );
    assert!(oom.contains("xychart-beta"), "{oom}");
    assert!(
        summaries.iter().any(|m| m.contains("local :done, ")
            && m.contains("Nix: 1 store path built here")
            && m.contains("xychart-beta")
            && m.contains("- Nix bootstrap: nix 2.8.0-flywheel: warm")),
        "{summaries:?}"
    );
    assert!(
        text_log.contains("::error title=Out of memory on lane ")
            && text_log.contains("while building `hog`")
            && text_log.contains("the kernel killed tail (pid "),
        "{text_log}"
    );
    let addr = common::metrics_address(&text_log).expect("the agent logged its metrics address");
    // The job records land right after the listener exits; give the last one a moment.
    let mut m = String::new();
    for _ in 0..50 {
        m = common::http_get(&addr, "/metrics");
        if metric(&m, "flywheel_jobs_total", &[]) >= 3.0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = agent.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log_path).unwrap()
    );

    let lane = format!("lane=\"{}\"", rig.lane);
    assert!(m.ends_with("# EOF\n"), "OpenMetrics text");
    assert_eq!(
        metric(&m, "flywheel_jobs_total", &[&lane, "result=\"oom\""]),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "flywheel_jobs_total", &[&lane, "result=\"succeeded\""]),
        2.0,
        "{m}"
    );
    assert!(
        metric(&m, "flywheel_oom_kills_total", &[&lane]) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "flywheel_job_phase_duration_seconds_count",
            &[&lane, "phase=\"nix_bootstrap\"", "cache=\"cold\""]
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "flywheel_job_phase_duration_seconds_count",
            &[&lane, "phase=\"nix_bootstrap\"", "cache=\"warm\""]
        ),
        2.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "flywheel_job_phase_duration_seconds_count",
            &[&lane, "phase=\"run\"", "cache=\"cold\""]
        ) >= 1.0,
        "a locally built run: {m}"
    );
    assert_eq!(
        metric(
            &m,
            "flywheel_job_phase_duration_seconds_count",
            &[&lane, "phase=\"run\"", "cache=\"substituted\""]
        ),
        1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "flywheel_nix_store_paths_total",
            &[&lane, "source=\"built\""]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "flywheel_nix_store_paths_total",
            &[&lane, "source=\"substituted\""]
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "flywheel_job_phase_duration_seconds_count",
            &[&lane, "phase=\"registration\""]
        ),
        metric(
            &m,
            "flywheel_github_requests_total",
            &["endpoint=\"generate-jitconfig\"", "status=\"201\""]
        ),
        "{m}"
    );
    assert!(
        metric(
            &m,
            "flywheel_github_requests_total",
            &["endpoint=\"generate-jitconfig\"", "status=\"201\""]
        ) >= 3.0,
        "{m}"
    );
    assert!(
        metric(&m, "flywheel_github_ratelimit_remaining", &[]) > 0.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "flywheel_job_peak_memory_envelope_ratio_count",
            &[&lane]
        ),
        3.0,
        "{m}"
    );
    assert!(
        metric(&m, "flywheel_job_peak_memory_bytes_count", &[&lane]) >= 3.0,
        "{m}"
    );
    assert!(m.contains("flywheel_runners{"), "{m}");
    assert!(
        m.contains("flywheel_attic_token_mints_total{kind=\"push\"} 0"),
        "{m}"
    );
}

/// `run` with the rig's config in its private `/nix` namespace, logging to `agent.log`.
fn start_run(rig: &Rig) -> (std::process::Child, PathBuf) {
    start_run_in(rig, "--make-rprivate", "exec \"$@\"")
}

/// [`start_run`] through [`Rig::agent_in`].
fn start_run_in(rig: &Rig, propagation: &str, then: &str) -> (std::process::Child, PathBuf) {
    let log_path = rig.dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let agent = rig
        .agent_in(
            propagation,
            then,
            &["run", "--config", rig.config.to_str().unwrap()],
        )
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    (agent, log_path)
}

/// [`start_run`], then wait until the fake GitHub saw `n` jobs completed.
fn run_until_completed(
    rig: &Rig,
    gh: &fake_github::FakeGitHub,
    n: usize,
) -> (std::process::Child, PathBuf) {
    let (agent, log_path) = start_run(rig);
    let t = std::time::Instant::now();
    while gh.with(|s| s.completed.len()) < n {
        assert!(
            t.elapsed().as_secs() < 120,
            "jobs did not finish: {:?}\n{}",
            gh.with(|s| s.completed.clone()),
            std::fs::read_to_string(&log_path).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    (agent, log_path)
}

/// Wait up to 60 s until `done` says so; the agent's log if it never does.
fn wait_in_log(log_path: &Path, done: impl Fn() -> bool) {
    let t = std::time::Instant::now();
    while !done() {
        assert!(
            t.elapsed().as_secs() < 60,
            "{}",
            std::fs::read_to_string(log_path).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Two SIGTERMs to `run` (drain, then stop every runner now); its log once it exited.
fn stop_twice(agent: &mut std::process::Child, log_path: &Path) -> String {
    for _ in 0..2 {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    let _ = agent.wait();
    std::fs::read_to_string(log_path).unwrap()
}

/// A `run` rig on a Nix lane with the fake GitHub (runs 101, a push to main, and 102, a fork's
/// pull request) and the fake Attic as the lane's cache, the agent publishing.
fn publishing_rig() -> (fake_attic::FakeAttic, fake_github::FakeGitHub, Rig) {
    use base64::Engine;
    let attic = fake_attic::FakeAttic::start(&common::rig::hs256_secret(), &["tinyland"]);
    let gh = fake_github::FakeGitHub::start();
    common::rig::push_and_fork_pr_runs(&gh);
    let rig = Rig::new(
        &format!(
            "[lane.hints]\nattic_server = \"{}\"\nattic_cache = \"tinyland\"\n",
            attic.url
        ),
        None,
    );
    let install = rig.dir.path().join("install");
    std::fs::create_dir_all(install.join("bin")).unwrap();
    std::fs::copy(common::fake_listener(), install.join("bin/Runner.Listener")).unwrap();
    let app_key = rig.dir.path().join("app.pem");
    std::fs::write(&app_key, fake_github::app_key().0).unwrap();
    let attic_key = rig.dir.path().join("attic.key");
    std::fs::write(
        &attic_key,
        base64::engine::general_purpose::STANDARD.encode(common::rig::hs256_secret()),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(&rig.config).unwrap();
    std::fs::write(
        &rig.config,
        format!(
            "{cfg}\n[metrics]\nlisten = \"\"\n\n[github]\napi_url = \"{}\"\nscope = \"org\"\ntarget = \"tinyland\"\napp_id = \"{}\"\nprivate_key_file = \"{}\"\n\n[runner]\ninstall_dir = \"{}\"\nuser = \"{}\"\nname_prefix = \"publish\"\ndrain_grace = \"5s\"\nbackoff = \"100ms\"\n\n[attic]\nsigning_key_file = \"{}\"\npublish_repositories = [\"tinyland/flywheel\"]\n",
            gh.url,
            fake_github::APP_ID,
            app_key.display(),
            install.display(),
            common::runner_pool(),
            attic_key.display(),
        ),
    )
    .unwrap();
    (attic, gh, rig)
}

fn publish_job(
    rig: &Rig,
    run: &str,
    event: &str,
    git_ref: &str,
    script: String,
) -> fake_github::FakeJob {
    let mut j = fake_github::FakeJob {
        labels: vec![rig.lane.clone()],
        script,
        ..Default::default()
    };
    for (k, v) in [
        ("GITHUB_REPOSITORY", "tinyland/flywheel"),
        ("GITHUB_RUN_ID", run),
        ("GITHUB_RUN_ATTEMPT", "1"),
        ("GITHUB_EVENT_NAME", event),
        ("GITHUB_REF", git_ref),
    ] {
        j.env.insert(k.into(), v.into());
    }
    j
}

#[test]
fn a_trusted_jobs_builds_are_published_by_the_agent_and_a_pull_requests_are_not() {
    if !privileged("nix-publish") {
        return;
    }
    let (attic, gh, rig) = publishing_rig();
    let tag = unique("pub").replace('-', "");
    let shared = common::shared_dir(rig.dir.path());
    let job = |run: &str, event: &str, git_ref: &str, script: String| {
        publish_job(&rig, run, event, git_ref, script)
    };
    // The trusted push: a derivation whose output refers to another locally built one.
    let push_nix = format!(
        "let dep = derivation {{ name = \"dep-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo dependency > $out\" ]; }};\nin derivation {{ name = \"top-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; inherit dep; args = [ \"-c\" \"echo $dep > $out\" ]; }}\n"
    );
    std::fs::write(shared.join("p.nix"), push_nix).unwrap();
    std::fs::write(
        shared.join("q.nix"),
        format!("derivation {{ name = \"pr-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo pr > $out\" ]; }}\n"),
    )
    .unwrap();
    // The pull request's build that never finishes, with a name meant for the trusted job's
    // summary: on a shared store its log sits beside the trusted job's.
    std::fs::write(
        shared.join("f.nix"),
        format!("derivation {{ name = \"neighbour-fails-rotate-tokens-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo failing; exit 1\" ]; }}\n"),
    )
    .unwrap();
    let s = shared.display();
    gh.push_job(job(
        "101",
        "push",
        "refs/heads/main",
        format!("nix-build {s}/p.nix --no-out-link\nnix-store -l $(nix-instantiate {s}/p.nix) > /dev/null && touch {s}/push-read-log\ntouch {s}/push-built; for i in $(seq 100); do [ -e {s}/pr-done ] && break; sleep 0.1; done"),
    ));
    // A fork's pull request at the same time: builds, and looks for anything to push with.
    gh.push_job(job(
        "102",
        "pull_request",
        "refs/pull/5/merge",
        format!(
            "set +e\nnix-build {s}/q.nix --no-out-link\nnix-build {s}/f.nix --no-out-link && exit 9\ntouch {s}/pr-failed\nfor i in $(seq 100); do [ -e {s}/push-built ] && break; sleep 0.1; done\nnix-store -l $(nix-instantiate {s}/p.nix) > /dev/null 2>&1 && touch {s}/pr-read-log\necho \"token files: $(grep -rls 'eyJ' $HOME {state} 2>/dev/null | wc -l) env: $(env | grep -c 'eyJ')\" > {s}/pr-looked\ntouch {s}/pr-done",
            state = rig.dir.path().join("state").display()
        ),
    ));
    let (mut agent, log_path) = run_until_completed(&rig, &gh, 2);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = agent.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        std::fs::read_to_string(shared.join("pr-looked"))
            .unwrap()
            .contains("token files: 0 env: 0"),
        "{log}"
    );
    assert!(
        log.contains("the agent publishes what this job builds when it ends")
            && log.contains("flywheel: published 2 paths ("),
        "{log}"
    );
    let stored = attic.with(|s| s.caches["tinyland"].clone());
    let find = |name: &str| {
        stored
            .values()
            .find(|p| p.info["store_path"].as_str().unwrap().ends_with(name))
            .unwrap_or_else(|| panic!("{name} is not in the cache: {:?}\n{log}", stored.keys()))
            .clone()
    };
    let top = find(&format!("top-{tag}"));
    let dep = find(&format!("dep-{tag}"));
    assert!(
        !stored.values().any(|p| p.info["store_path"]
            .as_str()
            .unwrap()
            .contains(&format!("pr-{tag}"))),
        "the pull request's build was published"
    );
    // The narinfo facts, and the NAR byte for byte as `nix-store --dump` writes it.
    let dep_base = dep.info["store_path"]
        .as_str()
        .unwrap()
        .trim_start_matches("/nix/store/")
        .to_owned();
    assert_eq!(top.info["references"], serde_json::json!([dep_base]));
    assert!(
        top.uploader.contains("tinyland/flywheel:run/101/1:runner/"),
        "{}",
        top.uploader
    );
    for p in [&top, &dep] {
        let base = p.info["store_path"]
            .as_str()
            .unwrap()
            .trim_start_matches("/nix/store/");
        let out = Command::new("nix-store")
            .arg("--dump")
            .arg(rig.fresh().join("store").join(base))
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            p.nar, out.stdout,
            "{base}: the NAR differs from nix-store --dump"
        );
        assert_eq!(p.info["nar_size"].as_u64(), Some(out.stdout.len() as u64));
    }
    // The trusted job's summary shows its own builds and nothing of the pull request's,
    // whose failed build ran on the same store while the trusted job was running.
    assert!(
        shared.join("pr-failed").exists(),
        "the neighbour's build did not run: {log}"
    );
    // `nix log` in a job reads its own daemon's logs, and no neighbour's.
    assert!(shared.join("push-read-log").exists(), "{log}");
    assert!(!shared.join("pr-read-log").exists(), "{log}");
    let summaries: Vec<String> = gh.with(|s| s.summaries.values().cloned().collect());
    let trusted = summaries
        .iter()
        .find(|m| m.contains(&format!("top-{tag}")))
        .unwrap_or_else(|| panic!("no summary shows the trusted job's builds: {summaries:?}"));
    assert!(trusted.contains(&format!("dep-{tag}")), "{trusted}");
    assert!(
        !trusted.contains("neighbour-fails") && !trusted.contains(&format!("pr-{tag}")),
        "the trusted job's summary shows the pull request's builds: {trusted}"
    );
    // A real Nix client substitutes what was published into a fresh store, verifying the
    // cache's signature, and builds on top of it.
    let fresh = rig.dir.path().join("substituter-store");
    let ontop = shared.join("ontop.nix");
    std::fs::write(
        &ontop,
        format!(
            "derivation {{ name = \"ontop-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"read x < ${{builtins.storePath {top}}}; echo on top of $x > $out\" ]; }}\n",
            top = top.info["store_path"].as_str().unwrap()
        ),
    )
    .unwrap();
    let nix_opts = |c: &mut Command| {
        c.env_remove("NIX_REMOTE")
            .arg("--store")
            .arg(format!("local?root={}", fresh.display()))
            .args(["--option", "substituters"])
            .arg(format!("{}/tinyland", attic.url))
            .args(["--option", "trusted-public-keys"])
            .arg(attic.public_key("tinyland"))
            .args(["--option", "narinfo-cache-negative-ttl", "0"])
            .args(["--option", "sandbox", "true"])
            .args(["--option", "sandbox-paths", "/bin/sh=/bin/busybox"]);
    };
    let mut realise = Command::new("nix-store");
    nix_opts(&mut realise);
    let out = realise
        .args(["--realise", top.info["store_path"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "a fresh store cannot substitute the published path: {}",
        stderr(&out)
    );
    let mut build = Command::new("nix-build");
    nix_opts(&mut build);
    let out = build.arg(&ontop).arg("--no-out-link").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let built = stdout(&out).trim().to_owned();
    let text = std::fs::read_to_string(fresh.join(built.trim_start_matches('/'))).unwrap();
    assert_eq!(
        text.trim(),
        format!("on top of {}", dep.info["store_path"].as_str().unwrap()),
        "built on the substituted closure"
    );
    // The publishing tokens never existed where a job could read them.
    let tokens: Vec<String> = attic.with(|s| {
        s.tokens_seen
            .iter()
            .map(|t| t.trim_start_matches("Bearer ").to_owned())
            .collect()
    });
    assert!(!tokens.is_empty());
    let mut dirs = vec![rig.dir.path().to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                dirs.push(p);
            } else if meta.is_file() {
                let text =
                    String::from_utf8_lossy(&std::fs::read(&p).unwrap_or_default()).into_owned();
                assert!(
                    !tokens.iter().any(|t| text.contains(t.as_str())),
                    "a token is in {}",
                    p.display()
                );
            }
        }
    }
    assert!(
        !tokens.iter().any(|t| log.contains(t.as_str())),
        "a token is in the log"
    );
}

#[test]
fn a_cancelled_trusted_job_still_publishes_what_it_built() {
    if !privileged("nix-publish-cancel") {
        return;
    }
    let (attic, gh, rig) = publishing_rig();
    let tag = unique("cancel").replace('-', "");
    let shared = common::shared_dir(rig.dir.path());
    std::fs::write(
        shared.join("c.nix"),
        format!("derivation {{ name = \"cancelled-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"echo built > $out\" ]; }}\n"),
    )
    .unwrap();
    let s = shared.display();
    // It builds, then runs until it is cancelled: its completed hook never runs.
    gh.push_job(publish_job(
        &rig,
        "101",
        "push",
        "refs/heads/main",
        format!("nix-build {s}/c.nix --no-out-link && touch {s}/built; sleep 60"),
    ));
    let (mut agent, log_path) = start_run(&rig);
    wait_in_log(&log_path, || shared.join("built").exists());
    // Two signals: drain, then stop every runner now (the job is cancelled).
    let log = stop_twice(&mut agent, &log_path);
    assert!(
        !log.contains("job-completed.sh"),
        "the completed hook must not have run: {log}"
    );
    assert!(
        log.contains("after the job: published 1 paths ("),
        "the agent published after the listener stopped: {log}"
    );
    let stored = attic.with(|s| s.caches["tinyland"].clone());
    assert!(
        stored.values().any(|p| p.info["store_path"]
            .as_str()
            .unwrap()
            .ends_with(&format!("cancelled-{tag}"))),
        "{:?}",
        stored.keys()
    );
}

#[test]
fn two_bootstraps_of_one_store_at_once_install_it_once() {
    if !privileged("nix-bootstrap-lock") {
        return;
    }
    let rig = Rig::new("", None);
    let run = || {
        rig.agent(&["nix", "bootstrap", "--config", rig.config.to_str().unwrap()])
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (run(), run());
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    let links: Vec<String> = std::fs::read_dir(rig.fresh().join("var/nix/profiles"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("default-"))
        .collect();
    assert_eq!(links, vec!["default-1-link"], "one install, one generation");
    // Every store path is finished (read-only, root's) and the next check is warm.
    for e in std::fs::read_dir(rig.fresh().join("store"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
    {
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.uid(), 0);
        assert_eq!(m.mode() & 0o222, 0, "{} is writable", e.path().display());
    }
    assert!(stdout(&rig.bootstrap()).contains(": warm"));
}

/// What a store's database holds of `paths`: (path, signatures) of each valid one.
fn valid_rows(db: &Path, paths: &[&str]) -> Vec<(String, String)> {
    let db = rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .unwrap();
    let mut q = db
        .prepare("SELECT path, coalesce(sigs, '') FROM ValidPaths")
        .unwrap();
    q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .filter(|(p, _)| paths.is_empty() || paths.contains(&p.as_str()))
        .collect()
}

/// A fork's pull request runs as a runner job (trust decided at job-started from GitHub's
/// answer) beside a trusted push on one store: it builds X from a payload of its choosing,
/// adds a content-addressed path and signs paths, all in a layer of its own. Afterwards the
/// shared store's database has none of it, the trusted job finds X invalid and builds it
/// itself from the real payload, the agent publishes only that, and a later trusted job finds
/// the trusted build valid: a trusted runner job still writes the shared warm store.
#[test]
fn a_fork_pull_requests_runner_job_writes_only_a_layer_a_trusted_one_the_shared_store() {
    if !privileged("nix-runner-layer") {
        return;
    }
    let (attic, gh, rig) = publishing_rig();
    let tag = unique("rlayer").replace('-', "");
    let shared = common::shared_dir(rig.dir.path());
    let s = shared.display();
    let payload = shared.join("payload");
    std::fs::write(&payload, "evil-from-the-pr\n").unwrap();
    std::fs::set_permissions(
        &payload,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    // X's output is whatever the payload says when it is built (`sandbox = false`).
    std::fs::write(
        shared.join("x.nix"),
        format!("derivation {{ name = \"x-{tag}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"read p < {payload}; echo $p > $out\" ]; }}\n", payload = payload.display()),
    )
    .unwrap();
    let nix_out = &tarball().nix_out;
    let o = rig.bootstrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let db = rig.fresh().join("var/nix/db/db.sqlite");
    let sigs_before = valid_rows(&db, &[]);
    let job = |run: &str, event: &str, git_ref: &str, script: String| {
        publish_job(&rig, run, event, git_ref, script)
    };
    // The attack: everything a job can make its daemon write.
    gh.push_job(job(
        "102",
        "pull_request",
        "refs/pull/5/merge",
        format!(
            "set +e\n\
             X=$(nix-build {s}/x.nix --no-out-link) && nix-store --check-validity $X && echo \"prjob: valid-in-the-job $X $(cat $X)\"\n\
             echo content-{tag} > ca-file; CA=$(nix-store --add ca-file) && echo \"prjob: added $CA\"\n\
             nix-store --generate-binary-cache-key pr-1 $HOME/sk $HOME/pk\n\
             nix --extra-experimental-features nix-command store sign --key-file $HOME/sk $X {nix_out} && echo prjob: signed || echo prjob: signing-refused\n\
             echo \"prjob: sigs $(nix --extra-experimental-features nix-command path-info --sigs {nix_out})\"\n\
             echo $X $CA > {s}/pr-paths\n\
             touch {s}/pr-done"
        ),
    ));
    // The trusted push, once the pull request is done and the payload is the real one.
    gh.push_job(job(
        "101",
        "push",
        "refs/heads/main",
        format!(
            "for i in $(seq 600); do [ -e {s}/go ] && break; sleep 0.1; done\n\
             read X CA < {s}/pr-paths\n\
             for p in $X $CA; do nix-store --check-validity $p 2>/dev/null && echo \"pushjob: valid $p\" || echo \"pushjob: invalid $p\"; done\n\
             nix-build {s}/x.nix --no-out-link > {s}/push-build.txt 2>&1; echo \"pushjob: built=$(grep -c 'will be built' {s}/push-build.txt) $(cat $X)\"\n\
             echo \"pushjob: sigs $(nix --extra-experimental-features nix-command path-info --sigs {nix_out})\"\n\
             touch {s}/push-done"
        ),
    ));
    // A later trusted job on the same store finds the trusted build.
    gh.push_job(job(
        "101",
        "push",
        "refs/heads/main",
        format!(
            "for i in $(seq 600); do [ -e {s}/push-done ] && break; sleep 0.1; done\n\
             nix-build {s}/x.nix --no-out-link > later.txt 2>&1; echo \"laterjob: built=$(grep -c 'will be built' later.txt) $(cat $(tail -1 later.txt))\""
        ),
    ));
    let (mut agent, log_path) = start_run(&rig);
    let t = std::time::Instant::now();
    wait_for(&shared.join("pr-done"), "the pull request's end");
    std::fs::write(&payload, "good-from-main\n").unwrap();
    std::fs::write(shared.join("go"), "").unwrap();
    while gh.with(|s| s.completed.len()) < 3 {
        assert!(
            t.elapsed().as_secs() < 180,
            "{:?}\n{}",
            gh.with(|s| s.completed.clone()),
            std::fs::read_to_string(&log_path).unwrap()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = agent.wait();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let said = |what: &str| -> String {
        log.lines()
            .filter_map(|l| {
                l.find(what)
                    .map(|i| l[i..].split(" stream=").next().unwrap_or("").to_owned())
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    eprintln!(
        "{}\n{}\n{}",
        said("prjob: "),
        said("pushjob: "),
        said("laterjob: ")
    );

    // Trust was decided at job-started, and each job got the store it was owed.
    assert!(
        log.contains("flywheel: store: not trusted to publish")
            && log.contains("flywheel: store: trusted"),
        "{log}"
    );
    // The attack ran: the pull request built X from its payload, added a path, and saw what
    // it built in its own store.
    let paths = std::fs::read_to_string(shared.join("pr-paths")).unwrap();
    let paths: Vec<&str> = paths.split_whitespace().collect();
    assert_eq!(paths.len(), 2, "{paths:?}\n{log}");
    let (x, ca) = (paths[0], paths[1]);
    assert!(
        said("prjob: ").contains(&format!("valid-in-the-job {x} evil-from-the-pr")),
        "{log}"
    );
    assert!(said("prjob: ").contains(&format!("added {ca}")), "{log}");
    // Signing was tried: Nix 2.8's daemon refuses an untrusted user's signatures; a newer one
    // takes them (into the layer).
    assert!(
        said("prjob: ").contains("prjob: signed")
            || said("prjob: ").contains("prjob: signing-refused"),
        "{log}"
    );
    if said("prjob: ").contains("prjob: signed") {
        assert!(
            said("prjob: sigs").contains("pr-1:"),
            "signed in its own store: {log}"
        );
    }
    // …and it failed: the shared store's database has none of it, no signature of its key.
    assert!(
        valid_rows(&db, &[ca]).is_empty(),
        "the pull request's added path is in the shared store"
    );
    let after = valid_rows(&db, &[]);
    assert!(
        !after.iter().any(|(_, sig)| sig.contains("pr-1:")),
        "a signature of the pull request's key is in the shared store"
    );
    for (p, sig) in &sigs_before {
        assert!(after.iter().any(|(q, s)| q == p && s == sig), "{p} changed");
    }
    // The trusted job found none of it valid, built X itself from the real payload, and saw
    // no signature of the pull request's key.
    let push = said("pushjob: ");
    assert!(
        push.contains(&format!("pushjob: invalid {x}")),
        "{push}\n{log}"
    );
    assert!(push.contains(&format!("pushjob: invalid {ca}")), "{push}");
    assert!(push.contains("pushjob: built=1 good-from-main"), "{push}");
    assert!(!said("pushjob: sigs").contains("pr-1:"), "{push}");
    // The agent published the trusted build only: X as main built it, nothing of the PR's.
    let stored = attic.with(|s| s.caches.get("tinyland").cloned().unwrap_or_default());
    let uploads = attic.with(|s| s.uploads.clone());
    let xs: Vec<_> = stored
        .values()
        .filter(|p| p.info["store_path"].as_str() == Some(x))
        .collect();
    assert_eq!(xs.len(), 1, "X was published once: {uploads:?}\n{log}");
    assert!(
        String::from_utf8_lossy(&xs[0].nar).contains("good-from-main"),
        "the published X is main's"
    );
    assert!(
        !stored.values().any(
            |p| String::from_utf8_lossy(&p.nar).contains("evil-from-the-pr")
                || p.info["store_path"].as_str() == Some(ca)
        ),
        "something of the pull request's was published: {uploads:?}"
    );
    // A trusted job's build landed in the shared store: the later job finds it.
    assert!(
        valid_rows(&db, &[x]).len() == 1,
        "the trusted build is in the shared store"
    );
    assert!(
        said("laterjob: ").contains("laterjob: built=0 good-from-main"),
        "{}\n{log}",
        said("laterjob: ")
    );
    // Nothing of the layers or views is left.
    let left: Vec<_> = std::fs::read_dir(rig.dir.path().join("work"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".layer"))
        .collect();
    assert!(left.is_empty(), "a layer was left: {left:?}");
    let views = rig.dir.path().join("state/nix-views");
    assert_eq!(
        std::fs::read_dir(&views).map_or(0, |d| d.count()),
        0,
        "a store view was left"
    );
}

/// A runner whose listener ends before its job-started hook (here: stopped while it waits
/// for its job) never gets a store or a daemon, and its teardown leaves nothing: no view, no
/// layer, no socket or `/tmp` of a daemon, no teardown error.
#[test]
fn a_runner_that_ends_before_job_started_gets_no_store_and_leaves_nothing() {
    if !privileged("nix-runner-no-hook") {
        return;
    }
    let (_attic, gh, rig) = publishing_rig();
    let mut j = publish_job(&rig, "101", "push", "refs/heads/main", "true".into());
    j.delay_ms = 60_000;
    gh.push_job(j);
    let (mut agent, log_path) = start_run(&rig);
    let views = rig.dir.path().join("state/nix-views");
    // Its listener runs (the job's mount namespace holds the view) and waits for its job.
    wait_in_log(&log_path, || {
        std::fs::read_dir(&views).map_or(0, |d| d.count()) > 0
            && std::fs::read_to_string(&log_path)
                .unwrap()
                .contains("Listening for Jobs")
    });
    let log = stop_twice(&mut agent, &log_path);
    assert!(
        !log.contains("job-started.sh") && !log.contains("flywheel: store:"),
        "{log}"
    );
    assert!(!log.contains("the job's nix-daemon is listening"), "{log}");
    assert!(
        !log.contains("teardown failed") && !log.contains("left things behind"),
        "{log}"
    );
    for dir in ["state/nix-views", "state/nix-tmp", "state/nix-sockets"] {
        let left: Vec<_> = std::fs::read_dir(rig.dir.path().join(dir))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != "post-build.sh")
            .collect();
        assert!(left.is_empty(), "{dir}: {left:?}\n{log}");
    }
    let layers: Vec<_> = std::fs::read_dir(rig.dir.path().join("work"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(layers.is_empty(), "{layers:?}");
}

/// [`publishing_rig`], bootstrapped, with a directory its jobs and the test share.
fn bootstrapped_publishing_rig() -> (fake_attic::FakeAttic, fake_github::FakeGitHub, Rig, PathBuf) {
    let (attic, gh, rig) = publishing_rig();
    let shared = common::shared_dir(rig.dir.path());
    let o = rig.bootstrap();
    assert!(o.status.success(), "{}", stderr(&o));
    (attic, gh, rig, shared)
}

/// The uids of the running processes whose command line contains `marker`.
fn uids_running(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(marker))
        })
        .filter_map(|e| {
            let status = std::fs::read_to_string(e.path().join("status")).ok()?;
            let uid = status.lines().find(|l| l.starts_with("Uid:"))?;
            uid.split_whitespace().nth(1)?.parse().ok()
        })
        .collect()
}

/// With the default build-user pool (`<nix_store>/var/nix/userpool`, in the store an
/// untrusted job's layer covers), a fork's pull request's daemon and a trusted push's daemon
/// on the same store take their build users from the one real pool: two builds running at once
/// run as two different `nixbld` users, and neither is killed by the other's start (Nix kills
/// a build user's processes before it builds as that user).
#[test]
fn an_untrusted_and_a_trusted_jobs_builds_never_share_a_build_user() {
    if !privileged("nix-runner-userpool") {
        return;
    }
    let (_attic, gh, rig) = publishing_rig();
    // The default pool: no `userpool` line.
    let cfg = std::fs::read_to_string(&rig.config).unwrap();
    let cfg: String = cfg
        .lines()
        .filter(|l| !l.starts_with("userpool = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&rig.config, cfg).unwrap();
    // Rigs of other tests running at once share another pool: keep them off the first build
    // users, which this rig's daemons take.
    let _reserved: Vec<std::fs::File> = (1..=3)
        .map(|i| {
            let uid = nix::unistd::User::from_name(&format!("nixbld{i}"))
                .unwrap()
                .unwrap()
                .uid;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(shared_userpool().join(uid.to_string()))
                .unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: flock(2) on a file we hold.
            assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
            f
        })
        .collect();
    let tag = unique("upool").replace('-', "");
    let shared = common::shared_dir(rig.dir.path());
    let s = shared.display();
    for who in ["push", "pr"] {
        std::fs::write(
            shared.join(format!("{who}.nix")),
            format!("derivation {{ name = \"u-{who}\"; system = \"x86_64-linux\"; builder = \"/bin/sh\"; args = [ \"-c\" \"export PATH=/usr/bin:/bin; echo builder-{tag}-{who}; while [ ! -e {s}/go ]; do sleep 0.1; done; id -u > $out\" ]; }}\n"),
        )
        .unwrap();
    }
    let o = rig.bootstrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let script = |who: &str| {
        format!(
            "nix-build {s}/{who}.nix --no-out-link > out.txt 2>&1 && echo \"{who}job: built uid=$(cat $(tail -1 out.txt))\" || echo \"{who}job: failed $(tail -6 out.txt | tr '\\n' ' ')\""
        )
    };
    gh.push_job(publish_job(
        &rig,
        "101",
        "push",
        "refs/heads/main",
        script("push"),
    ));
    gh.push_job(publish_job(
        &rig,
        "102",
        "pull_request",
        "refs/pull/5/merge",
        script("pr"),
    ));
    let (mut agent, log_path) = start_run(&rig);
    // Both builders running at once, each as the build user its daemon locked.
    let t = std::time::Instant::now();
    let (mut push_uids, mut pr_uids) = (Vec::new(), Vec::new());
    while t.elapsed().as_secs() < 60 {
        push_uids = uids_running(&format!("builder-{tag}-push"));
        pr_uids = uids_running(&format!("builder-{tag}-pr"));
        if !push_uids.is_empty() && !pr_uids.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Still both there a moment later: neither build user was taken over.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let later = (
        uids_running(&format!("builder-{tag}-push")),
        uids_running(&format!("builder-{tag}-pr")),
    );
    std::fs::write(shared.join("go"), "").unwrap();
    while gh.with(|s| s.completed.len()) < 2 && t.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = stop_twice(&mut agent, &log_path);
    eprintln!("build users: push {push_uids:?}, pr {pr_uids:?}, a moment later {later:?}");
    assert!(
        log.contains("flywheel: store: not trusted to publish")
            && log.contains("flywheel: store: trusted"),
        "{log}"
    );
    assert!(
        !push_uids.is_empty() && !pr_uids.is_empty(),
        "the two builds never ran at once: push {push_uids:?}, pr {pr_uids:?}\n{log}"
    );
    assert!(
        push_uids.iter().all(|u| !pr_uids.contains(u)),
        "both daemons built as one build user: push {push_uids:?}, pr {pr_uids:?}"
    );
    assert!(
        !later.0.is_empty() && !later.1.is_empty(),
        "a builder was killed: {later:?}\n{log}"
    );
    for who in ["push", "pr"] {
        assert!(
            log.contains(&format!("{who}job: built uid=")),
            "{who}: {log}"
        );
    }
}

/// With `/` shared in the agent's namespace (systemd's default for a service), two trusted
/// runner jobs' stores, daemon sockets and build logs stay each in its own job: the copy of
/// the store the agent attaches on a job's view joins no peer group of the agent's `/nix`, so
/// nothing mounted on it appears in the agent's namespace or in the job beside it.
#[test]
fn with_a_shared_root_a_jobs_store_mounts_reach_neither_the_agent_nor_the_job_beside_it() {
    if !privileged("nix-runner-shared-root") {
        return;
    }
    let (_attic, gh, rig, shared) = bootstrapped_publishing_rig();
    let s = shared.display();
    let script = format!(
        "touch {s}/opened.$$\n\
         for i in $(seq 600); do [ $(ls {s} | grep -c '^opened') -ge 2 ] && break; sleep 0.1; done\n\
         echo \"mounts: socket=$(grep -c ' /nix/var/nix/daemon-socket ' /proc/self/mountinfo) logs=$(grep -c ' /nix/var/log/nix ' /proc/self/mountinfo)\"\n\
         touch {s}/checked.$$\n\
         for i in $(seq 600); do [ -e {s}/go ] && break; sleep 0.1; done"
    );
    for _ in 0..2 {
        gh.push_job(publish_job(
            &rig,
            "101",
            "push",
            "refs/heads/main",
            script.clone(),
        ));
    }
    let (mut agent, log_path) = start_run_in(&rig, "--make-rshared", "exec \"$@\"");
    let checked = || {
        std::fs::read_dir(&shared)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("checked"))
            .count()
            >= 2
    };
    wait_in_log(&log_path, checked);
    // The agent's namespace, with both jobs' stores open: nothing below its `/nix`.
    let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", agent.id())).unwrap();
    let mounted: Vec<&str> = info
        .lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with("/nix/")))
        .collect();
    std::fs::write(shared.join("go"), "").unwrap();
    let t = std::time::Instant::now();
    while gh.with(|s| s.completed.len()) < 2 && t.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = stop_twice(&mut agent, &log_path);
    let said: Vec<&str> = log
        .lines()
        .filter_map(|l| l.find("mounts: ").map(|i| &l[i..]))
        .map(|l| l.split(" stream=").next().unwrap_or(""))
        .collect();
    eprintln!("jobs: {said:?}\nthe agent's mounts below /nix: {mounted:?}");
    assert_eq!(
        log.matches("flywheel: store: trusted").count(),
        2,
        "both jobs trusted: {log}"
    );
    assert!(
        mounted.is_empty(),
        "a job's mounts appeared in the agent's namespace: {mounted:#?}"
    );
    assert_eq!(
        said, ["mounts: socket=1 logs=1"; 2],
        "a job sees another job's socket or logs: {log}"
    );
}

/// Stop the agent the shell `holder` of a mount namespace runs now (two SIGTERMs), and wait
/// for the shell.
fn stop_the_agent_in(holder: &mut std::process::Child) {
    let ns = holder.id();
    let agent = std::fs::read_to_string(format!("/proc/{ns}/task/{ns}/children"))
        .unwrap_or_default()
        .trim()
        .parse::<i32>();
    if let Ok(p) = agent {
        for _ in 0..2 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGTERM,
            );
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
    let _ = holder.wait();
}

/// The mount points in the mount namespace of `pid` whose path contains `part`.
fn mounts_of(pid: u32, part: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.contains(part))
        .map(str::to_owned)
        .collect()
}

/// An agent killed while an untrusted runner job's store is open leaves the job's view (the
/// layer's copy, the socket and logs on it) and its layer mounted in its namespace; the next
/// start in that namespace unmounts and removes both before it runs anything.
#[test]
fn a_killed_agents_store_views_and_layers_are_unmounted_and_removed_at_the_next_start() {
    if !privileged("nix-runner-views-swept") {
        return;
    }
    let (_attic, gh, rig, shared) = bootstrapped_publishing_rig();
    let s = shared.display();
    gh.push_job(publish_job(
        &rig,
        "102",
        "pull_request",
        "refs/pull/5/merge",
        format!("touch {s}/opened; sleep 600"),
    ));
    // One mount namespace for both agents: the first is killed, the second starts in it.
    let (mut holder, log_path) = start_run_in(&rig, "--make-rprivate", "\"$@\"; \"$@\"");
    let ns = holder.id();
    wait_for(&shared.join("opened"), "the pull request's job");
    let views = rig.dir.path().join("state/nix-views");
    let work = rig.dir.path().join("work");
    let (views_s, work_s) = (views.display().to_string(), work.display().to_string());
    let first = std::fs::read_to_string(format!("/proc/{ns}/task/{ns}/children"))
        .unwrap()
        .trim()
        .parse::<i32>()
        .unwrap();
    // The first agent's jobs' (their names carry its pid).
    let of_first = |m: Vec<String>| -> Vec<String> {
        m.into_iter()
            .filter(|p| p.contains(&format!(".{first}.")))
            .collect()
    };
    let before = (
        of_first(mounts_of(ns, &views_s)),
        of_first(mounts_of(ns, &work_s)),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The second agent reconciled (before it starts any runner).
    wait_in_log(&log_path, || {
        std::fs::read_to_string(&log_path)
            .unwrap()
            .matches("startup reconciliation done")
            .count()
            >= 2
    });
    let after = (
        of_first(mounts_of(ns, &views_s)),
        of_first(mounts_of(ns, &work_s)),
    );
    let left_dirs: Vec<_> = [&views, &work]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(&format!(".{first}.")))
        .collect();
    stop_the_agent_in(&mut holder);
    let log = std::fs::read_to_string(&log_path).unwrap();
    eprintln!("before: {before:?}\nafter: {after:?}\nleft: {left_dirs:?}");
    // The premise: the killed agent's namespace held the job's view and layer.
    assert!(
        log.contains("flywheel: store: not trusted to publish"),
        "{log}"
    );
    assert!(
        !before.0.is_empty() && !before.1.is_empty(),
        "no view or layer mounted before the kill: {before:?}\n{log}"
    );
    assert!(
        after.0.is_empty() && after.1.is_empty(),
        "left mounted after the next start: {after:?}\n{log}"
    );
    assert!(left_dirs.is_empty(), "left behind: {left_dirs:?}\n{log}");
}

/// An agent SIGKILLed at each step of a fork's pull request's runner job on a Nix lane (its
/// receipt's entries: the daemon's socket directory and `/tmp`, the store view, the build
/// record and logs, the per-user profiles; the job running; at job-started the daemon's id
/// range, the layer and the view's mounts; its teardown) leaves nothing once the next agent
/// started in the same mount namespace, and that agent's runners take both of the lane's
/// slots. The kill is the
/// agent's own failpoint (`FLYWHEEL_KILL_AT`, debug builds), just before the entry is recorded.
#[test]
fn an_agent_killed_at_each_step_of_a_nix_runner_job_leaves_nothing_at_the_next_start() {
    if !privileged("nix-runner-receipts") {
        return;
    }
    let (_attic, gh, rig, _shared) = bootstrapped_publishing_rig();
    let state = rig.dir.path().join("state");
    let work = rig.dir.path().join("work");
    let mgr = flywheel_agent::cgroup::detect(Path::new("/sys/fs/cgroup"), None).unwrap();
    let left = || -> Vec<String> {
        let mut all: Vec<String> = mgr
            .list()
            .unwrap()
            .into_iter()
            .filter(|n| n.starts_with(&format!("{}.", rig.lane)))
            .map(|c| format!("cgroup {c}"))
            .collect();
        let dirs = [
            "receipts",
            "nix-views",
            "nix-sockets",
            "nix-logs",
            "nix-tmp",
            "hook-sockets",
            "netrc",
        ]
        .map(|d| state.join(d));
        for d in dirs.iter().chain([&work]) {
            all.extend(
                std::fs::read_dir(d)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path().display().to_string())
                    // The daemons' post-build hook is every job's.
                    .filter(|p| !p.ends_with("/post-build.sh")),
            );
        }
        all
    };
    for phase in [
        "daemon-socket",
        "daemon-tmp",
        "view",
        "built",
        "build-logs",
        "per-user",
        "launched",
        "id-lock",
        "layer",
        "view-mounts",
        "teardown",
    ] {
        // A fork's pull request for the steps at and after its job-started hook.
        if ["id-lock", "layer", "view-mounts", "teardown"].contains(&phase) {
            gh.push_job(publish_job(
                &rig,
                "102",
                "pull_request",
                "refs/pull/5/merge",
                "true".into(),
            ));
        }
        // One mount namespace for both agents: the first is killed at `phase`, the second
        // starts in it once the test has looked at what the first left.
        let go = rig.dir.path().join(format!("go-{phase}"));
        let dead = rig.dir.path().join(format!("dead-{phase}"));
        let (mut holder, log_path) = start_run_in(
            &rig,
            "--make-rprivate",
            &format!(
                "FLYWHEEL_KILL_AT={phase} \"$@\"; touch {}; while [ ! -e {} ]; do sleep 0.05; done; \"$@\"",
                dead.display(),
                go.display()
            ),
        );
        let log = || std::fs::read_to_string(&log_path).unwrap();
        wait_in_log(&log_path, || {
            log().contains(&format!("failpoint=\"{phase}\"")) && dead.exists()
        });
        let before = left();
        std::fs::write(&go, "").unwrap();
        wait_in_log(&log_path, || {
            log().matches("startup reconciliation done").count() >= 2
        });
        // No slot is lost: the next agent's runners take both of the lane's.
        let took = |slot: u32| {
            let log = log();
            let since = log
                .match_indices("startup reconciliation done")
                .nth(1)
                .map_or(log.len(), |(i, _)| i);
            log[since..].lines().any(|l| {
                l.contains("fast-local scratch ok") && l.contains(&format!("slot={slot} "))
            })
        };
        wait_in_log(&log_path, || took(0) && took(1));
        stop_the_agent_in(&mut holder);
        let after = left();
        let log = log();
        eprintln!("killed at {phase}: left {before:#?}; after the next start: {after:?}");
        assert!(
            before.iter().any(|p| p.contains("/receipts/")),
            "the premise at {phase}: the killed agent left its job's receipt: {before:#?}\n{log}"
        );
        assert!(
            after.is_empty(),
            "killed at {phase}, left after the next start: {after:#?}\n(before: {before:#?})\n{log}"
        );
    }
}

/// A store with a filesystem mounted below it (a separate `/nix/store`; here a tmpfs on
/// `var/extra`) cannot be shown through an untrusted job's layer (overlayfs shows the store's
/// own filesystem only): the job fails at its job-started hook, saying why, and runs no step.
#[test]
fn an_untrusted_job_on_a_store_with_mounts_below_it_is_refused_its_layer() {
    if !privileged("nix-runner-submount") {
        return;
    }
    let (_attic, gh, rig, _shared) = bootstrapped_publishing_rig();
    gh.push_job(publish_job(
        &rig,
        "102",
        "pull_request",
        "refs/pull/5/merge",
        "echo prjob: ran".into(),
    ));
    let (mut agent, log_path) = start_run_in(
        &rig,
        "--make-rprivate",
        "mkdir -p /nix/var/extra && mount -t tmpfs tmpfs /nix/var/extra && exec \"$@\"",
    );
    let t = std::time::Instant::now();
    while gh.with(|s| s.completed.len()) < 1 && t.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = stop_twice(&mut agent, &log_path);
    assert!(
        log.contains("has filesystems mounted below it (/nix/var/extra)"),
        "{log}"
    );
    assert!(!log.contains("prjob: ran"), "{log}");
}

/// An untrusted job's layer starts with a snapshot of the store's database (one read
/// transaction) and the store's WAL and shared-memory files whited out: its daemon never copies
/// up a database trusted daemons are writing, nor reads their live WAL; it still finds the warm
/// store's paths valid.
#[test]
fn an_untrusted_jobs_layer_starts_with_a_snapshot_of_the_database_not_its_live_wal() {
    if !privileged("nix-runner-db-snapshot") {
        return;
    }
    use std::os::unix::fs::FileTypeExt;
    let (_attic, gh, rig, shared) = bootstrapped_publishing_rig();
    let s = shared.display();
    let nix_out = &tarball().nix_out;
    gh.push_job(publish_job(
        &rig,
        "102",
        "pull_request",
        "refs/pull/5/merge",
        format!(
            "touch {s}/opened\n\
             for i in $(seq 600); do [ -e {s}/go ] && break; sleep 0.1; done\n\
             nix-store --check-validity {nix_out} && echo prjob: warm-valid"
        ),
    ));
    let (mut agent, log_path) = start_run(&rig);
    wait_for(&shared.join("opened"), "the pull request's job");
    let layer = std::fs::read_dir(rig.dir.path().join("work"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".layer"))
        .expect("the job's layer");
    let db = layer.join("upper/var/nix/db");
    let kinds: Vec<(String, bool)> = ["db.sqlite-wal", "db.sqlite-shm"]
        .iter()
        .map(|n| {
            let t = std::fs::symlink_metadata(db.join(n)).map(|m| m.file_type());
            (n.to_string(), t.is_ok_and(|t| t.is_char_device()))
        })
        .collect();
    // The layer as the agent made it (the job has not talked to its daemon yet).
    let copy = rig.dir.path().join("snapshot.sqlite");
    let rows = std::fs::copy(db.join("db.sqlite"), &copy)
        .map(|_| valid_rows(&copy, &[nix_out]))
        .unwrap_or_default();
    std::fs::write(shared.join("go"), "").unwrap();
    let t = std::time::Instant::now();
    while gh.with(|s| s.completed.len()) < 1 && t.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let log = stop_twice(&mut agent, &log_path);
    assert!(log.contains("prjob: warm-valid"), "{log}");
    assert!(
        kinds.iter().all(|(_, whiteout)| *whiteout),
        "the store's WAL files are not whited out in the layer: {kinds:?}"
    );
    assert_eq!(rows.len(), 1, "the snapshot lacks the warm store's paths");
}
