//! Job cgroups: one [`CgroupManager`] trait over the three host layouts.
//!
//! - [`v2::V2`]: a pure cgroup v2 hierarchy (production hosts and pods).
//! - [`v1::V1`]: cgroup v1 controllers (`memory`, `pids`, `freezer`), optionally with the
//!   cgroup2 `unified` tree of a hybrid host, used for `cgroup.kill`.
//!
//! The cgroup mount is passed in, so unit tests run against a fake cgroupfs in a tempdir.
//! Job cgroups live under `<base>/flywheel-jobs/<job>`, where `<base>` is the agent's own
//! cgroup (or the configured parent).

pub mod detect;
pub mod v1;
pub mod v2;

use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use detect::detect;

/// The directory, under the base cgroup, that holds the job cgroups.
pub const JOBS_DIR: &str = "flywheel-jobs";
/// The leaf a v2 agent moves its base cgroup's processes into before enabling controllers.
pub const AGENT_LEAF: &str = "flywheel-agent";

/// Which kind of hierarchy a manager drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    V2,
    V1,
    Hybrid,
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Layout::V2 => "cgroup v2",
            Layout::V1 => "cgroup v1",
            Layout::Hybrid => "hybrid (cgroup v1 memory + cgroup2 unified)",
        })
    }
}

/// Limits of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids_max: u64,
    /// v2 `memory.oom.group`; ignored on v1, which kills one task.
    pub oom_group: bool,
}

/// What the kernel counted for a job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Processes the OOM killer killed in this cgroup.
    pub oom_kills: u64,
    /// Highest memory use seen, when the kernel reports it.
    pub peak_bytes: Option<u64>,
    /// Forks refused by `pids.max`.
    pub pids_max_hits: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy under {mount}: {why}")]
    NoHierarchy { mount: PathBuf, why: String },
    #[error("the cgroup filesystem at {path} is mounted read-only, so the agent cannot give jobs their memory envelope: run the runner pod privileged, or have the runtime mount cgroups read-write (CRI-O: io.kubernetes.cri-o.cgroup2-mount-hierarchy-rw), or (bare metal) Delegate=yes")]
    ReadOnly { path: PathBuf },
    #[error("cgroup v2 at {path} does not offer the {controller} controller to the agent: delegate it (systemd Delegate=yes, or a privileged pod) or set [cgroup] parent to a delegated cgroup")]
    NotDelegated { path: PathBuf, controller: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("job cgroup {path} still has processes after {waited:?}: they may be stuck in the kernel (D state); look at `ps -o pid,stat,wchan -p $(cat {path}/cgroup.procs)`")]
    NotEmpty { path: PathBuf, waited: Duration },
}

pub type Result<T> = std::result::Result<T, CgroupError>;

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(io_err("write", path))
}

pub(crate) fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(io_err("read", path))
}

/// Read a file that the kernel may not have (an older kernel, a controller off).
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

/// `key value` lines (`memory.events`, `memory.oom_control`, `pids.events`).
pub(crate) fn keyed(contents: &str, key: &str) -> Option<u64> {
    contents.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some(key)).then(|| it.next()?.parse().ok())?
    })
}

/// Send `sig` to each of `pids`, ignoring processes that are already gone.
pub fn signal_pids(pids: &[i32], sig: nix::sys::signal::Signal) {
    for &pid in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

pub(crate) fn parse_pids(contents: &str) -> Vec<i32> {
    contents
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

pub(crate) fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir(path).map_err(io_err("create cgroup", path))
}

pub(crate) fn mkdir_if_missing(path: &Path) -> Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_err("create cgroup", path)(e)),
    }
}

/// Remove a cgroup directory, retrying briefly while the kernel finishes releasing it.
pub(crate) fn rmdir(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(io_err("remove cgroup", path)(e)),
        }
    }
}

/// One hierarchy: where it is mounted and the base cgroup's path inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub mount: PathBuf,
    /// The base cgroup as a path inside the hierarchy, `/` for its root.
    pub base: String,
}

impl Hierarchy {
    pub fn new(mount: impl Into<PathBuf>, base: impl Into<String>) -> Hierarchy {
        Hierarchy {
            mount: mount.into(),
            base: base.into(),
        }
    }
    /// The directory of the base cgroup.
    pub fn base_dir(&self) -> PathBuf {
        self.mount.join(self.base.trim_start_matches('/'))
    }
    pub fn jobs_dir(&self) -> PathBuf {
        self.base_dir().join(JOBS_DIR)
    }
    pub fn job_dir(&self, name: &str) -> PathBuf {
        self.jobs_dir().join(name)
    }
}

/// Creates job cgroups on one host layout.
pub trait CgroupManager: Debug + Send + Sync {
    fn layout(&self) -> Layout;
    /// Create the job cgroup `name` with `limits`. On error nothing is left behind.
    fn create(&self, name: &str, limits: &Limits) -> Result<Box<dyn JobCgroup>>;
    /// A handle on an existing job cgroup (reconciliation after a crash).
    fn open(&self, name: &str) -> Box<dyn JobCgroup>;
    /// The job cgroups that exist now.
    fn list(&self) -> Result<Vec<String>>;
    /// The memory limit of the cgroup jobs are made under (the agent's service or pod), when
    /// it has one.
    fn base_memory_limit(&self) -> Option<u64>;
}

/// A file holding one number (`memory.current`, `memory.usage_in_bytes`); `None` when it is
/// absent or holds something else.
pub(crate) fn read_number(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A limit file's value: a number below 2^60 (v1 writes a huge number, v2 `max`, for none).
pub(crate) fn read_limit(path: &Path) -> Option<u64> {
    read_number(path).filter(|v| *v < (1 << 60))
}

/// One job's cgroup, in every hierarchy it spans.
pub trait JobCgroup: Debug + Send + Sync {
    fn name(&self) -> &str;
    /// `cgroup.procs` files the job's first process writes `0` into before it executes the
    /// command, so that nothing of the job ever runs outside its cgroup.
    fn procs_files(&self) -> Vec<PathBuf>;
    /// Processes in the job now.
    fn pids(&self) -> Result<Vec<i32>>;

    /// Send `sig` to every process in the job now.
    fn signal(&self, sig: nix::sys::signal::Signal) -> Result<()> {
        signal_pids(&self.pids()?, sig);
        Ok(())
    }
    fn stats(&self) -> Result<Stats>;
    /// Kill every process of the job, including ones forking concurrently.
    fn kill_all(&self) -> Result<()>;
    /// Remove the cgroup (it must be empty).
    fn remove(&self) -> Result<()>;

    fn is_empty(&self) -> Result<bool> {
        Ok(self.pids()?.is_empty())
    }

    /// Whether process `pid` is in the job, in every hierarchy the job spans (a hook's peer
    /// check).
    fn contains(&self, pid: i32) -> bool {
        let files = self.procs_files();
        !files.is_empty()
            && files
                .iter()
                .all(|f| std::fs::read_to_string(f).is_ok_and(|s| parse_pids(&s).contains(&pid)))
    }

    /// The job's memory use now (v2 `memory.current`, v1 `memory.usage_in_bytes`).
    fn memory_current(&self) -> Option<u64>;

    /// The job's memory high-water mark so far (v2 `memory.peak`, v1
    /// `memory.max_usage_in_bytes`): the peak in [`Stats`], read alone. None where the kernel
    /// keeps none.
    fn memory_peak(&self) -> Option<u64> {
        None
    }

    /// A v2 `cgroup.events` of the job: the kernel marks it modified when the job's
    /// `populated` flag changes, so teardown waits on it instead of sleeping.
    fn events_file(&self) -> Option<PathBuf> {
        None
    }

    /// Kill everything and wait until the job is empty.
    fn kill_and_drain(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        let events = self
            .events_file()
            .and_then(|f| crate::ready::EventsWatch::new(&f).ok());
        loop {
            if self.is_empty()? {
                return Ok(());
            }
            self.kill_all()?;
            if self.is_empty()? {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(CgroupError::NotEmpty {
                    path: self.procs_files().first().cloned().unwrap_or_default(),
                    waited: start.elapsed(),
                });
            }
            match &events {
                // Woken when the job empties; the bound only re-sends the kill to a job that
                // forks faster than it dies.
                Some(w) => w.wait(Duration::from_millis(50)),
                None => {
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
            }
        }
    }

    /// Kill everything, wait until the job is empty, remove it.
    fn destroy(&self, timeout: Duration) -> Result<()> {
        self.kill_and_drain(timeout)?;
        self.remove()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values() {
        let ev = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed(ev, "oom_kill"), Some(1));
        assert_eq!(keyed(ev, "oom"), Some(2));
        assert_eq!(keyed(ev, "missing"), None);
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(v1, "oom_kill"), Some(3));
    }

    #[test]
    fn pids_parse() {
        assert_eq!(parse_pids("1\n22\n\n333\n"), vec![1, 22, 333]);
    }

    #[test]
    fn hierarchy_paths() {
        let h = Hierarchy::new("/sys/fs/cgroup/memory", "/process_api/x");
        assert_eq!(
            h.base_dir(),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/x")
        );
        assert_eq!(
            h.job_dir("j1"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/x/flywheel-jobs/j1")
        );
        assert_eq!(Hierarchy::new("/m", "/").base_dir(), PathBuf::from("/m/"));
    }
}
