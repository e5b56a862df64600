//! The fake GitHub as a standalone loopback server, for benchmarks run by hand.
//!
//! usage: fake-github-serve KEY_OUT LABEL JOBS SCRIPT [LABEL JOBS SCRIPT ...]
//! Writes the App's private key to KEY_OUT, queues JOBS jobs running SCRIPT for each LABEL,
//! prints the server URL on stdout, and serves until stdin closes. `GET /_fake/stats` reports
//! counts. With `FAKE_GITHUB_TRUST=push,pull_request` (any order, repeated), the jobs of
//! `tinyland/flywheel` take turns being of run 101 (a push to main) and run 102 (a fork's pull
//! request), `FLYWHEEL_BENCH_N` in their environment counting from 0.
#![allow(clippy::expect_used, clippy::print_stdout)]

use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: fake-github-serve KEY_OUT LABEL JOBS SCRIPT [LABEL JOBS SCRIPT ...]";
    let (Some(key_out), lanes) = (args.get(1), args.get(2..).unwrap_or_default()) else {
        eprintln!("{usage}");
        std::process::exit(64);
    };
    if lanes.is_empty() || lanes.len() % 3 != 0 {
        eprintln!("{usage}");
        std::process::exit(64);
    }
    std::fs::write(key_out, fake_github::app_key().0).expect("write key");
    let gh = fake_github::FakeGitHub::start();
    let trust: Vec<String> = std::env::var("FAKE_GITHUB_TRUST")
        .map(|t| t.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    if !trust.is_empty() {
        gh.push_and_fork_pr_runs();
    }
    let mut run_id = 0usize;
    for lane in lanes.chunks(3) {
        let [label, jobs, script] = lane else {
            unreachable!("chunks of 3")
        };
        let n: usize = jobs.parse().expect("JOBS is a number");
        for _ in 0..n {
            gh.push_job(fake_github::FakeJob {
                labels: vec![label.clone()],
                script: script.clone(),
                env: match trust.get(run_id % trust.len().max(1)).map(String::as_str) {
                    None => vec![("GITHUB_RUN_ID", run_id.to_string())],
                    Some(event) => {
                        let (id, git_ref) = match event {
                            "push" => ("101", "refs/heads/main"),
                            _ => ("102", "refs/pull/5/merge"),
                        };
                        vec![
                            ("GITHUB_REPOSITORY", "tinyland/flywheel".to_owned()),
                            ("GITHUB_RUN_ID", id.to_owned()),
                            ("GITHUB_RUN_ATTEMPT", "1".to_owned()),
                            ("GITHUB_EVENT_NAME", event.to_owned()),
                            ("GITHUB_REF", git_ref.to_owned()),
                            ("FLYWHEEL_BENCH_N", run_id.to_string()),
                        ]
                    }
                }
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
                ..Default::default()
            });
            run_id += 1;
        }
    }
    println!("{}", gh.url);
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
