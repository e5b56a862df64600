//! When and how long to wait before asking GitHub again.
//!
//! GitHub's rules: over a limit it answers 403 or 429. With `retry-after`, wait that long;
//! else with `x-ratelimit-remaining: 0`, wait until `x-ratelimit-reset`; else (a secondary
//! limit) wait at least a minute and back off. 5xx and timeouts are retried with capped
//! exponential backoff and jitter. Every wait is bounded; there is never a busy loop.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Bounds on retrying.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// First backoff after a 5xx or a timeout.
    pub base: Duration,
    /// Largest backoff.
    pub cap: Duration,
    /// Least wait for a secondary rate limit that names no time (GitHub says a minute).
    pub secondary_min: Duration,
    /// The longest single wait the agent accepts; longer is an error.
    pub max_wait: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 6,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(60),
            secondary_min: Duration::from_secs(60),
            max_wait: Duration::from_secs(15 * 60),
            timeout: Duration::from_secs(30),
        }
    }
}

/// What a response asks of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Done,
    /// Wait this long, then retry; the reason is for the log.
    Retry(Duration, &'static str),
    /// Stop: the answer is final.
    Final,
}

/// Headers that matter for rate limiting, already parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub retry_after: Option<u64>,
    pub remaining: Option<u64>,
    pub reset: Option<u64>,
}

impl RetryPolicy {
    /// Capped exponential backoff with full jitter for attempt `n` (0-based).
    pub fn backoff(&self, n: u32) -> Duration {
        let exp = self.base.saturating_mul(1u32 << n.min(16));
        let capped = exp.min(self.cap);
        let ms = u64::try_from(capped.as_millis()).unwrap_or(u64::MAX);
        // Between half and the whole of the capped backoff.
        Duration::from_millis(ms / 2 + fastrand::u64(0..=ms / 2))
    }

    /// Decide from a status and its headers.
    pub fn judge(&self, status: u16, h: &RateHeaders, attempt: u32, body: &str) -> Verdict {
        match status {
            200..=299 => Verdict::Done,
            403 | 429 => {
                if let Some(s) = h.retry_after {
                    return Verdict::Retry(Duration::from_secs(s), "retry-after");
                }
                if h.remaining == Some(0) {
                    let now = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let wait = h.reset.map_or(60, |r| r.saturating_sub(now)) + 1;
                    return Verdict::Retry(
                        Duration::from_secs(wait),
                        "x-ratelimit-remaining: 0 (until x-ratelimit-reset)",
                    );
                }
                let secondary =
                    status == 429 || body.to_ascii_lowercase().contains("secondary rate limit");
                if secondary {
                    let wait = self.secondary_min.max(self.backoff(attempt));
                    return Verdict::Retry(wait, "secondary rate limit");
                }
                Verdict::Final
            }
            500..=599 => Verdict::Retry(self.backoff(attempt), "server error"),
            _ => Verdict::Final,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> RetryPolicy {
        RetryPolicy {
            secondary_min: Duration::from_secs(60),
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn retry_after_wins() {
        let h = RateHeaders {
            retry_after: Some(7),
            remaining: Some(0),
            reset: Some(0),
        };
        assert_eq!(
            p().judge(429, &h, 0, ""),
            Verdict::Retry(Duration::from_secs(7), "retry-after")
        );
        assert_eq!(
            p().judge(403, &h, 0, ""),
            Verdict::Retry(Duration::from_secs(7), "retry-after")
        );
    }

    #[test]
    fn exhausted_primary_limit_waits_for_reset() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let h = RateHeaders {
            retry_after: None,
            remaining: Some(0),
            reset: Some(now + 30),
        };
        match p().judge(403, &h, 0, "API rate limit exceeded") {
            Verdict::Retry(d, _) => assert!((30..=32).contains(&d.as_secs()), "{d:?}"),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn secondary_limit_waits_at_least_a_minute() {
        let h = RateHeaders::default();
        match p().judge(403, &h, 0, "You have exceeded a secondary rate limit") {
            Verdict::Retry(d, why) => {
                assert!(d >= Duration::from_secs(60));
                assert_eq!(why, "secondary rate limit");
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn plain_forbidden_and_client_errors_are_final() {
        let h = RateHeaders {
            retry_after: None,
            remaining: Some(10),
            reset: None,
        };
        assert_eq!(
            p().judge(403, &h, 0, "Resource not accessible by integration"),
            Verdict::Final
        );
        assert_eq!(p().judge(404, &h, 0, ""), Verdict::Final);
        assert_eq!(p().judge(422, &h, 0, ""), Verdict::Final);
        assert_eq!(p().judge(201, &h, 0, ""), Verdict::Done);
    }

    #[test]
    fn backoff_is_capped_and_jittered() {
        let pol = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
            ..p()
        };
        for n in 0..30 {
            let d = pol.backoff(n);
            assert!(d <= Duration::from_secs(2), "{n}: {d:?}");
        }
        assert!(pol.backoff(0) >= Duration::from_millis(50));
        assert!(matches!(
            pol.judge(502, &RateHeaders::default(), 3, ""),
            Verdict::Retry(_, "server error")
        ));
    }
}
