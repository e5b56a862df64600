//! Fork and exec: everything a child does between the two (join the cgroup, mounts, drop
//! to the job's user, `no_new_privs`) prepared before the fork. All of the envelope's
//! `unsafe` code is here, in `confine.rs`, `pidns.rs` and `userns.rs` (the job's daemon's
//! confinement) and in `view.rs` (a runner job's store view).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;

use super::mounts::Mount;
use super::{io_at, EnvelopeError};
use crate::cgroup::JobCgroup;
use crate::jobuser::JobUser;

pub(super) fn cstring(p: &OsStr) -> Result<CString, EnvelopeError> {
    CString::new(p.as_bytes())
        .map_err(|_| EnvelopeError::Spawn(io::Error::other("path contains a NUL byte")))
}

/// One mount-namespace operation of a child, with its strings made before the fork.
pub(super) enum Op {
    Bind {
        src: CString,
        dst: CString,
        readonly: bool,
    },
    Tmpfs {
        dst: CString,
        opts: CString,
    },
    Mkdir {
        path: CString,
    },
    Move {
        src: CString,
        dst: CString,
    },
    Proc,
    Mqueue,
    /// Attach a detached mount tree the agent copied (kept open until the child has execed).
    Attach {
        tree: std::sync::Arc<OwnedFd>,
        dst: CString,
    },
}

/// What a child does between fork and exec, prepared before the fork.
pub(super) struct ChildSetup {
    procs: Vec<OwnedFd>,
    ops: Vec<Op>,
    ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    cwd: CString,
    no_new_privs: bool,
    /// A descriptor the child keeps across exec (the slot's lock, for the job's daemon).
    pub(super) inherit: Option<i32>,
    /// The job's network namespace, joined before anything else.
    pub(super) netns: Option<i32>,
    /// The job's store view: the agent's mount point, and where the job sees it.
    view: Option<(CString, CString)>,
}

impl ChildSetup {
    pub(super) fn new(
        cg: &dyn JobCgroup,
        mounts: &[Mount],
        user: Option<&JobUser>,
        cwd: &Path,
        no_new_privs: bool,
    ) -> Result<ChildSetup, EnvelopeError> {
        let mut procs = Vec::new();
        for f in cg.procs_files() {
            let fd = std::fs::OpenOptions::new()
                .write(true)
                .open(&f)
                .map_err(io_at("open", &f))?;
            procs.push(OwnedFd::from(fd));
        }
        let c = |p: &Path| cstring(p.as_os_str());
        let mut ops = Vec::with_capacity(mounts.len());
        let mut view = None;
        for mount in mounts {
            match mount {
                Mount::Bind { src, dst, readonly } => ops.push(Op::Bind {
                    src: c(src)?,
                    dst: c(dst)?,
                    readonly: *readonly,
                }),
                Mount::Hide { dst } => ops.push(Op::Tmpfs {
                    dst: c(dst)?,
                    opts: c"mode=0755,size=64k".to_owned(),
                }),
                Mount::Scratch { dst, size } => ops.push(Op::Tmpfs {
                    dst: c(dst)?,
                    opts: cstring(OsStr::new(&format!("mode=1777,size={size}")))?,
                }),
                Mount::PrivateTmp {
                    stage,
                    keep,
                    at,
                    src,
                } => {
                    ops.push(match src {
                        None => Op::Tmpfs {
                            dst: c(stage)?,
                            opts: c"mode=1777".to_owned(),
                        },
                        Some(src) => Op::Bind {
                            src: c(src)?,
                            dst: c(stage)?,
                            readonly: false,
                        },
                    });
                    for k in keep {
                        let rel = k.strip_prefix(at).unwrap_or(k);
                        let mut at = stage.clone();
                        for part in rel.components() {
                            at.push(part);
                            ops.push(Op::Mkdir { path: c(&at)? });
                        }
                        ops.push(Op::Bind {
                            src: c(k)?,
                            dst: c(&at)?,
                            readonly: false,
                        });
                    }
                    ops.push(Op::Move {
                        src: c(stage)?,
                        dst: c(at)?,
                    });
                }
                Mount::Proc => ops.push(Op::Proc),
                Mount::Mqueue => ops.push(Op::Mqueue),
                Mount::View { src, dst } => view = Some((c(src)?, c(dst)?)),
                Mount::Tree { tree, dst } => ops.push(Op::Attach {
                    tree: tree.clone(),
                    dst: c(dst)?,
                }),
            }
        }
        let ids = user.map(|u| {
            (
                u.uid as libc::uid_t,
                u.gid as libc::gid_t,
                u.groups
                    .iter()
                    .map(|g| *g as libc::gid_t)
                    .collect::<Vec<_>>(),
            )
        });
        Ok(ChildSetup {
            procs,
            ops,
            ids,
            cwd: cstring(cwd.as_os_str())?,
            no_new_privs,
            inherit: None,
            netns: None,
            view,
        })
    }

    /// Install the pre-exec hook: join the cgroup and the job's network namespace, enter a
    /// private mount and IPC namespace with the mounts, drop to the user, forbid new privileges, change directory. Failures write a
    /// byte to `fail_fd`.
    pub(super) fn install(self, cmd: &mut std::process::Command, fail_fd: i32) {
        let ChildSetup {
            procs,
            ops,
            ids,
            cwd,
            no_new_privs,
            inherit,
            netns,
            view,
        } = self;
        // Runs in the forked child before exec: only async-signal-safe system calls on data
        // prepared before the fork; it allocates nothing.
        let hook = move || {
            let fail = || {
                let err = io::Error::last_os_error();
                // SAFETY: writing one byte to a pipe we own.
                unsafe { libc::write(fail_fd, b"x".as_ptr().cast(), 1) };
                Err(err)
            };
            for fd in &procs {
                // SAFETY: "0" moves the calling process into this cgroup.
                if unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                    return fail();
                }
            }
            if let Some(fd) = netns {
                // SAFETY: setns(2) into the job's network namespace, a descriptor the parent
                // keeps open across the fork.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return fail();
                }
            }
            // The store view's copy, taken in the host's namespace (a peer of the agent's mount
            // point) before this process has a namespace of its own; attached after the other
            // mounts and made a slave at once.
            let mut tree = -1;
            if let Some((src, _)) = &view {
                // SAFETY: open_tree(2) on a NUL-terminated path made before the fork.
                tree = unsafe {
                    libc::syscall(
                        libc::SYS_open_tree,
                        libc::AT_FDCWD,
                        src.as_ptr(),
                        1 | libc::O_CLOEXEC as libc::c_uint,
                    )
                } as i32;
                if tree < 0 {
                    return fail();
                }
            }
            if !ops.is_empty() || view.is_some() {
                // SAFETY: plain system calls with NUL-terminated strings made before the fork.
                // The job's own IPC namespace: no System V segment, semaphore or POSIX queue
                // shared with another job, and none outliving it.
                unsafe {
                    if !private_mount_namespace(libc::CLONE_NEWIPC) {
                        return fail();
                    }
                    for op in &ops {
                        if !child_mount(op) {
                            return fail();
                        }
                    }
                    if let Some((_, dst)) = &view {
                        // MOVE_MOUNT_F_EMPTY_PATH: the detached copy itself.
                        if libc::syscall(
                            libc::SYS_move_mount,
                            tree,
                            c"".as_ptr(),
                            libc::AT_FDCWD,
                            dst.as_ptr(),
                            0x4 as libc::c_uint,
                        ) != 0
                            || libc::mount(
                                std::ptr::null(),
                                dst.as_ptr(),
                                std::ptr::null(),
                                libc::MS_SLAVE,
                                std::ptr::null(),
                            ) != 0
                        {
                            return fail();
                        }
                        libc::close(tree);
                    }
                }
            }
            if let Some((uid, gid, groups)) = &ids {
                // SAFETY: dropping privileges: groups, then gid, then uid.
                unsafe {
                    if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(*gid) != 0
                        || libc::setuid(*uid) != 0
                    {
                        return fail();
                    }
                }
            }
            // SAFETY: prctl with constant arguments; inherited by every descendant, irrevocable.
            if no_new_privs && unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                return fail();
            }
            if let Some(fd) = inherit {
                // SAFETY: fcntl on a descriptor the parent keeps open across the fork.
                if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
                    return fail();
                }
            }
            // SAFETY: chdir with a NUL-terminated path.
            if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
                return fail();
            }
            Ok(())
        };
        // SAFETY: `hook` obeys the rules for code between fork and exec (see above).
        unsafe {
            cmd.pre_exec(hook);
        }
    }
}

/// Between fork and exec: a mount namespace of the calling process's own, nothing in it
/// propagating back. False (errno set) when either step failed.
pub(super) fn private_mount_namespace(also: libc::c_int) -> bool {
    // SAFETY: plain system calls with constant arguments.
    unsafe {
        libc::unshare(libc::CLONE_NEWNS | also) == 0
            && libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) == 0
    }
}

/// One mount operation in the forked child. Async-signal-safe: system calls only.
///
/// # Safety
/// Call only in a child between fork and exec, inside its own mount namespace.
unsafe fn child_mount(op: &Op) -> bool {
    let null = std::ptr::null();
    // SAFETY: (for each call) NUL-terminated strings made before the fork, or null.
    unsafe {
        match op {
            Op::Bind { src, dst, readonly } => {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    null,
                    libc::MS_BIND | libc::MS_REC,
                    null.cast(),
                ) == 0
                    && (!readonly
                        || libc::mount(
                            null,
                            dst.as_ptr(),
                            null,
                            libc::MS_BIND
                                | libc::MS_REMOUNT
                                | libc::MS_RDONLY
                                | libc::MS_NOSUID
                                | libc::MS_NODEV,
                            null.cast(),
                        ) == 0)
            }
            Op::Tmpfs { dst, opts } => {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    dst.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    opts.as_ptr().cast(),
                ) == 0
            }
            Op::Mkdir { path } => {
                libc::mkdir(path.as_ptr(), 0o755) == 0 || *libc::__errno_location() == libc::EEXIST
            }
            Op::Move { src, dst } => {
                libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_MOVE, null.cast()) == 0
            }
            // The job's IPC namespace's queues (made after its `unshare`).
            Op::Mqueue => {
                libc::mount(
                    c"mqueue".as_ptr(),
                    c"/dev/mqueue".as_ptr(),
                    c"mqueue".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    null.cast(),
                ) == 0
            }
            // MOVE_MOUNT_F_EMPTY_PATH: the detached copy itself.
            Op::Attach { tree, dst } => {
                libc::syscall(
                    libc::SYS_move_mount,
                    tree.as_raw_fd(),
                    c"".as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    0x4 as libc::c_uint,
                ) == 0
            }
            // A /proc of its own: processes of other users (other jobs, the agent, daemons)
            // are invisible, not just unreadable.
            Op::Proc => {
                libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    c"hidepid=invisible".as_ptr().cast(),
                ) == 0
            }
        }
    }
}

/// A pipe whose write end the pre-exec hook uses to tell agent-side failures from exec errors.
pub(super) fn fail_pipe() -> Result<(OwnedFd, OwnedFd), EnvelopeError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(|e| EnvelopeError::Spawn(e.into()))
}

pub(super) fn agent_side_failure(fail_r: &OwnedFd) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: reading from the non-blocking pipe we own.
    unsafe { libc::read(fail_r.as_raw_fd(), b.as_mut_ptr().cast(), 1) == 1 }
}
