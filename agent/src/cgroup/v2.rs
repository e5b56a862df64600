//! Pure cgroup v2.

use std::path::{Path, PathBuf};

use super::{
    io_err, keyed, mkdir, mkdir_if_missing, parse_pids, read, read_number, read_optional, rmdir,
    write, CgroupError, CgroupManager, Hierarchy, JobCgroup, Layout, Limits, Result, Stats,
    AGENT_LEAF,
};

const CONTROLLERS: [&str; 2] = ["memory", "pids"];

/// A pure cgroup v2 host.
#[derive(Debug, Clone)]
pub struct V2 {
    pub hierarchy: Hierarchy,
}

fn has_all(list: &str) -> bool {
    let have: Vec<&str> = list
        .split_whitespace()
        .map(|c| c.trim_start_matches('+'))
        .collect();
    CONTROLLERS.iter().all(|c| have.contains(c))
}

impl V2 {
    pub fn new(hierarchy: Hierarchy) -> V2 {
        V2 { hierarchy }
    }

    /// Make `<base>/flywheel-jobs` a cgroup whose children get `memory` and `pids`.
    ///
    /// The no-internal-processes rule: a non-root cgroup that enables controllers for its
    /// children must hold no processes, so the base's processes (the agent, and in a pod the
    /// rest of the container) move into the leaf `flywheel-agent` first.
    pub fn prepare(&self) -> Result<()> {
        let base = self.hierarchy.base_dir();
        let subtree = base.join("cgroup.subtree_control");
        if !has_all(&read(&subtree)?) {
            let offered = read(&base.join("cgroup.controllers"))?;
            for c in CONTROLLERS {
                if !offered.split_whitespace().any(|o| o == c) {
                    return Err(CgroupError::NotDelegated {
                        path: base.clone(),
                        controller: c.to_owned(),
                    });
                }
            }
            // A process forked into the base between the move and the write makes the kernel
            // answer EBUSY: move again and retry.
            let mut attempt = 0;
            loop {
                if self.hierarchy.base != "/" {
                    self.evacuate(&base)?;
                }
                match std::fs::write(&subtree, "+memory +pids") {
                    Ok(()) => break,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 50 => {
                        attempt += 1;
                        std::thread::sleep(std::time::Duration::from_millis(2));
                    }
                    Err(e) => return Err(io_err("write", &subtree)(e)),
                }
            }
        }
        let jobs = self.hierarchy.jobs_dir();
        mkdir_if_missing(&jobs)?;
        let jobs_subtree = jobs.join("cgroup.subtree_control");
        if !has_all(&read_optional(&jobs_subtree)?.unwrap_or_default()) {
            write(&jobs_subtree, "+memory +pids")?;
        }
        Ok(())
    }

    /// Move every process of the base cgroup into its `flywheel-agent` leaf.
    fn evacuate(&self, base: &Path) -> Result<()> {
        let procs = parse_pids(&read(&base.join("cgroup.procs"))?);
        if procs.is_empty() {
            return Ok(());
        }
        let leaf = base.join(AGENT_LEAF);
        mkdir_if_missing(&leaf)?;
        let leaf_procs = leaf.join("cgroup.procs");
        tracing::info!(
            cgroup = %base.display(),
            processes = procs.len(),
            "moving the base cgroup's processes into {AGENT_LEAF}/ so that it can delegate memory and pids to job cgroups"
        );
        for pid in procs {
            match std::fs::write(&leaf_procs, pid.to_string()) {
                Ok(()) => {}
                // Gone meanwhile.
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => return Err(io_err("move process into", &leaf_procs)(e)),
            }
        }
        Ok(())
    }
}

impl CgroupManager for V2 {
    fn layout(&self) -> Layout {
        Layout::V2
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<Box<dyn JobCgroup>> {
        self.prepare()?;
        let job = V2Job {
            name: name.to_owned(),
            dir: self.hierarchy.job_dir(name),
        };
        mkdir(&job.dir)?;
        if let Err(e) = job.apply(limits) {
            let _ = rmdir(&job.dir);
            return Err(e);
        }
        Ok(Box::new(job))
    }

    fn open(&self, name: &str) -> Box<dyn JobCgroup> {
        Box::new(V2Job {
            name: name.to_owned(),
            dir: self.hierarchy.job_dir(name),
        })
    }

    fn list(&self) -> Result<Vec<String>> {
        list_dirs(&self.hierarchy.jobs_dir())
    }

    fn base_memory_limit(&self) -> Option<u64> {
        super::read_limit(&self.hierarchy.base_dir().join("memory.max"))
    }
}

pub(crate) fn list_dirs(dir: &Path) -> Result<Vec<String>> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    out.sort();
    Ok(out)
}

#[derive(Debug)]
struct V2Job {
    name: String,
    dir: PathBuf,
}

impl V2Job {
    fn apply(&self, limits: &Limits) -> Result<()> {
        write(
            &self.dir.join("memory.max"),
            &limits.memory_bytes.to_string(),
        )?;
        // Swap off. The file is absent when the kernel has no swap accounting, and then there
        // is no swap to charge the job for either.
        let swap = self.dir.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
        let group = self.dir.join("memory.oom.group");
        if group.exists() || limits.oom_group {
            write(&group, if limits.oom_group { "1" } else { "0" })?;
        }
        write(&self.dir.join("pids.max"), &limits.pids_max.to_string())?;
        Ok(())
    }
}

impl JobCgroup for V2Job {
    fn name(&self) -> &str {
        &self.name
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        vec![self.dir.join("cgroup.procs")]
    }

    fn pids(&self) -> Result<Vec<i32>> {
        match read_optional(&self.dir.join("cgroup.procs"))? {
            Some(s) => Ok(parse_pids(&s)),
            None => Ok(Vec::new()),
        }
    }

    fn is_empty(&self) -> Result<bool> {
        match read_optional(&self.dir.join("cgroup.events"))? {
            Some(ev) => Ok(keyed(&ev, "populated") == Some(0)),
            None => Ok(self.pids()?.is_empty()),
        }
    }

    fn stats(&self) -> Result<Stats> {
        let events = read_optional(&self.dir.join("memory.events"))?.unwrap_or_default();
        let peak =
            read_optional(&self.dir.join("memory.peak"))?.and_then(|s| s.trim().parse().ok());
        let pids = read_optional(&self.dir.join("pids.events"))?.unwrap_or_default();
        Ok(Stats {
            oom_kills: keyed(&events, "oom_kill").unwrap_or(0),
            peak_bytes: peak,
            pids_max_hits: keyed(&pids, "max").unwrap_or(0),
        })
    }

    fn kill_all(&self) -> Result<()> {
        kill_tree(&self.dir, || self.pids())
    }

    fn memory_current(&self) -> Option<u64> {
        read_number(&self.dir.join("memory.current"))
    }

    fn memory_peak(&self) -> Option<u64> {
        read_number(&self.dir.join("memory.peak"))
    }

    fn events_file(&self) -> Option<PathBuf> {
        Some(self.dir.join("cgroup.events"))
    }

    fn remove(&self) -> Result<()> {
        rmdir(&self.dir)
    }
}

/// `cgroup.kill` when the kernel has it (5.14+); else freeze, SIGKILL each process, thaw.
pub(crate) fn kill_tree(dir: &Path, pids: impl Fn() -> Result<Vec<i32>>) -> Result<()> {
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        return write(&kill, "1");
    }
    let freeze = dir.join("cgroup.freeze");
    let frozen = freeze.exists() && write(&freeze, "1").is_ok();
    super::signal_pids(&pids()?, nix::sys::signal::Signal::SIGKILL);
    if frozen {
        write(&freeze, "0")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn the_base_memory_limit_is_read_from_the_fake_tree() {
        let (t, v2) = fake("", "");
        assert_eq!(v2.base_memory_limit(), None, "no memory.max");
        fs::write(t.path().join("pod/memory.max"), "max\n").expect("w");
        assert_eq!(v2.base_memory_limit(), None, "max is no limit");
        fs::write(t.path().join("pod/memory.max"), "8589934592\n").expect("w");
        assert_eq!(v2.base_memory_limit(), Some(8 << 30));
    }

    fn fake(base_procs: &str, subtree: &str) -> (tempfile::TempDir, V2) {
        let t = tempfile::tempdir().expect("tempdir");
        let base = t.path().join("pod");
        fs::create_dir_all(&base).expect("mkdir");
        fs::write(base.join("cgroup.controllers"), "cpu memory pids io\n").expect("w");
        fs::write(base.join("cgroup.subtree_control"), subtree).expect("w");
        fs::write(base.join("cgroup.procs"), base_procs).expect("w");
        let v2 = V2::new(Hierarchy::new(t.path(), "/pod"));
        (t, v2)
    }

    #[test]
    fn create_moves_processes_then_delegates_then_writes_limits() {
        let (t, v2) = fake("1\n42\n", "");
        let limits = Limits {
            memory_bytes: 64 << 20,
            pids_max: 100,
            oom_group: false,
        };
        // The fake's job dirs need the files a real kernel would create.
        fs::create_dir_all(t.path().join("pod/flywheel-jobs")).expect("mkdir");
        fs::write(
            t.path().join("pod/flywheel-jobs/cgroup.subtree_control"),
            "",
        )
        .expect("w");
        let job = v2.create("j1", &limits).expect("create");
        let base = t.path().join("pod");
        // Processes moved into the agent leaf (a file in the fake: the last write wins).
        assert_eq!(
            fs::read_to_string(base.join("flywheel-agent/cgroup.procs")).expect("r"),
            "42"
        );
        assert_eq!(
            fs::read_to_string(base.join("cgroup.subtree_control")).expect("r"),
            "+memory +pids"
        );
        assert_eq!(
            fs::read_to_string(base.join("flywheel-jobs/cgroup.subtree_control")).expect("r"),
            "+memory +pids"
        );
        let dir = base.join("flywheel-jobs/j1");
        assert_eq!(
            fs::read_to_string(dir.join("memory.max")).expect("r"),
            (64u64 << 20).to_string()
        );
        assert_eq!(fs::read_to_string(dir.join("pids.max")).expect("r"), "100");
        assert!(
            !dir.join("memory.oom.group").exists(),
            "oom.group untouched when off and absent"
        );
        assert_eq!(job.procs_files(), vec![dir.join("cgroup.procs")]);
        assert_eq!(v2.list().expect("list"), vec!["j1".to_owned()]);
    }

    #[test]
    fn delegated_base_is_left_alone() {
        let (t, v2) = fake("1\n", "memory pids\n");
        v2.prepare().expect("prepare");
        assert!(!t.path().join("pod/flywheel-agent").exists());
    }

    #[test]
    fn memory_now_membership_and_the_events_file_come_from_the_job_dir() {
        let (t, v2) = fake("", "memory pids");
        let dir = t.path().join("pod/flywheel-jobs/j");
        fs::create_dir_all(&dir).expect("mkdir");
        let job = v2.open("j");
        assert_eq!(job.memory_current(), None, "no file, no figure");
        fs::write(dir.join("memory.current"), "12345678\n").expect("w");
        fs::write(dir.join("cgroup.procs"), "10\n20\n").expect("w");
        assert_eq!(job.memory_current(), Some(12_345_678));
        assert!(job.contains(20));
        assert!(!job.contains(30));
        assert_eq!(job.events_file(), Some(dir.join("cgroup.events")));
    }

    #[test]
    fn missing_controller_is_a_clear_error() {
        let (t, v2) = fake("", "");
        fs::write(t.path().join("pod/cgroup.controllers"), "cpu io\n").expect("w");
        let e = v2.prepare().expect_err("must fail");
        assert!(e.to_string().contains("memory controller"), "{e}");
        assert!(e.to_string().contains("Delegate=yes"), "{e}");
    }

    #[test]
    fn stats_from_events_and_peak() {
        let (t, v2) = fake("", "memory pids");
        let dir = t.path().join("pod/flywheel-jobs/j");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .expect("w");
        fs::write(dir.join("memory.peak"), "67108864\n").expect("w");
        fs::write(dir.join("pids.events"), "max 7\n").expect("w");
        fs::write(dir.join("cgroup.events"), "populated 0\nfrozen 0\n").expect("w");
        let job = v2.open("j");
        assert_eq!(job.memory_peak(), Some(64 << 20));
        assert_eq!(
            job.stats().expect("stats"),
            Stats {
                oom_kills: 1,
                peak_bytes: Some(64 << 20),
                pids_max_hits: 7
            }
        );
        assert!(job.is_empty().expect("empty"));
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").expect("w");
        assert!(!job.is_empty().expect("empty"));
        // No cgroup.kill in the fake: the freezer path freezes, kills each process, thaws. A
        // process of the fake cgroup proves the kill ran: a child of this test.
        let mut victim = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn");
        fs::write(dir.join("cgroup.procs"), format!("{}\n", victim.id())).expect("w");
        fs::write(dir.join("cgroup.freeze"), "0\n").expect("w");
        job.kill_all().expect("kill");
        let st = victim.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL),
            "the process listed in cgroup.procs was killed"
        );
        assert_eq!(
            fs::read_to_string(dir.join("cgroup.freeze")).expect("r"),
            "0",
            "thawed again after the kill"
        );
        assert!(
            !dir.join("cgroup.kill").exists(),
            "the fallback, not cgroup.kill"
        );
    }

    #[test]
    fn kill_writes_cgroup_kill() {
        let (t, v2) = fake("", "memory pids");
        let dir = t.path().join("pod/flywheel-jobs/j");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("cgroup.kill"), "").expect("w");
        v2.open("j").kill_all().expect("kill");
        assert_eq!(fs::read_to_string(dir.join("cgroup.kill")).expect("r"), "1");
    }
}
