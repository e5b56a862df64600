//! The fake GitHub as a standalone loopback server, for benchmarks run by hand.
//!
//! usage: fake-github-serve KEY_OUT LABEL JOBS SCRIPT [LABEL JOBS SCRIPT ...]
//! Writes the App's private key to KEY_OUT, queues JOBS jobs running SCRIPT for each LABEL,
//! prints the server URL on stdout, and serves until stdin closes. `GET /_fake/stats` reports
//! counts.
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
                env: [("GITHUB_RUN_ID".to_owned(), run_id.to_string())]
                    .into_iter()
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
