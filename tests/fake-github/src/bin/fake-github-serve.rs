//! The fake GitHub as a standalone loopback server, for benchmarks run by hand.
//!
//! usage: fake-github-serve KEY_OUT LABEL JOBS SCRIPT
//! Writes the App's private key to KEY_OUT, queues JOBS jobs running SCRIPT for LABEL, prints
//! the server URL on stdout, and serves until stdin closes. `GET /_fake/stats` reports counts.
#![allow(clippy::expect_used, clippy::print_stdout)]

use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, key_out, label, jobs, script] = args.as_slice() else {
        eprintln!("usage: fake-github-serve KEY_OUT LABEL JOBS SCRIPT");
        std::process::exit(64);
    };
    std::fs::write(key_out, fake_github::app_key().0).expect("write key");
    let gh = fake_github::FakeGitHub::start();
    let n: usize = jobs.parse().expect("JOBS is a number");
    for i in 0..n {
        gh.push_job(fake_github::FakeJob {
            labels: vec![label.clone()],
            script: script.clone(),
            env: [("GITHUB_RUN_ID".to_owned(), i.to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        });
    }
    println!("{}", gh.url);
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
