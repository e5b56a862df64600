//! The last step of a job's nix-daemon's confinement, between fork and exec: a PID namespace
//! of its own. Every job's daemon is root with the same capability set, and the kernel lets a
//! process follow `/proc/<pid>/root` of another whose capabilities are no greater than its own:
//! in the host's PID namespace one job's daemon could write another's store through it. Here
//! the child the agent forked unshares a PID namespace and forks once more; the grandchild,
//! the namespace's first process, replaces its mount namespace's `/proc` with one of its own
//! (the host's is detached, not covered: nothing can unmount its way back to it) and execs the
//! daemon. It sees only its own processes, and no other namespace's `/proc/<pid>` exists for
//! it. The child stays outside as the daemon's init: the pid the agent's reaper watches. It
//! forwards SIGTERM, SIGINT and SIGHUP to the daemon, exits as the daemon did, and the daemon
//! dies with it (`PR_SET_PDEATHSIG`). Both stay in the job's cgroup, so the teardown's signals
//! and cgroup kill reach them, and the memory sampler reads them from the agent's `/proc`.
//! Only async-signal-safe system calls; nothing here allocates.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

/// The daemon's pid (in the agent's namespace), for the init's signal handler.
static DAEMON: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = DAEMON.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// In the forked child, after every other step: returns (Ok) only in the namespace's first
/// process, which then execs; the child itself waits for it and exits. `fail` reports an
/// error to the agent and returns it. With `userns` (the daemon's user namespace and its id
/// range's lock, `userns.rs`), the first process enters that namespace last, in a mount
/// namespace of its own that it owns (every mount made so far is locked there: nothing
/// covered can be uncovered, nothing read-only made writable), and becomes its root; the
/// child keeps the lock while the daemon lives.
pub(super) fn enter(
    fail: impl Fn() -> io::Result<()>,
    userns: Option<(i32, i32)>,
) -> io::Result<()> {
    // SAFETY: plain system calls with constant arguments or strings made at compile time.
    unsafe {
        if libc::unshare(libc::CLONE_NEWPID) != 0 {
            return fail();
        }
        let daemon = libc::fork();
        if daemon < 0 {
            return fail();
        }
        if daemon == 0 {
            if libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH) != 0
                || libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) != 0
                || !read_only_kernel_settings()
                || userns.is_some_and(|(ns, _)| !become_root_in(ns))
                || !super::confine::drop_caps()
                // The daemon dies with its init (it cannot ask whether the init died before
                // this: its parent is outside its namespace; the job's cgroup kill covers
                // that). Last: a change of credentials clears it.
                || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
            {
                return fail();
            }
            return Ok(());
        }
        wait_for(daemon, userns.map(|(_, lock)| lock))
    }
}

/// Enter the user namespace `ns`, unshare a mount namespace it owns (a copy of the current
/// one, every mount in it locked) and become its root (uid and gid 0 there, no supplementary
/// groups). False (errno set) when a step failed.
fn become_root_in(ns: i32) -> bool {
    // SAFETY: plain system calls with integer arguments.
    unsafe {
        libc::setns(ns, libc::CLONE_NEWUSER) == 0
            && libc::unshare(libc::CLONE_NEWNS) == 0
            && libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(0, 0, 0) == 0
            && libc::setresuid(0, 0, 0) == 0
    }
}

/// The procfs mount Nix's sandbox needs beside a `/proc` with read-only parts, and what
/// covers it. The agent makes both directories in the daemon's private `/tmp` before it
/// starts, as the host's root: they stay the host root's, so the daemon (root only of its
/// own user namespace) cannot get into them.
pub(super) const SPARE_DIRS: [&str; 2] = [".flywheel-proc", ".flywheel-proc/p"];
const SPARE: &std::ffi::CStr = c"/tmp/.flywheel-proc";
const SPARE_PROC: &std::ffi::CStr = c"/tmp/.flywheel-proc/p";

/// `/proc/sys`, `/proc/sysrq-trigger` and the hardware's files of `/proc` read-only for the
/// daemon: it is root in the host's user
/// namespace, and a write by path through a planted symlink (the class of CVE-2026-39860) into
/// `kernel/core_pattern` would have the kernel run a program of the builder's as the host's root.
/// Nix's sandbox mounts a `/proc` of its own in a user namespace, which the kernel allows only
/// while the namespace holds a procfs mount with nothing locked over it (`mount_too_revealing`):
/// a spare one is mounted under the daemon's private `/tmp` and covered at once by an empty
/// tmpfs, so no path reaches it. Only in the namespace's first process, its `/proc` just made.
unsafe fn read_only_kernel_settings() -> bool {
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY (for the block): system calls on constant NUL-terminated strings.
    unsafe {
        for d in [SPARE, SPARE_PROC] {
            if libc::mkdir(d.as_ptr(), 0o700) != 0
                && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
            {
                return false;
            }
        }
        if libc::mount(
            c"proc".as_ptr(),
            SPARE_PROC.as_ptr(),
            c"proc".as_ptr(),
            flags,
            std::ptr::null(),
        ) != 0
            || libc::mount(
                c"tmpfs".as_ptr(),
                SPARE.as_ptr(),
                c"tmpfs".as_ptr(),
                flags,
                c"mode=0000,size=4k".as_ptr().cast(),
            ) != 0
        {
            return false;
        }
        // Besides the kernel's settings, what of `/proc` is the hardware's (as runc keeps them
        // read-only in a container): those the kernel has.
        for p in [
            c"/proc/sys",
            c"/proc/sysrq-trigger",
            c"/proc/bus",
            c"/proc/irq",
            c"/proc/mtrr",
            c"/proc/fs",
            c"/proc/acpi",
            c"/proc/scsi",
            c"/proc/driver",
        ] {
            if p != c"/proc/sys" && libc::access(p.as_ptr(), libc::F_OK) != 0 {
                continue;
            }
            if libc::mount(
                p.as_ptr(),
                p.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ) != 0
                || libc::mount(
                    std::ptr::null(),
                    p.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | flags,
                    std::ptr::null(),
                ) != 0
            {
                return false;
            }
        }
    }
    true
}

/// The init's life: forward the stop signals, wait for the daemon, exit as it did. Only in the
/// forked child, with `daemon` its own child; `keep` (the id range's lock) stays open.
fn wait_for(daemon: libc::pid_t, keep: Option<i32>) -> ! {
    DAEMON.store(daemon, Ordering::Relaxed);
    // SAFETY: async-signal-safe system calls on structs made here; the process exits at the end.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"nix-daemon-init".as_ptr(), 0, 0, 0);
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = forward as extern "C" fn(libc::c_int) as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaction(sig, &act, std::ptr::null_mut());
        }
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGCHLD, &dfl, std::ptr::null_mut());
        // Nothing of the agent's stays open here: not the daemon's output pipes (their readers
        // see the end when the daemon exits), not the pipe by which `spawn` learns of the exec,
        // not the slot's lock (the daemon holds its own copy). The id range's lock is the
        // init's to keep: the range is the daemon's until the daemon is gone.
        match keep.and_then(|k| u32::try_from(k).ok()) {
            Some(k) => {
                if k > 0 {
                    libc::syscall(libc::SYS_close_range, 0u32, k - 1, 0u32);
                }
                libc::syscall(libc::SYS_close_range, k + 1, u32::MAX, 0u32);
            }
            None => {
                libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
            }
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(daemon, &mut status, 0);
            if r == daemon {
                break;
            }
            if r < 0 && *libc::__errno_location() != libc::EINTR {
                libc::_exit(1);
            }
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::sigaction(sig, &dfl, std::ptr::null_mut());
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status))
    }
}
