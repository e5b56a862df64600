//! The agent's background tasks under one `TaskTracker`: the metrics server, the control
//! socket, the hook servers, the log pumps, the watchdog and the signal watcher. `close` ends
//! the long-lived ones (they watch `done`) and waits for all of them within a deadline, so a
//! shutdown knows what is still running instead of dropping it with the runtime.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Cheap to clone; every clone spawns into the same tracker.
#[derive(Debug, Clone, Default)]
pub struct Background {
    tracker: TaskTracker,
    done: CancellationToken,
}

impl Background {
    pub fn new() -> Background {
        Background::default()
    }

    /// A task that runs until the agent closes its background (a server, the watchdog).
    pub fn spawn_service<F>(&self, fut: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let done = self.done.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = fut => {}
                () = done.cancelled() => {}
            }
        })
    }

    /// A service on another runtime (`handle`'s): closed with the agent's background all the
    /// same.
    pub fn spawn_service_on<F>(&self, fut: F, handle: &tokio::runtime::Handle) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let done = self.done.clone();
        self.tracker.spawn_on(
            async move {
                tokio::select! {
                    () = fut => {}
                    () = done.cancelled() => {}
                }
            },
            handle,
        )
    }

    /// A task that ends by itself (a log pump at its pipe's end, one connection's answer).
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Cancelled when the background closes (for a server's graceful shutdown).
    pub fn done(&self) -> CancellationToken {
        self.done.clone()
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// End the services and wait for every task, at most `within`. Returns how many were
    /// still running at the deadline.
    pub async fn close(&self, within: Duration) -> usize {
        self.tracker.close();
        self.done.cancel();
        match tokio::time::timeout(within, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn close_ends_services_and_waits_for_tasks_that_end_by_themselves() {
        let bg = Background::new();
        bg.spawn_service(std::future::pending());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        bg.spawn(async move {
            let _ = rx.await;
        });
        assert_eq!(bg.len(), 2);
        // The pump-like task has not ended: close reports it at the deadline.
        assert_eq!(bg.close(Duration::from_millis(50)).await, 1);
        tx.send(()).unwrap();
        assert_eq!(bg.close(Duration::from_secs(5)).await, 0);
        assert!(bg.is_empty());
    }
}
