//! The runner's job hooks and the agent's answer to them.
//!
//! Each runner's `.env` points `ACTIONS_RUNNER_HOOK_JOB_STARTED` / `…_COMPLETED` at root-owned
//! scripts that run `flywheel-agent hook job-started|job-completed`. Those talk to the agent
//! over a per-runner unix socket: bound into the runner's own mount namespace at a fixed path
//! (every other runner's socket is under an empty tmpfs there), answered only for the runner's
//! uid, and `job-started` is answered once — the hook runs before any step of the job, so the
//! job can neither ask again nor ask for another runner.
//!
//! On `job-started` the agent asks GitHub about the run (the job's `GITHUB_*` variables only say
//! which run), decides with [`crate::trust::decide`], and hands out the least it can: a push
//! token only to a trusted job (into a job-private attic client config the hook writes with
//! mode 0600), a pull-only token to untrusted jobs only when the cache is private (into the
//! job's nix-daemon's root-only netrc), nothing otherwise.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_jit_config::{Client, Secret};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tracing::{info, warn};

use crate::attic::{self, SigningKey, TokenRequest};
use crate::config::{AtticSettings, Lane};
use crate::envelope::JobProbe;
use crate::size::Bytes;
use crate::telemetry::Telemetry;
use crate::trust::{self, Claims, Decision, Policy};

/// What the hook sends.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HookRequest {
    pub op: String,
    pub repository: String,
    pub run_id: String,
    pub run_attempt: String,
    pub event_name: String,
    pub git_ref: String,
}

impl HookRequest {
    /// What the job claims, for the trust decision (never trusted on its own); the runner's
    /// name is the agent's.
    pub fn claims(&self, runner_name: &str) -> Claims {
        Claims {
            repository: self.repository.clone(),
            run_id: self.run_id.parse().unwrap_or(0),
            run_attempt: self.run_attempt.parse().unwrap_or(0),
            event_name: self.event_name.clone(),
            git_ref: self.git_ref.clone(),
            runner_name: runner_name.to_owned(),
        }
    }
}

/// What the agent answers. `attic_config` is a secret: the hook writes it to a 0600 file.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HookResponse {
    pub ok: bool,
    pub lines: Vec<String>,
    #[serde(with = "secret_text", default)]
    pub attic_config: Option<Secret<String>>,
    pub xdg_config_home: Option<String>,
    /// The job summary (Markdown) for `$GITHUB_STEP_SUMMARY`.
    #[serde(default)]
    pub summary: Option<String>,
    /// The hook exits non-zero, which fails the job (its store could not be opened).
    #[serde(default)]
    pub fail: bool,
}

/// A secret on the hook's wire: the one place it is written out (to the job it belongs to).
mod secret_text {
    use flywheel_jit_config::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Secret<String>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => s.serialize_some(t.expose()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Secret<String>>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(Secret::new))
    }
}

/// Credentials the agent can hand out.
#[derive(Debug, Clone)]
pub enum AtticCredential {
    Sign(SigningKey),
    Static(Secret<String>),
    None,
}

impl AtticCredential {
    /// How the agent itself pushes with this credential; `None` without one.
    pub fn publish_auth(&self) -> Option<crate::publish::Auth> {
        match self {
            AtticCredential::Sign(k) => Some(crate::publish::Auth::Sign(k.clone())),
            AtticCredential::Static(t) => Some(crate::publish::Auth::Static(t.clone())),
            AtticCredential::None => None,
        }
    }

    pub fn load(a: &AtticSettings) -> Result<AtticCredential, String> {
        if let Some(k) = &a.signing_key_file {
            return SigningKey::load(k)
                .map(AtticCredential::Sign)
                .map_err(|e| e.to_string());
        }
        if let Some(t) = &a.push_token_file {
            let text = std::fs::read_to_string(t)
                .map_err(|e| format!("attic.push_token_file {}: {e}", t.display()))?;
            return Ok(AtticCredential::Static(Secret::new(text.trim().to_owned())));
        }
        Ok(AtticCredential::None)
    }
}

/// One runner's hook service.
#[derive(Debug, Clone)]
pub struct RunnerHooks {
    pub runner_name: String,
    pub lane: Lane,
    /// The smallest lane with a larger envelope, for the OOM advice.
    pub bigger_lane: Option<(String, u64)>,
    pub host_cpus: u32,
    pub probe: JobProbe,
    /// The job's nix-daemon reads cache credentials from here (root-only).
    pub netrc: PathBuf,
    pub github: Option<Arc<Client>>,
    pub attic: AtticSettings,
    pub credential: AtticCredential,
    pub telemetry: Arc<Telemetry>,
    /// The job's Bazel cache endpoint: its writes go upstream once trust allows.
    pub bazel: Option<Arc<crate::bazel::JobCache>>,
}

#[derive(Debug, Default)]
struct HookState {
    started: bool,
    completed: bool,
    /// Trust allowed this job to publish: the tokens' subject.
    publish: Option<String>,
    /// The job's builds were published (or publishing was tried) by the completed hook.
    published: bool,
    /// Held while the completed hook publishes: what comes after the job waits for it.
    publishing: Arc<tokio::sync::Mutex<()>>,
}

/// A runner's hook service, running: what the agent still needs of it after the job.
#[derive(Debug)]
pub struct Serving {
    pub task: tokio::task::JoinHandle<()>,
    hooks: Arc<RunnerHooks>,
    state: Arc<Mutex<HookState>>,
}

impl Serving {
    /// What publishes, after the listener exited, what a trusted job built when its completed
    /// hook did not (the job was cancelled, or the listener stopped), or waits for the
    /// completed hook's publication still under way: run by the envelope before the slot's
    /// store is collected or the slot handed on. Within `limit`, or, once the agent is
    /// stopping (`stop`), within what is left of the job's teardown deadline.
    pub fn leftover(&self, limit: Duration, stop: crate::envelope::Stop) -> Arc<Leftover> {
        Arc::new(Leftover {
            hooks: self.hooks.clone(),
            state: self.state.clone(),
            limit,
            stop,
        })
    }
}

/// See [`Serving::leftover`].
#[derive(Debug)]
pub struct Leftover {
    hooks: Arc<RunnerHooks>,
    state: Arc<Mutex<HookState>>,
    limit: Duration,
    stop: crate::envelope::Stop,
}

impl Leftover {
    async fn publish(&self, after: crate::envelope::Released) -> Option<String> {
        let limit = if self.stop.now.is_cancelled() || self.stop.graceful.is_cancelled() {
            self.limit.min(after.left)
        } else {
            self.limit
        };
        let (grant, busy) = {
            let mut s = self.state.lock().ok()?;
            let grant = if s.published {
                None
            } else {
                s.published = true;
                Some(s.publish.clone())
            };
            (grant, s.publishing.clone())
        };
        let Some(grant) = grant else {
            // The completed hook answered, or is still publishing: wait for it.
            if busy.try_lock().is_ok() {
                return None;
            }
            return Some(match tokio::time::timeout(limit, busy.lock()).await {
                Ok(_) => "after the job: the completed hook's publication finished".into(),
                Err(_) => format!(
                    "left unpublished: the completed hook's publication did not finish within {} s",
                    limit.as_secs()
                ),
            });
        };
        let sub = grant?;
        match tokio::time::timeout(limit, publish(&self.hooks, &sub, after.oom)).await {
            Ok(line) => Some(format!("after the job: {line}")),
            Err(_) => Some(format!(
                "left unpublished: publishing did not finish within {} s",
                limit.as_secs()
            )),
        }
    }
}

impl crate::envelope::BeforeRelease for Leftover {
    fn run(
        &self,
        after: crate::envelope::Released,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + '_>> {
        Box::pin(self.publish(after))
    }
}

/// Make the root-owned hook scripts the runners' `.env` points at.
pub fn write_hook_scripts(state_dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let dir = state_dir.join("hooks");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let exe = std::env::current_exe()?;
    let mut paths = Vec::new();
    for op in ["job-started", "job-completed"] {
        let p = dir.join(format!("{op}.sh"));
        let tmp = dir.join(format!(".{op}.sh.tmp"));
        std::fs::write(&tmp, format!("#!/bin/sh\n# Written by flywheel-agent; runners cannot change it.\nexec '{}' hook {op}\n", exe.display()))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::rename(&tmp, &p)?;
        paths.push(p);
    }
    Ok((paths[0].clone(), paths[1].clone()))
}

/// Where jobs find their hook socket, and where the per-runner socket directories live.
pub fn socket_seen(state_dir: &Path) -> PathBuf {
    state_dir.join("hook")
}

pub fn sockets_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("hook-sockets")
}

/// The largest hook request: a few `GITHUB_*` values.
const MAX_REQUEST: usize = 16 * 1024;
/// Connections of one runner's job answered at once; more are closed at once.
const MAX_CONNECTIONS: usize = 4;
/// How long a connection may take to send its request.
const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Listen on `<dir>/socket` for this runner's hooks until the returned task is aborted.
///
/// Only processes of this runner's own job cgroup are answered (the peer's pid from
/// `SO_PEERCRED`, looked up in the job's `cgroup.procs`); anyone else is closed before a
/// byte is read, so a refused caller never uses up the job's one answer. A request is at most
/// 16 KiB and must arrive within 5 s; at most 4 connections are served at once.
pub fn serve(
    dir: &Path,
    hooks: RunnerHooks,
    bg: &crate::tasks::Background,
) -> std::io::Result<Serving> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    let path = dir.join("socket");
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let state = Arc::new(Mutex::new(HookState::default()));
    let hooks = Arc::new(hooks);
    let (for_later, state_later) = (hooks.clone(), state.clone());
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let conns = bg.clone();
    let task = bg.spawn_service(async move {
        let mut backoff = crate::accept::Backoff::default();
        // Refusals are logged at 1, 2, 4, 8, … so a flood cannot flood the log too.
        let (mut outsiders, mut excess) = (0u64, 0u64);
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => {
                    backoff.accepted();
                    s
                }
                Err(e) => {
                    warn!(runner = %hooks.runner_name, error = %e, wait_ms = backoff.next_wait().as_millis() as u64, "cannot accept a hook connection");
                    backoff.failed().await;
                    continue;
                }
            };
            let cred = stream.peer_cred().ok();
            let pid = cred.and_then(|c| c.pid());
            if !pid.is_some_and(|p| hooks.probe.contains(p)) {
                outsiders += 1;
                if outsiders.is_power_of_two() {
                    warn!(
                        runner = %hooks.runner_name,
                        peer_pid = pid.unwrap_or(0),
                        peer_uid = cred.map_or(u32::MAX, |c| c.uid()),
                        refused = outsiders,
                        "refused a hook connection from outside this runner's job"
                    );
                }
                let _ = stream.try_write(b"{\"ok\":false,\"lines\":[\"flywheel: not a process of this runner's job\"]}\n");
                continue;
            }
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                excess += 1;
                if excess.is_power_of_two() {
                    warn!(runner = %hooks.runner_name, closed = excess, "too many hook connections at once; closed the excess");
                }
                continue;
            };
            let (hooks, state) = (hooks.clone(), state.clone());
            conns.spawn(async move {
                let _permit = permit;
                let (r, mut w) = stream.into_split();
                let answer = match read_request(r).await {
                    Ok(req) => handle(&hooks, &state, req).await,
                    Err(why) => refuse(why),
                };
                let text = serde_json::to_string(&answer).unwrap_or_default();
                let _ = tokio::time::timeout(READ_DEADLINE, async {
                    w.write_all(text.as_bytes()).await?;
                    w.write_all(b"\n").await
                })
                .await;
            });
        }
    });
    Ok(Serving {
        task,
        hooks: for_later,
        state: state_later,
    })
}

/// One request line: at most [`MAX_REQUEST`] bytes within [`READ_DEADLINE`].
async fn read_request(r: impl tokio::io::AsyncRead + Unpin) -> Result<HookRequest, String> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let limited = r.take(MAX_REQUEST as u64 + 1);
    let read = tokio::time::timeout(
        READ_DEADLINE,
        tokio::io::BufReader::new(limited).read_until(b'\n', &mut buf),
    )
    .await;
    match read {
        Err(_) => Err(format!("no request within {} s", READ_DEADLINE.as_secs())),
        Ok(Err(e)) => Err(format!("cannot read the request: {e}")),
        Ok(Ok(0)) => Err("no request".into()),
        Ok(Ok(_)) if buf.len() > MAX_REQUEST => {
            Err(format!("a hook request is at most {MAX_REQUEST} bytes"))
        }
        Ok(Ok(_)) => serde_json::from_slice(&buf).map_err(|e| format!("not a hook request: {e}")),
    }
}

fn refuse(why: String) -> HookResponse {
    HookResponse {
        ok: false,
        lines: vec![format!("flywheel: {why}")],
        ..HookResponse::default()
    }
}

async fn handle(h: &RunnerHooks, state: &Mutex<HookState>, req: HookRequest) -> HookResponse {
    let first = {
        let Ok(mut s) = state.lock() else {
            return refuse("internal error".into());
        };
        match req.op.as_str() {
            "job-started" if s.started => false,
            "job-started" => {
                s.started = true;
                true
            }
            "job-completed" if s.completed || !s.started => false,
            "job-completed" => {
                s.completed = true;
                true
            }
            _ => return refuse(format!("unknown hook {:?}", req.op)),
        }
    };
    if !first {
        warn!(runner = %h.runner_name, op = %req.op, "refused a repeated hook request");
        return refuse(format!(
            "{} was already answered for this runner; a job gets one",
            req.op
        ));
    }
    match req.op.as_str() {
        "job-started" => {
            let (resp, grant) = job_started(h, req).await;
            if let Ok(mut s) = state.lock() {
                s.publish = grant;
            }
            resp
        }
        _ => {
            // Held until the answer is ready, taken before `published` is set: the envelope's
            // work after the job sees either "not published" or a publication it can await.
            let busy = match state.lock() {
                Ok(s) => s.publishing.clone(),
                Err(_) => return refuse("internal error".into()),
            };
            let _publishing = busy.lock_owned().await;
            let grant = state.lock().ok().and_then(|mut s| {
                s.published = true;
                s.publish.clone()
            });
            job_completed(h, grant).await
        }
    }
}

/// The job-started answer, and the publishing grant when trust allowed it.
async fn job_started(h: &RunnerHooks, req: HookRequest) -> (HookResponse, Option<String>) {
    let lane = &h.lane;
    let mut lines = vec![format!(
        "flywheel: lane {}, memory envelope {}",
        lane.name,
        Bytes(lane.memory_bytes)
    )];
    for n in h.probe.notes() {
        lines.push(format!("flywheel: {n}"));
    }
    let cache_url = crate::hints::attic_cache_url(lane);
    lines.push(match &cache_url {
        Some(u) => format!("flywheel: cache {u}"),
        None => "flywheel: cache: none configured for this lane".into(),
    });
    let claims = req.claims(&h.runner_name);
    let policy = Policy {
        repositories: h.attic.publish_repositories.clone(),
        trusted_events: h.attic.trusted_events.clone(),
    };
    let facts = match &h.github {
        None => Err("this agent has no [github] to ask".to_owned()),
        Some(_) if claims.run_id == 0 => Err("the job has no GITHUB_RUN_ID".to_owned()),
        Some(g) => match tokio::time::timeout(
            Duration::from_secs(30),
            g.run_facts(&claims.repository, claims.run_id),
        )
        .await
        {
            Ok(Ok(f)) => Ok(f),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 30 s".to_owned()),
        },
    };
    let decision = trust::decide(&policy, &claims, facts.as_ref().map_err(String::as_str));
    // A repository that publishes, on an event that publishes, on its default branch (as far as
    // GitHub said), expected to publish: a denial is worth a warning on the run's page.
    let expected = policy
        .repositories
        .iter()
        .any(|r| r.eq_ignore_ascii_case(&claims.repository))
        && policy.trusted_events.contains(&claims.event_name)
        && facts.as_ref().map_or(true, |f| {
            claims.git_ref == format!("refs/heads/{}", f.default_branch)
        });
    if let (Decision::ReadOnly { .. }, true) = (&decision, expected) {
        lines.push(crate::summary::annotation(
            "warning",
            &format!("Not published to the cache of lane {}", lane.name),
            &decision.line(),
        ));
    }
    info!(runner = %h.runner_name, repository = %claims.repository, run = claims.run_id, decision = %decision.line(), "trust decided");
    // One decision for every layer: only a job trusted to publish to Attic writes Bazel's cache
    // or the shared warm store.
    let trusted = matches!(decision, Decision::Push { .. });
    if let Some(b) = &h.bazel {
        if trusted {
            b.allow_writes();
        }
        lines.push(b.started_line());
    }
    // The job's store and daemon, now that its trust is known: the shared warm store for a job
    // trusted to publish, a throwaway layer for any other. Before this the job saw no store.
    match h.probe.open_store(trusted).await {
        None => {}
        Some(Ok(line)) => lines.push(format!("flywheel: {line}")),
        Some(Err(e)) => {
            warn!(runner = %h.runner_name, error = %e, "the job's store could not be opened; the job fails");
            lines.push(crate::summary::annotation(
                "error",
                &format!("No Nix store for this job on lane {}", lane.name),
                &e,
            ));
            let resp = HookResponse {
                ok: false,
                fail: true,
                lines,
                ..HookResponse::default()
            };
            return (resp, None);
        }
    }
    let mut resp = HookResponse {
        ok: true,
        ..HookResponse::default()
    };
    let (Some(server), Some(cache)) = (
        lane.hints.attic_server.clone(),
        lane.hints.attic_cache.clone(),
    ) else {
        lines.push(format!(
            "flywheel: {} (no cache to publish to)",
            decision.line()
        ));
        resp.lines = lines;
        return (resp, None);
    };
    let sub = format!(
        "flywheel:{}:run/{}/{}:runner/{}",
        claims.repository, claims.run_id, claims.run_attempt, h.runner_name
    );
    let mut grant = None;
    let token = |push: bool| -> Result<Option<Secret<String>>, String> {
        match &h.credential {
            AtticCredential::Sign(k) => attic::mint(
                k,
                &TokenRequest {
                    cache: cache.clone(),
                    sub: sub.clone(),
                    validity: h.attic.token_validity,
                    push,
                },
            )
            .map(Some)
            .map_err(|e| e.to_string()),
            AtticCredential::Static(t) if push => Ok(Some(t.clone())),
            _ => Ok(None),
        }
    };
    match &decision {
        Decision::Push { .. } => {
            // The daemon reads a private cache with a pull token, as every job's does.
            if !h.attic.public {
                if let Ok(Some(t)) = token(false) {
                    h.telemetry.attic_token_minted("pull");
                    write_netrc(&h.netrc, &attic::netrc(&server, &t));
                }
            }
            let mut how = Vec::new();
            if h.attic.publish && !matches!(h.credential, AtticCredential::None) {
                grant = Some(sub.clone());
                how.push("the agent publishes what this job builds when it ends".to_owned());
            }
            if h.attic.push_token_to_jobs {
                match token(true) {
                    Ok(Some(t)) => {
                        h.telemetry.attic_token_minted("push");
                        let root = h
                            .probe
                            .job_name()
                            .map(|j| lane.work_root.join(j))
                            .unwrap_or_default();
                        let xdg = root.join(".flywheel-xdg");
                        resp.attic_config = Some(attic::client_config(&server, &t));
                        resp.xdg_config_home = Some(xdg.display().to_string());
                        how.push(format!(
                            "a push token valid {} is in $XDG_CONFIG_HOME/attic/config.toml",
                            humanize(h.attic.token_validity)
                        ));
                    }
                    Ok(None) => {}
                    Err(e) => how.push(format!("no push token for the job: {e}")),
                }
            }
            lines.push(match how.as_slice() {
                [] => format!(
                    "flywheel: {} — but this agent holds no push credential or publishing is off",
                    decision.line()
                ),
                _ => format!("flywheel: {}; {}", decision.line(), how.join("; ")),
            });
        }
        Decision::ReadOnly { .. } => {
            if !h.attic.public {
                if let Ok(Some(t)) = token(false) {
                    h.telemetry.attic_token_minted("pull");
                    write_netrc(&h.netrc, &attic::netrc(&server, &t));
                }
            }
            lines.push(format!("flywheel: {}", decision.line()));
        }
    }
    resp.lines = lines;
    (resp, grant)
}

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

fn write_netrc(path: &Path, content: &Secret<String>) {
    use std::io::Write;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode_0600()
        .open(path);
    match f {
        Ok(mut f) => {
            if let Err(e) = f.write_all(content.expose().as_bytes()) {
                warn!(error = %e, "cannot write the job's netrc");
            }
        }
        Err(e) => warn!(error = %e, path = %path.display(), "cannot write the job's netrc"),
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}

impl Mode0600 for std::fs::OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        std::os::unix::fs::OpenOptionsExt::mode(self, 0o600)
    }
}

async fn job_completed(h: &RunnerHooks, grant: Option<String>) -> HookResponse {
    let mut report = job_report(h).await;
    let published = match grant {
        Some(sub) => Some(publish(h, &sub, report.oom.is_some()).await),
        None => None,
    };
    report.published = published.clone();
    // The text is linear in the job's builds (as many as its daemon logged): rendered on a
    // blocking thread. The verdict and the annotations do not read what was published.
    let rendered = tokio::task::spawn_blocking(move || {
        let verdict = crate::summary::verdict(&report);
        let annotations = crate::summary::annotations(&report);
        (
            verdict,
            annotations,
            crate::summary::markdown(&report),
            report.oom_verdict(),
        )
    })
    .await;
    let Ok((verdict, annotations, mut summary, oom)) = rendered else {
        return refuse("the job's summary could not be rendered".into());
    };
    let mut lines = vec![format!("flywheel: {verdict}")];
    // Annotations: on the run's page without opening the log.
    lines.extend(oom);
    lines.extend(annotations);
    if let Some(line) = published {
        lines.push(format!("flywheel: {line}"));
    }
    if let Some(b) = &h.bazel {
        let t = b.tally();
        lines.push(format!("flywheel: {}", crate::summary::bazel_line(&t)));
        summary.push_str(&crate::summary::bazel_section(&t));
    }
    HookResponse {
        ok: true,
        lines,
        summary: Some(summary),
        ..HookResponse::default()
    }
}

/// Publish what the job's daemon built; the line for its block. Never fails the job.
async fn publish(h: &RunnerHooks, sub: &str, oom: bool) -> String {
    let lane = &h.lane.name;
    let (Some(server), Some(cache)) = (&h.lane.hints.attic_server, &h.lane.hints.attic_cache)
    else {
        return "nothing published: the lane has no cache".into();
    };
    if oom && !h.attic.publish_after_oom {
        return "nothing published: the job ran out of memory (attic.publish_after_oom = false)"
            .into();
    }
    let facts = h.probe.facts();
    let Some(root) = facts.nix_root else {
        return "nothing published: the job had no Nix store".into();
    };
    let Some(auth) = h.credential.publish_auth() else {
        return "nothing published: this agent holds no push credential".into();
    };
    // The record and the closure walk read files and the store's database: on a blocking
    // thread, through the store's facade.
    let selected = match crate::store::record(facts.built.clone()).await {
        Ok(built) => crate::publish::to_publish(&root, &built, &h.attic.upstream_keys).await,
        Err(e) => Err(e.into()),
    };
    let paths = match selected {
        Ok(p) => p,
        Err(e) => {
            h.telemetry.publish_failed(lane, e.reason());
            warn!(runner = %h.runner_name, error = %e, "cannot tell what the job built");
            return format!("nothing published: {e}");
        }
    };
    if paths.paths.is_empty() && paths.unusable.is_empty() {
        return "nothing published: the job built nothing".into();
    }
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => return format!("nothing published: {e}"),
    };
    let p = crate::publish::Publisher {
        http,
        server: server.clone(),
        cache: cache.clone(),
        auth,
        sub: sub.to_owned(),
        limits: crate::publish::Limits::default(),
    };
    match p.publish(&paths, &root).await {
        Ok(done) => {
            h.telemetry.published(lane, done.uploaded, done.bytes);
            for _ in &done.failed {
                h.telemetry.publish_failed(lane, "path");
            }
            let line = crate::publish::line(&done, server, cache);
            info!(runner = %h.runner_name, "{line}");
            line
        }
        Err(e) => {
            h.telemetry.publish_failed(lane, e.reason());
            warn!(runner = %h.runner_name, error = %e, "publishing failed; the job's result is unchanged");
            format!("nothing published: {e}")
        }
    }
}

/// The job's report as far as it got (see [`crate::report::so_far`]).
async fn job_report(h: &RunnerHooks) -> crate::report::JobReport {
    let job = crate::report::Job {
        lane: &h.lane,
        envelope_bytes: h.lane.memory_bytes,
        host_cpus: h.host_cpus,
        nix: h.lane.nix,
        bigger_lane: h.bigger_lane.clone(),
    };
    crate::report::so_far(&job, &h.probe).await
}

/// `flywheel-agent hook job-started|job-completed`, run by the runner as the job's user.
/// Fails the job only when the agent says so (its store could not be opened): without an
/// answer the job is read-only (and, on a Nix lane, has no store).
pub fn run_hook(op: &str) -> i32 {
    use std::io::{BufRead, BufReader, Write};
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let req = HookRequest {
        op: op.to_owned(),
        repository: env("GITHUB_REPOSITORY"),
        run_id: env("GITHUB_RUN_ID"),
        run_attempt: env("GITHUB_RUN_ATTEMPT"),
        event_name: env("GITHUB_EVENT_NAME"),
        git_ref: env("GITHUB_REF"),
    };
    let socket = env("FLYWHEEL_HOOK_SOCKET");
    let mut out = std::io::stdout().lock();
    let answer = (|| -> Result<HookResponse, String> {
        let mut s = std::os::unix::net::UnixStream::connect(&socket)
            .map_err(|e| format!("cannot reach the agent at {socket:?}: {e}"))?;
        // job-completed waits for the agent to publish what the job built.
        s.set_read_timeout(Some(Duration::from_secs(if op == "job-completed" {
            3600
        } else {
            60
        })))
        .map_err(|e| e.to_string())?;
        let body = serde_json::to_string(&req).map_err(|e| e.to_string())?;
        s.write_all(body.as_bytes())
            .and_then(|()| s.write_all(b"\n"))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| format!("the agent's answer: {e}"))
    })();
    let resp = match answer {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "flywheel: {e}; this job is read-only");
            return 0;
        }
    };
    for l in &resp.lines {
        let _ = writeln!(out, "{l}");
    }
    if resp.fail {
        return 1;
    }
    if let (Some(md), Ok(file)) = (&resp.summary, std::env::var("GITHUB_STEP_SUMMARY")) {
        let written = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .and_then(|mut f| f.write_all(md.as_bytes()));
        if let Err(e) = written {
            let _ = writeln!(out, "flywheel: cannot write the job summary to {file}: {e}");
        }
    }
    if let (Some(cfg), Some(xdg)) = (resp.attic_config, &resp.xdg_config_home) {
        if let Err(e) = install_attic_config(Path::new(xdg), &cfg) {
            let _ = writeln!(
                out,
                "flywheel: cannot install the attic client config: {e}; this job is read-only"
            );
        }
    }
    0
}

fn install_attic_config(xdg: &Path, cfg: &Secret<String>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = xdg.join("attic");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join("config.toml"))?;
    f.write_all(cfg.expose().as_bytes())?;
    if let Ok(github_env) = std::env::var("GITHUB_ENV") {
        let mut e = std::fs::OpenOptions::new().append(true).open(github_env)?;
        writeln!(e, "XDG_CONFIG_HOME={}", xdg.display())?;
    }
    Ok(())
}
