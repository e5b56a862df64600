//! May this job publish to the cache? Decided from GitHub's answer about the run and the
//! runner, never from what the job's environment claims: the environment only says which run
//! to ask about, and any disagreement between the two makes the job read-only. So does any
//! failure to ask (fail closed).

use flywheel_jit_config::RunFacts;

/// Who may publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `OWNER/REPO`s allowed to push (none by default).
    pub repositories: Vec<String>,
    /// Events that count as trusted on the default branch (default: `push`).
    pub trusted_events: Vec<String>,
}

/// What the job's environment says (the `GITHUB_*` variables the hook passes on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub repository: String,
    pub run_id: u64,
    pub run_attempt: u64,
    pub event_name: String,
    pub git_ref: String,
    /// The runner the agent registered (not a claim of the job: the agent knows it).
    pub runner_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Push { reason: String },
    ReadOnly { reason: String },
}

impl Decision {
    pub fn push(&self) -> bool {
        matches!(self, Decision::Push { .. })
    }
    /// The line the job log shows: `push: allowed (…)` or `push: denied (…)`.
    pub fn line(&self) -> String {
        match self {
            Decision::Push { reason } => format!("push: allowed ({reason})"),
            Decision::ReadOnly { reason } => format!("push: denied ({reason})"),
        }
    }
}

fn deny(reason: impl Into<String>) -> Decision {
    Decision::ReadOnly {
        reason: reason.into(),
    }
}

/// Events that are never trusted to publish, whatever the policy says.
const NEVER: [&str; 3] = ["pull_request", "pull_request_target", "merge_group"];

/// Decide. `facts` is GitHub's answer, or why there is none.
pub fn decide(policy: &Policy, c: &Claims, facts: Result<&RunFacts, &str>) -> Decision {
    let f = match facts {
        Ok(f) => f,
        Err(e) => {
            return deny(format!(
                "GitHub could not be asked about run {} of {}: {e}",
                c.run_id, c.repository
            ))
        }
    };
    if !f.repository.eq_ignore_ascii_case(&c.repository) {
        return deny(format!(
            "the job says repository {}, GitHub says run {} belongs to {}",
            c.repository, c.run_id, f.repository
        ));
    }
    let on_this_runner = f.jobs.iter().any(|(_, status, runner)| {
        status == "in_progress" && runner.as_deref() == Some(c.runner_name.as_str())
    });
    if !on_this_runner {
        return deny(format!(
            "no job of run {} is in progress on runner {}",
            c.run_id, c.runner_name
        ));
    }
    if let Some(a) = f.run_attempt {
        if a != c.run_attempt {
            return deny(format!(
                "the job says attempt {}, GitHub says the run is at attempt {a}",
                c.run_attempt
            ));
        }
    }
    if f.event != c.event_name {
        return deny(format!(
            "the job says event {}, GitHub says {}",
            c.event_name, f.event
        ));
    }
    let fork = f.head_repository_fork || f.head_repository_id.is_some_and(|h| h != f.repository_id);
    let from = if fork { " from a fork" } else { "" };
    if NEVER.contains(&f.event.as_str()) {
        return deny(format!("{}{from}", f.event));
    }
    if !policy.trusted_events.iter().any(|e| e == &f.event) {
        return deny(format!(
            "{}{from}: only {} may publish",
            f.event,
            policy.trusted_events.join(", ")
        ));
    }
    if fork {
        return deny(format!("{} from a fork", f.event));
    }
    let branch = f.head_branch.as_deref().unwrap_or("");
    if branch != f.default_branch {
        return deny(format!(
            "{} to {branch}, not the default branch {}",
            f.event, f.default_branch
        ));
    }
    // A tag may be named like the default branch: GitHub's answer on the commit decides.
    let sha7: String = f
        .head_sha
        .as_deref()
        .unwrap_or("?")
        .chars()
        .take(7)
        .collect();
    match f.head_on_default_branch {
        Some(true) => {}
        Some(false) => {
            return deny(format!(
                "{} of commit {sha7}, which is not on {}: a tag or another ref named like the default branch",
                f.event, f.default_branch
            ))
        }
        None => {
            return deny(format!(
                "GitHub did not say whether commit {sha7} is on {}",
                f.default_branch
            ))
        }
    }
    let want_ref = format!("refs/heads/{}", f.default_branch);
    if c.git_ref != want_ref {
        return deny(format!(
            "the job says ref {}, GitHub says the run is on {want_ref}",
            c.git_ref
        ));
    }
    if !policy
        .repositories
        .iter()
        .any(|r| r.eq_ignore_ascii_case(&f.repository))
    {
        return deny(format!(
            "{} may not publish: it is not in attic.publish_repositories",
            f.repository
        ));
    }
    Decision::Push {
        reason: format!("{} to {} of {}", f.event, f.default_branch, f.repository),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNER: &str = "sting-tinyland-nix-a1b2c3";

    fn policy() -> Policy {
        Policy {
            repositories: vec!["tinyland/flywheel".into(), "tinyland/infra".into()],
            trusted_events: vec!["push".into()],
        }
    }

    fn claims() -> Claims {
        Claims {
            repository: "tinyland/flywheel".into(),
            run_id: 77,
            run_attempt: 1,
            event_name: "push".into(),
            git_ref: "refs/heads/main".into(),
            runner_name: RUNNER.into(),
        }
    }

    fn facts() -> RunFacts {
        RunFacts {
            repository: "tinyland/flywheel".into(),
            repository_id: 10,
            default_branch: "main".into(),
            event: "push".into(),
            head_branch: Some("main".into()),
            head_sha: Some("0123456789abcdef0123456789abcdef01234567".into()),
            head_on_default_branch: Some(true),
            head_repository_id: Some(10),
            head_repository_fork: false,
            run_attempt: Some(1),
            jobs: vec![
                (501, "in_progress".into(), Some(RUNNER.into())),
                (502, "queued".into(), None),
            ],
        }
    }

    type Case = (
        &'static str,
        fn(&mut Policy, &mut Claims, &mut RunFacts),
        Option<&'static str>,
        bool,
        &'static str,
    );

    /// (name, mutation, API error, push expected, reason fragment)
    fn table() -> Vec<Case> {
        vec![
            (
                "push to main",
                |_, _, _| {},
                None,
                true,
                "push to main of tinyland/flywheel",
            ),
            (
                "push to main, repo name in other case",
                |_, c, f| {
                    c.repository = "Tinyland/Flywheel".into();
                    f.repository = "Tinyland/Flywheel".into();
                },
                None,
                true,
                "push to main",
            ),
            (
                "push to a feature branch",
                |_, c, f| {
                    f.head_branch = Some("feature".into());
                    c.git_ref = "refs/heads/feature".into();
                },
                None,
                false,
                "push to feature, not the default branch main",
            ),
            (
                "push of a tag",
                |_, c, f| {
                    f.head_branch = Some("v1.0".into());
                    c.git_ref = "refs/tags/v1.0".into();
                },
                None,
                false,
                "not the default branch",
            ),
            (
                "tag named like the default branch",
                |_, c, _| {
                    c.git_ref = "refs/tags/main".into();
                },
                None,
                false,
                "the job says ref refs/tags/main",
            ),
            (
                "tag named like the default branch, the job claiming the branch",
                |_, _, f| {
                    f.head_on_default_branch = Some(false);
                },
                None,
                false,
                "push of commit 0123456, which is not on main: a tag or another ref named like the default branch",
            ),
            (
                "no answer on the commit",
                |_, _, f| {
                    f.head_on_default_branch = None;
                },
                None,
                false,
                "GitHub did not say whether commit 0123456 is on main",
            ),
            (
                "default branch is master",
                |_, c, f| {
                    f.default_branch = "master".into();
                    f.head_branch = Some("master".into());
                    c.git_ref = "refs/heads/master".into();
                },
                None,
                true,
                "push to master",
            ),
            (
                "default branch master, push to main",
                |_, _, f| {
                    f.default_branch = "master".into();
                },
                None,
                false,
                "not the default branch master",
            ),
            (
                "pull_request",
                |_, c, f| {
                    f.event = "pull_request".into();
                    c.event_name = "pull_request".into();
                },
                None,
                false,
                "pull_request",
            ),
            (
                "pull_request from a fork",
                |_, c, f| {
                    f.event = "pull_request".into();
                    c.event_name = "pull_request".into();
                    f.head_repository_id = Some(99);
                    f.head_repository_fork = true;
                },
                None,
                false,
                "pull_request from a fork",
            ),
            (
                "pull_request_target",
                |_, c, f| {
                    f.event = "pull_request_target".into();
                    c.event_name = "pull_request_target".into();
                },
                None,
                false,
                "pull_request_target",
            ),
            (
                "pull_request_target even if trusted by policy",
                |p, c, f| {
                    p.trusted_events.push("pull_request_target".into());
                    f.event = "pull_request_target".into();
                    c.event_name = "pull_request_target".into();
                },
                None,
                false,
                "pull_request_target",
            ),
            (
                "merge_group",
                |_, c, f| {
                    f.event = "merge_group".into();
                    c.event_name = "merge_group".into();
                },
                None,
                false,
                "merge_group",
            ),
            (
                "merge_group even if trusted by policy",
                |p, c, f| {
                    p.trusted_events.push("merge_group".into());
                    f.event = "merge_group".into();
                    c.event_name = "merge_group".into();
                },
                None,
                false,
                "merge_group",
            ),
            (
                "workflow_dispatch, not opted in",
                |_, c, f| {
                    f.event = "workflow_dispatch".into();
                    c.event_name = "workflow_dispatch".into();
                },
                None,
                false,
                "only push may publish",
            ),
            (
                "workflow_dispatch, opted in",
                |p, c, f| {
                    p.trusted_events.push("workflow_dispatch".into());
                    f.event = "workflow_dispatch".into();
                    c.event_name = "workflow_dispatch".into();
                },
                None,
                true,
                "workflow_dispatch to main",
            ),
            (
                "workflow_dispatch on a branch, opted in",
                |p, c, f| {
                    p.trusted_events.push("workflow_dispatch".into());
                    f.event = "workflow_dispatch".into();
                    c.event_name = "workflow_dispatch".into();
                    f.head_branch = Some("dev".into());
                    c.git_ref = "refs/heads/dev".into();
                },
                None,
                false,
                "not the default branch",
            ),
            (
                "schedule, not opted in",
                |_, c, f| {
                    f.event = "schedule".into();
                    c.event_name = "schedule".into();
                },
                None,
                false,
                "only push",
            ),
            (
                "schedule, opted in",
                |p, c, f| {
                    p.trusted_events.push("schedule".into());
                    f.event = "schedule".into();
                    c.event_name = "schedule".into();
                },
                None,
                true,
                "schedule to main",
            ),
            (
                "release",
                |_, c, f| {
                    f.event = "release".into();
                    c.event_name = "release".into();
                },
                None,
                false,
                "only push",
            ),
            (
                "repository_dispatch",
                |_, c, f| {
                    f.event = "repository_dispatch".into();
                    c.event_name = "repository_dispatch".into();
                },
                None,
                false,
                "only push",
            ),
            (
                "workflow_run",
                |_, c, f| {
                    f.event = "workflow_run".into();
                    c.event_name = "workflow_run".into();
                },
                None,
                false,
                "only push",
            ),
            (
                "push from a fork repository (head differs)",
                |_, _, f| {
                    f.head_repository_id = Some(11);
                },
                None,
                false,
                "push from a fork",
            ),
            (
                "push with head marked fork",
                |_, _, f| {
                    f.head_repository_fork = true;
                },
                None,
                false,
                "from a fork",
            ),
            (
                "repo not allowed to publish",
                |_, c, f| {
                    c.repository = "tinyland/other".into();
                    f.repository = "tinyland/other".into();
                },
                None,
                false,
                "not in attic.publish_repositories",
            ),
            (
                "empty allowlist",
                |p, _, _| {
                    p.repositories.clear();
                },
                None,
                false,
                "not in attic.publish_repositories",
            ),
            (
                "env claims another repository",
                |_, c, _| {
                    c.repository = "tinyland/infra".into();
                },
                None,
                false,
                "GitHub says run 77 belongs to tinyland/flywheel",
            ),
            (
                "env claims push, API says pull_request",
                |_, _, f| {
                    f.event = "pull_request".into();
                },
                None,
                false,
                "the job says event push, GitHub says pull_request",
            ),
            (
                "env claims main, API head is a branch",
                |_, _, f| {
                    f.head_branch = Some("evil".into());
                },
                None,
                false,
                "not the default branch",
            ),
            (
                "env ref disagrees with API",
                |_, c, _| {
                    c.git_ref = "refs/heads/evil".into();
                },
                None,
                false,
                "the job says ref refs/heads/evil",
            ),
            (
                "job on another runner",
                |_, _, f| {
                    f.jobs = vec![(501, "in_progress".into(), Some("someone-else".into()))];
                },
                None,
                false,
                "no job of run 77 is in progress on runner",
            ),
            (
                "job of this runner completed",
                |_, _, f| {
                    f.jobs = vec![(501, "completed".into(), Some(RUNNER.into()))];
                },
                None,
                false,
                "no job of run 77 is in progress",
            ),
            (
                "job of this runner queued",
                |_, _, f| {
                    f.jobs = vec![(501, "queued".into(), Some(RUNNER.into()))];
                },
                None,
                false,
                "no job",
            ),
            (
                "no jobs at all",
                |_, _, f| {
                    f.jobs.clear();
                },
                None,
                false,
                "no job",
            ),
            (
                "job without runner name",
                |_, _, f| {
                    f.jobs = vec![(501, "in_progress".into(), None)];
                },
                None,
                false,
                "no job",
            ),
            (
                "re-run, attempts agree",
                |_, c, f| {
                    c.run_attempt = 2;
                    f.run_attempt = Some(2);
                },
                None,
                true,
                "push to main",
            ),
            (
                "re-run, env claims the old attempt",
                |_, c, f| {
                    c.run_attempt = 1;
                    f.run_attempt = Some(2);
                },
                None,
                false,
                "GitHub says the run is at attempt 2",
            ),
            (
                "re-run, env claims a future attempt",
                |_, c, _| {
                    c.run_attempt = 3;
                },
                None,
                false,
                "the job says attempt 3",
            ),
            (
                "API without run_attempt",
                |_, _, f| {
                    f.run_attempt = None;
                },
                None,
                true,
                "push to main",
            ),
            (
                "API down",
                |_, _, _| {},
                Some("cannot reach GitHub: connection refused"),
                false,
                "GitHub could not be asked",
            ),
            (
                "API 404 (run of another installation)",
                |_, _, _| {},
                Some("get-run: GitHub answered 404: Not Found"),
                false,
                "GitHub could not be asked",
            ),
            (
                "API rate limited",
                |_, _, _| {},
                Some("rate limited for 3600 s"),
                false,
                "GitHub could not be asked",
            ),
            (
                "API answer malformed",
                |_, _, _| {},
                Some("GitHub's answer is not what its API describes"),
                false,
                "GitHub could not be asked",
            ),
            (
                "pull_request, env claims push",
                |_, c, f| {
                    f.event = "pull_request".into();
                    c.event_name = "push".into();
                },
                None,
                false,
                "GitHub says pull_request",
            ),
            (
                "head branch missing",
                |_, _, f| {
                    f.head_branch = None;
                },
                None,
                false,
                "not the default branch",
            ),
            (
                "second repo in allowlist",
                |_, c, f| {
                    c.repository = "tinyland/infra".into();
                    f.repository = "tinyland/infra".into();
                },
                None,
                true,
                "push to main of tinyland/infra",
            ),
        ]
    }

    #[test]
    fn no_wrong_grants() {
        let cases = table();
        assert!(cases.len() >= 40, "{} cases", cases.len());
        for (name, mutate, api_error, want_push, fragment) in cases {
            let (mut p, mut c, mut f) = (policy(), claims(), facts());
            mutate(&mut p, &mut c, &mut f);
            let d = match api_error {
                Some(e) => decide(&p, &c, Err(e)),
                None => decide(&p, &c, Ok(&f)),
            };
            assert_eq!(d.push(), want_push, "{name}: {d:?}");
            assert!(
                d.line().contains(fragment),
                "{name}: {:?} lacks {fragment:?}",
                d.line()
            );
        }
    }
}
