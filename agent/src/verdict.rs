//! The OOM verdict: one plain sentence for a workflow author, decided from the kernel's
//! `oom_kill` counter, never from an exit code.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

use crate::cgroup::Stats;
use crate::size::Bytes;

/// A process the kernel's OOM killer chose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Killed {
    pub pid: i32,
    pub name: String,
}

/// Everything the verdict says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomFacts {
    pub lane: String,
    pub envelope_bytes: u64,
    pub stats: Stats,
    pub killed: Vec<Killed>,
    /// The smallest configured lane with a larger envelope, if any.
    pub bigger_lane: Option<(String, u64)>,
    /// Nix lanes: the derivations that were building when memory ran out.
    pub building: Vec<String>,
    /// Nix lanes: parallel builds the lane allows (`max-jobs`) and the memory one is given.
    pub parallel: Option<(u32, u64)>,
    /// The most of the job's Nix builds that ran at once (0: no builds known): what the
    /// advice is based on, rather than the lane's setting (a job may pass `-j`).
    pub ran_at_once: u32,
    /// Nix lanes: each build's largest memory (sampled, see [`crate::buildmem`]), the largest
    /// first.
    pub build_memory: Vec<(String, u64)>,
}

/// The share of the envelope one build may use before the advice is about that build alone.
const ONE_BUILD_SHARE: u64 = 2;

/// Which build used the memory, in words: "`llvm` used 5.1 GiB of the 8.0 GiB envelope
/// while `boost` used 2.4 GiB" (the largest three).
fn memory_words(f: &OomFacts) -> String {
    let name = |n: &str| format!("`{}`", bounded_list(&[n], 1, NAME_MAX));
    let mut it = f.build_memory.iter().filter(|(_, b)| *b > 0).take(3);
    let Some((first, bytes)) = it.next() else {
        return String::new();
    };
    let others: Vec<String> = it
        .map(|(n, b)| format!("{} used {}", name(n), Bytes(*b)))
        .collect();
    let mut out = format!(
        "; {} used {} of the {} envelope",
        name(first),
        Bytes(*bytes),
        Bytes(f.envelope_bytes)
    );
    if !others.is_empty() {
        out.push_str(" while ");
        out.push_str(&others.join(" and "));
    }
    out.push_str(" (sampled)");
    out
}

/// The verdict printed on stderr when the job's cgroup saw an OOM kill.
pub fn oom_verdict(f: &OomFacts) -> String {
    format!("flywheel: {}", oom_sentence(f))
}

/// The verdict's sentence alone (an annotation's message): "out of memory: this job …".
pub fn oom_sentence(f: &OomFacts) -> String {
    let peak = f
        .stats
        .peak_bytes
        .map_or_else(|| "unknown".to_owned(), |p| Bytes(p).to_string());
    let who = match f.killed.as_slice() {
        [] if f.stats.oom_kills == 1 => "the kernel killed one process of the job".to_owned(),
        [] => format!(
            "the kernel killed {} processes of the job",
            f.stats.oom_kills
        ),
        ks => {
            // The kernel log numbers processes in the host's PID namespace; a job in a pod saw
            // other numbers, so there the pid is named as the node's.
            let pid = if in_host_pid_namespace() {
                "pid"
            } else {
                "node pid"
            };
            let names: Vec<String> = ks
                .iter()
                .map(|k| match k.pid {
                    0 => k.name.clone(),
                    n => format!("{} ({pid} {n})", k.name),
                })
                .collect();
            format!(
                "the kernel killed {}",
                bounded_list(&names, LIST_MAX, NAME_MAX)
            )
        }
    };
    let allowed = f
        .parallel
        .map(|(jobs, _)| format!(", the lane allows {jobs}"))
        .unwrap_or_default();
    let biggest = f
        .build_memory
        .first()
        .filter(|(_, b)| b.saturating_mul(ONE_BUILD_SHARE) >= f.envelope_bytes);
    let fewer = match (f.ran_at_once, f.parallel) {
        (n, _) if biggest.is_some() => {
            let (name, bytes) = biggest.map_or(("", 0), |(n, b)| (n.as_str(), *b));
            let beside = if n > 1 {
                format!("build it with nothing beside it (`--max-jobs 1`: {n} Nix builds ran at once here) and ")
            } else {
                String::new()
            };
            format!(
                "`{}` alone used {:.0}% of the envelope: {beside}lower its own parallelism (`--cores 1`, make -j1, cargo -j1)",
                bounded_list(&[name], 1, NAME_MAX),
                bytes as f64 * 100.0 / f.envelope_bytes.max(1) as f64
            )
        }
        (n, _) if n > 1 => format!(
            "lower the build's parallelism ({n} Nix builds ran at once here{allowed}: try `--max-jobs {}`; make -j, cargo -j likewise)",
            (n / 2).max(1)
        ),
        (1, _) => "lower that build's own parallelism (one Nix build ran at a time, so it alone outgrew the envelope: try `--cores 1`, make -j1, cargo -j1)".to_owned(),
        (_, parallel) => match parallel {
        Some((jobs, per)) if jobs > 1 => format!(
            "lower the build's parallelism (this lane runs up to {jobs} Nix builds at once, {} each: try `--max-jobs {}`; make -j, cargo -j likewise)",
            Bytes(per),
            (jobs / 2).max(1)
        ),
        Some((_, per)) => format!(
            "lower the build's own parallelism (Nix builds one derivation at a time here, {} of memory assumed each: try `--cores 1`, make -j1, cargo -j1)",
            Bytes(per)
        ),
        None => "lower the build's parallelism (fewer parallel jobs: nix --max-jobs / --cores, make -j, cargo -j)".to_owned(),
        },
    };
    let advice = match &f.bigger_lane {
        Some((name, bytes)) => format!(
            "{fewer} or run it on the `{name}` lane ({}) with `runs-on: {name}`",
            Bytes(*bytes)
        ),
        None => format!("{fewer} or split the job; no larger lane is configured"),
    };
    let building = match f.building.as_slice() {
        [] => String::new(),
        names => {
            let quoted: Vec<String> = names
                .iter()
                .map(|n| format!("`{}`", bounded_list(&[n], 1, NAME_MAX)))
                .collect();
            format!(
                " while building {}",
                bounded_list(&quoted, LIST_MAX, usize::MAX)
            )
        }
    };
    format!(
        "out of memory: this job on lane `{}` reached its memory envelope of {} (peak {peak}){building}{}; {who}. What to do: {advice}.",
        f.lane,
        Bytes(f.envelope_bytes),
        memory_words(f),
    )
}

/// The initial PID namespace's inode number (the kernel's `PROC_PID_INIT_INO`).
const PROC_PID_INIT_INO: u64 = 0xEFFF_FFFC;

/// Whether this process sees the host's PID numbers (false inside a container's PID namespace).
pub fn in_host_pid_namespace() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").map_or(true, |m| m.ino() == PROC_PID_INIT_INO)
}

/// A note when the pids cap refused forks.
pub fn pids_note(lane: &str, pids_max: u64, hits: u64) -> String {
    format!("flywheel: {}", pids_sentence(lane, pids_max, hits))
}

/// The note's sentence alone (an annotation's message).
pub fn pids_sentence(lane: &str, pids_max: u64, hits: u64) -> String {
    format!(
        "the job on lane `{lane}` hit its process limit of {pids_max} ({hits} forks refused); a fork bomb or runaway parallelism is the usual cause."
    )
}

/// Watches the kernel log for OOM kills of one job cgroup, to name the killed process.
#[derive(Debug)]
pub struct KmsgWatch {
    file: Option<std::fs::File>,
}

impl KmsgWatch {
    /// Start watching from now. Without access to `/dev/kmsg` the watch is empty.
    pub fn start() -> KmsgWatch {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")
            .ok()
            .and_then(|f| {
                use std::os::fd::AsRawFd;
                // SAFETY: lseek on a descriptor we own; SEEK_END positions after the last record.
                let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_END) };
                (r >= 0).then_some(f)
            });
        KmsgWatch { file }
    }

    /// OOM kills recorded since [`KmsgWatch::start`] whose memcg ends with `cgroup_suffix`.
    pub fn killed(&mut self, cgroup_suffix: &str) -> Vec<Killed> {
        let Some(f) = self.file.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        // Each read returns one record; EAGAIN when there is none left; EPIPE when records were
        // overwritten (the next read continues).
        for _ in 0..100_000 {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(k) =
                        parse_oom_record(&String::from_utf8_lossy(&buf[..n]), cgroup_suffix)
                    {
                        out.push(k);
                    }
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }
}

/// Parse `oom-kill:constraint=…,oom_memcg=/…/JOB,task_memcg=…,task=NAME,pid=PID,uid=UID`.
pub fn parse_oom_record(record: &str, cgroup_suffix: &str) -> Option<Killed> {
    let msg = record.split_once(';').map_or(record, |(_, m)| m);
    let body = msg.trim().strip_prefix("oom-kill:")?;
    let field = |k: &str| {
        body.split(',')
            .find_map(|kv| kv.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    let memcg = field("oom_memcg")?;
    if !memcg.ends_with(cgroup_suffix) {
        return None;
    }
    Some(Killed {
        name: field("task")?.to_owned(),
        pid: field("pid")?.trim().parse().ok()?,
    })
}

/// Names joined with ", ": at most `max` of them, each cut to `width` characters, then
/// "and N more". A list that names can never make long (derivation names are the job's, and
/// a neighbour's on a shared store would be an outsider's).
pub fn bounded_list<S: AsRef<str>>(names: &[S], max: usize, width: usize) -> String {
    let mut out: Vec<String> = names
        .iter()
        .take(max)
        .map(|n| {
            let n = n.as_ref();
            match n.char_indices().nth(width) {
                Some((i, _)) => format!("{}…", &n[..i]),
                None => n.to_owned(),
            }
        })
        .collect();
    if names.len() > max {
        out.push(format!("and {} more", names.len() - max));
    }
    out.join(", ")
}

/// At most this many names in one list of a summary or an annotation.
pub const LIST_MAX: usize = 10;
/// At most this many characters of one name there.
pub const NAME_MAX: usize = 80;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_names_lane_limit_peak_victim_and_advice() {
        let v = oom_verdict(&OomFacts {
            lane: "tinyland-nix".into(),
            envelope_bytes: 8 << 30,
            stats: Stats {
                oom_kills: 1,
                peak_bytes: Some(8 << 30),
                pids_max_hits: 0,
            },
            killed: vec![Killed {
                pid: 4242,
                name: "cc1plus".into(),
            }],
            bigger_lane: Some(("tinyland-nix-heavy".into(), 64 << 30)),
            building: vec!["hog".into()],
            parallel: Some((4, 2 << 30)),
            ran_at_once: 0,
            build_memory: Vec::new(),
        });
        for frag in [
            "out of memory",
            "`tinyland-nix`",
            "8.0 GiB",
            "peak 8.0 GiB",
            "cc1plus (pid 4242)",
            "while building `hog`",
            "up to 4 Nix builds at once, 2.0 GiB each: try `--max-jobs 2`",
            "runs-on: tinyland-nix-heavy",
        ] {
            assert!(v.contains(frag), "{frag:?} missing from {v}");
        }
        assert!(!v.contains("lost communication"));
    }

    #[test]
    fn a_verdict_names_a_bounded_number_of_builds_and_victims() {
        let v = oom_verdict(&OomFacts {
            lane: "tinyland-nix".into(),
            envelope_bytes: 8 << 30,
            stats: Stats {
                oom_kills: 300,
                peak_bytes: Some(8 << 30),
                pids_max_hits: 0,
            },
            killed: (0..300)
                .map(|i| Killed {
                    pid: i,
                    name: format!("victim{i}"),
                })
                .collect(),
            bigger_lane: None,
            building: (0..300)
                .map(|i| format!("{i}-{}", "y".repeat(200)))
                .collect(),
            parallel: None,
            ran_at_once: 0,
            build_memory: Vec::new(),
        });
        assert!(v.len() < 3000, "{} bytes: {v}", v.len());
        assert!(v.contains(", and 290 more;"), "{v}");
        assert_eq!(v.matches("victim").count(), 10, "{v}");
        assert_eq!(v.matches("-yyy").count(), 10, "{v}");
    }

    #[test]
    fn verdict_without_victim_or_bigger_lane() {
        let v = oom_verdict(&OomFacts {
            lane: "tinyland-nix-heavy".into(),
            envelope_bytes: 64 << 30,
            stats: Stats {
                oom_kills: 3,
                peak_bytes: None,
                pids_max_hits: 0,
            },
            killed: vec![],
            bigger_lane: None,
            building: Vec::new(),
            parallel: None,
            ran_at_once: 0,
            build_memory: Vec::new(),
        });
        assert!(
            v.contains("killed 3 processes")
                && v.contains("peak unknown")
                && v.contains("split the job"),
            "{v}"
        );
    }

    /// One OOM kill in an 8 GiB envelope while `boost` and `llvm` were building.
    fn two_builds(parallel: (u32, u64), ran_at_once: u32) -> OomFacts {
        OomFacts {
            lane: "tinyland-nix".into(),
            envelope_bytes: 8 << 30,
            stats: Stats {
                oom_kills: 1,
                peak_bytes: Some(8 << 30),
                pids_max_hits: 0,
            },
            killed: vec![],
            bigger_lane: None,
            building: vec!["boost".into(), "llvm".into()],
            parallel: Some(parallel),
            ran_at_once,
            build_memory: Vec::new(),
        }
    }

    #[test]
    fn the_advice_follows_the_builds_that_ran_at_once_not_the_lane() {
        let facts = |ran_at_once| two_builds((1, 8 << 30), ran_at_once);
        let v = oom_verdict(&facts(3));
        assert!(
            v.contains("3 Nix builds ran at once here, the lane allows 1: try `--max-jobs 1`"),
            "{v}"
        );
        assert!(!v.contains("one derivation at a time"), "{v}");
        let v = oom_verdict(&facts(1));
        assert!(v.contains("one Nix build ran at a time"), "{v}");
        let v = oom_verdict(&facts(0));
        assert!(
            v.contains("Nix builds one derivation at a time here"),
            "{v}"
        );
    }

    #[test]
    fn the_verdict_names_the_build_that_used_the_memory() {
        let mut f = OomFacts {
            build_memory: vec![
                ("llvm-18.1.8".into(), 5476 << 20),
                ("boost".into(), 2458 << 20),
                ("zlib".into(), 1 << 20),
                ("smallest".into(), 1 << 10),
            ],
            ..two_builds((4, 2 << 30), 2)
        };
        let v = oom_verdict(&f);
        assert!(
            v.contains("; `llvm-18.1.8` used 5.3 GiB of the 8.0 GiB envelope while `boost` used 2.4 GiB and `zlib` used 1.0 MiB (sampled);"),
            "{v}"
        );
        assert!(!v.contains("smallest"), "the largest three only: {v}");
        assert!(
            v.contains("`llvm-18.1.8` alone used 67% of the envelope: build it with nothing beside it (`--max-jobs 1`: 2 Nix builds ran at once here) and lower its own parallelism (`--cores 1`"),
            "{v}"
        );
        // Memory spread over builds that ran at once: fewer at once.
        f.build_memory = vec![("a".into(), 3 << 30), ("b".into(), 3 << 30)];
        let v = oom_verdict(&f);
        assert!(
            v.contains("2 Nix builds ran at once here, the lane allows 4: try `--max-jobs 1`"),
            "{v}"
        );
        assert!(
            v.contains("`a` used 3.0 GiB of the 8.0 GiB envelope while `b` used 3.0 GiB"),
            "{v}"
        );
    }

    #[test]
    fn parses_kernel_records() {
        let rec = "6,1234,163863263,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,oom_memcg=/process_api/x/flywheel-jobs/j1,task_memcg=/process_api/x/flywheel-jobs/j1,task=python3,pid=2169,uid=0\n";
        assert_eq!(
            parse_oom_record(rec, "/flywheel-jobs/j1"),
            Some(Killed {
                pid: 2169,
                name: "python3".into()
            })
        );
        assert_eq!(parse_oom_record(rec, "/flywheel-jobs/j2"), None);
        assert_eq!(
            parse_oom_record(
                "6,1,1,-;Memory cgroup out of memory: Killed process 1",
                "/j1"
            ),
            None
        );
    }
}
