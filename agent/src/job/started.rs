//! The job-started answer: the trust decision from GitHub's answer (never the job's claims
//! alone), the job's store opened on it, and the least credential the decision allows — a push
//! token only to a trusted job (into a job-private attic client config the hook writes with
//! mode 0600), a pull-only token to untrusted jobs only when the cache is private (into the
//! job's nix-daemon's root-only netrc), nothing otherwise.

use std::path::Path;
use std::time::Duration;

use flywheel_jit_config::Secret;
use tracing::{info, warn};

use super::answers::RunnerHooks;
use super::credential::AtticCredential;
use crate::attic::{self, TokenRequest};
use crate::hooks::HookResponse;
use crate::size::Bytes;
use crate::trust::{self, Claims, Decision, Policy};

/// The job-started answer, and the publishing grant when trust allowed it.
pub(super) async fn job_started(h: &RunnerHooks, claims: Claims) -> (HookResponse, Option<String>) {
    let lane = &h.lane;
    let mut lines = vec![format!(
        "flywheel: lane {}, memory envelope {}",
        lane.name,
        Bytes(lane.memory_bytes)
    )];
    for n in h.probe.notes() {
        lines.push(format!("flywheel: {n}"));
    }
    let cache_url = crate::hints::attic_cache_url(lane);
    lines.push(match &cache_url {
        Some(u) => format!("flywheel: cache {u}"),
        None => "flywheel: cache: none configured for this lane".into(),
    });
    let policy = Policy {
        repositories: h.attic.publish_repositories.clone(),
        trusted_events: h.attic.trusted_events.clone(),
    };
    let facts = match &h.github {
        None => Err("this agent has no [github] to ask".to_owned()),
        Some(_) if claims.run_id == 0 => Err("the job has no GITHUB_RUN_ID".to_owned()),
        Some(g) => match tokio::time::timeout(
            Duration::from_secs(30),
            g.run_facts(&claims.repository, claims.run_id),
        )
        .await
        {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 30 s".to_owned()),
        },
    };
    let decision = trust::decide(&policy, &claims, facts.as_ref().map_err(String::as_str));
    // A repository that publishes, on an event that publishes, on its default branch (as far as
    // GitHub said), expected to publish: a denial is worth a warning on the run's page.
    let expected = policy
        .repositories
        .iter()
        .any(|r| r.eq_ignore_ascii_case(&claims.repository))
        && policy.trusted_events.contains(&claims.event_name)
        && facts.as_ref().map_or(true, |f| {
            claims.git_ref == format!("refs/heads/{}", f.default_branch)
        });
    if let (Decision::ReadOnly { .. }, true) = (&decision, expected) {
        lines.push(crate::summary::annotation(
            "warning",
            &format!("Not published to the cache of lane {}", lane.name),
            &decision.line(),
        ));
    }
    info!(runner = %h.runner_name, repository = %claims.repository, run = claims.run_id, decision = %decision.line(), "trust decided");
    // One decision for every layer: only a job trusted to publish to Attic writes Bazel's cache
    // or the shared warm store.
    let trusted = matches!(decision, Decision::Push { .. });
    if let Some(b) = &h.bazel {
        if trusted {
            b.allow_writes();
        }
        lines.push(b.started_line());
    }
    // The job's store and daemon, now that its trust is known: the shared warm store for a job
    // trusted to publish, a throwaway layer for any other. Before this the job saw no store.
    match h.probe.open_store(trusted).await {
        None => {}
        Some(Ok(line)) => lines.push(format!("flywheel: {line}")),
        Some(Err(e)) => {
            warn!(runner = %h.runner_name, error = %e, "the job's store could not be opened; the job fails");
            lines.push(crate::summary::annotation(
                "error",
                &format!("No Nix store for this job on lane {}", lane.name),
                &e.to_string(),
            ));
            let resp = HookResponse {
                ok: false,
                fail: true,
                lines,
                ..HookResponse::default()
            };
            return (resp, None);
        }
    }
    let mut resp = HookResponse {
        ok: true,
        ..HookResponse::default()
    };
    let (Some(server), Some(cache)) = (
        lane.hints.attic_server.clone(),
        lane.hints.attic_cache.clone(),
    ) else {
        lines.push(format!(
            "flywheel: {} (no cache to publish to)",
            decision.line()
        ));
        resp.lines = lines;
        return (resp, None);
    };
    let sub = format!(
        "flywheel:{}:run/{}/{}:runner/{}",
        claims.repository, claims.run_id, claims.run_attempt, h.runner_name
    );
    let mut grant = None;
    let token = |push: bool| -> Result<Option<Secret<String>>, String> {
        match &h.credential {
            AtticCredential::Sign(k) => attic::mint(
                k,
                &TokenRequest {
                    cache: cache.clone(),
                    sub: sub.clone(),
                    validity: h.attic.token_validity,
                    push,
                },
            )
            .map(Some)
            .map_err(|e| e.to_string()),
            AtticCredential::Static(t) if push => Ok(Some(t.clone())),
            _ => Ok(None),
        }
    };
    match &decision {
        Decision::Push { .. } => {
            // The daemon reads a private cache with a pull token, as every job's does.
            if !h.attic.public {
                if let Ok(Some(t)) = token(false) {
                    h.telemetry.attic_token_minted("pull");
                    write_netrc(&h.netrc, &attic::netrc(&server, &t));
                }
            }
            let mut how = Vec::new();
            if h.attic.publish && !matches!(h.credential, AtticCredential::None) {
                grant = Some(sub.clone());
                how.push("the agent publishes what this job builds when it ends".to_owned());
            }
            if h.attic.push_token_to_jobs {
                match token(true) {
                    Ok(Some(t)) => {
                        h.telemetry.attic_token_minted("push");
                        let root = h
                            .probe
                            .job_name()
                            .map(|j| lane.work_root.join(j))
                            .unwrap_or_default();
                        let xdg = root.join(".flywheel-xdg");
                        resp.attic_config = Some(attic::client_config(&server, &t));
                        resp.xdg_config_home = Some(xdg.display().to_string());
                        how.push(format!(
                            "a push token valid {} is in $XDG_CONFIG_HOME/attic/config.toml",
                            humanize(h.attic.token_validity)
                        ));
                    }
                    Ok(None) => {}
                    Err(e) => how.push(format!("no push token for the job: {e}")),
                }
            }
            lines.push(match how.as_slice() {
                [] => format!(
                    "flywheel: {} — but this agent holds no push credential or publishing is off",
                    decision.line()
                ),
                _ => format!("flywheel: {}; {}", decision.line(), how.join("; ")),
            });
        }
        Decision::ReadOnly { .. } => {
            if !h.attic.public {
                if let Ok(Some(t)) = token(false) {
                    h.telemetry.attic_token_minted("pull");
                    write_netrc(&h.netrc, &attic::netrc(&server, &t));
                }
            }
            lines.push(format!("flywheel: {}", decision.line()));
        }
    }
    resp.lines = lines;
    (resp, grant)
}

fn write_netrc(path: &Path, content: &Secret<String>) {
    use std::io::Write;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode_0600()
        .open(path);
    match f {
        Ok(mut f) => {
            if let Err(e) = f.write_all(content.expose().as_bytes()) {
                warn!(error = %e, "cannot write the job's netrc");
            }
        }
        Err(e) => warn!(error = %e, path = %path.display(), "cannot write the job's netrc"),
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

/// A token lifetime as the job's log shows it: `1h`, `30m`, `45s`.
fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}
