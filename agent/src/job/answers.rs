//! What the lifecycle answers a runner's hooks, and what it still owes after the job: the
//! publishing grant trust gave at job-started, the completed hook's publication, and the
//! leftover publication when that hook never came.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flywheel_jit_config::Client;

use super::completed::{job_completed, publish};
use super::credential::AtticCredential;
use super::started::job_started;
use crate::config::{AtticSettings, Lane};
use crate::envelope::JobProbe;
use crate::hooks::HookResponse;
use crate::publish::Outcome;
use crate::telemetry::Telemetry;
use crate::trust::Claims;

/// What the answers to one runner's hooks need.
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
struct State {
    /// Trust allowed this job to publish: the tokens' subject.
    publish: Option<String>,
    /// The job's builds were published (or publishing was tried) by the completed hook.
    published: bool,
    /// Held while the completed hook publishes: what comes after the job waits for it.
    publishing: Arc<tokio::sync::Mutex<()>>,
}

/// One runner's answers (cheap to clone: every clone is the same job's).
#[derive(Debug, Clone)]
pub struct Answers {
    hooks: Arc<RunnerHooks>,
    state: Arc<Mutex<State>>,
}

impl Answers {
    pub fn new(hooks: RunnerHooks) -> Answers {
        Answers {
            hooks: Arc::new(hooks),
            state: Arc::default(),
        }
    }

    /// job-started: trust decided, the store opened, credentials handed out; the grant kept
    /// for the job's end.
    pub async fn started(self, claims: Claims) -> HookResponse {
        let (resp, grant) = job_started(&self.hooks, claims).await;
        if let Ok(mut s) = self.state.lock() {
            s.publish = grant;
        }
        resp
    }

    /// job-completed: the report, the publication the grant allows, the summary.
    pub async fn completed(self) -> HookResponse {
        // Held until the answer is ready, taken before `published` is set: the envelope's
        // work after the job sees either "not published" or a publication it can await.
        let busy = match self.state.lock() {
            Ok(s) => s.publishing.clone(),
            Err(_) => return HookResponse::refused("internal error"),
        };
        let _publishing = busy.lock_owned().await;
        let grant = self.state.lock().ok().and_then(|mut s| {
            s.published = true;
            s.publish.clone()
        });
        job_completed(&self.hooks, grant).await
    }

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

/// See [`Answers::leftover`].
#[derive(Debug)]
pub struct Leftover {
    hooks: Arc<RunnerHooks>,
    state: Arc<Mutex<State>>,
    limit: Duration,
    stop: crate::envelope::Stop,
}

impl Leftover {
    async fn publish(&self, after: crate::envelope::Released) -> Option<Outcome> {
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
                Ok(_) => Outcome::FinishedAfter,
                Err(_) => Outcome::TimedOut {
                    waited_for_hook: true,
                    secs: limit.as_secs(),
                },
            });
        };
        let sub = grant?;
        match tokio::time::timeout(limit, publish(&self.hooks, &sub, after.oom)).await {
            Ok(outcome) => Some(Outcome::AfterTheJob(Box::new(outcome))),
            Err(_) => Some(Outcome::TimedOut {
                waited_for_hook: false,
                secs: limit.as_secs(),
            }),
        }
    }
}

impl crate::envelope::BeforeRelease for Leftover {
    fn run(
        &self,
        after: crate::envelope::Released,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + '_>> {
        // The envelope logs it as a line.
        Box::pin(async move { self.publish(after).await.map(|o| o.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Released, Stop};

    fn answers() -> (tempfile::TempDir, Answers) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[agent]\nstate_dir = \"{}\"\n\n[[lane]]\nname = \"fake\"\nmemory = \"64Mi\"\nwork_root = \"{}\"\nnix = false\n",
            dir.path().join("state").display(),
            dir.path().join("work").display()
        );
        let host = crate::config::HostFacts {
            memory_bytes: 8 << 30,
            cpus: 2,
        };
        let cfg = crate::config::parse(&text, &crate::config::Origin::Embedded, &host).unwrap();
        let a = Answers::new(RunnerHooks {
            runner_name: "runner-1".into(),
            lane: cfg.lanes[0].clone(),
            bigger_lane: None,
            host_cpus: 2,
            probe: JobProbe::default(),
            netrc: dir.path().join("netrc"),
            github: None,
            attic: cfg.attic.clone(),
            credential: AtticCredential::None,
            telemetry: Arc::new(Telemetry::new(&cfg.lanes, "pool")),
            bazel: None,
        });
        (dir, a)
    }

    fn after(a: &Answers) -> Option<String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let left = a.leftover(Duration::from_millis(50), Stop::default());
        rt.block_on(left.publish(Released {
            left: Duration::from_secs(1),
            oom: false,
        }))
        .map(|o| o.to_string())
    }

    #[test]
    fn leftovers_of_a_job_trust_did_not_let_publish_are_nothing() {
        let (_d, a) = answers();
        assert_eq!(after(&a), None);
        assert!(
            a.state.lock().unwrap().published,
            "and nothing publishes later"
        );
    }

    #[test]
    fn leftovers_publish_what_a_trusted_job_whose_completed_hook_never_came_built() {
        let (_d, a) = answers();
        a.state.lock().unwrap().publish = Some("flywheel:o/r:run/1/1:runner/runner-1".into());
        assert_eq!(
            after(&a).as_deref(),
            Some("after the job: nothing published: the lane has no cache"),
            "the publication was tried (this lane has no cache to publish to)"
        );
        assert_eq!(after(&a), None, "once");
    }

    #[test]
    fn leftovers_wait_for_the_completed_hooks_publication_within_their_limit() {
        let (_d, a) = answers();
        let busy = {
            let mut s = a.state.lock().unwrap();
            s.published = true;
            s.publishing.clone()
        };
        let held = busy.clone().try_lock_owned().unwrap();
        let line = after(&a).unwrap_or_default();
        assert!(
            line.starts_with("left unpublished: the completed hook's publication did not finish"),
            "{line}"
        );
        drop(held);
        assert_eq!(after(&a), None, "finished: nothing to wait for");
    }
}
