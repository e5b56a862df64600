//! Child reaping. The agent is a child subreaper, so orphans of its jobs (double forks,
//! `setsid` daemons) and, as a container's PID 1, every orphan of the container become its
//! children. One task reaps them all on SIGCHLD and hands each watched process's exit to its
//! waiter.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a process ended, as a shell would report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

impl Exit {
    /// `128 + signal` for a signal, as shells and container runtimes report it.
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
        }
    }
}

/// Handle on the reaping task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<i32, oneshot::Sender<Exit>>>>,
    reaped_orphans: Arc<std::sync::atomic::AtomicU64>,
}

impl Reaper {
    /// Become a child subreaper and start reaping. Call inside a tokio runtime, before any
    /// child is spawned.
    pub fn start() -> io::Result<Reaper> {
        let mut sigchld = signal(SignalKind::child())?;
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag; no memory involved.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let reaper = Reaper {
            waiters: Arc::default(),
            reaped_orphans: Arc::default(),
        };
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap();
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    /// Spawn a child with `f` (which returns its pid) and get a receiver for its exit. The
    /// spawn happens under the waiters' lock, so the child cannot be reaped before it is
    /// watched.
    pub fn spawn<T>(
        &self,
        f: impl FnOnce() -> io::Result<(i32, T)>,
    ) -> io::Result<(i32, T, oneshot::Receiver<Exit>)> {
        let mut w = self
            .waiters
            .lock()
            .map_err(|_| io::Error::other("reaper lock poisoned"))?;
        let (pid, extra) = f()?;
        let (tx, rx) = oneshot::channel();
        w.insert(pid, tx);
        Ok((pid, extra, rx))
    }

    /// Reap every child that has exited; returns how many.
    pub fn reap(&self) -> usize {
        let Ok(mut w) = self.waiters.lock() else {
            return 0;
        };
        let mut n = 0;
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return n,
                Ok(_) => continue,
            };
            n += 1;
            match w.remove(&pid.as_raw()) {
                Some(tx) => {
                    let _ = tx.send(exit);
                }
                None => {
                    self.reaped_orphans
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }

    /// Orphans reaped so far (processes nobody waited for).
    pub fn orphans_reaped(&self) -> u64 {
        self.reaped_orphans
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
