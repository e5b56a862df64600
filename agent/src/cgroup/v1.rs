//! cgroup v1 controllers, with the cgroup2 `unified` tree of a hybrid host when there is one.
//!
//! Limits live in v1 `memory` and `pids`. Teardown uses `cgroup.kill` in the unified tree when
//! the host has one (hybrid), else the v1 freezer: freeze, SIGKILL every task, thaw, repeat.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::v2::list_dirs;
use super::{
    keyed, mkdir, mkdir_if_missing, parse_pids, read_number, read_optional, rmdir, signal_pids,
    write, CgroupError, CgroupManager, Hierarchy, JobCgroup, Layout, Limits, Result, Stats,
};

/// A cgroup v1 (or hybrid) host.
#[derive(Debug, Clone)]
pub struct V1 {
    pub memory: Hierarchy,
    pub pids: Hierarchy,
    pub freezer: Option<Hierarchy>,
    /// The cgroup2 tree of a hybrid host (no controllers needed: used for `cgroup.kill`).
    pub unified: Option<Hierarchy>,
}

impl V1 {
    fn job(&self, name: &str) -> V1Job {
        V1Job {
            name: name.to_owned(),
            memory: self.memory.job_dir(name),
            pids: self.pids.job_dir(name),
            freezer: self.freezer.as_ref().map(|h| h.job_dir(name)),
            unified: self.unified.as_ref().map(|h| h.job_dir(name)),
        }
    }

    fn hierarchies(&self) -> Vec<&Hierarchy> {
        let mut v = vec![&self.memory, &self.pids];
        v.extend(self.freezer.iter());
        v.extend(self.unified.iter());
        v
    }
}

impl CgroupManager for V1 {
    fn layout(&self) -> Layout {
        if self.unified.is_some() {
            Layout::Hybrid
        } else {
            Layout::V1
        }
    }

    fn create(&self, name: &str, limits: &Limits) -> Result<Box<dyn JobCgroup>> {
        if self.freezer.is_none() && self.unified.is_none() {
            return Err(CgroupError::NoHierarchy {
                mount: self.memory.mount.clone(),
                why: "neither a v1 freezer nor a cgroup2 tree is mounted, so a job's processes could not all be killed: mount the freezer controller".into(),
            });
        }
        let job = self.job(name);
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for h in self.hierarchies() {
                mkdir_if_missing(&h.jobs_dir())?;
                let dir = h.job_dir(name);
                mkdir(&dir)?;
                made.push(dir);
            }
            job.apply(limits)
        })();
        if let Err(e) = result {
            for dir in made.iter().rev() {
                let _ = rmdir(dir);
            }
            return Err(e);
        }
        Ok(Box::new(job))
    }

    fn open(&self, name: &str) -> Box<dyn JobCgroup> {
        Box::new(self.job(name))
    }

    fn base_memory_limit(&self) -> Option<u64> {
        super::read_limit(&self.memory.base_dir().join("memory.limit_in_bytes"))
    }

    fn list(&self) -> Result<Vec<String>> {
        let mut all = Vec::new();
        for h in self.hierarchies() {
            all.extend(list_dirs(&h.jobs_dir())?);
        }
        all.sort();
        all.dedup();
        Ok(all)
    }
}

#[derive(Debug)]
struct V1Job {
    name: String,
    memory: PathBuf,
    pids: PathBuf,
    freezer: Option<PathBuf>,
    unified: Option<PathBuf>,
}

impl V1Job {
    fn dirs(&self) -> Vec<&PathBuf> {
        let mut v = vec![&self.memory, &self.pids];
        v.extend(self.freezer.iter());
        v.extend(self.unified.iter());
        v
    }

    fn apply(&self, limits: &Limits) -> Result<()> {
        let limit = limits.memory_bytes.to_string();
        write(&self.memory.join("memory.limit_in_bytes"), &limit)?;
        // Swap off: memory+swap may not exceed memory. Absent without swap accounting.
        let memsw = self.memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write(&memsw, &limit)?;
        }
        let swappiness = self.memory.join("memory.swappiness");
        if swappiness.exists() {
            write(&swappiness, "0")?;
        }
        write(&self.pids.join("pids.max"), &limits.pids_max.to_string())?;
        Ok(())
    }

    /// Freeze, SIGKILL every task, thaw. Without `cgroup.kill`, freezing is what stops the
    /// job from forking faster than it is killed.
    fn freezer_kill(&self, freezer: &std::path::Path) -> Result<()> {
        let state = freezer.join("freezer.state");
        write(&state, "FROZEN")?;
        let deadline = Instant::now() + Duration::from_secs(1);
        while read_optional(&state)?.is_some_and(|s| s.trim() == "FREEZING")
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        if let Some(procs) = read_optional(&freezer.join("cgroup.procs"))? {
            signal_pids(&parse_pids(&procs), nix::sys::signal::Signal::SIGKILL);
        }
        write(&state, "THAWED")
    }
}

impl JobCgroup for V1Job {
    fn name(&self) -> &str {
        &self.name
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    fn pids(&self) -> Result<Vec<i32>> {
        let mut all = Vec::new();
        for d in self.dirs() {
            if let Some(s) = read_optional(&d.join("cgroup.procs"))? {
                all.extend(parse_pids(&s));
            }
        }
        all.sort_unstable();
        all.dedup();
        Ok(all)
    }

    fn stats(&self) -> Result<Stats> {
        let oom = read_optional(&self.memory.join("memory.oom_control"))?.unwrap_or_default();
        let peak = read_optional(&self.memory.join("memory.max_usage_in_bytes"))?
            .and_then(|s| s.trim().parse().ok());
        let pids = read_optional(&self.pids.join("pids.events"))?.unwrap_or_default();
        Ok(Stats {
            oom_kills: keyed(&oom, "oom_kill").unwrap_or(0),
            peak_bytes: peak,
            pids_max_hits: keyed(&pids, "max").unwrap_or(0),
        })
    }

    fn memory_current(&self) -> Option<u64> {
        read_number(&self.memory.join("memory.usage_in_bytes"))
    }

    fn memory_peak(&self) -> Option<u64> {
        read_number(&self.memory.join("memory.max_usage_in_bytes"))
    }

    fn events_file(&self) -> Option<PathBuf> {
        self.unified
            .as_ref()
            .map(|u| u.join("cgroup.events"))
            .filter(|f| f.exists())
    }

    fn kill_all(&self) -> Result<()> {
        if let Some(u) = &self.unified {
            let kill = u.join("cgroup.kill");
            if kill.exists() {
                return write(&kill, "1");
            }
        }
        match &self.freezer {
            Some(f) => self.freezer_kill(f),
            None => self.signal(nix::sys::signal::Signal::SIGKILL),
        }
    }

    fn remove(&self) -> Result<()> {
        let mut first_err = None;
        for d in self.dirs().into_iter().rev() {
            if let Err(e) = rmdir(d) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn fake(unified: bool, freezer: bool) -> (tempfile::TempDir, V1) {
        let t = tempfile::tempdir().expect("tempdir");
        let h = |c: &str, base: &str| {
            fs::create_dir_all(t.path().join(c).join(base.trim_start_matches('/'))).expect("mkdir");
            Hierarchy::new(t.path().join(c), base)
        };
        let v1 = V1 {
            memory: h("memory", "/process_api/x"),
            pids: h("pids", "/"),
            freezer: freezer.then(|| h("freezer", "/")),
            unified: unified.then(|| h("unified", "/")),
        };
        (t, v1)
    }

    #[test]
    fn the_base_memory_limit_is_read_from_the_fake_memory_hierarchy() {
        let (t, v1) = fake(true, false);
        let file = t.path().join("memory/process_api/x/memory.limit_in_bytes");
        fs::write(&file, "9223372036854771712\n").expect("w");
        assert_eq!(v1.base_memory_limit(), None, "v1's 'unlimited'");
        fs::write(&file, "536870912\n").expect("w");
        assert_eq!(v1.base_memory_limit(), Some(512 << 20));
    }

    #[test]
    fn memory_now_and_membership_read_every_hierarchy_of_the_job() {
        let (t, v1) = fake(true, false);
        let mem = t.path().join("memory/process_api/x/flywheel-jobs/j");
        let pids = t.path().join("pids/flywheel-jobs/j");
        let uni = t.path().join("unified/flywheel-jobs/j");
        for d in [&mem, &pids, &uni] {
            fs::create_dir_all(d).expect("mkdir");
            fs::write(d.join("cgroup.procs"), "10\n").expect("w");
        }
        let job = v1.open("j");
        fs::write(mem.join("memory.usage_in_bytes"), "4096\n").expect("w");
        assert_eq!(job.memory_current(), Some(4096));
        assert!(job.contains(10));
        // A process in only some of the job's hierarchies is not the job's.
        fs::write(mem.join("cgroup.procs"), "10\n11\n").expect("w");
        assert!(!job.contains(11));
        assert_eq!(job.events_file(), None, "no cgroup.events in the fake yet");
        fs::write(uni.join("cgroup.events"), "populated 1\n").expect("w");
        assert_eq!(job.events_file(), Some(uni.join("cgroup.events")));
    }

    #[test]
    fn hybrid_creates_in_every_hierarchy_and_writes_limits() {
        let (t, v1) = fake(true, true);
        assert_eq!(v1.layout(), Layout::Hybrid);
        let job = v1
            .create(
                "j1",
                &Limits {
                    memory_bytes: 1 << 30,
                    pids_max: 64,
                    oom_group: false,
                },
            )
            .expect("create");
        let mem = t.path().join("memory/process_api/x/flywheel-jobs/j1");
        assert_eq!(
            fs::read_to_string(mem.join("memory.limit_in_bytes")).expect("r"),
            (1u64 << 30).to_string()
        );
        assert_eq!(
            fs::read_to_string(t.path().join("pids/flywheel-jobs/j1/pids.max")).expect("r"),
            "64"
        );
        let files = job.procs_files();
        assert_eq!(files.len(), 4);
        assert!(files.contains(&t.path().join("unified/flywheel-jobs/j1/cgroup.procs")));
        assert_eq!(v1.list().expect("list"), vec!["j1".to_owned()]);
    }

    #[test]
    fn pure_v1_without_freezer_is_refused_and_leaves_nothing() {
        let (t, v1) = fake(false, false);
        assert_eq!(v1.layout(), Layout::V1);
        let e = v1
            .create(
                "j",
                &Limits {
                    memory_bytes: 1 << 20,
                    pids_max: 64,
                    oom_group: false,
                },
            )
            .expect_err("no freezer");
        assert!(e.to_string().contains("freezer"), "{e}");
        assert!(!t.path().join("memory/process_api/x/flywheel-jobs").exists());
    }

    #[test]
    fn stats_from_oom_control() {
        let (t, v1) = fake(true, true);
        let mem = t.path().join("memory/process_api/x/flywheel-jobs/j");
        fs::create_dir_all(&mem).expect("mkdir");
        fs::write(
            mem.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .expect("w");
        fs::write(mem.join("memory.max_usage_in_bytes"), "67108864\n").expect("w");
        assert_eq!(v1.open("j").memory_peak(), Some(64 << 20));
        let s = v1.open("j").stats().expect("stats");
        assert_eq!(
            s,
            Stats {
                oom_kills: 2,
                peak_bytes: Some(64 << 20),
                pids_max_hits: 0
            }
        );
    }

    #[test]
    fn hybrid_kill_uses_unified_cgroup_kill() {
        let (t, v1) = fake(true, true);
        let u = t.path().join("unified/flywheel-jobs/j");
        fs::create_dir_all(&u).expect("mkdir");
        fs::write(u.join("cgroup.kill"), "").expect("w");
        v1.open("j").kill_all().expect("kill");
        assert_eq!(fs::read_to_string(u.join("cgroup.kill")).expect("r"), "1");
    }

    #[test]
    fn pure_v1_kill_freezes_and_thaws() {
        let (t, v1) = fake(false, true);
        let f = t.path().join("freezer/flywheel-jobs/j");
        fs::create_dir_all(&f).expect("mkdir");
        fs::write(f.join("cgroup.procs"), "").expect("w");
        v1.open("j").kill_all().expect("kill");
        assert_eq!(
            fs::read_to_string(f.join("freezer.state")).expect("r"),
            "THAWED"
        );
    }
}
