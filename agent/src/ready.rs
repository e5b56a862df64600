//! Waiting by readiness: the kernel says when a file appears (inotify) or a cgroup's
//! `populated` flag changes (`cgroup.events` is a file-modified event), instead of sleeping in
//! a loop and looking again.

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

/// A watch on a v2 cgroup's `cgroup.events`, which the kernel marks modified when the cgroup's
/// `populated` flag changes. Blocking; for teardown, which runs on a blocking thread.
#[derive(Debug)]
pub struct EventsWatch(Watch);

impl EventsWatch {
    pub fn new(events_file: &Path) -> io::Result<EventsWatch> {
        watch(events_file, AddWatchFlags::IN_MODIFY).map(EventsWatch)
    }

    /// Wait at most `at_most` for a change (returns early on one).
    pub fn wait(&self, at_most: Duration) {
        let fd = self.0 .0.as_fd();
        let mut fds = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLIN)];
        let ms = u16::try_from(at_most.as_millis()).unwrap_or(u16::MAX);
        if let Ok(n) = nix::poll::poll(&mut fds, ms) {
            if n > 0 {
                let _ = self.0 .0.read_events();
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

    #[test]
    fn an_events_watch_wakes_on_a_modification() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("cgroup.events");
        std::fs::write(&f, "populated 1\n").unwrap();
        let w = EventsWatch::new(&f).unwrap();
        let f2 = f.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(&f2, "populated 0\n").unwrap();
        });
        let t = std::time::Instant::now();
        w.wait(Duration::from_secs(10));
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        writer.join().unwrap();
    }
}
