//! GitHub's REST wire types (only the fields the agent reads). Private to this crate.

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize)]
pub struct JitConfigRequest<'a> {
    pub name: &'a str,
    pub runner_group_id: u64,
    pub labels: &'a [String],
    pub work_folder: &'a str,
}

#[derive(Debug, Deserialize)]
pub struct JitConfigResponse {
    pub runner: Runner,
    pub encoded_jit_config: String,
}

#[derive(Debug, Deserialize)]
pub struct Label {
    pub name: String,
}

#[derive(Debug, Deserialize)]
pub struct Runner {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub labels: Vec<Label>,
}

#[derive(Debug, Deserialize)]
pub struct RunnerList {
    pub total_count: u64,
    pub runners: Vec<Runner>,
}

#[derive(Debug, Deserialize)]
pub struct Installation {
    pub id: u64,
}

#[derive(Debug, Deserialize)]
pub struct AccessToken {
    pub token: String,
    pub expires_at: String,
}

#[derive(Debug, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct AppClaims<'a> {
    pub iat: u64,
    pub exp: u64,
    pub iss: &'a str,
}

impl From<Runner> for crate::RunnerInfo {
    fn from(r: Runner) -> Self {
        crate::RunnerInfo {
            id: r.id,
            online: r.status.as_deref() == Some("online"),
            busy: r.busy,
            labels: r.labels.into_iter().map(|l| l.name).collect(),
            name: r.name,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct RepoRef {
    pub id: u64,
    pub full_name: String,
    #[serde(default)]
    pub fork: bool,
    #[serde(default)]
    pub default_branch: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct WorkflowRun {
    pub event: String,
    #[serde(default)]
    pub head_branch: Option<String>,
    #[serde(default)]
    pub head_sha: Option<String>,
    #[serde(default)]
    pub run_attempt: Option<u64>,
    pub repository: RepoRef,
    #[serde(default)]
    pub head_repository: Option<RepoRef>,
}

#[derive(Debug, Deserialize)]
pub struct Job {
    pub id: u64,
    pub status: String,
    #[serde(default)]
    pub runner_name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct JobList {
    pub jobs: Vec<Job>,
}

/// `GET /repos/{owner}/{repo}/compare/{base}...{head}`: where `head` stands against `base`.
#[derive(Debug, Deserialize)]
pub struct Comparison {
    /// `identical`, `behind` (head is in base's history), `ahead` or `diverged`.
    pub status: String,
}
