//! The GitHub REST client: auth, requests, retries, and the runner endpoints.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Mutex as StdMutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use tokio::sync::Mutex;
use tracing::{debug, warn};

use crate::retry::{RateHeaders, RetryPolicy, Verdict};
use crate::{wire, GitHubError, JitRunner, RunnerInfo, Secret};

/// Where runners are registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Org(String),
    Repo { owner: String, repo: String },
    Enterprise(String),
}

impl Scope {
    /// `scope` is `org`, `repo` or `enterprise`; `target` the org name, `owner/repo` or the
    /// enterprise slug.
    pub fn parse(scope: &str, target: &str) -> Result<Scope, String> {
        // A name GitHub allows, and never `.`/`..`: the repository comes from the job, and a
        // path segment like `..` would ask GitHub about another endpoint.
        let valid = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match scope {
            "org" if valid(target) => Ok(Scope::Org(target.to_owned())),
            "enterprise" if valid(target) => Ok(Scope::Enterprise(target.to_owned())),
            "repo" => match target.split_once('/') {
                Some((o, r)) if valid(o) && valid(r) => Ok(Scope::Repo {
                    owner: o.to_owned(),
                    repo: r.to_owned(),
                }),
                _ => Err(format!(
                    "scope \"repo\" needs target = \"OWNER/REPO\", got {target:?}"
                )),
            },
            "org" | "enterprise" => Err(format!(
                "scope {scope:?} needs target = the {scope} name, got {target:?}"
            )),
            _ => Err(format!(
                "scope must be \"org\", \"repo\" or \"enterprise\", got {scope:?}"
            )),
        }
    }

    fn prefix(&self) -> String {
        match self {
            Scope::Org(o) => format!("/orgs/{o}"),
            Scope::Repo { owner, repo } => format!("/repos/{owner}/{repo}"),
            Scope::Enterprise(e) => format!("/enterprises/{e}"),
        }
    }
}

/// How the agent authenticates.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// A GitHub App: `app_id` is the JWT's `iss` (the client ID or the app ID).
    App {
        app_id: String,
        private_key_pem: Secret<Vec<u8>>,
        installation_id: Option<u64>,
    },
    /// A personal access token (classic `admin:org`/`repo`, or fine-grained).
    Token(Secret<String>),
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise Server.
    pub api_url: String,
    pub scope: Scope,
    pub credentials: Credentials,
    pub user_agent: String,
    pub retry: RetryPolicy,
}

/// Outcome of deleting a runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    /// It did not exist (any more).
    Gone,
    /// GitHub refused: the runner is running a job (422).
    Busy,
}

/// Requests made, by endpoint and status, and the last rate-limit budget GitHub reported.
#[derive(Debug, Default)]
pub struct ApiStats {
    requests: StdMutex<BTreeMap<(&'static str, u16), u64>>,
    ratelimit_remaining: AtomicI64,
}

impl ApiStats {
    fn record(&self, endpoint: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint, status)).or_default() += 1;
        }
    }
    /// `(endpoint, status) → count`; status 0 means no answer (transport error).
    pub fn requests(&self) -> BTreeMap<(&'static str, u16), u64> {
        self.requests.lock().map(|m| m.clone()).unwrap_or_default()
    }
    /// Requests to one endpoint, any status.
    pub fn count(&self, endpoint: &str) -> u64 {
        self.requests()
            .iter()
            .filter(|((e, _), _)| *e == endpoint)
            .map(|(_, n)| n)
            .sum()
    }
    /// The last `x-ratelimit-remaining` seen, or -1.
    pub fn ratelimit_remaining(&self) -> i64 {
        self.ratelimit_remaining.load(Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct CachedToken {
    token: Secret<String>,
    expires_at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AuthKind {
    App,
    Installation,
}

/// A GitHub REST client for one scope.
#[derive(Debug)]
pub struct Client {
    http: reqwest::Client,
    cfg: ClientConfig,
    key: Option<AppKey>,
    token: Mutex<Option<CachedToken>>,
    installation_id: Mutex<Option<u64>>,
    stats: ApiStats,
    /// GitHub asked this client to wait (`retry-after`, an exhausted limit, a secondary limit):
    /// no request of the client leaves before this instant, whichever task sends it.
    not_before: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// The App's signing key; never printed.
struct AppKey(jsonwebtoken::EncodingKey);

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Refresh an installation token this long before GitHub says it expires.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

struct Response {
    status: StatusCode,
    body: Vec<u8>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn header_u64(h: &reqwest::header::HeaderMap, name: &str) -> Option<u64> {
    h.get(name)?.to_str().ok()?.trim().parse().ok()
}

fn decode<T: DeserializeOwned>(endpoint: &'static str, body: &[u8]) -> Result<T, GitHubError> {
    serde_json::from_slice(body).map_err(|e| GitHubError::Decode {
        endpoint,
        message: e.to_string(),
    })
}

fn status_error(endpoint: &'static str, r: &Response) -> GitHubError {
    let message = serde_json::from_slice::<wire::ErrorBody>(&r.body)
        .map(|b| b.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(&r.body).chars().take(200).collect());
    GitHubError::Status {
        endpoint,
        status: r.status.as_u16(),
        message,
    }
}

impl Client {
    /// Build a client. A GitHub App key that is not an RSA private key PEM is an error here,
    /// before any request.
    pub fn new(cfg: ClientConfig) -> Result<Client, GitHubError> {
        let key = match &cfg.credentials {
            Credentials::App {
                private_key_pem, ..
            } => Some(AppKey(
                jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem.expose()).map_err(|e| {
                    GitHubError::Config(format!(
                        "the GitHub App private key is not an RSA private key in PEM form: {e}"
                    ))
                })?,
            )),
            Credentials::Token(_) => None,
        };
        if let (
            Scope::Enterprise(_),
            Credentials::App {
                installation_id: None,
                ..
            },
        ) = (&cfg.scope, &cfg.credentials)
        {
            return Err(GitHubError::Config("enterprise scope with a GitHub App needs installation_id: GitHub has no endpoint to look it up".into()));
        }
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(cfg.retry.timeout)
            .user_agent(cfg.user_agent.clone())
            .build()
            .map_err(|e| GitHubError::Config(format!("cannot build the HTTP client: {e}")))?;
        let installation_id = match &cfg.credentials {
            Credentials::App {
                installation_id, ..
            } => *installation_id,
            Credentials::Token(_) => None,
        };
        Ok(Client {
            http,
            key,
            token: Mutex::new(None),
            installation_id: Mutex::new(installation_id),
            stats: ApiStats {
                ratelimit_remaining: AtomicI64::new(-1),
                ..ApiStats::default()
            },
            not_before: std::sync::Mutex::new(None),
            cfg,
        })
    }

    pub fn stats(&self) -> &ApiStats {
        &self.stats
    }

    pub fn scope(&self) -> &Scope {
        &self.cfg.scope
    }

    /// The App JWT: RS256, `iat` 60 s in the past, `exp` 9 minutes ahead, `iss` the app.
    fn app_jwt(&self) -> Result<Secret<String>, GitHubError> {
        let (Some(key), Credentials::App { app_id, .. }) = (&self.key, &self.cfg.credentials)
        else {
            return Err(GitHubError::Config("no GitHub App configured".into()));
        };
        let now = now_secs();
        let claims = wire::AppClaims {
            iat: now.saturating_sub(60),
            exp: now + 9 * 60,
            iss: app_id,
        };
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key.0,
        )
        .map(Secret::new)
        .map_err(|e| GitHubError::Config(format!("cannot sign the App JWT: {e}")))
    }

    /// The installation token, cached until shortly before it expires.
    async fn installation_token(&self) -> Result<Secret<String>, GitHubError> {
        if let Credentials::Token(t) = &self.cfg.credentials {
            return Ok(t.clone());
        }
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref() {
            if SystemTime::now() + TOKEN_REFRESH_MARGIN < t.expires_at {
                return Ok(t.token.clone());
            }
        }
        let id = self.installation().await?;
        const EP: &str = "create-installation-token";
        // Boxed: `send` asks this function for the token of installation-authenticated calls.
        let r = Box::pin(self.send(
            Method::POST,
            &format!("/app/installations/{id}/access_tokens"),
            None,
            AuthKind::App,
            EP,
        ))
        .await?;
        if r.status != StatusCode::CREATED && r.status != StatusCode::OK {
            return Err(status_error(EP, &r));
        }
        let t: wire::AccessToken = decode(EP, &r.body)?;
        let expires_at = humantime::parse_rfc3339_weak(t.expires_at.trim_end_matches('Z'))
            .or_else(|_| humantime::parse_rfc3339(&t.expires_at))
            .map_err(|e| GitHubError::Decode {
                endpoint: EP,
                message: format!("expires_at {:?}: {e}", t.expires_at),
            })?;
        debug!(installation = id, "installation token refreshed");
        let token = Secret::new(t.token);
        *cached = Some(CachedToken {
            token: token.clone(),
            expires_at,
        });
        Ok(token)
    }

    async fn installation(&self) -> Result<u64, GitHubError> {
        let mut id = self.installation_id.lock().await;
        if let Some(i) = *id {
            return Ok(i);
        }
        const EP: &str = "get-installation";
        let path = match &self.cfg.scope {
            Scope::Org(o) => format!("/orgs/{o}/installation"),
            Scope::Repo { owner, repo } => format!("/repos/{owner}/{repo}/installation"),
            Scope::Enterprise(_) => {
                return Err(GitHubError::Config(
                    "enterprise scope needs installation_id".into(),
                ))
            }
        };
        let r = Box::pin(self.send(Method::GET, &path, None, AuthKind::App, EP)).await?;
        if !r.status.is_success() {
            return Err(status_error(EP, &r));
        }
        let inst: wire::Installation = decode(EP, &r.body)?;
        *id = Some(inst.id);
        Ok(inst.id)
    }

    /// Wait until GitHub's last "wait" for this client is over.
    async fn wait_for_gate(&self, endpoint: &'static str) {
        let until = self.not_before.lock().ok().and_then(|g| *g);
        if let Some(t) = until {
            if t > tokio::time::Instant::now() {
                warn!(
                    endpoint,
                    wait_ms = (t - tokio::time::Instant::now()).as_millis() as u64,
                    "GitHub asked this client to wait; holding the request"
                );
                tokio::time::sleep_until(t).await;
            }
        }
    }

    fn close_gate(&self, wait: Duration) {
        if let Ok(mut g) = self.not_before.lock() {
            let t = tokio::time::Instant::now() + wait;
            if !g.is_some_and(|cur| cur >= t) {
                *g = Some(t);
            }
        }
    }

    /// One request with GitHub's retry rules. Returns the final answer, whatever its status.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        auth: AuthKind,
        endpoint: &'static str,
    ) -> Result<Response, GitHubError> {
        let url = format!("{}{path}", self.cfg.api_url.trim_end_matches('/'));
        let policy = &self.cfg.retry;
        let mut last = String::new();
        let mut refreshed_token = false;
        for attempt in 0..policy.max_attempts {
            self.wait_for_gate(endpoint).await;
            let bearer = match auth {
                AuthKind::App => self.app_jwt()?,
                AuthKind::Installation => self.installation_token().await?,
            };
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("accept", "application/vnd.github+json")
                .header("x-github-api-version", "2022-11-28")
                .bearer_auth(bearer.expose());
            if let Some(b) = body {
                req = req.json(b);
            }
            let sent = req.send().await;
            let (status, headers, bytes) = match sent {
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    match resp.bytes().await {
                        Ok(b) => (status, headers, b.to_vec()),
                        Err(e) => {
                            self.stats.record(endpoint, 0);
                            last = format!("reading the answer: {e}");
                            let wait = policy.backoff(attempt);
                            warn!(endpoint, attempt, wait_ms = wait.as_millis() as u64, error = %last, "GitHub answer cut short; retrying");
                            tokio::time::sleep(wait).await;
                            continue;
                        }
                    }
                }
                Err(e) => {
                    self.stats.record(endpoint, 0);
                    last = if e.is_timeout() {
                        "timed out".to_owned()
                    } else {
                        format!("{e}")
                    };
                    let wait = policy.backoff(attempt);
                    warn!(endpoint, attempt, wait_ms = wait.as_millis() as u64, error = %last, "GitHub unreachable; retrying");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            self.stats.record(endpoint, status.as_u16());
            if let Some(rem) = header_u64(&headers, "x-ratelimit-remaining") {
                self.stats
                    .ratelimit_remaining
                    .store(i64::try_from(rem).unwrap_or(i64::MAX), Ordering::Relaxed);
            }
            let rate = RateHeaders {
                retry_after: header_u64(&headers, "retry-after"),
                remaining: header_u64(&headers, "x-ratelimit-remaining"),
                reset: header_u64(&headers, "x-ratelimit-reset"),
            };
            // An installation token GitHub no longer accepts: fetch a new one, once.
            if status == StatusCode::UNAUTHORIZED
                && auth == AuthKind::Installation
                && self.key.is_some()
                && !refreshed_token
            {
                refreshed_token = true;
                *self.token.lock().await = None;
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            match policy.judge(status.as_u16(), &rate, attempt, &text) {
                Verdict::Done | Verdict::Final => {
                    return Ok(Response {
                        status,
                        body: bytes,
                    })
                }
                Verdict::Retry(wait, why) => {
                    if wait > policy.max_wait {
                        return Err(GitHubError::RateLimited {
                            endpoint,
                            wait_secs: wait.as_secs(),
                            max_secs: policy.max_wait.as_secs(),
                        });
                    }
                    last = format!("{status} ({why})");
                    if matches!(status.as_u16(), 403 | 429) {
                        // A rate limit binds the client, not this one request.
                        self.close_gate(wait);
                    }
                    warn!(
                        endpoint,
                        status = status.as_u16(),
                        reason = why,
                        wait_ms = wait.as_millis() as u64,
                        attempt,
                        "GitHub asks to wait; waiting"
                    );
                    tokio::time::sleep(wait).await;
                }
            }
        }
        Err(GitHubError::GaveUp {
            endpoint,
            attempts: policy.max_attempts,
            last,
        })
    }

    /// `POST …/actions/runners/generate-jitconfig`.
    pub async fn generate_jitconfig(
        &self,
        name: &str,
        runner_group_id: u64,
        labels: &[String],
        work_folder: &str,
    ) -> Result<JitRunner, GitHubError> {
        const EP: &str = "generate-jitconfig";
        let body = serde_json::to_value(wire::JitConfigRequest {
            name,
            runner_group_id,
            labels,
            work_folder,
        })
        .map_err(|e| GitHubError::Config(e.to_string()))?;
        let path = format!(
            "{}/actions/runners/generate-jitconfig",
            self.cfg.scope.prefix()
        );
        let r = self
            .send(Method::POST, &path, Some(&body), AuthKind::Installation, EP)
            .await?;
        match r.status {
            StatusCode::CREATED | StatusCode::OK => {
                let resp: wire::JitConfigResponse = decode(EP, &r.body)?;
                if resp.encoded_jit_config.is_empty() {
                    return Err(GitHubError::Decode {
                        endpoint: EP,
                        message: "encoded_jit_config is empty".into(),
                    });
                }
                Ok(JitRunner {
                    runner: resp.runner.into(),
                    encoded: Secret::new(resp.encoded_jit_config),
                })
            }
            StatusCode::CONFLICT => Err(GitHubError::Conflict { endpoint: EP }),
            _ => Err(status_error(EP, &r)),
        }
    }

    /// Register a JIT runner under a fresh name per attempt. On 409 (a runner of that name
    /// exists, e.g. created by an earlier call whose answer was lost), delete it when it is not
    /// busy and try again under a new name.
    pub async fn register(
        &self,
        mut name_for_attempt: impl FnMut(u32) -> String,
        runner_group_id: u64,
        labels: &[String],
        work_folder: &str,
    ) -> Result<JitRunner, GitHubError> {
        const ATTEMPTS: u32 = 4;
        let mut last = None;
        for attempt in 0..ATTEMPTS {
            let name = name_for_attempt(attempt);
            match self
                .generate_jitconfig(&name, runner_group_id, labels, work_folder)
                .await
            {
                Ok(r) => return Ok(r),
                Err(e @ GitHubError::Conflict { .. }) => {
                    warn!(runner = %name, "runner name already registered (409); removing the stale registration and retrying under a new name");
                    if let Some(stale) = self.find_runner(&name).await? {
                        if !stale.busy {
                            self.delete_runner(stale.id).await?;
                        }
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(GitHubError::Conflict {
            endpoint: "generate-jitconfig",
        }))
    }

    /// Every runner in the scope (all pages), optionally only those named `name`.
    pub async fn list_runners(&self, name: Option<&str>) -> Result<Vec<RunnerInfo>, GitHubError> {
        const EP: &str = "list-runners";
        let mut out = Vec::new();
        for page in 1..=100u32 {
            let mut path = format!(
                "{}/actions/runners?per_page=100&page={page}",
                self.cfg.scope.prefix()
            );
            if let Some(n) = name {
                path.push_str("&name=");
                path.push_str(&percent_encode(n));
            }
            let r = self
                .send(Method::GET, &path, None, AuthKind::Installation, EP)
                .await?;
            if !r.status.is_success() {
                return Err(status_error(EP, &r));
            }
            let list: wire::RunnerList = decode(EP, &r.body)?;
            let n = list.runners.len();
            out.extend(list.runners.into_iter().map(RunnerInfo::from));
            if n < 100 || out.len() as u64 >= list.total_count {
                break;
            }
        }
        Ok(out)
    }

    /// The runner called `name`, if any.
    pub async fn find_runner(&self, name: &str) -> Result<Option<RunnerInfo>, GitHubError> {
        Ok(self
            .list_runners(Some(name))
            .await?
            .into_iter()
            .find(|r| r.name == name))
    }

    /// `GET …/actions/runners/{id}`; `None` when it does not exist.
    pub async fn get_runner(&self, id: u64) -> Result<Option<RunnerInfo>, GitHubError> {
        const EP: &str = "get-runner";
        let path = format!("{}/actions/runners/{id}", self.cfg.scope.prefix());
        let r = self
            .send(Method::GET, &path, None, AuthKind::Installation, EP)
            .await?;
        match r.status {
            StatusCode::OK => Ok(Some(decode::<wire::Runner>(EP, &r.body)?.into())),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(status_error(EP, &r)),
        }
    }

    /// `DELETE …/actions/runners/{id}`.
    pub async fn delete_runner(&self, id: u64) -> Result<Deleted, GitHubError> {
        const EP: &str = "delete-runner";
        let path = format!("{}/actions/runners/{id}", self.cfg.scope.prefix());
        let r = self
            .send(Method::DELETE, &path, None, AuthKind::Installation, EP)
            .await?;
        match r.status {
            StatusCode::NO_CONTENT | StatusCode::OK => Ok(Deleted::Deleted),
            StatusCode::NOT_FOUND => Ok(Deleted::Gone),
            StatusCode::UNPROCESSABLE_ENTITY => Ok(Deleted::Busy),
            _ => Err(status_error(EP, &r)),
        }
    }
}

impl Client {
    /// The run, its repository's default branch and the run's jobs (three GET requests).
    pub async fn run_facts(
        &self,
        repository: &str,
        run_id: u64,
    ) -> Result<crate::RunFacts, GitHubError> {
        // A name GitHub allows, and never `.`/`..`: the repository comes from the job, and a
        // path segment like `..` would ask GitHub about another endpoint.
        let valid = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match repository.split_once('/') {
            Some((o, r)) if valid(o) && valid(r) => {}
            _ => {
                return Err(GitHubError::Config(format!(
                    "{repository:?} is not OWNER/REPO"
                )))
            }
        }
        const RUN: &str = "get-run";
        let r = self
            .send(
                Method::GET,
                &format!("/repos/{repository}/actions/runs/{run_id}"),
                None,
                AuthKind::Installation,
                RUN,
            )
            .await?;
        if !r.status.is_success() {
            return Err(status_error(RUN, &r));
        }
        let run: wire::WorkflowRun = decode(RUN, &r.body)?;
        let default_branch = match run.repository.default_branch.clone() {
            Some(b) => b,
            None => {
                const REPO: &str = "get-repository";
                let r = self
                    .send(
                        Method::GET,
                        &format!("/repos/{repository}"),
                        None,
                        AuthKind::Installation,
                        REPO,
                    )
                    .await?;
                if !r.status.is_success() {
                    return Err(status_error(REPO, &r));
                }
                decode::<wire::RepoRef>(REPO, &r.body)?
                    .default_branch
                    .ok_or(GitHubError::Decode {
                        endpoint: REPO,
                        message: "no default_branch".into(),
                    })?
            }
        };
        const JOBS: &str = "list-run-jobs";
        let r = self
            .send(
                Method::GET,
                &format!(
                    "/repos/{repository}/actions/runs/{run_id}/jobs?filter=latest&per_page=100"
                ),
                None,
                AuthKind::Installation,
                JOBS,
            )
            .await?;
        if !r.status.is_success() {
            return Err(status_error(JOBS, &r));
        }
        let jobs: wire::JobList = decode(JOBS, &r.body)?;
        // `head_branch` is a name: a tag called like the default branch has it too. Ask GitHub
        // whether the commit itself is on the default branch.
        let head_on_default_branch = match (&run.head_branch, &run.head_sha) {
            (Some(b), Some(sha)) if *b == default_branch => {
                if !sha.chars().all(|c| c.is_ascii_hexdigit()) || sha.is_empty() {
                    return Err(GitHubError::Decode {
                        endpoint: RUN,
                        message: "head_sha is not a commit id".into(),
                    });
                }
                const CMP: &str = "compare-commits";
                let r = self
                    .send(
                        Method::GET,
                        &format!(
                            "/repos/{repository}/compare/{}...{sha}",
                            percent_encode(&default_branch)
                        ),
                        None,
                        AuthKind::Installation,
                        CMP,
                    )
                    .await?;
                if !r.status.is_success() {
                    return Err(status_error(CMP, &r));
                }
                let c: wire::Comparison = decode(CMP, &r.body)?;
                Some(matches!(c.status.as_str(), "identical" | "behind"))
            }
            _ => None,
        };
        Ok(crate::RunFacts {
            repository: run.repository.full_name,
            repository_id: run.repository.id,
            default_branch,
            event: run.event,
            head_branch: run.head_branch,
            head_sha: run.head_sha,
            head_on_default_branch,
            head_repository_id: run.head_repository.as_ref().map(|h| h.id),
            head_repository_fork: run.head_repository.as_ref().is_some_and(|h| h.fork),
            run_attempt: run.run_attempt,
            jobs: jobs
                .jobs
                .into_iter()
                .map(|j| (j.id, j.status, j.runner_name))
                .collect(),
        })
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(
            Scope::parse("org", "tinyland"),
            Ok(Scope::Org("tinyland".into()))
        );
        assert_eq!(
            Scope::parse("repo", "tinyland/flywheel"),
            Ok(Scope::Repo {
                owner: "tinyland".into(),
                repo: "flywheel".into()
            })
        );
        assert_eq!(
            Scope::parse("enterprise", "acme"),
            Ok(Scope::Enterprise("acme".into()))
        );
        assert!(Scope::parse("repo", "tinyland").is_err());
        assert!(Scope::parse("org", "a/b").is_err());
        assert!(Scope::parse("team", "x").is_err());
        assert_eq!(
            Scope::Repo {
                owner: "o".into(),
                repo: "r".into()
            }
            .prefix(),
            "/repos/o/r"
        );
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(
            percent_encode("sting-tinyland-nix-ab12"),
            "sting-tinyland-nix-ab12"
        );
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn a_bad_key_is_a_config_error() {
        let e = Client::new(ClientConfig {
            api_url: "http://127.0.0.1:1".into(),
            scope: Scope::Org("o".into()),
            credentials: Credentials::App {
                app_id: "1".into(),
                private_key_pem: Secret::new(b"not a key".to_vec()),
                installation_id: None,
            },
            user_agent: "t".into(),
            retry: RetryPolicy::default(),
        })
        .expect_err("bad key");
        assert!(e.to_string().contains("RSA private key"), "{e}");
    }
}
