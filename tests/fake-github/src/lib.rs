//! A fake GitHub REST API for tests, following GitHub's REST description for the endpoints the
//! agent uses: paths, fields, status codes, rate-limit headers.
//!
//! - `GET /orgs/{org}/installation`, `GET /repos/{owner}/{repo}/installation` (App JWT)
//! - `POST /app/installations/{id}/access_tokens` → 201 `{token, expires_at, permissions}`
//! - `POST {scope}/actions/runners/generate-jitconfig` → 201 `{runner, encoded_jit_config}`;
//!   409 on a duplicate name; 422 on a bad body
//! - `GET {scope}/actions/runners[?name=&per_page=&page=]`, `GET|DELETE {scope}/actions/runners/{id}`
//!   (DELETE → 204; 422 while busy; 404 unknown)
//! - `GET /repos/{owner}/{repo}`, `GET /repos/{owner}/{repo}/actions/runs/{id}` and `…/jobs`
//! - `GET /repos/{owner}/{repo}/compare/{base}...{head}` → `status` of `head` against the
//!   branch `base` from [`State::branches`] (`identical`, `behind`, `ahead`/`diverged`); 404
//!   for an unknown branch or commit
//!
//! The App JWT is verified (RS256 signature, `iat`, `exp` at most 10 minutes after `iat`,
//! `iss`); runner endpoints require a live installation token (or the configured PAT).
//! Faults are injected per endpoint: any status, headers (`retry-after`,
//! `x-ratelimit-remaining: 0`), a body (malformed JSON), a delay, and "do it anyway" (the
//! runner is created server-side although the answer says otherwise).
//!
//! The fake `Runner.Listener` reports `busy` and `done` to `/_fake/runners/{id}/…`; what it is
//! to run comes from a queue of [`FakeJob`]s placed into `.runner` as `FakeJob`.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

/// A job the fake assigns to the next runner registered with one of `labels`.
#[derive(Debug, Clone, Default)]
pub struct FakeJob {
    pub labels: Vec<String>,
    pub script: String,
    pub listener_exit: u8,
    /// `GITHUB_*` variables the runner gives the job and its hooks.
    pub env: BTreeMap<String, String>,
    /// Idle time before the job arrives.
    pub delay_ms: u64,
}

/// A fault for the next request to `endpoint`.
#[derive(Debug, Clone, Default)]
pub struct Injection {
    pub endpoint: &'static str,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub delay_ms: u64,
    /// Do the real work (e.g. create the runner) but answer with the injected response.
    pub apply: bool,
}

#[derive(Debug, Clone)]
pub struct FakeRunner {
    pub id: u64,
    pub name: String,
    pub labels: Vec<String>,
    pub group: u64,
    pub busy: bool,
    pub online: bool,
}

#[derive(Debug, Clone)]
pub struct Registration {
    pub name: String,
    pub labels: Vec<String>,
    pub runner_group_id: u64,
    pub work_folder: Option<String>,
    pub at: SystemTime,
}

/// One request the fake answered.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub endpoint: &'static str,
    pub status: u16,
}

/// A workflow run the fake knows (for trust decisions).
#[derive(Debug, Clone)]
pub struct FakeRun {
    pub repository: String,
    pub repository_id: u64,
    pub default_branch: String,
    pub id: u64,
    pub run_attempt: u64,
    pub event: String,
    pub head_branch: String,
    /// The run's commit (40 hex digits).
    pub head_sha: String,
    pub head_repository: String,
    pub head_repository_id: u64,
    /// (job id, status, runner name)
    pub jobs: Vec<(u64, String, String)>,
}

#[derive(Debug, Default)]
pub struct State {
    pub base_url: String,
    pub app_id: String,
    pub public_pem: Vec<u8>,
    pub installation_id: u64,
    pub pat: Option<String>,
    pub token_ttl: Duration,
    pub tokens: HashMap<String, SystemTime>,
    pub runners: BTreeMap<u64, FakeRunner>,
    pub next_id: u64,
    pub jobs: VecDeque<FakeJob>,
    pub injections: VecDeque<Injection>,
    pub calls: Vec<Call>,
    pub registrations: Vec<Registration>,
    /// Results reported by fake listeners: (runner name, result, exit).
    pub completed: Vec<(String, String, i64)>,
    /// Job summaries the runners uploaded (their steps' `GITHUB_STEP_SUMMARY`), by runner name.
    pub summaries: HashMap<String, String>,
    /// Most runners alive at once, per label.
    pub max_alive: HashMap<String, usize>,
    pub rate_remaining: u64,
    pub runs: Vec<FakeRun>,
    /// Branch histories, oldest commit first: (`OWNER/REPO`, branch) → commits.
    pub branches: HashMap<(String, String), Vec<String>>,
    /// Jobs handed to runners that have not started them; back to the queue if the runner is
    /// deleted while idle (GitHub assigns jobs to listeners, not to registrations).
    pub assigned: HashMap<u64, FakeJob>,
}

impl State {
    fn alive_with(&self, label: &str) -> usize {
        self.runners
            .values()
            .filter(|r| r.labels.iter().any(|l| l == label))
            .count()
    }
    fn note_alive(&mut self) {
        let labels: Vec<String> = self
            .runners
            .values()
            .flat_map(|r| r.labels.clone())
            .collect();
        for l in labels {
            let n = self.alive_with(&l);
            let e = self.max_alive.entry(l).or_default();
            *e = (*e).max(n);
        }
    }
    /// Requests answered for one endpoint.
    pub fn count(&self, endpoint: &str) -> usize {
        self.calls.iter().filter(|c| c.endpoint == endpoint).count()
    }
}

/// A running fake; the server stops when this is dropped.
#[derive(Debug)]
pub struct FakeGitHub {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

/// An RSA key pair for the App (private PEM, public PEM), made once per process with openssl.
pub fn app_key() -> (Vec<u8>, Vec<u8>) {
    static KEY: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fake-github-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("key dir");
        let key = dir.join("app.pem");
        let ok = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl (apt-get install openssl)");
        assert!(ok.success(), "openssl genpkey failed");
        let public = std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .output()
            .expect("openssl pkey");
        let private = std::fs::read(&key).expect("read key");
        let _ = std::fs::remove_dir_all(&dir);
        (private, public.stdout)
    })
    .clone()
}

pub const APP_ID: &str = "Iv1.flywheeltest";
pub const INSTALLATION_ID: u64 = 4242;

impl FakeGitHub {
    /// Two runs of `tinyland/flywheel`: 101, a push to main (its commit the head of main), and
    /// 102, a pull request from a fork.
    pub fn push_and_fork_pr_runs(&self) {
        self.with(|s| {
            for (id, event, head) in [(101, "push", 10), (102, "pull_request", 99)] {
                s.runs.push(FakeRun {
                    repository: "tinyland/flywheel".into(),
                    repository_id: 10,
                    default_branch: "main".into(),
                    id,
                    run_attempt: 1,
                    event: event.into(),
                    head_branch: "main".into(),
                    head_sha: format!("{id:040x}"),
                    head_repository: if head == 10 {
                        "tinyland/flywheel".into()
                    } else {
                        "someone/flywheel".into()
                    },
                    head_repository_id: head,
                    jobs: Vec::new(),
                });
            }
            s.branches.insert(
                ("tinyland/flywheel".into(), "main".into()),
                vec![format!("{:040x}", 100), format!("{:040x}", 101)],
            );
        });
    }

    /// Start on a loopback port in a thread of its own.
    pub fn start() -> FakeGitHub {
        let (_, public) = app_key();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            base_url: url.clone(),
            app_id: APP_ID.into(),
            public_pem: public,
            installation_id: INSTALLATION_ID,
            token_ttl: Duration::from_secs(3600),
            next_id: 1,
            rate_remaining: 5000,
            ..State::default()
        }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = axum::Router::new().fallback(handle).with_state(st);
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
            });
        });
        FakeGitHub {
            url,
            state,
            _shutdown: tx,
        }
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().expect("state"))
    }

    pub fn push_job(&self, job: FakeJob) {
        self.with(|s| s.jobs.push_back(job));
    }

    pub fn inject(&self, i: Injection) {
        self.with(|s| s.injections.push_back(i));
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn json_response(st: &mut State, status: u16, body: Value, extra: &[(String, String)]) -> Response {
    let mut headers = HeaderMap::new();
    st.rate_remaining = st.rate_remaining.saturating_sub(1);
    let reset = now() + 3600;
    for (k, v) in [
        ("x-ratelimit-limit", "5000".to_owned()),
        ("x-ratelimit-remaining", st.rate_remaining.to_string()),
        ("x-ratelimit-used", (5000 - st.rate_remaining).to_string()),
        ("x-ratelimit-reset", reset.to_string()),
        ("x-ratelimit-resource", "core".to_owned()),
        ("content-type", "application/json; charset=utf-8".to_owned()),
    ] {
        headers.insert(k, v.parse().expect("header"));
    }
    for (k, v) in extra {
        headers.insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let code = StatusCode::from_u16(status).expect("status");
    let text = if status == 204 {
        String::new()
    } else {
        body.to_string()
    };
    (code, headers, text).into_response()
}

fn message(st: &mut State, status: u16, msg: &str) -> Response {
    json_response(
        st,
        status,
        json!({"message": msg, "documentation_url": "https://docs.github.com/rest"}),
        &[],
    )
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("authorization")?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("token "))
        .map(str::to_owned)
}

#[derive(serde::Deserialize)]
struct Claims {
    iat: u64,
    exp: u64,
    iss: String,
}

/// Verify the App JWT as GitHub does.
fn app_jwt_ok(st: &State, headers: &HeaderMap) -> Result<(), &'static str> {
    let token = bearer(headers).ok_or("missing bearer")?;
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(&st.public_pem).map_err(|_| "key")?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.leeway = 0;
    v.set_required_spec_claims(&["exp", "iat", "iss"]);
    let data = jsonwebtoken::decode::<Claims>(&token, &key, &v)
        .map_err(|_| "A JSON web token could not be decoded")?;
    let c = data.claims;
    let now = now();
    if c.iss != st.app_id {
        return Err("'Issuer' claim ('iss') must be an Integer or the client ID");
    }
    if c.iat > now + 1 {
        return Err("'Issued at' claim ('iat') must be an Integer representing a time in the past");
    }
    if c.exp <= c.iat || c.exp - c.iat > 600 {
        return Err("'Expiration time' claim ('exp') is too far in the future");
    }
    Ok(())
}

fn token_ok(st: &State, headers: &HeaderMap) -> bool {
    match bearer(headers) {
        Some(t) if st.pat.as_deref() == Some(t.as_str()) => true,
        Some(t) => st
            .tokens
            .get(&t)
            .is_some_and(|exp| *exp > SystemTime::now()),
        None => false,
    }
}

fn runner_json(r: &FakeRunner) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "os": "linux",
        "status": if r.online { "online" } else { "offline" },
        "busy": r.busy,
        "ephemeral": true,
        "runner_group_id": r.group,
        "labels": r.labels.iter().enumerate().map(|(i, l)| json!({"id": i + 1, "name": l, "type": "custom"})).collect::<Vec<_>>(),
    })
}

fn classify(method: &Method, segs: &[&str]) -> &'static str {
    let scope_len = match segs.first() {
        Some(&"orgs") | Some(&"enterprises") => 2,
        Some(&"repos") => 3,
        _ => 0,
    };
    let rest = if scope_len > 0 && segs.len() >= scope_len {
        &segs[scope_len..]
    } else {
        segs
    };
    match (method.as_str(), segs.first().copied(), rest) {
        ("POST", Some("app"), _) => "create-installation-token",
        ("POST", Some("_fake"), _) | ("GET", Some("_fake"), _) => "fake",
        ("GET", _, ["installation"]) => "get-installation",
        ("POST", _, ["actions", "runners", "generate-jitconfig"]) => "generate-jitconfig",
        ("GET", _, ["actions", "runners"]) => "list-runners",
        ("GET", _, ["actions", "runners", _]) => "get-runner",
        ("DELETE", _, ["actions", "runners", _]) => "delete-runner",
        ("GET", Some("repos"), []) => "get-repository",
        ("GET", Some("repos"), ["actions", "runs", _]) => "get-run",
        ("GET", Some("repos"), ["actions", "runs", _, "jobs"]) => "list-run-jobs",
        ("GET", Some("repos"), ["compare", _]) => "compare-commits",
        _ => "unknown",
    }
}

async fn handle(
    AxState(st): AxState<Arc<Mutex<State>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let endpoint = classify(&method, &segs);
    let injected = {
        let mut s = st.lock().expect("state");
        match s.injections.front() {
            Some(i) if i.endpoint == endpoint => s.injections.pop_front(),
            _ => None,
        }
    };
    if let Some(i) = &injected {
        if i.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(i.delay_ms)).await;
        }
    }
    let mut s = st.lock().expect("state");
    let mut resp = match &injected {
        Some(i) if !i.apply => json_response_raw(&mut s, i),
        _ => route(&mut s, &method, &uri, &segs, endpoint, &headers, &body),
    };
    if let Some(i) = injected.filter(|i| i.apply) {
        resp = json_response_raw(&mut s, &i);
    }
    let status = resp.status().as_u16();
    s.calls.push(Call {
        method: method.to_string(),
        path,
        endpoint,
        status,
    });
    resp
}

fn json_response_raw(st: &mut State, i: &Injection) -> Response {
    let mut r = json_response(st, i.status, Value::Null, &i.headers);
    *r.body_mut() = axum::body::Body::from(i.body.clone());
    r
}

fn route(
    s: &mut State,
    method: &Method,
    uri: &Uri,
    segs: &[&str],
    endpoint: &'static str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    match endpoint {
        "get-installation" => match app_jwt_ok(s, headers) {
            Ok(()) => {
                let id = s.installation_id;
                json_response(
                    s,
                    200,
                    json!({"id": id, "app_id": 1, "target_type": "Organization"}),
                    &[],
                )
            }
            Err(m) => message(s, 401, m),
        },
        "create-installation-token" => {
            if let Err(m) = app_jwt_ok(s, headers) {
                return message(s, 401, m);
            }
            let asked: u64 = segs.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
            if asked != s.installation_id || segs.get(3) != Some(&"access_tokens") {
                return message(s, 404, "Not Found");
            }
            let token = format!("ghs_{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            let expires = SystemTime::now() + s.token_ttl;
            s.tokens.insert(token.clone(), expires);
            let expires_at = humantime_rfc3339(expires);
            json_response(
                s,
                201,
                json!({"token": token, "expires_at": expires_at, "permissions": {"organization_self_hosted_runners": "write"}, "repository_selection": "all"}),
                &[],
            )
        }
        "fake" => fake_report(s, segs, body),
        "unknown" => message(s, 404, "Not Found"),
        _ => {
            if !token_ok(s, headers) {
                return message(s, 401, "Bad credentials");
            }
            match endpoint {
                "generate-jitconfig" => generate(s, body),
                "list-runners" => list(s, uri),
                "get-runner" | "delete-runner" => {
                    let id: u64 = segs.last().and_then(|v| v.parse().ok()).unwrap_or(0);
                    match (method.as_str(), s.runners.get(&id).cloned()) {
                        (_, None) => message(s, 404, "Not Found"),
                        ("GET", Some(r)) => json_response(s, 200, runner_json(&r), &[]),
                        (_, Some(r)) if r.busy => message(
                            s,
                            422,
                            "Bad request - Runner \"busy\" is still running a job\"",
                        ),
                        _ => {
                            s.runners.remove(&id);
                            if let Some(j) = s.assigned.remove(&id) {
                                s.jobs.push_front(j);
                            }
                            json_response(s, 204, Value::Null, &[])
                        }
                    }
                }
                "get-repository" | "get-run" | "list-run-jobs" => runs(s, endpoint, segs),
                "compare-commits" => compare(s, segs),
                _ => message(s, 404, "Not Found"),
            }
        }
    }
}

fn humantime_rfc3339(t: SystemTime) -> String {
    // Seconds precision, UTC, like GitHub: 2026-11-25T15:04:05Z.
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = secs / 86400;
    let (h, m, sec) = ((secs % 86400) / 3600, (secs % 3600) / 60, secs % 60);
    // civil from days (Howard Hinnant)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{sec:02}Z")
}

fn generate(s: &mut State, body: &[u8]) -> Response {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return message(s, 400, "Problems parsing JSON");
    };
    let name = v["name"].as_str().unwrap_or_default().to_owned();
    let Some(group) = v["runner_group_id"].as_u64() else {
        return message(
            s,
            422,
            "Invalid input: object is missing required key: runner_group_id.",
        );
    };
    let labels: Vec<String> = v["labels"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|l| l.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if name.is_empty() || labels.is_empty() || labels.len() > 100 {
        return message(s, 422, "Validation Failed");
    }
    if s.runners.values().any(|r| r.name == name) {
        return message(
            s,
            409,
            &format!("Already exists - A runner with the name {name} already exists."),
        );
    }
    let work_folder = v["work_folder"].as_str().map(str::to_owned);
    s.registrations.push(Registration {
        name: name.clone(),
        labels: labels.clone(),
        runner_group_id: group,
        work_folder: work_folder.clone(),
        at: SystemTime::now(),
    });
    let id = s.next_id;
    s.next_id += 1;
    let runner = FakeRunner {
        id,
        name: name.clone(),
        labels: labels.clone(),
        group,
        busy: false,
        online: true,
    };
    s.runners.insert(id, runner.clone());
    s.note_alive();
    let job_idx = s
        .jobs
        .iter()
        .position(|j| j.labels.is_empty() || j.labels.iter().any(|l| labels.contains(l)));
    let job = job_idx.and_then(|i| s.jobs.remove(i));
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut dot_runner = json!({
        "AgentId": id,
        "AgentName": name,
        "PoolId": 1,
        "PoolName": "Default",
        "ServerUrl": s.base_url,
        "GitHubUrl": "https://github.com/tinyland",
        "WorkFolder": work_folder.unwrap_or_else(|| "_work".into()),
        "Ephemeral": true,
        "UseV2Flow": true,
    });
    if let Some(j) = job.as_ref() {
        // The run's job is now in progress on this runner, as GitHub's jobs API reports it.
        if let Some(run_id) = j
            .env
            .get("GITHUB_RUN_ID")
            .and_then(|v| v.parse::<u64>().ok())
        {
            if let Some(run) = s.runs.iter_mut().find(|r| r.id == run_id) {
                run.jobs.push((
                    run_id * 10 + run.jobs.len() as u64,
                    "in_progress".into(),
                    name.clone(),
                ));
            }
        }
    }
    if let Some(j) = job {
        s.assigned.insert(id, j.clone());
        dot_runner["FakeJob"] = json!({
            "script": j.script,
            "listener_exit": j.listener_exit,
            "env": j.env,
            "delay_ms": j.delay_ms,
        });
    }
    let files = json!({
        ".runner": b64.encode(format!("\u{feff}{dot_runner}")),
        ".credentials": b64.encode(json!({"Scheme": "OAuthAccessToken", "Data": {"token": format!("jit-secret-{id}-{:x}", fastrand::u64(..))}}).to_string()),
        ".credentials_rsaparams": b64.encode("{\"d\":\"fake\"}"),
    });
    let encoded = b64.encode(files.to_string());
    let r = runner_json(&runner);
    json_response(
        s,
        201,
        json!({"runner": r, "encoded_jit_config": encoded}),
        &[],
    )
}

fn list(s: &mut State, uri: &Uri) -> Response {
    let q: HashMap<String, String> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace("%2F", "/").replace("%20", " ")))
        .collect();
    let per_page: usize = q
        .get("per_page")
        .and_then(|v| v.parse().ok())
        .unwrap_or(30)
        .clamp(1, 100);
    let page: usize = q
        .get("page")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let all: Vec<Value> = s
        .runners
        .values()
        .filter(|r| q.get("name").is_none_or(|n| &r.name == n))
        .map(runner_json)
        .collect();
    let total = all.len();
    let items: Vec<Value> = all
        .into_iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .collect();
    json_response(s, 200, json!({"total_count": total, "runners": items}), &[])
}

fn fake_report(s: &mut State, segs: &[&str], body: &[u8]) -> Response {
    if segs.get(1) == Some(&"stats") {
        let mut by: BTreeMap<&str, usize> = BTreeMap::new();
        for c in &s.calls {
            *by.entry(c.endpoint).or_default() += 1;
        }
        let body = json!({
            "calls": by,
            "registrations": s.registrations.len(),
            "completed": s.completed.len(),
            "alive": s.runners.len(),
            "queued": s.jobs.len(),
        });
        return json_response(s, 200, body, &[]);
    }
    let id: u64 = segs.get(2).and_then(|v| v.parse().ok()).unwrap_or(0);
    match segs.get(3) {
        Some(&"busy") => {
            if let Some(r) = s.runners.get_mut(&id) {
                r.busy = true;
            }
            s.assigned.remove(&id);
        }
        Some(&"done") => {
            let v: Value = serde_json::from_slice(body).unwrap_or_default();
            // An ephemeral runner is removed by GitHub after its job.
            if let Some(r) = s.runners.remove(&id) {
                if let Some(md) = v["summary"].as_str().filter(|m| !m.is_empty()) {
                    s.summaries.insert(r.name.clone(), md.to_owned());
                }
                s.completed.push((
                    r.name,
                    v["result"].as_str().unwrap_or_default().to_owned(),
                    v["exit"].as_i64().unwrap_or(-1),
                ));
            }
        }
        _ => {}
    }
    (StatusCode::NO_CONTENT, "").into_response()
}

fn runs(s: &mut State, endpoint: &str, segs: &[&str]) -> Response {
    let repo = format!(
        "{}/{}",
        segs.get(1).unwrap_or(&""),
        segs.get(2).unwrap_or(&"")
    );
    let run_id: u64 = segs.get(5).and_then(|v| v.parse().ok()).unwrap_or(0);
    let found = s
        .runs
        .iter()
        .find(|r| r.repository == repo && (endpoint == "get-repository" || r.id == run_id))
        .cloned();
    let Some(r) = found else {
        return message(s, 404, "Not Found");
    };
    let repo_json = json!({"id": r.repository_id, "full_name": r.repository, "default_branch": r.default_branch, "fork": false});
    match endpoint {
        "get-repository" => json_response(s, 200, repo_json, &[]),
        "get-run" => {
            let head = json!({"id": r.head_repository_id, "full_name": r.head_repository, "fork": r.head_repository_id != r.repository_id});
            // GitHub's run object carries a minimal repository without default_branch.
            let body = json!({
                "id": r.id, "run_attempt": r.run_attempt, "event": r.event, "head_branch": r.head_branch,
                "head_sha": r.head_sha, "status": "in_progress",
                "repository": {"id": r.repository_id, "full_name": r.repository, "fork": false},
                "head_repository": head, "pull_requests": [],
            });
            json_response(s, 200, body, &[])
        }
        _ => {
            let jobs: Vec<Value> = r
                .jobs
                .iter()
                .map(|(id, status, runner)| json!({"id": id, "run_id": r.id, "run_attempt": r.run_attempt, "status": status, "runner_name": runner, "runner_id": 1, "head_branch": r.head_branch, "labels": []}))
                .collect();
            let total = jobs.len();
            json_response(s, 200, json!({"total_count": total, "jobs": jobs}), &[])
        }
    }
}

/// `compare/{base}...{head}`: `base` a branch, `head` a commit.
fn compare(s: &mut State, segs: &[&str]) -> Response {
    let repo = format!(
        "{}/{}",
        segs.get(1).unwrap_or(&""),
        segs.get(2).unwrap_or(&"")
    );
    let spec = segs.get(4).copied().unwrap_or_default().replace("%2F", "/");
    let Some((base, head)) = spec.split_once("...") else {
        return message(s, 404, "Not Found");
    };
    let Some(history) = s.branches.get(&(repo.clone(), base.to_owned())).cloned() else {
        return message(s, 404, "Not Found");
    };
    let known = s
        .runs
        .iter()
        .any(|r| r.repository == repo && r.head_sha == head)
        || s.branches.values().any(|h| h.iter().any(|c| c == head));
    let status = match history.iter().position(|c| c == head) {
        Some(i) if i + 1 == history.len() => "identical",
        Some(_) => "behind",
        None if known => "diverged",
        None => return message(s, 404, &format!("No commit found for SHA: {head}")),
    };
    json_response(
        s,
        200,
        json!({"status": status, "ahead_by": 0, "behind_by": 0, "total_commits": 0, "commits": [], "files": []}),
        &[],
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        assert_eq!(super::humantime_rfc3339(t), "2026-11-18T11:06:40Z");
    }
}
