//! A job's fresh `_work`: created empty and owned by the job's user; removed afterwards even
//! when the job left read-only files, `chmod 0` directories or mounts inside it.
//!
//! Removal runs only after the job's cgroup is empty, so nothing can swap a directory for a
//! symlink underneath it; it never follows symlinks and never crosses into another filesystem.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Create `<root>/<job>/_work`: the job directory is root's, `_work` the job user's.
pub fn create(root: &Path, job: &str, uid: u32, gid: u32) -> io::Result<(PathBuf, PathBuf)> {
    fs::create_dir_all(root)?;
    let job_dir = root.join(job);
    fs::create_dir(&job_dir)?;
    fs::set_permissions(&job_dir, fs::Permissions::from_mode(0o755))?;
    let work = job_dir.join("_work");
    let made = fs::create_dir(&work)
        .and_then(|()| fs::set_permissions(&work, fs::Permissions::from_mode(0o755)))
        .and_then(|()| std::os::unix::fs::chown(&work, Some(uid), Some(gid)));
    if let Err(e) = made {
        let _ = remove_tree(&job_dir);
        return Err(e);
    }
    Ok((job_dir, work))
}

/// Mount points at or below `path`, deepest first.
fn mounts_below(path: &Path) -> Vec<PathBuf> {
    let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = mi
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|mp| PathBuf::from(mp.replace("\\040", " ")))
        .filter(|mp| mp.starts_with(path))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Remove a directory tree, whatever the job did to it.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let top = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !top.is_dir() {
        return fs::remove_file(path);
    }
    for mp in mounts_below(path) {
        nix::mount::umount2(&mp, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
            io::Error::other(format!(
                "unmount {} inside the job's work directory: {e}",
                mp.display()
            ))
        })?;
    }
    let dev = top.dev();
    // Depth-first without recursion: (path, children already removed).
    let mut stack: Vec<(PathBuf, bool)> = vec![(path.to_path_buf(), false)];
    while let Some((p, expanded)) = stack.pop() {
        if expanded {
            fs::remove_dir(&p)?;
            continue;
        }
        let m = match fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if !m.is_dir() {
            fs::remove_file(&p)?;
            continue;
        }
        if m.dev() != dev {
            return Err(io::Error::other(format!(
                "{} is another filesystem that could not be unmounted; refusing to delete across it",
                p.display()
            )));
        }
        if m.mode() & 0o700 != 0o700 {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o700))?;
        }
        stack.push((p.clone(), true));
        for entry in fs::read_dir(&p)? {
            stack.push((entry?.path(), false));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_remove_hostile_tree() {
        let t = tempfile::tempdir().expect("tempdir");
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let (job, work) = create(t.path(), "j1", uid, gid).expect("create");
        assert!(work.is_dir());
        assert_eq!(fs::read_dir(&work).expect("read").count(), 0);
        // Read-only files, a chmod 0 directory with content, a symlink out of the tree.
        fs::create_dir_all(work.join("a/b/c")).expect("mkdir");
        fs::write(work.join("a/b/c/f"), "x").expect("write");
        fs::set_permissions(work.join("a/b/c/f"), fs::Permissions::from_mode(0o400))
            .expect("chmod");
        fs::set_permissions(work.join("a/b"), fs::Permissions::from_mode(0o000)).expect("chmod");
        let outside = t.path().join("outside");
        fs::write(&outside, "keep").expect("write");
        std::os::unix::fs::symlink(&outside, work.join("link")).expect("symlink");
        remove_tree(&job).expect("remove");
        assert!(!job.exists());
        assert_eq!(fs::read_to_string(&outside).expect("outside kept"), "keep");
        // Removing again is fine.
        remove_tree(&job).expect("idempotent");
    }

    #[test]
    fn create_refuses_an_existing_job_dir() {
        let t = tempfile::tempdir().expect("tempdir");
        fs::create_dir(t.path().join("j")).expect("mkdir");
        assert!(create(t.path(), "j", 0, 0).is_err());
    }
}
