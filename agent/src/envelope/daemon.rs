//! A job's own nix-daemon, inside the job's cgroup, and the record of what it built.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::info;

use super::mounts::{Mount, TMP};
use super::pumps::log_lines_at;
use super::spawn::{agent_side_failure, fail_pipe, ChildSetup};
use super::{confine, io_at, EnvelopeError, NixJob, NixSetupError};
use crate::cgroup::JobCgroup;
use crate::config::{Config, Lane};
use crate::jobuser::JobUser;
use crate::reaper::Reaper;
use crate::receipt::{Receipt, Scope, Thing, What};
use crate::workdir;

/// What a job's daemon keeps of the host's `/dev` (those that exist): the devices Nix's
/// sandbox gives a build, and the mount points of its own devpts and `/dev/shm`.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/kvm",
    "/dev/ptmx",
    "/dev/pts",
    "/dev/shm",
];

/// Where a job's daemon records the out paths it built (root-only, hidden from jobs).
pub fn built_list(nix: &NixJob, job: &str) -> PathBuf {
    nix.sockets.join(format!("{job}.built"))
}

/// Where a job's daemon writes its build logs (`NIX_LOG_DIR`, the job's alone): every log in
/// it is a build of this job's daemon, finished or not, never a neighbour's. Under a root-only
/// directory; the job reads it (`nix log`) where it is bound into its namespace.
pub fn build_logs(nix: &NixJob, job: &str) -> PathBuf {
    nix.logs.join(job)
}

/// Where a job's daemon listens (its socket directory) and keeps its private `/tmp`: named
/// before either exists, so the job's teardown removes them whether or not the daemon ever
/// started (a runner job's starts at job-started, or never).
#[derive(Debug, Clone)]
pub(super) struct DaemonPaths {
    pub dir: PathBuf,
    pub tmp: PathBuf,
}

impl DaemonPaths {
    pub(super) fn new(nix: &NixJob) -> DaemonPaths {
        DaemonPaths {
            dir: nix.sockets.join(format!("{:016x}", fastrand::u64(..))),
            tmp: nix
                .sockets
                .with_file_name("nix-tmp")
                .join(format!("{:016x}", fastrand::u64(..))),
        }
    }
}

/// Start the job's own nix-daemon inside its cgroup (and its slot's mounts), as root, and wait
/// for its socket. Returns the socket directory: the job user's, mode 0700, and the daemon
/// accepts only that user (and root). `owner` is the job's user (None: the job runs as root).
#[allow(clippy::too_many_arguments)]
pub(super) async fn start_nix_daemon(
    nix: &NixJob,
    owner: Option<&JobUser>,
    cg: &dyn JobCgroup,
    slot_mounts: &[Mount],
    job: &str,
    hold: Option<i32>,
    reaper: &Reaper,
    job_span: &tracing::Span,
    bg: &crate::tasks::Background,
    paths: &DaemonPaths,
    netns: Option<i32>,
    store: DaemonStore,
) -> Result<PathBuf, EnvelopeError> {
    let dir = paths.dir.clone();
    std::fs::create_dir_all(&nix.sockets).map_err(io_at("create", &nix.sockets))?;
    std::fs::set_permissions(
        &nix.sockets,
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .map_err(io_at("chmod", &nix.sockets))?;
    // Root's and 0700 while the daemon binds its socket (it chmods the socket by name: nobody
    // else may have a way in meanwhile); the job user's once it listens. Another job's user
    // cannot pass through it, whatever descriptor of it a builder hands them (`O_PATH` opens
    // need no permission on the directory itself; walking through it does).
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io_at("create", &dir))?;
    let socket = dir.join("socket");
    // What this daemon builds, recorded by Nix's post-build hook (run by the daemon after each
    // successful build): the only paths the agent may publish for this job. A shared store
    // also holds other jobs' builds.
    let hook = nix.sockets.join("post-build.sh");
    workdir::write_atomic(
        &hook,
        b"#!/bin/sh\n# Written by flywheel-agent: the job's nix-daemon records what it built.\nprintf '%s\\n' $DRV_PATH $OUT_PATHS >> \"$FLYWHEEL_BUILT\"\n",
        0o755,
    )
    .map_err(io_at("write", &hook))?;
    // Only the job's user may talk to its daemon (root is a trusted user, always allowed):
    // a connection that reached the socket by another route is refused by the daemon too.
    let mut conf = format!(
        "post-build-hook = {}\nallowed-users = {}",
        hook.display(),
        owner.map_or("root", |u| u.name.as_str())
    );
    if let Some(n) = &nix.netrc {
        conf.push_str(&format!("\nnetrc-file = {}", n.display()));
    }
    // The daemon's `/tmp` (build directories, its caches): root's, the job's alone, gone with it.
    let tmp = paths.tmp.clone();
    if let Some(tmps) = tmp.parent() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(tmps)
            .map_err(io_at("create", tmps))?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(io_at("create", &tmp))?;
    for d in super::pidns::SPARE_DIRS {
        let d = tmp.join(d);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .map_err(io_at("create", &d))?;
    }
    let logs = build_logs(nix, job);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&nix.logs)
        .map_err(io_at("create", &nix.logs))?;
    std::fs::set_permissions(&nix.logs, std::fs::Permissions::from_mode(0o700))
        .map_err(io_at("chmod", &nix.logs))?;
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&logs)
        .map_err(io_at("create", &logs))?;
    // The record exists before the daemon starts: it is one of the daemon's writable mounts.
    let built = built_list(nix, job);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&built)
        .map_err(io_at("create", &built))?;
    // What is the job's alone (its socket directory, record, logs, `/tmp`, netrc) is its
    // daemon's root's on disk: any filesystem serves (`state_dir` may be a container's
    // overlayfs, which cannot be idmapped), and the agent, root, reads and removes it as
    // before. What is shared (the store, the build-user pool) is idmapped (`userns.rs`).
    if let Some(ids) = &store.ids {
        let (uid, gid) = (ids.kuid(0), ids.kgid(0));
        for p in [
            Some(&dir),
            Some(&built),
            Some(&logs),
            Some(&tmp),
            nix.netrc.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid))
                .map_err(io_at("hand to the daemon's root", p))?;
        }
    }
    let own = |p: &Path, idmap: bool| confine::Writable {
        src: p.to_path_buf(),
        dst: p.to_path_buf(),
        idmap,
    };
    let mut writable = vec![
        // A layer (overlayfs) cannot be idmapped itself: its lower already is (`userns.rs`).
        own(&nix.store_seen, !store.layer),
        own(&dir, false),
        own(&built, false),
        own(&logs, false),
        confine::Writable {
            src: tmp,
            dst: PathBuf::from(TMP),
            idmap: false,
        },
    ];
    if store.layer && super::launch::shares_pool(true, store.ids.as_ref()) {
        // The build-user pool, below the layer: the shared one, idmapped on its own. (A
        // daemon in a user namespace of its own keeps the layer's copy: `shares_pool`.)
        writable.insert(1, own(&nix.userpool_seen, true));
    }
    let mut cmd = std::process::Command::new(&nix.daemon);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        // Root's home is read-only to the daemon (and, in its user namespace, not its own:
        // Nix's look for `~/.nix-defexpr` there would fail): its home, and so Nix's caches,
        // are its private /tmp.
        .env("HOME", "/tmp")
        .env("XDG_CACHE_HOME", "/tmp/.cache")
        .env("NIX_DAEMON_SOCKET_PATH", &socket)
        .env("NIX_CONF_DIR", &nix.conf_dir)
        .env("NIX_CONFIG", conf)
        .env("FLYWHEEL_BUILT", &built)
        .env("NIX_LOG_DIR", &logs)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let (fail_r, fail_w) = fail_pipe()?;
    // `no_new_privs` too: the daemon runs no setuid program, and nothing it starts may gain
    // what its bounding set lost.
    let mut setup = ChildSetup::new(cg, slot_mounts, None, Path::new("/"), true)?;
    // The daemon holds the slot as long as it lives: a job orphaned by a killed agent keeps
    // its slot, and no other job gets the store while it runs.
    setup.inherit = hold;
    // Its builds and substitutions use the job's network, never the host's loopback.
    setup.netns = netns;
    setup.install(&mut cmd, fail_w.as_raw_fd());
    // What else the daemon reads under a hidden root: its hook, its netrc, its nix.conf; and
    // of the host's `/dev` (hidden: a disk's node is the disk) what Nix and its sandbox use.
    let readable: Vec<PathBuf> = [
        Some(hook.clone()),
        nix.netrc.clone(),
        Some(nix.conf_dir.clone()),
    ]
    .into_iter()
    .flatten()
    .chain(DEVICES.iter().map(PathBuf::from))
    .collect();
    let hidden: Vec<PathBuf> = nix
        .hidden
        .iter()
        .cloned()
        .chain(std::iter::once(PathBuf::from("/dev")))
        .collect();
    let mut confinement = confine::Confinement::new(&writable, &readable, &hidden)?;
    if let Some(ids) = &store.ids {
        confinement.in_user_namespace(ids);
    }
    confinement.install(&mut cmd, fail_w.as_raw_fd());
    let spawned = reaper.spawn(|| {
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        Ok((pid, child))
    });
    drop(cmd);
    // The daemon is in its namespace, and its init holds the range's lock.
    let id_base = store.ids.map_or(0, |i| i.base);
    let (pid, mut child, mut exit) = spawned.map_err(|e| {
        if agent_side_failure(&fail_r) {
            EnvelopeError::Spawn(e)
        } else {
            EnvelopeError::Io {
                what: "start the job's nix-daemon",
                path: nix.daemon.clone(),
                source: e,
            }
        }
    })?;
    for (out, stream) in [
        (child.stdout.take().map(OwnedFd::from), "nix-daemon"),
        (child.stderr.take().map(OwnedFd::from), "nix-daemon"),
    ] {
        if let Some(fd) = out {
            // The daemon logs each connection; keep those lines at debug level.
            let _ = log_lines_at(fd, stream, tracing::Level::DEBUG, job_span.clone(), bg);
        }
    }
    drop(child);
    // Readiness, not polling: inotify says when the socket is bound; the reaper says when the
    // daemon died instead.
    let waited = crate::ready::appears(&socket, Duration::from_secs(10), &mut exit).await;
    match waited {
        Ok(()) => {}
        Err(crate::ready::Appear::Gone) => {
            return Err(EnvelopeError::Io {
                what: "the job's nix-daemon exited before listening",
                path: nix.daemon.clone(),
                source: io::Error::other("see the agent log"),
            })
        }
        Err(crate::ready::Appear::TimedOut) => {
            return Err(EnvelopeError::Io {
                what: "the job's nix-daemon did not listen within 10 s",
                path: socket,
                source: io::Error::from(io::ErrorKind::TimedOut),
            })
        }
        Err(crate::ready::Appear::Io(e)) => {
            return Err(EnvelopeError::Io {
                what: "watch for the job's nix-daemon's socket",
                path: dir,
                source: e,
            })
        }
    }
    // Nix binds its socket, then makes it 0666: the job may connect once it has.
    let t = Instant::now();
    while !std::fs::symlink_metadata(&socket).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket() && m.permissions().mode() & 0o777 == 0o666
    }) {
        if t.elapsed() > Duration::from_secs(10) {
            return Err(EnvelopeError::Io {
                what: "the job's nix-daemon did not open its socket to its user within 10 s",
                path: socket,
                source: io::Error::from(io::ErrorKind::TimedOut),
            });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if let Some(u) = owner {
        // Root made the directory in root's `nix-sockets` a moment ago: the name is ours.
        std::os::unix::fs::chown(&dir, Some(u.uid), Some(u.gid)).map_err(io_at(
            "hand the daemon's socket directory to the job's user",
            &dir,
        ))?;
    }
    // The process started is the daemon's init (`pidns.rs`); the daemon is its one child.
    let daemon = first_child(pid).unwrap_or(pid);
    info!(pid = daemon, init = pid, socket = %socket.display(), id_base, "the job's nix-daemon is listening");
    Ok(dir)
}

/// What a job's daemon serves: a layer (an untrusted job's) or the store itself, and the user
/// namespace it runs in (`userns.rs`; none for a job that runs as root).
#[derive(Debug)]
pub(super) struct DaemonStore {
    pub layer: bool,
    pub ids: Option<super::userns::DaemonIds>,
}

/// The user namespace of the daemon of a job whose user is `owner` (`userns.rs`): none for a
/// job that runs as root (root itself, it gains nothing from its daemon).
/// `phys_nix` (the store as the agent sees it) must allow idmapped mounts: asked here, where a
/// refusal can say so (the daemon's child can only report an errno).
pub(super) fn daemon_ids(
    nix: &NixJob,
    owner: Option<&JobUser>,
    reaper: &Reaper,
    phys_nix: &Path,
    receipt: &Receipt,
) -> Result<Option<super::userns::DaemonIds>, EnvelopeError> {
    let Some(u) = owner else {
        return Ok(None);
    };
    let locks = nix.sockets.with_file_name("nix-ids");
    receipt.record(
        Scope::Job,
        What::IdLock,
        Thing::Lock {
            path: locks.clone(),
        },
    )?;
    let ids = super::userns::create(&locks, u.uid, reaper)?;
    let store = super::spawn::cstring(phys_nix.as_os_str())?;
    if let Err(e) = super::view::clone_tree(
        libc::AT_FDCWD,
        &store,
        0,
        0,
        Some(std::os::fd::AsFd::as_fd(&ids.ns)),
    ) {
        return Err(NixSetupError::NoIdmap {
            store: phys_nix.to_path_buf(),
            cause: e,
        }
        .into());
    }
    Ok(Some(ids))
}

/// The first child of `pid` (`/proc/<pid>/task/<pid>/children`).
fn first_child(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The per-job daemon settings of a lane.
pub fn nix_job(cfg: &Config, lane: &Lane) -> NixJob {
    NixJob {
        daemon: lane
            .nix_store
            .join("var/nix/profiles/default/bin/nix-daemon"),
        conf_dir: lane
            .nix_conf
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/etc/nix")),
        sockets: cfg.agent.state_dir.join("nix-sockets"),
        logs: cfg.agent.state_dir.join("nix-logs"),
        socket_seen: lane.nix_store.join("var/nix/daemon-socket"),
        userpool: cfg.nix.userpool.clone(),
        userpool_seen: lane.nix_store.join("var/nix/userpool"),
        store_seen: lane.nix_store.clone(),
        throwaway: false,
        at_job_started: false,
        netrc: None,
        hidden: std::iter::once(cfg.agent.state_dir.clone())
            .chain(
                cfg.lanes
                    .iter()
                    .flat_map(|l| std::iter::once(l.work_root.clone()).chain(l.slot_root.clone())),
            )
            .chain(cfg.secret_files())
            .collect(),
    }
}
