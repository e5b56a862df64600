//! Deterministic Nix bootstrap: the pinned release tarball, hash-verified before anything is
//! unpacked, installed offline into a root-owned read-only store, registered with
//! `nix-store --load-db`, configured with a byte-stable `nix.conf`, and recorded in a receipt
//! written atomically. A warm check that finds everything right changes nothing; drift (another
//! version, an edited `nix.conf`, missing store paths, a receipt from another version) is
//! repaired from the tarball.
//!
//! Phases, timed separately and never mixed with build time: verify, unpack, register,
//! configure.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Lane, NixSettings};
use crate::hints;
use crate::reaper::Spawner;

/// The manifest in `images/nix-pin.toml`, compiled in.
pub const PIN_TOML: &str = include_str!("../../images/nix-pin.toml");

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    pub version: String,
    pub systems: BTreeMap<String, PinSystem>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PinSystem {
    pub url: String,
    pub sha256: String,
}

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
    #[error("nix tarball {path} has sha256 {got}, expected {want}: refusing to unpack it (nothing was changed)")]
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

/// The compiled-in pin.
pub fn pin() -> Result<Pin, NixError> {
    toml::from_str(PIN_TOML).map_err(|e| NixError::Manifest(e.to_string()))
}

/// Nix's name for this machine's system.
pub fn current_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, NixError> {
    let mut f = std::fs::File::open(path).map_err(|source| NixError::Tarball {
        path: path.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|source| NixError::Tarball {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

/// `min-free` / `max-free` from the store filesystem's size: GC starts below 5% free (at most
/// 10 GiB) and frees up to 15% (at most 50 GiB).
pub fn free_thresholds(fs_bytes: u64) -> (u64, u64) {
    (
        (fs_bytes / 20).min(10 << 30),
        (fs_bytes / 100 * 15).min(50 << 30),
    )
}

/// The `nix.conf` for a lane: byte-identical for identical inputs. The job's user is never a
/// trusted user; caches come from the lane's hints; parallelism from its envelope.
pub fn render_conf(lane: &Lane, nix: &NixSettings, store_fs_bytes: u64, host_cpus: u32) -> String {
    let p = hints::parallelism(lane, lane.memory_bytes, host_cpus);
    let (min_free, max_free) = free_thresholds(store_fs_bytes);
    let mut subs = nix.substituters.clone();
    let mut keys = nix.trusted_public_keys.clone();
    if let Some(url) = hints::attic_cache_url(lane) {
        subs.push(url);
    }
    if let Some(k) = &lane.hints.attic_public_key {
        keys.push(k.clone());
    }
    let mut out = format!("# Written by flywheel-agent for lane {}. Edits are reverted; change the agent's config instead.\n", lane.name);
    let mut line = |k: &str, v: String| {
        out.push_str(k);
        out.push_str(" = ");
        out.push_str(&v);
        out.push('\n');
    };
    line("accept-flake-config", "false".into());
    line("allowed-users", "*".into());
    line("build-users-group", "nixbld".into());
    line("cores", p.cores.to_string());
    line("experimental-features", "nix-command flakes".into());
    line("max-free", max_free.to_string());
    line("max-jobs", p.max_jobs.to_string());
    line("min-free", min_free.to_string());
    line("netrc-file", nix.netrc_file.display().to_string());
    line("require-sigs", "true".into());
    line("sandbox", nix.sandbox.to_string());
    line("substituters", subs.join(" "));
    line("trusted-public-keys", keys.join(" "));
    line("trusted-users", "root".into());
    out
}

/// Where the receipt lives under a Nix root (`/nix`).
pub fn receipt_path(nix_root: &Path) -> PathBuf {
    nix_root.join("var/flywheel-agent/receipt.json")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Receipt {
    pub version: String,
    pub system: String,
    pub tarball_sha256: String,
    pub nix_path: String,
    pub store_paths: Vec<String>,
    pub conf_file: String,
    pub conf_sha256: String,
    pub timings_ms: BTreeMap<String, f64>,
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
#[derive(Debug, Clone)]
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

fn read_receipt(nix_root: &Path) -> Option<Receipt> {
    let text = std::fs::read(receipt_path(nix_root)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Why the store (not its configuration) differs from the plan; empty when the store is warm.
/// A pod's fresh `/etc/nix` with a warm node-local store is configuration drift only.
fn drift(plan: &Plan, version: &str) -> (Vec<String>, Vec<String>) {
    let mut config = Vec::new();
    match std::fs::read(&plan.conf_file) {
        Ok(b) if sha256_bytes(&b) == sha256_bytes(plan.conf_text.as_bytes()) => {}
        Ok(_) => config.push(format!("{} was edited", plan.conf_file.display())),
        Err(_) => config.push(format!("{} is missing", plan.conf_file.display())),
    }
    if !plan.netrc_file.exists() {
        config.push(format!("{} is missing", plan.netrc_file.display()));
    }
    (store_drift(plan, version), config)
}

fn store_drift(plan: &Plan, version: &str) -> Vec<String> {
    let Some(r) = read_receipt(&plan.nix_root) else {
        return vec!["no receipt (fresh /nix)".into()];
    };
    let mut why = Vec::new();
    if r.version != version {
        why.push(format!(
            "receipt is for nix {}, the pin is {version}",
            r.version
        ));
    }
    if r.tarball_sha256 != plan.sha256 {
        why.push("receipt is for another tarball".into());
    }
    let missing = r
        .store_paths
        .iter()
        .filter(|p| std::fs::symlink_metadata(plan.nix_root.join("store").join(p)).is_err())
        .count();
    if missing > 0 {
        why.push(format!("{missing} store paths are missing"));
    }
    let profile = plan.nix_root.join("var/nix/profiles/default");
    if std::fs::canonicalize(&profile).ok() != Some(plan.nix_root.join("store").join(&r.nix_path)) {
        why.push("the default profile does not point at the pinned nix".into());
    }
    if !plan.nix_root.join("var/nix/db/db.sqlite").exists() {
        why.push("the store database is missing".into());
    }
    if nix::unistd::Group::from_name("nixbld")
        .ok()
        .flatten()
        .is_none()
    {
        why.push("the nixbld build users are missing".into());
    }
    why
}

/// An exclusive lock on a store's bootstrap (`<nix>/var/flywheel-agent/bootstrap.lock`),
/// released when dropped or when its holder dies.
fn lock_store(nix_root: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, NixError> {
    let dir = nix_root.join("var/flywheel-agent");
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let path = dir.join("bootstrap.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io(format!("open {}", path.display())))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| NixError::Io {
        what: format!("lock {}", path.display()),
        source: e.into(),
    })
}

/// The report of a store found warm (`changed`: configuration written for it).
fn warm(plan: &Plan, version: &str, changed: Vec<String>, timings: Timings) -> Report {
    Report {
        cold: false,
        version: version.to_owned(),
        nix_path: read_receipt(&plan.nix_root)
            .map(|r| plan.nix_root.join("store").join(r.nix_path))
            .unwrap_or_default(),
        changed,
        timings,
        relayed: None,
    }
}

/// Make the plan true: a warm check first, then (only if needed) verify, unpack, register,
/// configure.
pub fn ensure(
    plan: &Plan,
    version: &str,
    system: &str,
    sp: &dyn Spawner,
) -> Result<Report, NixError> {
    let t = Instant::now();
    let (store_reasons, config_reasons) = drift(plan, version);
    let mut timings = Timings::default();
    if store_reasons.is_empty() && !config_reasons.is_empty() {
        // A warm store under a fresh configuration (a new pod's /etc/nix): write it, no more.
        let changed = configure(plan)?;
        timings.check = t.elapsed();
        return Ok(warm(plan, version, changed, timings));
    }
    let reasons: Vec<String> = store_reasons.into_iter().chain(config_reasons).collect();
    timings.check = t.elapsed();
    if reasons.is_empty() {
        return Ok(warm(plan, version, Vec::new(), timings));
    }
    tracing::info!(reasons = %reasons.join("; "), "nix bootstrap needed");

    // verify: before anything is unpacked.
    let t = Instant::now();
    let got = sha256_file(&plan.tarball)?;
    if got != plan.sha256 {
        return Err(NixError::HashMismatch {
            path: plan.tarball.clone(),
            got,
            want: plan.sha256.clone(),
        });
    }
    timings.verify = t.elapsed();

    // One install into a store at a time (two jobs' setups, two pods on one slot): the second
    // waits, then finds it warm. Taken after the hash check, so a bad tarball changes nothing.
    let _lock = lock_store(&plan.nix_root)?;
    if store_drift(plan, version).is_empty() {
        let changed = configure(plan)?;
        timings.check += t.elapsed();
        return Ok(warm(plan, version, changed, timings));
    }

    // unpack into a staging directory on the store's filesystem.
    let t = Instant::now();
    std::fs::create_dir_all(&plan.nix_root)
        .map_err(io(format!("create {}", plan.nix_root.display())))?;
    let staging = plan
        .nix_root
        .join(format!(".flywheel-staging-{}", std::process::id()));
    let _ = crate::workdir::remove_tree(&staging);
    std::fs::create_dir(&staging).map_err(io("create the staging directory"))?;
    let result = install(plan, version, system, &staging, &mut timings, t, sp);
    let _ = crate::workdir::remove_tree(&staging);
    let (nix_path, changed) = result?;
    Ok(Report {
        cold: true,
        version: version.to_owned(),
        nix_path,
        changed: reasons.into_iter().chain(changed).collect(),
        timings,
        relayed: None,
    })
}

fn run(
    sp: &dyn Spawner,
    cmd: &mut std::process::Command,
    what: &str,
    stdin: Option<&Path>,
) -> Result<(), NixError> {
    match stdin {
        Some(p) => {
            let f = std::fs::File::open(p).map_err(io(format!("open {}", p.display())))?;
            cmd.stdin(f);
        }
        None => {
            cmd.stdin(std::process::Stdio::null());
        }
    }
    let out = sp.output(cmd).map_err(|e| NixError::Command {
        what: what.into(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NixError::Command {
            what: what.into(),
            detail: String::from_utf8_lossy(&out.stderr)
                .trim()
                .chars()
                .take(500)
                .collect(),
        });
    }
    Ok(())
}

/// Build users as the official multi-user installer makes them: group `nixbld`, users
/// `nixbld1`..`nixbld32`. Returns whether anything was created.
fn ensure_build_users(sp: &dyn Spawner) -> Result<bool, NixError> {
    let mut created = false;
    if nix::unistd::Group::from_name("nixbld")
        .ok()
        .flatten()
        .is_none()
    {
        let made = run(
            sp,
            std::process::Command::new("groupadd").args(["--system", "nixbld"]),
            "groupadd nixbld",
            None,
        );
        // Another bootstrap (another job, another slot) may have created it meanwhile.
        if let Err(e) = made {
            if nix::unistd::Group::from_name("nixbld")
                .ok()
                .flatten()
                .is_none()
            {
                return Err(e);
            }
        }
        created = true;
    }
    for i in 1..=32 {
        let name = format!("nixbld{i}");
        if nix::unistd::User::from_name(&name).ok().flatten().is_some() {
            continue;
        }
        let made = run(
            sp,
            std::process::Command::new("useradd").args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/var/empty",
                "--shell",
                "/usr/sbin/nologin",
                "--gid",
                "nixbld",
                "--groups",
                "nixbld",
                "--comment",
                "Nix build user",
                &name,
            ]),
            "useradd nixbld",
            None,
        );
        if let Err(e) = made {
            if nix::unistd::User::from_name(&name).ok().flatten().is_none() {
                return Err(e);
            }
        }
        created = true;
    }
    Ok(created)
}

/// Make a store path root-owned and read-only, as Nix does (files 0444/0555, dirs 0555).
fn canonicalize(path: &Path) -> std::io::Result<()> {
    let m = std::fs::symlink_metadata(path)?;
    if m.file_type().is_symlink() {
        return std::os::unix::fs::lchown(path, Some(0), Some(0));
    }
    if m.is_dir() {
        for e in std::fs::read_dir(path)? {
            canonicalize(&e?.path())?;
        }
    }
    std::os::unix::fs::chown(path, Some(0), Some(0))?;
    let exec = m.is_dir() || m.mode() & 0o111 != 0;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(if exec { 0o555 } else { 0o444 }),
    )?;
    Ok(())
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NixError> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    crate::workdir::write_atomic(path, bytes, mode)
        .map_err(io(format!("replace {}", path.display())))
}

/// Write the lane's `nix.conf` and the netrc when they are not what the plan says.
fn configure(plan: &Plan) -> Result<Vec<String>, NixError> {
    let mut changed = Vec::new();
    if std::fs::read(&plan.conf_file).ok().as_deref() != Some(plan.conf_text.as_bytes()) {
        write_atomic(&plan.conf_file, plan.conf_text.as_bytes(), 0o644)?;
        changed.push(format!("wrote {}", plan.conf_file.display()));
    }
    if !plan.netrc_file.exists() {
        write_atomic(&plan.netrc_file, b"", 0o600)?;
        changed.push(format!("created {}", plan.netrc_file.display()));
    }
    Ok(changed)
}

fn install(
    plan: &Plan,
    version: &str,
    system: &str,
    staging: &Path,
    timings: &mut Timings,
    t_unpack: Instant,
    sp: &dyn Spawner,
) -> Result<(PathBuf, Vec<String>), NixError> {
    run(
        sp,
        std::process::Command::new("tar")
            .args(["--no-same-owner", "-xJf"])
            .arg(&plan.tarball)
            .arg("-C")
            .arg(staging),
        "unpacking the nix tarball (tar -xJf)",
        None,
    )?;
    let top = std::fs::read_dir(staging)
        .map_err(io("read the staging directory"))?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("nix-"))
        .map(|e| e.path())
        .ok_or_else(|| NixError::Layout(plan.tarball.clone()))?;
    let top_name = top
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tar_version = top_name
        .strip_prefix("nix-")
        .and_then(|s| s.strip_suffix(&format!("-{system}")))
        .ok_or_else(|| NixError::Layout(plan.tarball.clone()))?
        .to_owned();
    if tar_version != version {
        return Err(NixError::Command {
            what: "checking the tarball".into(),
            detail: format!("it holds nix {tar_version}, the pin is {version}"),
        });
    }
    let (src_store, reginfo) = (top.join("store"), top.join(".reginfo"));
    if !src_store.is_dir() || !reginfo.is_file() {
        return Err(NixError::Layout(plan.tarball.clone()));
    }
    let mut names: Vec<String> = std::fs::read_dir(&src_store)
        .map_err(io("read the tarball's store"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let nix_name = names
        .iter()
        .find(|n| n.ends_with(&format!("-nix-{version}")))
        .cloned()
        .ok_or_else(|| NixError::Layout(plan.tarball.clone()))?;
    timings.unpack = t_unpack.elapsed();

    // register
    let t = Instant::now();
    let mut changed = Vec::new();
    let store = plan.nix_root.join("store");
    if !store.exists() {
        std::fs::create_dir_all(&store).map_err(io("create the store"))?;
        changed.push("created the store".to_owned());
    }
    if ensure_build_users(sp)? {
        changed.push("created the nixbld build users".to_owned());
    }
    let nixbld = nix::unistd::Group::from_name("nixbld").ok().flatten();
    std::os::unix::fs::chown(&store, Some(0), nixbld.as_ref().map(|g| g.gid.as_raw()))
        .map_err(io("chown the store"))?;
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o1775))
        .map_err(io("chmod the store"))?;
    for d in [
        "var/nix/db",
        "var/nix/gcroots",
        "var/nix/profiles",
        "var/nix/temproots",
        "var/nix/daemon-socket",
        "var/nix/userpool",
        "var/flywheel-agent",
    ] {
        std::fs::create_dir_all(plan.nix_root.join(d)).map_err(io(format!("create {d}")))?;
    }
    let mut moved = 0;
    for n in &names {
        let dst = store.join(n);
        if std::fs::symlink_metadata(&dst).is_ok() {
            continue;
        }
        // Read-only and root's before it moves in: a path in the store is always finished.
        canonicalize(&src_store.join(n)).map_err(io(format!("make {n} read-only")))?;
        std::fs::rename(src_store.join(n), &dst).map_err(io(format!("move {n} into the store")))?;
        moved += 1;
    }
    if moved > 0 {
        changed.push(format!("installed {moved} store paths"));
    }
    let nix_path = store.join(&nix_name);
    run(
        sp,
        std::process::Command::new(nix_path.join("bin/nix-store"))
            .arg("--load-db")
            .env_remove("NIX_REMOTE"),
        "nix-store --load-db",
        Some(&reginfo),
    )?;
    // The default profile: default -> default-N-link -> the pinned nix.
    let profiles = plan.nix_root.join("var/nix/profiles");
    let current = std::fs::canonicalize(profiles.join("default")).ok();
    if current.as_deref() != Some(nix_path.as_path()) {
        let mut n = 1;
        while std::fs::symlink_metadata(profiles.join(format!("default-{n}-link"))).is_ok() {
            n += 1;
        }
        let gen = profiles.join(format!("default-{n}-link"));
        std::os::unix::fs::symlink(&nix_path, &gen).map_err(io("create the profile generation"))?;
        let tmp = profiles.join(".default.flywheel-tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("default-{n}-link"), &tmp)
            .map_err(io("link the profile"))?;
        std::fs::rename(&tmp, profiles.join("default")).map_err(io("switch the profile"))?;
        changed.push(format!("default profile -> nix {version}"));
    }
    timings.register = t.elapsed();

    // configure
    let t = Instant::now();
    changed.extend(configure(plan)?);
    timings.configure = t.elapsed();

    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    let receipt = Receipt {
        version: version.to_owned(),
        system: system.to_owned(),
        tarball_sha256: plan.sha256.clone(),
        nix_path: nix_name,
        store_paths: names,
        conf_file: plan.conf_file.display().to_string(),
        conf_sha256: sha256_bytes(plan.conf_text.as_bytes()),
        timings_ms: [
            ("verify", timings.verify),
            ("unpack", timings.unpack),
            ("register", timings.register),
            ("configure", timings.configure),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ms(v)))
        .collect(),
    };
    let bytes =
        serde_json::to_vec_pretty(&receipt).map_err(|e| NixError::Manifest(e.to_string()))?;
    write_atomic(&receipt_path(&plan.nix_root), &bytes, 0o644)?;
    Ok((nix_path, changed))
}

/// The bootstrap plan for a lane's store as its jobs see it.
pub fn plan_for(
    cfg: &crate::config::Config,
    lane: &Lane,
    host_cpus: u32,
) -> Result<(Plan, String, String), NixError> {
    let system = current_system();
    let pin = pin()?;
    let (version, sha256, url) = match (&cfg.nix.version, &cfg.nix.sha256) {
        (Some(v), Some(h)) => (v.clone(), h.clone(), None),
        _ => {
            let s = pin
                .systems
                .get(&system)
                .ok_or_else(|| NixError::NoSystem(system.clone()))?;
            (pin.version.clone(), s.sha256.clone(), Some(s.url.clone()))
        }
    };
    let tarball = match &cfg.nix.tarball {
        Some(t) => t.clone(),
        None => {
            let name = url
                .as_deref()
                .and_then(|u| u.rsplit('/').next())
                .map(str::to_owned)
                .unwrap_or_else(|| format!("nix-{version}-{system}.tar.xz"));
            PathBuf::from("/var/lib/flywheel-agent/nix").join(name)
        }
    };
    let fs_bytes = store_fs_bytes(&lane.nix_store);
    let plan = Plan {
        nix_root: lane.nix_store.clone(),
        tarball,
        sha256,
        conf_file: lane.nix_conf.clone(),
        conf_text: render_conf(lane, &cfg.nix, fs_bytes, host_cpus),
        netrc_file: cfg.nix.netrc_file.clone(),
    };
    Ok((plan, version, system))
}

/// Total size of the filesystem holding `path` (or its nearest existing ancestor).
fn store_fs_bytes(path: &Path) -> u64 {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(up) => p = up,
            None => break,
        }
    }
    nix::sys::statvfs::statvfs(p)
        .map(|v| {
            #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
            let b = (v.blocks() as u64).saturating_mul(v.fragment_size() as u64);
            b
        })
        .unwrap_or(0)
}

/// Bootstrap (or verify) the Nix store a job of `lane` in `slot` will see. A node-local slot's
/// store is bootstrapped in a child of the agent that mounts the slot's store at the lane's
/// `nix_store` in a private mount namespace first; without a slot, the lane's `nix_store`
/// itself (bare metal's shared store, or a pod-local one).
pub fn ensure_for_job(
    cfg: &crate::config::Config,
    lane: &Lane,
    slot: Option<u32>,
    host_cpus: u32,
    sp: &dyn Spawner,
) -> Result<Report, NixError> {
    let (plan, version, system) = plan_for(cfg, lane, host_cpus)?;
    let (Some(slot_root), Some(slot)) = (&lane.slot_root, slot) else {
        return ensure(&plan, &version, &system, sp);
    };
    let (slot_nix, _) = crate::slot::slot_dirs(slot_root, slot);
    std::fs::create_dir_all(&slot_nix).map_err(io(format!("create {}", slot_nix.display())))?;
    let t = Instant::now();
    let out = slot_child(
        sp,
        cfg,
        &[
            "nix",
            "bootstrap",
            "--lane",
            &lane.name,
            "--slot",
            &slot.to_string(),
            "--summary-only",
        ],
        &format!("bootstrapping slot {slot}'s store"),
    )?;
    let summary = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let cold = !summary.contains(": warm");
    Ok(Report {
        cold,
        version,
        nix_path: PathBuf::new(),
        changed: Vec::new(),
        timings: Timings {
            check: t.elapsed(),
            ..Timings::default()
        },
        relayed: Some(summary),
    })
}

/// Run the agent itself with `args` (and the config it was given) for work on a slot's store,
/// which the child mounts at the lane's `nix_store` in a mount namespace of its own.
fn slot_child(
    sp: &dyn Spawner,
    cfg: &crate::config::Config,
    args: &[&str],
    what: &str,
) -> Result<std::process::Output, NixError> {
    let exe = std::env::current_exe().map_err(io("find the agent's own executable"))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args);
    if let crate::config::Origin::File(p) = &cfg.origin {
        cmd.arg("--config").arg(p);
    }
    cmd.stdin(std::process::Stdio::null());
    let out = sp.output(&mut cmd).map_err(|e| NixError::Command {
        what: what.to_owned(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(NixError::Command {
            what: what.to_owned(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// Garbage-collect a node-local slot's store when its filesystem runs low or it is over the
/// lane's `slot_max_size`. The caller holds the slot and its job is gone, so nothing live
/// uses the store. Returns what was done, or `None` when nothing needed doing.
pub fn gc_slot(
    cfg: &crate::config::Config,
    lane: &Lane,
    slot: u32,
    sp: &dyn Spawner,
) -> Result<Option<String>, NixError> {
    let Some(slot_root) = &lane.slot_root else {
        return Ok(None);
    };
    let (slot_nix, _) = crate::slot::slot_dirs(slot_root, slot);
    let (Some((free, total)), Some((paths, bytes))) = (
        crate::store::fs_space(&slot_nix),
        crate::store::size(&slot_nix),
    ) else {
        return Ok(None);
    };
    let Some(want) = crate::store::gc_bytes(free, total, bytes, lane.slot_max_bytes) else {
        return Ok(None);
    };
    let t = Instant::now();
    let out = slot_child(
        sp,
        cfg,
        &[
            "nix",
            "gc",
            "--lane",
            &lane.name,
            "--slot",
            &slot.to_string(),
            "--max-freed",
            &want.to_string(),
        ],
        &format!("collecting slot {slot}'s garbage"),
    )?;
    let after = crate::store::size(&slot_nix).unwrap_or((0, 0));
    Ok(Some(format!(
        "slot {slot}: garbage-collected in {:.1} s: {paths} → {} paths, {} → {} ({})",
        t.elapsed().as_secs_f64(),
        after.0,
        crate::size::Bytes(bytes),
        crate::size::Bytes(after.1),
        String::from_utf8_lossy(&out.stdout).trim()
    )))
}

/// Enter a private mount namespace with `src` bind-mounted at `dst` (for `nix bootstrap
/// --slot`, in its own process).
pub fn enter_store_namespace(src: &Path, dst: &Path) -> Result<(), NixError> {
    use nix::mount::{mount, MsFlags};
    let err = |what: &str| {
        let what = what.to_owned();
        move |e: nix::Error| NixError::Io {
            what,
            source: e.into(),
        }
    };
    std::fs::create_dir_all(dst).map_err(io(format!("create {}", dst.display())))?;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(err("unshare the mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err("make / private"))?;
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err("bind the slot's store"))?;
    Ok(())
}

/// The per-job daemon settings of a lane.
pub fn nix_job(cfg: &crate::config::Config, lane: &Lane) -> crate::envelope::NixJob {
    crate::envelope::NixJob {
        daemon: lane
            .nix_store
            .join("var/nix/profiles/default/bin/nix-daemon"),
        conf_dir: lane
            .nix_conf
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/etc/nix")),
        sockets: cfg.agent.state_dir.join("nix-sockets"),
        socket_seen: lane.nix_store.join("var/nix/daemon-socket"),
        userpool: cfg.nix.userpool.clone(),
        userpool_seen: lane.nix_store.join("var/nix/userpool"),
        netrc: None,
    }
}

#[cfg(test)]
mod tests {
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
}
