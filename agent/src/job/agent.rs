//! The agent's [`World`]: GitHub for registration, the host for the hook service, the envelope
//! for the job, telemetry for the record.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use flywheel_jit_config::{Client, Deleted, Secret};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::host::Hooks;
use super::lifecycle::{Answer, Registered, World};
use super::spec::runner_spec;
use super::{PoolStats, RunContext, RunError};
use crate::config::Lane;
use crate::envelope::{self, BeforeRelease, JobOutcome, JobProbe, Stop};
use crate::hooks::HookEvent;
use crate::receipt::Receipt;
use crate::trust::Claims;

/// Who registers the runner.
#[derive(Debug)]
pub enum Registration {
    /// ARC did, and deletes it: the runner's name and JIT config.
    Given { name: String, jit: Secret<String> },
    /// The pool: a JIT runner of the lane registered here, deleted here when due.
    Pool(Pool),
}

/// What a pool's runner job shares with the pool loop.
#[derive(Debug)]
pub struct Pool {
    pub github: Arc<Client>,
    pub prefix: String,
    /// The runner's name and id, once registered, until the pool loop deleted it (draining).
    pub slot: Arc<Mutex<Option<(String, u64)>>>,
    pub drain: CancellationToken,
    pub stats: Arc<PoolStats>,
}

/// One runner job of a lane, as the agent runs it.
#[derive(Debug)]
pub struct Agent<'a> {
    pub ctx: &'a RunContext,
    pub lane: &'a Lane,
    pub probe: JobProbe,
    pub stop: Stop,
    pub registration: Registration,
    /// When the JIT config was in hand, and the task that measures the launch latency from it.
    launch: Mutex<(Option<Instant>, Option<tokio::task::JoinHandle<()>>)>,
}

impl<'a> Agent<'a> {
    pub fn new(
        ctx: &'a RunContext,
        lane: &'a Lane,
        probe: JobProbe,
        stop: Stop,
        registration: Registration,
    ) -> Agent<'a> {
        Agent {
            ctx,
            lane,
            probe,
            stop,
            registration,
            launch: Mutex::new((None, None)),
        }
    }

    fn end_launch_watch(&self) {
        if let Ok(mut l) = self.launch.lock() {
            if let Some(w) = l.1.take() {
                w.abort();
            }
        }
    }
}

/// The hook service while it is up, and the job's Bazel cache endpoint.
#[derive(Debug)]
pub struct Up {
    hooks: Hooks,
    bazel: Option<Arc<crate::bazel::JobCache>>,
}

/// Why a runner could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("no [github] configured")]
    NoGithub,
    #[error("{0}")]
    GitHub(flywheel_jit_config::GitHubError),
}

impl World for Agent<'_> {
    type Hooks = Up;
    type Outcome = JobOutcome;

    fn exit_code(o: &JobOutcome) -> i32 {
        o.code
    }

    type RegisterError = RegisterError;

    async fn register(&self) -> Result<Registered, RegisterError> {
        let pool = match &self.registration {
            Registration::Given { name, jit } => {
                return Ok(Registered {
                    name: name.clone(),
                    id: None,
                    jit: jit.clone(),
                })
            }
            Registration::Pool(p) => p,
        };
        let (ctx, lane) = (self.ctx, self.lane);
        let Some(gh) = &ctx.cfg.github else {
            return Err(RegisterError::NoGithub);
        };
        let key = format!("(registering {:08x})", fastrand::u32(..));
        ctx.telemetry.runner_started(&key, lane, self.probe.clone());
        let t_reg = Instant::now();
        let reg = pool
            .github
            .register(
                |_| super::runner_name(&pool.prefix, &lane.name),
                gh.runner_group_id,
                &lane.labels,
                "_work",
            )
            .await;
        ctx.telemetry
            .observe_phase(&lane.name, "registration", "none", t_reg.elapsed());
        let jit = match reg {
            Ok(j) => j,
            Err(e) => {
                ctx.telemetry.runner_ended(&key);
                return Err(RegisterError::GitHub(e));
            }
        };
        ctx.telemetry.runner_named(&key, &jit.runner.name);
        if let Ok(mut l) = self.launch.lock() {
            l.0 = Some(Instant::now());
        }
        pool.stats.registered.fetch_add(1, Ordering::Relaxed);
        Ok(Registered {
            name: jit.runner.name.clone(),
            id: Some(jit.runner.id),
            jit: jit.encoded,
        })
    }

    fn draining(&self) -> bool {
        match &self.registration {
            Registration::Given { .. } => false,
            Registration::Pool(p) => p.drain.is_cancelled(),
        }
    }

    fn registered(&self, name: &str, id: Option<u64>) {
        let (Registration::Pool(pool), Some(id)) = (&self.registration, id) else {
            return;
        };
        // No await between the look at the drain and this: the pool loop sees either no name
        // (and leaves the runner to this task) or the name (and deletes it itself).
        if let Ok(mut g) = pool.slot.lock() {
            *g = Some((name.to_owned(), id));
        }
        info!(runner = %name, id, "registered; starting its listener");
        // Launch latency: from the JIT config in hand to the listener's process started (the
        // envelope says when; nothing polls the cgroup).
        if let Ok(mut l) = self.launch.lock() {
            let received = l.0.unwrap_or_else(Instant::now);
            let (probe, stats) = (self.probe.clone(), pool.stats.clone());
            l.1 = Some(self.ctx.background.spawn(async move {
                probe.wait_launched().await;
                let us = u64::try_from(received.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.launch_us.fetch_add(us, Ordering::Relaxed);
            }));
        }
    }

    fn hooks_up(&self, name: &str, events: mpsc::Sender<HookEvent>) -> Result<Up, RunError> {
        let ctx = self.ctx;
        // The job's Bazel cache endpoint: read-only until its job-started hook says otherwise.
        let bazel = ctx
            .bazel
            .get(&self.lane.name)
            .map(|up| crate::bazel::JobCache::new(up.clone(), Some(ctx.telemetry.clone())));
        let receipt = Receipt::create(
            &crate::receipt::dir(&ctx.cfg.agent.state_dir),
            &self.lane.name,
        )
        .map_err(RunError::Receipt)?;
        let hooks = match Hooks::start(
            ctx,
            self.lane,
            name,
            &self.probe,
            bazel.clone(),
            events,
            receipt.clone(),
        ) {
            Ok(h) => h,
            Err(e) => {
                // What it made before it failed goes now, not at the next start (and the
                // receipt with it).
                super::host::removal(receipt, std::time::Duration::ZERO)();
                return Err(e);
            }
        };
        Ok(Up { hooks, bazel })
    }

    fn job_started(&self, up: &Up, claims: Claims) -> Answer {
        Box::pin(up.hooks.answers.clone().started(claims))
    }

    fn job_completed(&self, up: &Up) -> Answer {
        Box::pin(up.hooks.answers.clone().completed())
    }

    fn spawn_answer(&self, answer: Pin<Box<dyn Future<Output = ()> + Send + 'static>>) {
        self.ctx.background.spawn(answer);
    }

    fn leftovers(&self, up: &Up) -> Arc<dyn BeforeRelease> {
        up.hooks
            .answers
            .leftover(self.ctx.cfg.runner.drain_grace, self.stop.clone())
    }

    async fn envelope(
        &self,
        name: &str,
        jit: Secret<String>,
        up: &Up,
        leftovers: Arc<dyn BeforeRelease>,
    ) -> Result<JobOutcome, RunError> {
        let ctx = self.ctx;
        let arc = matches!(self.registration, Registration::Given { .. });
        let mut spec = runner_spec(
            ctx,
            self.lane,
            jit,
            name,
            self.probe.clone(),
            &up.hooks,
            arc,
        );
        spec.bazel = up.bazel.clone();
        spec.before_release = Some(leftovers);
        Ok(envelope::run_job(
            &ctx.cfg,
            ctx.mgr.as_ref(),
            spec,
            self.stop.clone(),
            &ctx.reaper,
        )
        .await?)
    }

    async fn hooks_down(&self, up: Up) {
        up.hooks.finish().await;
    }

    fn record(&self, name: &str, ran: Option<&Result<JobOutcome, RunError>>) {
        self.end_launch_watch();
        let (ctx, lane) = (self.ctx, self.lane);
        ctx.telemetry.runner_ended(name);
        match ran {
            // With the store paths its daemon added.
            Some(Ok(o)) => ctx.telemetry.job_finished(name, &o.report, &o.timings),
            Some(Err(_)) => ctx.telemetry.infrastructure_failure(&lane.name),
            None => {}
        }
    }

    fn still_registered(&self) -> bool {
        match &self.registration {
            Registration::Given { .. } => false,
            Registration::Pool(p) => p.slot.lock().map(|g| g.is_some()).unwrap_or(true),
        }
    }

    fn stopped(&self) -> bool {
        self.stop.graceful.is_cancelled()
    }

    async fn deregister(&self, name: &str, id: u64) {
        let Registration::Pool(pool) = &self.registration else {
            return;
        };
        match pool.github.delete_runner(id).await {
            Ok(Deleted::Deleted) => info!(runner = %name, "deleted its registration"),
            Ok(_) => {}
            Err(e) => warn!(runner = %name, error = %e, "cannot delete the runner's registration"),
        }
    }

    fn abandon(&self, name: &str, up: Option<Up>, record: bool, deregister: Option<u64>) {
        warn!(runner = %name, "the runner's job was abandoned; undoing what it set up");
        self.end_launch_watch();
        if let Some(up) = up {
            up.hooks.abandon();
        }
        if record {
            self.ctx.telemetry.runner_ended(name);
        }
        if let (Registration::Pool(pool), Some(id)) = (&self.registration, deregister) {
            let (github, name) = (pool.github.clone(), name.to_owned());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = github.delete_runner(id).await {
                        warn!(runner = %name, error = %e, "cannot delete the runner's registration");
                    }
                });
            }
        }
    }
}
