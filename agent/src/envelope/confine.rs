//! The confinement of a job's nix-daemon, done in the daemon's child between fork and exec
//! after `spawn`'s setup (cgroup, private mount namespace with the slot's mounts): every mount
//! of its namespace read-only, except the job's store, its socket directory, its build record
//! and a private `/tmp`, `/dev/shm` and `/dev/pts`; `/proc` stays writable and whole (Nix's sandbox mounts
//! a `/proc` of its own, which the kernel allows only beside a fully visible one); and the
//! capabilities that lead out of a mount namespace (`open_by_handle_at`, `/proc/<pid>/root` of
//! a more privileged process, device nodes, kernel modules, raw I/O) dropped from its bounding
//! set. What it does not stop is said in docs/security.md.

use super::spawn::{cstring, private_mount_namespace};
use super::*;
use std::ffi::CStr;

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

/// Capabilities the daemon never needs and an escape would use (capability(7) numbers):
/// DAC_READ_SEARCH (open_by_handle_at), LINUX_IMMUTABLE, SYS_MODULE, SYS_RAWIO, SYS_PTRACE
/// (`/proc/<pid>/root` and `ns/` of processes with more capabilities), SYS_PACCT, SYS_BOOT,
/// SYS_TIME, SYS_TTY_CONFIG, MKNOD, AUDIT_CONTROL, MAC_OVERRIDE, MAC_ADMIN, SYSLOG,
/// WAKE_ALARM, BLOCK_SUSPEND, PERFMON, BPF, CHECKPOINT_RESTORE.
pub(super) const DROPPED_CAPS: &[libc::c_int] = &[
    2, 9, 16, 17, 19, 20, 22, 25, 26, 27, 30, 32, 33, 34, 35, 36, 38, 39, 40,
];

/// A mount that stays writable: `src` bound at `dst` (itself, or a private directory).
pub(super) struct Writable {
    pub src: PathBuf,
    pub dst: PathBuf,
}

/// What the daemon's child does, prepared before the fork.
pub(super) struct Confinement {
    writable: Vec<(CString, CString)>,
}

impl Confinement {
    pub(super) fn new(writable: &[Writable]) -> Result<Confinement, EnvelopeError> {
        let c = |p: &Path| cstring(p.as_os_str());
        Ok(Confinement {
            writable: writable
                .iter()
                .map(|w| Ok((c(&w.src)?, c(&w.dst)?)))
                .collect::<Result<_, EnvelopeError>>()?,
        })
    }

    /// Add the pre-exec step (after `ChildSetup::install`'s: in the daemon's own namespace).
    pub(super) fn install(self, cmd: &mut std::process::Command, fail_fd: i32) {
        let Confinement { writable } = self;
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
                for (src, dst) in &writable {
                    if libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ) != 0
                    {
                        return fail();
                    }
                }
                let ro = MountAttr {
                    attr_set: MOUNT_ATTR_RDONLY,
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
                for (_, dst) in &writable {
                    if !setattr(dst, AT_RECURSIVE, &rw) {
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
                for cap in DROPPED_CAPS {
                    // EINVAL: a capability this kernel does not know, so nobody has it.
                    if libc::prctl(libc::PR_CAPBSET_DROP, *cap, 0, 0, 0) != 0
                        && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                    {
                        return fail();
                    }
                }
            }
            Ok(())
        };
        // SAFETY: `hook` makes only system calls on data prepared before the fork.
        unsafe {
            cmd.pre_exec(hook);
        }
    }
}
