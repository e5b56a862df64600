//! A running job as others see it: its cgroup (every read through the `JobCgroup` trait),
//! its setup (typed: `report::Setup`), the facts for its report and the OOM kills in the kernel log.

use std::path::PathBuf;
use std::time::Duration;

use super::{now_unix_f64, EnvelopeError, NixSetupError};
use crate::cgroup::{JobCgroup, Stats, JOBS_DIR};
use crate::verdict::{Killed, KmsgWatch};

/// Why a runner job's store could not be opened at job-started.
#[derive(Debug, thiserror::Error)]
pub enum StoreOpenError {
    #[error("the job is gone")]
    JobGone,
    #[error("the job's store could not be opened: {0}")]
    Open(EnvelopeError),
}

/// A running job's cgroup (every read goes through the [`JobCgroup`] trait), and how many
/// processes the job has when idle (the command, plus its nix-daemon).
#[derive(Debug, Clone, Default)]
pub struct JobProbe(
    std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<dyn JobCgroup>>>>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::Mutex<crate::report::Setup>>,
    std::sync::Arc<std::sync::Mutex<JobFacts>>,
    std::sync::Arc<std::sync::Mutex<Kills>>,
    std::sync::Arc<tokio::sync::Mutex<StoreSlot>>,
    std::sync::Arc<Launched>,
);

/// Whether the job's first process was started, and who waits for it: the envelope says so
/// when its launch returns a running process (the same on cgroup v1 and v2; nothing polls
/// the cgroup for it).
#[derive(Debug, Default)]
pub struct Launched {
    done: std::sync::atomic::AtomicBool,
    wake: tokio::sync::Notify,
}

/// A runner job's store waiting for its job-started hook, and whether the job's end closed it:
/// once closed (under the lock), nothing opens a store or starts a daemon for the job.
#[derive(Debug, Default)]
pub(super) struct StoreSlot {
    store: Option<super::deferred::DeferredStore>,
    closed: bool,
}

/// The kernel log watch of a running job and the OOM kills read from it so far (the hook reads
/// it while the job runs, teardown after: both see every kill).
#[derive(Debug, Default)]
pub struct Kills {
    watch: Option<KmsgWatch>,
    /// The job cgroup's path suffix in the kernel's records.
    suffix: String,
    seen: Vec<Killed>,
}

/// What the agent records of a running job for its summary.
#[derive(Debug, Clone, Default)]
pub struct JobFacts {
    /// Unix seconds (fractional) when the job's cgroup was made.
    pub started_unix: f64,
    /// Memory over time, sampled from the job's cgroup.
    pub samples: Option<crate::timeline::Samples>,
    /// The job's Nix store as the agent sees it (a slot's, or the lane's).
    pub nix_root: Option<PathBuf>,
    /// Where the job's daemon records the out paths it built.
    pub built: Option<PathBuf>,
    /// The job's daemon's own build log directory.
    pub build_logs: Option<PathBuf>,
    /// The memory of each of its Nix builds (see [`crate::buildmem`]), updated by the
    /// sampler.
    pub build_memory: std::sync::Arc<std::sync::Mutex<crate::buildmem::BuildMemory>>,
}

impl JobFacts {
    /// Where the store's reads of this job look (see [`crate::store::job_builds`]).
    pub fn store(&self) -> crate::store::JobStore {
        crate::store::JobStore {
            nix_root: self.nix_root.clone(),
            build_logs: self.build_logs.clone(),
            record: self.built.clone(),
        }
    }

    /// Each Nix build's largest memory so far, the largest first.
    pub fn build_memory(&self) -> Vec<crate::buildmem::BuildUse> {
        self.build_memory
            .lock()
            .map(|m| m.peaks())
            .unwrap_or_default()
    }
}

/// How often a job's memory is sampled at first (merged to coarser steps for long jobs).
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

impl JobProbe {
    /// What the probe recorded of its job (its setup, memory samples, builds' memory) with
    /// `builds` read from its store, for its report; the rest is the caller's.
    pub fn seen(
        &self,
        facts: JobFacts,
        builds: Vec<crate::timeline::Build>,
    ) -> crate::report::Seen {
        crate::report::Seen {
            setup: self.setup(),
            build_memory: facts.build_memory(),
            samples: facts.samples,
            builds,
            started_unix: facts.started_unix,
            ..crate::report::Seen::default()
        }
    }

    /// The facts recorded so far.
    pub fn facts(&self) -> JobFacts {
        self.3.lock().map(|f| f.clone()).unwrap_or_default()
    }

    pub(super) fn with_facts(&self, f: impl FnOnce(&mut JobFacts)) {
        if let Ok(mut g) = self.3.lock() {
            f(&mut g);
        }
    }

    /// Sample the job's memory every [`SAMPLE_INTERVAL`] until the task is aborted: the
    /// cgroup's use and high-water mark, and the memory of each of its Nix builds.
    pub(super) fn sample(&self, bg: &crate::tasks::Background) -> tokio::task::JoinHandle<()> {
        let probe = self.clone();
        bg.spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let builds = probe.facts().build_memory;
            // The build processes' `statm` files, closed when this task ends.
            let mut open = crate::buildmem::Handles::default();
            loop {
                tick.tick().await;
                let Some(cg) = probe.cgroup() else { continue };
                if let (Ok(pids), Ok(mut b)) = (cg.pids(), builds.lock()) {
                    b.sample(&pids, now_unix_f64(), &mut open);
                }
                let (now, high) = (cg.memory_current(), cg.memory_peak());
                if let Some(v) = now {
                    probe.with_facts(|f| {
                        f.samples
                            .get_or_insert_with(|| crate::timeline::Samples::new(SAMPLE_INTERVAL))
                            .record(v, high);
                    });
                }
            }
        })
    }

    pub(super) fn set(&self, cg: Option<std::sync::Arc<dyn JobCgroup>>) {
        if let Ok(mut g) = self.0.lock() {
            *g = cg;
        }
    }
    pub(super) fn cgroup(&self) -> Option<std::sync::Arc<dyn JobCgroup>> {
        self.0.lock().ok()?.clone()
    }
    pub(super) fn with_setup(&self, f: impl FnOnce(&mut crate::report::Setup)) {
        if let Ok(mut g) = self.2.lock() {
            f(&mut g);
        }
    }
    /// The job's setup (its store, the Nix bootstrap warm or cold), as far as it got.
    pub fn setup(&self) -> crate::report::Setup {
        self.2.lock().map(|g| g.clone()).unwrap_or_default()
    }
    /// The job's setup lines, once set up.
    pub fn notes(&self) -> Vec<String> {
        self.setup().lines()
    }
    /// The job's counters so far (OOM kills, peak, forks refused), read once; zeros when it is
    /// not running.
    pub fn stats(&self) -> Stats {
        self.cgroup()
            .and_then(|cg| cg.stats().ok())
            .unwrap_or_default()
    }
    pub(super) fn watch_kmsg(&self, w: KmsgWatch, job: &str) {
        if let Ok(mut k) = self.4.lock() {
            *k = Kills {
                watch: Some(w),
                suffix: format!("/{JOBS_DIR}/{job}"),
                seen: Vec::new(),
            };
        }
    }

    /// The processes the OOM killer killed in the job so far (from the kernel log).
    pub fn killed(&self) -> Vec<Killed> {
        let Ok(mut k) = self.4.lock() else {
            return Vec::new();
        };
        let Kills {
            watch,
            suffix,
            seen,
        } = &mut *k;
        if let Some(w) = watch.as_mut() {
            seen.extend(w.killed(suffix));
        }
        seen.clone()
    }

    /// Hold a runner job's store until its job-started hook opens it. Fails when the job's end
    /// already closed it, or when a store is already held.
    pub(super) async fn arm_store(
        &self,
        store: super::deferred::DeferredStore,
    ) -> Result<(), EnvelopeError> {
        let mut g = self.5.lock().await;
        if g.closed || g.store.is_some() {
            return Err(NixSetupError::StoreNotArmed.into());
        }
        g.store = Some(store);
        Ok(())
    }

    /// Open the job's store at job-started (once): the shared warm store when `trusted`, a
    /// throwaway layer otherwise, with the job's nix-daemon on it. `None` when the job has no
    /// store waiting (no Nix, or already opened or closed); `Some(Ok(line))` for its setup
    /// block. The lock is held while it opens: the job's end waits for it.
    pub async fn open_store(&self, trusted: bool) -> Option<Result<String, StoreOpenError>> {
        let mut g = self.5.lock().await;
        if g.closed {
            return None;
        }
        let store = g.store.take()?;
        let Some(cg) = self.cgroup() else {
            return Some(Err(StoreOpenError::JobGone));
        };
        Some(match store.open(cg.as_ref(), trusted).await {
            Ok(opened) => {
                self.with_facts(|f| f.nix_root = Some(opened.root));
                self.set_idle(2);
                Ok(opened.line)
            }
            Err(e) => Err(StoreOpenError::Open(e)),
        })
    }

    /// After the job's command: a store not opened by now never will be (waits for an opening
    /// under way, whose daemon teardown then kills).
    pub(super) async fn close_store(&self) {
        let mut g = self.5.lock().await;
        g.closed = true;
        g.store.take();
    }

    /// [`JobProbe::close_store`] from a thread outside the runtime (a job guard's late
    /// teardown), before it kills the job and removes its view and layer.
    pub(super) fn close_store_blocking(&self) {
        let mut g = self.5.blocking_lock();
        g.closed = true;
        g.store.take();
    }

    /// The job's first process was started.
    pub(super) fn launched(&self) {
        self.6
            .done
            .store(true, std::sync::atomic::Ordering::Release);
        self.6.wake.notify_waiters();
    }

    /// Until the job's first process was started (at once if it was).
    pub async fn wait_launched(&self) {
        loop {
            let woken = self.6.wake.notified();
            if self.6.done.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }

    pub(super) fn set_idle(&self, n: usize) {
        self.1.store(n, std::sync::atomic::Ordering::Relaxed);
    }
    /// Processes in the job now (0 when it is not running).
    pub fn processes(&self) -> usize {
        self.cgroup()
            .and_then(|cg| cg.pids().ok())
            .map_or(0, |p| p.len())
    }
    /// Whether process `pid` is in the running job's cgroup.
    pub fn contains(&self, pid: i32) -> bool {
        self.cgroup().is_some_and(|cg| cg.contains(pid))
    }

    /// The running job's name (its cgroup's name).
    pub fn job_name(&self) -> Option<String> {
        Some(self.cgroup()?.name().to_owned())
    }

    /// The running job's memory use now.
    pub fn memory_current(&self) -> Option<u64> {
        self.cgroup()?.memory_current()
    }

    /// A runner is busy when its listener has company beyond its nix-daemon: a worker and the
    /// job's processes.
    pub fn busy(&self) -> bool {
        self.processes() > self.1.load(std::sync::atomic::Ordering::Relaxed).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait for the job's first process ends when the envelope says it started, and at once
    /// for a job that already did: nothing polls for it.
    #[tokio::test]
    async fn the_launch_is_awaited_not_polled() {
        let probe = JobProbe::default();
        let waiting = {
            let p = probe.clone();
            tokio::spawn(async move { p.wait_launched().await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the wait ended before the launch");
        probe.launched();
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the wait ends with the launch")
            .expect("joined");
        tokio::time::timeout(Duration::from_secs(5), probe.wait_launched())
            .await
            .expect("a launched job is not waited for");
    }
}
