//! A runner job: its life from registration to deregistration, ordered in one place
//! ([`lifecycle`]), and what it answers its hooks.
//!
//! - `lifecycle.rs`: the phases in order, behind the [`lifecycle::World`] seam, unit-tested
//!   against a fake;
//! - `agent.rs`: the agent's world (GitHub, the host, the envelope, telemetry);
//! - `host.rs`: the hook socket directory and the job's netrc, up and down;
//! - `spec.rs`: the listener's envelope job (its `.env`, hooks, store);
//! - `answers.rs`: the per-job answers and what they owe after the job (leftovers);
//! - `started.rs`: trust, the store, credentials; `completed.rs`: publishing, the summary;
//! - `report.rs`: the job's report as far as it got; `credential.rs`: the agent's Attic
//!   credential.
//!
//! The socket itself is `crate::hooks`: a transport that turns requests into
//! [`crate::hooks::HookEvent`]s for the lifecycle.

use std::sync::Arc;

use flywheel_jit_config::Client;

use crate::cgroup::CgroupManager;
use crate::config::{Config, HostFacts};
use crate::reaper::Reaper;

pub mod agent;
mod answers;
mod completed;
mod credential;
mod host;
pub mod lifecycle;
mod report;
mod spec;
mod started;

pub use agent::RegisterError;
pub use answers::{Leftover, RunnerHooks};
pub use credential::{AtticCredential, CredentialError};
pub use spec::runner_dotenv;

/// Everything a runner needs, shared by the pool.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub cfg: Arc<Config>,
    pub mgr: Arc<dyn CgroupManager>,
    pub reaper: Reaper,
    pub host: HostFacts,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// For trust decisions (and, in pool mode, registration).
    pub github: Option<Arc<Client>>,
    pub attic: AtticCredential,
    /// Each lane's Bazel upstream (lanes with `[lane.bazel]`), credentials read at start.
    pub bazel: crate::bazel::Upstreams,
    /// The root-owned hook scripts (job-started, job-completed).
    pub hook_scripts: (std::path::PathBuf, std::path::PathBuf),
    /// Every background task of the agent (hook servers, log pumps, watchers).
    pub background: crate::tasks::Background,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The runner's hook socket directory or netrc could not be made.
    #[error("runner hooks: {0}")]
    Hooks(std::io::Error),
    /// Its receipt could not be written.
    #[error(transparent)]
    Receipt(#[from] crate::receipt::ReceiptError),
    /// Under ARC: the agent was drained before its one runner ran.
    #[error("drained before it ran")]
    Drained,
    #[error(transparent)]
    Register(#[from] RegisterError),
    #[error(transparent)]
    Envelope(#[from] crate::envelope::EnvelopeError),
    #[error("the JIT config handed to this pod is unusable: {0}")]
    JitConfig(flywheel_jit_config::jitfile::JitFileError),
    /// A fake's failure (the lifecycle's order tests).
    #[cfg(test)]
    #[error("{0}")]
    Fake(&'static str),
}

/// Per-pool counters, for tests and the closing numbers.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Unix ms of the pool loop's last turn (the watchdog's evidence of life).
    pub heartbeat: Arc<std::sync::atomic::AtomicU64>,
    /// Registrations that failed.
    pub registration_failures: std::sync::atomic::AtomicU64,
    pub registered: std::sync::atomic::AtomicU64,
    pub finished: std::sync::atomic::AtomicU64,
    /// Microseconds from a JIT config received to its listener started, summed.
    pub launch_us: std::sync::atomic::AtomicU64,
}

/// `<prefix>-<lane>-<6 hex>`: unique per attempt.
pub fn runner_name(prefix: &str, lane: &str) -> String {
    format!("{prefix}-{lane}-{:06x}", fastrand::u32(..0x100_0000))
}
