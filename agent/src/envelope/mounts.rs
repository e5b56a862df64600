//! The mounts of a job's private mount namespace, as descriptions; `spawn` makes them.

use super::*;

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
    /// A private tmpfs on `/tmp` (made at `stage`, a root-only directory outside `/tmp`, then
    /// moved), with the directories in `keep` (the agent's own paths under `/tmp`, if any)
    /// bound back into it.
    PrivateTmp { stage: PathBuf, keep: Vec<PathBuf> },
    /// A `/proc` of its own with `hidepid=invisible`: the job sees only its user's processes.
    Proc,
}

/// `/tmp`, which every job gets privately.
pub(super) const TMP: &str = "/tmp";

/// The agent's own paths under `/tmp` (only in odd setups and tests) that a job's mounts or
/// exec need: they are bound back into its private `/tmp`. Outermost first, no nesting.
pub(super) fn tmp_keep(paths: &[&Path]) -> Vec<PathBuf> {
    let mut keep: Vec<PathBuf> = paths
        .iter()
        .filter(|p| p.starts_with(TMP) && **p != Path::new(TMP) && p.is_dir())
        .map(|p| p.to_path_buf())
        .collect();
    keep.sort();
    keep.dedup();
    let all = keep.clone();
    keep.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    keep
}
