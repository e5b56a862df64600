//! What happened during a job, over time: its memory (a bounded series of points, each the
//! most of its interval) and the Nix builds its daemon ran (spans since the job started, with
//! each build's memory). Data only: the sampler and the store fill it, the report holds it,
//! the summary draws it.

use std::time::Duration;

/// At most this many memory samples are kept; more are merged pairwise (the larger wins).
pub const MAX_SAMPLES: usize = 240;
/// The job's memory over time: one value per `interval`, each the largest seen in it. A
/// point is the largest sample of its interval and, when the cgroup's high-water mark rose
/// during the interval, that mark: every new peak is drawn in the interval where it was
/// reached (between two samples, as an OOM often is), never appended as a point of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Samples {
    /// How long one point covers: the sampling tick at first, doubled with every merge.
    pub interval: Duration,
    pub bytes: Vec<u64>,
    /// How often a sample is taken.
    tick: Duration,
    /// Samples not yet making a whole point: (largest, count).
    pending: (u64, u32),
    /// The cgroup's high-water mark at the last sample.
    high: u64,
}

impl Samples {
    pub fn new(tick: Duration) -> Samples {
        Samples {
            interval: tick,
            bytes: Vec::new(),
            tick,
            pending: (0, 0),
            high: 0,
        }
    }

    /// A sample: the job's memory now and the cgroup's high-water mark so far (v2
    /// `memory.peak`, v1 `memory.max_usage_in_bytes`; None where the kernel has none). A mark
    /// above the last one was reached since the last sample, so this sample's interval holds
    /// it.
    pub fn record(&mut self, now: u64, high: Option<u64>) {
        let v = match high {
            Some(h) if h > self.high => {
                self.high = h;
                now.max(h)
            }
            _ => now,
        };
        self.push(v);
    }

    /// Add a sample (one per tick); past [`MAX_SAMPLES`] points, merge neighbours and double
    /// what a point covers, so a job of any length is described in a bounded number of points.
    pub fn push(&mut self, v: u64) {
        self.pending = (self.pending.0.max(v), self.pending.1 + 1);
        let per_point = (self.interval.as_nanos() / self.tick.as_nanos().max(1)).max(1);
        if u128::from(self.pending.1) < per_point {
            return;
        }
        self.bytes.push(self.pending.0);
        self.pending = (0, 0);
        if self.bytes.len() > MAX_SAMPLES {
            self.bytes = self
                .bytes
                .chunks(2)
                .map(|c| c.iter().copied().max().unwrap_or(0))
                .collect();
            self.interval = self.interval.saturating_mul(2);
        }
    }

    /// End the series at the job's end with the cgroup's peak: a peak above the last sample's
    /// high-water mark was reached after it, in the last (partial) interval, which then holds
    /// it.
    pub fn close(&mut self, peak: u64) {
        if peak > self.high {
            self.high = peak;
            self.pending = (self.pending.0.max(peak), self.pending.1.max(1));
        }
        if self.pending.1 > 0 {
            self.bytes.push(self.pending.0);
            self.pending = (0, 0);
        }
    }

    /// How often a sample is taken.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// The points, with a last partial one for samples not yet making a whole point.
    pub fn points(&self) -> Vec<u64> {
        let mut v = self.bytes.clone();
        if self.pending.1 > 0 {
            v.push(self.pending.0);
        }
        v
    }
}

/// One derivation the job's daemon built (or was building).
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    /// The derivation's name (`hello-2.12`), without hash and `.drv`.
    pub name: String,
    /// Seconds since the job started.
    pub start: f64,
    pub end: f64,
    /// No output was registered: it failed, or was killed.
    pub failed: bool,
    /// The most memory its processes used at one sample (see [`crate::buildmem`]).
    pub memory_bytes: Option<u64>,
}

/// Each build's largest memory from the job's samples (by name, as the builder's environment
/// names it); a build that did not finish ran at least until a sample last saw it (its log
/// may have stopped earlier). `started_unix` is the job's start.
pub fn attach_memory(builds: &mut [Build], seen: &[crate::buildmem::BuildUse], started_unix: f64) {
    let by_name: std::collections::HashMap<&str, &crate::buildmem::BuildUse> =
        seen.iter().map(|u| (u.name.as_str(), u)).collect();
    for b in builds {
        let Some(u) = by_name.get(b.name.as_str()) else {
            continue;
        };
        b.memory_bytes = Some(u.bytes);
        if b.failed {
            b.end = b.end.max(u.last_seen - started_unix);
        }
    }
}

/// The most builds that ran at the same time (0 without builds).
pub fn most_at_once(builds: &[Build]) -> u32 {
    // Ends before starts at the same instant: back-to-back builds did not overlap.
    let mut edges: Vec<(f64, i32)> = builds
        .iter()
        .flat_map(|b| [(b.start, 1), (b.end.max(b.start), -1)])
        .collect();
    edges.sort_by(|a, b| {
        (a.0, a.1)
            .partial_cmp(&(b.0, b.1))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    u32::try_from(most).unwrap_or(0)
}
