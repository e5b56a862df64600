//! The user namespace of a job's nix-daemon: its uid and gid 0 are an unprivileged range of
//! the host's, so no write the daemon makes is by the host's root (the kernel's global
//! settings refuse it: `EACCES`, whatever procfs a path reaches), and it holds no capability
//! in the host's user namespace. Each daemon gets a range of its own, 65536 ids from
//! [`BASE`] up, taken with a lock in `state_dir/nix-ids` that the daemon's init (`pidns.rs`)
//! holds while the daemon lives, so no two running daemons share an id. Inside, ids keep the
//! host's numbers (root 0, the build users 999, 995, … of `build-users-group`), and the job's
//! user is itself (its own uid on both sides): the daemon knows its peer by name
//! (`allowed-users`), and what the daemon may do as that user the job's user does anyway. What
//! is shared (the store, the build-user pool) it sees through idmapped mounts
//! (`confine.rs`): on-disk uid 0 is its root, and what its root writes lands as uid 0 on
//! disk, so a trusted job's outputs are root's as before; what is the job's alone (its socket
//! directory, record, logs, `/tmp`, netrc) the agent makes its root's on disk (`daemon.rs`),
//! which any filesystem allows. An untrusted job's layer is a kernel overlayfs, which cannot be idmapped itself:
//! its lower (the store) is an idmapped mount, and what the daemon writes lands in the upper
//! under the range's ids (thrown away with it).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::sys::signal::Signal;

use super::{io_at, EnvelopeError, NixSetupError};
pub use crate::idrange::is_daemon_root;
use crate::idrange::{BASE, RANGES, SIZE};
use crate::reaper::Reaper;

/// A daemon's user namespace, its range's first id and the range's lock (the open file the
/// daemon's init keeps).
#[derive(Debug)]
pub(super) struct DaemonIds {
    pub ns: OwnedFd,
    pub base: u32,
    pub lock: OwnedFd,
    /// The job's user, the one host uid the namespace maps to itself.
    pub job_uid: u32,
}

impl DaemonIds {
    /// The host uid of on-disk (or inner) uid `id` as the daemon sees it through an idmapped
    /// mount.
    pub(super) fn kuid(&self, id: u32) -> u32 {
        if id == self.job_uid {
            id
        } else {
            self.base.saturating_add(id)
        }
    }
    /// The host gid of on-disk gid `id`.
    pub(super) fn kgid(&self, id: u32) -> u32 {
        self.base.saturating_add(id)
    }
}

/// `uid_map` of a daemon's namespace: 0..65535 to `base`.., but the job's user to itself.
pub(super) fn uid_map(base: u32, job_uid: u32) -> String {
    if job_uid >= SIZE {
        return format!("0 {base} {SIZE}\n{job_uid} {job_uid} 1\n");
    }
    let mut map = String::new();
    if job_uid > 0 {
        map.push_str(&format!("0 {base} {job_uid}\n"));
    }
    map.push_str(&format!("{job_uid} {job_uid} 1\n"));
    let after = job_uid + 1;
    if after < SIZE {
        map.push_str(&format!("{after} {} {}\n", base + after, SIZE - after));
    }
    map
}

/// A new user namespace for the daemon of a job whose user is `job_uid` (never root: a job
/// that runs as root keeps a daemon in the host's user namespace, being root itself), its
/// range taken from the locks in `dir`.
pub(super) fn create(
    dir: &Path,
    job_uid: u32,
    reaper: &Reaper,
) -> Result<DaemonIds, EnvelopeError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .map_err(io_at("create", dir))?;
    let mut taken = None;
    for k in 0..RANGES {
        let path = dir.join(k.to_string());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_at("open", &path))?;
        // SAFETY: flock(2) on a descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            taken = Some((k, OwnedFd::from(f)));
            break;
        }
    }
    let Some((k, lock)) = taken else {
        return Err(NixSetupError::IdRangesInUse(dir.to_path_buf()).into());
    };
    let base = BASE + k * SIZE;
    let ns = new_namespace(
        &uid_map(base, job_uid),
        &format!("0 {base} {SIZE}\n"),
        reaper,
    )
    .map_err(io_at(
        "make the user namespace of the job's nix-daemon",
        dir,
    ))?;
    Ok(DaemonIds {
        ns,
        base,
        lock,
        job_uid,
    })
}

/// A user namespace with these maps: a child unshares it and waits, the agent writes its maps
/// and keeps a descriptor of it, and the child exits.
fn new_namespace(uid_map: &str, gid_map: &str, reaper: &Reaper) -> io::Result<OwnedFd> {
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (go_r, go_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (ready, go) = (ready_w.as_raw_fd(), go_r.as_raw_fd());
    let (pid, (), exited) = reaper.spawn(|| {
        // SAFETY: in the child only async-signal-safe system calls on descriptors it holds,
        // then `_exit`.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => unsafe {
                let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
                libc::write(ready, [u8::from(ok)].as_ptr().cast(), 1);
                // Nothing of the agent's stays open here (its output pipes, the write end of
                // `go` among them): the read ends when the agent closes `go`, and the child
                // exits, if need be on SIGKILL (the agent's threads block other signals).
                if let Ok(g) = u32::try_from(go) {
                    if g > 0 {
                        libc::syscall(libc::SYS_close_range, 0u32, g - 1, 0u32);
                    }
                    libc::syscall(libc::SYS_close_range, g + 1, u32::MAX, 0u32);
                }
                let mut b = [0u8; 1];
                libc::read(go, b.as_mut_ptr().cast(), 1);
                libc::_exit(0)
            },
            pid => Ok((pid, ())),
        }
    })?;
    drop(ready_w);
    drop(go_r);
    let mut b = [0u8; 1];
    let got = nix::unistd::read(ready_r.as_raw_fd(), &mut b);
    let made = (|| {
        if got != Ok(1) || b[0] != 1 {
            return Err(io::Error::other(
                "the helper could not unshare a user namespace (is user.max_user_namespaces 0?)",
            ));
        }
        std::fs::write(format!("/proc/{pid}/uid_map"), uid_map)?;
        std::fs::write(format!("/proc/{pid}/gid_map"), gid_map)?;
        Ok(OwnedFd::from(std::fs::File::open(format!(
            "/proc/{pid}/ns/user"
        ))?))
    })();
    // The helper exits; the reaper takes it (killed if it did not: nothing may outlive this).
    drop(go_w);
    if made.is_err() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
    }
    drop(exited);
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jobs_user_is_itself_and_every_other_id_is_in_the_range() {
        let b = BASE;
        assert_eq!(
            uid_map(b, 963),
            format!("0 {b} 963\n963 963 1\n964 {} 64572\n", b + 964)
        );
        assert_eq!(uid_map(b, 70000), format!("0 {b} 65536\n70000 70000 1\n"));
        assert_eq!(uid_map(b, 65535), format!("0 {b} 65535\n65535 65535 1\n"));
        let ids = |job_uid| DaemonIds {
            ns: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
            base: b,
            lock: OwnedFd::from(std::fs::File::open("/dev/null").unwrap()),
            job_uid,
        };
        let d = ids(963);
        assert_eq!((d.kuid(0), d.kuid(999), d.kuid(963)), (b, b + 999, 963));
        assert_eq!(d.kgid(994), b + 994);
        assert!(is_daemon_root(b) && is_daemon_root(b + 3 * SIZE));
        assert!(!is_daemon_root(b + 999) && !is_daemon_root(0) && !is_daemon_root(999));
    }
}
