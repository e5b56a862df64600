//! Child reaping. The agent is a child subreaper, so orphans of a job (double forks, `setsid`
//! daemons) become its children; they are all reaped here, and a waiter gets the status of the
//! one process it asked about.

use std::collections::HashMap;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, Signal, SignalKind};

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

#[derive(Debug)]
pub struct Reaper {
    sigchld: Signal,
    /// Exits of the processes someone waits for; orphans are reaped and forgotten.
    exited: HashMap<i32, Option<Exit>>,
}

impl Reaper {
    /// Listen for SIGCHLD (before any child is spawned, so that no exit is missed) and become
    /// a child subreaper.
    pub fn new() -> std::io::Result<Reaper> {
        let sigchld = signal(SignalKind::child())?;
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes an integer flag; no memory involved.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Reaper {
            sigchld,
            exited: HashMap::new(),
        })
    }

    /// Remember the exit of `pid` when it is reaped. Call it right after spawning.
    pub fn watch(&mut self, pid: i32) {
        self.exited.entry(pid).or_insert(None);
    }

    /// Reap every child that has exited; returns how many.
    pub fn reap(&mut self) -> usize {
        let mut n = 0;
        loop {
            let (pid, exit) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Exit::Signal(sig as i32)),
                Ok(WaitStatus::StillAlive) | Err(_) => return n,
                Ok(_) => continue,
            };
            n += 1;
            if let Some(slot) = self.exited.get_mut(&pid.as_raw()) {
                *slot = Some(exit);
            }
        }
    }

    /// The exit of a watched `pid`, once it has been reaped.
    pub fn take(&mut self, pid: i32) -> Option<Exit> {
        self.reap();
        match self.exited.get(&pid) {
            Some(Some(_)) => self.exited.remove(&pid).flatten(),
            _ => None,
        }
    }

    /// Wait for a watched `pid` to exit.
    pub async fn wait(&mut self, pid: i32) -> Exit {
        self.watch(pid);
        loop {
            if let Some(e) = self.take(pid) {
                return e;
            }
            self.sigchld.recv().await;
        }
    }
}
