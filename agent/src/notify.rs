//! systemd's notify protocol: `READY=1` once the first runners are registered, `WATCHDOG=1`
//! while the pool loop is alive, `STOPPING=1` when draining. A no-op without `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct Notifier {
    socket: Option<Arc<(UnixDatagram, std::os::unix::net::SocketAddr)>>,
}

fn addr(path: &str) -> Option<std::os::unix::net::SocketAddr> {
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()
    } else {
        std::os::unix::net::SocketAddr::from_pathname(path).ok()
    }
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, when systemd (or a test) provides one.
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .and_then(|p| addr(&p))
            .and_then(|a| UnixDatagram::unbound().ok().map(|s| Arc::new((s, a))));
        Notifier { socket }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    pub fn send(&self, msg: &str) {
        if let Some(s) = &self.socket {
            if let Err(e) = s.0.send_to_addr(msg.as_bytes(), &s.1) {
                tracing::warn!(error = %e, "cannot notify systemd");
            }
        }
    }

    /// Ping `WATCHDOG=1` every half of `WATCHDOG_USEC` as long as `heartbeat` (unix ms, set by
    /// the pool loop) is fresher than the watchdog interval: a hung loop stops the pings.
    pub fn spawn_watchdog(&self, bg: &crate::tasks::Background, heartbeat: Arc<AtomicU64>) {
        let Some(usec) = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        else {
            return;
        };
        if !self.enabled() || usec == 0 {
            return;
        }
        let interval = Duration::from_micros(usec);
        let me = self.clone();
        bg.spawn_service(async move {
            loop {
                tokio::time::sleep(interval / 2).await;
                let age = now_ms().saturating_sub(heartbeat.load(Ordering::Relaxed));
                if u128::from(age) < interval.as_millis() {
                    me.send("WATCHDOG=1");
                } else {
                    tracing::error!(
                        age_ms = age,
                        "the pool loop is stuck; withholding the watchdog ping"
                    );
                }
            }
        });
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
