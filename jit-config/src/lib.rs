//! GitHub's side of flywheel-agent: GitHub App authentication, just-in-time runner
//! registration, runner listing and deletion, workflow-run look-ups, and GitHub's rate-limit
//! rules. This is the only crate that knows GitHub's wire types; the agent gets the plain
//! types exported here.

mod client;
pub mod jitfile;
mod retry;
pub mod secret;
mod wire;

pub use client::{ApiStats, Client, ClientConfig, Credentials, Deleted, Scope};
pub use retry::RetryPolicy;
pub use secret::Secret;

/// Check that `pem` is an RSA private key the App JWT can be signed with.
pub fn validate_app_key(pem: &[u8]) -> Result<(), String> {
    jsonwebtoken::EncodingKey::from_rsa_pem(pem)
        .map(|_| ())
        .map_err(|e| format!("not an RSA private key in PEM form: {e}"))
}

/// A self-hosted runner as GitHub knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerInfo {
    pub id: u64,
    pub name: String,
    pub online: bool,
    pub busy: bool,
    pub labels: Vec<String>,
}

/// What GitHub says about a workflow run, for deciding whether a job may publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunFacts {
    pub repository: String,
    pub repository_id: u64,
    pub default_branch: String,
    pub event: String,
    pub head_branch: Option<String>,
    /// The run's commit.
    pub head_sha: Option<String>,
    /// Whether GitHub says the run's commit is on the default branch (the branch's head or in
    /// its history): asked only when the run's `head_branch` names the default branch, since
    /// a tag can carry the same name.
    pub head_on_default_branch: Option<bool>,
    pub head_repository_id: Option<u64>,
    pub head_repository_fork: bool,
    pub run_attempt: Option<u64>,
    /// The run's jobs: (id, status, runner name).
    pub jobs: Vec<(u64, String, Option<String>)>,
}

/// A registered just-in-time runner and its one-time configuration.
#[derive(Debug)]
pub struct JitRunner {
    pub runner: RunnerInfo,
    /// `encoded_jit_config`: hand it to `Runner.Listener` in `ACTIONS_RUNNER_INPUT_JITCONFIG`.
    pub encoded: Secret<String>,
}

/// Errors from GitHub or on the way to it. Messages never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum GitHubError {
    #[error("{endpoint}: GitHub answered {status}: {message}")]
    Status {
        endpoint: &'static str,
        status: u16,
        message: String,
    },
    #[error("{endpoint}: a runner with this name already exists (409)")]
    Conflict { endpoint: &'static str },
    #[error("{endpoint}: cannot reach GitHub: {message}")]
    Transport {
        endpoint: &'static str,
        message: String,
    },
    #[error("{endpoint}: GitHub's answer is not what its API describes: {message}")]
    Decode {
        endpoint: &'static str,
        message: String,
    },
    #[error("{endpoint}: rate limited for {wait_secs} s, longer than the agent waits ({max_secs} s); lower the request rate or wait for the limit to reset")]
    RateLimited {
        endpoint: &'static str,
        wait_secs: u64,
        max_secs: u64,
    },
    #[error("{endpoint}: gave up after {attempts} attempts: {last}")]
    GaveUp {
        endpoint: &'static str,
        attempts: u32,
        last: String,
    },
    #[error("github configuration: {0}")]
    Config(String),
}

/// Decode BODY as every GitHub answer the client reads, and a JIT config's files out of a
/// registration answer: what the fuzz targets (`fuzz/`) feed with arbitrary bytes. Returns how
/// many decodings succeeded. Not part of the API.
#[doc(hidden)]
pub fn decode_github_answers(body: &[u8]) -> usize {
    fn ok<T: serde::de::DeserializeOwned>(body: &[u8]) -> usize {
        usize::from(serde_json::from_slice::<T>(body).is_ok())
    }
    let mut n = ok::<wire::RunnerList>(body)
        + ok::<wire::Installation>(body)
        + ok::<wire::AccessToken>(body)
        + ok::<wire::ErrorBody>(body)
        + ok::<wire::WorkflowRun>(body)
        + ok::<wire::JobList>(body)
        + ok::<wire::Comparison>(body)
        + ok::<wire::RepoRef>(body);
    if let Ok(r) = serde_json::from_slice::<wire::JitConfigResponse>(body) {
        n += 1;
        n += usize::from(jitfile::decode_files(&Secret::new(r.encoded_jit_config)).is_ok());
    }
    n
}
