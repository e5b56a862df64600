//! A runner job's view of its store, decided at job-started: a mount point of the agent's
//! (`<state_dir>/nix-views/<job>`, a peer group of its own) that the job's mount namespace
//! holds as a *slave* at the store's path, so what the agent mounts there later propagates in
//! and nothing the job mounts propagates back. Empty until the trust decision; then the shared
//! store (trusted) or the job's throwaway layer (untrusted), with the job's daemon socket and
//! build logs on it. Every mount is made whole (`open_tree`, `mount_setattr`) before it is
//! attached (`move_mount`), so its copy in the job's namespace has its flags, and attached on
//! a directory opened by descriptor without following a symlink ([`crate::workdir::dirs_at`]).
//! With `spawn.rs`, `confine.rs`, `pidns.rs` and `userns.rs`, the envelope's `unsafe` code.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use super::confine::MountAttr;
use super::{io_at, spawn, EnvelopeError};
use crate::workdir;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
/// `MS_PRIVATE`, as mount_setattr(2)'s propagation.
const MS_PRIVATE: u64 = 1 << 18;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
pub(super) const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub(super) const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub(super) const MOUNT_ATTR_NODEV: u64 = 0x4;
pub(super) const MOUNT_ATTR_NOEXEC: u64 = 0x8;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// Make `point` (a new directory in a root-only parent) a mount point of its own in a peer
/// group of its own: bound on itself, private (cut from its parent's group), then shared.
pub(super) fn make_point(point: &Path) -> Result<(), EnvelopeError> {
    use nix::mount::{mount, MsFlags};
    use std::os::unix::fs::DirBuilderExt;
    if let Some(parent) = point.parent() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(parent)
            .map_err(io_at("create", parent))?;
        std::fs::set_permissions(parent, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(io_at("chmod", parent))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(point)
        .map_err(io_at("create", point))?;
    let none: Option<&str> = None;
    for flags in [MsFlags::MS_BIND, MsFlags::MS_PRIVATE, MsFlags::MS_SHARED] {
        let src = (flags == MsFlags::MS_BIND).then_some(point);
        mount(src, point, none, flags, none).map_err(|e| EnvelopeError::Io {
            what: "make the job's store view a mount point of its own",
            path: point.to_path_buf(),
            source: e.into(),
        })?;
    }
    Ok(())
}

/// A detached copy of the mount tree at `path` (relative to `dirfd`; `AT_EMPTY_PATH` in
/// `flags`: the tree of `dirfd` itself), every mount below it included, with `attrs`
/// (`MOUNT_ATTR_*`) set and its propagation private before anything sees it: a copy of a
/// mount in a shared peer group (systemd makes `/` shared) would otherwise join that group, and
/// what is later mounted on the copy (a job's socket and logs) would appear at the original and
/// in every namespace holding a peer of it.
pub(super) fn clone_tree(
    dirfd: libc::c_int,
    path: &CStr,
    flags: libc::c_uint,
    attrs: u64,
    idmap: Option<BorrowedFd<'_>>,
) -> io::Result<OwnedFd> {
    let empty: &CStr = c"";
    // SAFETY: open_tree(2) on a NUL-terminated path; the descriptor it returns is ours.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dirfd,
            path.as_ptr(),
            OPEN_TREE_CLONE | AT_RECURSIVE | flags | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns (closed when `tree` is dropped: a copy never
    // attached goes with it).
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = MountAttr {
        attr_set: attrs | idmap.map_or(0, |_| MOUNT_ATTR_IDMAP),
        attr_clr: 0,
        propagation: MS_PRIVATE,
        userns_fd: idmap.map_or(0, |ns| ns.as_raw_fd() as u64),
    };
    // SAFETY: mount_setattr(2) on a descriptor we hold, an empty path and a struct made here.
    if unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(tree)
}

/// Attach a copy of the mount tree at `src` (a path of the agent's, not below anything a job
/// writes) on the directory `target`, with `attrs` (`MOUNT_ATTR_*`) set before it is attached,
/// and idmapped with the user namespace `idmap` if given.
pub(super) fn attach(
    src: &Path,
    target: BorrowedFd<'_>,
    attrs: u64,
    idmap: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let src_c = spawn::cstring(src.as_os_str()).map_err(|e| io::Error::other(e.to_string()))?;
    let tree = clone_tree(libc::AT_FDCWD, &src_c, 0, attrs, idmap)?;
    let empty: &CStr = c"";
    // SAFETY: move_mount(2) on descriptors we hold and empty paths.
    if unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Attach at `dst` (a directory of the agent's, root's) a copy of the mount tree at `src`,
/// idmapped with the user namespace `ns` (`userns.rs`).
pub(super) fn attach_idmapped(src: &Path, dst: &Path, ns: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let target = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dst)?;
    attach(src, std::os::fd::AsFd::as_fd(&target), 0, Some(ns))
}

/// Attach `src` at `rel` below `root` (the view being built), `rel` walked by descriptor.
pub(super) fn attach_at(
    src: &Path,
    root: &Path,
    rel: &Path,
    attrs: u64,
) -> Result<(), EnvelopeError> {
    use std::os::fd::AsFd;
    let at = root.join(rel);
    let target =
        workdir::dirs_at(root, rel).map_err(io_at("open without following symlinks", &at))?;
    attach(src, target.as_fd(), attrs, None).map_err(io_at("mount the job's store view at", &at))
}
