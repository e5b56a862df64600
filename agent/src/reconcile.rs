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
    if let Err(e) = crate::receipt::check_dir(&receipts) {
        // Receipts another user could have written name paths root would remove.
        warn!(error = %e, "cannot clean up after an earlier run");
        return (0, 0);
    }
    // What might be left: listed before any receipt is read, so whatever a running agent (an
    // `exec` beside this one) makes meanwhile is in a receipt read below.
    let candidates = Candidates::list(cfg, mgr);
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
    let (c, d) = candidates.sweep(&receipts, mgr);
    cgroups += c;
    dirs += d;
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

/// What an earlier run may have left that no receipt names: an agent that died before it wrote
/// receipts (a version before them), a receipt that could not be read (cut short by a power
/// cut). Only the agent's own directories in `state_dir`, the lanes' job cgroups, and
/// directories named like a lane's jobs in its work root.
struct Candidates {
    cgroups: Vec<String>,
    paths: Vec<std::path::PathBuf>,
    /// Of `paths`, those whose creator's pid (in their name) is gone: the work roots' job
    /// directories.
    by_pid: Vec<std::path::PathBuf>,
}

impl Candidates {
    fn list(cfg: &Config, mgr: &dyn CgroupManager) -> Candidates {
        // The job cgroups and work roots may be shared with an agent of another `state_dir`
        // (an operator's `exec` with a configuration of its own), whose receipts this agent
        // does not read: there, only a name whose creator (`<lane>.s<slot>.<pid>.<hex>`) is
        // gone is a candidate.
        let ours = |name: &str| {
            cfg.lanes
                .iter()
                .any(|l| name.starts_with(&format!("{}.s", l.name)))
                && creator_pid(name).is_some_and(|p| !alive(p))
        };
        let cgroups = match mgr.list() {
            Ok(names) => names.into_iter().filter(|n| ours(n)).collect(),
            Err(e) => {
                warn!(error = %e, "cannot list job cgroups");
                Vec::new()
            }
        };
        let state = &cfg.agent.state_dir;
        let mut paths = Vec::new();
        for d in [
            crate::hooks::sockets_dir(state),
            state.join("netrc"),
            state.join("nix-tmp"),
            state.join("nix-views"),
            state.join("nix-sockets"),
            state.join("nix-logs"),
        ] {
            paths.extend(
                std::fs::read_dir(&d)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
        let mut roots: Vec<&Path> = cfg.lanes.iter().map(|l| l.work_root.as_path()).collect();
        roots.sort();
        roots.dedup();
        let mut by_pid = Vec::new();
        for root in roots {
            by_pid.extend(
                std::fs::read_dir(root)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| ours(&e.file_name().to_string_lossy()))
                    .map(|e| e.path()),
            );
        }
        paths.extend(by_pid.iter().cloned());
        Candidates {
            cgroups,
            paths,
            by_pid,
        }
    }

    /// Remove the candidates no receipt in `receipts` names (a receipt's path, or a path
    /// inside or above one): (cgroups, others) removed. A receipt that cannot be read is moved
    /// aside (`.unreadable`), once its leftovers are swept, so it is not warned about again.
    fn sweep(self, receipts: &Path, mgr: &dyn CgroupManager) -> (usize, usize) {
        let (mut named_cgroups, mut named_paths) = (Vec::new(), Vec::new());
        let mut unreadable = Vec::new();
        // Receipts this agent cannot see may name a live agent's things: then nothing in
        // `state_dir` is swept (the cgroups and job directories are, by their creator's pid).
        let mut blind = false;
        let listed = match std::fs::read_dir(receipts) {
            Ok(rd) => Some(rd),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                warn!(dir = %receipts.display(), error = %e, "cannot list the receipts; nothing in state_dir is swept");
                blind = true;
                None
            }
        };
        for e in listed.into_iter().flatten().flatten() {
            let path = e.path();
            if !e.file_name().to_string_lossy().ends_with(".json") {
                continue;
            }
            let Ok(r) = Receipt::load(&path) else {
                if crate::receipt::owner_of(&path).is_some_and(|o| o.alive()) {
                    // A live agent's receipt this one cannot read (another version's): its
                    // things may be anywhere in state_dir.
                    warn!(receipt = %path.display(), "a live agent's receipt cannot be read; nothing in state_dir is swept");
                    blind = true;
                } else {
                    unreadable.push(path);
                }
                continue;
            };
            for entry in r.entries() {
                match entry.thing {
                    Thing::Cgroup { name } => named_cgroups.push(name),
                    Thing::Tree { path } | Thing::Mounts { path } | Thing::Lock { path } => {
                        named_paths.push(path)
                    }
                    Thing::TreeBelow { root, rel } => named_paths.push(root.join(rel)),
                }
            }
        }
        let mut cgroups = 0;
        for name in self.cgroups.iter().filter(|n| !named_cgroups.contains(n)) {
            match mgr.open(name).destroy(DRAIN) {
                Ok(()) => {
                    info!(cgroup = %name, "removed a job cgroup no receipt names (left by an earlier run)");
                    cgroups += 1;
                }
                Err(e) => warn!(cgroup = %name, error = %e, "cannot remove a leftover job cgroup"),
            }
        }
        let mut others = 0;
        for p in &self.paths {
            if blind && !self.by_pid.contains(p) {
                continue;
            }
            if named_paths
                .iter()
                .any(|n| n.starts_with(p) || p.starts_with(n))
            {
                continue;
            }
            match workdir::remove_tree(p) {
                Ok(()) => {
                    info!(path = %p.display(), "removed what no receipt names (left by an earlier run)");
                    others += 1;
                }
                Err(e) => warn!(path = %p.display(), error = %e, "cannot remove a leftover"),
            }
        }
        for p in unreadable {
            let mut aside = p.clone().into_os_string();
            aside.push(".unreadable");
            if std::fs::rename(&p, &aside).is_ok() {
                warn!(receipt = %p.display(), "a receipt that cannot be read was moved aside; what no other receipt names was swept instead");
            }
        }
        (cgroups, others)
    }
}

/// The pid a job name was created by: `<lane>.s<slot>.<pid>.<hex>` (a throwaway store layer
/// beside its directory is `<job>.layer`).
fn creator_pid(job: &str) -> Option<i32> {
    let job = job.strip_suffix(".layer").unwrap_or(job);
    let mut it = job.rsplitn(3, '.');
    let _hex = it.next()?;
    it.next()?.parse().ok()
}

fn alive(pid: i32) -> bool {
    pid == std::process::id() as i32
        || match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
            Ok(()) => true,
            Err(e) => e == nix::errno::Errno::EPERM,
        }
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
        warn!(job = %job, pid = owner.pid, errors = %crate::receipt::joined(&errors), receipt = %path.display(), "cannot undo all a job of an earlier run left; the receipt keeps the rest for the next start");
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

    #[test]
    fn what_no_receipt_names_is_swept_and_what_a_live_one_names_is_kept() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let cfg = config(&state);
        // An earlier agent's leftovers that no receipt names (it died before receipts, or its
        // receipt was cut short): a netrc, a hook socket directory, a job directory of the lane.
        let netrc = state.join("netrc/old-runner.netrc");
        let socket = crate::hooks::sockets_dir(&state).join("00000000000000aa");
        let old_job = state.with_file_name("work").join("fake.s0.2147483600.abc");
        // A running `exec` beside this agent: its job directory and netrc are in its receipt.
        let (live, live_dir) = job(&state, "fake.s1.456.def");
        let live_netrc = state.join("netrc/live.netrc");
        live.record(
            Scope::Runner,
            What::Netrc,
            Thing::Tree {
                path: live_netrc.clone(),
            },
        )
        .unwrap();
        for d in [&socket, &old_job.join("_work")] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::create_dir_all(state.join("netrc")).unwrap();
        std::fs::write(&netrc, "machine x").unwrap();
        std::fs::write(&live_netrc, "machine y").unwrap();
        // A job directory no receipt names whose creator runs (an agent with a state_dir of
        // its own): kept.
        let other_agents = state
            .with_file_name("work")
            .join(format!("fake.s3.{}.fed", std::process::id()));
        std::fs::create_dir_all(&other_agents).unwrap();
        // Something else in the work root that is not named like a job of a lane.
        let other = state.with_file_name("work").join("operator-notes");
        std::fs::create_dir_all(&other).unwrap();
        // A receipt cut short: moved aside once.
        let bad = crate::receipt::dir(&state).join("fake.1.000000000001.json");
        std::fs::write(&bad, "{\"owner\":").unwrap();

        let (_, removed) = local_blocking(&cfg, &NoCgroups);
        assert_eq!(
            removed, 3,
            "the netrc, the socket directory, the job directory"
        );
        assert!(!netrc.exists() && !socket.exists() && !old_job.exists());
        assert!(
            live_dir.exists() && live_netrc.exists(),
            "a live receipt's are kept"
        );
        assert!(other.exists(), "only what is named like a lane's job");
        assert!(
            other_agents.exists(),
            "a live creator's job directory is kept"
        );
        assert!(!bad.exists(), "moved aside");
        assert!(bad.with_extension("json.unreadable").exists());
    }

    /// A receipt with one directory, made by a writer that is gone (this pid, another start).
    fn dead_job(state: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let (r, dir) = job(state, name);
        let path = r.path();
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            &format!("\"start\": {}", Owner::me().start),
            &format!("\"start\": {}", Owner::me().start + 1),
            1,
        );
        drop(r);
        std::fs::write(&path, text).unwrap();
        (path, dir)
    }

    #[test]
    fn receipts_another_user_can_write_are_not_read() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let cfg = config(&state);
        // The receipt itself writable by others: not read, its paths not removed.
        let (path, dir) = dead_job(&state, "dead");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o622)).unwrap();
        assert!(Receipt::load(&path).is_err());
        assert_eq!(local_blocking(&cfg, &NoCgroups), (0, 0));
        assert!(
            dir.exists(),
            "a receipt others could write names nothing root removes"
        );
        assert!(
            path.with_extension("json.unreadable").exists(),
            "moved aside"
        );
        // The directory writable by others: nothing in it is read.
        let (path, dir) = dead_job(&state, "dead2");
        let receipts = crate::receipt::dir(&state);
        std::fs::set_permissions(&receipts, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(local_blocking(&cfg, &NoCgroups), (0, 0));
        assert!(dir.exists() && path.exists());
        std::fs::set_permissions(&receipts, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(local_blocking(&cfg, &NoCgroups), (0, 1));
        assert!(!dir.exists());
    }

    #[test]
    fn a_live_agents_receipt_this_one_cannot_read_keeps_state_dir_as_it_is() {
        let t = tempfile::tempdir().unwrap();
        let state = t.path().join("state");
        let cfg = config(&state);
        // A running agent of another version: its receipt names a kind this one does not know.
        let (live, _) = job(&state, "other");
        let path = live.path();
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            "\"what\": \"job-dir\"",
            "\"what\": \"something-new\"",
            1,
        );
        assert!(text.contains("something-new"), "{text}");
        std::mem::forget(live);
        std::fs::write(&path, text).unwrap();
        assert!(Receipt::load(&path).is_err(), "this version cannot read it");
        // Its netrc, which its receipt names, and a dead creator's job directory.
        let netrc = state.join("netrc/other.netrc");
        std::fs::create_dir_all(state.join("netrc")).unwrap();
        std::fs::write(&netrc, "machine x").unwrap();
        let old_job = state.with_file_name("work").join("fake.s0.2147483600.abc");
        std::fs::create_dir_all(&old_job).unwrap();

        let (_, removed) = local_blocking(&cfg, &NoCgroups);
        assert_eq!(removed, 1, "only the dead creator's job directory");
        assert!(netrc.exists(), "nothing in state_dir is swept");
        assert!(!old_job.exists());
        assert!(path.exists(), "a live agent's receipt is not moved aside");
    }
}
