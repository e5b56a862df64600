//! A job's receipt: every change a job makes to the host (its slot's lock, cgroup, job
//! directory, daemon socket and `/tmp`, store view and its mounts, throwaway layer, the
//! daemon's id lock, a runner's hook socket, netrc, build record and build logs) is appended
//! here **before** it is made, so whatever is on the host of a job is in its receipt.
//!
//! The receipt is one JSON file, `<state_dir>/receipts/<id>.json`, root's 0600, rewritten
//! whole at each entry: written to `<id>.json.new` and renamed over the old one. A reader sees
//! the receipt before or after an entry, never half of one, whatever kills the agent (the page
//! cache outlives it). It is not fsynced: that would hold a job's setup, on the agent's runtime
//! thread, some 5 ms an entry (15 entries for a Nix runner job) on a disk. A power cut takes
//! the kernel's part of every job with it (cgroups, mounts, locks, namespaces), and ext4
//! (`auto_da_alloc`) writes a file renamed over another before the rename itself.
//!
//! It names the agent that wrote it (pid, the kernel's start time of that pid, the boot):
//! startup reconciliation (`reconcile.rs`) undoes the receipts whose agent is gone, and
//! nothing of a live one. The job's teardown undoes its entries in reverse
//! ([`Receipt::undo`]): the cgroup first (nothing else may go while a process of the job can
//! use it; one that cannot be emptied keeps everything), then the rest, last made first. An
//! entry undone leaves the receipt; the file goes with its last entry. What could not be
//! undone stays for the next start.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

/// Which part of a runner job undoes an entry: the envelope's teardown (`Job`), or the runner
/// once its hooks have published and reported (`Runner`: the hook socket, the netrc, and the
/// build record and logs a report reads after the job's processes are gone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Job,
    Runner,
}

/// What an entry is, for people and for the failpoint (`FLYWHEEL_KILL_AT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum What {
    Slot,
    Cgroup,
    JobDir,
    DaemonSocket,
    DaemonTmp,
    View,
    ViewMounts,
    Layer,
    IdLock,
    PerUser,
    Built,
    BuildLogs,
    HookSocket,
    Netrc,
}

impl What {
    pub fn name(self) -> &'static str {
        match self {
            What::Slot => "slot",
            What::Cgroup => "cgroup",
            What::JobDir => "job-dir",
            What::DaemonSocket => "daemon-socket",
            What::DaemonTmp => "daemon-tmp",
            What::View => "view",
            What::ViewMounts => "view-mounts",
            What::Layer => "layer",
            What::IdLock => "id-lock",
            What::PerUser => "per-user",
            What::Built => "built",
            What::BuildLogs => "build-logs",
            What::HookSocket => "hook-socket",
            What::Netrc => "netrc",
        }
    }
}

/// How an entry is undone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "undo")]
pub enum Thing {
    /// A job cgroup: emptied (killed, drained) and removed, before anything else.
    Cgroup { name: String },
    /// A directory tree or a file: removed by descriptors, never through a symlink, mounts
    /// below it detached first (`workdir::remove_tree`).
    Tree { path: PathBuf },
    /// A tree the agent made inside a directory a job's daemon writes (its store's
    /// `var/nix/…/per-user/<user>`): `rel` below `root`, every component of `rel` opened by
    /// descriptor without following a symlink (`workdir::remove_tree_below`); `root` is the
    /// agent's.
    TreeBelow { root: PathBuf, rel: PathBuf },
    /// Mounts the agent attached in its own namespace at or below `path`: detached (the
    /// directory itself is another entry's).
    Mounts { path: PathBuf },
    /// An `flock` in the directory `path` (a slot's, a daemon's id range): the kernel releases
    /// it with its last holder (the agent, or the job's daemon in the cgroup, killed first),
    /// and the file stays for the next holder. Nothing to undo.
    Lock { path: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub what: What,
    pub scope: Scope,
    #[serde(flatten)]
    pub thing: Thing,
}

impl Entry {
    fn path(&self) -> Option<&Path> {
        match &self.thing {
            Thing::Tree { path } | Thing::Mounts { path } => Some(path),
            Thing::TreeBelow { .. } | Thing::Cgroup { .. } | Thing::Lock { .. } => None,
        }
    }
}

/// The agent that wrote a receipt: it is alive while a process with this pid and start time
/// runs on this boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub pid: i32,
    /// `/proc/<pid>/stat`'s start time (clock ticks after boot).
    pub start: u64,
    pub boot: String,
}

impl Owner {
    /// This process.
    pub fn me() -> Owner {
        let pid = std::process::id() as i32;
        Owner {
            pid,
            start: start_time(pid).unwrap_or(0),
            boot: boot_id(),
        }
    }

    /// Whether the agent that wrote the receipt still runs.
    pub fn alive(&self) -> bool {
        self.boot == boot_id() && start_time(self.pid) == Some(self.start)
    }
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Field 22 of `/proc/<pid>/stat` (after the command, which may hold spaces and parentheses).
fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start(&stat)
}

fn parse_start(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Doc {
    owner: Owner,
    /// The job's name, once its slot is known.
    #[serde(default)]
    job: Option<String>,
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    doc: Doc,
    /// Written or walked by this process: the file goes when nothing in it needs undoing.
    mine: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.mine
            && self
                .doc
                .entries
                .iter()
                .all(|e| matches!(e.thing, Thing::Lock { .. }))
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("write the job's receipt {path}: {source} (state_dir must be writable by the agent)")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the receipts' directory {path} is {why}: no receipt there is read; make it root's, mode 0700")]
    UnsafeDir { path: PathBuf, why: &'static str },
    #[error("read the receipt {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the receipt {path} is not one this agent wrote ({source}): look at it and remove it")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Where receipts live.
pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("receipts")
}

/// A job's receipt; clones share it (the guard's late teardown runs on a thread of its own).
#[derive(Debug, Clone)]
pub struct Receipt(Arc<Mutex<Inner>>);

/// The writer named in a receipt that [`Receipt::load`] refuses (another version's, or one not
/// the agent's alone), if it names one: whether its agent may still be running. Its entries are
/// not read.
pub fn owner_of(path: &Path) -> Option<Owner> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = Vec::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut text)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&text).ok()?;
    serde_json::from_value(v.get("owner")?.clone()).ok()
}

/// Whether `dir` (the receipts' directory) is safe to read receipts from: absent, or a real
/// directory of the agent's user that nobody else can write.
pub fn check_dir(dir: &Path) -> Result<(), ReceiptError> {
    use std::os::unix::fs::MetadataExt;
    let unsafe_dir = |why: &'static str| ReceiptError::UnsafeDir {
        path: dir.to_path_buf(),
        why,
    };
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ReceiptError::Read {
            path: dir.to_path_buf(),
            source,
        }),
        Ok(m) if !m.is_dir() => Err(unsafe_dir("not a directory")),
        Ok(m) if m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o022 != 0 => Err(
            unsafe_dir("not the agent's alone (another owner, or writable by group or others)"),
        ),
        Ok(_) => Ok(()),
    }
}

/// How entries are undone; the agent's is [`Host`], the tests' fakes record the order.
pub trait Undo {
    /// Empty the cgroup `name` and remove it. [`Busy`] keeps every other entry (the job's
    /// processes may still use them).
    fn cgroup(&mut self, name: &str) -> Result<(), Busy>;
    fn tree(&mut self, path: &Path) -> io::Result<()> {
        crate::workdir::remove_tree(path)
    }
    fn tree_below(&mut self, root: &Path, rel: &Path) -> io::Result<()> {
        crate::workdir::remove_tree_below(root, rel)
    }
    fn mounts(&mut self, path: &Path) -> io::Result<()> {
        crate::workdir::detach_below(path)
    }
}

/// What a walk back could not undo (those entries stay in the receipt).
#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    /// The job's cgroup could not be emptied or removed (the undoer's words).
    #[error("{0}")]
    Cgroup(String),
    #[error("kept {} while processes of the job remain; remove them once they are gone", paths(.0))]
    KeptWhileBusy(Vec<PathBuf>),
    #[error("remove {}: {source}", path.display())]
    Remove { path: PathBuf, source: io::Error },
    #[error("remove {} below {}: {source}", rel.display(), root.display())]
    RemoveBelow {
        root: PathBuf,
        rel: PathBuf,
        source: io::Error,
    },
    #[error("unmount below {}: {source}", path.display())]
    Unmount { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Save(ReceiptError),
}

fn paths(p: &[PathBuf]) -> String {
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// All of `errors` in one line.
pub fn joined(errors: &[UndoError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why an entry could not be undone.
#[derive(Debug)]
pub enum Busy {
    /// Processes of the job remain: nothing else is undone.
    Processes(String),
    /// The cgroup is empty but stays (its removal failed): the rest is undone.
    Kept(String),
}

impl Receipt {
    /// A new receipt in `dir` named `<prefix>.<pid>.<hex>`, written before anything is.
    pub fn create(dir: &Path, prefix: &str) -> Result<Receipt, ReceiptError> {
        let path = dir.join(format!(
            "{prefix}.{}.{:012x}.json",
            std::process::id(),
            fastrand::u64(..1 << 48)
        ));
        let write = |source| ReceiptError::Write {
            path: dir.to_path_buf(),
            source,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(write)?;
        }
        let inner = Inner {
            path,
            doc: Doc {
                owner: Owner::me(),
                job: None,
                entries: Vec::new(),
            },
            mine: true,
        };
        save(&inner)?;
        Ok(Receipt(Arc::new(Mutex::new(inner))))
    }

    /// A receipt found on disk (reconciliation): undone only by [`Receipt::undo`] when its
    /// owner is gone.
    pub fn load(path: &Path) -> Result<Receipt, ReceiptError> {
        let read = |source| ReceiptError::Read {
            path: path.to_path_buf(),
            source,
        };
        let text = {
            use std::io::Read;
            use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(path)
                .map_err(read)?;
            let m = f.metadata().map_err(read)?;
            if !m.is_file() || m.uid() != nix::unistd::geteuid().as_raw() || m.mode() & 0o022 != 0 {
                return Err(read(io::Error::other(
                    "not a regular file of the agent's user that only it can write",
                )));
            }
            let mut text = Vec::new();
            f.read_to_end(&mut text).map_err(read)?;
            text
        };
        let doc: Doc = serde_json::from_slice(&text).map_err(|source| ReceiptError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Receipt(Arc::new(Mutex::new(Inner {
            path: path.to_path_buf(),
            doc,
            mine: false,
        }))))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn path(&self) -> PathBuf {
        self.lock().path.clone()
    }

    pub fn owner(&self) -> Owner {
        self.lock().doc.owner.clone()
    }

    pub fn job(&self) -> Option<String> {
        self.lock().doc.job.clone()
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.lock().doc.entries.clone()
    }

    /// Name the job (written with the next entry).
    pub fn set_job(&self, job: &str) {
        self.lock().doc.job = Some(job.to_owned());
    }

    /// Append an entry and write the receipt: call before making what it names.
    pub fn record(&self, scope: Scope, what: What, thing: Thing) -> Result<(), ReceiptError> {
        failpoint(what.name());
        let mut inner = self.lock();
        inner.doc.entries.push(Entry { what, scope, thing });
        let saved = save(&inner);
        if saved.is_err() {
            // Not on disk: the caller makes nothing, so nothing is left to undo.
            inner.doc.entries.pop();
        }
        saved
    }

    /// Drop the last entry of kind `what` (its making failed and left nothing).
    pub fn forget(&self, what: What) {
        let mut inner = self.lock();
        if let Some(i) = inner.doc.entries.iter().rposition(|e| e.what == what) {
            inner.doc.entries.remove(i);
            let _ = save(&inner);
        }
    }

    /// Whether the job's cgroup is still to be emptied and removed (its teardown has not
    /// finished, or could not empty it): until then nothing else of the job may go.
    pub fn cgroup_pending(&self) -> bool {
        self.lock()
            .doc
            .entries
            .iter()
            .any(|e| matches!(e.thing, Thing::Cgroup { .. }))
    }

    /// Undo the entries of `scope` (all, for `None`) in reverse: cgroups first, then the rest
    /// last made first. Returns what could not be undone, which stays in the receipt. Blocking.
    pub fn undo(&self, scope: Option<Scope>, how: &mut dyn Undo) -> Vec<UndoError> {
        let mut inner = self.lock();
        inner.mine = true;
        let mut errors = Vec::new();
        let mut left = Vec::new();
        let entries = std::mem::take(&mut inner.doc.entries);
        let (mine, others): (Vec<Entry>, Vec<Entry>) = entries
            .into_iter()
            .partition(|e| scope.is_none_or_eq(e.scope));
        let mut busy = false;
        for e in mine
            .iter()
            .rev()
            .filter(|e| matches!(e.thing, Thing::Cgroup { .. }))
        {
            let Thing::Cgroup { name } = &e.thing else {
                continue;
            };
            match how.cgroup(name) {
                Ok(()) => {}
                Err(Busy::Kept(msg)) => {
                    errors.push(UndoError::Cgroup(msg));
                    left.push(e.clone());
                }
                Err(Busy::Processes(msg)) => {
                    errors.push(UndoError::Cgroup(msg));
                    busy = true;
                }
            }
        }
        if busy {
            let kept: Vec<PathBuf> = mine
                .iter()
                .filter_map(Entry::path)
                .filter(|p| std::fs::symlink_metadata(p).is_ok())
                .map(Path::to_path_buf)
                .collect();
            if !kept.is_empty() {
                errors.push(UndoError::KeptWhileBusy(kept));
            }
            left = mine;
        } else {
            for e in mine.into_iter().rev() {
                let done = match &e.thing {
                    Thing::Cgroup { .. } | Thing::Lock { .. } => continue,
                    Thing::Tree { path } => how.tree(path).map_err(|source| UndoError::Remove {
                        path: path.clone(),
                        source,
                    }),
                    Thing::TreeBelow { root, rel } => {
                        how.tree_below(root, rel)
                            .map_err(|source| UndoError::RemoveBelow {
                                root: root.clone(),
                                rel: rel.clone(),
                                source,
                            })
                    }
                    Thing::Mounts { path } => {
                        how.mounts(path).map_err(|source| UndoError::Unmount {
                            path: path.clone(),
                            source,
                        })
                    }
                };
                if let Err(err) = done {
                    errors.push(err);
                    left.push(e);
                }
            }
            left.reverse();
        }
        let mut kept = others;
        kept.extend(left);
        inner.doc.entries = kept;
        let only_locks = inner
            .doc
            .entries
            .iter()
            .all(|e| matches!(e.thing, Thing::Lock { .. }));
        if only_locks && scope.is_none() {
            inner.doc.entries.clear();
        }
        if let Err(e) = save(&inner) {
            errors.push(UndoError::Save(e));
        }
        errors
    }
}

trait ScopeMatch {
    fn is_none_or_eq(&self, s: Scope) -> bool;
}

impl ScopeMatch for Option<Scope> {
    fn is_none_or_eq(&self, s: Scope) -> bool {
        self.map_or(true, |m| m == s)
    }
}

/// Write the receipt whole: a new file renamed over the old.
fn save(inner: &Inner) -> Result<(), ReceiptError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = &inner.path;
    let err = |source| ReceiptError::Write {
        path: path.clone(),
        source,
    };
    let text = serde_json::to_vec_pretty(&inner.doc).map_err(|e| err(io::Error::other(e)))?;
    let mut new = path.clone().into_os_string();
    new.push(".new");
    let new = PathBuf::from(new);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&new)
        .map_err(err)?;
    f.write_all(&text).map_err(err)?;
    drop(f);
    std::fs::rename(&new, path).map_err(err)
}

/// Debug builds only: `FLYWHEEL_KILL_AT=<name>` SIGKILLs the agent when it reaches `name` (a
/// receipt entry about to be recorded, or a phase), for the tests of what a killed agent
/// leaves behind. Release builds never look.
pub fn failpoint(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("FLYWHEEL_KILL_AT").is_ok_and(|v| v == name) {
        tracing::warn!(failpoint = name, "FLYWHEEL_KILL_AT: killing the agent here");
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

/// The agent's way of undoing: a cgroup by `mgr` (emptied within `drain`).
#[derive(Debug)]
pub struct Host<'a> {
    pub mgr: &'a dyn crate::cgroup::CgroupManager,
    pub drain: std::time::Duration,
}

impl Undo for Host<'_> {
    fn cgroup(&mut self, name: &str) -> Result<(), Busy> {
        let cg = self.mgr.open(name);
        cg.kill_and_drain(self.drain)
            .map_err(|e| Busy::Processes(e.to_string()))?;
        cg.remove().map_err(|e| Busy::Kept(e.to_string()))
    }
}

/// Undoing entries with no cgroup among them (a runner's own, after its job's teardown).
#[derive(Debug)]
pub struct Plain;

impl Undo for Plain {
    fn cgroup(&mut self, name: &str) -> Result<(), Busy> {
        Err(Busy::Kept(format!(
            "the cgroup {name} is its job's teardown's to remove"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what is undone, in order; `busy` cgroups cannot be emptied.
    #[derive(Default)]
    struct Fake {
        log: Vec<String>,
        busy: bool,
        fail_tree: Option<PathBuf>,
    }

    impl Undo for Fake {
        fn cgroup(&mut self, name: &str) -> Result<(), Busy> {
            self.log.push(format!("cgroup {name}"));
            if self.busy {
                Err(Busy::Processes("still populated".into()))
            } else {
                Ok(())
            }
        }
        fn tree(&mut self, path: &Path) -> io::Result<()> {
            self.log.push(format!("tree {}", path.display()));
            if self.fail_tree.as_deref() == Some(path) {
                return Err(io::Error::other("refused"));
            }
            crate::workdir::remove_tree(path)
        }
        fn mounts(&mut self, path: &Path) -> io::Result<()> {
            self.log.push(format!("mounts {}", path.display()));
            Ok(())
        }
    }

    fn tree(p: &Path) -> Thing {
        Thing::Tree {
            path: p.to_path_buf(),
        }
    }

    /// A runner job's receipt as the agent writes it, with its directories made.
    fn sample(t: &Path) -> (Receipt, Vec<PathBuf>) {
        let r = Receipt::create(&t.join("receipts"), "lane").unwrap();
        let d: Vec<PathBuf> = ["hook", "job", "view", "layer", "built"]
            .iter()
            .map(|n| t.join(n))
            .collect();
        r.record(Scope::Runner, What::HookSocket, tree(&d[0]))
            .unwrap();
        r.record(
            Scope::Job,
            What::Slot,
            Thing::Lock {
                path: t.join("locks"),
            },
        )
        .unwrap();
        r.record(
            Scope::Job,
            What::Cgroup,
            Thing::Cgroup {
                name: "lane.s0.1.a".into(),
            },
        )
        .unwrap();
        r.record(Scope::Job, What::JobDir, tree(&d[1])).unwrap();
        r.record(Scope::Job, What::View, tree(&d[2])).unwrap();
        r.record(Scope::Job, What::Layer, tree(&d[3])).unwrap();
        r.record(
            Scope::Job,
            What::ViewMounts,
            Thing::Mounts { path: d[2].clone() },
        )
        .unwrap();
        r.record(Scope::Runner, What::Built, tree(&d[4])).unwrap();
        for p in &d {
            std::fs::create_dir_all(p).unwrap();
        }
        (r, d)
    }

    #[test]
    fn every_entry_is_on_disk_before_the_next_is_made() {
        let t = tempfile::tempdir().unwrap();
        let (r, d) = sample(t.path());
        let on_disk = Receipt::load(&r.path()).unwrap();
        assert_eq!(on_disk.entries(), r.entries());
        assert_eq!(on_disk.entries().len(), 8);
        assert_eq!(on_disk.owner(), Owner::me());
        assert!(on_disk.owner().alive(), "this process wrote it");
        assert_eq!(on_disk.entries()[3].thing, tree(&d[1]));
        let text = std::fs::read_to_string(r.path()).unwrap();
        assert!(text.contains("\"what\": \"job-dir\""), "{text}");
        // Written by rename: no half-written file is ever left beside it.
        let names: Vec<_> = std::fs::read_dir(t.path().join("receipts"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn teardown_undoes_its_scope_in_reverse_with_the_cgroup_first_and_the_runner_its_own_after() {
        let t = tempfile::tempdir().unwrap();
        let (r, d) = sample(t.path());
        let path = r.path();
        let mut f = Fake::default();
        assert!(r.undo(Some(Scope::Job), &mut f).is_empty());
        let p = |i: usize| d[i].display().to_string();
        assert_eq!(
            f.log,
            [
                "cgroup lane.s0.1.a".to_owned(),
                format!("mounts {}", p(2)),
                format!("tree {}", p(3)),
                format!("tree {}", p(2)),
                format!("tree {}", p(1)),
            ]
        );
        assert!(d[0].exists() && d[4].exists(), "the runner's are its own");
        // What is left on disk is the runner's.
        let left = Receipt::load(&path).unwrap().entries();
        assert!(left.iter().all(|e| e.scope == Scope::Runner), "{left:?}");
        let mut f = Fake::default();
        assert!(r.undo(Some(Scope::Runner), &mut f).is_empty());
        assert_eq!(f.log, [format!("tree {}", p(4)), format!("tree {}", p(0))]);
        assert!(d.iter().all(|p| !p.exists()));
        drop(r);
        assert!(!path.exists(), "the receipt goes with its last entry");
    }

    #[test]
    fn a_cgroup_that_cannot_be_emptied_keeps_everything_and_the_receipt() {
        let t = tempfile::tempdir().unwrap();
        let (r, d) = sample(t.path());
        let path = r.path();
        let mut f = Fake {
            busy: true,
            ..Fake::default()
        };
        let errors = r.undo(Some(Scope::Job), &mut f);
        assert_eq!(f.log, ["cgroup lane.s0.1.a"], "nothing else touched");
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().contains("kept") && e.to_string().contains("job")),
            "{errors:?}"
        );
        assert!(d.iter().all(|p| p.exists()));
        drop(r);
        let left = Receipt::load(&path).unwrap().entries();
        assert_eq!(left.len(), 8, "kept for the next start: {left:?}");
    }

    #[test]
    fn what_fails_stays_in_the_receipt_and_the_rest_goes() {
        let t = tempfile::tempdir().unwrap();
        let (r, d) = sample(t.path());
        let path = r.path();
        let mut f = Fake {
            fail_tree: Some(d[3].clone()),
            ..Fake::default()
        };
        let errors = r.undo(None, &mut f);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].to_string().contains("layer"), "{errors:?}");
        drop(r);
        let left = Receipt::load(&path).unwrap().entries();
        assert_eq!(left.len(), 1, "{left:?}");
        assert_eq!(left[0].what, What::Layer);
    }

    #[test]
    fn a_receipt_of_someone_else_is_left_alone_when_dropped() {
        let t = tempfile::tempdir().unwrap();
        let r = Receipt::create(&t.path().join("receipts"), "lane").unwrap();
        r.record(
            Scope::Job,
            What::Slot,
            Thing::Lock {
                path: t.path().into(),
            },
        )
        .unwrap();
        let path = r.path();
        let seen = Receipt::load(&path).unwrap();
        drop(seen);
        assert!(path.exists(), "loaded, not walked: not removed");
        drop(r);
        assert!(
            !path.exists(),
            "nothing to undo left: its writer removes it"
        );
    }

    #[test]
    fn a_dead_owner_is_told_from_a_live_one() {
        let me = Owner::me();
        assert!(me.start > 0);
        assert!(me.alive());
        let reused = Owner {
            start: me.start + 1,
            ..me.clone()
        };
        assert!(!reused.alive(), "same pid, another process");
        let other_boot = Owner {
            boot: "another".into(),
            ..me.clone()
        };
        assert!(!other_boot.alive());
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 1";
        assert_eq!(parse_start(stat), Some(98765));
    }

    #[test]
    fn a_receipt_that_cannot_be_written_records_nothing() {
        let t = tempfile::tempdir().unwrap();
        let r = Receipt::create(&t.path().join("receipts"), "lane").unwrap();
        std::fs::remove_dir_all(t.path().join("receipts")).unwrap();
        let e = r
            .record(Scope::Job, What::JobDir, tree(&t.path().join("x")))
            .unwrap_err();
        assert!(e.to_string().contains("receipt"), "{e}");
        assert!(r.entries().is_empty());
    }
}
