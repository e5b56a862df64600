//! A node-local slot's store: bootstrapped and garbage-collected by a child of the agent that
//! mounts the slot's store at the lane's `nix_store` in a mount namespace of its own.

use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

use crate::config::Lane;
use crate::reaper::Spawner;

use super::conf::plan_for;
use super::io;
use super::steps::ensure;
use super::NixError;
use super::Report;
use super::Timings;

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
pub(super) fn slot_child(
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

/// What a slot's garbage collection needs to know of its store (the store facade's blocking
/// reads give it): the filesystem's free and total bytes, the store's paths and NAR bytes.
pub trait SlotStore {
    fn fs_space(&self, path: &Path) -> Option<(u64, u64)>;
    fn size(&self, nix_root: &Path) -> Option<(u64, u64)>;
}

/// Garbage-collect a node-local slot's store when its filesystem runs low or it is over the
/// lane's `slot_max_size`. The caller holds the slot and its job is gone, so nothing live
/// uses the store. Returns what was done, or `None` when nothing needed doing. On a blocking
/// thread (`store`'s).
pub fn gc_slot(
    cfg: &crate::config::Config,
    lane: &Lane,
    slot: u32,
    sp: &dyn Spawner,
    store: &dyn SlotStore,
) -> Result<Option<String>, NixError> {
    let Some(slot_root) = &lane.slot_root else {
        return Ok(None);
    };
    let (slot_nix, _) = crate::slot::slot_dirs(slot_root, slot);
    let (Some((free, total)), Some((paths, bytes))) =
        (store.fs_space(&slot_nix), store.size(&slot_nix))
    else {
        return Ok(None);
    };
    let Some(want) = super::conf::gc_bytes(free, total, bytes, lane.slot_max_bytes) else {
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
    let after = store.size(&slot_nix).unwrap_or((0, 0));
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
