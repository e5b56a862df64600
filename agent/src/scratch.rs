//! The fast-local check: is a job's scratch (work root, Nix store) on a local filesystem with
//! enough free space?

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("{path} is on {fs}, which is not fast-local scratch: put the lane's work_root / nix_store (or slot_root) on a local disk (ext4, xfs, btrfs or tmpfs)")]
    NotLocal { path: PathBuf, fs: String },
    #[error("{path} has {free} free, below the lane's min_free of {need}: free space there or lower min_free")]
    TooFull {
        path: PathBuf,
        free: crate::size::Bytes,
        need: crate::size::Bytes,
    },
    #[error("cannot inspect {path}: {source}")]
    Stat {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scratch {
    /// The path that was inspected (the nearest existing ancestor of the one asked about).
    pub inspected: PathBuf,
    pub fs: String,
    pub free_bytes: u64,
}

/// Name of a filesystem magic, and whether it is acceptable as fast-local scratch
/// (`None` = not known either way).
pub fn classify(magic: i64) -> (String, Option<bool>) {
    let (name, local) = match magic {
        0xEF53 => ("ext4", true),
        0x5846_5342 => ("xfs", true),
        0x9123_683E => ("btrfs", true),
        0x0102_1994 => ("tmpfs", true),
        0x2FC1_2FC1 => ("zfs", true),
        0xF2F5_2010 => ("f2fs", true),
        0x6969 => ("nfs", false),
        0x6573_5546 => ("fuse", false),
        0x794C_7630 => ("overlayfs", false),
        0xFF53_4D42 => ("cifs", false),
        0xFE53_4D42 => ("smb2", false),
        0x0102_1997 => ("9p", false),
        0x00C3_6400 => ("ceph", false),
        0x5346_414F => ("afs", false),
        0x0BD0_0BD0 => ("lustre", false),
        0x4741_5346 => ("gpfs", false),
        _ => return (format!("filesystem type 0x{magic:x}"), None),
    };
    (name.to_owned(), Some(local))
}

fn nearest_existing(path: &Path) -> PathBuf {
    let mut p = path;
    loop {
        if p.exists() {
            return p.to_path_buf();
        }
        match p.parent() {
            Some(up) => p = up,
            None => return PathBuf::from("/"),
        }
    }
}

/// Check `path` (or, when it does not exist yet, its nearest existing ancestor).
pub fn check(path: &Path, min_free: u64) -> Result<Scratch, ScratchError> {
    let inspected = nearest_existing(path);
    let stat_err = |source| ScratchError::Stat {
        path: inspected.clone(),
        source,
    };
    let sfs = nix::sys::statfs::statfs(&inspected).map_err(stat_err)?;
    #[allow(clippy::unnecessary_cast)]
    let magic = sfs.filesystem_type().0 as i64;
    let (fs, local) = classify(magic);
    match local {
        Some(false) => {
            return Err(ScratchError::NotLocal {
                path: inspected,
                fs,
            })
        }
        None => {
            tracing::warn!(path = %inspected.display(), fs = %fs, "unknown filesystem for scratch; accepting it")
        }
        Some(true) => {}
    }
    let vfs = nix::sys::statvfs::statvfs(&inspected).map_err(stat_err)?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let free_bytes = (vfs.blocks_available() as u64).saturating_mul(vfs.fragment_size() as u64);
    if free_bytes < min_free {
        return Err(ScratchError::TooFull {
            path: inspected,
            free: crate::size::Bytes(free_bytes),
            need: crate::size::Bytes(min_free),
        });
    }
    Ok(Scratch {
        inspected,
        fs,
        free_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_known_filesystems() {
        assert_eq!(classify(0xEF53), ("ext4".into(), Some(true)));
        assert_eq!(classify(0x6969), ("nfs".into(), Some(false)));
        assert_eq!(classify(0x794C_7630), ("overlayfs".into(), Some(false)));
        assert_eq!(classify(0x6573_5546), ("fuse".into(), Some(false)));
        assert_eq!(classify(0x1234).1, None);
    }

    #[test]
    fn checks_a_real_directory_and_its_missing_child() {
        let t = tempfile::tempdir().expect("tempdir");
        let s = check(&t.path().join("not/yet"), 1).expect("local tmp");
        assert_eq!(s.inspected, t.path());
        assert!(s.free_bytes > 0);
        let e = check(t.path(), u64::MAX).expect_err("nothing has that much room");
        let msg = e.to_string();
        assert!(
            msg.contains(&t.path().display().to_string()) && msg.contains("min_free"),
            "{msg}"
        );
    }

    #[test]
    fn procfs_is_not_scratch_but_is_unknown_not_rejected() {
        // /proc has a magic outside both lists: accepted with a warning.
        assert!(check(Path::new("/proc"), 0).is_ok());
    }
}
