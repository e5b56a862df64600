//! The plan for a lane's store and its byte-stable `nix.conf`.

use std::path::Path;
use std::path::PathBuf;

use crate::config::Lane;
use crate::config::NixSettings;
use crate::hints;

use super::pin::current_system;
use super::pin::pin;
use super::write_atomic;
use super::NixError;
use super::Plan;

/// `min-free` / `max-free` from the store filesystem's size: GC starts below 5% free (at most
/// 10 GiB) and frees up to 15% (at most 50 GiB).
pub fn free_thresholds(fs_bytes: u64) -> (u64, u64) {
    (
        (fs_bytes / 20).min(10 << 30),
        (fs_bytes / 100 * 15).min(50 << 30),
    )
}

/// How much a slot's store should free now, if anything: below the filesystem's free-space
/// threshold (`min_free`) free up to `max_free`; above the slot's size cap free down to 90% of
/// it. `fs_free`/`fs_size` are the slot filesystem's, `store_bytes` the store's NAR total.
pub fn gc_bytes(fs_free: u64, fs_size: u64, store_bytes: u64, cap: Option<u64>) -> Option<u64> {
    let (min_free, max_free) = free_thresholds(fs_size);
    let for_disk = (fs_free < min_free).then(|| max_free.saturating_sub(fs_free));
    let for_cap = cap
        .filter(|c| store_bytes > *c)
        .map(|c| store_bytes - c / 10 * 9);
    match (for_disk, for_cap) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0)).max(1)),
    }
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

/// Write the lane's `nix.conf` and the netrc when they are not what the plan says.
pub(super) fn configure(plan: &Plan) -> Result<Vec<String>, NixError> {
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
pub(super) fn store_fs_bytes(path: &Path) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gc_by_disk_threshold_and_by_cap() {
        let gib = 1u64 << 30;
        // 100 GiB filesystem: min-free 5 GiB, max-free 15 GiB.
        assert_eq!(gc_bytes(50 * gib, 100 * gib, 10 * gib, None), None);
        assert_eq!(gc_bytes(4 * gib, 100 * gib, 10 * gib, None), Some(11 * gib));
        // Over a 10 GiB cap by 2 GiB: free down to 9 GiB.
        assert_eq!(
            gc_bytes(50 * gib, 100 * gib, 12 * gib, Some(10 * gib)),
            Some(3 * gib)
        );
        assert_eq!(gc_bytes(50 * gib, 100 * gib, 9 * gib, Some(10 * gib)), None);
    }
}
