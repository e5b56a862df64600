//! The job's report as far as it got, for the job-completed answer.

use super::answers::RunnerHooks;

/// The job's report as far as it got (see [`crate::report::so_far`]).
pub(super) async fn job_report(h: &RunnerHooks) -> crate::report::JobReport {
    let job = crate::report::Job {
        lane: &h.lane,
        envelope_bytes: h.lane.memory_bytes,
        host_cpus: h.host_cpus,
        nix: h.lane.nix,
        bigger_lane: h.bigger_lane.clone(),
    };
    crate::report::so_far(&job, &h.probe).await
}
