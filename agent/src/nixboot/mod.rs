//! Deterministic Nix bootstrap: the pinned release tarball, hash-verified before anything is
//! unpacked, installed offline into a root-owned read-only store, registered with
//! `nix-store --load-db`, configured with a byte-stable `nix.conf`, and recorded in a receipt
//! written atomically. A warm check that finds everything right changes nothing; drift (another
//! version, an edited `nix.conf`, missing store paths, a receipt from another version) is
//! repaired from the tarball.
//!
//! Phases, timed separately and never mixed with build time: verify, unpack, register,
//! configure.

use std::path::{Path, PathBuf};
use std::time::Duration;

mod conf;
mod pin;
mod receipt;
mod slot;
mod steps;

pub use conf::{free_thresholds, gc_bytes, plan_for, render_conf};
pub use pin::{current_system, pin, sha256_file, Pin, PinSystem, PIN_TOML};
pub use receipt::{receipt_path, Receipt};
pub use slot::{ensure_for_job, enter_store_namespace, gc_slot, SlotStore};
pub use steps::ensure;

#[derive(Debug, thiserror::Error)]
pub enum NixError {
    #[error("the pinned Nix manifest is invalid: {0}")]
    Manifest(String),
    #[error("no pinned Nix tarball for system {0}: add it to images/nix-pin.toml")]
    NoSystem(String),
    #[error("nix tarball {path}: {source}; put the pinned release there (the runner image bakes it), set nix.tarball, or run `flywheel-agent nix bootstrap --url URL`")]
    Tarball {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("nix tarball {path} has sha256 {got}, expected {want}: refusing to install it (nothing in the store changed)")]
    HashMismatch {
        path: PathBuf,
        got: String,
        want: String,
    },
    #[error(
        "nix tarball {0} is not in the official layout (nix-<version>-<system>/store, .reginfo)"
    )]
    Layout(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NixError {
    let what = what.into();
    move |source| NixError::Io { what, source }
}

/// What to make true.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The Nix root, `/nix` as the jobs see it.
    pub nix_root: PathBuf,
    pub tarball: PathBuf,
    pub sha256: String,
    pub conf_file: PathBuf,
    pub conf_text: String,
    pub netrc_file: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    pub check: Duration,
    pub verify: Duration,
    pub unpack: Duration,
    pub register: Duration,
    pub configure: Duration,
}

/// What a bootstrap did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// False when the warm check found everything right and changed nothing.
    pub cold: bool,
    pub version: String,
    pub nix_path: PathBuf,
    /// What was repaired or installed.
    pub changed: Vec<String>,
    pub timings: Timings,
    /// The summary of a bootstrap done by a child process (a slot's store), as it said it.
    pub relayed: Option<String>,
}

impl Report {
    /// `cold` or `warm`: the metrics' label and the word for the store it left.
    pub fn warmth(&self) -> &'static str {
        if self.cold {
            "cold"
        } else {
            "warm"
        }
    }

    /// One line for a job log: warm/cold, version, time.
    pub fn summary(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        if let Some(line) = &self.relayed {
            line.clone()
        } else if self.cold {
            format!(
                "nix {}: cold bootstrap in {:.0} ms (verify {:.0} ms, unpack {:.0} ms, register {:.0} ms, configure {:.1} ms): {}",
                self.version,
                ms(self.timings.check + self.timings.verify + self.timings.unpack + self.timings.register + self.timings.configure),
                ms(self.timings.verify),
                ms(self.timings.unpack),
                ms(self.timings.register),
                ms(self.timings.configure),
                self.changed.join(", ")
            )
        } else if self.changed.is_empty() {
            format!(
                "nix {}: warm (verified in {:.1} ms)",
                self.version,
                ms(self.timings.check)
            )
        } else {
            format!(
                "nix {}: warm (verified in {:.1} ms; {})",
                self.version,
                ms(self.timings.check),
                self.changed.join(", ")
            )
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NixError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    crate::workdir::write_atomic(path, bytes, mode)
        .map_err(io(format!("replace {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::steps::{remove_stale_staging, unpack_verified, STAGING_PREFIX};
    use super::*;
    use crate::config::{parse, HostFacts, Origin};

    fn cfg(extra: &str) -> crate::config::Config {
        let src = format!("[[lane]]\nname = \"l\"\nmemory = \"8Gi\"\n{extra}");
        parse(
            &src,
            &Origin::Embedded,
            &HostFacts {
                memory_bytes: 1 << 40,
                cpus: 8,
            },
        )
        .expect("parses")
    }

    #[test]
    fn the_pin_parses_and_names_this_system() {
        let p = pin().expect("pin");
        assert!(!p.version.is_empty());
        let s = p.systems.get("x86_64-linux").expect("x86_64");
        assert_eq!(s.sha256.len(), 64);
        assert!(s
            .url
            .ends_with(&format!("nix-{}-x86_64-linux.tar.xz", p.version)));
    }

    #[test]
    fn conf_is_deterministic_and_never_trusts_the_job_user() {
        let c = cfg("[lane.hints]\nattic_server = \"http://127.0.0.1:1\"\nattic_cache = \"c\"\nattic_public_key = \"c:KEY=\"\n");
        let a = render_conf(&c.lanes[0], &c.nix, 100 << 30, 16);
        let b = render_conf(&c.lanes[0], &c.nix, 100 << 30, 16);
        assert_eq!(a.as_bytes(), b.as_bytes());
        assert!(a.contains("\ntrusted-users = root\n"));
        assert!(a.contains("\naccept-flake-config = false\n"));
        assert!(
            a.contains("\nsubstituters = https://cache.nixos.org http://127.0.0.1:1/c\n"),
            "{a}"
        );
        assert!(a.contains("trusted-public-keys = cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= c:KEY=\n"));
        assert!(
            a.contains("\nmax-jobs = 4\n") && a.contains("\ncores = 4\n"),
            "{a}"
        );
        assert!(a.contains("\nmin-free = 5368709120\n"), "{a}");
        assert!(a.contains("\nnetrc-file = /etc/nix/netrc\n"));
        assert!(a.contains("\nrequire-sigs = true\n"));
        assert_ne!(a, render_conf(&c.lanes[0], &c.nix, 200 << 30, 16));
    }

    #[test]
    fn free_thresholds_scale_and_cap() {
        assert_eq!(free_thresholds(100 << 30), (5 << 30, 15 << 30));
        assert_eq!(free_thresholds(10 << 40), (10 << 30, 50 << 30));
    }

    #[test]
    fn sha256_of_a_file() {
        let t = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(t.path(), b"abc").expect("write");
        assert_eq!(
            sha256_file(t.path()).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    fn tarball_bytes() -> Vec<u8> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, "nix-1.0-x/store/abc-hello/file", &b"hello"[..])
            .unwrap();
        let raw = tar.into_inner().unwrap();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        std::io::Write::write_all(&mut xz, &raw).unwrap();
        xz.finish().unwrap()
    }

    fn plan_for_tarball(dir: &Path, bytes: &[u8], sha: Option<&str>) -> Plan {
        let tarball = dir.join("nix.tar.xz");
        std::fs::write(&tarball, bytes).unwrap();
        Plan {
            nix_root: dir.join("nix"),
            sha256: sha.map_or_else(|| sha256_file(&tarball).unwrap(), str::to_owned),
            tarball,
            conf_file: dir.join("nix.conf"),
            conf_text: String::new(),
            netrc_file: dir.join("netrc"),
        }
    }

    #[test]
    fn the_tarball_is_unpacked_and_hashed_in_one_read() {
        let d = tempfile::tempdir().unwrap();
        let plan = plan_for_tarball(d.path(), &tarball_bytes(), None);
        let staging = d.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        unpack_verified(&plan, &staging).unwrap();
        assert_eq!(
            std::fs::read(staging.join("nix-1.0-x/store/abc-hello/file")).unwrap(),
            b"hello"
        );
    }

    #[test]
    fn a_tarball_with_another_hash_or_damaged_is_a_hash_mismatch() {
        let d = tempfile::tempdir().unwrap();
        let plan = plan_for_tarball(d.path(), &tarball_bytes(), Some(&"0".repeat(64)));
        let staging = d.path().join("staging");
        std::fs::create_dir(&staging).unwrap();
        let e = unpack_verified(&plan, &staging).unwrap_err();
        assert!(matches!(e, NixError::HashMismatch { .. }), "{e}");
        // Damaged: not even xz. Still the hash decides, not the decoder's complaint.
        let plan = plan_for_tarball(d.path(), b"not an archive", Some(&"0".repeat(64)));
        let e = unpack_verified(&plan, &staging).unwrap_err();
        assert!(matches!(e, NixError::HashMismatch { .. }), "{e}");
    }

    #[test]
    fn stale_staging_directories_are_removed_and_live_ones_kept() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let ours = root.join(format!("{STAGING_PREFIX}{}-00000001", std::process::id()));
        let live = root.join(format!("{STAGING_PREFIX}{}-00000002", std::process::id()));
        let dead = root.join(format!("{STAGING_PREFIX}{}-00000003", i32::MAX));
        let other = root.join("store");
        for p in [&ours, &live, &dead, &other] {
            std::fs::create_dir(p).unwrap();
        }
        remove_stale_staging(root, &ours);
        assert!(ours.exists() && live.exists() && other.exists());
        assert!(!dead.exists(), "its process is gone");
    }
}
