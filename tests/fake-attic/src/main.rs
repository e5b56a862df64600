//! The fake Attic as a standalone loopback server, for benchmarks run by hand.
//!
//! usage: fake-attic-serve KEY_FILE CACHE...
//! KEY_FILE holds the HS256 token secret, base64 (as `attic.signing_key_file`). Prints the
//! server URL, serves until stdin closes, and keeps no NAR bytes (it hashes and checks them).
#![allow(clippy::expect_used, clippy::print_stdout)]

use std::io::Read;

use base64::Engine;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, key_file, caches @ ..] = args.as_slice() else {
        eprintln!("usage: fake-attic-serve KEY_FILE CACHE...");
        std::process::exit(64);
    };
    let text = std::fs::read_to_string(key_file).expect("read the key file");
    let secret = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .expect("the key file is base64");
    let caches: Vec<&str> = caches.iter().map(String::as_str).collect();
    let attic = fake_attic::FakeAttic::start(&secret, &caches);
    attic.with(|s| s.discard_nars = true);
    println!("{}", attic.url);
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
