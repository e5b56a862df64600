//! The only place that orders a runner job's phases, top to bottom:
//!
//! 1. **register**: a just-in-time runner on GitHub (pool), or the one ARC gave this pod. One
//!    registered as the pool began to drain is deregistered at once and goes no further.
//! 2. **hooks up**: the job's hook socket and root-only netrc ([`super::host`]); the socket's
//!    requests come here as [`HookEvent`]s.
//! 3. **envelope**: the listener runs as a job of the lane (`envelope::run_job`: slot claimed,
//!    cgroup, launch, supervise, teardown, slot released). While it runs:
//!    - **job-started** is answered: trust decided from GitHub's answer, the job's store
//!      opened, credentials handed out ([`super::started`]);
//!    - **job-completed** is answered: the report, what a trusted job built published, the
//!      summary ([`super::completed`]);
//!    - **leftovers**: after the envelope's teardown and before its slot is released, what the
//!      completed hook did not publish is published, or its publication awaited
//!      ([`super::answers::Leftover`]).
//! 4. **hooks down**: socket, netrc, the daemon's record and build logs removed.
//! 5. **record**: the runner leaves the live table; its job goes into the metrics.
//! 6. **deregister**, when due: a runner that may still be registered (its listener failed,
//!    the agent stopped it, or the agent failed) is deleted on GitHub.
//!
//! A failure at a phase skips to what undoes the phases before it (hooks down, record,
//! deregister). A lifecycle dropped before its end (its task aborted) is undone by its guard:
//! hooks down on a thread of its own, the runner out of the live table, deregistered when due.
//! Every effect goes through [`World`] (the agent's: [`super::agent::Agent`]), so this order is
//! unit-tested against a fake.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use flywheel_jit_config::Secret;
use tokio::sync::mpsc;
use tracing::{info_span, Instrument};

use super::RunError;
use crate::envelope::BeforeRelease;
use crate::hooks::{HookEvent, HookResponse};
use crate::trust::Claims;

/// An answer to a hook, computed on a task of its own.
pub type Answer = Pin<Box<dyn Future<Output = HookResponse> + Send + 'static>>;

/// A runner registered with GitHub.
#[derive(Debug)]
pub struct Registered {
    pub name: String,
    /// Its id on GitHub, when this agent registered it (and deletes it when due); under ARC,
    /// ARC does.
    pub id: Option<u64>,
    /// Its JIT config, for the listener.
    pub jit: Secret<String>,
}

/// How a runner job's lifecycle ended.
#[derive(Debug)]
pub enum Ended<O, E> {
    /// No runner: registration failed.
    NotRegistered(E),
    /// Registered as the drain began, and deregistered again.
    Drained,
    /// The listener ran (or the agent failed to run it).
    Ran {
        name: String,
        outcome: Result<O, RunError>,
    },
}

/// What a runner job's phases do to the world. The agent's is [`super::agent::Agent`]; the
/// tests use a fake, so the order of the phases is tested without GitHub, sockets or cgroups.
pub trait World: Sync {
    /// The hook service while it is up.
    type Hooks: Send + Sync;
    /// What became of the listener's job.
    type Outcome: Send;

    /// The listener's exit status in the outcome.
    fn exit_code(o: &Self::Outcome) -> i32;

    /// Why a registration failed.
    type RegisterError: std::fmt::Debug + Send;

    fn register(&self) -> impl Future<Output = Result<Registered, Self::RegisterError>> + Send;
    /// The pool is draining: a runner registered now runs no job.
    fn draining(&self) -> bool;
    /// The runner is known to the pool (which may delete it while idle from now on).
    fn registered(&self, name: &str, id: Option<u64>);
    fn hooks_up(
        &self,
        name: &str,
        events: mpsc::Sender<HookEvent>,
    ) -> Result<Self::Hooks, RunError>;
    fn job_started(&self, hooks: &Self::Hooks, claims: Claims) -> Answer;
    fn job_completed(&self, hooks: &Self::Hooks) -> Answer;
    /// Run an answer on a task of its own (a publication may outlast the job).
    fn spawn_answer(&self, answer: Pin<Box<dyn Future<Output = ()> + Send + 'static>>);
    /// What the envelope runs after its teardown, before it releases the slot.
    fn leftovers(&self, hooks: &Self::Hooks) -> Arc<dyn BeforeRelease>;
    fn envelope(
        &self,
        name: &str,
        jit: Secret<String>,
        hooks: &Self::Hooks,
        leftovers: Arc<dyn BeforeRelease>,
    ) -> impl Future<Output = Result<Self::Outcome, RunError>> + Send;
    fn hooks_down(&self, hooks: Self::Hooks) -> impl Future<Output = ()> + Send;
    /// The runner leaves the live table; a job that ran (or failed to) goes into the metrics.
    fn record(&self, name: &str, ran: Option<&Result<Self::Outcome, RunError>>);
    /// The runner may still be registered (the pool did not delete it while draining).
    fn still_registered(&self) -> bool;
    /// The agent stopped the runner.
    fn stopped(&self) -> bool;
    fn deregister(&self, name: &str, id: u64) -> impl Future<Output = ()> + Send;
    /// The lifecycle was dropped before its end: undo at once what is still set up, without
    /// awaiting anything (`hooks` down, `record` the runner's end, `deregister`).
    fn abandon(
        &self,
        name: &str,
        hooks: Option<Self::Hooks>,
        record: bool,
        deregister: Option<u64>,
    );
}

/// Undoes what a dropped lifecycle left set up.
struct Guard<'w, W: World> {
    w: &'w W,
    name: String,
    hooks: Option<W::Hooks>,
    recorded: bool,
    /// Still to be deleted on GitHub when due.
    id: Option<u64>,
    done: bool,
}

impl<W: World> Drop for Guard<'_, W> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let id = self.id.filter(|_| self.w.still_registered());
        self.w
            .abandon(&self.name, self.hooks.take(), !self.recorded, id);
    }
}

/// One runner job's life, from its registration to its deregistration.
pub async fn run<W: World>(w: &W) -> Ended<W::Outcome, W::RegisterError> {
    // 1. register
    let reg = match w.register().instrument(info_span!("register")).await {
        Ok(r) => r,
        Err(e) => return Ended::NotRegistered(e),
    };
    let Registered { name, id, jit } = reg;
    let mut guard = Guard {
        w,
        name: name.clone(),
        hooks: None,
        recorded: false,
        id,
        done: false,
    };
    if w.draining() {
        // Deregistered here, and never made known to the pool, so the drain does not delete
        // it a second time (GitHub would answer 404).
        deregister(&mut guard, &name).await;
        w.record(&name, None);
        guard.done = true;
        return Ended::Drained;
    }
    w.registered(&name, id);

    // 2. hooks up
    let (events, mut asked) = mpsc::channel(4);
    let hooks = match info_span!("hooks").in_scope(|| w.hooks_up(&name, events)) {
        Ok(h) => guard.hooks.insert(h),
        Err(e) => {
            w.record(&name, None);
            guard.recorded = true;
            deregister(&mut guard, &name).await;
            guard.done = true;
            return Ended::Ran {
                name,
                outcome: Err(e),
            };
        }
    };

    // 3. envelope; job-started and job-completed answered meanwhile, leftovers by the envelope
    let outcome = {
        let hooks: &W::Hooks = hooks;
        let leftovers = w.leftovers(hooks);
        let envelope = w
            .envelope(&name, jit, hooks, leftovers)
            .instrument(info_span!("envelope"));
        tokio::pin!(envelope);
        loop {
            tokio::select! {
                outcome = &mut envelope => break outcome,
                Some(event) = asked.recv() => answer(w, hooks, event),
            }
        }
    };

    // 4. hooks down
    if let Some(hooks) = guard.hooks.take() {
        w.hooks_down(hooks)
            .instrument(info_span!("hooks-down"))
            .await;
    }

    // 5. record
    info_span!("record").in_scope(|| w.record(&name, Some(&outcome)));
    guard.recorded = true;

    // 6. deregister, when due: an ephemeral runner that ran its job is removed by GitHub.
    let due = match &outcome {
        Ok(o) => w.still_registered() && (W::exit_code(o) != 0 || w.stopped()),
        Err(_) => true,
    };
    if due {
        deregister(&mut guard, &name).await;
    }
    guard.done = true;
    Ended::Ran { name, outcome }
}

async fn deregister<W: World>(guard: &mut Guard<'_, W>, name: &str) {
    if let Some(id) = guard.id {
        guard
            .w
            .deregister(name, id)
            .instrument(info_span!("deregister"))
            .await;
    }
    guard.id = None;
}

/// Answer one hook request on a task of its own.
fn answer<W: World>(w: &W, hooks: &W::Hooks, event: HookEvent) {
    let (work, reply, span) = match event {
        HookEvent::Started { claims, reply } => (
            w.job_started(hooks, claims),
            reply,
            info_span!("job-started"),
        ),
        HookEvent::Completed { reply } => {
            (w.job_completed(hooks), reply, info_span!("job-completed"))
        }
    };
    w.spawn_answer(Box::pin(
        async move {
            let _ = reply.send(work.await);
        }
        .instrument(span),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Duration;

    use crate::envelope::Released;
    use crate::hooks::HookRequest;

    type Log = Arc<Mutex<Vec<String>>>;

    fn note(log: &Log, what: impl Into<String>) {
        log.lock().unwrap().push(what.into());
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Fail {
        Nothing,
        Register,
        HooksUp,
        Envelope,
    }

    /// A world that records what is done to it. Its envelope is a job that asks both hooks
    /// through the events (as the socket server would), then tears down and runs leftovers.
    struct Fake {
        log: Log,
        fail: Fail,
        /// The listener's exit status.
        code: i32,
        /// The id GitHub gave (`None`: ARC registered the runner).
        id: Option<u64>,
        draining: bool,
        stopped: bool,
        /// The job never ends after its job-started hook.
        hangs: bool,
        /// GitHub never answers the deregistration.
        deregister_hangs: bool,
    }

    fn fake() -> Fake {
        Fake {
            log: Log::default(),
            fail: Fail::Nothing,
            code: 1,
            id: Some(7),
            draining: false,
            stopped: false,
            hangs: false,
            deregister_hangs: false,
        }
    }

    struct FakeHooks {
        events: mpsc::Sender<HookEvent>,
    }

    #[derive(Debug)]
    struct FakeLeftovers(Log);

    impl BeforeRelease for FakeLeftovers {
        fn run(
            &self,
            _after: Released,
        ) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
            Box::pin(async move {
                note(&self.0, "leftovers");
                None
            })
        }
    }

    fn answered(what: &str) -> HookResponse {
        HookResponse {
            ok: true,
            lines: vec![what.to_owned()],
            ..HookResponse::default()
        }
    }

    impl World for Fake {
        type Hooks = FakeHooks;
        type Outcome = i32;

        fn exit_code(o: &i32) -> i32 {
            *o
        }
        type RegisterError = String;

        async fn register(&self) -> Result<Registered, String> {
            note(&self.log, "register");
            if self.fail == Fail::Register {
                return Err("github refused".into());
            }
            Ok(Registered {
                name: "runner-1".into(),
                id: self.id,
                jit: Secret::new("jit".into()),
            })
        }
        fn draining(&self) -> bool {
            self.draining
        }
        fn registered(&self, _name: &str, _id: Option<u64>) {
            note(&self.log, "registered");
        }
        fn hooks_up(
            &self,
            _name: &str,
            events: mpsc::Sender<HookEvent>,
        ) -> Result<FakeHooks, RunError> {
            if self.fail == Fail::HooksUp {
                note(&self.log, "hooks up fails");
                return Err(RunError::Fake("no socket"));
            }
            note(&self.log, "hooks up");
            Ok(FakeHooks { events })
        }
        fn job_started(&self, _hooks: &FakeHooks, claims: Claims) -> Answer {
            let log = self.log.clone();
            Box::pin(async move {
                note(&log, format!("job-started ({})", claims.repository));
                answered("started")
            })
        }
        fn job_completed(&self, _hooks: &FakeHooks) -> Answer {
            let log = self.log.clone();
            Box::pin(async move {
                note(&log, "job-completed");
                answered("completed")
            })
        }
        fn spawn_answer(&self, answer: Pin<Box<dyn Future<Output = ()> + Send + 'static>>) {
            tokio::spawn(answer);
        }
        fn leftovers(&self, _hooks: &FakeHooks) -> Arc<dyn BeforeRelease> {
            Arc::new(FakeLeftovers(self.log.clone()))
        }
        async fn envelope(
            &self,
            _name: &str,
            _jit: Secret<String>,
            hooks: &FakeHooks,
            leftovers: Arc<dyn BeforeRelease>,
        ) -> Result<i32, RunError> {
            note(&self.log, "envelope");
            if self.fail == Fail::Envelope {
                note(&self.log, "teardown");
                return Err(RunError::Fake("the job's cgroup"));
            }
            let ask = |started: bool| async move {
                let (reply, answer) = tokio::sync::oneshot::channel();
                let event = if started {
                    let req = HookRequest {
                        repository: "o/r".into(),
                        ..HookRequest::default()
                    };
                    HookEvent::Started {
                        claims: req.claims("runner-1"),
                        reply,
                    }
                } else {
                    HookEvent::Completed { reply }
                };
                hooks.events.send(event).await.unwrap();
                answer.await.unwrap()
            };
            let a = ask(true).await;
            note(&self.log, format!("answered {}", a.lines[0]));
            if self.hangs {
                std::future::pending::<()>().await;
            }
            let a = ask(false).await;
            note(&self.log, format!("answered {}", a.lines[0]));
            note(&self.log, "teardown");
            leftovers
                .run(Released {
                    left: Duration::from_secs(1),
                    oom: false,
                })
                .await;
            Ok(self.code)
        }
        async fn hooks_down(&self, _hooks: FakeHooks) {
            note(&self.log, "hooks down");
        }
        fn record(&self, _name: &str, ran: Option<&Result<i32, RunError>>) {
            note(
                &self.log,
                match ran {
                    None => "record (ended)",
                    Some(Ok(_)) => "record (ran)",
                    Some(Err(_)) => "record (failed)",
                },
            );
        }
        fn still_registered(&self) -> bool {
            self.id.is_some()
        }
        fn stopped(&self) -> bool {
            self.stopped
        }
        async fn deregister(&self, _name: &str, id: u64) {
            note(&self.log, format!("deregister {id}"));
            if self.deregister_hangs {
                std::future::pending::<()>().await;
            }
        }
        fn abandon(
            &self,
            _name: &str,
            hooks: Option<FakeHooks>,
            record: bool,
            deregister: Option<u64>,
        ) {
            note(
                &self.log,
                format!(
                    "abandon (hooks down: {}, record: {record}, deregister: {deregister:?})",
                    hooks.is_some()
                ),
            );
        }
    }

    fn run_fake(f: &Fake) -> Ended<i32, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A lifecycle that waits forever (an answer never given, a phase never ending) fails
        // the test instead of hanging the suite.
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(20), run(f))
                .await
                .expect("the lifecycle ended within 20 s")
        })
    }

    fn log(f: &Fake) -> Vec<String> {
        f.log.lock().unwrap().clone()
    }

    /// Registered, hooks up, the job with both hooks answered while it runs, its teardown and
    /// leftovers, hooks down, recorded, deregistered (its listener failed).
    const FULL_ORDER: [&str; 13] = [
        "register",
        "registered",
        "hooks up",
        "envelope",
        "job-started (o/r)",
        "answered started",
        "job-completed",
        "answered completed",
        "teardown",
        "leftovers",
        "hooks down",
        "record (ran)",
        "deregister 7",
    ];

    #[test]
    fn a_runner_job_goes_through_its_phases_in_the_documented_order() {
        let f = fake();
        let ended = run_fake(&f);
        assert!(
            matches!(&ended, Ended::Ran { name, outcome: Ok(1) } if name == "runner-1"),
            "{ended:?}"
        );
        assert_eq!(log(&f), FULL_ORDER);
    }

    #[test]
    fn deregistration_is_due_only_for_a_runner_that_may_still_be_registered() {
        // Its job ran and it exited cleanly: GitHub removed the ephemeral runner.
        let f = Fake { code: 0, ..fake() };
        run_fake(&f);
        assert_eq!(log(&f), FULL_ORDER[..12]);
        // Stopped by the agent: it may still be registered.
        let f = Fake {
            code: 0,
            stopped: true,
            ..fake()
        };
        run_fake(&f);
        assert_eq!(log(&f), FULL_ORDER);
        // Under ARC, ARC deletes it.
        let f = Fake { id: None, ..fake() };
        run_fake(&f);
        assert_eq!(log(&f), FULL_ORDER[..12]);
    }

    #[test]
    fn a_failed_registration_sets_up_nothing() {
        let f = Fake {
            fail: Fail::Register,
            ..fake()
        };
        let ended = run_fake(&f);
        assert!(
            matches!(&ended, Ended::NotRegistered(e) if e == "github refused"),
            "{ended:?}"
        );
        assert_eq!(log(&f), ["register"]);
    }

    #[test]
    fn a_runner_registered_as_the_drain_began_is_deregistered_at_once() {
        let f = Fake {
            draining: true,
            ..fake()
        };
        let ended = run_fake(&f);
        assert!(matches!(ended, Ended::Drained), "{ended:?}");
        assert_eq!(log(&f), ["register", "deregister 7", "record (ended)"]);
    }

    /// Hooks that cannot come up, or an envelope that fails: what the phases before set up is
    /// undone, the runner recorded as ended and deregistered (whatever its exit would have
    /// been).
    #[test]
    fn a_failure_at_a_phase_undoes_what_was_set_up_and_deregisters() {
        let cases: [(Fail, &[&str]); 2] = [
            (
                Fail::HooksUp,
                &["hooks up fails", "record (ended)", "deregister 7"],
            ),
            (
                Fail::Envelope,
                &[
                    "hooks up",
                    "envelope",
                    "teardown",
                    "hooks down",
                    "record (failed)",
                    "deregister 7",
                ],
            ),
        ];
        for (fail, after) in cases {
            let f = Fake {
                fail,
                code: 0,
                ..fake()
            };
            let ended = run_fake(&f);
            assert!(
                matches!(
                    &ended,
                    Ended::Ran {
                        outcome: Err(_),
                        ..
                    }
                ),
                "{ended:?}"
            );
            let l = log(&f);
            assert_eq!(l[..2], ["register", "registered"]);
            assert_eq!(l[2..], *after);
        }
    }

    /// Run the lifecycle until it has been stuck for 200 ms, then drop it: what was done.
    fn run_dropped(f: &Fake) -> Vec<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let ended = tokio::time::timeout(Duration::from_millis(200), run(f)).await;
            assert!(
                ended.is_err(),
                "the lifecycle was still running when dropped"
            );
        });
        log(f)
    }

    #[test]
    fn a_lifecycle_dropped_mid_job_is_undone_by_its_guard() {
        let f = Fake {
            hangs: true,
            ..fake()
        };
        assert_eq!(
            run_dropped(&f),
            [
                "register",
                "registered",
                "hooks up",
                "envelope",
                "job-started (o/r)",
                "answered started",
                "abandon (hooks down: true, record: true, deregister: Some(7))"
            ]
        );
    }

    #[test]
    fn a_lifecycle_dropped_after_its_record_only_deregisters() {
        let f = Fake {
            deregister_hangs: true,
            ..fake()
        };
        let l = run_dropped(&f);
        assert_eq!(l[..13], FULL_ORDER);
        assert_eq!(
            l[13..],
            ["abandon (hooks down: false, record: false, deregister: Some(7))"],
            "only what was left: the deregistration"
        );
    }
}
