//! Removes each directory given, the way teardown removes a job's `_work` (by descriptors,
//! never following a symlink), and prints how long each took: `bench/remove-tree.sh` runs it
//! against `rm -rf` of the same tree. Its output is for the script: printing is its job.

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Instant;

fn main() -> std::process::ExitCode {
    let mut failed = false;
    for dir in std::env::args_os().skip(1) {
        let t = Instant::now();
        match flywheel_agent::workdir::remove_tree(std::path::Path::new(&dir)) {
            Ok(()) => println!("{:.1}", t.elapsed().as_secs_f64() * 1e3),
            Err(e) => {
                eprintln!("remove {}: {e}", std::path::Path::new(&dir).display());
                failed = true;
            }
        }
    }
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
