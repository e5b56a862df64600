//! Whether a lane's upstream may be used at all: it must refuse a write that carries no
//! credential. Jobs reach the upstream (reads are passed on, and a job's network reaches out),
//! so one that takes anonymous writes can be written by a pull request straight, past its
//! endpoint, and a trusted build would be served what it wrote. The agent asks: an anonymous
//! `PUT` of a fresh random CAS blob under its own hash and one of an empty action result under
//! a random key (harmless where they are taken). Only an explicit refusal of both (401, 403,
//! 405) lets jobs use the upstream; anything else — taken, another answer, none — fails closed.
//!
//! The first requests of a lane wait for the first answer (at most `timeout` and a second);
//! after that an answer stands (10 minutes, or 30 s when it was not a refusal) and is renewed
//! in the background while it keeps standing, so no request waits on the upstream's answer
//! to a probe, and a request whose client goes away cancels no probe.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::Upstream;

/// What the agent knows of a lane's upstream and writes without a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// Both probes were refused (401, 403 or 405): writes need the agent's credential. Used.
    Refuses,
    /// A probe was taken: anything that reaches the upstream can write it. Not used.
    Open(String),
    /// Not asked yet, or a probe got another answer or none (3xx, 429, 5xx, down, slow):
    /// whether it takes anonymous writes is not known. Not used.
    Unverified(String, Cause),
}

/// Why a probe got no refusal, when it was not an answer at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Nothing listened, or the connection failed.
    Down,
    /// No answer in time.
    Slow,
    /// A 5xx.
    ServerError,
    /// An answer, but neither a refusal nor a write taken (3xx, 404, 429, …).
    Other,
}

/// Why a job did not use the lane's upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unused {
    /// It took a write without credentials.
    Open,
    /// It did not refuse one (another answer, or none).
    Unverified,
}

/// The guard's state: the last answer, when, and whether a probe is under way.
#[derive(Debug)]
pub(super) struct GuardState {
    guard: Guard,
    at: Option<Instant>,
    probing: bool,
}

#[cfg(test)]
impl GuardState {
    /// A state as if the probe had just answered `guard`.
    pub(super) fn answered(guard: Guard) -> GuardState {
        GuardState {
            guard,
            at: Some(Instant::now()),
            probing: false,
        }
    }
}

impl Default for GuardState {
    fn default() -> Self {
        GuardState {
            guard: Guard::Unverified("not asked yet".into(), Cause::Other),
            at: None,
            probing: false,
        }
    }
}

/// How long a refusal (or a write taken) stands before the upstream is asked again.
const STANDS: Duration = Duration::from_secs(600);
/// How soon an upstream whose answer was neither is asked again.
const RETRY: Duration = Duration::from_secs(30);

impl Upstream {
    /// The guard for a request: the standing answer (a fresh probe is started in the
    /// background when it is due, the last answer standing meanwhile); before the first
    /// answer, a wait for it.
    pub async fn guard(self: &Arc<Self>) -> Guard {
        let changed = self.guard_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (guard, answered) = self.guard_now();
        if answered {
            return guard;
        }
        let wait = self.settings.timeout + Duration::from_secs(1);
        if tokio::time::timeout(wait, changed).await.is_err() {
            return Guard::Unverified("no answer to the probe in time".into(), Cause::Slow);
        }
        self.guard_now().0
    }

    /// The last answer, if there was one: nothing is asked (for a log line).
    pub fn guard_seen(&self) -> Option<Guard> {
        let s = self.guard.lock().ok()?;
        s.at.map(|_| s.guard.clone())
    }

    /// The last answer without waiting (`Unverified` before the first), and whether there
    /// was one; starts a probe when one is due and none is under way.
    pub fn guard_now(self: &Arc<Self>) -> (Guard, bool) {
        let Ok(mut s) = self.guard.lock() else {
            return (
                Guard::Unverified("the guard's lock is poisoned".into(), Cause::Other),
                true,
            );
        };
        let stands = match s.guard {
            Guard::Refuses | Guard::Open(_) => STANDS,
            Guard::Unverified(..) => RETRY,
        };
        let due = s.at.map_or(true, |t| t.elapsed() >= stands);
        if due && !s.probing {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                s.probing = true;
                let me = self.clone();
                rt.spawn(async move { me.reprobe().await });
            }
        }
        (s.guard.clone(), s.at.is_some())
    }

    async fn reprobe(&self) {
        let new = self.probe().await;
        let old = match self.guard.lock() {
            Ok(mut s) => {
                s.at = Some(Instant::now());
                s.probing = false;
                std::mem::replace(&mut s.guard, new.clone())
            }
            Err(_) => return,
        };
        if std::mem::discriminant(&old) != std::mem::discriminant(&new) {
            let lane = &self.lane;
            let upstream = &self.settings.upstream;
            match &new {
                Guard::Refuses => {
                    tracing::info!(%lane, %upstream, "the lane's bazel cache refuses writes without credentials: jobs use it")
                }
                Guard::Open(why) => {
                    tracing::error!(%lane, %upstream, why, "the lane's bazel cache took a write without credentials: anything that reaches it can write it (a pull request's job too, past its endpoint), so what it serves may be poisoned; no job reads or writes it until it refuses such writes: put PUT behind authentication (docs/configuration.md)")
                }
                Guard::Unverified(why, _) => {
                    tracing::warn!(%lane, %upstream, why, "the lane's bazel cache did not refuse a write without credentials; no job uses it until it does (asked again every 30 s)")
                }
            }
        }
        self.guard_changed.notify_waiters();
    }

    /// One anonymous `PUT` under `/cas/` and one under `/ac/`, at once.
    async fn probe(&self) -> Guard {
        let body = format!(
            "flywheel-agent: a write without credentials, which the cache should refuse {}\n",
            super::token()
        );
        let cas = hex(&Sha256::digest(body.as_bytes()));
        let ac = hex(&Sha256::digest(super::token().as_bytes()));
        let (a, b) = futures_util::future::join(
            self.probe_one("cas", &cas, body),
            self.probe_one("ac", &ac, String::new()),
        )
        .await;
        match (a, b) {
            (g @ Guard::Open(_), _) | (_, g @ Guard::Open(_)) => g,
            (g @ Guard::Unverified(..), _) | (_, g @ Guard::Unverified(..)) => g,
            _ => Guard::Refuses,
        }
    }

    async fn probe_one(&self, kind: &str, hash: &str, body: String) -> Guard {
        let len = body.len() as u64;
        let body = super::proxy::full(body.into());
        // The length is said even when empty: without it nginx answers an empty PUT 500.
        let sent = self.http.send(
            hyper::Method::PUT,
            (kind, hash),
            super::client::As::Anonymous,
            Some(len),
            body,
            self.settings.timeout,
        );
        match sent.await {
            Ok(r) => match r.status().as_u16() {
                401 | 403 | 405 => Guard::Refuses,
                200..=299 => Guard::Open(format!(
                    "it answered {} to an anonymous PUT /{kind}/{hash}",
                    r.status()
                )),
                s => Guard::Unverified(
                    format!(
                        "it answered {} to an anonymous PUT /{kind}/…, not 401, 403 or 405",
                        r.status()
                    ),
                    if s >= 500 {
                        Cause::ServerError
                    } else {
                        Cause::Other
                    },
                ),
            },
            Err(super::client::SendError::Down(e)) => Guard::Unverified(
                format!("an anonymous PUT /{kind}/… failed: {e}"),
                Cause::Down,
            ),
            Err(super::client::SendError::Slow(e)) => Guard::Unverified(
                format!("an anonymous PUT /{kind}/… got no answer in time: {e}"),
                Cause::Slow,
            ),
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
