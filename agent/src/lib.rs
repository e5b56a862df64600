//! flywheel-agent: runs self-hosted GitHub Actions runners for Nix builds, each job inside a
//! memory envelope of its lane. See `docs/ARCHITECTURE.md` for the map.

pub mod accept;
pub mod advisory;
pub mod attic;
pub mod bazel;
pub mod buildmem;
pub mod cgroup;
pub mod config;
pub mod envelope;
pub mod hints;
pub mod hooks;
pub mod idrange;
pub mod job;
pub mod jobuser;
pub mod nar;
pub mod narinfo;
pub mod netns;
pub mod nixboot;
pub mod notify;
pub mod publish;
pub mod ready;
pub mod reaper;
pub mod receipt;
pub mod reconcile;
pub mod report;
pub mod runner;
pub mod scratch;
pub mod size;
pub mod slot;
pub mod store;
pub mod summary;
pub mod tasks;
pub mod telemetry;
pub mod timeline;
pub mod trust;
pub mod verdict;
pub mod workdir;

/// Exit statuses of the agent itself.
pub mod exit {
    /// The agent (not the command) failed: config, cgroup, scratch (docker's convention).
    pub const AGENT_FAILED: u8 = 125;
    /// The command exists but cannot be executed.
    pub const NOT_EXECUTABLE: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
    /// sysexits EX_USAGE.
    pub const USAGE: u8 = 64;
    /// sysexits EX_CONFIG: the configuration is invalid.
    pub const CONFIG: u8 = 78;
}
