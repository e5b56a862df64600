//! Configuration: parsed once, by a pure function, before anything on the host changes.
//!
//! [`parse`] takes the document's text, where it came from and the host's facts, and returns a
//! validated [`Config`] or a [`ConfigError`] that points at `FILE:LINE:COL`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::size::{parse_duration, parse_size, Bytes};

/// The embedded defaults: the platform's lanes.
pub const DEFAULT_CONFIG: &str = include_str!("defaults.toml");

/// Where a configuration document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The defaults compiled into the binary.
    Embedded,
    /// A file given by `--config` or `FLYWHEEL_CONFIG`.
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Embedded => f.write_str("<embedded defaults>"),
            Origin::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// What the configuration is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// Memory the host (or the agent's own cgroup) can give jobs, in bytes.
    pub memory_bytes: u64,
    /// CPUs the agent may use.
    pub cpus: u32,
}

impl HostFacts {
    /// Read the facts from this host: `MemTotal` from `/proc/meminfo`, available parallelism.
    pub fn detect() -> HostFacts {
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| meminfo_total(&s))
            .unwrap_or(u64::MAX);
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        HostFacts { memory_bytes, cpus }
    }
}

fn meminfo_total(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// A configuration that was rejected, with where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub origin: String,
    /// 1-based line and column, when the error has a place in the document.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.origin, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

/// Runtime hints a lane injects into its jobs' environment. `None` means absent.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Hints {
    pub attic_server: Option<String>,
    pub attic_cache: Option<String>,
    pub attic_public_key: Option<String>,
    pub bazel_remote_cache: Option<String>,
    pub nix_extra_conf: Option<String>,
}

/// One runner lane.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lane {
    pub name: String,
    pub labels: Vec<String>,
    /// The job's memory envelope, bytes.
    pub memory_bytes: u64,
    pub max_runners: u32,
    pub pids_max: u64,
    pub work_root: PathBuf,
    pub nix_store: PathBuf,
    /// The lane's fast-local volume holding one `slot-N/{nix,work}` per runner slot. Its
    /// locks are on the volume itself, so agents in different pods of one node share it.
    pub slot_root: Option<PathBuf>,
    /// How many slots `slot_root` holds (default `max_runners`): under ARC, the slots per node
    /// (at least the lane's pods per node).
    pub slots: u32,
    /// A slot's store is garbage-collected after a job when it holds more than this.
    pub slot_max_bytes: Option<u64>,
    /// Free space the fast-local check demands on the work root and the nix store.
    pub min_free_bytes: u64,
    /// CPUs a job of this lane may use for `cores`/`max-jobs`; the host's CPUs when unset.
    pub cpus: Option<u32>,
    /// Memory one parallel Nix build is assumed to need when deriving `max-jobs`.
    pub memory_per_build_bytes: u64,
    /// cgroup v2 `memory.oom.group`: kill the whole job on OOM instead of one process.
    pub oom_group: bool,
    pub hints: Hints,
    /// Jobs get Nix: bootstrapped or verified before the job, and a nix-daemon of their own
    /// inside the job's cgroup.
    pub nix: bool,
    /// The `nix.conf` this lane's daemons read: `/etc/nix/nix.conf` when one lane uses Nix,
    /// else `/etc/nix/flywheel/<lane>/nix.conf`, so lanes never fight over one file.
    pub nix_conf: PathBuf,
    /// Why this lane cannot run on this host (embedded defaults only; a file is rejected).
    pub unavailable: Option<String>,
    /// Variables of the agent's environment its jobs get besides the fixed base (`PATH`,
    /// `LANG`, `LC_*`, `TZ`, `TERM`), e.g. a proxy.
    pub pass_env: Vec<String>,
    /// The network its jobs (and their nix-daemons) get.
    pub network: Network,
    /// The lane's Bazel remote cache, served to each job through an endpoint of its own.
    pub bazel: Option<crate::bazel::BazelSettings>,
}

/// A lane's network: `isolated` (the default: a network namespace per job, egress through
/// the host's NAT, nothing on the host or in other jobs reachable), `host` (the host's
/// network namespace, shared with every other job and the agent) or `pod` (the agent's own
/// network namespace, which is the job's alone: an ARC runner pod runs one job; `run` with a
/// pool of runners refuses it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Network {
    Isolated {
        /// Link-local addresses (`169.254.0.0/16`, a cloud's metadata service) are reachable.
        allow_metadata: bool,
        /// The job's nameservers; the host's (not on its loopback) when empty.
        dns: Vec<std::net::Ipv4Addr>,
    },
    Host,
    Pod,
}

impl Network {
    /// Whether the job's network namespace is its own (no other job shares its loopback).
    pub fn is_the_jobs_own(&self) -> bool {
        !matches!(self, Network::Host)
    }
}

impl Config {
    /// Files that hold the agent's secrets (the App key or token, Attic's signing key or push
    /// token, Bazel caches' credentials): hidden from every job's daemon.
    pub fn secret_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = Vec::new();
        if let Some(g) = &self.github {
            v.push(match &g.auth {
                GitHubAuth::App {
                    private_key_file, ..
                } => private_key_file.clone(),
                GitHubAuth::Token { token_file, .. } => token_file.clone(),
            });
        }
        v.extend(self.attic.signing_key_file.iter().cloned());
        v.extend(self.attic.push_token_file.iter().cloned());
        for b in self.lanes.iter().filter_map(|l| l.bazel.as_ref()) {
            v.extend(b.read_credential_file.iter().cloned());
            v.extend(b.write_credential_file.iter().cloned());
        }
        v
    }
}

impl Lane {
    /// Runner users this lane needs: one per slot, and on a slot lane one more for a job that
    /// found every node-local slot busy and runs on a pod-local store.
    pub fn user_slots(&self) -> u32 {
        match self.slot_root {
            Some(_) => self.slots + 1,
            None => self.max_runners,
        }
    }
}

/// How Nix is installed and configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NixSettings {
    /// The pinned release tarball on local disk; default
    /// `/var/lib/flywheel-agent/nix/<file name of the pinned URL>`.
    pub tarball: Option<PathBuf>,
    /// Override the pinned sha256 (a tarball from a mirror of another pinned version).
    pub sha256: Option<String>,
    /// Override the pinned version (goes with `sha256`).
    pub version: Option<String>,
    /// The netrc file the daemons read cache credentials from (root-only).
    pub netrc_file: PathBuf,
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
    pub sandbox: bool,
    /// The build-user lock directory every per-job daemon shares (bound at
    /// `<nix_store>/var/nix/userpool`), so that daemons of different stores (slots) never pick
    /// the same `nixbld` user and kill each other's builds.
    pub userpool: PathBuf,
    /// Advisories (`advisory`) the operator accepts for the installed Nix: a job's
    /// daemon starts on an affected release only when each advisory that affects it is here.
    pub acknowledged_advisories: Vec<String>,
}

/// cache.nixos.org's public key (its `trusted-public-keys` entry).
pub const CACHE_NIXOS_ORG_KEY: &str =
    "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

impl Default for NixSettings {
    fn default() -> Self {
        NixSettings {
            tarball: None,
            sha256: None,
            version: None,
            netrc_file: PathBuf::from("/etc/nix/netrc"),
            substituters: vec!["https://cache.nixos.org".into()],
            trusted_public_keys: vec![CACHE_NIXOS_ORG_KEY.into()],
            sandbox: true,
            userpool: PathBuf::from("/nix/var/nix/userpool"),
            acknowledged_advisories: Vec::new(),
        }
    }
}

/// How the agent reaches GitHub (`run` in bare-metal mode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitHubSettings {
    pub api_url: String,
    pub scope: flywheel_jit_config::Scope,
    pub auth: GitHubAuth,
    pub runner_group_id: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GitHubAuth {
    App {
        app_id: String,
        installation_id: Option<u64>,
        private_key_file: PathBuf,
        /// Where `private_key_file` is in the config, for errors found when reading it.
        position: Option<(usize, usize)>,
    },
    Token {
        token_file: PathBuf,
        position: Option<(usize, usize)>,
    },
}

/// The runner installation and how runners are run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerSettings {
    /// Holds `bin/Runner.Listener`.
    pub install_dir: PathBuf,
    /// The unprivileged users runners run as: a pool such as `runner-{n}`, where `{n}` is the
    /// host-wide index of the runner slot ([`Config::slot_user`]), so concurrent jobs never
    /// share a uid. A name without `{n}` is allowed only where one runner runs at a time.
    pub user: String,
    /// Supplementary groups a job keeps (the operator's list); every other group of the user
    /// is dropped. Groups that grant root (`sudo`, `docker`, …) are refused.
    pub groups: Vec<String>,
    /// Runner names are `<prefix>-<lane>-<random>`; the host name when unset.
    pub name_prefix: Option<String>,
    /// How long busy runners get to finish their job when the agent drains.
    pub drain_grace: Duration,
    /// First wait after a runner failed; doubles per failure, at most 5 minutes.
    pub backoff: Duration,
    /// The lane of an ARC pod's runner (`FLYWHEEL_LANE` overrides).
    pub lane: Option<String>,
}

/// Who may publish to Attic, and with what credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtticSettings {
    /// The Attic server's signing key (HS256 base64 secret or RSA PEM): per-job tokens.
    pub signing_key_file: Option<PathBuf>,
    /// Without the signing key: a static push token, handed only to trusted jobs.
    pub push_token_file: Option<PathBuf>,
    /// The cache is public: untrusted jobs get no token at all (else a pull-only one).
    pub public: bool,
    /// `OWNER/REPO`s that may publish.
    pub publish_repositories: Vec<String>,
    /// Events trusted on the default branch (default `push`; `workflow_dispatch` and
    /// `schedule` are opt-in; `pull_request*` and `merge_group` are never trusted).
    pub trusted_events: Vec<String>,
    /// A token's lifetime: the longest a job of these lanes runs.
    pub token_validity: Duration,
    /// The agent publishes what a trusted job's daemon built (default on): no job process ever
    /// holds a push credential.
    pub publish: bool,
    /// Also publish what an OOM-killed job finished building (default on: the next attempt is
    /// faster).
    pub publish_after_oom: bool,
    /// Paths with a signature that verifies under one of these keys (`name:base64`, as in
    /// `trusted-public-keys`) are the cache's upstream's: not published.
    pub upstream_keys: Vec<crate::narinfo::PublicKey>,
    /// Hand trusted jobs a push token too (default off; for workflows that run `attic push`
    /// themselves), valid at most 1 hour.
    pub push_token_to_jobs: bool,
}

/// Where `/metrics` is served (`run`, ARC mode); `None` turns it off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsSettings {
    pub listen: Option<std::net::SocketAddr>,
}

/// Agent-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentSettings {
    /// Runtime state: slot locks.
    pub state_dir: PathBuf,
    /// How long a job's processes get between SIGTERM and the cgroup kill.
    pub teardown_grace: Duration,
    /// How long a job's whole teardown may take (grace, kill, drain, removal); past it the
    /// job's leftovers are reported and its slot is marked unusable.
    pub teardown_deadline: Duration,
    /// How long a job stopped by a signal to the agent gets before the cgroup kill.
    pub stop_grace: Duration,
    /// Memory kept free for the agent itself when admitting runners.
    pub reserve_bytes: u64,
}

/// Where job cgroups live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSettings {
    /// The cgroup filesystem mount (normally `/sys/fs/cgroup`).
    pub mount: PathBuf,
    /// The parent cgroup of the agent's job subtree, as a path inside the hierarchy; the
    /// agent's own cgroup when unset.
    pub parent: Option<String>,
}

/// The longest `agent.state_dir`: `<state_dir>/hook-sockets/<16 hex>/socket` must fit in a
/// socket address (107 bytes and a NUL).
pub const MAX_STATE_DIR: usize = 107 - "/hook-sockets/0123456789abcdef/socket".len();

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub origin: Origin,
    pub agent: AgentSettings,
    pub cgroup: CgroupSettings,
    pub github: Option<GitHubSettings>,
    pub runner: RunnerSettings,
    pub nix: NixSettings,
    pub metrics: MetricsSettings,
    pub attic: AtticSettings,
    pub lanes: Vec<Lane>,
}

impl Config {
    /// The lane called `name`.
    pub fn lane(&self, name: &str) -> Option<&Lane> {
        self.lanes.iter().find(|l| l.name == name)
    }

    /// Memory kept free for the agent when admitting runners: `agent.reserve`, and what the
    /// lanes' Bazel `memory_cache`s may hold (the agent's own memory, outside every envelope).
    pub fn admission_reserve_bytes(&self) -> u64 {
        self.lanes
            .iter()
            .filter_map(|l| l.bazel.as_ref())
            .fold(self.agent.reserve_bytes, |sum, b| {
                sum.saturating_add(b.memory_cache_bytes)
            })
    }

    /// The user a runner in `slot` of `lane` runs as: `runner.user` with `{n}` replaced by
    /// the slot's host-wide index (the lanes' slots numbered one after another in config
    /// order), so no two runners that may run at once share a uid.
    pub fn slot_user(&self, lane: &str, slot: u32) -> String {
        let offset: u32 = self
            .lanes
            .iter()
            .take_while(|l| l.name != lane)
            .map(Lane::user_slots)
            .sum();
        self.runner
            .user
            .replace("{n}", &(offset + slot).to_string())
    }

    /// The embedded defaults for this host.
    pub fn embedded(host: &HostFacts) -> Result<Config, ConfigError> {
        parse(DEFAULT_CONFIG, &Origin::Embedded, host)
    }
}

// ---- raw document -------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    agent: RawAgent,
    #[serde(default)]
    cgroup: RawCgroup,
    github: Option<RawGitHub>,
    #[serde(default)]
    runner: RawRunner,
    #[serde(default)]
    nix: RawNix,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    attic: RawAttic,
    #[serde(default)]
    lane: Option<Vec<RawLane>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttic {
    signing_key_file: Option<Spanned<PathBuf>>,
    push_token_file: Option<Spanned<PathBuf>>,
    public: Option<bool>,
    publish_repositories: Option<Vec<Spanned<String>>>,
    trusted_events: Option<Vec<Spanned<String>>>,
    token_validity: Option<Spanned<String>>,
    publish: Option<bool>,
    publish_after_oom: Option<bool>,
    upstream_keys: Option<Vec<Spanned<String>>>,
    push_token_to_jobs: Option<Spanned<bool>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNix {
    tarball: Option<Spanned<PathBuf>>,
    sha256: Option<Spanned<String>>,
    version: Option<String>,
    netrc_file: Option<Spanned<PathBuf>>,
    substituters: Option<Vec<String>>,
    trusted_public_keys: Option<Vec<String>>,
    sandbox: Option<bool>,
    userpool: Option<Spanned<PathBuf>>,
    acknowledged_advisories: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGitHub {
    api_url: Option<Spanned<String>>,
    scope: Spanned<String>,
    target: Spanned<String>,
    app_id: Option<Spanned<toml::Value>>,
    installation_id: Option<u64>,
    private_key_file: Option<Spanned<PathBuf>>,
    token_file: Option<Spanned<PathBuf>>,
    runner_group_id: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRunner {
    install_dir: Option<Spanned<PathBuf>>,
    user: Option<Spanned<String>>,
    groups: Option<Vec<Spanned<String>>>,
    name_prefix: Option<Spanned<String>>,
    drain_grace: Option<Spanned<String>>,
    backoff: Option<Spanned<String>>,
    lane: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    state_dir: Option<Spanned<PathBuf>>,
    teardown_grace: Option<Spanned<String>>,
    teardown_deadline: Option<Spanned<String>>,
    stop_grace: Option<Spanned<String>>,
    reserve: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCgroup {
    mount: Option<Spanned<PathBuf>>,
    parent: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLane {
    name: Spanned<String>,
    labels: Option<Spanned<Vec<Spanned<String>>>>,
    memory: Spanned<String>,
    max_runners: Option<Spanned<u32>>,
    pids_max: Option<Spanned<u64>>,
    work_root: Option<Spanned<PathBuf>>,
    nix_store: Option<Spanned<PathBuf>>,
    slot_root: Option<Spanned<PathBuf>>,
    slots: Option<Spanned<u32>>,
    slot_max_size: Option<Spanned<String>>,
    min_free: Option<Spanned<String>>,
    cpus: Option<Spanned<u32>>,
    memory_per_build: Option<Spanned<String>>,
    oom_group: Option<bool>,
    nix: Option<bool>,
    nix_conf: Option<Spanned<PathBuf>>,
    pass_env: Option<Vec<Spanned<String>>>,
    network: Option<Spanned<String>>,
    allow_metadata: Option<Spanned<bool>>,
    dns: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    hints: RawHints,
    bazel: Option<Spanned<crate::bazel::conf::RawBazel>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHints {
    attic_server: Option<Spanned<String>>,
    attic_cache: Option<Spanned<String>>,
    attic_public_key: Option<Spanned<String>>,
    bazel_remote_cache: Option<Spanned<String>>,
    nix_extra_conf: Option<Spanned<String>>,
}

const DEFAULT_MAX_RUNNERS: u32 = 1;
/// One user per concurrently running job: `runner-0`, `runner-1`, … (see `systemd/*.sysusers.conf`).
const DEFAULT_RUNNER_USER: &str = "runner-{n}";
/// Groups whose members can become root (sudoers defaults, the docker/lxd sockets, raw disks).
pub const ROOT_GROUPS: [&str; 11] = [
    "root", "sudo", "wheel", "admin", "adm", "docker", "podman", "lxd", "incus", "libvirt", "disk",
];
/// Events outsiders cannot trigger with code of their own; only these may publish.
const TRUSTABLE_EVENTS: [&str; 3] = ["push", "workflow_dispatch", "schedule"];
/// A token outlives its files (a copy stays valid): keep its lifetime short.
const MAX_TOKEN_VALIDITY: Duration = Duration::from_secs(6 * 3600);
const DEFAULT_PIDS_MAX: u64 = 16384;
const DEFAULT_MIN_FREE: u64 = 2 << 30;
const DEFAULT_MEMORY_PER_BUILD: u64 = 2 << 30;

struct Ctx<'a> {
    origin: &'a Origin,
    src: &'a str,
}

impl Ctx<'_> {
    fn err_at(&self, offset: Option<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            origin: self.origin.to_string(),
            position: offset.map(|o| line_col(self.src, o)),
            message: message.into(),
        }
    }
    fn err<T>(&self, s: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.err_at(Some(s.span().start), message)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = src.get(..offset).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let col = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, col)
}

/// Parse and validate a configuration document. Pure: reads nothing, changes nothing.
pub fn parse(src: &str, origin: &Origin, host: &HostFacts) -> Result<Config, ConfigError> {
    let cx = Ctx { origin, src };
    let raw: RawConfig = toml::from_str(src).map_err(|e| {
        let msg = e.message().trim().to_owned();
        cx.err_at(Some(e.span().map_or(0, |s| s.start)), msg)
    })?;

    let state_dir_at = raw.agent.state_dir.as_ref().map(|s| s.span().start);
    let state_dir = raw
        .agent
        .state_dir
        .map(Spanned::into_inner)
        .unwrap_or_else(|| PathBuf::from("/run/flywheel-agent"));
    let len = state_dir.as_os_str().len();
    if len > MAX_STATE_DIR {
        return Err(cx.err_at(
            state_dir_at,
            format!("agent.state_dir is {len} bytes long, and the sockets the agent makes under it (`<state_dir>/hook-sockets/<16 hex>/socket`) must fit in 107: choose a path of at most {MAX_STATE_DIR} bytes"),
        ));
    }
    let agent = AgentSettings {
        state_dir,
        teardown_grace: duration_or(&cx, raw.agent.teardown_grace.as_ref(), "5s")?,
        teardown_deadline: duration_or(&cx, raw.agent.teardown_deadline.as_ref(), "60s")?,
        stop_grace: duration_or(&cx, raw.agent.stop_grace.as_ref(), "10s")?,
        reserve_bytes: match &raw.agent.reserve {
            Some(r) => size_of(&cx, "agent.reserve", r)?,
            None => 512 << 20,
        },
    };
    if agent.teardown_deadline <= agent.teardown_grace {
        return Err(cx.err_at(
            raw.agent
                .teardown_deadline
                .as_ref()
                .or(raw.agent.teardown_grace.as_ref())
                .map(|s| s.span().start),
            format!(
                "agent.teardown_deadline ({:?}) must be longer than agent.teardown_grace ({:?}): the deadline holds the grace, the kill and the removal of the job's files",
                agent.teardown_deadline, agent.teardown_grace
            ),
        ));
    }
    let github = raw.github.map(|g| github_settings(&cx, g)).transpose()?;
    let user_pos = raw.runner.user.as_ref().map(|u| u.span().start);
    let install_pos = raw.runner.install_dir.as_ref().map(|d| d.span().start);
    let runner = runner_settings(&cx, raw.runner)?;
    let nix = nix_settings(&cx, raw.nix)?;
    let attic = attic_settings(&cx, raw.attic)?;
    let metrics = MetricsSettings {
        listen: match &raw.metrics.listen {
            Some(l) if l.get_ref().is_empty() => None,
            Some(l) => Some(l.get_ref().parse().map_err(|_| {
                cx.err(l, format!("metrics.listen {:?} is not an address: write HOST:PORT, e.g. \"127.0.0.1:9464\", or \"\" to turn metrics off", l.get_ref()))
            })?),
            None => Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9464))),
        },
    };
    let cgroup = CgroupSettings {
        mount: match raw.cgroup.mount {
            Some(m) => absolute(&cx, &m, "cgroup.mount")?,
            None => PathBuf::from("/sys/fs/cgroup"),
        },
        parent: match raw.cgroup.parent {
            Some(p) if !p.get_ref().starts_with('/') => {
                return Err(cx.err(&p, "cgroup.parent must be an absolute path inside the cgroup hierarchy, e.g. \"/flywheel.slice\""));
            }
            Some(p) => Some(p.into_inner()),
            None => None,
        },
    };

    let raw_lanes = match raw.lane {
        Some(l) => l,
        None if *origin != Origin::Embedded => {
            let defaults = parse(DEFAULT_CONFIG, &Origin::Embedded, host)?;
            let cfg = Config {
                origin: origin.clone(),
                agent,
                cgroup,
                github,
                runner,
                nix,
                metrics,
                attic,
                lanes: defaults.lanes,
            };
            check_runner_lane(&cx, &cfg, user_pos, install_pos)?;
            return Ok(cfg);
        }
        None => Vec::new(),
    };
    if raw_lanes.is_empty() {
        return Err(cx.err_at(None, "no [[lane]] is configured: add at least one"));
    }

    let mut lanes = Vec::with_capacity(raw_lanes.len());
    let mut names: HashMap<String, (usize, usize)> = HashMap::new();
    let mut labels_seen: HashMap<String, String> = HashMap::new();
    let nix_lanes = raw_lanes.iter().filter(|l| l.nix.unwrap_or(true)).count();
    for rl in raw_lanes {
        let lane = validate_lane(&cx, rl, host, &mut names, &mut labels_seen, nix_lanes)?;
        lanes.push(lane);
    }
    let mut confs: HashMap<&Path, &str> = HashMap::new();
    for l in lanes.iter().filter(|l| l.nix) {
        if let Some(other) = confs.insert(&l.nix_conf, &l.name) {
            return Err(cx.err_at(
                None,
                format!(
                    "lanes {other:?} and {:?} both write {}: give each lane its own nix_conf",
                    l.name,
                    l.nix_conf.display()
                ),
            ));
        }
    }
    let cfg = Config {
        origin: origin.clone(),
        agent,
        cgroup,
        github,
        runner,
        nix,
        metrics,
        attic,
        lanes,
    };
    check_runner_lane(&cx, &cfg, user_pos, install_pos)?;
    Ok(cfg)
}

fn check_runner_lane(
    cx: &Ctx<'_>,
    cfg: &Config,
    user_pos: Option<usize>,
    install_pos: Option<usize>,
) -> Result<(), ConfigError> {
    if let Some(lane) = cfg
        .lanes
        .iter()
        .find(|l| l.nix && cfg.runner.install_dir.starts_with(&l.nix_store))
    {
        return Err(cx.err_at(
            install_pos,
            format!(
                "runner.install_dir {} lies in lane {:?}'s nix_store {}, which a runner job sees empty until its job-started hook has run: install the runner outside it",
                cfg.runner.install_dir.display(),
                lane.name,
                lane.nix_store.display()
            ),
        ));
    }
    if let Some(l) = &cfg.runner.lane {
        if cfg.lane(l).is_none() {
            return Err(cx.err_at(None, format!("runner.lane {l:?} is not a configured lane")));
        }
    }
    let slots: u32 = cfg.lanes.iter().map(|l| l.max_runners).sum();
    if !cfg.runner.user.contains("{n}")
        && (slots > 1 || cfg.lanes.iter().any(|l| l.slot_root.is_some()))
    {
        return Err(cx.err_at(
            user_pos,
            format!(
                "runner.user {:?} would run up to {slots} jobs at once as one user, and jobs of one uid can read and ptrace each other: use a pool such as \"{}-{{n}}\" (one user per runner slot, e.g. from the sysusers file)",
                cfg.runner.user, cfg.runner.user
            ),
        ));
    }
    Ok(())
}

fn github_settings(cx: &Ctx<'_>, g: RawGitHub) -> Result<GitHubSettings, ConfigError> {
    let scope = flywheel_jit_config::Scope::parse(g.scope.get_ref(), g.target.get_ref())
        .map_err(|e| cx.err(&g.target, format!("github: {e}")))?;
    let api_url = match g.api_url {
        Some(u) if !(u.get_ref().starts_with("https://") || u.get_ref().starts_with("http://")) => {
            return Err(cx.err(&u, "github.api_url must be an http(s) URL: https://api.github.com, or https://HOST/api/v3 for GitHub Enterprise Server"));
        }
        Some(u) => u.into_inner().trim_end_matches('/').to_owned(),
        None => "https://api.github.com".to_owned(),
    };
    let pos = |s: &Spanned<PathBuf>| Some(line_col(cx.src, s.span().start));
    let auth = match (g.app_id, g.private_key_file, g.token_file) {
        (Some(id), Some(key), None) => {
            let app_id = match id.get_ref() {
                toml::Value::String(s) if !s.is_empty() => s.clone(),
                toml::Value::Integer(i) if *i > 0 => i.to_string(),
                _ => return Err(cx.err(&id, "github.app_id must be the App's client ID (a string) or its numeric app ID")),
            };
            GitHubAuth::App {
                app_id,
                installation_id: g.installation_id,
                position: pos(&key),
                private_key_file: absolute(cx, &key, "github.private_key_file")?,
            }
        }
        (None, None, Some(t)) => GitHubAuth::Token {
            position: pos(&t),
            token_file: absolute(cx, &t, "github.token_file")?,
        },
        (_, _, Some(t)) => return Err(cx.err(&t, "github: give either app_id + private_key_file (a GitHub App) or token_file (a personal access token), not both")),
        (Some(id), None, None) => return Err(cx.err(&id, "github.app_id needs github.private_key_file")),
        (None, Some(k), None) => return Err(cx.err(&k, "github.private_key_file needs github.app_id")),
        (None, None, None) => return Err(cx.err(&g.scope, "github: configure app_id + private_key_file (a GitHub App) or token_file (a personal access token)")),
    };
    if matches!(scope, flywheel_jit_config::Scope::Enterprise(_))
        && matches!(
            auth,
            GitHubAuth::App {
                installation_id: None,
                ..
            }
        )
    {
        return Err(cx.err(
            &g.scope,
            "github: enterprise scope with a GitHub App needs installation_id",
        ));
    }
    Ok(GitHubSettings {
        api_url,
        scope,
        auth,
        runner_group_id: g.runner_group_id.unwrap_or(1),
    })
}

fn attic_settings(cx: &Ctx<'_>, a: RawAttic) -> Result<AtticSettings, ConfigError> {
    if let (Some(_), Some(t)) = (&a.signing_key_file, &a.push_token_file) {
        return Err(cx.err(t, "attic: give signing_key_file (per-job tokens) or push_token_file (a static push token), not both"));
    }
    let mut repos = Vec::new();
    for r in a.publish_repositories.unwrap_or_default() {
        let v = r.get_ref();
        if v.split('/').count() != 2 || v.contains(char::is_whitespace) || v.contains('*') {
            return Err(cx.err(
                &r,
                format!("attic.publish_repositories: {v:?} is not OWNER/REPO"),
            ));
        }
        repos.push(r.into_inner());
    }
    let mut events = Vec::new();
    for e in a
        .trusted_events
        .unwrap_or_else(|| vec![Spanned::new(0..0, "push".to_owned())])
    {
        if !TRUSTABLE_EVENTS.contains(&e.get_ref().as_str()) {
            return Err(cx.err(&e, format!("attic.trusted_events: {:?} can be triggered by outsiders or runs code from outside the default branch, and is never trusted to publish (allowed: {})", e.get_ref(), TRUSTABLE_EVENTS.join(", "))));
        }
        events.push(e.into_inner());
    }
    Ok(AtticSettings {
        signing_key_file: a
            .signing_key_file
            .as_ref()
            .map(|f| absolute(cx, f, "attic.signing_key_file"))
            .transpose()?,
        push_token_file: a
            .push_token_file
            .as_ref()
            .map(|f| absolute(cx, f, "attic.push_token_file"))
            .transpose()?,
        public: a.public.unwrap_or(true),
        publish_repositories: repos,
        trusted_events: events,
        token_validity: {
            let d = duration_or(cx, a.token_validity.as_ref(), "1h")?;
            if let (Some(v), true) = (&a.token_validity, d > MAX_TOKEN_VALIDITY || d.is_zero()) {
                return Err(cx.err(v, "attic.token_validity must be between 1s and 6h: a copied token stays valid that long after its job (default 1h)"));
            }
            if let (Some(p), Some(v)) = (&a.push_token_to_jobs, &a.token_validity) {
                if *p.get_ref() && d > Duration::from_secs(3600) {
                    return Err(cx.err(v, "attic.token_validity is at most 1h when push_token_to_jobs is on: a job's copy of a push token stays valid that long"));
                }
            }
            d
        },
        publish: a.publish.unwrap_or(true),
        publish_after_oom: a.publish_after_oom.unwrap_or(true),
        upstream_keys: match a.upstream_keys {
            None => vec![crate::narinfo::PublicKey::parse(CACHE_NIXOS_ORG_KEY)
                .map_err(|e| cx.err_at(None, e.to_string()))?],
            Some(keys) => keys
                .iter()
                .map(|k| {
                    crate::narinfo::PublicKey::parse(k.get_ref())
                        .map_err(|e| cx.err(k, format!("attic.upstream_keys: {e}")))
                })
                .collect::<Result<_, _>>()?,
        },
        push_token_to_jobs: a.push_token_to_jobs.is_some_and(|p| *p.get_ref()),
    })
}

fn nix_settings(cx: &Ctx<'_>, n: RawNix) -> Result<NixSettings, ConfigError> {
    let d = NixSettings::default();
    if let Some(h) = &n.sha256 {
        let v = h.get_ref();
        if v.len() != 64
            || !v
                .chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        {
            return Err(cx.err(
                h,
                "nix.sha256 must be 64 lowercase hex digits (sha256sum's output)",
            ));
        }
    }
    if n.sha256.is_some() != n.version.is_some() {
        return Err(cx.err_at(
            n.sha256.as_ref().map(|s| s.span().start),
            "nix.sha256 and nix.version go together: set both to pin another release, or neither",
        ));
    }
    let mut acknowledged = Vec::new();
    for a in n.acknowledged_advisories.iter().flatten() {
        if !crate::advisory::known(a.get_ref()) {
            let ids: Vec<&str> = crate::advisory::ADVISORIES.iter().map(|a| a.id).collect();
            return Err(cx.err(
                a,
                format!(
                    "nix.acknowledged_advisories: {:?} is not an advisory the agent knows ({}): name one of those, exactly",
                    a.get_ref(),
                    ids.join(", ")
                ),
            ));
        }
        acknowledged.push(a.get_ref().clone());
    }
    Ok(NixSettings {
        tarball: n
            .tarball
            .as_ref()
            .map(|t| absolute(cx, t, "nix.tarball"))
            .transpose()?,
        sha256: n.sha256.map(Spanned::into_inner),
        version: n.version,
        netrc_file: match &n.netrc_file {
            Some(f) => absolute(cx, f, "nix.netrc_file")?,
            None => d.netrc_file,
        },
        substituters: n.substituters.unwrap_or(d.substituters),
        trusted_public_keys: n.trusted_public_keys.unwrap_or(d.trusted_public_keys),
        sandbox: n.sandbox.unwrap_or(d.sandbox),
        userpool: match &n.userpool {
            Some(u) => absolute(cx, u, "nix.userpool")?,
            None => d.userpool,
        },
        acknowledged_advisories: acknowledged,
    })
}

fn runner_settings(cx: &Ctx<'_>, r: RawRunner) -> Result<RunnerSettings, ConfigError> {
    if let Some(p) = &r.name_prefix {
        let v = p.get_ref();
        if v.is_empty()
            || v.len() > 40
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(cx.err(
                p,
                "runner.name_prefix must be 1-40 letters, digits, '-' or '_'",
            ));
        }
    }
    Ok(RunnerSettings {
        install_dir: match &r.install_dir {
            Some(d) => absolute(cx, d, "runner.install_dir")?,
            None => PathBuf::from("/opt/actions-runner"),
        },
        user: match r.user {
            Some(u) => {
                let v = u.get_ref();
                let bare = v.replace("{n}", "0");
                if bare.is_empty()
                    || bare.len() > 31
                    || !bare
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    || v.matches('{').count() != v.matches("{n}").count()
                {
                    return Err(cx.err(
                        &u,
                        "runner.user must be a user name or a pool like \"runner-{n}\" (letters, digits, '-', '_', and {n} for the slot number)",
                    ));
                }
                u.into_inner()
            }
            None => DEFAULT_RUNNER_USER.to_owned(),
        },
        groups: {
            let mut gs = Vec::new();
            for g in r.groups.unwrap_or_default() {
                if ROOT_GROUPS.contains(&g.get_ref().as_str()) {
                    return Err(cx.err(
                        &g,
                        format!("runner.groups: {:?} lets its members become root; a job must not keep it", g.get_ref()),
                    ));
                }
                gs.push(g.into_inner());
            }
            gs
        },
        name_prefix: r.name_prefix.map(Spanned::into_inner),
        drain_grace: duration_or(cx, r.drain_grace.as_ref(), "15m")?,
        backoff: duration_or(cx, r.backoff.as_ref(), "2s")?,
        lane: r.lane.map(Spanned::into_inner),
    })
}

/// Checks that read the host: the GitHub credential files, the runner installation and user.
/// `check-config` and `run` call this after [`parse`]; it changes nothing.
pub fn check_host(cfg: &Config) -> Result<(), ConfigError> {
    let err = |pos: Option<(usize, usize)>, message: String| ConfigError {
        origin: cfg.origin.to_string(),
        position: pos,
        message,
    };
    if let Some(g) = &cfg.github {
        match &g.auth {
            GitHubAuth::App {
                private_key_file,
                position,
                ..
            } => {
                let pem = std::fs::read(private_key_file).map_err(|e| {
                    err(
                        *position,
                        format!(
                            "github.private_key_file {}: {e}",
                            private_key_file.display()
                        ),
                    )
                })?;
                flywheel_jit_config::validate_app_key(&pem).map_err(|e| {
                    err(
                        *position,
                        format!(
                            "github.private_key_file {}: {e}",
                            private_key_file.display()
                        ),
                    )
                })?;
            }
            GitHubAuth::Token {
                token_file,
                position,
            } => {
                let t = std::fs::read_to_string(token_file).map_err(|e| {
                    err(
                        *position,
                        format!("github.token_file {}: {e}", token_file.display()),
                    )
                })?;
                if t.trim().is_empty() {
                    return Err(err(
                        *position,
                        format!("github.token_file {} is empty", token_file.display()),
                    ));
                }
            }
        }
    }
    for lane in &cfg.lanes {
        check_bazel_credentials(cfg, lane)?;
    }
    check_outside_stores(cfg, std::env::current_exe().ok().as_deref())
}

/// A runner job's store (its lane's `nix_store`) is an empty mount point until its
/// job-started hook has run, and the hook is `/bin/sh` running the agent's binary: neither may
/// live in a Nix lane's store (as on NixOS), or every runner job fails at its hook.
fn check_outside_stores(cfg: &Config, exe: Option<&Path>) -> Result<(), ConfigError> {
    let real = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    for lane in cfg.lanes.iter().filter(|l| l.nix) {
        let store = real(&lane.nix_store);
        for (what, path) in [
            ("the agent's binary", exe.map(real)),
            ("/bin/sh", Some(real(Path::new("/bin/sh")))),
        ] {
            if let Some(p) = path.filter(|p| p.starts_with(&store)) {
                return Err(ConfigError {
                    origin: cfg.origin.to_string(),
                    position: None,
                    message: format!(
                        "lane {:?}: {what} ({}) lies in its nix_store {}, which a runner job sees empty until its job-started hook (/bin/sh running the agent's binary) has run: install it outside the store, or give the lane a store of its own (nix_store)",
                        lane.name,
                        p.display(),
                        lane.nix_store.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The credential files of a lane's `[lane.bazel]`: each a regular file of root's, mode 0600,
/// one line `user:password`. Read and dropped; nothing changes.
pub fn check_bazel_credentials(cfg: &Config, lane: &Lane) -> Result<(), ConfigError> {
    let Some(b) = &lane.bazel else {
        return Ok(());
    };
    for (file, at, key) in [
        (&b.read_credential_file, b.read_at, "read_credential_file"),
        (
            &b.write_credential_file,
            b.write_at,
            "write_credential_file",
        ),
    ] {
        if let Some(f) = file {
            crate::bazel::read_credential(f).map_err(|e| ConfigError {
                origin: cfg.origin.to_string(),
                position: at,
                message: format!("lane {:?}: bazel.{key}: {e}", lane.name),
            })?;
        }
    }
    Ok(())
}
fn duration_or(
    cx: &Ctx<'_>,
    v: Option<&Spanned<String>>,
    default: &str,
) -> Result<Duration, ConfigError> {
    match v {
        Some(s) => parse_duration(s.get_ref()).map_err(|e| cx.err(s, e.to_string())),
        None => parse_duration(default).map_err(|e| cx.err_at(None, e.to_string())),
    }
}

fn size_of(cx: &Ctx<'_>, key: &str, v: &Spanned<String>) -> Result<u64, ConfigError> {
    parse_size(v.get_ref()).map_err(|e| cx.err(v, format!("{key}: {e}")))
}

fn absolute(cx: &Ctx<'_>, v: &Spanned<PathBuf>, key: &str) -> Result<PathBuf, ConfigError> {
    if v.get_ref().is_absolute() {
        Ok(v.get_ref().clone())
    } else {
        Err(cx.err(
            v,
            format!(
                "{key} must be an absolute path, got {:?}",
                v.get_ref().display().to_string()
            ),
        ))
    }
}

fn nonempty(
    cx: &Ctx<'_>,
    v: Option<Spanned<String>>,
    key: &str,
) -> Result<Option<String>, ConfigError> {
    match v {
        Some(s) if s.get_ref().trim().is_empty() => Err(cx.err(
            &s,
            format!("hints.{key} is empty: remove the key to leave the hint unset"),
        )),
        Some(s) => Ok(Some(s.into_inner())),
        None => Ok(None),
    }
}

fn validate_lane(
    cx: &Ctx<'_>,
    rl: RawLane,
    host: &HostFacts,
    names: &mut HashMap<String, (usize, usize)>,
    labels_seen: &mut HashMap<String, String>,
    nix_lanes: usize,
) -> Result<Lane, ConfigError> {
    let name = rl.name.get_ref().clone();
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(cx.err(&rl.name, format!("lane name {name:?} must be non-empty and use only letters, digits, '-', '_' and '.'")));
    }
    let here = line_col(cx.src, rl.name.span().start);
    if let Some((l, c)) = names.insert(name.clone(), here) {
        return Err(cx.err(
            &rl.name,
            format!("duplicate lane name {name:?}: it is already defined at line {l}, column {c}"),
        ));
    }

    let labels: Vec<String> = match &rl.labels {
        Some(ls) => {
            if ls.get_ref().is_empty() {
                return Err(cx.err(ls, format!("lane {name:?} has no labels: give it at least one, e.g. labels = [{name:?}]")));
            }
            let mut out = Vec::new();
            for l in ls.get_ref() {
                let label = l.get_ref().trim();
                if label.is_empty() {
                    return Err(cx.err(l, format!("lane {name:?} has an empty label")));
                }
                if let Some(other) = labels_seen.get(label) {
                    return Err(cx.err(l, format!("label {label:?} is used by lanes {other:?} and {name:?}: a label must select exactly one lane")));
                }
                labels_seen.insert(label.to_owned(), name.clone());
                out.push(label.to_owned());
            }
            out
        }
        None => {
            if let Some(other) = labels_seen.get(&name) {
                return Err(cx.err(&rl.name, format!("label {name:?} (the default label of lane {name:?}) is used by lanes {other:?} and {name:?}")));
            }
            labels_seen.insert(name.clone(), name.clone());
            vec![name.clone()]
        }
    };

    let memory_bytes = size_of(cx, "memory", &rl.memory)?;
    let mut unavailable = None;
    if memory_bytes > host.memory_bytes {
        let msg = format!(
            "lane {name:?} has a memory envelope of {} but this host has only {}: lower `memory` or run this lane on a larger host",
            Bytes(memory_bytes),
            Bytes(host.memory_bytes)
        );
        if *cx.origin == Origin::Embedded {
            unavailable = Some(msg);
        } else {
            return Err(cx.err(&rl.memory, msg));
        }
    }
    let max_runners = match &rl.max_runners {
        Some(m) if *m.get_ref() == 0 => {
            return Err(cx.err(m, format!("lane {name:?}: max_runners is 0; a lane needs at least 1 runner (remove the lane to disable it)")));
        }
        Some(m) => *m.get_ref(),
        None => DEFAULT_MAX_RUNNERS,
    };
    let pids_max = match &rl.pids_max {
        Some(p) if *p.get_ref() < 16 => {
            return Err(cx.err(p, format!("lane {name:?}: pids_max {} is too small for any job; use at least 16 (e.g. 16384)", p.get_ref())));
        }
        Some(p) => *p.get_ref(),
        None => DEFAULT_PIDS_MAX,
    };
    let work_root = match &rl.work_root {
        Some(w) => absolute(cx, w, "work_root")?,
        None => PathBuf::from("/var/lib/flywheel/work").join(&name),
    };
    let nix_store = match &rl.nix_store {
        Some(n) => absolute(cx, n, "nix_store")?,
        None => PathBuf::from("/nix"),
    };
    let slot_root = rl
        .slot_root
        .as_ref()
        .map(|s| absolute(cx, s, "slot_root"))
        .transpose()?;
    if let Some(sr) = &slot_root {
        if sr.starts_with(&work_root) || sr.starts_with(&nix_store) {
            return Err(cx.err_at(
                rl.slot_root.as_ref().map(|s| s.span().start),
                format!("lane {name:?}: slot_root {} lies inside work_root or nix_store, which are mounted over it in the job; put it elsewhere", sr.display()),
            ));
        }
    }
    let slots = match (&rl.slots, &slot_root) {
        (Some(n), None) => {
            return Err(cx.err(
                n,
                format!("lane {name:?}: slots needs slot_root (the volume that holds them)"),
            ));
        }
        (Some(n), Some(_)) if *n.get_ref() < max_runners => {
            return Err(cx.err(n, format!("lane {name:?}: slots {} is fewer than max_runners {max_runners}: every runner needs a slot", n.get_ref())));
        }
        (Some(n), Some(_)) => *n.get_ref(),
        (None, _) => max_runners,
    };
    let slot_max_bytes = match (&rl.slot_max_size, &slot_root) {
        (Some(m), None) => {
            return Err(cx.err(m, format!("lane {name:?}: slot_max_size needs slot_root")));
        }
        (Some(m), Some(_)) => Some(size_of(cx, "slot_max_size", m)?),
        (None, _) => None,
    };
    let min_free_bytes = match &rl.min_free {
        Some(m) => size_of(cx, "min_free", m)?,
        None => DEFAULT_MIN_FREE,
    };
    let cpus = match &rl.cpus {
        Some(c) if *c.get_ref() == 0 => {
            return Err(cx.err(
                c,
                format!("lane {name:?}: cpus is 0; remove it to use the host's CPUs"),
            ));
        }
        Some(c) => Some(*c.get_ref()),
        None => None,
    };
    let memory_per_build_bytes = match &rl.memory_per_build {
        Some(m) => size_of(cx, "memory_per_build", m)?,
        None => DEFAULT_MEMORY_PER_BUILD,
    };

    let h = rl.hints;
    let h_bazel_at = h.bazel_remote_cache.as_ref().map(|b| b.span().start);
    if let Some(s) = &h.attic_server {
        let v = s.get_ref();
        if !(v.starts_with("http://") || v.starts_with("https://")) {
            return Err(cx.err(
                s,
                format!("hints.attic_server {v:?} must be an http:// or https:// URL"),
            ));
        }
    }
    if let (Some(c), None) = (&h.attic_cache, &h.attic_server) {
        return Err(cx.err(
            c,
            "hints.attic_cache is set but hints.attic_server is not: set both, or neither",
        ));
    }
    if let Some(k) = &h.attic_public_key {
        let v = k.get_ref();
        if !v.contains(':') || v.contains(char::is_whitespace) {
            return Err(cx.err(k, format!("hints.attic_public_key {v:?} is not a Nix public key: expected NAME:BASE64, as printed by `attic cache info`")));
        }
    }
    let hints = Hints {
        attic_server: nonempty(cx, h.attic_server, "attic_server")?,
        attic_cache: nonempty(cx, h.attic_cache, "attic_cache")?,
        attic_public_key: nonempty(cx, h.attic_public_key, "attic_public_key")?,
        bazel_remote_cache: nonempty(cx, h.bazel_remote_cache, "bazel_remote_cache")?,
        nix_extra_conf: nonempty(cx, h.nix_extra_conf, "nix_extra_conf")?,
    };

    let mut pass_env = Vec::new();
    for v in rl.pass_env.unwrap_or_default() {
        if is_secret_var(v.get_ref()) || v.get_ref().starts_with("XDG_") {
            return Err(cx.err(
                &v,
                format!("lane {name:?}: pass_env may not name {:?}: it is a secret, the agent's own, or set for each job", v.get_ref()),
            ));
        }
        pass_env.push(v.into_inner());
    }
    let network = lane_network(cx, &name, rl.network, rl.allow_metadata, rl.dns)?;
    let bazel = match rl.bazel {
        None => None,
        Some(b) => {
            let at = b.span().start;
            if let Some(h) = &h_bazel_at {
                return Err(cx.err_at(Some(*h), format!("lane {name:?}: hints.bazel_remote_cache and [lane.bazel] both name a Bazel cache: remove hints.bazel_remote_cache (with [lane.bazel] each job's BAZEL_REMOTE_CACHE is its own endpoint)")));
            }
            let own = network.is_the_jobs_own();
            Some(
                crate::bazel::conf::check(&name, b.into_inner(), Some(at), own, &|o| {
                    line_col(cx.src, o)
                })
                .map_err(|e| cx.err_at(e.at, e.message))?,
            )
        }
    };
    let nix = rl.nix.unwrap_or(true);
    let nix_conf = match &rl.nix_conf {
        Some(c) => absolute(cx, c, "nix_conf")?,
        None if nix_lanes <= 1 => PathBuf::from("/etc/nix/nix.conf"),
        None => PathBuf::from("/etc/nix/flywheel")
            .join(&name)
            .join("nix.conf"),
    };
    Ok(Lane {
        nix,
        nix_conf,
        name,
        labels,
        memory_bytes,
        max_runners,
        pids_max,
        work_root,
        nix_store,
        slot_root,
        slots,
        slot_max_bytes,
        min_free_bytes,
        cpus,
        memory_per_build_bytes,
        oom_group: rl.oom_group.unwrap_or(false),
        hints,
        unavailable,
        pass_env,
        network,
        bazel,
    })
}

fn lane_network(
    cx: &Ctx<'_>,
    name: &str,
    mode: Option<Spanned<String>>,
    allow_metadata: Option<Spanned<bool>>,
    dns: Option<Vec<Spanned<String>>>,
) -> Result<Network, ConfigError> {
    match mode.as_ref().map(|m| m.get_ref().as_str()) {
        None | Some("isolated") => {}
        Some(m @ ("host" | "pod")) => {
            let reaches = if m == "host" { "the host" } else { "the pod" };
            if let Some(a) = &allow_metadata {
                return Err(cx.err(a, format!("lane {name:?}: allow_metadata needs network = \"isolated\": with network = {m:?} a job reaches everything {reaches} reaches")));
            }
            if let Some(d) = dns.as_ref().and_then(|d| d.first()) {
                return Err(cx.err(d, format!("lane {name:?}: dns needs network = \"isolated\": with network = {m:?} a job uses {reaches}'s resolver")));
            }
            return Ok(if m == "host" {
                Network::Host
            } else {
                Network::Pod
            });
        }
        Some(other) => {
            let m = mode.as_ref().map(|m| m.span().start);
            return Err(cx.err_at(m, format!("lane {name:?}: network {other:?} is not a network: use \"isolated\" (a network namespace per job, the default), \"host\" (the host's network, shared with other jobs and the agent) or \"pod\" (an ARC runner pod's own network, one job per pod)")));
        }
    }
    let mut servers = Vec::new();
    for d in dns.unwrap_or_default() {
        let ip: std::net::Ipv4Addr = d.get_ref().parse().map_err(|_| {
            cx.err(&d, format!("lane {name:?}: dns {:?} is not an IPv4 address: a job's network has IPv4 only (e.g. \"192.0.2.53\")", d.get_ref()))
        })?;
        if ip.is_loopback() || ip.is_unspecified() {
            return Err(cx.err(&d, format!("lane {name:?}: dns {ip} is the job's own loopback in its network namespace, where no resolver runs: name a resolver the host reaches")));
        }
        servers.push(ip);
    }
    Ok(Network::Isolated {
        allow_metadata: allow_metadata.is_some_and(|a| *a.get_ref()),
        dns: servers,
    })
}

/// Read and parse the configuration named by `--config`, else `FLYWHEEL_CONFIG`, else the
/// embedded defaults.
pub fn load(path: Option<&Path>, host: &HostFacts) -> Result<Config, ConfigError> {
    let from_env = std::env::var_os("FLYWHEEL_CONFIG").filter(|v| !v.is_empty());
    let path = path.map(Path::to_path_buf).or(from_env.map(PathBuf::from));
    match path {
        None => Config::embedded(host),
        Some(p) => {
            let src = std::fs::read_to_string(&p).map_err(|e| ConfigError {
                origin: p.display().to_string(),
                position: None,
                message: format!("cannot read the config file: {e}"),
            })?;
            parse(&src, &Origin::File(p), host)
        }
    }
}

/// Names of variables that never pass from the agent's environment into a job's: secrets,
/// the agent's own hints and Nix store settings (a job gets its own).
pub fn is_secret_var(name: &str) -> bool {
    name.starts_with("ACTIONS_RUNNER_INPUT_")
        || name.starts_with("FLYWHEEL_")
        || matches!(
            name,
            "GITHUB_TOKEN"
                | "GH_TOKEN"
                | "ATTIC_TOKEN"
                | "NIX_CONFIG"
                | "NIX_REMOTE"
                | "NIX_DAEMON_SOCKET_PATH"
                | "ATTIC_SERVER"
                | "ATTIC_CACHE"
                | "BAZEL_REMOTE_CACHE"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostFacts = HostFacts {
        memory_bytes: 128 << 30,
        cpus: 16,
    };
    const SMALL: HostFacts = HostFacts {
        memory_bytes: 24 << 30,
        cpus: 2,
    };

    #[test]
    fn a_runner_or_an_agent_inside_a_nix_lanes_store_is_refused() {
        let e = file("[runner]\ninstall_dir = \"/nix/actions-runner\"\n\n[[lane]]\nname = \"n\"\nmemory = \"1Gi\"\n")
            .expect_err("refused");
        assert_eq!(e.position, Some((2, 15)), "{e}");
        assert!(e.message.contains("runner.install_dir"), "{e}");
        let cfg = file("[[lane]]\nname = \"n\"\nmemory = \"1Gi\"\nnix_store = \"/opt/store\"\n")
            .expect("parses");
        let e = check_outside_stores(&cfg, Some(Path::new("/opt/store/abc-flywheel/bin/agent")))
            .expect_err("refused");
        assert!(e.message.contains("the agent's binary"), "{e}");
        check_outside_stores(&cfg, Some(Path::new("/usr/bin/flywheel-agent"))).expect("outside");
    }

    fn file(src: &str) -> Result<Config, ConfigError> {
        parse(src, &Origin::File(PathBuf::from("lanes.toml")), &HOST)
    }

    #[test]
    fn embedded_defaults_are_the_platform_lanes() {
        let c = Config::embedded(&HOST).expect("defaults parse");
        let got: Vec<(&str, u64, u32)> = c
            .lanes
            .iter()
            .map(|l| (l.name.as_str(), l.memory_bytes, l.max_runners))
            .collect();
        assert_eq!(
            got,
            vec![
                ("tinyland-nix", 8 << 30, 4),
                ("tinyland-nix-heavy", 64 << 30, 2),
                ("tinyland-nix-compute-expansion", 8 << 30, 2),
            ]
        );
        let ce = c.lane("tinyland-nix-compute-expansion").expect("lane");
        assert!(ce.slot_root.is_some());
        assert_eq!(
            c.lane("tinyland-nix").expect("lane").labels,
            vec!["tinyland-nix"]
        );
        assert!(c.lanes.iter().all(|l| l.unavailable.is_none()));
    }

    #[test]
    fn embedded_heavy_lane_is_unavailable_on_a_small_host() {
        let c = Config::embedded(&SMALL).expect("defaults parse on a small host");
        let heavy = c.lane("tinyland-nix-heavy").expect("lane");
        let why = heavy.unavailable.as_deref().expect("unavailable");
        assert!(
            why.contains("64.0 GiB") && why.contains("24.0 GiB"),
            "{why}"
        );
        assert!(c.lane("tinyland-nix").expect("lane").unavailable.is_none());
    }

    #[test]
    fn full_lane_parses() {
        let c = file(
            r#"
[agent]
state_dir = "/tmp/fw"
teardown_grace = "250ms"

[cgroup]
parent = "/flywheel.slice"

[[lane]]
name = "small"
labels = ["small", "nix-small"]
memory = "512Mi"
max_runners = 3
pids_max = 256
work_root = "/srv/work"
nix_store = "/nix"
min_free = "1Gi"
cpus = 4
memory_per_build = "1Gi"
oom_group = true

[lane.hints]
attic_server = "https://attic.example"
attic_cache = "main"
attic_public_key = "main:AAAA"
bazel_remote_cache = "grpc://bazel.example:9092"
nix_extra_conf = "fallback = true"
"#,
        )
        .expect("parses");
        let l = &c.lanes[0];
        assert_eq!(l.memory_bytes, 512 << 20);
        assert_eq!(l.labels, vec!["small", "nix-small"]);
        assert_eq!(l.cpus, Some(4));
        assert!(l.oom_group);
        assert_eq!(l.hints.attic_cache.as_deref(), Some("main"));
        assert_eq!(c.agent.teardown_grace, Duration::from_millis(250));
        assert_eq!(c.cgroup.parent.as_deref(), Some("/flywheel.slice"));
        assert_eq!(
            l.network,
            Network::Isolated {
                allow_metadata: false,
                dns: Vec::new()
            },
            "a network namespace per job unless the lane says otherwise"
        );
        let n = file("[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\nallow_metadata = true\ndns = [\"192.0.2.53\"]\n[[lane]]\nname = \"b\"\nmemory = \"1Gi\"\nnetwork = \"host\"\n").expect("parses");
        assert_eq!(
            n.lanes[0].network,
            Network::Isolated {
                allow_metadata: true,
                dns: vec![std::net::Ipv4Addr::new(192, 0, 2, 53)]
            }
        );
        assert_eq!(n.lanes[1].network, Network::Host);
        // An ARC pod's own network: a Bazel endpoint on its loopback is its one job's.
        let p = file("[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\nnetwork = \"pod\"\n[lane.bazel]\nupstream = \"http://cache.example:8080\"\n").expect("parses");
        assert_eq!(p.lanes[0].network, Network::Pod);
        assert!(p.lanes[0].network.is_the_jobs_own() && p.lanes[0].bazel.is_some());
        assert!(!Network::Host.is_the_jobs_own());
    }

    #[test]
    fn file_without_lanes_keeps_the_platform_lanes() {
        let c = file("[agent]\nstate_dir = \"/tmp/x\"\n").expect("parses");
        assert_eq!(c.lanes.len(), 3);
        assert_eq!(c.agent.state_dir, PathBuf::from("/tmp/x"));
    }

    /// Every rejection: (document, expected position, a fragment of the message).
    #[test]
    fn errors_table() {
        let lane = |extra: &str| format!("[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\n{extra}");
        type Case = (String, Option<(usize, usize)>, &'static str);
        let cases: Vec<Case> = vec![
            ("[[lane]\nname = 1".into(), Some((1, 7)), "expected"),
            ("[[lane]]\nname = 3\nmemory = \"1Gi\"\n".into(), Some((2, 8)), "invalid type"),
            (lane("max_runners = \"two\"\n"), Some((4, 15)), "invalid type"),
            (lane("colour = \"red\"\n"), Some((4, 1)), "unknown field `colour`"),
            (lane("[lane.hints]\nattic_token = \"x\"\n"), Some((5, 1)), "unknown field `attic_token`"),
            ("[agnet]\n".into(), Some((1, 2)), "unknown field `agnet`"),
            ("[[lane]]\nname = \"a\"\n".into(), Some((1, 1)), "missing field `memory`"),
            (lane("") + &lane(""), Some((5, 8)), "duplicate lane name \"a\": it is already defined at line 2, column 8"),
            (
                "[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\nlabels = [\"x\"]\n[[lane]]\nname = \"b\"\nmemory = \"1Gi\"\nlabels = [\"y\", \"x\"]\n".into(),
                Some((8, 16)),
                "label \"x\" is used by lanes \"a\" and \"b\"",
            ),
            ("[[lane]]\nname = \"a\"\nmemory = \"0Gi\"\n".into(), Some((3, 10)), "is zero"),
            ("[[lane]]\nname = \"a\"\nmemory = \"lots\"\n".into(), Some((3, 10)), "not a number with a unit"),
            ("[[lane]]\nname = \"a\"\nmemory = \"256Gi\"\n".into(), Some((3, 10)), "this host has only 128.0 GiB"),
            (lane("max_runners = 0\n"), Some((4, 15)), "max_runners is 0"),
            (lane("pids_max = 2\n"), Some((4, 12)), "pids_max 2 is too small"),
            (lane("work_root = \"work\"\n"), Some((4, 13)), "work_root must be an absolute path"),
            (lane("labels = []\n"), Some((4, 10)), "has no labels"),
            (lane("min_free = \"x\"\n"), Some((4, 12)), "min_free"),
            (lane("cpus = 0\n"), Some((4, 8)), "cpus is 0"),
            (lane("[lane.hints]\nattic_cache = \"main\"\n"), Some((5, 15)), "attic_server is not"),
            (lane("[lane.hints]\nattic_server = \"attic.example\"\n"), Some((5, 16)), "http:// or https://"),
            (lane("[lane.hints]\nattic_public_key = \"nocolon\"\n"), Some((5, 20)), "NAME:BASE64"),
            (lane("[lane.hints]\nbazel_remote_cache = \"\"\n"), Some((5, 22)), "is empty"),
            (lane("network = \"none\"\n"), Some((4, 11)), "network \"none\" is not a network"),
            (lane("network = \"host\"\nallow_metadata = true\n"), Some((5, 18)), "allow_metadata needs network = \"isolated\""),
            (lane("network = \"host\"\ndns = [\"192.0.2.53\"]\n"), Some((5, 8)), "dns needs network"),
            (lane("network = \"pod\"\nallow_metadata = false\n"), Some((5, 18)), "with network = \"pod\" a job reaches everything the pod reaches"),
            (lane("network = \"host\"\n[lane.bazel]\nupstream = \"http://cache.example\"\n"), Some((5, 1)), "[lane.bazel] needs network = \"isolated\" (or \"pod\""),
            (lane("[lane.bazel]\nupstream = \"http://cache.example:99999\"\n"), Some((5, 12)), "must be an http:// or https:// URL"),
            (lane("[lane.bazel]\nupstream = \"http://[::1\"\n"), Some((5, 12)), "must be an http:// or https:// URL"),
            (lane("dns = [\"192.0.2.53\", \"resolver\"]\n"), Some((4, 22)), "is not an IPv4 address"),
            (lane("dns = [\"127.0.0.53\"]\n"), Some((4, 8)), "the job's own loopback"),
            (lane("slot_root = \"/nix/slots\"\n"), Some((4, 13)), "lies inside"),
            ("[agent]\nteardown_grace = \"5\"\n".into(), Some((2, 18)), "duration"),
            ("[agent]\nteardown_grace = \"5s\"\nteardown_deadline = \"2s\"\n".into(), Some((3, 21)), "must be longer than agent.teardown_grace"),
            (format!("[agent]\nstate_dir = \"/{}\"\n", "s".repeat(80)), Some((2, 13)), "must fit in 107"),
            ("[cgroup]\nparent = \"rel\"\n".into(), Some((2, 10)), "absolute path"),
            ("[nix]\nacknowledged_advisories = [\"CVE-2024-27297\", \"CVE-2099-1\"]\n".into(), Some((2, 46)), "\"CVE-2099-1\" is not an advisory the agent knows (CVE-2026-39860, CVE-2024-27297)"),
            ("lane = []\n".into(), None, "no [[lane]]"),
            ("[[lane]]\nname = \"a b\"\nmemory = \"1Gi\"\n".into(), Some((2, 8)), "lane name"),
            // Isolation: one user per concurrent job, no group that grants root.
            (
                format!("[runner]\nuser = \"nobody\"\n{}", lane("max_runners = 2\n")),
                Some((2, 8)),
                "would run up to 2 jobs at once as one user",
            ),
            ("[runner]\ngroups = [\"kvm\", \"sudo\"]\n".into(), Some((2, 18)), "lets its members become root"),
            ("[runner]\ngroups = [\"docker\"]\n".into(), Some((2, 11)), "\"docker\" lets its members become root"),
            ("[runner]\nuser = \"../etc\"\n".into(), Some((2, 8)), "runner.user must be"),
            ("[runner]\nuser = \"r-{m}\"\n".into(), Some((2, 8)), "runner.user must be"),
            // Publishing: only events outsiders cannot trigger; short-lived tokens.
            ("[attic]\ntrusted_events = [\"push\", \"issue_comment\"]\n".into(), Some((2, 27)), "\"issue_comment\" can be triggered by outsiders"),
            ("[attic]\ntrusted_events = [\"workflow_run\"]\n".into(), Some((2, 19)), "never trusted to publish"),
            ("[attic]\ntrusted_events = [\"pull_request_review\"]\n".into(), Some((2, 19)), "never trusted to publish"),
            ("[attic]\ntrusted_events = [\"pull_request_target\"]\n".into(), Some((2, 19)), "never trusted to publish"),
            ("[attic]\nupstream_keys = [\"cache.nixos.org-1\"]\n".into(), Some((2, 18)), "is a key name, not a public key"),
            ("[attic]\nupstream_keys = [\"k:AAAA\"]\n".into(), Some((2, 18)), "is 32 bytes"),
            ("[attic]\ntoken_validity = \"7h\"\n".into(), Some((2, 18)), "between 1s and 6h"),
            (lane("pass_env = [\"TZ\", \"GITHUB_TOKEN\"]\n"), Some((4, 19)), "pass_env may not name \"GITHUB_TOKEN\""),
            ("[attic]\npush_token_to_jobs = true\ntoken_validity = \"2h\"\n".into(), Some((3, 18)), "at most 1h when push_token_to_jobs is on"),
        ];
        for (src, pos, frag) in cases {
            let e = file(&src).expect_err(&src);
            assert_eq!(e.position, pos, "position for {src:?}: {e}");
            assert!(e.to_string().contains(frag), "message for {src:?}: {e}");
            let shown = e.to_string();
            match pos {
                Some((l, c)) => assert!(
                    shown.starts_with(&format!("lanes.toml:{l}:{c}: ")),
                    "{shown}"
                ),
                None => assert!(shown.starts_with("lanes.toml: "), "{shown}"),
            }
        }
    }

    #[test]
    fn slot_users_are_one_per_concurrent_runner() {
        let c = Config::embedded(&HOST).expect("defaults");
        assert_eq!(c.runner.user, "runner-{n}");
        let users: Vec<String> = c
            .lanes
            .iter()
            .flat_map(|l| (0..l.max_runners).map(|s| c.slot_user(&l.name, s)))
            .collect();
        let mut unique = users.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(users.len(), unique.len(), "{users:?}");
        assert_eq!(users.first().map(String::as_str), Some("runner-0"));
        assert_eq!(users.last().map(String::as_str), Some("runner-7"));
        // A fixed name is fine where only one runner runs at a time (an ARC pod).
        let one = file("[runner]\nuser = \"runner\"\n[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\n")
            .expect("one slot");
        assert_eq!(one.slot_user("a", 0), "runner");
        assert_eq!(
            one.attic.token_validity,
            Duration::from_secs(3600),
            "default 1h"
        );
        assert_eq!(one.attic.trusted_events, vec!["push"]);
    }

    #[test]
    fn line_col_counts_characters() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("é\nx", 3), (2, 1));
    }

    #[test]
    fn meminfo() {
        assert_eq!(
            meminfo_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24576000 * 1024)
        );
        assert_eq!(meminfo_total("nothing"), None);
    }
}
