//! The job-completed answer: the job's report, what a trusted job built published, the
//! summary and the log lines rendered from the report.

use std::time::Duration;

use tracing::{info, warn};

use super::answers::RunnerHooks;
use super::report::job_report;
use crate::hooks::HookResponse;
use crate::publish::{Outcome, Unpublished};

pub(super) async fn job_completed(h: &RunnerHooks, grant: Option<String>) -> HookResponse {
    let mut report = job_report(h).await;
    let published = match grant {
        Some(sub) => Some(publish(h, &sub, report.oom.is_some()).await),
        None => None,
    };
    report.published = published.clone();
    // The text is linear in the job's builds (as many as its daemon logged): rendered on a
    // blocking thread. The verdict and the annotations do not read what was published.
    let rendered = tokio::task::spawn_blocking(move || {
        let verdict = crate::summary::verdict(&report);
        let annotations = crate::summary::annotations(&report);
        (
            verdict,
            annotations,
            crate::summary::markdown(&report),
            report.oom_verdict(),
        )
    })
    .await;
    let Ok((verdict, annotations, mut summary, oom)) = rendered else {
        return HookResponse::refused("the job's summary could not be rendered");
    };
    let mut lines = vec![format!("flywheel: {verdict}")];
    // Annotations: on the run's page without opening the log.
    lines.extend(oom);
    lines.extend(annotations);
    if let Some(line) = published {
        lines.push(format!("flywheel: {line}"));
    }
    if let Some(b) = &h.bazel {
        let t = b.tally();
        lines.push(format!("flywheel: {}", crate::summary::bazel_line(&t)));
        summary.push_str(&crate::summary::bazel_section(&t));
    }
    HookResponse {
        ok: true,
        lines,
        summary: Some(summary),
        ..HookResponse::default()
    }
}

/// Publish what the job's daemon built; the line for its block. Never fails the job.
pub(super) async fn publish(h: &RunnerHooks, sub: &str, oom: bool) -> Outcome {
    let lane = &h.lane.name;
    let (Some(server), Some(cache)) = (&h.lane.hints.attic_server, &h.lane.hints.attic_cache)
    else {
        return Outcome::NotPublished(Unpublished::NoCache);
    };
    if oom && !h.attic.publish_after_oom {
        return Outcome::NotPublished(Unpublished::AfterOom);
    }
    let facts = h.probe.facts();
    let Some(root) = facts.nix_root else {
        return Outcome::NotPublished(Unpublished::NoStore);
    };
    let Some(auth) = h.credential.publish_auth() else {
        return Outcome::NotPublished(Unpublished::NoCredential);
    };
    // The record and the closure walk read files and the store's database: on a blocking
    // thread, through the store's facade.
    let selected = match crate::store::record(facts.built.clone()).await {
        Ok(built) => crate::publish::to_publish(&root, &built, &h.attic.upstream_keys).await,
        Err(e) => Err(e.into()),
    };
    let paths = match selected {
        Ok(p) => p,
        Err(e) => {
            h.telemetry.publish_failed(lane, e.reason());
            warn!(runner = %h.runner_name, error = %e, "cannot tell what the job built");
            return Outcome::NotPublished(Unpublished::Failed(e.to_string()));
        }
    };
    if paths.paths.is_empty() && paths.unusable.is_empty() {
        return Outcome::NotPublished(Unpublished::BuiltNothing);
    }
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => return Outcome::NotPublished(Unpublished::Failed(e.to_string())),
    };
    let p = crate::publish::Publisher {
        http,
        server: server.clone(),
        cache: cache.clone(),
        auth,
        sub: sub.to_owned(),
        limits: crate::publish::Limits::default(),
    };
    match p.publish(&paths, &root).await {
        Ok(done) => {
            h.telemetry.published(lane, done.uploaded, done.bytes);
            for _ in &done.failed {
                h.telemetry.publish_failed(lane, "path");
            }
            let outcome = Outcome::Published {
                done,
                server: server.clone(),
                cache: cache.clone(),
            };
            info!(runner = %h.runner_name, "{outcome}");
            outcome
        }
        Err(e) => {
            h.telemetry.publish_failed(lane, e.reason());
            warn!(runner = %h.runner_name, error = %e, "publishing failed; the job's result is unchanged");
            Outcome::NotPublished(Unpublished::Failed(e.to_string()))
        }
    }
}
