//! Command-line surface. Errors become exit codes and messages here, at the binary's edge.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use flywheel_agent::cgroup;
use flywheel_agent::config::{self, Config, HostFacts, Network};
use flywheel_agent::envelope::{self, JobSpec, JobUser, Stop, StopMode};
use flywheel_agent::exit;
use flywheel_agent::reaper::Reaper;
use flywheel_agent::runner::{self, PoolStats, RunContext, Shutdown};
use flywheel_agent::size::{parse_size, Bytes};
use flywheel_jit_config::{Client, ClientConfig, Credentials, RetryPolicy, Secret};

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
    /// Keep each lane's pool of just-in-time runners full (bare metal). As an ARC runner pod's
    /// entrypoint (ACTIONS_RUNNER_INPUT_JITCONFIG set), run exactly that runner instead.
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Ask the running agent (`run`) what it is doing: lanes, runners, jobs, envelope use,
    /// the last OOM verdicts.
    Status {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Run by a runner's job hooks (as the job's user): talk to the agent.
    #[command(hide = true)]
    Hook {
        #[arg(value_parser = ["job-started", "job-completed"])]
        op: String,
    },
    /// Attic tokens for operators.
    Attic {
        #[command(subcommand)]
        command: AtticCommand,
    },
    /// Nix on this host: the pinned, hash-verified bootstrap.
    Nix {
        #[command(subcommand)]
        command: NixCommand,
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
        /// Run without Nix even when the lane has it (no bootstrap, no per-job nix-daemon).
        #[arg(long)]
        no_nix: bool,
        /// Treat the job as untrusted: its nix-daemon writes a throwaway layer over the
        /// store (discarded at teardown) instead of the store.
        #[arg(long)]
        untrusted: bool,
        /// Also write the job summary (Markdown, as in GitHub's job summary) to this file.
        #[arg(long)]
        summary: Option<PathBuf>,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum AtticCommand {
    /// Print a token signed with attic.signing_key_file.
    MintToken {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        cache: String,
        #[arg(long)]
        sub: String,
        /// How long it is valid (e.g. 1h); a token always expires.
        #[arg(long)]
        validity: String,
        /// Also allow pushing (else pull only).
        #[arg(long)]
        push: bool,
    },
    /// Publish store paths (and their runtime closure) of a lane's store to its Attic cache, the
    /// way the agent does after a trusted job: what the cache lacks, streamed, with tokens
    /// minted per request.
    Publish {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        lane: String,
        /// Store paths (`/nix/store/...`).
        #[arg(required = true)]
        paths: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum NixCommand {
    /// Install the pinned Nix (or verify it and change nothing when it is right).
    Bootstrap {
        #[arg(long)]
        config: Option<PathBuf>,
        /// The lane whose store and nix.conf to bootstrap (default: the first lane with Nix).
        #[arg(long)]
        lane: Option<String>,
        /// A local release tarball (default: nix.tarball, else the pinned file name under
        /// /var/lib/flywheel-agent/nix).
        #[arg(long, conflicts_with = "url")]
        tarball: Option<PathBuf>,
        /// Download the tarball from here first (it is verified before use).
        #[arg(long)]
        url: Option<String>,
        /// Expected sha256 of the tarball (default: the pin's).
        #[arg(long, requires = "version")]
        sha256: Option<String>,
        /// The Nix version the tarball holds (with --sha256).
        #[arg(long, requires = "sha256")]
        version: Option<String>,
        /// Bootstrap this slot's store of a lane with per-slot stores.
        #[arg(long)]
        slot: Option<u32>,
        /// Print only the one-line summary.
        #[arg(long, hide = true)]
        summary_only: bool,
    },
    /// Garbage-collect one node-local slot's store (the agent runs this after a job, holding
    /// the slot, when the slot's filesystem runs low or the store passes `slot_max_size`).
    Gc {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        lane: String,
        #[arg(long)]
        slot: u32,
        /// Free at least this many bytes (or as much as is garbage).
        #[arg(long)]
        max_freed: u64,
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
    // ARC hands the runner's JIT config to the `runner` container in this variable. Take it out
    // of the agent's own environment before any thread exists; it then lives only in a Secret.
    let jit = std::env::var("ACTIONS_RUNNER_INPUT_JITCONFIG")
        .ok()
        .filter(|v| !v.is_empty())
        .map(Secret::new);
    std::env::remove_var("ACTIONS_RUNNER_INPUT_JITCONFIG");
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
        Command::CheckConfig { config } => match config::load(config.as_deref(), &host)
            .and_then(|c| config::check_host(&c).map(|()| c))
        {
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
        Command::Run { config } => run(config, &host, jit),
        Command::Hook { op } => {
            ExitCode::from(u8::try_from(flywheel_agent::hooks::run_hook(&op)).unwrap_or(0))
        }
        Command::Attic {
            command:
                AtticCommand::MintToken {
                    config,
                    cache,
                    sub,
                    validity,
                    push,
                },
        } => report(mint_token(config, &cache, &sub, &validity, push, &host)),
        Command::Attic {
            command:
                AtticCommand::Publish {
                    config,
                    lane,
                    paths,
                },
        } => report(publish(config, &lane, &paths, &host)),
        Command::Status { config, json } => match status(config, json, &host) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("flywheel: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Nix {
            command:
                NixCommand::Bootstrap {
                    config,
                    lane,
                    tarball,
                    url,
                    sha256,
                    version,
                    slot,
                    summary_only,
                },
        } => report(nix_bootstrap(
            config,
            lane,
            tarball,
            url,
            sha256.zip(version),
            slot,
            summary_only,
            &host,
        )),
        Command::Nix {
            command:
                NixCommand::Gc {
                    config,
                    lane,
                    slot,
                    max_freed,
                },
        } => report(nix_gc(config, &lane, slot, max_freed, &host)),
        Command::Exec {
            lane,
            config,
            memory,
            work_root,
            user,
            slot,
            no_nix,
            untrusted,
            summary,
            command,
        } => {
            let req = ExecRequest {
                summary,
                lane,
                config,
                memory,
                work_root,
                user,
                slot,
                no_nix,
                untrusted,
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
    no_nix: bool,
    untrusted: bool,
    summary: Option<PathBuf>,
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
    let user = req
        .user
        .as_deref()
        .map(|u| JobUser::lookup(u, &cfg.runner.groups).map(envelope::UserChoice::Named))
        .transpose()?;
    // `exec` is root's command on the host: its job is trusted (writes the store) unless it
    // says `--untrusted`.
    let nix = (lane.nix && !req.no_nix).then(|| {
        let mut n = envelope::NixJob {
            throwaway: req.untrusted,
            ..flywheel_agent::envelope::nix_job(&cfg, &lane)
        };
        // Hidden from the daemon like every lane's work root (`--work-root` may be another).
        n.hidden.push(work_root.clone());
        n
    });
    // Its Bazel cache endpoint writes upstream like its store: unless `--untrusted`.
    config::check_bazel_credentials(&cfg, &lane)?;
    let bazel = match &lane.bazel {
        Some(b) => {
            let up = flywheel_agent::bazel::Upstream::new(&lane.name, b)?;
            let cache = flywheel_agent::bazel::JobCache::new(up, None);
            if !req.untrusted {
                cache.allow_writes();
            }
            Some(cache)
        }
        None => None,
    };
    let summary_file = req.summary.clone();
    let command = req.command.clone();
    let spec = JobSpec {
        lane,
        memory_bytes,
        work_root,
        user,
        slot: req.slot,
        slot_fallback: false,
        command: req.command,
        host_cpus: host.cpus,
        runner: None,
        secret_env: Vec::new(),
        log_output: None,
        stop_mode: StopMode::default(),
        probe: None,
        nix,
        hook: None,
        background: flywheel_agent::tasks::Background::new(),
        before_release: None,
        receipt: None,
        bazel: bazel.clone(),
    };

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let reaper = Reaper::start().context("cannot watch child processes")?;
        let stop = Stop::default();
        let signals = watch_signals(&spec.background)?;
        let s2 = stop.clone();
        tokio::spawn(async move {
            signals.drain.cancelled().await;
            s2.graceful.cancel();
            signals.stop.cancelled().await;
            s2.now.cancel();
        });
        let mgr = cgroup::detect(&cfg.cgroup.mount, cfg.cgroup.parent.as_deref())?;
        tracing::debug!(layout = %mgr.layout(), "cgroup layout");
        let outcome = envelope::run_job(&cfg, mgr.as_ref(), spec, stop, &reaper).await?;
        let report = &outcome.report;
        if let Some(b) = &report.bootstrap {
            eprintln!("flywheel: {}", b.line());
        }
        if let Some(msg) = &outcome.launch_error {
            eprintln!("flywheel: {msg}");
        }
        if let Some(hint) = private_tmp_hint(outcome.code, &command) {
            eprintln!("flywheel: {hint}");
        }
        if let Some(v) = report.oom_verdict() {
            eprintln!("{v}");
        }
        if let Some(n) = report.pids_note() {
            eprintln!("{n}");
        }
        // "Does my build fit?": the same summary a runner job gets, for the terminal.
        eprint!("{}", flywheel_agent::summary::text(report));
        let bazel = bazel.map(|b| b.tally());
        if let Some(t) = &bazel {
            eprintln!("flywheel: {}", flywheel_agent::summary::bazel_line(t));
        }
        // In a workflow step, the same annotations the runner's completed hook writes.
        if std::env::var_os("GITHUB_ACTIONS").is_some_and(|v| v == "true") {
            let mut out = std::io::stdout().lock();
            for line in flywheel_agent::summary::annotations(report) {
                let _ = writeln!(out, "{line}");
            }
        }
        if let Some(path) = &summary_file {
            let mut md = flywheel_agent::summary::markdown(report);
            if let Some(t) = &bazel {
                md.push_str(&flywheel_agent::summary::bazel_section(t));
            }
            std::fs::write(path, md)
                .with_context(|| format!("cannot write the summary to {}", path.display()))?;
        }
        Ok(outcome.code)
    })
}

/// Why a command that names the caller's `/tmp` (or `/var/tmp`) failed: a job has private
/// ones, so a script or file the caller put there is not in the job's. `None` when the command
/// succeeded or names nothing there that the caller can see.
fn private_tmp_hint(code: i32, command: &[OsString]) -> Option<String> {
    if code == 0 {
        return None;
    }
    let path = command.iter().map(Path::new).find(|p| {
        (p.starts_with("/tmp") || p.starts_with("/var/tmp"))
            && p.components().count() > 2
            && p.exists()
    })?;
    Some(format!(
        "{} exists here but not in the job: every job gets a private /tmp and /var/tmp, so nothing the caller put there is visible to it; put it in a directory outside them that the job's user can read",
        path.display()
    ))
}

/// The lane called `name`, or an error naming the config.
fn lane_named<'a>(cfg: &'a Config, name: &str) -> anyhow::Result<&'a flywheel_agent::config::Lane> {
    cfg.lane(name)
        .with_context(|| format!("no lane {name:?} in {}", cfg.origin))
}

/// Enter a mount namespace where slot `slot`'s store is the lane's `nix_store`.
fn enter_slot(lane: &flywheel_agent::config::Lane, slot: u32) -> anyhow::Result<()> {
    let root = lane
        .slot_root
        .as_ref()
        .with_context(|| format!("lane {:?} has no slot_root", lane.name))?;
    anyhow::ensure!(
        slot < lane.slots,
        "lane {:?} has slots 0..{}",
        lane.name,
        lane.slots
    );
    let (slot_nix, _) = flywheel_agent::slot::slot_dirs(root, slot);
    std::fs::create_dir_all(&slot_nix)?;
    flywheel_agent::nixboot::enter_store_namespace(&slot_nix, &lane.nix_store)?;
    Ok(())
}

/// `nix gc`: collect garbage in a slot's store, in a mount namespace where it is the lane's
/// `nix_store`, directly on the store (no daemon: the caller holds the slot).
fn nix_gc(
    config: Option<PathBuf>,
    lane: &str,
    slot: u32,
    max_freed: u64,
    host: &HostFacts,
) -> anyhow::Result<()> {
    let cfg = config::load(config.as_deref(), host)?;
    let lane = lane_named(&cfg, lane)?;
    enter_slot(lane, slot)?;
    let out = std::process::Command::new(
        lane.nix_store
            .join("var/nix/profiles/default/bin/nix-store"),
    )
    .args(["--gc", "--max-freed", &max_freed.to_string()])
    .env_clear()
    .env("PATH", "/usr/local/bin:/usr/bin:/bin")
    .env("NIX_REMOTE", "local")
    .env(
        "NIX_CONF_DIR",
        lane.nix_conf
            .parent()
            .unwrap_or(std::path::Path::new("/etc/nix")),
    )
    .output()
    .context("cannot run nix-store --gc")?;
    anyhow::ensure!(
        out.status.success(),
        "nix-store --gc failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = writeln!(
        std::io::stdout().lock(),
        "{}",
        said.lines()
            .rev()
            .find(|l| l.contains("freed"))
            .unwrap_or("nothing to free")
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn nix_bootstrap(
    config: Option<PathBuf>,
    lane: Option<String>,
    tarball: Option<PathBuf>,
    url: Option<String>,
    pinned: Option<(String, String)>,
    slot: Option<u32>,
    summary_only: bool,
    host: &HostFacts,
) -> anyhow::Result<()> {
    use flywheel_agent::nixboot;
    let mut cfg = config::load(config.as_deref(), host)?;
    if let Some((sha, version)) = pinned {
        cfg.nix.sha256 = Some(sha);
        cfg.nix.version = Some(version);
    }
    if let Some(t) = tarball {
        cfg.nix.tarball = Some(std::path::absolute(t)?);
    }
    let lane = match &lane {
        Some(n) => cfg
            .lane(n)
            .with_context(|| format!("no lane {n:?} in {}", cfg.origin))?,
        None => cfg
            .lanes
            .iter()
            .find(|l| l.nix)
            .context("no lane has Nix on")?,
    }
    .clone();
    let (plan, version, system) = nixboot::plan_for(&cfg, &lane, host.cpus)?;
    if let Some(url) = url {
        download(&url, &plan.tarball)?;
    }
    if let Some(s) = slot {
        enter_slot(&lane, s)?;
    }
    let report = nixboot::ensure(&plan, &version, &system, &flywheel_agent::reaper::Unreaped)?;
    let mut out = std::io::stdout().lock();
    if summary_only {
        let _ = writeln!(out, "{}", report.summary());
        return Ok(());
    }
    let _ = writeln!(out, "{}", report.summary());
    let _ = writeln!(
        out,
        "store: {}/store ({})",
        plan.nix_root.display(),
        report.warmth()
    );
    let _ = writeln!(out, "nix.conf: {}", plan.conf_file.display());
    let _ = writeln!(
        out,
        "receipt: {}",
        nixboot::receipt_path(&plan.nix_root).display()
    );
    Ok(())
}

/// Fetch a release tarball (verification happens after, before anything is unpacked).
fn download(url: &str, to: &std::path::Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let resp = reqwest::Client::builder()
            .use_rustls_tls()
            .build()?
            .get(url)
            .send()
            .await?
            .error_for_status()?;
        let bytes = resp.bytes().await?;
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = to.with_extension("partial");
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(&tmp, to)?;
        tracing::info!(url, bytes = bytes.len(), to = %to.display(), "downloaded the nix tarball");
        Ok(())
    })
}

/// Exit status and message of a one-shot command: 78 and the message alone for a bad
/// config, 1 and `flywheel: …` otherwise.
fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<config::ConfigError>().is_some() => {
            eprintln!("{e}");
            ExitCode::from(exit::CONFIG)
        }
        Err(e) => {
            eprintln!("flywheel: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn mint_token(
    config: Option<PathBuf>,
    cache: &str,
    sub: &str,
    validity: &str,
    push: bool,
    host: &HostFacts,
) -> anyhow::Result<()> {
    let cfg = config::load(config.as_deref(), host)?;
    let key_file = cfg
        .attic
        .signing_key_file
        .as_ref()
        .context("attic.signing_key_file is not configured")?;
    let key = flywheel_agent::attic::SigningKey::load(key_file)?;
    let validity = flywheel_agent::size::parse_duration(validity).context("--validity")?;
    let token = flywheel_agent::attic::mint(
        &key,
        &flywheel_agent::attic::TokenRequest {
            cache: cache.to_owned(),
            sub: sub.to_owned(),
            validity,
            push,
        },
    )?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", token.expose());
    Ok(())
}

/// `attic publish`: what the agent does after a trusted job, by hand.
fn publish(
    config: Option<PathBuf>,
    lane: &str,
    paths: &[String],
    host: &HostFacts,
) -> anyhow::Result<()> {
    use flywheel_agent::publish;
    let cfg = config::load(config.as_deref(), host)?;
    let lane = lane_named(&cfg, lane)?;
    let (Some(server), Some(cache)) = (&lane.hints.attic_server, &lane.hints.attic_cache) else {
        anyhow::bail!("lane {:?} has no attic_server and attic_cache", lane.name);
    };
    let auth = flywheel_agent::job::AtticCredential::load(&cfg.attic)
        .map_err(|e| anyhow::anyhow!(e))?
        .publish_auth()
        .context("set attic.signing_key_file (or push_token_file) to publish")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let found = rt.block_on(publish::to_publish(
        &lane.nix_store,
        paths,
        &cfg.attic.upstream_keys,
    ))?;
    let p = publish::Publisher {
        http: reqwest::Client::new(),
        server: server.clone(),
        cache: cache.clone(),
        auth,
        sub: format!("flywheel:publish:{}", lane.name),
        limits: publish::Limits::default(),
    };
    let done = rt.block_on(p.publish(&found, &lane.nix_store))?;
    let peak_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{} (peak RSS {} KiB)",
        publish::line(&done, server, cache),
        peak_kib
    );
    if !done.failed.is_empty() {
        anyhow::bail!(
            "{} of the paths were not published (named above); the others were",
            done.failed.len()
        );
    }
    Ok(())
}

fn status(config: Option<PathBuf>, json: bool, host: &HostFacts) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let cfg = config::load(config.as_deref(), host)?;
    let path = flywheel_agent::telemetry::control_socket(&cfg.agent.state_dir);
    let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "no agent is answering on {} (is `flywheel-agent run` running, and are you root?)",
            path.display()
        )
    })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let mut out = std::io::stdout().lock();
    if json {
        let _ = write!(out, "{line}");
        return Ok(());
    }
    let st: flywheel_agent::telemetry::Status =
        serde_json::from_str(&line).context("the agent's answer")?;
    let _ = writeln!(out, "mode: {}", st.mode);
    for l in &st.lanes {
        let _ = writeln!(
            out,
            "{} ({} envelope, {} of {} runners)",
            l.name,
            Bytes(l.memory_bytes),
            l.runners.len(),
            l.max_runners
        );
        for r in &l.runners {
            let mem = r.memory_current_bytes.map_or_else(
                || "-".to_owned(),
                |m| format!("{} of {}", Bytes(m), Bytes(r.envelope_bytes)),
            );
            let _ = writeln!(
                out,
                "  {:<40} {:<11} {:>24}  {}s  {}",
                r.name,
                r.state,
                mem,
                r.age_seconds,
                r.job.as_deref().unwrap_or("-")
            );
        }
        for sl in &l.slots {
            let _ = writeln!(
                out,
                "  slot {:<3} {:>7} paths {:>12}  last used {:<12} {}",
                sl.index,
                sl.paths,
                Bytes(sl.bytes).to_string(),
                sl.last_used_unix
                    .map_or_else(|| "never".to_owned(), |t| t.to_string()),
                sl.holder.as_deref().map_or("free", |h| h)
            );
        }
    }
    for v in &st.verdicts {
        let _ = writeln!(out, "verdict ({}, {}): {}", v.lane, v.runner, v.text);
    }
    Ok(())
}

/// SIGINT/SIGTERM, escalating: the first cancels `drain`, the second `stop`, the third `kill`.
fn watch_signals(bg: &flywheel_agent::tasks::Background) -> anyhow::Result<Shutdown> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let shutdown = Shutdown::default();
    let s = shutdown.clone();
    bg.spawn_service(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            seen += 1;
            match seen {
                1 => {
                    tracing::warn!("signal received: stopping gracefully (send another to hurry)");
                    s.drain.cancel();
                }
                2 => {
                    tracing::warn!("second signal: stopping now");
                    s.stop.cancel();
                }
                _ => s.kill.cancel(),
            }
        }
    });
    Ok(shutdown)
}

/// A configuration problem found before `run` changes anything: exit 78.
#[derive(Debug)]
struct ConfigProblem(String);

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigProblem {}

fn github_client(cfg: &Config) -> anyhow::Result<Client> {
    let Some(g) = &cfg.github else {
        return Err(ConfigProblem(format!(
            "{}: `run` needs a [github] section (or ACTIONS_RUNNER_INPUT_JITCONFIG from ARC)",
            cfg.origin
        ))
        .into());
    };
    let credentials = match &g.auth {
        config::GitHubAuth::App {
            app_id,
            installation_id,
            private_key_file,
            ..
        } => Credentials::App {
            app_id: app_id.clone(),
            installation_id: *installation_id,
            private_key_pem: Secret::new(
                std::fs::read(private_key_file)
                    .with_context(|| format!("read {}", private_key_file.display()))?,
            ),
        },
        config::GitHubAuth::Token { token_file, .. } => Credentials::Token(Secret::new(
            std::fs::read_to_string(token_file)
                .with_context(|| format!("read {}", token_file.display()))?
                .trim()
                .to_owned(),
        )),
    };
    Ok(Client::new(ClientConfig {
        api_url: g.api_url.clone(),
        scope: g.scope.clone(),
        credentials,
        user_agent: format!("flywheel-agent/{}", env!("CARGO_PKG_VERSION")),
        retry: RetryPolicy::default(),
    })
    .map_err(|e| ConfigProblem(e.to_string()))?)
}

fn run(config: Option<PathBuf>, host: &HostFacts, jit: Option<Secret<String>>) -> ExitCode {
    match run_inner(config, host, jit) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e)
            if e.downcast_ref::<config::ConfigError>().is_some()
                || e.downcast_ref::<ConfigProblem>().is_some() =>
        {
            eprintln!("{e}");
            ExitCode::from(exit::CONFIG)
        }
        Err(e) => {
            eprintln!("flywheel: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Raise the soft descriptor limit to the hard one: sockets of many runners' hooks and jobs'
/// pipes must not run the agent out of descriptors.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

fn run_inner(
    config: Option<PathBuf>,
    host: &HostFacts,
    jit: Option<Secret<String>>,
) -> anyhow::Result<i32> {
    let cfg = config::load(config.as_deref(), host)?;
    if jit.is_none() {
        // A pool's runners would share one network: `pod` is an ARC pod's, one job each.
        if let Some(l) = cfg.lanes.iter().find(|l| l.network == Network::Pod) {
            return Err(ConfigProblem(format!(
                "{}: lane {:?} has network = \"pod\", the network of an ARC runner pod (one job per pod); `run` keeps a pool of runners here, whose jobs would share it: use network = \"isolated\" (or run the agent as an ARC pod's entrypoint)",
                cfg.origin, l.name
            ))
            .into());
        }
    }
    config::check_host(&cfg)?;
    // Every slot's user exists and cannot become root, before anything starts.
    for lane in &cfg.lanes {
        for slot in 0..lane.max_runners {
            let name = cfg.slot_user(&lane.name, slot);
            JobUser::lookup(&name, &cfg.runner.groups)
                .and_then(|u| u.refuse_owning(&[&cfg.runner.install_dir]))
                .map_err(|e| ConfigProblem(format!("{}: runner.user: {e}", cfg.origin)))?;
        }
    }
    let listener = cfg.runner.install_dir.join("bin/Runner.Listener");
    if !listener.is_file() {
        return Err(ConfigProblem(format!(
            "{}: runner.install_dir {} has no bin/Runner.Listener: unpack an actions/runner release there",
            cfg.origin,
            cfg.runner.install_dir.display()
        ))
        .into());
    }
    let arc_lane = match &jit {
        Some(_) => {
            let name = std::env::var("FLYWHEEL_LANE")
                .ok()
                .or(cfg.runner.lane.clone())
                .ok_or_else(|| {
                    ConfigProblem(format!(
                        "{}: ARC mode needs the runner's lane: set FLYWHEEL_LANE or runner.lane",
                        cfg.origin
                    ))
                })?;
            let lane = cfg
                .lane(&name)
                .cloned()
                .ok_or_else(|| ConfigProblem(format!("{}: no lane {name:?}", cfg.origin)))?;
            if let Some(why) = &lane.unavailable {
                return Err(ConfigProblem(why.clone()).into());
            }
            Some(lane)
        }
        None => None,
    };
    // Pool mode needs GitHub; ARC mode uses it, when configured, only to decide trust.
    let github = match (&jit, &cfg.github) {
        (None, _) | (Some(_), Some(_)) => Some(std::sync::Arc::new(github_client(&cfg)?)),
        (Some(_), None) => None,
    };
    raise_fd_limit();
    let attic = flywheel_agent::job::AtticCredential::load(&cfg.attic)
        .map_err(|e| ConfigProblem(format!("{}: {e}", cfg.origin)))?;
    let bazel = flywheel_agent::bazel::upstreams(
        cfg.lanes
            .iter()
            .filter_map(|l| Some((l.name.as_str(), l.bazel.as_ref()?))),
    )
    .map_err(|e| ConfigProblem(format!("{}: {e}", cfg.origin)))?;
    let hook_scripts = flywheel_agent::hooks::write_hook_scripts(&cfg.agent.state_dir)
        .context("cannot write the runner hook scripts")?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let reaper = Reaper::start().context("cannot watch child processes")?;
        let background = flywheel_agent::tasks::Background::new();
        let shutdown = watch_signals(&background)?;
        // A host whose cgroups cannot hold a job will not heal by a restart: exit 78, which
        // the unit's RestartPreventExitStatus honours.
        let mgr = cgroup::detect(&cfg.cgroup.mount, cfg.cgroup.parent.as_deref())
            .map_err(|e| ConfigProblem(format!("this host cannot run jobs: {e}")))?;
        let telemetry = std::sync::Arc::new(flywheel_agent::telemetry::Telemetry::new(
            &cfg.lanes,
            if jit.is_some() { "arc" } else { "pool" },
        ));
        if let Some(addr) = cfg.metrics.listen {
            flywheel_agent::telemetry::serve_metrics(addr, telemetry.clone(), github.clone(), &background)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}: set [metrics] listen to a free address, or \"\" to turn metrics off"))?;
        }
        flywheel_agent::telemetry::serve_control(flywheel_agent::telemetry::control_socket(&cfg.agent.state_dir), telemetry.clone(), &background)
            .await
            .context("cannot open the control socket")?;
        let ctx = RunContext {
            cfg: std::sync::Arc::new(cfg),
            mgr: std::sync::Arc::from(mgr),
            reaper,
            host: *host,
            telemetry,
            github: github.clone(),
            attic,
            bazel,
            hook_scripts,
            background: background.clone(),
        };
        let pool_github = if arc_lane.is_some() { None } else { github };
        let result = match (jit, arc_lane, pool_github) {
            (Some(jit), Some(lane), _) => {
                let outcome = runner::run_arc(ctx, jit, &lane, shutdown).await?;
                if let Some(v) = outcome.report.oom_verdict() {
                    eprintln!("{v}");
                }
                tracing::info!(
                    code = outcome.code,
                    "listener exited; the pod exits with its status"
                );
                Ok(outcome.code)
            }
            (_, _, Some(github)) => {
                let stats = std::sync::Arc::new(PoolStats::default());
                let notifier = flywheel_agent::notify::Notifier::from_env();
                notifier.spawn_watchdog(&background, stats.heartbeat.clone());
                let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
                {
                    let (n, drain) = (notifier.clone(), shutdown.drain.clone());
                    background.spawn_service(async move {
                        if ready_rx.await.is_ok() {
                            n.send("READY=1\nSTATUS=runners registered");
                        }
                        drain.cancelled().await;
                        n.send("STOPPING=1\nSTATUS=draining");
                    });
                }
                runner::run_pool(ctx, github.clone(), shutdown, Some(ready_tx), stats.clone())
                    .await?;
                let reg = stats.registered.load(std::sync::atomic::Ordering::Relaxed);
                let launch = stats.launch_us.load(std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    registered = reg,
                    finished = stats.finished.load(std::sync::atomic::Ordering::Relaxed),
                    github_calls = github.stats().requests().values().sum::<u64>(),
                    generate_jitconfig_calls = github.stats().count("generate-jitconfig"),
                    mean_launch_ms = if reg > 0 {
                        launch as f64 / reg as f64 / 1000.0
                    } else {
                        0.0
                    },
                    "stopped after a clean drain"
                );
                Ok(0)
            }
            _ => Err(ConfigProblem("nothing to run".into()).into()),
        };
        // The servers, the watchers and whatever pump is still reading: ended and awaited.
        let left = background.close(std::time::Duration::from_secs(5)).await;
        if left > 0 {
            tracing::warn!(tasks = left, "background tasks still running 5 s after the stop; leaving them");
        }
        result
    })
}
