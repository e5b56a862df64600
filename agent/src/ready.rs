//! Waiting by readiness: the kernel says when a file appears (inotify) or a cgroup's
//! `populated` flag changes (`cgroup.events` wakes its pollers with `POLLPRI`), instead of
//! sleeping in a loop and looking again.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// An inotify instance as a file descriptor tokio can poll.
#[derive(Debug)]
struct Watch(Inotify);

impl AsRawFd for Watch {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

fn watch(dir: &Path, flags: AddWatchFlags) -> io::Result<Watch> {
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    ino.add_watch(dir, flags)?;
    Ok(Watch(ino))
}

/// Why a file did not appear.
#[derive(Debug)]
pub enum Appear {
    /// `gone` finished first (the process that was to make the file exited).
    Gone,
    TimedOut,
    Io(io::Error),
}

/// Wait until `path` exists (a socket bound, a file renamed into place), at most `within`, and
/// not after `gone` resolves. The directory is watched before the first look, so a file made
/// in between is not missed.
pub async fn appears<F: std::future::Future + Unpin>(
    path: &Path,
    within: Duration,
    mut gone: F,
) -> Result<(), Appear> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let w = watch(
        dir,
        AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ATTRIB,
    )
    .map_err(Appear::Io)?;
    // SAFETY: `Watch` owns the inotify descriptor for its whole life and always returns that
    // same descriptor from `as_raw_fd`.
    let fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(w, tokio::io::Interest::READABLE)
    }
    .map_err(|e| Appear::Io(io::Error::other(e.to_string())))?;
    let watch = ClosedAside(Some(fd));
    let Some(fd) = watch.0.as_ref() else {
        return Err(Appear::TimedOut);
    };
    let deadline = tokio::time::sleep(within);
    tokio::pin!(deadline);
    loop {
        if path.exists() {
            return Ok(());
        }
        tokio::select! {
            ready = fd.readable() => {
                let mut guard = ready.map_err(Appear::Io)?;
                // Drain the events; what changed is looked at above.
                let _ = guard.get_inner().0.read_events();
                guard.clear_ready();
            }
            _ = &mut gone => return if path.exists() { Ok(()) } else { Err(Appear::Gone) },
            () = &mut deadline => return Err(Appear::TimedOut),
        }
    }
}

/// An inotify watch whose instance is closed on a blocking thread when dropped: the close
/// waits for an RCU grace period (~15 ms here), which must not stall the runtime's thread.
struct ClosedAside(Option<tokio::io::unix::AsyncFd<Watch>>);

impl Drop for ClosedAside {
    fn drop(&mut self) {
        if let Some(fd) = self.0.take() {
            let w = fd.into_inner();
            match tokio::runtime::Handle::try_current() {
                Ok(h) => {
                    h.spawn_blocking(move || drop(w));
                }
                Err(_) => drop(w),
            }
        }
    }
}

/// A v2 cgroup's `cgroup.events`, polled for `POLLPRI`: kernfs wakes its pollers when a value
/// in it changes (`populated` when the job empties). No inotify instance: closing one waits
/// for an RCU grace period (~15 ms here), which would stall whatever thread drops it.
fn open_events(path: &Path) -> io::Result<std::fs::File> {
    let f = std::fs::File::open(path)?;
    rearm(&f);
    Ok(f)
}

/// Read the file again: kernfs reports a change once per read of it.
fn rearm(f: &std::fs::File) {
    let mut buf = [0u8; 256];
    let _ = std::os::unix::fs::FileExt::read_at(f, &mut buf, 0);
}

/// An async wait on a cgroup's `cgroup.events` (the teardown's grace, on the runtime's thread).
#[derive(Debug)]
pub struct Events(tokio::io::unix::AsyncFd<std::fs::File>);

impl Events {
    pub fn new(events_file: &Path) -> io::Result<Events> {
        let f = open_events(events_file)?;
        // SAFETY: the `File` owns its descriptor for the whole life of the `AsyncFd` and
        // always returns that same descriptor from `as_raw_fd`.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(f, tokio::io::Interest::PRIORITY)
        }
        .map(Events)
        .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Until a value in the file next changes (or the wait fails, which ends it too).
    pub async fn changed(&mut self) {
        match self.0.ready(tokio::io::Interest::PRIORITY).await {
            Ok(mut guard) => {
                rearm(guard.get_inner());
                guard.clear_ready();
            }
            Err(_) => std::future::pending().await,
        }
    }
}

/// A blocking wait on a cgroup's `cgroup.events` (the drain, on a blocking thread).
#[derive(Debug)]
pub struct EventsWatch(std::fs::File);

impl EventsWatch {
    pub fn new(events_file: &Path) -> io::Result<EventsWatch> {
        open_events(events_file).map(EventsWatch)
    }

    /// Wait at most `at_most` for a change (returns early on one).
    pub fn wait(&self, at_most: Duration) {
        let mut fds = [nix::poll::PollFd::new(
            self.0.as_fd(),
            nix::poll::PollFlags::POLLPRI,
        )];
        let ms = u16::try_from(at_most.as_millis()).unwrap_or(u16::MAX);
        if let Ok(n) = nix::poll::poll(&mut fds, ms) {
            if n > 0 {
                rearm(&self.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_made_later_is_seen_without_waiting_out_the_time() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("socket");
        let p2 = p.clone();
        let maker = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            std::fs::write(&p2, b"").unwrap();
        });
        let t = std::time::Instant::now();
        appears(&p, Duration::from_secs(10), std::future::pending::<()>())
            .await
            .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        maker.await.unwrap();
    }

    #[tokio::test]
    async fn the_maker_gone_or_the_time_up_ends_the_wait() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("never");
        let gone = Box::pin(async {});
        assert!(matches!(
            appears(&p, Duration::from_secs(10), gone).await,
            Err(Appear::Gone)
        ));
        let t = std::time::Instant::now();
        assert!(matches!(
            appears(&p, Duration::from_millis(100), std::future::pending::<()>()).await,
            Err(Appear::TimedOut)
        ));
        assert!(t.elapsed() >= Duration::from_millis(100));
    }
}
