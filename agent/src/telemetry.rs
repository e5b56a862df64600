//! What operators see: Prometheus metrics on `[metrics] listen`, and `flywheel-agent status`
//! through a control socket (`<state_dir>/control.sock`, root only).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use serde::Serialize;

use crate::envelope::{JobProbe, Timings};
use crate::report::JobReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunnerStateLabels {
    pub lane: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub lane: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub lane: String,
    pub phase: String,
    /// For `run`: cold (built locally), substituted, warm (nothing to build or fetch), none
    /// (no Nix). For `nix_bootstrap`: cold or warm.
    pub cache: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub endpoint: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub lane: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub lane: String,
    pub store: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BazelLabels {
    pub lane: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    pub lane: String,
    pub source: String,
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 16))
}

fn bytes_histogram() -> Histogram {
    Histogram::new(exponential_buckets(16.0 * 1024.0 * 1024.0, 2.0, 14))
}

fn ratio_histogram() -> Histogram {
    Histogram::new(linear_buckets(0.1, 0.1, 10))
}

/// The Bazel cache endpoints' counters, by lane.
#[derive(Debug, Default)]
struct BazelFamilies {
    reads: Family<BazelLabels, Counter>,
    writes: Family<BazelLabels, Counter>,
    bytes: Family<BazelLabels, Counter>,
    upstream_failures: Family<BazelLabels, Counter>,
}

impl BazelFamilies {
    fn register(registry: &mut Registry) -> BazelFamilies {
        let f = BazelFamilies::default();
        registry.register(
            "bazel_cache_reads",
            "Reads through jobs' Bazel cache endpoints, by lane and result (hit: the upstream's answer, hit_memory: a CAS blob the agent kept, miss)",
            f.reads.clone(),
        );
        registry.register(
            "bazel_cache_writes",
            "Writes to jobs' Bazel cache endpoints, by lane and result (forwarded: a trusted job's, upstream; dropped: answered, not forwarded; refused: a blob not matching its name, too large or cut off)",
            f.writes.clone(),
        );
        registry.register_with_unit(
            "bazel_cache",
            "Bytes through jobs' Bazel cache endpoints, by lane and result (read, written)",
            Unit::Bytes,
            f.bytes.clone(),
        );
        registry.register(
            "bazel_cache_upstream_failures",
            "Bazel upstream failures the jobs' builds went on without, by lane and result (down, slow, 5xx, denied, other)",
            f.upstream_failures.clone(),
        );
        f
    }
}

fn bazel_labels(lane: &str, result: &str) -> BazelLabels {
    BazelLabels {
        lane: lane.into(),
        result: result.into(),
    }
}

/// A runner the status shows.
#[derive(Debug, Clone)]
struct RunnerEntry {
    lane: String,
    envelope_bytes: u64,
    probe: JobProbe,
    job: Option<String>,
    since: Instant,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct VerdictEntry {
    pub lane: String,
    pub runner: String,
    pub at_unix: u64,
    pub text: String,
}

/// The agent's metrics and its live runner table.
#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    runners_gauge: Family<RunnerStateLabels, Gauge>,
    jobs: Family<JobLabels, Counter>,
    oom_kills: Family<LaneLabels, Counter>,
    peak_bytes: Family<LaneLabels, Histogram>,
    peak_ratio: Family<LaneLabels, Histogram>,
    phase: Family<PhaseLabels, Histogram>,
    api: Family<ApiLabels, Counter>,
    ratelimit_remaining: Gauge,
    mints: Family<KindLabels, Counter>,
    admission_refusals: Family<LaneLabels, Counter>,
    store_paths: Family<PathLabels, Counter>,
    store_starts: Family<StoreLabels, Counter>,
    published_paths: Family<LaneLabels, Counter>,
    published_bytes: Family<LaneLabels, Counter>,
    publish_failures: Family<ReasonLabels, Counter>,
    bazel: BazelFamilies,
    api_seen: Mutex<BTreeMap<(&'static str, u16), u64>>,
    runners: Mutex<BTreeMap<String, RunnerEntry>>,
    verdicts: Mutex<VecDeque<VerdictEntry>>,
    lanes: Vec<(String, u64, u32)>,
    /// Lanes with node-local slots: (name, slot_root, slots).
    slot_lanes: Vec<(String, std::path::PathBuf, u32)>,
    pub mode: &'static str,
}

impl Telemetry {
    pub fn new(lanes: &[crate::config::Lane], mode: &'static str) -> Telemetry {
        let mut registry = Registry::with_prefix("flywheel");
        let runners_gauge = Family::<RunnerStateLabels, Gauge>::default();
        let jobs = Family::<JobLabels, Counter>::default();
        let oom_kills = Family::<LaneLabels, Counter>::default();
        let peak_bytes = Family::<LaneLabels, Histogram>::new_with_constructor(
            bytes_histogram as fn() -> Histogram,
        );
        let peak_ratio = Family::<LaneLabels, Histogram>::new_with_constructor(
            ratio_histogram as fn() -> Histogram,
        );
        let phase = Family::<PhaseLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        let api = Family::<ApiLabels, Counter>::default();
        let ratelimit_remaining = Gauge::default();
        let mints = Family::<KindLabels, Counter>::default();
        let admission_refusals = Family::<LaneLabels, Counter>::default();
        let store_paths = Family::<PathLabels, Counter>::default();
        let store_starts = Family::<StoreLabels, Counter>::default();
        let published_paths = Family::<LaneLabels, Counter>::default();
        let published_bytes = Family::<LaneLabels, Counter>::default();
        let publish_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "attic_published_paths",
            "Store paths the agent published to the lane's Attic cache",
            published_paths.clone(),
        );
        registry.register_with_unit(
            "attic_published",
            "NAR bytes the agent published to the lane's Attic cache",
            Unit::Bytes,
            published_bytes.clone(),
        );
        registry.register(
            "attic_publish_failures",
            "Publications that failed, by lane and reason (refused, server, token, store)",
            publish_failures.clone(),
        );
        registry.register(
            "job_stores",
            "Jobs of slot lanes by the store they started on: warm (a node-local slot with the receipt and paths), cold (an empty slot), pod_local (every slot was busy)",
            store_starts.clone(),
        );
        registry.register(
            "runners",
            "Runners by lane and state (registering, idle, busy)",
            runners_gauge.clone(),
        );
        registry.register(
            "jobs",
            "Jobs by lane and result (succeeded, failed, oom, cancelled, infrastructure)",
            jobs.clone(),
        );
        registry.register(
            "oom_kills",
            "Processes the kernel OOM-killed inside job envelopes",
            oom_kills.clone(),
        );
        registry.register_with_unit(
            "job_peak_memory",
            "Peak memory of jobs",
            Unit::Bytes,
            peak_bytes.clone(),
        );
        registry.register(
            "job_peak_memory_envelope_ratio",
            "Peak memory of jobs as a fraction of their envelope",
            peak_ratio.clone(),
        );
        registry.register_with_unit(
            "job_phase_duration",
            "Job phases: registration, setup, nix_bootstrap, run, teardown",
            Unit::Seconds,
            phase.clone(),
        );
        registry.register(
            "github_requests",
            "GitHub API requests by endpoint and status (0: no answer)",
            api.clone(),
        );
        registry.register(
            "github_ratelimit_remaining",
            "The last x-ratelimit-remaining GitHub reported (-1: none yet)",
            ratelimit_remaining.clone(),
        );
        registry.register(
            "attic_token_mints",
            "Attic tokens minted, by kind (pull, push)",
            mints.clone(),
        );
        registry.register(
            "admission_refusals",
            "Runner starts deferred because the host's memory was taken",
            admission_refusals.clone(),
        );
        registry.register(
            "nix_store_paths",
            "Store paths a job's nix-daemon added, by source (built, substituted)",
            store_paths.clone(),
        );
        let bazel = BazelFamilies::register(&mut registry);
        ratelimit_remaining.set(-1);
        for l in lanes {
            for kind in ["pull", "push"] {
                let _ = mints.get_or_create(&KindLabels { kind: kind.into() });
            }
            let _ = oom_kills.get_or_create(&LaneLabels {
                lane: l.name.clone(),
            });
        }
        Telemetry {
            registry,
            runners_gauge,
            jobs,
            oom_kills,
            peak_bytes,
            peak_ratio,
            phase,
            api,
            ratelimit_remaining,
            mints,
            admission_refusals,
            store_paths,
            store_starts,
            published_paths,
            published_bytes,
            publish_failures,
            bazel,
            api_seen: Mutex::default(),
            runners: Mutex::default(),
            verdicts: Mutex::default(),
            lanes: lanes
                .iter()
                .map(|l| (l.name.clone(), l.memory_bytes, l.max_runners))
                .collect(),
            slot_lanes: lanes
                .iter()
                .filter_map(|l| Some((l.name.clone(), l.slot_root.clone()?, l.slots)))
                .collect(),
            mode,
        }
    }

    /// A runner task started (registering).
    pub fn runner_started(&self, id: &str, lane: &crate::config::Lane, probe: JobProbe) {
        if let Ok(mut r) = self.runners.lock() {
            r.insert(
                id.to_owned(),
                RunnerEntry {
                    lane: lane.name.clone(),
                    envelope_bytes: lane.memory_bytes,
                    probe,
                    job: None,
                    since: Instant::now(),
                },
            );
        }
    }

    /// The runner got its GitHub name.
    pub fn runner_named(&self, id: &str, name: &str) {
        if let Ok(mut r) = self.runners.lock() {
            if let Some(e) = r.remove(id) {
                r.insert(name.to_owned(), e);
            }
        }
    }

    pub fn runner_ended(&self, id: &str) {
        if let Ok(mut r) = self.runners.lock() {
            r.remove(id);
        }
    }

    pub fn observe_phase(&self, lane: &str, phase: &str, cache: &str, d: Duration) {
        self.phase
            .get_or_create(&PhaseLabels {
                lane: lane.into(),
                phase: phase.into(),
                cache: cache.into(),
            })
            .observe(d.as_secs_f64());
    }

    /// An Attic token was minted (`pull` or `push`).
    pub fn attic_token_minted(&self, kind: &str) {
        self.mints
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn admission_refused(&self, lane: &str) {
        self.admission_refusals
            .get_or_create(&LaneLabels { lane: lane.into() })
            .inc();
    }

    pub fn infrastructure_failure(&self, lane: &str) {
        self.jobs
            .get_or_create(&JobLabels {
                lane: lane.into(),
                result: "infrastructure".into(),
            })
            .inc();
    }

    /// The agent published `paths` paths (`bytes` of NAR) of a job of `lane`.
    pub fn published(&self, lane: &str, paths: u64, bytes: u64) {
        let l = LaneLabels { lane: lane.into() };
        self.published_paths.get_or_create(&l).inc_by(paths);
        self.published_bytes.get_or_create(&l).inc_by(bytes);
    }

    /// A read of a job's Bazel cache endpoint: `hit` or `miss`.
    pub fn bazel_read(&self, lane: &str, result: &str) {
        self.bazel
            .reads
            .get_or_create(&bazel_labels(lane, result))
            .inc();
    }

    /// A write to a job's Bazel cache endpoint: `forwarded`, `dropped` or `refused`.
    pub fn bazel_write(&self, lane: &str, result: &str) {
        self.bazel
            .writes
            .get_or_create(&bazel_labels(lane, result))
            .inc();
    }

    /// Bytes through a job's Bazel cache endpoint: `read` or `written`.
    pub fn bazel_bytes(&self, lane: &str, direction: &str, n: u64) {
        self.bazel
            .bytes
            .get_or_create(&bazel_labels(lane, direction))
            .inc_by(n);
    }

    /// The lane's Bazel upstream failed: `down`, `slow`, `5xx`, `denied` or `other`.
    pub fn bazel_upstream_failure(&self, lane: &str, reason: &str) {
        self.bazel
            .upstream_failures
            .get_or_create(&bazel_labels(lane, reason))
            .inc();
    }

    /// A publication of a job of `lane` failed.
    pub fn publish_failed(&self, lane: &str, reason: &str) {
        self.publish_failures
            .get_or_create(&ReasonLabels {
                lane: lane.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Record a finished job of `runner`: its report and its phases' times.
    pub fn job_finished(&self, runner: &str, r: &JobReport, timings: &Timings) {
        let lane = r.lane.as_str();
        let result = r.result().label();
        self.jobs
            .get_or_create(&JobLabels {
                lane: lane.into(),
                result: result.into(),
            })
            .inc();
        let l = LaneLabels { lane: lane.into() };
        self.oom_kills.get_or_create(&l).inc_by(r.oom_kills);
        if let Some(p) = r.peak_bytes {
            #[allow(clippy::cast_precision_loss)]
            {
                self.peak_bytes.get_or_create(&l).observe(p as f64);
                self.peak_ratio
                    .get_or_create(&l)
                    .observe(p as f64 / r.envelope_bytes.max(1) as f64);
            }
        }
        if let Some(store) = &r.store {
            self.store_starts
                .get_or_create(&StoreLabels {
                    lane: lane.into(),
                    store: store.kind().label().into(),
                })
                .inc();
        }
        let cache = r.cache().label();
        if let Some(b) = &r.bootstrap {
            self.observe_phase(lane, "nix_bootstrap", b.done.warmth(), b.elapsed);
        }
        if let Some((built, subst)) = r.paths {
            self.store_paths
                .get_or_create(&PathLabels {
                    lane: lane.into(),
                    source: "built".into(),
                })
                .inc_by(built);
            self.store_paths
                .get_or_create(&PathLabels {
                    lane: lane.into(),
                    source: "substituted".into(),
                })
                .inc_by(subst);
        }
        self.observe_phase(lane, "setup", cache, timings.setup);
        self.observe_phase(lane, "run", cache, timings.run);
        self.observe_phase(lane, "teardown", cache, timings.teardown);
        if let Some(text) = r.oom_verdict() {
            if let Ok(mut q) = self.verdicts.lock() {
                q.push_back(VerdictEntry {
                    lane: lane.into(),
                    runner: runner.into(),
                    at_unix: now(),
                    text,
                });
                while q.len() > 20 {
                    q.pop_front();
                }
            }
        }
    }

    /// Bring the GitHub counters up to the client's own.
    pub fn sync_github(&self, stats: &flywheel_jit_config::ApiStats) {
        let Ok(mut seen) = self.api_seen.lock() else {
            return;
        };
        for ((endpoint, status), n) in stats.requests() {
            let before = seen.insert((endpoint, status), n).unwrap_or(0);
            if n > before {
                self.api
                    .get_or_create(&ApiLabels {
                        endpoint: endpoint.into(),
                        status: status.to_string(),
                    })
                    .inc_by(n - before);
            }
        }
        self.ratelimit_remaining.set(stats.ratelimit_remaining());
    }

    /// The Prometheus (OpenMetrics) text.
    pub fn encode(&self) -> String {
        self.runners_gauge.clear();
        if let Ok(r) = self.runners.lock() {
            for (lane, _, _) in &self.lanes {
                for state in ["registering", "idle", "busy"] {
                    self.runners_gauge
                        .get_or_create(&RunnerStateLabels {
                            lane: lane.clone(),
                            state: state.into(),
                        })
                        .set(0);
                }
            }
            for e in r.values() {
                self.runners_gauge
                    .get_or_create(&RunnerStateLabels {
                        lane: e.lane.clone(),
                        state: state_of(e).into(),
                    })
                    .inc();
            }
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The status report. The slots' stores are read on a blocking thread.
    pub async fn status(&self) -> Status {
        let slot_lanes = self.slot_lanes.clone();
        let mut slots = crate::store::blocking(move |b| {
            let mut by_lane: HashMap<String, Vec<SlotStatus>> = HashMap::new();
            for (lane, root, count) in &slot_lanes {
                by_lane
                    .entry(lane.clone())
                    .or_default()
                    .extend((0..*count).map(|i| slot_status(b, root, i)));
            }
            by_lane
        })
        .await
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the slots' stores for the status");
            HashMap::new()
        });
        let runners = self.runners.lock().map(|r| r.clone()).unwrap_or_default();
        let lanes = self
            .lanes
            .iter()
            .map(|(name, mem, max)| LaneStatus {
                slots: slots.remove(name).unwrap_or_default(),
                name: name.clone(),
                memory_bytes: *mem,
                max_runners: *max,
                runners: runners
                    .iter()
                    .filter(|(_, e)| &e.lane == name)
                    .map(|(n, e)| RunnerStatus {
                        name: n.clone(),
                        state: state_of(e).into(),
                        job: e.job.clone().or_else(|| e.probe.job_name()),
                        memory_current_bytes: e.probe.memory_current(),
                        envelope_bytes: e.envelope_bytes,
                        age_seconds: e.since.elapsed().as_secs(),
                    })
                    .collect(),
            })
            .collect();
        Status {
            mode: self.mode.into(),
            lanes,
            verdicts: self
                .verdicts
                .lock()
                .map(|q| q.iter().cloned().collect())
                .unwrap_or_default(),
        }
    }
}

fn state_of(e: &RunnerEntry) -> &'static str {
    if e.probe.processes() == 0 {
        "registering"
    } else if e.probe.busy() {
        "busy"
    } else {
        "idle"
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Status {
    pub mode: String,
    pub lanes: Vec<LaneStatus>,
    pub verdicts: Vec<VerdictEntry>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LaneStatus {
    pub name: String,
    pub memory_bytes: u64,
    pub max_runners: u32,
    pub runners: Vec<RunnerStatus>,
    /// Node-local slots (slot lanes only): their stores' size, last use and holder.
    #[serde(default)]
    pub slots: Vec<SlotStatus>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SlotStatus {
    pub index: u32,
    pub paths: u64,
    pub bytes: u64,
    pub last_used_unix: Option<u64>,
    /// Who holds it now (or, after a crash, held it last).
    pub holder: Option<String>,
}

fn slot_status(store: &crate::store::Blocking, root: &std::path::Path, i: u32) -> SlotStatus {
    let (nix, _) = crate::slot::slot_dirs(root, i);
    let (paths, bytes) = store.size(&nix).unwrap_or((0, 0));
    SlotStatus {
        index: i,
        paths,
        bytes,
        last_used_unix: crate::slot::last_used(root, i),
        holder: crate::slot::unusable(root, i)
            .map(|why| format!("unusable: {why}"))
            .or_else(|| crate::slot::holder(root, i)),
    }
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RunnerStatus {
    pub name: String,
    pub state: String,
    pub job: Option<String>,
    pub memory_current_bytes: Option<u64>,
    pub envelope_bytes: u64,
    pub age_seconds: u64,
}

/// Serve `/metrics` on `addr` until the process ends.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    t: Arc<Telemetry>,
    github: Option<Arc<flywheel_jit_config::Client>>,
    bg: &crate::tasks::Background,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (t, g) = (t.clone(), github.clone());
            async move {
                if let Some(g) = &g {
                    t.sync_github(g.stats());
                }
                (
                    [(
                        "content-type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    t.encode(),
                )
            }
        }),
    );
    let done = bg.done();
    bg.spawn_service(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(done.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    tracing::info!(address = %bound, "serving /metrics");
    Ok(bound)
}

/// The control socket: one request line (`status`), one JSON answer.
pub fn control_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

pub async fn serve_control(
    path: PathBuf,
    t: Arc<Telemetry>,
    bg: &crate::tasks::Background,
) -> std::io::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let conns = bg.clone();
    bg.spawn_service(async move {
        let mut backoff = crate::accept::Backoff::default();
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => {
                    backoff.accepted();
                    s
                }
                Err(e) => {
                    tracing::warn!(error = %e, wait_ms = backoff.next_wait().as_millis() as u64, "cannot accept a control connection");
                    backoff.failed().await;
                    continue;
                }
            };
            let t = t.clone();
            conns.spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut line = String::new();
                let _ = tokio::io::BufReader::new(r).read_line(&mut line).await;
                let answer = match line.trim() {
                    "status" => serde_json::to_string(&t.status().await)
                        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
                    other => format!("{{\"error\":\"unknown request {other:?}: try status\"}}"),
                };
                let _ = w.write_all(answer.as_bytes()).await;
                let _ = w.write_all(b"\n").await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, HostFacts, Origin};

    #[tokio::test]
    async fn jobs_are_counted_by_the_store_they_started_on() {
        let cfg = parse(
            "[[lane]]\nname = \"arc\"\nmemory = \"1Gi\"\nslot_root = \"/slots\"\nslots = 2\n",
            &Origin::Embedded,
            &HostFacts {
                memory_bytes: 8 << 30,
                cpus: 2,
            },
        )
        .expect("config");
        let t = Telemetry::new(&cfg.lanes, "arc");
        let warm = crate::report::StoreStart::Slot {
            lane: "arc".into(),
            index: 0,
            warm: Some((10, 1 << 20)),
            idle_secs: None,
            check: crate::report::SlotCheck::NotNeeded,
        };
        let pod = crate::report::StoreStart::PodLocal {
            lane: "arc".into(),
            slots: 2,
        };
        for store in [Some(warm.clone()), Some(warm), Some(pod), None] {
            let report = JobReport {
                lane: "arc".into(),
                envelope_bytes: 1 << 30,
                store,
                exit_code: Some(0),
                ..JobReport::default()
            };
            t.job_finished("r", &report, &Timings::default());
        }
        let text = t.encode();
        assert!(
            text.contains("flywheel_job_stores_total{lane=\"arc\",store=\"warm\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("flywheel_job_stores_total{lane=\"arc\",store=\"pod_local\"} 1"),
            "{text}"
        );
        // The status lists the lane's slots (none used yet: no holder, empty stores).
        let st = t.status().await;
        assert_eq!(st.lanes[0].slots.len(), 2);
        assert!(st.lanes[0]
            .slots
            .iter()
            .all(|s| s.holder.is_none() && s.paths == 0));
    }
}
