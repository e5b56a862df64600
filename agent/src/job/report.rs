//! The job's report as far as it got, for the job-completed answer.

use std::time::Duration;

use tracing::warn;

use super::answers::RunnerHooks;
use crate::envelope::JobProbe;
use crate::report::{compute, Job, JobReport, Seen};

/// The job's report as far as it got (see [`so_far`]).
pub(super) async fn job_report(h: &RunnerHooks) -> JobReport {
    let job = Job {
        lane: &h.lane,
        envelope_bytes: h.lane.memory_bytes,
        host_cpus: h.host_cpus,
        nix: h.lane.nix,
        bigger_lane: h.bigger_lane.clone(),
    };
    so_far(&job, &h.probe).await
}

/// A running job's report as far as it got (a runner's completed hook): memory so far, the
/// builds of its daemon, the verdicts. Its store, record and build logs are read on a blocking
/// thread.
async fn so_far(job: &Job<'_>, probe: &JobProbe) -> JobReport {
    let facts = probe.facts();
    let stats = probe.stats();
    let read =
        crate::store::job_builds(facts.store(), facts.started_unix, facts.started_unix as u64)
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "cannot read what the job built");
                crate::store::JobBuilds::default()
            });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let killed = if stats.oom_kills > 0 {
        probe.killed()
    } else {
        Vec::new()
    };
    let elapsed = Duration::from_secs_f64((now - facts.started_unix).max(0.0));
    compute(
        job,
        Seen {
            stats,
            killed,
            paths: read.paths,
            elapsed,
            ended: None,
            ..probe.seen(facts, read.builds)
        },
    )
}
