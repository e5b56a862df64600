//! The job's report as far as it got, for the job-completed answer.

use std::time::Duration;

use tracing::warn;

use super::answers::RunnerHooks;

/// The job's summary as far as it got: memory so far, the builds of its daemon, the verdicts.
/// Its store, record and build logs are read on a blocking thread.
pub(super) async fn job_report(h: &RunnerHooks) -> crate::summary::Report {
    let facts = h.probe.facts();
    let stats = h.probe.stats();
    let (peak, kills) = (stats.peak_bytes, stats.oom_kills);
    let read =
        crate::store::job_builds(facts.store(), facts.started_unix, facts.started_unix as u64)
            .await
            .unwrap_or_else(|e| {
                warn!(runner = %h.runner_name, error = %e, "cannot read what the job built");
                crate::store::JobBuilds::default()
            });
    let (mut builds, paths) = (read.builds, read.paths);
    let build_memory = facts.build_memory();
    crate::summary::attach_memory(&mut builds, &build_memory, facts.started_unix);
    let mut samples = facts.samples;
    if let (Some(s), Some(p)) = (samples.as_mut(), peak) {
        s.close(p);
    }
    let oom = (kills > 0).then(|| {
        crate::verdict::oom_verdict(&crate::verdict::OomFacts {
            lane: &h.lane.name,
            envelope_bytes: h.lane.memory_bytes,
            stats: crate::cgroup::Stats {
                oom_kills: kills,
                peak_bytes: peak,
                pids_max_hits: 0,
            },
            killed: h.probe.killed(),
            bigger_lane: h.bigger_lane.as_ref().map(|(n, b)| (n.as_str(), *b)),
            building: builds
                .iter()
                .filter(|b| b.failed)
                .map(|b| b.name.clone())
                .collect(),
            parallel: h.lane.nix.then(|| {
                (
                    crate::hints::parallelism(&h.lane, h.lane.memory_bytes, h.host_cpus).max_jobs,
                    h.lane.memory_per_build_bytes,
                )
            }),
            ran_at_once: crate::summary::most_at_once(&builds),
            build_memory: build_memory
                .iter()
                .map(|b| (b.name.clone(), b.bytes))
                .collect(),
        })
    });
    let pids_hits = stats.pids_max_hits;
    let notes = h.probe.notes();
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
        - facts.started_unix;
    crate::summary::Report {
        lane: h.lane.name.clone(),
        envelope_bytes: h.lane.memory_bytes,
        peak_bytes: peak,
        samples,
        builds,
        bootstrap: notes.iter().find(|n| n.starts_with("nix ")).cloned(),
        store: notes
            .iter()
            .find_map(|n| n.strip_prefix("store: "))
            .map(str::to_owned),
        paths,
        oom,
        pids: (pids_hits > 0)
            .then(|| crate::verdict::pids_note(&h.lane.name, h.lane.pids_max, pids_hits)),
        published: None,
        elapsed: Duration::from_secs_f64(elapsed.max(0.0)),
        exit_code: None,
    }
}

pub(super) fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}
