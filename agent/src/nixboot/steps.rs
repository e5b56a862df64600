//! The bootstrap's steps: unpack and verify in one read of the tarball into a staging
//! directory of its own; then, under the store's lock, register (store paths moved in
//! read-only, `nix-store --load-db`, the profile, build users), configure, and the receipt
//! last, written atomically.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::reaper::Spawner;

use super::conf::configure;
use super::io;
use super::pin::hex;
use super::pin::sha256_bytes;
use super::receipt::drift;
use super::receipt::finished;
use super::receipt::receipt_path;
use super::receipt::store_drift;
use super::receipt::warm;
use super::receipt::Receipt;
use super::write_atomic;
use super::NixError;
use super::Plan;
use super::Report;
use super::Timings;

/// An exclusive lock on a store's bootstrap (`<nix>/var/flywheel-agent/bootstrap.lock`),
/// released when dropped or when its holder dies.
pub(super) fn lock_store(nix_root: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, NixError> {
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

    // unpack and verify, in one read of the tarball: into a staging directory of this
    // bootstrap's own on the store's filesystem, hashed as it is read; nothing moves into the
    // store unless the hash is the pin's, and a tarball that fails leaves nothing behind.
    let t = Instant::now();
    std::fs::create_dir_all(&plan.nix_root)
        .map_err(io(format!("create {}", plan.nix_root.display())))?;
    let staging = plan.nix_root.join(format!(
        "{STAGING_PREFIX}{}-{:08x}",
        std::process::id(),
        fastrand::u32(..)
    ));
    std::fs::create_dir(&staging).map_err(io("create the staging directory"))?;
    let result = (|| {
        timings.verify = unpack_verified(plan, &staging)?;
        timings.unpack = t.elapsed().saturating_sub(timings.verify);
        // One install into a store at a time (two jobs' setups, two pods on one slot): the
        // second waits, then finds it warm.
        let _lock = lock_store(&plan.nix_root)?;
        remove_stale_staging(&plan.nix_root, &staging);
        if store_drift(plan, version).is_empty() {
            return Ok(None);
        }
        install(plan, version, system, &staging, &mut timings, sp).map(Some)
    })();
    let _ = crate::workdir::remove_tree(&staging);
    let Some((nix_path, changed)) = result? else {
        let changed = configure(plan)?;
        return Ok(warm(plan, version, changed, timings));
    };
    Ok(Report {
        cold: true,
        version: version.to_owned(),
        nix_path,
        changed: reasons.into_iter().chain(changed).collect(),
        timings,
        relayed: None,
    })
}

pub(super) fn run(
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
pub(super) fn ensure_build_users(sp: &dyn Spawner) -> Result<bool, NixError> {
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
/// Path-based, following nothing but what it is given: only for trees no one but root can
/// write (the staging directory), never for a path in the store.
pub(super) fn canonicalize(path: &Path) -> std::io::Result<()> {
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

pub(super) fn install(
    plan: &Plan,
    version: &str,
    system: &str,
    staging: &Path,
    timings: &mut Timings,
    sp: &dyn Spawner,
) -> Result<(PathBuf, Vec<String>), NixError> {
    let t = Instant::now();
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

    // register
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
    let (mut moved, mut replaced) = (0, 0);
    for n in &names {
        let dst = store.join(n);
        match std::fs::symlink_metadata(&dst) {
            Ok(m) if finished(&m) => continue,
            Ok(_) => {
                // In the store but not read-only and root's (another agent's install stopped
                // half-way, or someone wrote to it): never skipped. Its content cannot be
                // trusted, and changing its modes in place as root would follow any link its
                // owner made; it is moved out (a rename follows nothing) into the staging
                // directory, which is removed by descriptors, and the verified copy moves in.
                std::fs::rename(&dst, staging.join(format!(".replaced-{n}")))
                    .map_err(io(format!("move the unfinished {n} out of the store")))?;
                replaced += 1;
            }
            Err(_) => moved += 1,
        }
        // Read-only and root's before it moves in: a path that moves in is finished.
        canonicalize(&src_store.join(n)).map_err(io(format!("make {n} read-only")))?;
        std::fs::rename(src_store.join(n), &dst).map_err(io(format!("move {n} into the store")))?;
    }
    if moved > 0 {
        changed.push(format!("installed {moved} store paths"));
    }
    if replaced > 0 {
        changed.push(format!(
            "made {replaced} store paths read-only and root's (replaced by the tarball's)"
        ));
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

/// Staging directories are `<nix_root>/.flywheel-staging-<pid>-<random>`.
pub(super) const STAGING_PREFIX: &str = ".flywheel-staging-";

/// A reader that hashes what passes through it and counts the time spent hashing.
pub(super) struct Hashing<R> {
    inner: R,
    hash: Sha256,
    spent: Duration,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let t = Instant::now();
        self.hash.update(&buf[..n]);
        self.spent += t.elapsed();
        Ok(n)
    }
}

/// Unpack the tarball (xz, then tar, in this process) into `staging`, hashing every byte of
/// the file as it is read; returns the time the hashing took. Decompression runs on a thread
/// of its own, feeding the unpacking through a bounded channel, so the two overlap as
/// `tar -xJf`'s two processes do. The hash is checked before the unpacking's own result: a
/// damaged or substituted tarball is a hash mismatch.
pub(super) fn unpack_verified(plan: &Plan, staging: &Path) -> Result<Duration, NixError> {
    let file = std::fs::File::open(&plan.tarball).map_err(|source| NixError::Tarball {
        path: plan.tarball.clone(),
        source,
    })?;
    let hashing = Hashing {
        inner: std::io::BufReader::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        spent: Duration::ZERO,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(8);
    let decoder = std::thread::Builder::new()
        .name("flywheel-unxz".into())
        .spawn(move || decompress(hashing, &tx))
        .map_err(io("start the tarball's decompression"))?;
    let unpacked = {
        let mut archive = tar::Archive::new(Chunks {
            rx,
            chunk: Vec::new(),
            at: 0,
        });
        // As `tar --no-same-owner`: files are root's; modes as packed (made read-only when
        // they move into the store).
        archive.set_preserve_permissions(true);
        archive.set_overwrite(false);
        archive.unpack(staging)
        // The receiver goes here: a decoder still sending stops decoding and hashes the rest.
    };
    let (hashing, decoded) = decoder.join().map_err(|_| NixError::Command {
        what: "unpacking the nix tarball".into(),
        detail: "the decompression thread panicked".into(),
    })?;
    let spent = hashing.spent;
    let got = hex(&hashing.hash.finalize());
    if got != plan.sha256 {
        return Err(NixError::HashMismatch {
            path: plan.tarball.clone(),
            got,
            want: plan.sha256.clone(),
        });
    }
    unpacked.and(decoded).map_err(|e| NixError::Command {
        what: "unpacking the nix tarball".into(),
        detail: e.to_string(),
    })?;
    Ok(spent)
}

/// The decompression thread: xz-decode into chunks for the unpacking while it takes them,
/// then hash whatever of the file is left. Returns the hasher and the decoding's result.
fn decompress(
    hashing: Hashing<std::io::BufReader<std::fs::File>>,
    tx: &std::sync::mpsc::SyncSender<Vec<u8>>,
) -> (
    Hashing<std::io::BufReader<std::fs::File>>,
    std::io::Result<()>,
) {
    let mut xz = xz2::read::XzDecoder::new_multi_decoder(hashing);
    let decoded = (|| loop {
        let mut chunk = vec![0u8; 256 << 10];
        let mut filled = 0;
        while filled < chunk.len() {
            match xz.read(&mut chunk[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled == 0 {
            return Ok(());
        }
        chunk.truncate(filled);
        if tx.send(chunk).is_err() {
            return Ok(());
        }
    })();
    let mut hashing = xz.into_inner();
    let rest = std::io::copy(&mut hashing, &mut std::io::sink()).map(|_| ());
    (hashing, decoded.and(rest))
}

/// The decompressed stream, as the unpacking reads it.
struct Chunks {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(c) => {
                    self.chunk = c;
                    self.at = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.at);
        buf[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Staging directories another bootstrap left (its agent died mid-unpack): removed under the
/// store's lock when their process is gone or they are over an hour old.
pub(super) fn remove_stale_staging(nix_root: &Path, ours: &Path) {
    let Ok(entries) = std::fs::read_dir(nix_root) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(STAGING_PREFIX) else {
            continue;
        };
        if path == ours {
            continue;
        }
        let pid_gone = rest
            .split('-')
            .next()
            .and_then(|p| p.parse::<i32>().ok())
            .map_or(true, |pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
            });
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(3600));
        if pid_gone || old {
            let _ = crate::workdir::remove_tree(&path);
        }
    }
}
