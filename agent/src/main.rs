//! The `flywheel-agent` binary: parse arguments, set up logging, dispatch.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
