//! Which build used the memory: at every memory sample the job's processes are grouped by the
//! Nix build they belong to and their resident anonymous memory is summed per build; each
//! build keeps the largest sum seen.
//!
//! A build is known by its processes, not by a cgroup of its own (Nix's `use-cgroups` needs
//! cgroup v2 and a delegated subtree; Debian's Nix 2.8 has none): the job's daemon runs every
//! builder inside the job's cgroup as a build user (never root, never the job's user, never
//! the daemon's own root: the first id of its user namespace's range), and a
//! builder's environment names its derivation (`name`, beside `NIX_BUILD_TOP`). So a process
//! of a build user belongs to the build its parent belongs to, else to the build its user
//! runs now (two builds at once never share a build user, and Nix kills a build user's
//! processes before it builds again), else to the one its own environment names (read once,
//! bounded in bytes and in reads per sample).
//!
//! How exact it is: sampled (a spike between two samples is not seen per build, though the
//! job's own line catches it), and counting each process's anonymous resident memory
//! (`RssAnon`): what compilers and linkers allocate. Pages a process shares with its parent
//! after `fork` count twice until written; file-backed pages (binaries, libraries, mapped
//! files), the page cache and tmpfs files are charged to the job once and belong to no build.
//! `RssAnon` is a counter the kernel keeps (a read costs the same whatever the process's
//! size), where PSS (`smaps_rollup`) walks every page of every process at every sample.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Arc;

/// At most this many builds are remembered per job (a hostile job's processes can claim any
/// name in its own environment).
pub const MAX_TRACKED: usize = 4096;
/// At most this many bytes of a process's environment are read.
pub const ENVIRON_MAX: u64 = 128 << 10;
/// At most this many environments are read at one sample (a build can fork many processes
/// whose parent exits at once).
pub const ENVIRON_READS: usize = 8;
/// A build's name is cut to this many characters (the longest name Nix allows in a store path).
const NAME_CHARS: usize = 211;

/// One process of the job at one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proc {
    pub pid: i32,
    pub ppid: i32,
    /// The real uid.
    pub uid: u32,
    /// Resident anonymous memory (`RssAnon`), in bytes.
    pub anon_bytes: u64,
}

/// `(ppid, real uid, RssAnon bytes)` from a `/proc/<pid>/status` text (a kernel thread or a
/// zombie has no `RssAnon`: 0).
pub fn parse_status(text: &str) -> Option<(i32, u32, u64)> {
    let (mut ppid, mut uid, mut anon) = (None, None, 0);
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let mut v = v.split_whitespace();
        match k {
            "PPid" => ppid = v.next().and_then(|s| s.parse().ok()),
            "Uid" => uid = v.next().and_then(|s| s.parse().ok()),
            "RssAnon" => {
                anon = v
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .map_or(0, |kb| kb.saturating_mul(1024));
            }
            _ => {}
        }
    }
    Some((ppid?, uid?, anon))
}

/// The build a builder's environment names: its `name`, beside the `NIX_BUILD_TOP` Nix sets
/// for every build; without `name` (structured attributes), the name in an unsandboxed build
/// directory (`/tmp/nix-build-NAME.drv-0`). None for any other process.
pub fn build_name(environ: &[u8]) -> Option<String> {
    let (mut top, mut name) = (None, None);
    for e in environ.split(|b| *b == 0) {
        if let Some(v) = e.strip_prefix(b"NIX_BUILD_TOP=") {
            top = Some(v);
        } else if let Some(v) = e.strip_prefix(b"name=") {
            name = Some(v);
        }
    }
    let top = top?;
    let name = match name {
        Some(n) if !n.is_empty() => String::from_utf8_lossy(n).into_owned(),
        _ => {
            let dir = String::from_utf8_lossy(top.rsplit(|b| *b == b'/').next()?).into_owned();
            let n = dir.strip_prefix("nix-build-")?;
            n.rsplit_once(".drv-")?.0.to_owned()
        }
    };
    // Nix allows only these in a store path's name; anything else did not come from Nix.
    Some(
        name.chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '+' | '-' | '.' | '_' | '?' | '=' => c,
                _ => '_',
            })
            .take(NAME_CHARS)
            .collect(),
    )
}

/// What the samples saw of one build.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildUse {
    pub name: String,
    /// The largest sum of its processes' memory at one sample.
    pub bytes: u64,
    /// When a sample last saw a process of it (Unix seconds): a build killed with nothing in
    /// its log has no other record of how long it ran.
    pub last_seen: f64,
}

/// The memory of a job's builds, sample after sample.
#[derive(Debug, Clone)]
pub struct BuildMemory {
    /// The job's user: its processes (and root's) are never a build's.
    job_uid: u32,
    /// Processes seen at the last sample: (uid, the build they belong to).
    known: HashMap<i32, (u32, Option<Arc<str>>)>,
    /// Each build's largest sum and when it was last seen.
    peaks: HashMap<Arc<str>, (u64, f64)>,
    /// Every process of the job at the last sample: (parent, uid).
    seen: HashMap<i32, (i32, u32)>,
    /// The page size, for `statm`.
    page: u64,
}

impl Default for BuildMemory {
    /// A job run as root: every other user's process may be a build's.
    fn default() -> BuildMemory {
        BuildMemory::new(0)
    }
}

impl BuildMemory {
    pub fn new(job_uid: u32) -> BuildMemory {
        BuildMemory {
            job_uid,
            known: HashMap::new(),
            peaks: HashMap::new(),
            seen: HashMap::new(),
            page: page_size(),
        }
    }

    /// Not root, not the job's user, not a daemon's root in its user namespace (the first id
    /// of a range, see [`crate::idrange::is_daemon_root`]): a build user.
    fn is_build_user(&self, uid: u32) -> bool {
        uid != 0 && uid != self.job_uid && !crate::idrange::is_daemon_root(uid)
    }

    /// One sample at `at` (Unix seconds): attribute `procs` to builds (`environ` reads a
    /// process's environment and names its build, see [`build_name`]; called once per build
    /// process whose parent is no build's), and keep each build's largest sum.
    pub fn observe(
        &mut self,
        procs: &[Proc],
        at: f64,
        mut environ: impl FnMut(i32) -> Option<String>,
    ) {
        let builds: Vec<&Proc> = procs.iter().filter(|p| self.is_build_user(p.uid)).collect();
        let by_pid: HashMap<i32, &Proc> = builds.iter().map(|p| (p.pid, *p)).collect();
        let mut now: HashMap<i32, (u32, Option<Arc<str>>)> = HashMap::with_capacity(builds.len());
        // A build user runs one build at a time, and Nix kills every process of a build user
        // before it builds again: while a process named by a build lives, its user's other
        // processes are that build's.
        let mut live: HashMap<u32, Arc<str>> = HashMap::new();
        for p in &builds {
            if let Some((_, b)) = self.known.get(&p.pid).filter(|(u, _)| *u == p.uid) {
                if let Some(b) = b {
                    live.entry(p.uid).or_insert_with(|| b.clone());
                }
                now.insert(p.pid, (p.uid, b.clone()));
            }
        }
        // New processes whose parent is no build's (a builder, or a process whose builder
        // exited): their user's live build, else the one their own environment names. At most
        // ENVIRON_READS environments a sample; the rest wait for the next one.
        let mut reads = 0;
        for p in &builds {
            if now.contains_key(&p.pid) || by_pid.contains_key(&p.ppid) {
                continue;
            }
            let b = match live.get(&p.uid) {
                Some(b) => Some(b.clone()),
                None if reads < ENVIRON_READS => {
                    reads += 1;
                    environ(p.pid).map(|n| self.intern(n))
                }
                None => continue,
            };
            if let Some(b) = &b {
                live.entry(p.uid).or_insert_with(|| b.clone());
            }
            now.insert(p.pid, (p.uid, b));
        }
        // The rest: their parent's build (the nearest ancestor placed above).
        for p in &builds {
            let mut chain = vec![*p];
            let found = loop {
                let Some(q) = chain.last().copied() else {
                    break None;
                };
                if let Some((_, b)) = now.get(&q.pid) {
                    chain.pop();
                    break Some(b.clone());
                }
                match by_pid.get(&q.ppid) {
                    Some(parent)
                        if chain.len() < 256 && !chain.iter().any(|c| c.pid == parent.pid) =>
                    {
                        chain.push(parent)
                    }
                    // A loop (pid reuse) or an ancestor left for the next sample.
                    _ => break None,
                }
            };
            if let Some(b) = found {
                for q in chain {
                    now.insert(q.pid, (q.uid, b.clone()));
                }
            }
        }
        // A build user runs one build at a time: its unnamed processes are that build's.
        let mut by_uid: HashMap<u32, Arc<str>> = HashMap::new();
        for (uid, b) in now.values() {
            if let Some(b) = b {
                by_uid.entry(*uid).or_insert_with(|| b.clone());
            }
        }
        let mut sums: HashMap<Arc<str>, u64> = HashMap::new();
        for p in procs {
            let Some((uid, b)) = now.get(&p.pid) else {
                continue;
            };
            if let Some(b) = b.clone().or_else(|| by_uid.get(uid).cloned()) {
                *sums.entry(b).or_default() += p.anon_bytes;
            }
        }
        for (b, v) in sums {
            let len = self.peaks.len();
            match self.peaks.get_mut(&b) {
                Some((peak, last)) => {
                    *peak = (*peak).max(v);
                    *last = at;
                }
                None if len < MAX_TRACKED => {
                    self.peaks.insert(b, (v, at));
                }
                None => {}
            }
        }
        self.known = now;
    }

    fn intern(&self, name: String) -> Arc<str> {
        self.peaks
            .get_key_value(name.as_str())
            .map_or_else(|| Arc::from(name), |(k, _)| k.clone())
    }

    /// Each build's largest memory, the largest first.
    pub fn peaks(&self) -> Vec<BuildUse> {
        let mut v: Vec<BuildUse> = self
            .peaks
            .iter()
            .map(|(k, (bytes, last_seen))| BuildUse {
                name: k.to_string(),
                bytes: *bytes,
                last_seen: *last_seen,
            })
            .collect();
        v.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
        v
    }

    /// One sample at `at` (Unix seconds) of the processes `pids` from `/proc`. A process is
    /// read whole (`status`: parent, user, memory) when first seen; after that a build user's
    /// only for its memory (`statm`, through a descriptor kept open: no path walk), the job
    /// user's never (it cannot become a build user), root's whole again (the daemon's
    /// children become build users).
    pub fn sample(&mut self, pids: &[i32], at: f64, open: &mut Handles) {
        let mut procs = Vec::new();
        let mut seen = HashMap::with_capacity(pids.len());
        for &pid in pids {
            let known = self.seen.get(&pid).copied();
            if let Some((ppid, uid)) = known.filter(|(_, u)| *u != 0 && !self.is_build_user(*u)) {
                seen.insert(pid, (ppid, uid));
                continue;
            }
            let again = known.filter(|(_, u)| *u != 0).and_then(|(ppid, uid)| {
                let anon_bytes = parse_statm(&open.statm(pid)?, self.page)?;
                Some(Proc {
                    pid,
                    ppid,
                    uid,
                    anon_bytes,
                })
            });
            // New, root's, or its descriptor no longer reads (the process is gone and its
            // pid perhaps another's): read whole.
            let p = again.or_else(|| {
                let (ppid, uid, anon_bytes) =
                    parse_status(&read_small(&format!("/proc/{pid}/status"))?)?;
                Some(Proc {
                    pid,
                    ppid,
                    uid,
                    anon_bytes,
                })
            });
            if let Some(p) = p {
                seen.insert(pid, (p.ppid, p.uid));
                procs.push(p);
            }
        }
        open.0.retain(|pid, _| seen.contains_key(pid));
        self.seen = seen;
        self.observe(&procs, at, |pid| {
            let mut buf = Vec::new();
            std::fs::File::open(format!("/proc/{pid}/environ"))
                .ok()?
                .take(ENVIRON_MAX)
                .read_to_end(&mut buf)
                .ok()?;
            build_name(&buf)
        })
    }
}

/// At most this many `statm` descriptors are kept open per job; a build's processes beyond
/// them are opened at every sample.
pub const MAX_HANDLES: usize = 64;

/// The `statm` files of a job's build processes, kept open by the sampler and read again
/// from offset 0 (a descriptor names one process: a pid reused by another reads nothing).
/// Dropped with the sampler.
#[derive(Debug, Default)]
pub struct Handles(HashMap<i32, std::fs::File>);

impl Handles {
    fn statm(&mut self, pid: i32) -> Option<String> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 256];
        if let Some(f) = self.0.get(&pid) {
            return match f.read_at(&mut buf, 0) {
                Ok(n) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                _ => {
                    self.0.remove(&pid);
                    None
                }
            };
        }
        let f = std::fs::File::open(format!("/proc/{pid}/statm")).ok()?;
        let n = f.read_at(&mut buf, 0).ok().filter(|n| *n > 0)?;
        if self.0.len() < MAX_HANDLES {
            self.0.insert(pid, f);
        }
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// How many descriptors are open.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A small `/proc` file in one read (no `stat` first, as `read_to_string` does).
fn read_small(path: &str) -> Option<String> {
    let mut buf = [0u8; 4096];
    let n = std::fs::File::open(path).ok()?.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Resident anonymous memory from a `/proc/<pid>/statm` text (`size resident shared …` in
/// pages; `shared` is the file-backed and shmem pages).
pub fn parse_statm(text: &str, page: u64) -> Option<u64> {
    let mut f = text.split_whitespace().skip(1);
    let resident: u64 = f.next()?.parse().ok()?;
    let shared: u64 = f.next()?.parse().ok()?;
    Some(resident.saturating_sub(shared).saturating_mul(page))
}

/// The system's page size.
fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|p| *p > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const JOB: u32 = 1000;
    const MIB: u64 = 1 << 20;

    fn sums(m: &BuildMemory) -> Vec<(String, u64)> {
        m.peaks().into_iter().map(|b| (b.name, b.bytes)).collect()
    }

    fn p(pid: i32, ppid: i32, uid: u32, mib: u64) -> Proc {
        Proc {
            pid,
            ppid,
            uid,
            anon_bytes: mib * MIB,
        }
    }

    #[test]
    fn status_and_environ_are_parsed() {
        let status = "Name:\ttail\nUmask:\t0022\nState:\tR (running)\nTgid:\t42\nPid:\t42\nPPid:\t41\nUid:\t30001\t30001\t30001\t30001\nGid:\t30000\t30000\t30000\t30000\nVmRSS:\t  204800 kB\nRssAnon:\t  204000 kB\nRssFile:\t     800 kB\n";
        assert_eq!(parse_status(status), Some((41, 30001, 204_000 * 1024)));
        // A kernel thread: no memory lines.
        assert_eq!(
            parse_status("Name:\tkthreadd\nPPid:\t0\nUid:\t0\t0\t0\t0\n"),
            Some((0, 0, 0))
        );
        assert_eq!(parse_status("Name:\tx\n"), None);
        let env = b"HOME=/homeless-shelter\0NIX_BUILD_TOP=/tmp/nix-build-llvm-18.1.8.drv-0\0name=llvm-18.1.8\0out=/nix/store/abc-llvm-18.1.8\0";
        assert_eq!(build_name(env).as_deref(), Some("llvm-18.1.8"));
        // Structured attributes: no `name`; the build directory still names it.
        assert_eq!(
            build_name(b"NIX_BUILD_TOP=/tmp/nix-build-boost-1.86.drv-3\0").as_deref(),
            Some("boost-1.86")
        );
        // Sandboxed, structured: nothing names it.
        assert_eq!(build_name(b"NIX_BUILD_TOP=/build\0"), None);
        // No `NIX_BUILD_TOP`: not a builder, whatever `name` says.
        assert_eq!(build_name(b"name=llvm\0PATH=/bin\0"), None);
    }

    #[test]
    fn processes_are_grouped_by_build_and_each_build_keeps_its_largest_sum() {
        let mut m = BuildMemory::new(JOB);
        let mut reads = Vec::new();
        // The daemon (root) forked two builders (build users 30001 and 30002); llvm's make ran
        // two compilers; the job's own shell and nix client are the job user's.
        let procs = [
            p(10, 1, JOB, 50),
            p(11, 10, JOB, 30),
            p(20, 1, 0, 40),
            p(21, 20, 30001, 1),
            p(22, 21, 30001, 2000),
            p(23, 21, 30001, 3000),
            p(31, 20, 30002, 2400),
        ];
        let names = |pid: i32| match pid {
            21 => Some("llvm-18.1.8".to_owned()),
            31 => Some("boost-1.86".to_owned()),
            _ => None,
        };
        m.observe(&procs, 100.0, |pid| {
            reads.push(pid);
            names(pid)
        });
        assert_eq!(reads, [21, 31], "only the builders' environments are read");
        assert_eq!(
            sums(&m),
            [
                ("llvm-18.1.8".to_owned(), 5001 * MIB),
                ("boost-1.86".to_owned(), 2400 * MIB)
            ]
        );
        // Next sample: llvm's compilers ended and a linker (a new process) runs; boost grows.
        // Known processes are not read again; the peak of llvm stays.
        reads.clear();
        let procs = [
            p(21, 20, 30001, 1),
            p(24, 21, 30001, 900),
            p(31, 20, 30002, 2600),
        ];
        m.observe(&procs, 100.25, |pid| {
            reads.push(pid);
            names(pid)
        });
        assert!(reads.is_empty(), "{reads:?}");
        assert_eq!(
            sums(&m),
            [
                ("llvm-18.1.8".to_owned(), 5001 * MIB),
                ("boost-1.86".to_owned(), 2600 * MIB)
            ]
        );
        // Only boost runs on: llvm was last seen at the second sample.
        m.observe(&[p(31, 20, 30002, 100)], 100.5, names);
        let last: Vec<f64> = m.peaks().iter().map(|b| b.last_seen).collect();
        assert_eq!(last, [100.25, 100.5]);
    }

    #[test]
    fn a_build_user_reused_by_a_later_build_and_orphans_and_cleared_environments() {
        let mut m = BuildMemory::new(JOB);
        m.observe(&[p(21, 20, 30001, 100)], 0.0, |_| Some("first".into()));
        // Build user 30001 runs another build: its builder is a new process, named anew. A
        // process whose builder already exited (reparented to the agent) and whose environment
        // names nothing is the build its user runs now; one of another build user that no
        // process names is nobody's.
        let procs = [
            p(40, 20, 30001, 10),
            p(41, 1, 30001, 70),
            p(50, 1, 30003, 999),
        ];
        m.observe(&procs, 1.0, |pid| (pid == 40).then(|| "second".into()));
        assert_eq!(
            sums(&m),
            [
                ("first".to_owned(), 100 * MIB),
                ("second".to_owned(), 80 * MIB)
            ]
        );
    }

    #[test]
    fn environments_are_read_a_few_at_a_time_and_never_for_a_live_builds_orphans() {
        let mut m = BuildMemory::new(JOB);
        let mut reads = 0;
        // A builder and 50 orphans of its user (a double fork): only the builder is read.
        let mut procs = vec![p(21, 20, 30001, 1)];
        procs.extend((0..50).map(|i| p(100 + i, 1, 30001, 1)));
        m.observe(&procs, 0.0, |pid| {
            reads += 1;
            (pid == 21).then(|| "b".into())
        });
        assert_eq!((reads, sums(&m)), (1, vec![("b".to_owned(), 51 * MIB)]));
        // 20 new build users at once: ENVIRON_READS of them now, the rest at the next sample.
        let procs: Vec<Proc> = (0..20)
            .map(|i| p(200 + i, 1, 31000 + i as u32, 1))
            .collect();
        let mut read = Vec::new();
        m.observe(&procs, 1.0, |pid| {
            read.push(pid);
            Some(format!("u{pid}"))
        });
        assert_eq!(read.len(), ENVIRON_READS);
        for t in [2.0, 3.0] {
            m.observe(&procs, t, |pid| {
                read.push(pid);
                Some(format!("u{pid}"))
            });
        }
        read.sort_unstable();
        assert_eq!(read, (200..220).collect::<Vec<_>>(), "each read once");
        assert_eq!(m.peaks().len(), 21);
        // A name no Nix would make is made harmless.
        assert_eq!(
            build_name(b"NIX_BUILD_TOP=/build\0name=x\x1b[2Jy`|z\n\0").as_deref(),
            Some("x__2Jy__z_")
        );
    }

    #[test]
    fn statm_gives_anonymous_memory() {
        assert_eq!(
            parse_statm("5000 3000 1000 10 0 2500 0\n", 4096),
            Some(2000 * 4096)
        );
        assert_eq!(parse_statm("5000\n", 4096), None);
    }

    /// A process of a build user in this test's own view of `/proc`: a child holding memory
    /// under a uid that is neither root nor the job's, named by its environment; read whole
    /// at the first sample (just after it started, before it allocated), by `statm` through
    /// a descriptor kept open after, closed when it is gone.
    #[test]
    fn a_real_process_is_read_from_proc() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "needs root to run a child as another user"
            );
            eprintln!("SKIP a_real_process_is_read_from_proc: needs root");
            return;
        }
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "x=$(head -c 30000000 /dev/zero | tr '\\0' a); exec sleep 30",
            ])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("NIX_BUILD_TOP", "/build")
            .env("name", "held-1.0")
            .uid(65534)
            .gid(65534)
            .spawn()
            .expect("spawn");
        let pid = i32::try_from(child.id()).expect("pid");
        let (mut m, mut open) = (BuildMemory::new(JOB), Handles::default());
        // The shell builds its 30 MB string, then execs sleep, which holds none of it: the
        // build's largest sum is the shell's.
        let t0 = std::time::Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            m.sample(&[pid], 0.0, &mut open);
            if m.peaks().first().is_some_and(|b| b.bytes > 25 << 20) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(open.len(), 1, "its statm is kept open");
        let _ = child.kill();
        let _ = child.wait();
        // Gone: its descriptor reads nothing and is closed; the pid is no longer the job's.
        m.sample(&[pid], 1.0, &mut open);
        assert!(open.is_empty() && m.seen.is_empty());
        let peaks = m.peaks();
        assert_eq!(peaks.len(), 1, "{peaks:?}");
        assert_eq!(peaks[0].name, "held-1.0");
        assert!(peaks[0].bytes > 25 << 20, "{peaks:?}");
    }

    #[test]
    fn a_loop_in_parents_ends_and_the_number_of_builds_is_bounded() {
        let mut m = BuildMemory::new(JOB);
        // pid reuse can make a cycle in one sample's view.
        m.observe(&[p(5, 6, 30001, 1), p(6, 5, 30001, 1)], 0.0, |_| None);
        assert!(m.peaks().is_empty());
        // Each process a build user of its own, under one builder that names them all.
        let mut procs = vec![p(99, 1, 40000, 1)];
        procs.extend((0..(MAX_TRACKED as i32 + 10)).map(|i| p(100 + i, 99, 50000 + i as u32, 1)));
        let mut n = 0;
        m.observe(&procs, 0.0, |_| {
            n += 1;
            Some("root".into())
        });
        assert_eq!((n, m.peaks().len()), (1, 1));
        // Builds come and go: every one is remembered up to the bound.
        let procs: Vec<Proc> = (0..(MAX_TRACKED as i32 + 10))
            .map(|i| p(100_000 + i, 1, 60000 + i as u32, 1))
            .collect();
        for (t, some) in procs.chunks(ENVIRON_READS).enumerate() {
            m.observe(some, t as f64, |pid| Some(format!("b{pid}")));
        }
        assert_eq!(m.peaks().len(), MAX_TRACKED);
    }
}
