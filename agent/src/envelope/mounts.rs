//! The mounts of a job's private mount namespace, as descriptions; `spawn` makes them.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// A mount made in a job's private mount namespace.
#[derive(Debug, Clone)]
pub(super) enum Mount {
    Bind {
        src: PathBuf,
        dst: PathBuf,
        readonly: bool,
    },
    /// An empty tmpfs that hides what is below `dst`.
    Hide { dst: PathBuf },
    /// A private `at` (`/tmp`, `/var/tmp`): a tmpfs, or the directory `src` (made at `stage`,
    /// a root-only directory outside it, then moved), with the directories in `keep` (the
    /// agent's own paths under `at`, if any) bound back into it.
    PrivateTmp {
        stage: PathBuf,
        keep: Vec<PathBuf>,
        at: PathBuf,
        src: Option<PathBuf>,
    },
    /// A private tmpfs of at most `size` bytes on `dst` (`/dev/shm`, `/run/lock`): its pages
    /// are charged to the job's memory cgroup, and it is gone with the job's mount namespace.
    Scratch { dst: PathBuf, size: u64 },
    /// The job's own POSIX message queues on `/dev/mqueue` (systemd mounts the host's there,
    /// world-writable): a fresh `mqueue` mount shows the job's IPC namespace.
    Mqueue,
    /// A `/proc` of its own with `hidepid=invisible`: the job sees only its user's processes.
    Proc,
    /// The job's store view (`view.rs`): the agent's mount point `src`, held at `dst` as a
    /// slave of it (made last, after every other mount), so the store the agent mounts there
    /// at job-started propagates in and nothing propagates back.
    View { src: PathBuf, dst: PathBuf },
    /// A mount tree the agent copied by descriptor (`view::clone_tree`), attached at `dst`:
    /// what it shows was decided in the agent's namespace, whatever the child's earlier mounts
    /// cover at its path (the build-user pool, below a store a job's layer covers).
    Tree {
        tree: std::sync::Arc<OwnedFd>,
        dst: PathBuf,
    },
}

/// `/tmp` and `/var/tmp`, which every job gets privately (a tmpfs, and a directory in its job
/// directory); `/dev/shm` and `/run/lock`, private tmpfs.
pub(super) const TMP: &str = "/tmp";
pub(super) const VAR_TMP: &str = "/var/tmp";
pub(super) const SHM: &str = "/dev/shm";
pub(super) const RUN_LOCK: &str = "/run/lock";
pub(super) const MQUEUE: &str = "/dev/mqueue";

/// The agent's own paths under `under` (`/tmp`, `/var/tmp`; only in odd setups and tests)
/// that a job's mounts or exec need: they are bound back into its private one. Outermost
/// first, no nesting.
pub(super) fn tmp_keep(paths: &[&Path], under: &str) -> Vec<PathBuf> {
    let mut keep: Vec<PathBuf> = paths
        .iter()
        .filter(|p| p.starts_with(under) && **p != Path::new(under) && p.is_dir())
        .map(|p| p.to_path_buf())
        .collect();
    keep.sort();
    keep.dedup();
    let all = keep.clone();
    keep.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    keep
}
