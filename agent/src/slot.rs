//! Runner slots: at most `max_runners` jobs of a lane run on a host at once, and a lane with a
//! `slot_root` gives each slot its own fast-local `/nix` and `_work` that outlive the job.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

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

/// A held slot; the lock is released when this is dropped.
#[derive(Debug)]
pub struct Slot {
    pub index: u32,
    _lock: Flock<File>,
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

/// Take slot `want`, or the first free one.
pub fn acquire(state_dir: &Path, lane: &Lane, want: Option<u32>) -> Result<Slot, SlotError> {
    let dir = state_dir.join("lanes").join(&lane.name);
    std::fs::create_dir_all(&dir).map_err(|source| SlotError::Io {
        path: dir.clone(),
        source,
    })?;
    let lock = |i: u32| try_lock(&dir.join(format!("slot-{i}.lock")));
    match want {
        Some(i) if i >= lane.max_runners => Err(SlotError::NoSuchSlot {
            lane: lane.name.clone(),
            asked: i,
            max: lane.max_runners,
        }),
        Some(i) => match lock(i)? {
            Some(l) => Ok(Slot { index: i, _lock: l }),
            None => Err(SlotError::Busy {
                lane: lane.name.clone(),
                slot: i,
            }),
        },
        None => {
            for i in 0..lane.max_runners {
                if let Some(l) = lock(i)? {
                    return Ok(Slot { index: i, _lock: l });
                }
            }
            Err(SlotError::Full {
                lane: lane.name.clone(),
                max: lane.max_runners,
            })
        }
    }
}

/// The slot's directories on the lane's fast-local volume: (`/nix` source, `_work` root source).
pub fn slot_dirs(slot_root: &Path, index: u32) -> (PathBuf, PathBuf) {
    let base = slot_root.join(format!("slot-{index}"));
    (base.join("nix"), base.join("work"))
}
