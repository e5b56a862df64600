//! The client against the fake GitHub: auth, registration, 409 recovery, rate limits, bad answers.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use fake_github::{app_key, FakeGitHub, Injection, APP_ID};
use flywheel_jit_config::{
    jitfile, Client, ClientConfig, Credentials, Deleted, GitHubError, RetryPolicy, Scope, Secret,
};

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
        secondary_min: Duration::from_millis(100),
        max_wait: Duration::from_secs(5),
        timeout: Duration::from_millis(700),
    }
}

fn app_client(gh: &FakeGitHub, scope: Scope) -> Client {
    Client::new(ClientConfig {
        api_url: gh.url.clone(),
        scope,
        credentials: Credentials::App {
            app_id: APP_ID.into(),
            private_key_pem: Secret::new(app_key().0),
            installation_id: None,
        },
        user_agent: "flywheel-agent-test".into(),
        retry: policy(),
    })
    .expect("client")
}

fn org() -> Scope {
    Scope::Org("tinyland".into())
}

fn labels() -> Vec<String> {
    vec!["tinyland-nix".into()]
}

#[tokio::test]
async fn app_auth_registers_with_one_installation_token_for_many_runners() {
    let gh = FakeGitHub::start();
    let c = app_client(&gh, org());
    for i in 0..5 {
        let r = c
            .generate_jitconfig(&format!("sting-tinyland-nix-{i}"), 1, &labels(), "_work")
            .await
            .expect("register");
        assert_eq!(r.runner.name, format!("sting-tinyland-nix-{i}"));
        assert_eq!(r.runner.labels, labels());
        let file = jitfile::runner_file(&r.encoded).expect("decodes");
        assert_eq!(file.agent_name, r.runner.name);
        assert_eq!(file.agent_id, r.runner.id);
    }
    gh.with(|s| {
        assert_eq!(
            s.count("get-installation"),
            1,
            "installation id looked up once"
        );
        assert_eq!(
            s.count("create-installation-token"),
            1,
            "one token for all registrations"
        );
        assert_eq!(s.count("generate-jitconfig"), 5);
        assert!(s.registrations.iter().all(|r| r.runner_group_id == 1
            && r.labels == labels()
            && r.work_folder.as_deref() == Some("_work")));
    });
    assert_eq!(c.stats().count("generate-jitconfig"), 5);
    assert!(c.stats().ratelimit_remaining() > 0);
}

#[tokio::test]
async fn repo_and_enterprise_scopes_and_a_pat() {
    let gh = FakeGitHub::start();
    let c = app_client(
        &gh,
        Scope::Repo {
            owner: "tinyland".into(),
            repo: "flywheel".into(),
        },
    );
    c.generate_jitconfig("r1", 1, &labels(), "_work")
        .await
        .expect("repo scope");
    gh.with(|s| {
        assert!(s.calls.iter().any(|c| c.path
            == "/repos/tinyland/flywheel/actions/runners/generate-jitconfig"
            && c.status == 201))
    });

    gh.with(|s| s.pat = Some("ghp_test".into()));
    let pat = Client::new(ClientConfig {
        api_url: gh.url.clone(),
        scope: Scope::Enterprise("acme".into()),
        credentials: Credentials::Token(Secret::new("ghp_test".into())),
        user_agent: "t".into(),
        retry: policy(),
    })
    .expect("client");
    pat.generate_jitconfig("e1", 3, &labels(), "_work")
        .await
        .expect("enterprise scope");
    gh.with(|s| {
        assert!(s.calls.iter().any(|c| c.path
            == "/enterprises/acme/actions/runners/generate-jitconfig"
            && c.status == 201));
        assert_eq!(s.registrations.last().map(|r| r.runner_group_id), Some(3));
    });

    let bad = Client::new(ClientConfig {
        api_url: gh.url.clone(),
        scope: org(),
        credentials: Credentials::Token(Secret::new("ghp_wrong".into())),
        user_agent: "t".into(),
        retry: policy(),
    })
    .expect("client");
    match bad.generate_jitconfig("x", 1, &labels(), "_work").await {
        Err(GitHubError::Status {
            status: 401,
            message,
            ..
        }) => assert_eq!(message, "Bad credentials"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_lost_answer_then_409_is_recovered_under_a_new_name() {
    let gh = FakeGitHub::start();
    let c = app_client(&gh, org());
    // The first POST creates the runner but its answer is lost (502): the retry hits 409.
    gh.inject(Injection {
        endpoint: "generate-jitconfig",
        status: 502,
        apply: true,
        body: "{\"message\":\"Server Error\"}".into(),
        ..Injection::default()
    });
    let r = c
        .register(
            |attempt| format!("sting-tinyland-nix-a{attempt}"),
            1,
            &labels(),
            "_work",
        )
        .await
        .expect("registered");
    assert_eq!(r.runner.name, "sting-tinyland-nix-a1");
    gh.with(|s| {
        let statuses: Vec<u16> = s
            .calls
            .iter()
            .filter(|c| c.endpoint == "generate-jitconfig")
            .map(|c| c.status)
            .collect();
        assert_eq!(statuses, vec![502, 409, 201]);
        assert_eq!(
            s.count("delete-runner"),
            1,
            "the stale registration was deleted"
        );
        let names: Vec<&str> = s.runners.values().map(|r| r.name.as_str()).collect();
        assert_eq!(names, vec!["sting-tinyland-nix-a1"]);
    });
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let gh = FakeGitHub::start();
    let c = app_client(&gh, org());
    c.list_runners(None).await.expect("warm up the token");
    gh.inject(Injection {
        endpoint: "generate-jitconfig",
        status: 429,
        headers: vec![("retry-after".into(), "1".into())],
        body: "{\"message\":\"You have exceeded a secondary rate limit\"}".into(),
        ..Injection::default()
    });
    let t = Instant::now();
    c.generate_jitconfig("r", 1, &labels(), "_work")
        .await
        .expect("after waiting");
    assert!(t.elapsed() >= Duration::from_secs(1), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_wait_asked_of_one_request_holds_every_request_of_the_client() {
    let gh = FakeGitHub::start();
    let c = std::sync::Arc::new(app_client(&gh, org()));
    c.list_runners(None).await.expect("warm up the token");
    gh.inject(Injection {
        endpoint: "generate-jitconfig",
        status: 429,
        headers: vec![("retry-after".into(), "2".into())],
        body: "{\"message\":\"You have exceeded a secondary rate limit\"}".into(),
        ..Injection::default()
    });
    let t = Instant::now();
    let first = {
        let c = c.clone();
        tokio::spawn(async move { c.generate_jitconfig("a", 1, &labels(), "_work").await })
    };
    // Another task's request, after GitHub said wait 2 s to the first.
    while gh.with(|s| s.count("generate-jitconfig")) < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let asked = t.elapsed();
    c.list_runners(None).await.expect("the other request");
    let other_sent = gh.with(|s| s.count("list-runners"));
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "the other request left {:?} after the 429 (asked at {asked:?})",
        t.elapsed()
    );
    assert_eq!(other_sent, 2, "one warm-up, one after the wait");
    first
        .await
        .expect("join")
        .expect("registered after the wait");
}

#[tokio::test]
async fn an_exhausted_primary_limit_waits_until_reset() {
    let gh = FakeGitHub::start();
    let c = app_client(&gh, org());
    c.list_runners(None).await.expect("warm up");
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    gh.inject(Injection {
        endpoint: "list-runners",
        status: 403,
        headers: vec![
            ("x-ratelimit-remaining".into(), "0".into()),
            ("x-ratelimit-reset".into(), reset.to_string()),
        ],
        body: "{\"message\":\"API rate limit exceeded for installation ID 4242.\"}".into(),
        ..Injection::default()
    });
    let t = Instant::now();
    c.list_runners(None).await.expect("after reset");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(c.stats().requests().get(&("list-runners", 403)), Some(&1));
}

#[tokio::test]
async fn a_wait_longer_than_the_bound_is_an_error_not_a_hang() {
    let gh = FakeGitHub::start();
    let c = app_client(&gh, org());
    gh.inject(Injection {
        endpoint: "get-installation",
        status: 429,
        headers: vec![("retry-after".into(), "3600".into())],
        ..Injection::default()
    });
    let t = Instant::now();
    match c.list_runners(None).await {
        Err(GitHubError::RateLimited {
            wait_secs: 3600, ..
        }) => {}
        other => panic!("{other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn server_errors_and_slow_answers_are_retried_with_backoff() {
    let gh = FakeGitHub::start();
    let c = app_client(&gh, org());
    c.list_runners(None).await.expect("warm up");
    gh.inject(Injection {
        endpoint: "list-runners",
        status: 503,
        ..Injection::default()
    });
    gh.inject(Injection {
        endpoint: "list-runners",
        status: 200,
        delay_ms: 2000,
        body: "{}".into(),
        ..Injection::default()
    });
    let t = Instant::now();
    let runners = c.list_runners(None).await.expect("third time lucky");
    assert!(runners.is_empty());
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "waited for the timeout"
    );
    let req = c.stats().requests();
    assert_eq!(req.get(&("list-runners", 503)), Some(&1));
    assert_eq!(
        req.get(&("list-runners", 0)),
        Some(&1),
        "the slow answer counted as no answer"
    );

    for _ in 0..5 {
        gh.inject(Injection {
            endpoint: "get-runner",
            status: 502,
            ..Injection::default()
        });
    }
    match c.get_runner(1).await {
        Err(GitHubError::GaveUp { attempts: 5, .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn malformed_or_truncated_answers_are_errors_never_panics() {
    let gh = FakeGitHub::start();
    let c = app_client(&gh, org());
    c.list_runners(None).await.expect("warm up");
    let bodies = [
        "{\"runner\": {\"id\": 1, \"name\": \"x\"}, \"encoded_jit_config\": \"abc",
        "{\"runner\": {\"id\": \"one\"}, \"encoded_jit_config\": \"abc\"}",
        "{\"encoded_jit_config\": \"abc\"}",
        "{\"runner\": {\"id\": 1, \"name\": \"x\"}, \"encoded_jit_config\": \"\"}",
        "[]",
        "",
        "<html>oops</html>",
    ];
    for b in bodies {
        gh.inject(Injection {
            endpoint: "generate-jitconfig",
            status: 201,
            body: b.into(),
            ..Injection::default()
        });
        match c.generate_jitconfig("m", 1, &labels(), "_work").await {
            Err(GitHubError::Decode {
                endpoint: "generate-jitconfig",
                ..
            }) => {}
            other => panic!("{b:?}: {other:?}"),
        }
    }
    gh.inject(Injection {
        endpoint: "list-runners",
        status: 200,
        body: "{\"total_count\": 1, \"runners\": [{\"name\": 3}]}".into(),
        ..Injection::default()
    });
    assert!(matches!(
        c.list_runners(None).await,
        Err(GitHubError::Decode { .. })
    ));
    gh.inject(Injection {
        endpoint: "create-installation-token",
        status: 201,
        body: "{\"token\": \"t\", \"expires_at\": \"soon\"}".into(),
        ..Injection::default()
    });
}

#[tokio::test]
async fn delete_busy_unknown_and_pagination() {
    let gh = FakeGitHub::start();
    let c = app_client(&gh, org());
    for i in 0..150 {
        c.generate_jitconfig(&format!("p-{i:03}"), 1, &labels(), "_work")
            .await
            .expect("register");
    }
    let all = c.list_runners(None).await.expect("list");
    assert_eq!(all.len(), 150);
    assert!(c.stats().count("list-runners") >= 2, "paginated");
    let one = c.find_runner("p-007").await.expect("find").expect("exists");
    gh.with(|s| s.runners.get_mut(&one.id).expect("runner").busy = true);
    assert_eq!(
        c.delete_runner(one.id).await.expect("delete"),
        Deleted::Busy
    );
    gh.with(|s| s.runners.get_mut(&one.id).expect("runner").busy = false);
    assert_eq!(
        c.delete_runner(one.id).await.expect("delete"),
        Deleted::Deleted
    );
    assert_eq!(
        c.delete_runner(one.id).await.expect("delete"),
        Deleted::Gone
    );
    assert_eq!(c.get_runner(one.id).await.expect("get"), None);
}

#[tokio::test]
async fn tokens_are_refreshed_near_expiry_and_after_a_401() {
    let gh = FakeGitHub::start();
    // Tokens that expire within the refresh margin are never reused.
    gh.with(|s| s.token_ttl = Duration::from_secs(120));
    let c = app_client(&gh, org());
    c.list_runners(None).await.expect("1");
    c.list_runners(None).await.expect("2");
    assert_eq!(gh.with(|s| s.count("create-installation-token")), 2);

    gh.with(|s| s.token_ttl = Duration::from_secs(3600));
    c.list_runners(None).await.expect("3");
    c.list_runners(None).await.expect("4");
    assert_eq!(gh.with(|s| s.count("create-installation-token")), 3);
    // GitHub revokes the token: one 401, a new token, success.
    gh.with(|s| s.tokens.clear());
    c.list_runners(None).await.expect("after revocation");
    gh.with(|s| {
        assert_eq!(s.count("create-installation-token"), 4);
        assert_eq!(
            s.calls
                .iter()
                .filter(|c| c.endpoint == "list-runners" && c.status == 401)
                .count(),
            1
        );
    });
}

#[tokio::test]
async fn a_wrong_app_id_is_rejected_by_github() {
    let gh = FakeGitHub::start();
    let c = Client::new(ClientConfig {
        api_url: gh.url.clone(),
        scope: org(),
        credentials: Credentials::App {
            app_id: "999".into(),
            private_key_pem: Secret::new(app_key().0),
            installation_id: Some(4242),
        },
        user_agent: "t".into(),
        retry: policy(),
    })
    .expect("client");
    match c.list_runners(None).await {
        Err(GitHubError::Status {
            status: 401,
            endpoint: "create-installation-token",
            message,
        }) => assert!(message.contains("Issuer"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_repository_claim_that_is_not_owner_slash_repo_never_reaches_github() {
    let gh = FakeGitHub::start();
    let c = app_client(&gh, org());
    for bad in [
        "../..",
        "./x",
        "tinyland/..",
        "a/b/c",
        "tinyland",
        "a b/c",
        "/x",
    ] {
        let e = c.run_facts(bad, 1).await.expect_err(bad);
        assert!(e.to_string().contains("is not OWNER/REPO"), "{bad}: {e}");
    }
    // None of them was sent: the fake saw no run lookup at all.
    assert!(
        gh.with(|s| s.calls.iter().all(|c| c.endpoint != "get-run")),
        "{:?}",
        gh.with(|s| s.calls.iter().map(|c| c.endpoint).collect::<Vec<_>>())
    );
}
