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
/// error to the agent and returns it.
pub(super) fn enter(fail: impl Fn() -> io::Result<()>) -> io::Result<()> {
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
            // The daemon dies with its init (it cannot ask whether the init died before
            // this: its parent is outside its namespace; the job's cgroup kill covers that).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0
                || libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH) != 0
                || libc::mount(
                    c"proc".as_ptr(),
                    c"/proc".as_ptr(),
                    c"proc".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    std::ptr::null(),
                ) != 0
            {
                return fail();
            }
            return Ok(());
        }
        wait_for(daemon)
    }
}

/// The init's life: forward the stop signals, wait for the daemon, exit as it did. Only in the
/// forked child, with `daemon` its own child.
fn wait_for(daemon: libc::pid_t) -> ! {
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
        // not the slot's lock (the daemon holds its own copy).
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
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
