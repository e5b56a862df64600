//! The confinement of a job's nix-daemon, done in the daemon's child between fork and exec
//! after `spawn`'s setup (cgroup, private mount namespace with the slot's mounts): `state_dir`
//! and every work and slot root covered by an empty tmpfs, with the daemon's own paths under
//! them (socket directory, build record, log directory, post-build hook, netrc) bound back;
//! every mount of its namespace read-only, except the job's store (idmapped with the daemon's
//! user namespace when it has one, `userns.rs`), its socket directory, its build record, its
//! log directory and a private `/tmp`, `/dev/shm` and `/dev/pts`; then a PID namespace of its
//! own with a `/proc` of its own (`pidns.rs`), so no other process — another job's daemon
//! among them — is there to follow through `/proc/<pid>/root`; then its user namespace, in a
//! mount namespace of that namespace's where all of the above is locked; and last the
//! capabilities that lead out of a mount namespace (`open_by_handle_at`, `/proc/<pid>/root` of
//! a more privileged process, device nodes, kernel modules, raw I/O) dropped from its bounding
//! set. What it does not stop is said in docs/security.md.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use super::spawn::{cstring, private_mount_namespace};
use super::{pidns, EnvelopeError};

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
pub(super) struct MountAttr {
    pub(super) attr_set: u64,
    pub(super) attr_clr: u64,
    pub(super) propagation: u64,
    pub(super) userns_fd: u64,
}

const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
/// `MS_PRIVATE`, as mount_setattr(2)'s propagation.
const MS_PRIVATE: u64 = 1 << 18;

/// Capabilities the daemon never needs and an escape would use (capability(7) numbers):
/// DAC_READ_SEARCH (open_by_handle_at), LINUX_IMMUTABLE, SYS_MODULE, SYS_RAWIO, SYS_PTRACE
/// (`/proc/<pid>/root` and `ns/` of processes with more capabilities), SYS_PACCT, SYS_BOOT,
/// SYS_TIME, SYS_TTY_CONFIG, MKNOD, AUDIT_CONTROL, MAC_OVERRIDE, MAC_ADMIN, SYSLOG,
/// WAKE_ALARM, BLOCK_SUSPEND, PERFMON, BPF, CHECKPOINT_RESTORE.
pub(super) const DROPPED_CAPS: &[libc::c_int] = &[
    2, 9, 16, 17, 19, 20, 22, 25, 26, 27, 30, 32, 33, 34, 35, 36, 38, 39, 40,
];

/// A mount that stays writable: `src` bound at `dst` (itself, or a private directory); with
/// `idmap`, idmapped with the daemon's user namespace when it has one (`userns.rs`): on-disk
/// uid 0 is its root there (the shared store and build-user pool; what is the job's alone is
/// its root's on disk instead).
pub(super) struct Writable {
    pub src: PathBuf,
    pub dst: PathBuf,
    pub idmap: bool,
}

/// A path of the daemon's under a hidden root, bound back over the tmpfs that hides it.
struct Keep {
    path: CString,
    /// The directories to make between the hidden root and `path`, outermost first.
    dirs: Vec<CString>,
    /// A directory (else a file: its mount point is an empty file).
    dir: bool,
    /// A character device (`/dev/null`, …): the one kind of mount in the daemon's namespace
    /// where device files work.
    device: bool,
}

/// What the daemon's child does, prepared before the fork.
pub(super) struct Confinement {
    writable: Vec<(CString, CString, bool)>,
    hidden: Vec<CString>,
    keep: Vec<Keep>,
    /// Files outside the hidden roots the daemon must not read (the agent's secrets): each
    /// covered by `/dev/null`.
    covered: Vec<CString>,
    /// The daemon's user namespace and its range's lock (`userns.rs`): the idmapped mounts
    /// are made with it, the daemon enters it last, and its init keeps the lock.
    userns: Option<(i32, i32)>,
}

/// `paths` without those below another of them (outermost first, sorted).
fn outermost(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
    paths.sort();
    paths.dedup();
    let all = paths.clone();
    paths.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    paths
}

impl Confinement {
    /// `writable`: the daemon's writable mounts; `readable`: what else of it lies under a
    /// hidden root (its hook, its netrc, its `NIX_CONF_DIR`); `hidden`: the roots its
    /// namespace covers with an empty tmpfs. A root inside a writable mount (`/tmp`, which the
    /// daemon gets privately) or missing is already out of its sight.
    pub(super) fn new(
        writable: &[Writable],
        readable: &[PathBuf],
        hidden: &[PathBuf],
    ) -> Result<Confinement, EnvelopeError> {
        let c = |p: &Path| cstring(p.as_os_str());
        let own: Vec<PathBuf> = writable
            .iter()
            .map(|w| w.dst.clone())
            .chain(readable.iter().cloned())
            .filter(|p| p.exists())
            .collect();
        let roots = outermost(
            hidden
                .iter()
                .filter(|h| {
                    h.is_absolute()
                        && h.parent().is_some()
                        && h.is_dir()
                        && !writable.iter().any(|w| h.starts_with(&w.dst))
                        && !own.iter().any(|p| h.starts_with(p))
                })
                .cloned()
                .collect(),
        );
        let keep = outermost(
            own.into_iter()
                .filter(|p| roots.iter().any(|r| p.starts_with(r)))
                .collect(),
        )
        .into_iter()
        .map(|p| {
            let root = roots.iter().find(|r| p.starts_with(r));
            let mut dirs = Vec::new();
            if let Some((root, rel)) = root.and_then(|r| Some((r, p.strip_prefix(r).ok()?))) {
                let mut at = root.to_path_buf();
                let parts: Vec<_> = rel.components().collect();
                for part in parts.iter().take(parts.len().saturating_sub(1)) {
                    at.push(part);
                    dirs.push(c(&at)?);
                }
            }
            use std::os::unix::fs::FileTypeExt;
            Ok(Keep {
                path: c(&p)?,
                dirs,
                dir: p.is_dir(),
                device: std::fs::metadata(&p).is_ok_and(|m| m.file_type().is_char_device()),
            })
        })
        .collect::<Result<_, EnvelopeError>>()?;
        let covered = hidden
            .iter()
            .filter(|h| {
                h.is_absolute()
                    && h.is_file()
                    && !roots.iter().any(|r| h.starts_with(r))
                    && !writable.iter().any(|w| h.starts_with(&w.dst))
                    && !readable.iter().any(|p| p == *h)
            })
            .map(|h| c(h))
            .collect::<Result<_, _>>()?;
        Ok(Confinement {
            writable: writable
                .iter()
                .map(|w| Ok((c(&w.src)?, c(&w.dst)?, w.idmap)))
                .collect::<Result<_, EnvelopeError>>()?,
            hidden: roots.iter().map(|r| c(r)).collect::<Result<_, _>>()?,
            keep,
            covered,
            userns: None,
        })
    }

    /// Run the daemon in this user namespace (`userns.rs`), its writable mounts idmapped with
    /// it; `lock` is its id range's lock, which the daemon's init keeps. Both descriptors stay
    /// open in the agent until the daemon has started.
    pub(super) fn in_user_namespace(&mut self, ids: &super::userns::DaemonIds) {
        self.userns = Some((ids.ns.as_raw_fd(), ids.lock.as_raw_fd()));
    }

    /// Add the pre-exec step (after `ChildSetup::install`'s: in the daemon's own namespace).
    /// It ends in `pidns::enter`: what execs is the first process of a PID namespace of its
    /// own, and the process the agent started waits for it.
    pub(super) fn install(self, cmd: &mut std::process::Command, fail_fd: i32) {
        let Confinement {
            writable,
            hidden,
            keep,
            covered,
            userns,
        } = self;
        let idmap_fd = userns.map(|(ns, _)| ns);
        // Made before the fork: the hook allocates nothing.
        let mut trees = vec![-1; keep.len()];
        let hook = move || {
            let fail = || {
                let err = io::Error::last_os_error();
                // SAFETY: writing one byte to a pipe we own.
                unsafe { libc::write(fail_fd, b"x".as_ptr().cast(), 1) };
                Err(err)
            };
            // SAFETY: plain system calls on NUL-terminated strings and a struct made here.
            unsafe {
                // A namespace of its own whatever ran before: what follows must never touch
                // the host's mounts.
                if !private_mount_namespace(0) {
                    return fail();
                }
                for (src, dst, idmap) in &writable {
                    let bound = match (idmap, idmap_fd) {
                        (true, Some(ns)) => attach_idmapped(src, dst, ns),
                        _ => {
                            libc::mount(
                                src.as_ptr(),
                                dst.as_ptr(),
                                std::ptr::null(),
                                libc::MS_BIND | libc::MS_REC,
                                std::ptr::null(),
                            ) == 0
                        }
                    };
                    if !bound {
                        return fail();
                    }
                }
                // Hide `state_dir` and the work and slot roots (other jobs' socket
                // directories, records, views, `_work`); bind back the daemon's own paths,
                // each taken whole (`open_tree`) before its root is covered.
                for (k, tree) in keep.iter().zip(trees.iter_mut()) {
                    *tree = libc::syscall(
                        libc::SYS_open_tree,
                        libc::AT_FDCWD,
                        k.path.as_ptr(),
                        OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint,
                    ) as i32;
                    if *tree < 0 {
                        return fail();
                    }
                }
                for root in &hidden {
                    if libc::mount(
                        c"tmpfs".as_ptr(),
                        root.as_ptr(),
                        c"tmpfs".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        c"mode=0755,size=64k".as_ptr().cast(),
                    ) != 0
                    {
                        return fail();
                    }
                }
                for (k, tree) in keep.iter().zip(trees.iter()) {
                    for d in &k.dirs {
                        if libc::mkdir(d.as_ptr(), 0o755) != 0
                            && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
                        {
                            return fail();
                        }
                    }
                    let point = if k.dir {
                        libc::mkdir(k.path.as_ptr(), 0o755) == 0
                    } else {
                        let fd = libc::open(
                            k.path.as_ptr(),
                            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o600,
                        );
                        fd >= 0 && libc::close(fd) == 0
                    };
                    if !point
                        || libc::syscall(
                            libc::SYS_move_mount,
                            *tree,
                            c"".as_ptr(),
                            libc::AT_FDCWD,
                            k.path.as_ptr(),
                            MOVE_MOUNT_F_EMPTY_PATH,
                        ) != 0
                    {
                        return fail();
                    }
                    libc::close(*tree);
                }
                for f in &covered {
                    if libc::mount(
                        c"/dev/null".as_ptr(),
                        f.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                    {
                        return fail();
                    }
                }
                // Read-only and no device files anywhere (a write by path to a disk's node is
                // a write to the disk), but for the devices it was given.
                let ro = MountAttr {
                    attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NODEV,
                    attr_clr: 0,
                    propagation: 0,
                    userns_fd: 0,
                };
                let rw = MountAttr {
                    attr_set: 0,
                    attr_clr: MOUNT_ATTR_RDONLY,
                    propagation: 0,
                    userns_fd: 0,
                };
                let setattr = |path: &CStr, flags: libc::c_uint, attr: &MountAttr| {
                    libc::syscall(
                        libc::SYS_mount_setattr,
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        flags,
                        attr as *const MountAttr,
                        std::mem::size_of::<MountAttr>(),
                    ) == 0
                };
                if !setattr(c"/", AT_RECURSIVE, &ro) {
                    return fail();
                }
                for (_, dst, _) in &writable {
                    if !setattr(dst, AT_RECURSIVE, &rw) {
                        return fail();
                    }
                }
                let dev = MountAttr {
                    attr_set: 0,
                    attr_clr: MOUNT_ATTR_NODEV,
                    propagation: 0,
                    userns_fd: 0,
                };
                for k in keep.iter().filter(|k| k.device) {
                    if !setattr(&k.path, 0, &dev) {
                        return fail();
                    }
                }
                if !setattr(c"/proc", 0, &rw) {
                    return fail();
                }
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    c"/dev/shm".as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    c"mode=1777".as_ptr().cast(),
                ) != 0
                {
                    return fail();
                }
                // Nix gives each build a pseudo-terminal and chmods it: a devpts instance of
                // its own, not the host's terminals.
                if libc::mount(
                    c"devpts".as_ptr(),
                    c"/dev/pts".as_ptr(),
                    c"devpts".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NOEXEC,
                    c"newinstance,ptmxmode=0666,mode=0620".as_ptr().cast(),
                ) != 0
                    || libc::mount(
                        c"/dev/pts/ptmx".as_ptr(),
                        c"/dev/ptmx".as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                {
                    return fail();
                }
            }
            // The daemon's own PID namespace and `/proc`, its user namespace, its bounding
            // set; only its first process returns.
            pidns::enter(fail, userns)
        };
        // SAFETY: `hook` makes only system calls on data prepared before the fork.
        unsafe {
            cmd.pre_exec(hook);
        }
    }
}

/// Drop [`DROPPED_CAPS`] from the bounding set (in the user namespace the process is in).
/// False (errno set) when the kernel refused.
pub(super) fn drop_caps() -> bool {
    for cap in DROPPED_CAPS {
        // SAFETY: prctl with integer arguments.
        // EINVAL: a capability this kernel does not know, so nobody has it.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, *cap, 0, 0, 0) } != 0
            && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
        {
            return false;
        }
    }
    true
}

/// Between fork and exec: attach at `dst` a copy of the mount tree at `src`, idmapped with
/// the user namespace `ns`. False (errno set) when a step failed.
fn attach_idmapped(src: &CStr, dst: &CStr, ns: i32) -> bool {
    // SAFETY: open_tree(2), move_mount(2) and close(2) on NUL-terminated strings and a
    // descriptor made here.
    unsafe {
        let tree = libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | AT_RECURSIVE | libc::O_CLOEXEC as libc::c_uint,
        ) as i32;
        if tree < 0 {
            return false;
        }
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_IDMAP,
            attr_clr: 0,
            propagation: MS_PRIVATE,
            userns_fd: ns as u64,
        };
        let ok = libc::syscall(
            libc::SYS_mount_setattr,
            tree,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) == 0
            && libc::syscall(
                libc::SYS_move_mount,
                tree,
                c"".as_ptr(),
                libc::AT_FDCWD,
                dst.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            ) == 0;
        libc::close(tree);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_own_paths_under_a_hidden_root_are_kept_and_nothing_else() {
        let t = tempfile::tempdir().unwrap();
        let p = |s: &str| t.path().join(s);
        for d in [
            "state/nix-sockets/abc",
            "state/nix-logs/job",
            "work",
            "tmp",
            "nix",
            "etc",
        ] {
            std::fs::create_dir_all(p(d)).unwrap();
        }
        for f in [
            "state/nix-sockets/job.built",
            "state/nix-sockets/post-build.sh",
            "state/attic-signing.key",
            "etc/app.pem",
        ] {
            std::fs::write(p(f), "").unwrap();
        }
        let w = |s: &str| Writable {
            src: p(s),
            dst: p(s),
            idmap: true,
        };
        let writable = [
            w("nix"),
            w("state/nix-sockets/abc"),
            w("state/nix-sockets/job.built"),
            w("state/nix-logs/job"),
            w("tmp"),
        ];
        let c = Confinement::new(
            &writable,
            &[p("state/nix-sockets/post-build.sh"), p("etc/missing")],
            // `tmp/state2` is inside the daemon's private /tmp; `gone` does not exist.
            &[
                p("state"),
                p("work"),
                p("tmp/state2"),
                p("gone"),
                p("state/nix-sockets"),
                // Secret files: one outside the hidden roots (covered), one inside (hidden
                // with its root), one that is the daemon's own (kept).
                p("etc/app.pem"),
                p("state/attic-signing.key"),
                p("state/nix-sockets/post-build.sh"),
            ],
        )
        .unwrap();
        let s = |c: &CString| c.to_string_lossy().into_owned();
        assert_eq!(
            c.covered.iter().map(s).collect::<Vec<_>>(),
            vec![p("etc/app.pem").display().to_string()],
            "a secret outside the hidden roots is covered"
        );
        let roots: Vec<String> = c.hidden.iter().map(s).collect();
        assert_eq!(
            roots,
            [p("state"), p("work")].map(|x| x.display().to_string())
        );
        let kept: Vec<(String, bool, Vec<String>)> = c
            .keep
            .iter()
            .map(|k| (s(&k.path), k.dir, k.dirs.iter().map(s).collect()))
            .collect();
        let d = |x: &str| p(x).display().to_string();
        assert_eq!(
            kept,
            vec![
                (d("state/nix-logs/job"), true, vec![d("state/nix-logs")]),
                (
                    d("state/nix-sockets/abc"),
                    true,
                    vec![d("state/nix-sockets")]
                ),
                (
                    d("state/nix-sockets/job.built"),
                    false,
                    vec![d("state/nix-sockets")]
                ),
                (
                    d("state/nix-sockets/post-build.sh"),
                    false,
                    vec![d("state/nix-sockets")]
                ),
            ]
        );
    }
}
