//! A job's directory: created by root with a fresh `_work` and a private HOME, handed over to
//! the job's user (mode 0700) only after root has written everything it writes there; removed
//! afterwards even when the job left read-only files, `chmod 0` directories, mounts or symlinks
//! inside it.
//!
//! Removal never follows a symlink and never leaves the tree: it walks directory descriptors
//! (`openat` with `O_NOFOLLOW | O_DIRECTORY`, `unlinkat`), so a path swapped for a symlink
//! while it runs — by anything that can still write there — is removed as a symlink, not
//! followed (the bug class of CVE-2022-21658). It never crosses into another filesystem.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;

/// The job's work directory inside its job directory.
pub const WORK: &str = "_work";
/// The job's private HOME inside its job directory.
pub const HOME: &str = "home";
/// What the job sees as `/var/tmp`, inside its job directory (on disk, like `_work`).
pub const VAR_TMP: &str = "var-tmp";

/// Directories deeper than this are moved up to the top of the tree before they are removed,
/// so removal holds a bounded number of descriptors however deep a job nests.
const MAX_OPEN_DEPTH: usize = 128;

/// Create `<root>/<job>` (root's, mode 0700) with `_work`, `home` and `var-tmp` (the user's,
/// mode 0700).
/// The caller writes what root writes there, then calls [`hand_over`].
pub fn create(root: &Path, job: &str, uid: u32, gid: u32) -> io::Result<PathBuf> {
    fs::create_dir_all(root)?;
    let job_dir = root.join(job);
    fs::DirBuilder::new().mode(0o700).create(&job_dir)?;
    let made = [WORK, HOME, VAR_TMP].iter().try_for_each(|d| {
        let p = job_dir.join(d);
        fs::DirBuilder::new().mode(0o700).create(&p)?;
        std::os::unix::fs::chown(&p, Some(uid), Some(gid))
    });
    if let Err(e) = made {
        let _ = remove_tree(&job_dir);
        return Err(e);
    }
    Ok(job_dir)
}

/// Give the job directory to its user (mode 0700: nobody else can enter it).
pub fn hand_over(job_dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let fd = open_dir_at(None, job_dir.as_os_str())?;
    nix::unistd::fchown(
        fd.as_raw_fd(),
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(io::Error::from)?;
    nix::sys::stat::fchmod(fd.as_raw_fd(), Mode::from_bits_truncate(0o700)).map_err(io::Error::from)
}

/// Create a new file (never an existing one, never through a symlink) with `content`.
pub fn write_new(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    f.write_all(content)
}

/// Replace `path` with `content` atomically (a temporary file beside it, then a rename), in a
/// directory only root writes.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .map(OsStr::to_string_lossy)
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.flywheel-tmp.{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(content)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path)
}

/// Mount points at or below `path`, deepest first.
pub(crate) fn mounts_below(path: &Path) -> Vec<PathBuf> {
    let Ok(mi) = fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = mi
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|mp| PathBuf::from(mp.replace("\\040", " ")))
        .filter(|mp| mp.starts_with(path))
        .collect();
    // Deepest first; a path listed twice has two mounts stacked on it (a job's store view on
    // its own mount point): both are unmounted.
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

pub(crate) fn open_dir_at(dir: Option<BorrowedFd<'_>>, name: &OsStr) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        dir.map(|d| d.as_raw_fd()),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The directory `rel` below `root`, made (mode 0755) where missing, walked one component at
/// a time by descriptor without following a symlink: a store a job's daemon wrote (a slot's,
/// or a layer over one) may hold a symlink where the agent expects `var/log/nix`, and root must
/// neither create nor mount anything where it points. `root` itself is the agent's.
pub(crate) fn dirs_at(root: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let mut fd = open_dir_at(None, root.as_os_str())?;
    for part in rel.components() {
        let std::path::Component::Normal(name) = part else {
            return Err(io::Error::other(format!(
                "{}: only plain names below {}",
                rel.display(),
                root.display()
            )));
        };
        match nix::sys::stat::mkdirat(Some(fd.as_raw_fd()), name, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        fd = open_dir_at(Some(fd.as_fd()), name).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{} in {} is not a plain directory (a symlink planted by a job's daemon?): {e}",
                    name.to_string_lossy(),
                    root.display()
                ),
            )
        })?;
    }
    Ok(fd)
}

pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<FileStat> {
    nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(io::Error::from)
}

fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// A directory being emptied: its descriptor, its name in its parent, and its subdirectories
/// still to visit.
struct Level {
    fd: OwnedFd,
    name: Option<CString>,
    pending: Vec<CString>,
    scanned: u8,
}

/// Detach every mount at or below `path` in the agent's namespace (a store view's, a layer's
/// overlay), without following a symlink.
pub fn detach_below(path: &Path) -> io::Result<()> {
    for mp in mounts_below(path) {
        match nix::mount::umount2(
            &mp,
            nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
        ) {
            // Gone with a mount above it.
            Err(nix::errno::Errno::EINVAL) => Ok(()),
            r => r,
        }
        .map_err(|e| {
            io::Error::other(format!(
                "unmount {} inside the job's directory: {e}",
                mp.display()
            ))
        })?;
    }
    Ok(())
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
    detach_below(path)?;
    let (parent, name) = match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => return Err(io::Error::other("refusing to remove a filesystem root")),
    };
    let parent_fd = open_dir_at(None, parent.as_os_str())?;
    remove_at(parent_fd.as_fd(), name)
}

/// `rel` below `root` removed like [`remove_tree`] (but for mounts: none is expected there),
/// every component of `rel` opened by descriptor without following a symlink: for what the
/// agent made inside a store a job's daemon writes, where a daemon may swap a directory above
/// the last name for a symlink to anywhere on the host. A component that is no longer a plain
/// directory means the tree is no longer where the agent made it: nothing is removed, and
/// that is said. `root` itself is the agent's.
pub fn remove_tree_below(root: &Path, rel: &Path) -> io::Result<()> {
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Err(io::Error::other("refusing to remove the root itself"));
    };
    let fd = match open_dir_below(root, parent) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            tracing::warn!(
                root = %root.display(),
                path = %rel.display(),
                "not removed: a component is no longer a plain directory (a symlink planted by a job's daemon?)"
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    remove_at(fd.as_fd(), name)
}

/// The directory `rel` below `root`, every component opened by descriptor without following a
/// symlink (`root` itself is the agent's); nothing is made.
pub(crate) fn open_dir_below(root: &Path, rel: &Path) -> io::Result<OwnedFd> {
    let mut fd = open_dir_at(None, root.as_os_str())?;
    for part in rel.components() {
        let std::path::Component::Normal(part) = part else {
            return Err(io::Error::other(format!(
                "{}: only plain names below {}",
                rel.display(),
                root.display()
            )));
        };
        fd = open_dir_at(Some(fd.as_fd()), part)?;
    }
    Ok(fd)
}

/// Remove `name` in the directory `parent`: a file (or symlink) unlinked, a directory emptied
/// by descriptors on its own filesystem and removed.
fn remove_at(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let top_fd = match open_dir_at(Some(parent), name) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) => {
            return match nix::unistd::unlinkat(
                Some(parent.as_raw_fd()),
                name,
                UnlinkatFlags::NoRemoveDir,
            ) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        Err(e) => return Err(e),
    };
    let dev = nix::sys::stat::fstat(top_fd.as_raw_fd())
        .map_err(io::Error::from)?
        .st_dev;
    empty_tree(top_fd, dev)?;
    nix::unistd::unlinkat(Some(parent.as_raw_fd()), name, UnlinkatFlags::RemoveDir)
        .map_err(io::Error::from)
}

/// Empty the directory `top` (on device `dev`), depth first, by descriptors only.
fn empty_tree(top: OwnedFd, dev: u64) -> io::Result<()> {
    let mut stack = vec![Level {
        fd: top,
        name: None,
        pending: Vec::new(),
        scanned: 0,
    }];
    let mut moved = 0u64;
    loop {
        let depth = stack.len();
        let top_raw = match stack.first() {
            Some(t) => t.fd.as_raw_fd(),
            None => return Ok(()),
        };
        let Some(level) = stack.last_mut() else {
            return Ok(());
        };
        if level.pending.is_empty() {
            if level.scanned >= 3 {
                return Err(io::Error::other(
                    "the tree keeps changing while it is removed; is a process still writing to it?",
                ));
            }
            level.scanned += 1;
            level.pending = scan(level.fd.as_fd())?;
            if level.pending.is_empty() {
                // Empty: remove it from its parent.
                let Some(done) = stack.pop() else {
                    return Ok(());
                };
                drop(done.fd);
                let (Some(name), Some(parent)) = (done.name, stack.last()) else {
                    return Ok(());
                };
                match nix::unistd::unlinkat(
                    Some(parent.fd.as_raw_fd()),
                    name.as_c_str(),
                    UnlinkatFlags::RemoveDir,
                ) {
                    Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                    Err(e) => return Err(e.into()),
                }
                continue;
            }
        }
        let Some(name) = level.pending.pop() else {
            continue;
        };
        // SAFETY: the level's descriptor stays open (in `stack`) for as long as `parent` is used.
        let parent = unsafe { BorrowedFd::borrow_raw(level.fd.as_raw_fd()) };
        if depth >= MAX_OPEN_DEPTH {
            // Too deep: move this subtree up to the top directory and empty it from there.
            let new_name = CString::new(format!(".flywheel-deep-{moved}"))
                .map_err(|_| io::Error::other("name with NUL"))?;
            moved += 1;
            nix::fcntl::renameat(
                Some(parent.as_raw_fd()),
                name.as_c_str(),
                Some(top_raw),
                new_name.as_c_str(),
            )
            .map_err(io::Error::from)?;
            if let Some(t) = stack.first_mut() {
                t.pending.push(new_name);
            }
            continue;
        }
        match open_dir_at(Some(parent), OsStr::from_bytes(name.as_bytes())) {
            Ok(child) => {
                let st = nix::sys::stat::fstat(child.as_raw_fd()).map_err(io::Error::from)?;
                if st.st_dev != dev {
                    return Err(io::Error::other(format!(
                        "{} is another filesystem that could not be unmounted; refusing to delete across it",
                        name.to_string_lossy()
                    )));
                }
                if st.st_mode & 0o700 != 0o700 {
                    let _ =
                        nix::sys::stat::fchmod(child.as_raw_fd(), Mode::from_bits_truncate(0o700));
                }
                stack.push(Level {
                    fd: child,
                    name: Some(name),
                    pending: Vec::new(),
                    scanned: 0,
                });
            }
            // Swapped for a symlink or a file since the scan: remove that, never follow it.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) => {
                unlink_entry(parent, &name)?;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Unlink every non-directory in `dir`; return the names of its subdirectories.
fn scan(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let mut subdirs = Vec::new();
    let listing = nix::dir::Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)?;
    for entry in listing.into_iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        // The entry's own type tells files from directories without a stat per entry; only a
        // filesystem that does not fill it in (DT_UNKNOWN) costs one. A directory's device is
        // checked when it is opened (`empty_tree`), never through a path.
        let dir_entry = match entry.file_type() {
            Some(nix::dir::Type::Directory) => true,
            Some(_) => false,
            None => match stat_at(dir, name) {
                Ok(st) => is_dir(&st),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            },
        };
        if dir_entry {
            subdirs.push(name.to_owned());
            continue;
        }
        match nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
            // Swapped for a directory since it was listed: visited like one.
            Err(nix::errno::Errno::EISDIR) => subdirs.push(name.to_owned()),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(subdirs)
}

fn unlink_entry(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    match nix::unistd::unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_then_remove_hostile_tree() {
        let t = tempfile::tempdir().expect("tempdir");
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let job = create(t.path(), "j1", uid, gid).expect("create");
        let work = job.join(WORK);
        assert!(work.is_dir() && job.join(HOME).is_dir());
        assert_eq!(fs::read_dir(&work).expect("read").count(), 0);
        write_new(&job.join(".env"), b"A=1\n", 0o644).expect("write .env");
        hand_over(&job, uid, gid).expect("hand over");
        assert_eq!(
            fs::metadata(&job).expect("stat").permissions().mode() & 0o777,
            0o700
        );
        // Read-only files, a chmod 0 directory with content, a symlink out of the tree.
        fs::create_dir_all(work.join("a/b/c")).expect("mkdir");
        fs::write(work.join("a/b/c/f"), "x").expect("write");
        fs::set_permissions(work.join("a/b/c/f"), fs::Permissions::from_mode(0o400))
            .expect("chmod");
        fs::set_permissions(work.join("a/b"), fs::Permissions::from_mode(0o000)).expect("chmod");
        let outside = t.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        fs::write(outside.join("keep"), "keep").expect("write");
        std::os::unix::fs::symlink(&outside, work.join("link")).expect("symlink");
        remove_tree(&job).expect("remove");
        assert!(!job.exists());
        assert_eq!(
            fs::read_to_string(outside.join("keep")).expect("outside kept"),
            "keep"
        );
        // Removing again is fine.
        remove_tree(&job).expect("idempotent");
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_during_removal_is_never_followed() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let t = tempfile::tempdir().expect("tempdir");
        let outside = t.path().join("outside");
        fs::create_dir(&outside).expect("mkdir");
        // Named like the tree's files: a removal that follows a swapped symlink deletes these.
        for i in 0..100 {
            fs::write(outside.join(format!("f{i}")), "keep").expect("write");
        }
        let swaps_during_removal = Arc::new(AtomicU64::new(0));
        for round in 0..100 {
            let tree = t.path().join(format!("tree{round}"));
            for d in ["a", "b/c"] {
                fs::create_dir_all(tree.join(d)).expect("mkdir");
                for i in 0..100 {
                    fs::write(tree.join(d).join(format!("f{i}")), "x").expect("write");
                }
            }
            let removing = Arc::new(AtomicBool::new(true));
            // The attacker: as soon as the removal is inside `a` (or `b/c`), swap that directory
            // for a symlink to `outside`, whose files have the same names.
            let attacker = {
                let (tree, outside, removing, swaps) = (
                    tree.clone(),
                    outside.clone(),
                    removing.clone(),
                    swaps_during_removal.clone(),
                );
                std::thread::spawn(move || {
                    let mut pending = vec!["a", "b/c"];
                    while removing.load(Ordering::SeqCst) && !pending.is_empty() {
                        pending.retain(|d| {
                            let p = tree.join(d);
                            let left = fs::read_dir(&p).map(|r| r.count()).unwrap_or(100);
                            if left >= 100 || fs::symlink_metadata(&p).map_or(true, |m| !m.is_dir())
                            {
                                return true;
                            }
                            if fs::rename(&p, tree.join(format!("{d}.moved").replace('/', "-")))
                                .is_ok()
                                && std::os::unix::fs::symlink(&outside, &p).is_ok()
                            {
                                swaps.fetch_add(1, Ordering::SeqCst);
                            }
                            false
                        });
                    }
                })
            };
            let _ = remove_tree(&tree);
            removing.store(false, Ordering::SeqCst);
            attacker.join().expect("attacker");
            // Whatever the race did, nothing outside the tree was touched.
            for i in 0..100 {
                assert!(
                    outside.join(format!("f{i}")).exists(),
                    "round {round}: removal followed a symlink out of the tree"
                );
            }
            remove_tree(&tree).expect("removed once the attacker stopped");
        }
        // The attack ran while removals were under way.
        assert!(swaps_during_removal.load(Ordering::SeqCst) > 0);
    }

    #[test]
    fn a_tree_deeper_than_the_descriptor_bound_is_removed() {
        let t = tempfile::tempdir().expect("tempdir");
        let top = t.path().join("deep");
        let mut p = top.clone();
        fs::create_dir(&p).expect("mkdir");
        // Deeper than PATH_MAX allows by path: build it relative to descriptors.
        let mut fd = open_dir_at(None, p.as_os_str()).expect("open");
        for i in 0..(MAX_OPEN_DEPTH * 3) {
            let name = format!("d{i}");
            nix::sys::stat::mkdirat(
                Some(fd.as_raw_fd()),
                name.as_str(),
                Mode::from_bits_truncate(0o755),
            )
            .expect("mkdirat");
            let f = nix::fcntl::openat(
                Some(fd.as_raw_fd()),
                "f",
                OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o644),
            )
            .expect("file");
            // SAFETY: a descriptor we just opened.
            drop(unsafe { OwnedFd::from_raw_fd(f) });
            fd = open_dir_at(Some(fd.as_fd()), OsStr::new(&name)).expect("open");
        }
        p.push("d0");
        assert!(p.is_dir());
        remove_tree(&top).expect("remove");
        assert!(!top.exists());
    }

    #[test]
    fn create_refuses_an_existing_job_dir_or_file() {
        let t = tempfile::tempdir().expect("tempdir");
        fs::create_dir(t.path().join("j")).expect("mkdir");
        assert!(create(t.path(), "j", 0, 0).is_err());
        let target = t.path().join("target");
        fs::write(&target, "root's").expect("write");
        std::os::unix::fs::symlink(&target, t.path().join("planted")).expect("symlink");
        assert!(write_new(&t.path().join("planted"), b"x", 0o644).is_err());
        assert_eq!(fs::read_to_string(&target).expect("read"), "root's");
    }

    #[test]
    fn dirs_at_makes_plain_directories_and_never_goes_through_a_symlink() {
        let t = tempfile::tempdir().expect("tempdir");
        let store = t.path().join("store");
        let elsewhere = t.path().join("elsewhere");
        fs::create_dir(&store).expect("mkdir");
        fs::create_dir(&elsewhere).expect("mkdir");
        // A plain path is made and opened.
        dirs_at(&store, Path::new("var/nix/userpool")).expect("made");
        assert!(store.join("var/nix/userpool").is_dir());
        // `var/log` planted as a symlink (by an earlier job's daemon): refused, nothing made
        // where it points. The walk refuses a symlink at the last component too.
        std::os::unix::fs::symlink(&elsewhere, store.join("var/log")).expect("symlink");
        assert!(dirs_at(&store, Path::new("var/log/nix")).is_err());
        assert!(dirs_at(&store, Path::new("var/log")).is_err());
        assert_eq!(fs::read_dir(&elsewhere).expect("read").count(), 0);
        assert!(dirs_at(&store, Path::new("../x")).is_err());
    }

    #[test]
    fn a_tree_below_a_root_is_never_reached_through_a_symlink_above_it() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("store");
        let rel = Path::new("var/nix/profiles/per-user/alice");
        // What the agent made: removed.
        fs::create_dir_all(root.join(rel).join("deep")).unwrap();
        remove_tree_below(&root, rel).unwrap();
        assert!(!root.join(rel).exists() && root.join("var/nix/profiles/per-user").exists());
        // A daemon swaps `profiles` for a symlink to a tree of the host's with a
        // `per-user/alice`.
        let victim = t.path().join("home");
        fs::create_dir_all(victim.join("per-user/alice/.ssh")).unwrap();
        fs::remove_dir_all(root.join("var/nix/profiles")).unwrap();
        std::os::unix::fs::symlink(&victim, root.join("var/nix/profiles")).unwrap();
        // The route is real: a removal by path goes through the symlink (on a copy).
        let copy = t.path().join("copy");
        fs::create_dir_all(copy.join("per-user/alice/.ssh")).unwrap();
        let by_path = t.path().join("store2/var/nix");
        fs::create_dir_all(&by_path).unwrap();
        std::os::unix::fs::symlink(&copy, by_path.join("profiles")).unwrap();
        remove_tree(&by_path.join("profiles/per-user/alice")).unwrap();
        assert!(
            !copy.join("per-user/alice").exists(),
            "a removal by path follows the symlink"
        );
        // Below the root by descriptors: the host's tree stays.
        remove_tree_below(&root, rel).unwrap();
        assert!(victim.join("per-user/alice/.ssh").exists(), "not followed");
        // Nor is the root itself or a name with `..` accepted.
        assert!(remove_tree_below(&root, Path::new("")).is_err());
        assert!(remove_tree_below(&root, Path::new("../home/alice")).is_err());
    }
}
