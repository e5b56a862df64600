//! The unprivileged user a job runs as, and the checks that it cannot become root.
//!
//! How "cannot obtain root" is established, in layers:
//! - the user's uid and primary gid are not 0 (checked here);
//! - the job keeps only the supplementary groups the operator listed (`runner.groups`), and
//!   that list may not hold a group that grants root (`sudo`, `wheel`, `docker`, …,
//!   [`crate::config::ROOT_GROUPS`]; checked when the config is parsed);
//! - the user owns nothing root runs for it: not the runner installation, not the agent's
//!   binary (checked here, [`JobUser::refuse_owning`]);
//! - every process of the job runs with `no_new_privs` (set in the forked child before exec,
//!   inherited and irrevocable), so setuid and file-capability binaries (`sudo`, `su`,
//!   `pkexec`, `newgrp`) run without their privileges, whatever sudoers says; and dropping
//!   from root to a non-zero uid clears every capability.

use std::ffi::CString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UserError(String);

/// The unprivileged user a job runs as, with the groups it keeps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// The primary group, then the listed supplementary groups the user is a member of.
    pub groups: Vec<u32>,
}

impl JobUser {
    /// Look a user up; keep of its supplementary groups only those in `allowed` (names).
    /// Refuses root and a user whose primary group is root.
    pub fn lookup(name: &str, allowed: &[String]) -> Result<JobUser, UserError> {
        let u = nix::unistd::User::from_name(name)
            .map_err(|e| UserError(format!("cannot look up user {name:?}: {e}")))?
            .ok_or_else(|| {
                UserError(format!(
                    "user {name:?} does not exist: create it (e.g. `useradd --system {name}`, or the sysusers file in systemd/) or pick another"
                ))
            })?;
        if u.uid.is_root() {
            return Err(UserError(format!(
                "user {name:?} is root (uid 0): jobs never run as root; use an unprivileged user such as runner-{{n}}"
            )));
        }
        if u.gid.as_raw() == 0 {
            return Err(UserError(format!(
                "user {name:?} has root's group (gid 0) as its primary group: give it a group of its own"
            )));
        }
        if crate::idrange::in_band(u.uid.as_raw()) || crate::idrange::in_band(u.gid.as_raw()) {
            return Err(UserError(format!(
                "user {name:?} (uid {}, gid {}) has an id in the band the agent gives jobs' nix-daemons ({}–{}): it would be the same user to the kernel as another job's builds; give it an id below {}",
                u.uid,
                u.gid,
                crate::idrange::BASE,
                crate::idrange::BASE + crate::idrange::RANGES * crate::idrange::SIZE - 1,
                crate::idrange::BASE
            )));
        }
        let cname = CString::new(name)
            .map_err(|_| UserError(format!("user name {name:?} contains a NUL byte")))?;
        let member_of: Vec<u32> = nix::unistd::getgrouplist(&cname, u.gid)
            .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_default();
        let mut groups = vec![u.gid.as_raw()];
        for g in allowed {
            let Ok(Some(group)) = nix::unistd::Group::from_name(g) else {
                continue;
            };
            let gid = group.gid.as_raw();
            if gid != 0 && member_of.contains(&gid) && !groups.contains(&gid) {
                groups.push(gid);
            }
        }
        Ok(JobUser {
            name: u.name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            home: u.dir,
            groups,
        })
    }

    /// Refuse a user that owns one of `paths` (or, for a directory, its `bin`): root runs
    /// what is there on the job's behalf, so an owner could replace it and become root.
    pub fn refuse_owning(&self, paths: &[&Path]) -> Result<(), UserError> {
        for p in paths {
            for q in [p.to_path_buf(), p.join("bin")] {
                if let Ok(m) = std::fs::symlink_metadata(&q) {
                    if m.uid() == self.uid {
                        return Err(UserError(format!(
                            "user {:?} owns {}, which root runs for every job: chown it to root so a job cannot replace it",
                            self.name,
                            q.display()
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_refused() {
        let e = JobUser::lookup("root", &[]).expect_err("root refused");
        assert!(e.to_string().contains("is root (uid 0)"), "{e}");
    }

    #[test]
    fn a_missing_user_says_how_to_create_it() {
        let e = JobUser::lookup("no-such-user-flywheel", &[]).expect_err("missing");
        assert!(e.to_string().contains("useradd"), "{e}");
    }

    #[test]
    fn unlisted_groups_are_dropped() {
        // `nobody` exists on every Debian machine; whatever groups it has, only listed ones stay.
        let u = JobUser::lookup("nobody", &[]).expect("nobody");
        assert_eq!(u.groups, vec![u.gid]);
        assert_ne!(u.uid, 0);
    }

    #[test]
    fn an_owner_of_what_root_runs_is_refused() {
        let u = JobUser::lookup("nobody", &[]).expect("nobody");
        let t = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(t.path().join("bin")).expect("mkdir");
        u.refuse_owning(&[t.path()]).expect("root-owned is fine");
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "chown needs root, and CI must not skip"
            );
            eprintln!("SKIP the owner case: chown needs root");
            return;
        }
        std::os::unix::fs::chown(t.path().join("bin"), Some(u.uid), None).expect("chown");
        let e = u.refuse_owning(&[t.path()]).expect_err("owner refused");
        assert!(e.to_string().contains("owns"), "{e}");
    }
    #[test]
    fn a_user_with_an_id_of_the_daemons_band_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "useradd needs root, and CI must not skip"
            );
            eprintln!("SKIP the band case: useradd needs root");
            return;
        }
        // A uid inside some daemon's range (not its root): the same user to the kernel as
        // that daemon's build user 5.
        let name = format!("fwt-band-{}", std::process::id() % 100_000);
        let uid = crate::idrange::BASE + 7 * crate::idrange::SIZE + 5;
        let made = std::process::Command::new("useradd")
            .args(["-M", "-N", "-g", "nogroup", "-s", "/usr/sbin/nologin", "-u"])
            .arg(uid.to_string())
            .arg(&name)
            .status()
            .expect("useradd");
        assert!(made.success(), "useradd {name} -u {uid}");
        let looked = JobUser::lookup(&name, &[]);
        let _ = std::process::Command::new("userdel").arg(&name).status();
        let e = looked.expect_err("a uid in the band is refused");
        assert!(e.to_string().contains(&format!("uid {uid}")), "{e}");
        assert!(
            e.to_string()
                .contains("band the agent gives jobs' nix-daemons"),
            "{e}"
        );
    }
}
