//! One job's report, as typed facts, computed in one place: [`compute`], from the job as its
//! lane configured it ([`Job`]) and what was seen of it ([`Seen`]). The envelope computes it
//! at a job's end (its `JobOutcome`'s `report`), a runner's completed hook while the job still
//! runs ([`so_far`]). The job summary (`summary`), the metrics and `status` (`telemetry`), the
//! hook's answer and `exec`'s output only render it; nothing reads a fact back out of text.

use std::fmt;
use std::time::Duration;

use crate::buildmem::BuildUse;
use crate::cgroup::Stats;
use crate::config::Lane;
use crate::size::Bytes;
use crate::timeline::{Build, Samples};
use crate::verdict::{Killed, OomFacts};

/// The store a job started on, on a lane with node-local slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A slot's store, bootstrapped before.
    Warm,
    /// A slot's store, empty.
    Cold,
    /// Every node-local slot was busy: a store of the pod's own.
    PodLocal,
}

impl StoreKind {
    /// The `store` label of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            StoreKind::Warm => "warm",
            StoreKind::Cold => "cold",
            StoreKind::PodLocal => "pod_local",
        }
    }
}

/// A slot's store whose last holder died is checked before a job gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotCheck {
    /// Its last holder let it go: nothing to check.
    NotNeeded,
    /// Found sound, in this long.
    Sound(Duration),
    /// Found not sound, and wiped (the job bootstraps cold): why.
    Wiped(String),
    /// The store could not be read: why.
    Failed(String),
}

/// The store a job started on (lanes with node-local slots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreStart {
    PodLocal {
        lane: String,
        slots: u32,
    },
    Slot {
        lane: String,
        index: u32,
        /// `Some((paths, bytes))` when the store was warm.
        warm: Option<(u64, u64)>,
        /// Seconds since the slot's last job ended.
        idle_secs: Option<u64>,
        check: SlotCheck,
    },
}

impl StoreStart {
    pub fn kind(&self) -> StoreKind {
        match self {
            StoreStart::PodLocal { .. } => StoreKind::PodLocal,
            StoreStart::Slot { warm: Some(_), .. } => StoreKind::Warm,
            StoreStart::Slot { warm: None, .. } => StoreKind::Cold,
        }
    }
}

/// The store in words, as the job's setup block and summary say it.
impl fmt::Display for StoreStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (lane, index, warm, idle_secs, check) = match self {
            StoreStart::PodLocal { lane, slots } => {
                return write!(
                    f,
                    "all {slots} node-local slots of lane {lane} are busy: this job runs on a pod-local store (cold, still correct)"
                )
            }
            StoreStart::Slot {
                lane,
                index,
                warm,
                idle_secs,
                check,
            } => (lane, index, warm, idle_secs, check),
        };
        write!(f, "node-local slot {index} of lane {lane}: ")?;
        match warm {
            Some((paths, bytes)) => {
                write!(f, "warm ({paths} paths, {}", Bytes(*bytes))?;
                if let Some(s) = idle_secs {
                    write!(f, ", last used {s} s ago")?;
                }
                f.write_str(")")?;
            }
            None => f.write_str("cold (empty)")?,
        }
        match check {
            SlotCheck::NotNeeded => Ok(()),
            SlotCheck::Sound(took) => write!(
                f,
                "; its last holder died, the store was checked in {:.0} ms",
                took.as_secs_f64() * 1e3
            ),
            SlotCheck::Wiped(why) => {
                write!(f, "; its last holder died and the store was wiped ({why})")
            }
            SlotCheck::Failed(why) => write!(f, "; {why}"),
        }
    }
}

/// A job's Nix bootstrap, reported apart from the job.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub done: crate::nixboot::Report,
    /// Its own time (never part of the job's `run`).
    pub elapsed: Duration,
}

impl Bootstrap {
    /// Its line for the job's log and summary.
    pub fn line(&self) -> String {
        self.done.summary()
    }
}

/// A job's setup: its store, its Nix bootstrap and the advisories acknowledged for its Nix.
#[derive(Debug, Clone, Default)]
pub struct Setup {
    pub store: Option<StoreStart>,
    pub bootstrap: Option<Bootstrap>,
    pub advisories: Vec<String>,
}

impl Setup {
    /// Its lines for the job's log (a runner prints them at job-started), in setup order.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        out.extend(self.store.iter().map(|s| format!("store: {s}")));
        out.extend(self.bootstrap.iter().map(Bootstrap::line));
        out.extend(self.advisories.iter().cloned());
        out
    }
}

/// The job hit its process limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidsHit {
    pub limit: u64,
    /// Forks the kernel refused.
    pub refused: u64,
}

/// How a job ended, in a word (the `result` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobResult {
    OutOfMemory,
    /// A stop of the agent ended it.
    Cancelled,
    Succeeded,
    Failed,
}

impl JobResult {
    pub fn label(self) -> &'static str {
        match self {
            JobResult::OutOfMemory => "oom",
            JobResult::Cancelled => "cancelled",
            JobResult::Succeeded => "succeeded",
            JobResult::Failed => "failed",
        }
    }
}

/// What the job's Nix found, in a word (the `cache` label of the phase timings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheKind {
    /// The job had no Nix.
    None,
    /// It built store paths.
    Cold,
    /// It built nothing and substituted paths from caches.
    Substituted,
    /// Everything it needed was in its store.
    Warm,
}

impl CacheKind {
    pub fn label(self) -> &'static str {
        match self {
            CacheKind::None => "none",
            CacheKind::Cold => "cold",
            CacheKind::Substituted => "substituted",
            CacheKind::Warm => "warm",
        }
    }
}

/// Everything known of a job: what the summary, the metrics, `status`, the completed hook
/// and `exec` show.
#[derive(Debug, Clone, Default)]
pub struct JobReport {
    pub lane: String,
    pub envelope_bytes: u64,
    pub peak_bytes: Option<u64>,
    /// Processes the kernel's OOM killer killed in the job.
    pub oom_kills: u64,
    pub samples: Option<Samples>,
    /// The derivations its daemon built (or was building), with their memory.
    pub builds: Vec<Build>,
    pub bootstrap: Option<Bootstrap>,
    /// The store it started on (lanes with node-local slots).
    pub store: Option<StoreStart>,
    /// Store paths the job added: (built, substituted).
    pub paths: Option<(u64, u64)>,
    /// What the OOM verdict says, when the kernel killed something.
    pub oom: Option<OomFacts>,
    /// Forks refused by the job's process limit.
    pub pids: Option<PidsHit>,
    /// What the agent published of the job's builds (or why nothing).
    pub published: Option<crate::publish::Outcome>,
    pub elapsed: Duration,
    /// The command's exit status (`128 + signal` for a signal), when the agent knows it: `exec`
    /// does; a runner's completed hook runs before the job's result exists.
    pub exit_code: Option<i32>,
    /// A stop of the agent ended the job.
    pub stopped: bool,
}

impl JobReport {
    /// The OOM verdict, a sentence for the workflow author.
    pub fn oom_verdict(&self) -> Option<String> {
        self.oom.as_ref().map(crate::verdict::oom_verdict)
    }

    /// The note on forks refused.
    pub fn pids_note(&self) -> Option<String> {
        self.pids
            .map(|p| crate::verdict::pids_note(&self.lane, p.limit, p.refused))
    }

    pub fn result(&self) -> JobResult {
        match (self.oom.is_some(), self.stopped, self.exit_code) {
            (true, _, _) => JobResult::OutOfMemory,
            (false, true, _) => JobResult::Cancelled,
            (false, false, Some(0)) => JobResult::Succeeded,
            (false, false, _) => JobResult::Failed,
        }
    }

    pub fn cache(&self) -> CacheKind {
        match (&self.bootstrap, self.paths) {
            (None, _) => CacheKind::None,
            (Some(_), Some((built, _))) if built > 0 => CacheKind::Cold,
            (Some(_), Some((_, subst))) if subst > 0 => CacheKind::Substituted,
            (Some(_), _) => CacheKind::Warm,
        }
    }
}

/// The job a report is about, as its lane and the agent set it up.
#[derive(Debug, Clone)]
pub struct Job<'a> {
    pub lane: &'a Lane,
    pub envelope_bytes: u64,
    pub host_cpus: u32,
    /// The job had a nix-daemon of its own: the lane's build parallelism goes into the OOM
    /// advice.
    pub nix: bool,
    /// The smallest lane with a larger envelope, for the OOM advice.
    pub bigger_lane: Option<(String, u64)>,
}

/// What was seen of a job.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub stats: Stats,
    /// The processes the OOM killer killed (from the kernel log).
    pub killed: Vec<Killed>,
    pub setup: Setup,
    pub samples: Option<Samples>,
    /// Its daemon's builds as read from its logs and store, their memory not yet attached.
    pub builds: Vec<Build>,
    /// Each build's largest memory, the largest first.
    pub build_memory: Vec<BuildUse>,
    /// Unix seconds (fractional) when the job's cgroup was made.
    pub started_unix: f64,
    pub paths: Option<(u64, u64)>,
    pub elapsed: Duration,
    /// Its exit status and whether a stop of the agent ended it; `None` while it runs.
    pub ended: Option<(i32, bool)>,
}

/// The job's report: the one place its facts become a [`JobReport`] (and its OOM facts are
/// assembled).
pub fn compute(job: &Job<'_>, seen: Seen) -> JobReport {
    let lane = job.lane;
    let Seen {
        stats,
        killed,
        setup,
        mut samples,
        mut builds,
        build_memory,
        started_unix,
        paths,
        elapsed,
        ended,
    } = seen;
    crate::timeline::attach_memory(&mut builds, &build_memory, started_unix);
    // A peak after the last sample (an OOM often is one) is the last interval's.
    if let (Some(s), Some(peak)) = (samples.as_mut(), stats.peak_bytes) {
        s.close(peak);
    }
    let oom = (stats.oom_kills > 0).then(|| OomFacts {
        lane: lane.name.clone(),
        envelope_bytes: job.envelope_bytes,
        stats,
        killed,
        bigger_lane: job.bigger_lane.clone(),
        building: builds
            .iter()
            .filter(|b| b.failed)
            .map(|b| b.name.clone())
            .collect(),
        parallel: job.nix.then(|| {
            (
                crate::hints::parallelism(lane, job.envelope_bytes, job.host_cpus).max_jobs,
                lane.memory_per_build_bytes,
            )
        }),
        ran_at_once: crate::timeline::most_at_once(&builds),
        build_memory: build_memory
            .iter()
            .map(|b| (b.name.clone(), b.bytes))
            .collect(),
    });
    JobReport {
        lane: lane.name.clone(),
        envelope_bytes: job.envelope_bytes,
        peak_bytes: stats.peak_bytes,
        oom_kills: stats.oom_kills,
        samples,
        builds,
        bootstrap: setup.bootstrap,
        store: setup.store,
        paths,
        oom,
        pids: (stats.pids_max_hits > 0).then_some(PidsHit {
            limit: lane.pids_max,
            refused: stats.pids_max_hits,
        }),
        published: None,
        elapsed,
        exit_code: ended.map(|(code, _)| code),
        stopped: ended.is_some_and(|(_, stopped)| stopped),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, HostFacts, Origin};

    fn lane() -> Lane {
        let cfg = parse(
            "[[lane]]\nname = \"tinyland-nix\"\nmemory = \"8Gi\"\npids_max = 512\n",
            &Origin::Embedded,
            &HostFacts {
                memory_bytes: 64 << 30,
                cpus: 8,
            },
        )
        .expect("config");
        cfg.lanes[0].clone()
    }

    fn build(name: &str, start: f64, end: f64, failed: bool) -> Build {
        Build {
            name: name.into(),
            start,
            end,
            failed,
            memory_bytes: None,
        }
    }

    /// The store in the words the job's log, its setup block and its summary have always used.
    #[test]
    fn the_store_is_told_in_its_words_and_counted_by_its_kind() {
        let slot = |warm, idle_secs, check| StoreStart::Slot {
            lane: "arc".into(),
            index: 1,
            warm,
            idle_secs,
            check,
        };
        let cases = [
            (
                slot(Some((12, 3 << 20)), Some(40), SlotCheck::NotNeeded),
                "node-local slot 1 of lane arc: warm (12 paths, 3.0 MiB, last used 40 s ago)",
                StoreKind::Warm,
            ),
            (
                slot(
                    Some((12, 3 << 20)),
                    None,
                    SlotCheck::Sound(Duration::from_millis(7)),
                ),
                "node-local slot 1 of lane arc: warm (12 paths, 3.0 MiB); its last holder died, the store was checked in 7 ms",
                StoreKind::Warm,
            ),
            (
                slot(None, Some(5), SlotCheck::Wiped("bad db".into())),
                "node-local slot 1 of lane arc: cold (empty); its last holder died and the store was wiped (bad db)",
                StoreKind::Cold,
            ),
            (
                slot(None, None, SlotCheck::Failed("no thread".into())),
                "node-local slot 1 of lane arc: cold (empty); no thread",
                StoreKind::Cold,
            ),
            (
                StoreStart::PodLocal {
                    lane: "arc".into(),
                    slots: 2,
                },
                "all 2 node-local slots of lane arc are busy: this job runs on a pod-local store (cold, still correct)",
                StoreKind::PodLocal,
            ),
        ];
        for (store, words, kind) in cases {
            assert_eq!(store.to_string(), words);
            assert_eq!(store.kind(), kind);
        }
        assert_eq!(
            [StoreKind::Warm, StoreKind::Cold, StoreKind::PodLocal].map(StoreKind::label),
            ["warm", "cold", "pod_local"]
        );
        // The setup block: the store, the bootstrap, the advisories, in that order.
        let setup = Setup {
            store: Some(slot(None, None, SlotCheck::NotNeeded)),
            bootstrap: Some(Bootstrap {
                done: crate::nixboot::Report {
                    relayed: Some("nix 2.8.0: warm (verified in 0.2 ms)".into()),
                    ..Default::default()
                },
                elapsed: Duration::ZERO,
            }),
            advisories: vec!["acknowledged: X".into()],
        };
        assert_eq!(
            setup.lines(),
            [
                "store: node-local slot 1 of lane arc: cold (empty)",
                "nix 2.8.0: warm (verified in 0.2 ms)",
                "acknowledged: X"
            ]
        );
    }

    /// One computation: the OOM facts from the job's builds and the lane, the peak closing
    /// the samples, the forks refused, how it ended; the verdict is rendered from them.
    #[test]
    fn the_report_is_computed_from_facts_once() {
        let lane = lane();
        let job = Job {
            lane: &lane,
            envelope_bytes: 8 << 30,
            host_cpus: 8,
            nix: true,
            bigger_lane: Some(("tinyland-nix-heavy".into(), 32 << 30)),
        };
        let mut samples = Samples::new(Duration::from_secs(1));
        samples.record(1 << 30, Some(1 << 30));
        let seen = Seen {
            stats: Stats {
                oom_kills: 1,
                peak_bytes: Some(8 << 30),
                pids_max_hits: 3,
            },
            killed: vec![Killed {
                pid: 0,
                name: "cc1plus".into(),
            }],
            samples: Some(samples),
            builds: vec![
                build("llvm", 0.0, 2.0, true),
                build("zlib", 1.0, 1.5, false),
            ],
            build_memory: vec![BuildUse {
                name: "llvm".into(),
                bytes: 6 << 30,
                last_seen: 1003.0,
            }],
            started_unix: 1000.0,
            paths: Some((1, 4)),
            elapsed: Duration::from_secs(3),
            ended: Some((137, false)),
            ..Seen::default()
        };
        let r = compute(&job, seen);
        // The memory of a build, and an unfinished build ran until a sample last saw it.
        assert_eq!(r.builds[0].memory_bytes, Some(6 << 30));
        assert_eq!(r.builds[0].end, 3.0);
        // The peak after the last sample is the last interval's.
        let points = r.samples.as_ref().expect("samples").points();
        assert_eq!(points, [1 << 30, 8 << 30]);
        let oom = r.oom.as_ref().expect("oom facts");
        assert_eq!(oom.building, ["llvm"]);
        assert_eq!(oom.ran_at_once, 2);
        assert_eq!(oom.build_memory, [("llvm".to_owned(), 6 << 30)]);
        assert_eq!(
            oom.bigger_lane,
            Some(("tinyland-nix-heavy".into(), 32 << 30))
        );
        let parallel = crate::hints::parallelism(&lane, 8 << 30, 8).max_jobs;
        assert_eq!(oom.parallel, Some((parallel, lane.memory_per_build_bytes)));
        let verdict = r.oom_verdict().expect("a verdict");
        assert!(
            verdict.starts_with("flywheel: out of memory: this job on lane `tinyland-nix`")
                && verdict.contains("while building `llvm`")
                && verdict.contains("cc1plus"),
            "{verdict}"
        );
        assert_eq!(
            r.pids_note().as_deref(),
            Some("flywheel: the job on lane `tinyland-nix` hit its process limit of 512 (3 forks refused); a fork bomb or runaway parallelism is the usual cause.")
        );
        assert_eq!(
            (r.exit_code, r.result()),
            (Some(137), JobResult::OutOfMemory)
        );
        // Without a Nix daemon, no parallelism in the advice; without kills, no OOM facts.
        let quiet = compute(
            &Job {
                nix: false,
                ..job.clone()
            },
            Seen {
                ended: Some((0, false)),
                ..Seen::default()
            },
        );
        assert!(quiet.oom.is_none() && quiet.pids.is_none());
        assert_eq!(quiet.result(), JobResult::Succeeded);
        assert_eq!(quiet.cache(), CacheKind::None);
    }

    #[test]
    fn results_and_caches_are_named_as_the_metrics_label_them() {
        let ended = |code, stopped| JobReport {
            exit_code: Some(code),
            stopped,
            ..JobReport::default()
        };
        assert_eq!(ended(0, false).result().label(), "succeeded");
        assert_eq!(ended(1, false).result().label(), "failed");
        assert_eq!(ended(0, true).result().label(), "cancelled");
        let nix = |paths| JobReport {
            bootstrap: Some(Bootstrap {
                done: crate::nixboot::Report::default(),
                elapsed: Duration::ZERO,
            }),
            paths,
            ..JobReport::default()
        };
        let labels =
            [None, Some((0, 0)), Some((0, 2)), Some((1, 2))].map(|p| nix(p).cache().label());
        assert_eq!(labels, ["warm", "warm", "substituted", "cold"]);
        assert_eq!(JobReport::default().cache().label(), "none");
    }
}
