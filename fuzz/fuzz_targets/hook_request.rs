//! A hook request as a job's hook sends it (one JSON line), through the trust decision with
//! and without GitHub's facts.
#![no_main]

use flywheel_agent::hooks::HookRequest;
use flywheel_agent::trust::{decide, Policy};
use flywheel_jit_config::RunFacts;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<HookRequest>(data) else {
        return;
    };
    let claims = req.claims("fuzz");
    let policy = Policy {
        repositories: vec!["tinyland/flywheel".into()],
        trusted_events: vec!["push".into()],
    };
    let facts = RunFacts {
        repository: req.repository.clone(),
        repository_id: 1,
        default_branch: "main".into(),
        event: req.event_name.clone(),
        head_branch: req.git_ref.strip_prefix("refs/heads/").map(str::to_owned),
        head_sha: Some(req.run_attempt.clone()),
        head_on_default_branch: Some(req.op.len() % 2 == 0),
        head_repository_id: Some(1),
        head_repository_fork: req.op.contains("fork"),
        run_attempt: req.run_attempt.parse().ok(),
        jobs: vec![(1, "in_progress".into(), Some("fuzz".into()))],
    };
    let _ = decide(&policy, &claims, Ok(&facts)).line();
    let _ = decide(&policy, &claims, Err("github is down")).line();
});
