//! Child reaping. The agent is a child subreaper, so orphans of its jobs (double forks,
//! `setsid` daemons) and, as a container's PID 1, every orphan of the container become its
//! children. One task reaps them all on SIGCHLD and hands each watched process's exit to its
//! waiter.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Output, Stdio};
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

    /// As the standard library reports a wait status.
    pub fn status(self) -> ExitStatus {
        match self {
            Exit::Code(c) => ExitStatus::from_raw((c & 0xff) << 8),
            Exit::Signal(s) => ExitStatus::from_raw(s & 0x7f),
        }
    }
}

/// Runs a helper program to completion (the Nix bootstrap's `nix-store`, `useradd`, the
/// agent's own slot child). Blocking: callers run on a blocking thread.
pub trait Spawner: Send + Sync {
    fn output(&self, cmd: &mut Command) -> io::Result<Output>;
}

impl Spawner for Reaper {
    fn output(&self, cmd: &mut Command) -> io::Result<Output> {
        self.output_blocking(cmd)
    }
}

/// For a process with no reaper (a one-shot command such as `nix bootstrap`): the standard
/// library waits for its own child.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unreaped;

impl Spawner for Unreaped {
    fn output(&self, cmd: &mut Command) -> io::Result<Output> {
        cmd.output()
    }
}

/// Handle on the reaping task; cheap to clone.
#[derive(Debug, Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<i32, oneshot::Sender<Exit>>>>,
    reaped_orphans: Arc<std::sync::atomic::AtomicU64>,
    /// Woken whenever something was reaped (a job's last process, for its teardown).
    reaped: Arc<tokio::sync::Notify>,
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
            reaped: Arc::default(),
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
                Ok(WaitStatus::StillAlive) | Err(_) => {
                    if n > 0 {
                        self.reaped.notify_waiters();
                    }
                    return n;
                }
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

    /// Run `cmd` to completion and collect its output, as `Command::output` does, with the
    /// child watched by the reaper (which reaps every child with `waitpid(-1)`, so a plain
    /// `output()` could lose its status to it). Standard input is what the caller set
    /// (inherited otherwise). Blocking: call it on a blocking thread (`spawn_blocking`),
    /// never on the runtime's thread, which must stay free to reap.
    pub fn output_blocking(&self, cmd: &mut Command) -> io::Result<Output> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let (_, mut child, exited) = self.spawn(|| {
            let c = cmd.spawn()?;
            Ok((i32::try_from(c.id()).unwrap_or(i32::MAX), c))
        })?;
        let err = child.stderr.take();
        let err_reader = std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut e) = err {
                let _ = e.read_to_end(&mut v);
            }
            v
        });
        let mut stdout = Vec::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_end(&mut stdout);
        }
        let stderr = err_reader.join().unwrap_or_default();
        let exit = exited
            .blocking_recv()
            .map_err(|_| io::Error::other("the reaper stopped before the child exited"))?;
        Ok(Output {
            status: exit.status(),
            stdout,
            stderr,
        })
    }

    /// Notified whenever a reap took something (create the `Notified` before looking, so that
    /// nothing reaped in between is missed).
    pub fn on_reap(&self) -> Arc<tokio::sync::Notify> {
        self.reaped.clone()
    }

    /// Orphans reaped so far (processes nobody waited for).
    pub fn orphans_reaped(&self) -> u64 {
        self.reaped_orphans
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}
