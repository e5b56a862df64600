//! Find the host's cgroup layout from `/proc/self/mountinfo` and `/proc/self/cgroup`.

use std::path::{Path, PathBuf};

use super::v1::V1;
use super::v2::V2;
use super::{CgroupError, CgroupManager, Hierarchy, Result, AGENT_LEAF};

/// One cgroup mount seen in mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub mountpoint: PathBuf,
    /// The hierarchy path mounted there (not `/` when a container sees part of a tree).
    pub root: String,
    /// `None` for cgroup2, else the v1 controllers (`memory`, `pids`, `name=systemd`, …).
    pub controllers: Option<Vec<String>>,
    /// Mounted read-only (an unprivileged pod).
    pub read_only: bool,
}

/// The cgroup mounts in a mountinfo document.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split_whitespace().collect();
        let post: Vec<&str> = post.split_whitespace().collect();
        let (Some(root), Some(mp), Some(fstype)) = (pre.get(3), pre.get(4), post.first()) else {
            continue;
        };
        let controllers = match *fstype {
            "cgroup2" => None,
            "cgroup" => Some(
                post.get(2)
                    .unwrap_or(&"")
                    .split(',')
                    .filter(|o| !matches!(*o, "rw" | "ro") && !o.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            _ => continue,
        };
        let read_only = pre.get(5).is_some_and(|o| o.split(',').any(|x| x == "ro"));
        out.push(CgroupMount {
            mountpoint: PathBuf::from(unescape(mp)),
            root: unescape(root),
            controllers,
            read_only,
        });
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup path for a v1 controller, or for v2 with `controller = None`.
pub fn own_path(proc_self_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_id, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        let hit = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        hit.then(|| path.to_owned())
    })
}

/// Turn a cgroup path into a path relative to what is mounted (`root`).
fn relative_to_mount(path: &str, mount_root: &str) -> String {
    if mount_root == "/" {
        return path.to_owned();
    }
    match path.strip_prefix(mount_root) {
        Some("") => "/".to_owned(),
        Some(rest) if rest.starts_with('/') => rest.to_owned(),
        _ => path.to_owned(),
    }
}

fn base_for(
    m: &CgroupMount,
    own: Option<String>,
    parent: Option<&str>,
    strip_leaf: bool,
) -> Hierarchy {
    let base = match parent {
        Some(p) => p.to_owned(),
        None => {
            let own = relative_to_mount(&own.unwrap_or_else(|| "/".into()), &m.root);
            let leaf = format!("/{AGENT_LEAF}");
            match own.strip_suffix(&leaf) {
                Some(up) if strip_leaf => {
                    if up.is_empty() {
                        "/".to_owned()
                    } else {
                        up.to_owned()
                    }
                }
                _ => own,
            }
        }
    };
    Hierarchy::new(m.mountpoint.clone(), base)
}

/// Choose the manager for a host from its mountinfo and `/proc/self/cgroup`.
///
/// `mount` is the cgroup filesystem root (normally `/sys/fs/cgroup`); `parent`, when given,
/// is the base cgroup path used in every hierarchy instead of the agent's own.
pub fn from_texts(
    mountinfo: &str,
    self_cgroup: &str,
    mount: &Path,
    parent: Option<&str>,
    kernel_has_cgroup_kill: bool,
) -> Result<Box<dyn CgroupManager>> {
    let mounts: Vec<CgroupMount> = parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|m| m.mountpoint.starts_with(mount))
        .collect();
    // Only the hierarchies the agent writes must be writable: a read-only controller it never
    // uses (perf_event, cpuset under systemd-nspawn) changes nothing.
    let writable = |m: &CgroupMount| {
        if m.read_only {
            Err(CgroupError::ReadOnly {
                path: m.mountpoint.clone(),
            })
        } else {
            Ok(())
        }
    };
    let v2 = mounts.iter().find(|m| m.controllers.is_none());
    if let Some(m) = v2.filter(|m| m.mountpoint == mount) {
        writable(m)?;
        let own = own_path(self_cgroup, None);
        return Ok(Box::new(V2::new(base_for(m, own, parent, true))));
    }
    let v1 = |c: &str| {
        mounts.iter().find(|m| {
            m.controllers
                .as_ref()
                .is_some_and(|cs| cs.iter().any(|x| x == c))
        })
    };
    let Some(memory) = v1("memory") else {
        return Err(CgroupError::NoHierarchy {
            mount: mount.to_path_buf(),
            why: "neither cgroup2 nor a v1 memory controller is mounted there".into(),
        });
    };
    let Some(pids) = v1("pids") else {
        return Err(CgroupError::NoHierarchy {
            mount: mount.to_path_buf(),
            why: "the v1 pids controller is not mounted, so a job's process count cannot be capped"
                .into(),
        });
    };
    writable(memory)?;
    writable(pids)?;
    let h = |m: &CgroupMount, c: Option<&str>| base_for(m, own_path(self_cgroup, c), parent, false);
    // With `cgroup.kill` in the unified tree the freezer is not needed for teardown; either is
    // used only when it is writable (teardown falls back to signalling each process).
    let unified = v2.filter(|m| kernel_has_cgroup_kill && !m.read_only);
    Ok(Box::new(V1 {
        memory: h(memory, Some("memory")),
        pids: h(pids, Some("pids")),
        freezer: if unified.is_some() {
            None
        } else {
            v1("freezer")
                .filter(|m| !m.read_only)
                .map(|m| h(m, Some("freezer")))
        },
        unified: unified.map(|m| base_for(m, own_path(self_cgroup, None), parent, true)),
    }))
}

/// `cgroup.kill` arrived in Linux 5.14.
pub fn release_has_cgroup_kill(release: &str) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty());
    let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let minor: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    (major, minor) >= (5, 14)
}

/// Detect this host's layout.
pub fn detect(mount: &Path, parent: Option<&str>) -> Result<Box<dyn CgroupManager>> {
    let read = |p: &str| {
        std::fs::read_to_string(p).map_err(|e| CgroupError::Io {
            op: "read",
            path: PathBuf::from(p),
            source: e,
        })
    };
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    from_texts(
        &read("/proc/self/mountinfo")?,
        &read("/proc/self/cgroup")?,
        mount,
        parent,
        release_has_cgroup_kill(&release),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::Layout;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_SELF: &str =
        "9:name=systemd:/\n8:pids:/\n6:freezer:/\n4:memory:/process_api/abc\n0::/\n";

    #[test]
    fn parses_mountinfo() {
        let m = parse_mountinfo(HYBRID);
        assert_eq!(m.len(), 5);
        assert_eq!(
            m[0].controllers.as_deref(),
            Some(&["memory".to_owned()][..])
        );
        assert_eq!(m[4].controllers, None);
        assert_eq!(unescape("/a\\040b"), "/a b");
    }

    #[test]
    fn old_hybrid_kernel_keeps_the_freezer() {
        let mgr = from_texts(
            HYBRID,
            HYBRID_SELF,
            Path::new("/sys/fs/cgroup"),
            None,
            false,
        )
        .expect("detect");
        let s = format!("{mgr:?}");
        assert!(
            s.contains("freezer: Some") && s.contains("unified: None"),
            "{s}"
        );
        assert!(release_has_cgroup_kill("6.18.44-fc-v657"));
        assert!(release_has_cgroup_kill("5.14.0"));
        assert!(!release_has_cgroup_kill("5.10.0-28-cloud-amd64"));
        assert!(!release_has_cgroup_kill("4.19.0"));
    }

    #[test]
    fn hybrid_host() {
        let mgr = from_texts(HYBRID, HYBRID_SELF, Path::new("/sys/fs/cgroup"), None, true)
            .expect("detect");
        assert_eq!(mgr.layout(), Layout::Hybrid);
        let s = format!("{mgr:?}");
        assert!(s.contains("base: \"/process_api/abc\""), "{s}");
        assert!(
            s.contains("freezer: None"),
            "cgroup.kill makes the freezer unnecessary: {s}"
        );
    }

    #[test]
    fn pure_v2_host_in_a_systemd_service() {
        let mi = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let own = "0::/system.slice/flywheel-agent.service\n";
        let mgr = from_texts(mi, own, Path::new("/sys/fs/cgroup"), None, true).expect("detect");
        assert_eq!(mgr.layout(), Layout::V2);
        assert!(format!("{mgr:?}").contains("base: \"/system.slice/flywheel-agent.service\""));
        // After the agent moved itself into its leaf, the base stays the service cgroup.
        let moved = "0::/system.slice/flywheel-agent.service/flywheel-agent\n";
        let mgr = from_texts(mi, moved, Path::new("/sys/fs/cgroup"), None, true).expect("detect");
        assert!(format!("{mgr:?}").contains("base: \"/system.slice/flywheel-agent.service\""));
    }

    #[test]
    fn container_without_cgroupns_sees_its_part_of_the_tree() {
        let mi = "30 23 0:26 /kubepods/pod1/c1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let own = "0::/kubepods/pod1/c1\n";
        let mgr = from_texts(mi, own, Path::new("/sys/fs/cgroup"), None, true).expect("detect");
        assert!(format!("{mgr:?}").contains("base: \"/\""));
    }

    #[test]
    fn configured_parent_wins() {
        let mgr = from_texts(
            HYBRID,
            HYBRID_SELF,
            Path::new("/sys/fs/cgroup"),
            Some("/flywheel"),
            true,
        )
        .expect("detect");
        assert!(format!("{mgr:?}").contains("base: \"/flywheel\""));
    }

    #[test]
    fn read_only_controllers_the_agent_never_writes_change_nothing() {
        // As under systemd-nspawn: perf_event and cpuset read-only, the freezer too.
        let mi = format!(
            "{HYBRID}42 31 0:39 / /sys/fs/cgroup/perf_event ro,relatime - cgroup cgroup rw,perf_event\n\
             43 31 0:40 / /sys/fs/cgroup/cpuset ro,relatime - cgroup cgroup rw,cpuset\n"
        )
        .replace(
            "/sys/fs/cgroup/freezer rw,relatime",
            "/sys/fs/cgroup/freezer ro,relatime",
        );
        let mgr = from_texts(&mi, HYBRID_SELF, Path::new("/sys/fs/cgroup"), None, false)
            .expect("the memory and pids hierarchies are writable");
        let dbg = format!("{mgr:?}");
        assert!(dbg.contains("freezer: None"), "{dbg}");
        // A read-only memory hierarchy is still refused: jobs could not be capped.
        let ro = HYBRID.replace(
            "/sys/fs/cgroup/memory rw,relatime",
            "/sys/fs/cgroup/memory ro,relatime",
        );
        let e = from_texts(&ro, HYBRID_SELF, Path::new("/sys/fs/cgroup"), None, false)
            .expect_err("memory read-only");
        assert!(e.to_string().contains("/sys/fs/cgroup/memory"), "{e}");
    }

    #[test]
    fn a_read_only_cgroup_mount_is_a_clear_error() {
        let mi =
            "30 23 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n";
        let e = from_texts(mi, "0::/\n", Path::new("/sys/fs/cgroup"), None, true)
            .expect_err("read-only");
        let msg = e.to_string();
        assert!(
            msg.contains("read-only") && msg.contains("privileged"),
            "{msg}"
        );
    }

    #[test]
    fn no_cgroups_is_a_clear_error() {
        let e = from_texts(
            "1 0 0:1 / / rw - ext4 /dev/vda rw\n",
            "0::/\n",
            Path::new("/sys/fs/cgroup"),
            None,
            true,
        )
        .expect_err("nothing mounted");
        assert!(e.to_string().contains("no usable cgroup hierarchy"), "{e}");
        let no_pids = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let e = from_texts(
            no_pids,
            "4:memory:/\n",
            Path::new("/sys/fs/cgroup"),
            None,
            true,
        )
        .expect_err("no pids");
        assert!(e.to_string().contains("pids"), "{e}");
    }
}
