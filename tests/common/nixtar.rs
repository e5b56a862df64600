//! A Nix release tarball made from real store paths built by the host's Nix (Debian's
//! nix-bin), for the tests that bootstrap and build with real Nix.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub const VERSION: &str = "2.8.0-flywheel";

/// The advisories the host's Nix 2.8 is affected by, acknowledged in every test config that
/// runs it (`advisory`): the tests need a daemon, and 2.8 predates both fixes.
pub const ACKNOWLEDGED: &str = "acknowledged_advisories = [\"CVE-2026-39860\", \"CVE-2024-27297\"]";

/// A release tarball in the official layout, made from real store paths built by the host's
/// Nix: a `nix-<VERSION>` package whose programs are the host's, and a dependency.
pub struct Tarball {
    pub path: PathBuf,
    pub sha256: String,
    pub nix_out: String,
}

pub fn sh(cmd: &str) -> String {
    // The host's Nix, offline: no substituters to time out on.
    let o = Command::new("sh")
        .args(["-c", cmd])
        .env_remove("NIX_REMOTE")
        .env(
            "NIX_CONFIG",
            "substituters =\nsandbox = false\nbuild-users-group =",
        )
        .output()
        .expect("sh");
    assert!(
        o.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

pub fn tarball() -> &'static Tarball {
    static T: OnceLock<Tarball> = OnceLock::new();
    T.get_or_init(|| {
        sweep_gone("flywheel-nix-tarball-");
        let dir = std::env::temp_dir().join(format!("flywheel-nix-tarball-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let expr = dir.join("nix.nix");
        std::fs::write(
            &expr,
            format!(
                r#"let
  dep = derivation {{ name = "flywheel-test-dep"; system = "x86_64-linux"; builder = "/bin/sh";
    args = [ "-c" "echo dependency > $out" ]; }};
in derivation {{ name = "nix-{VERSION}"; system = "x86_64-linux"; builder = "/bin/sh"; inherit dep;
  args = [ "-c" "export PATH=/usr/bin:/bin; mkdir -p $out/bin; for n in nix nix-store nix-daemon nix-build nix-env nix-instantiate; do printf '#!/bin/sh\nexec /usr/bin/%s \"$@\"\n' $n > $out/bin/$n; chmod +x $out/bin/$n; done; echo $dep > $out/dep" ]; }}
"#
            ),
        )
        .expect("expr");
        let out = sh(&format!("nix-build {} --no-out-link", expr.display()));
        let closure = sh(&format!("nix-store -qR {out}"));
        let top = dir.join(format!("nix-{VERSION}-x86_64-linux"));
        std::fs::create_dir_all(top.join("store")).expect("store");
        for p in closure.lines() {
            sh(&format!("cp -a {p} {}/store/", top.display()));
        }
        sh(&format!("nix-store --dump-db {} > {}/.reginfo", closure.lines().collect::<Vec<_>>().join(" "), top.display()));
        let path = dir.join(format!("nix-{VERSION}-x86_64-linux.tar.xz"));
        sh(&format!("tar -C {} -cJf {} {}", dir.display(), path.display(), top.file_name().unwrap().to_string_lossy()));
        let sha256 = sh(&format!("sha256sum {} | cut -d' ' -f1", path.display()));
        Tarball { path, sha256, nix_out: out }
    })
}

/// One build-user pool for every rig of this test process (see `nix.userpool`).
pub fn shared_userpool() -> PathBuf {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| sweep_gone("flywheel-nix-userpool-"));
    let p = std::env::temp_dir().join(format!("flywheel-nix-userpool-{}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

/// Remove `<tmp>/<prefix><pid>` directories of test processes that are gone (one per test
/// process, made by statics that are never dropped).
fn sweep_gone(prefix: &str) {
    for e in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(prefix) {
            if !Path::new("/proc").join(pid).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The `[nix]` section for the test tarball baked into an image at
/// `/var/lib/flywheel-agent/nix/` (offline: no substituters, no sandbox).
pub fn image_nix_section() -> String {
    let t = tarball();
    format!(
        "[nix]\ntarball = \"/var/lib/flywheel-agent/nix/{}\"\nversion = \"{VERSION}\"\n{ACKNOWLEDGED}\nsha256 = \"{}\"\nsandbox = false\nsubstituters = []\ntrusted_public_keys = []\n",
        t.path.file_name().unwrap_or_default().to_string_lossy(),
        t.sha256
    )
}
