//! Accepting connections without spinning: after a failed `accept` (out of descriptors or
//! memory: `EMFILE`, `ENFILE`, `ENOMEM`, `ENOBUFS`) a listener waits 10 ms, doubling up to 1 s,
//! before it tries again, so a flood of connections cannot turn its loop into a busy one on
//! the agent's runtime. An accepted connection resets the wait.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(10);
const LONGEST: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Backoff {
    wait: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { wait: FIRST }
    }
}

impl Backoff {
    /// A connection was accepted: the next failure waits the shortest time again.
    pub fn accepted(&mut self) {
        self.wait = FIRST;
    }

    /// What the next failure waits.
    pub fn next_wait(&self) -> Duration {
        self.wait
    }

    /// An `accept` failed: wait, and wait twice as long after the next failure.
    pub async fn failed(&mut self) {
        tokio::time::sleep(self.step()).await;
    }

    fn step(&mut self) -> Duration {
        let now = self.wait;
        self.wait = (self.wait * 2).min(LONGEST);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_a_second_and_reset_on_success() {
        let mut b = Backoff::default();
        let waits: Vec<u128> = (0..9).map(|_| b.step().as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.accepted();
        assert_eq!(b.next_wait(), FIRST);
    }
}
