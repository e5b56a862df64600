//! Startup reconciliation: undo what jobs of an agent that died (killed, crashed, its pod
//! restarted) left on the host, before this agent starts any job of its own.
//!
//! Every job's host changes are in its receipt (`receipt.rs`) before they are made; a receipt
//! whose writer is gone (no process with its pid and start time on this boot) is walked back
//! whole, cgroups first, then the rest last made first. A receipt of a live agent (an `exec`
//! running beside this one) is not touched. What a walk cannot undo stays in the receipt for
//! the next start.
//!
//! A slot volume is shared by every pod of the lane on a node, and a pod's receipts go with
//! its `state_dir`: what of the lane is left in the `_work` of a slot nobody holds is swept as
//! well.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use flywheel_jit_config::{Client, Deleted};
use tracing::{info, warn};

use crate::cgroup::CgroupManager;
use crate::config::Config;
use crate::receipt::{Host, Receipt, Thing};
use crate::workdir;

/// How long the walk of a dead agent's receipt waits for a job cgroup to empty.
const DRAIN: Duration = Duration::from_secs(10);

/// [`local_blocking`] on a blocking thread: removing a cgroup waits up to 10 s for its
/// processes to go, and a job directory may hold any number of files.
pub async fn local(cfg: &Arc<Config>, mgr: Arc<dyn CgroupManager>) -> (usize, usize) {
    let cfg = cfg.clone();
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| local_blocking(&cfg, mgr.as_ref())))
        .await
        .unwrap_or_else(|e| {
            warn!(error = %e, "cannot clean up after an earlier run");
            (0, 0)
        })
}

/// Walk back the receipts of agents that are gone, then sweep free slots. Returns (cgroups,
/// directories and files) removed.
pub fn local_blocking(cfg: &Config, mgr: &dyn CgroupManager) -> (usize, usize) {
    let (mut cgroups, mut dirs) = (0, 0);
    let receipts = crate::receipt::dir(&cfg.agent.state_dir);
    for e in std::fs::read_dir(&receipts).into_iter().flatten().flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".json.new") {
            // A rewrite cut short: the receipt beside it is whole. Alone, it is one that was
            // never renamed into place (nothing was made after it).
            let whole = path.with_extension("");
            if !whole.exists() && Receipt::load(&path).is_ok_and(|r| !r.owner().alive()) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let (c, d) = walk_back(&path, mgr);
        cgroups += c;
        dirs += d;
    }
    for lane in &cfg.lanes {
        // A slot volume is shared by every pod of the lane on the node, each in a PID
        // namespace of its own, and a pod's receipts are gone with it. A slot whose lock this
        // agent can take has no job (a running job's agent, or its orphaned daemon, holds it):
        // what of the lane is in its `_work` is left over. A slot held by another is not
        // looked at.
        if let Some(sr) = &lane.slot_root {
            let prefix = format!("{}.s", lane.name);
            for i in 0..lane.slots {
                // A slot marked unusable keeps what it holds for the operator.
                if crate::slot::unusable(sr, i).is_some() {
                    continue;
                }
                if let Some(_free) = crate::slot::hold_if_free(sr, i) {
                    let work = crate::slot::slot_dirs(sr, i).1;
                    dirs += remove_leftovers(&work, &|n: &str| n.starts_with(&prefix));
                }
            }
        }
    }
    (cgroups, dirs)
}

/// Undo the receipt at `path` if its agent is gone: (cgroups, other entries) undone.
fn walk_back(path: &Path, mgr: &dyn CgroupManager) -> (usize, usize) {
    let receipt = match Receipt::load(path) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot read a job's receipt; its leftovers stay");
            return (0, 0);
        }
    };
    let owner = receipt.owner();
    if owner.alive() {
        return (0, 0);
    }
    let before = receipt.entries();
    let errors = receipt.undo(None, &mut Host { mgr, drain: DRAIN });
    let left = receipt.entries();
    let undone: Vec<_> = before.iter().filter(|e| !left.contains(e)).collect();
    let cgroups = undone
        .iter()
        .filter(|e| matches!(e.thing, Thing::Cgroup { .. }))
        .count();
    let others = undone
        .iter()
        .filter(|e| matches!(e.thing, Thing::Tree { .. }))
        .count();
    let job = receipt.job().unwrap_or_else(|| "(no job yet)".into());
    if errors.is_empty() {
        info!(job = %job, pid = owner.pid, cgroups, removed = others, receipt = %path.display(), "undid what a job of an earlier run left");
    } else {
        warn!(job = %job, pid = owner.pid, errors = %errors.join("; "), receipt = %path.display(), "cannot undo all a job of an earlier run left; the receipt keeps the rest for the next start");
    }
    (cgroups, others)
}

/// Remove the entries of `root` whose names `leftover` picks: how many were removed.
fn remove_leftovers(root: &Path, leftover: &dyn Fn(&str) -> bool) -> usize {
    let Ok(rd) = std::fs::read_dir(root) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        if !leftover(&e.file_name().to_string_lossy()) {
            continue;
        }
        match workdir::remove_tree(&e.path()) {
            Ok(()) => {
                info!(dir = %e.path().display(), "removed a job directory left by an earlier run");
                n += 1;
            }
            Err(err) => {
                warn!(dir = %e.path().display(), error = %err, "cannot remove a leftover job directory")
            }
        }
    }
    n
}

/// Delete runners this agent registered in an earlier life (recognised by name prefix).
pub async fn github(github: &Client, prefix: &str) -> usize {
    let mine = format!("{prefix}-");
    let runners = match github.list_runners(None).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "cannot list runners to remove stale ones; continuing");
            return 0;
        }
    };
    let mut n = 0;
    for r in runners.into_iter().filter(|r| r.name.starts_with(&mine)) {
        match github.delete_runner(r.id).await {
            Ok(Deleted::Deleted) => {
                info!(runner = %r.name, online = r.online, "deleted a runner left by an earlier run");
                n += 1;
            }
            Ok(Deleted::Gone) => {}
            Ok(Deleted::Busy) => {
                warn!(runner = %r.name, "a runner from an earlier run is still busy on GitHub; GitHub will drop it when it notices")
            }
            Err(e) => warn!(runner = %r.name, error = %e, "cannot delete a stale runner"),
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::receipt::{Owner, Scope, What};

    /// No cgroup is ever asked for: the receipts here hold none.
    #[derive(Debug)]
    struct NoCgroups;

    impl CgroupManager for NoCgroups {
        fn layout(&self) -> crate::cgroup::Layout {
            crate::cgroup::Layout::V2
        }
        fn create(
            &self,
            _: &str,
            _: &crate::cgroup::Limits,
        ) -> crate::cgroup::Result<Box<dyn crate::cgroup::JobCgroup>> {
            unreachable!("reconciliation creates no cgroup")
        }
        fn open(&self, name: &str) -> Box<dyn crate::cgroup::JobCgroup> {
            unreachable!("no cgroup in these receipts: {name}")
        }
        fn list(&self) -> crate::cgroup::Result<Vec<String>> {
            Ok(Vec::new())
        }
        fn base_memory_limit(&self) -> Option<u64> {
            None
        }
    }

    fn config(state: &Path) -> Config {
        let text = format!(
            "[agent]\nstate_dir = \"{}\"\n\n[[lane]]\nname = \"fake\"\nmemory = \"64Mi\"\nmin_free = \"1Ki\"\nwork_root = \"{}\"\nnix = false\n",
            state.display(),
            state.with_file_name("work").display()
        );
        let host = crate::config::HostFacts {
            memory_bytes: 8 << 30,
            cpus: 2,
        };
        crate::config::parse(&text, &crate::config::Origin::Embedded, &host).unwrap()
    }

    /// A receipt with one directory, made.
    fn job(state: &Path, name: &str) -> (Receipt, std::path::PathBuf) {
        let dir = state.with_file_name("work").join(name);
        std::fs::create_dir_all(dir.join("_work/deep")).unwrap();
        let r = Receipt::create(&crate::receipt::dir(state), "fake").unwrap();
        r.record(Scope::Job, What::JobDir, Thing::Tree { path: dir.clone() })
            .unwrap();
        (r, dir)
    }

    #[test]
    fn a_dead_agents_receipt_is_walked_back_and_a_live_ones_is_left_alone() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let cfg = config(&state);
        let (live, live_dir) = job(&state, "live");
        let (dead, dead_dir) = job(&state, "dead");
        // The dead one's writer: this pid, but another process (another start time).
        let path = dead.path();
        let text = std::fs::read_to_string(&path).unwrap();
        let start = Owner::me().start.to_string();
        let text = text.replacen(
            &format!("\"start\": {start}"),
            &format!("\"start\": {}", Owner::me().start + 1),
            1,
        );
        // Not undone by this handle: it keeps its entry on disk when dropped.
        drop(dead);
        std::fs::write(&path, text).unwrap();
        assert!(!Receipt::load(&path).unwrap().owner().alive());

        let (cgroups, removed) = local_blocking(&cfg, &NoCgroups);
        assert_eq!((cgroups, removed), (0, 1));
        assert!(
            !dead_dir.exists() && !path.exists(),
            "walked back, receipt gone"
        );
        assert!(
            live_dir.exists() && live.path().exists(),
            "a live agent's is its own"
        );
    }
}
