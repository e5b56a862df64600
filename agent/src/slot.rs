//! Runner slots: at most `max_runners` jobs of a lane run on a host at once, and a lane with a
//! `slot_root` gives each slot its own fast-local `/nix` and `_work` that outlive the job — and
//! outlive pods: under ARC every pod of the lane on a node mounts the same `slot_root`.
//!
//! Locks are `flock`s, which die with their holder. A lane without `slot_root` locks in
//! `state_dir`; a slot lane locks on the slot volume itself (`slot_root/.locks`, root-only), so
//! agents in different pods of one node never take the same slot. A free slot is chosen most
//! recently used first (its store is the warmest). A slot whose holder died without releasing
//! it (its holder marker is still there) is marked `dirty`: the caller checks it before reuse.
//! When every slot is busy, an ARC pod runs on its pod-local store instead (cold, correct);
//! nothing ever waits for a slot.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};

use crate::config::Lane;

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("lane {lane:?} has slots 0..{max} (max_runners = {max}); slot {asked} does not exist")]
    NoSuchSlot { lane: String, asked: u32, max: u32 },
    #[error("slot {slot} of lane {lane:?} is in use by another job")]
    Busy { lane: String, slot: u32 },
    #[error("lane {lane:?} is full: all {max} runner slots are in use on this host")]
    Full { lane: String, max: u32 },
    #[error("slot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A held slot; the lock is released (and the slot marked clean and recently used) when this
/// is dropped. A lock dies with its holder, so a killed agent frees its slot too.
#[derive(Debug)]
pub struct Slot {
    pub index: u32,
    /// On the lane's slot volume. False: every slot was busy and the job runs on the pod-local
    /// store (`nix_store` and `work_root` as they are).
    pub node_local: bool,
    /// The previous holder died without releasing the slot: check its store before reuse.
    pub dirty: bool,
    /// Seconds since the slot was last released, when it was ever used.
    pub idle_secs: Option<u64>,
    lock: Option<Flock<File>>,
    marks: Option<Marks>,
}

#[derive(Debug)]
struct Marks {
    holder: PathBuf,
    last_used: PathBuf,
}

impl Slot {
    /// The lock's descriptor, for a process that must hold the slot as long as it lives (the
    /// job's nix-daemon: a job orphaned by a killed agent keeps its slot).
    pub fn lock_fd(&self) -> Option<RawFd> {
        self.lock.as_ref().map(|l| l.as_raw_fd())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(m) = &self.marks {
            let _ = std::fs::write(&m.last_used, now_secs().to_string());
            let _ = std::fs::remove_file(&m.holder);
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn try_lock(path: &Path) -> Result<Option<Flock<File>>, SlotError> {
    let io = |source| SlotError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io)?;
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(io(std::io::Error::from(e))),
    }
}

/// Where a slot lane keeps its locks and markers: on the slot volume, root-only.
pub fn locks_dir(slot_root: &Path) -> PathBuf {
    slot_root.join(".locks")
}

/// Where the slots of `lane` are locked: its slot volume's, or `state_dir`'s.
pub fn locks_of(state_dir: &Path, lane: &Lane) -> PathBuf {
    match &lane.slot_root {
        Some(root) => locks_dir(root),
        None => state_dir.join("lanes").join(&lane.name),
    }
}

/// When slot `i` was last released (unix seconds), if ever.
pub fn last_used(slot_root: &Path, i: u32) -> Option<u64> {
    std::fs::read_to_string(locks_dir(slot_root).join(format!("slot-{i}.last-used")))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Mark slot `i` unusable (its job could not be torn down); free slots skip it until the
/// marker is removed.
pub fn mark_unusable(slot_root: &Path, i: u32, why: &str) {
    let _ = std::fs::write(locks_dir(slot_root).join(format!("slot-{i}.unusable")), why);
}

/// Why slot `i` is unusable, if it is.
pub fn unusable(slot_root: &Path, i: u32) -> Option<String> {
    std::fs::read_to_string(locks_dir(slot_root).join(format!("slot-{i}.unusable")))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Slot `i`'s lock when no one holds it, for a look at the slot with no job in it (the
/// startup sweep): nothing else is changed, and dropping it frees the slot. `None` when it is
/// held (a job's agent or its orphaned daemon) or was never made.
pub fn hold_if_free(slot_root: &Path, i: u32) -> Option<Flock<File>> {
    let path = locks_dir(slot_root).join(format!("slot-{i}.lock"));
    if !path.exists() {
        return None;
    }
    try_lock(&path).ok().flatten()
}

/// Who holds (or, after a crash, last held) slot `i`: the marker's text.
pub fn holder(slot_root: &Path, i: u32) -> Option<String> {
    std::fs::read_to_string(locks_dir(slot_root).join(format!("slot-{i}.holder")))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Take slot `want`, or a free one (most recently used first). `fallback`: when a slot lane
/// has no free slot, hand out a pod-local "slot" instead of failing (ARC mode).
pub fn acquire(
    state_dir: &Path,
    lane: &Lane,
    want: Option<u32>,
    fallback: bool,
) -> Result<Slot, SlotError> {
    let count = if lane.slot_root.is_some() {
        lane.slots
    } else {
        lane.max_runners
    };
    let dir = locks_of(state_dir, lane);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|source| SlotError::Io {
            path: dir.clone(),
            source,
        })?;
    let take = |i: u32| -> Result<Option<Slot>, SlotError> {
        let Some(lock) = try_lock(&dir.join(format!("slot-{i}.lock")))? else {
            return Ok(None);
        };
        let (dirty, idle_secs, marks) = match &lane.slot_root {
            None => (false, None, None),
            Some(root) => {
                let holder = dir.join(format!("slot-{i}.holder"));
                let dirty = holder.exists();
                let text = format!(
                    "pid {} on {} since {}",
                    std::process::id(),
                    nix::unistd::gethostname()
                        .map(|h| h.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    now_secs()
                );
                std::fs::write(&holder, text).map_err(|source| SlotError::Io {
                    path: holder.clone(),
                    source,
                })?;
                let idle = last_used(root, i).map(|t| now_secs().saturating_sub(t));
                let last_used = dir.join(format!("slot-{i}.last-used"));
                (dirty, idle, Some(Marks { holder, last_used }))
            }
        };
        Ok(Some(Slot {
            index: i,
            node_local: lane.slot_root.is_some(),
            dirty,
            idle_secs,
            lock: Some(lock),
            marks,
        }))
    };
    match want {
        Some(i) if i >= count => Err(SlotError::NoSuchSlot {
            lane: lane.name.clone(),
            asked: i,
            max: count,
        }),
        Some(i) => take(i)?.ok_or_else(|| SlotError::Busy {
            lane: lane.name.clone(),
            slot: i,
        }),
        None => {
            let mut order: Vec<u32> = (0..count).collect();
            if let Some(root) = &lane.slot_root {
                // Most recently used first: its store is the warmest. Never used: last.
                order.sort_by_key(|i| std::cmp::Reverse(last_used(root, *i).unwrap_or(0)));
            }
            for i in order {
                if lane
                    .slot_root
                    .as_deref()
                    .is_some_and(|r| unusable(r, i).is_some())
                {
                    continue;
                }
                if let Some(s) = take(i)? {
                    return Ok(s);
                }
            }
            if fallback && lane.slot_root.is_some() {
                return Ok(Slot {
                    index: count,
                    node_local: false,
                    dirty: false,
                    idle_secs: None,
                    lock: None,
                    marks: None,
                });
            }
            Err(SlotError::Full {
                lane: lane.name.clone(),
                max: count,
            })
        }
    }
}

/// The slot's directories on the lane's fast-local volume: (`/nix` source, `_work` root source).
pub fn slot_dirs(slot_root: &Path, index: u32) -> (PathBuf, PathBuf) {
    let base = slot_root.join(format!("slot-{index}"));
    (base.join("nix"), base.join("work"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, HostFacts, Origin};

    fn lane(root: &Path, slots: u32) -> Lane {
        let src = format!(
            "[[lane]]\nname = \"l\"\nmemory = \"1Gi\"\nmax_runners = 1\nslots = {slots}\nslot_root = \"{}\"\n",
            root.display()
        );
        let host = HostFacts {
            memory_bytes: 64 << 30,
            cpus: 4,
        };
        parse(&src, &Origin::Embedded, &host)
            .expect("config")
            .lanes
            .remove(0)
    }

    #[test]
    fn slots_are_exclusive_most_recently_used_first_and_fall_back_when_all_are_busy() {
        let t = tempfile::tempdir().expect("tempdir");
        let l = lane(t.path(), 2);
        let state = t.path().join("state");
        // Slot 1 was used last: it is taken first.
        let s1 = acquire(&state, &l, Some(1), false).expect("slot 1");
        drop(s1);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let a = acquire(&state, &l, None, true).expect("a");
        assert_eq!((a.index, a.node_local, a.dirty), (1, true, false));
        assert!(a.idle_secs.is_some());
        let b = acquire(&state, &l, None, true).expect("b");
        assert_eq!((b.index, b.node_local), (0, true));
        assert!(b.idle_secs.is_none(), "slot 0 was never used");
        // All busy: a pod-local store, never a shared slot, never a wait.
        let c = acquire(&state, &l, None, true).expect("c");
        assert_eq!((c.index, c.node_local), (2, false));
        assert!(matches!(
            acquire(&state, &l, None, false),
            Err(SlotError::Full { .. })
        ));
        assert!(holder(t.path(), 0).is_some_and(|h| h.contains("pid")));
        drop(b);
        assert!(holder(t.path(), 0).is_none(), "released cleanly");
        let d = acquire(&state, &l, None, true).expect("d");
        assert_eq!(d.index, 0);
        assert!(!d.dirty);
        // The holder died: its lock died with it, its marker stays.
        drop(d);
        std::fs::write(locks_dir(t.path()).join("slot-0.holder"), "pid 1 (killed)")
            .expect("marker");
        let e = acquire(&state, &l, Some(0), true).expect("e");
        assert!(e.dirty, "a slot whose holder died is checked before reuse");
        // A slot marked unusable is skipped until the marker goes.
        drop(e);
        drop(a);
        mark_unusable(t.path(), 0, "teardown failed");
        let f = acquire(&state, &l, None, false).expect("f");
        assert_eq!(f.index, 1);
        drop(f);
        std::fs::remove_file(locks_dir(t.path()).join("slot-0.unusable")).expect("rm");
        // The locks are root-only: a job cannot take them.
        let mode = std::fs::metadata(locks_dir(t.path()))
            .expect("locks")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
