//! Command-line surface. Errors become exit codes and messages here, at the binary's edge.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use flywheel_agent::cgroup;
use flywheel_agent::config::{self, Config, HostFacts};
use flywheel_agent::envelope::{self, JobSpec, JobUser, Stop};
use flywheel_agent::exit;
use flywheel_agent::reaper::Reaper;
use flywheel_agent::size::{parse_size, Bytes};

#[derive(Debug, Parser)]
#[command(
    name = "flywheel-agent",
    version,
    about = "Runs GitHub Actions jobs for Nix builds inside per-lane memory envelopes"
)]
struct Cli {
    /// Log format; `auto` picks JSON under Kubernetes, text elsewhere.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "FLYWHEEL_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the configured lanes.
    Lanes {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Validate a configuration: exit 0 when valid, 78 otherwise.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run COMMAND as one job of a lane, inside the lane's memory envelope.
    Exec {
        /// The lane whose envelope the job gets.
        #[arg(long)]
        lane: String,
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override the lane's memory envelope (e.g. 512Mi).
        #[arg(long)]
        memory: Option<String>,
        /// Override the lane's work root.
        #[arg(long)]
        work_root: Option<PathBuf>,
        /// Run the job as this user (the agent stays root).
        #[arg(long)]
        user: Option<String>,
        /// Use this runner slot of the lane (0-based).
        #[arg(long)]
        slot: Option<u32>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FLYWHEEL_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().with_current_span(true).init();
    } else {
        builder.compact().with_target(false).init();
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { 0 });
        }
    };
    init_logging(cli.log_format);
    let host = HostFacts::detect();
    match cli.command {
        Command::Lanes { config, json } => lanes(config, json, &host),
        Command::CheckConfig { config } => match config::load(config.as_deref(), &host) {
            Ok(c) => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{}: ok ({} lanes)", c.origin, c.lanes.len());
                for l in c.lanes.iter().filter(|l| l.unavailable.is_some()) {
                    let _ = writeln!(
                        out,
                        "note: {}",
                        l.unavailable.as_deref().unwrap_or_default()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(exit::CONFIG)
            }
        },
        Command::Exec {
            lane,
            config,
            memory,
            work_root,
            user,
            slot,
            command,
        } => {
            let req = ExecRequest {
                lane,
                config,
                memory,
                work_root,
                user,
                slot,
                command,
            };
            match exec(req, &host) {
                Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(exit::AGENT_FAILED)),
                Err(e) => {
                    eprintln!("flywheel: {e:#}");
                    ExitCode::from(exit::AGENT_FAILED)
                }
            }
        }
    }
}

fn lanes(config: Option<PathBuf>, json: bool, host: &HostFacts) -> ExitCode {
    let cfg = match config::load(config.as_deref(), host) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(exit::CONFIG);
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        match serde_json::to_string_pretty(&cfg.lanes) {
            Ok(s) => {
                let _ = writeln!(out, "{s}");
            }
            Err(e) => {
                eprintln!("flywheel: cannot render lanes: {e}");
                return ExitCode::from(exit::AGENT_FAILED);
            }
        }
    } else {
        let _ = writeln!(
            out,
            "{:<34} {:>10} {:>11}  LABELS",
            "LANE", "MEMORY", "MAX_RUNNERS"
        );
        for l in &cfg.lanes {
            let _ = write!(
                out,
                "{:<34} {:>10} {:>11}  {}",
                l.name,
                Bytes(l.memory_bytes).to_string(),
                l.max_runners,
                l.labels.join(",")
            );
            if l.unavailable.is_some() {
                let _ = write!(out, "  (unavailable on this host)");
            }
            let _ = writeln!(out);
        }
    }
    ExitCode::SUCCESS
}

#[derive(Debug)]
struct ExecRequest {
    lane: String,
    config: Option<PathBuf>,
    memory: Option<String>,
    work_root: Option<PathBuf>,
    user: Option<String>,
    slot: Option<u32>,
    command: Vec<OsString>,
}

/// Resolve everything that can be wrong before the host changes, then run the job.
fn exec(req: ExecRequest, host: &HostFacts) -> anyhow::Result<i32> {
    let cfg: Config = config::load(req.config.as_deref(), host)?;
    let lane = cfg
        .lane(&req.lane)
        .with_context(|| {
            let names: Vec<&str> = cfg.lanes.iter().map(|l| l.name.as_str()).collect();
            format!(
                "no lane {:?} in {}: choose one of {}",
                req.lane,
                cfg.origin,
                names.join(", ")
            )
        })?
        .clone();
    if let Some(why) = &lane.unavailable {
        anyhow::bail!("{why}");
    }
    let memory_bytes = match &req.memory {
        Some(m) => parse_size(m).context("--memory")?,
        None => lane.memory_bytes,
    };
    let work_root = match req.work_root {
        Some(w) if !w.is_absolute() => {
            anyhow::bail!("--work-root must be an absolute path, got {}", w.display())
        }
        Some(w) => w,
        None => lane.work_root.clone(),
    };
    let user = req.user.as_deref().map(JobUser::lookup).transpose()?;
    let spec = JobSpec {
        lane,
        memory_bytes,
        work_root,
        user,
        slot: req.slot,
        command: req.command,
        host_cpus: host.cpus,
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let mut reaper = Reaper::new().context("cannot watch child processes")?;
        let stop = Stop::default();
        watch_signals(stop.clone())?;
        let mgr = cgroup::detect(&cfg.cgroup.mount, cfg.cgroup.parent.as_deref())?;
        tracing::debug!(layout = %mgr.layout(), "cgroup layout");
        let outcome = envelope::run_job(&cfg, mgr.as_ref(), spec, stop, &mut reaper).await?;
        if let Some(msg) = &outcome.launch_error {
            eprintln!("flywheel: {msg}");
        }
        if let Some(v) = &outcome.verdict {
            eprintln!("{v}");
        }
        if let Some(n) = &outcome.pids_note {
            eprintln!("{n}");
        }
        Ok(outcome.code)
    })
}

/// First SIGINT/SIGTERM: graceful stop. Second: kill now.
fn watch_signals(stop: Stop) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            if seen == 1 {
                tracing::warn!("signal received: stopping the job (send another to kill it now)");
                stop.graceful.cancel();
            } else {
                stop.now.cancel();
            }
        }
    });
    Ok(())
}
