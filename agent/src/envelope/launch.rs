//! Launch: the job's directory, its nix-daemon, its mounts, its first process.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio::sync::oneshot;
use tracing::info;

use super::daemon::{
    build_logs, built_list, daemon_ids, start_nix_daemon, DaemonPaths, DaemonStore,
};
use super::deferred::DeferredStore;
use super::env::job_environment;
use super::mounts::Mount;
use super::pumps::log_lines;
use super::root::prepare_runner_root;
use super::spawn::{agent_side_failure, fail_pipe, ChildSetup};
use super::{io_at, ms, view, EnvelopeError, JobSpec, NixJob, NixSetupError};
use crate::cgroup::JobCgroup;
use crate::config::Network;
use crate::jobuser::JobUser;
use crate::netns::{JobNet, NetError};
use crate::reaper::{Exit, Reaper};
use crate::receipt::{Receipt, Scope, Thing, What};
use crate::workdir;

pub(super) enum Launched {
    Running {
        pid: i32,
        exit: oneshot::Receiver<Exit>,
        output: Vec<tokio::task::JoinHandle<()>>,
    },
    Failed {
        code: i32,
        message: String,
    },
}

/// What a job's launch is given by the phases.
pub(super) struct LaunchArgs<'a> {
    pub spec: &'a JobSpec,
    pub user: Option<&'a JobUser>,
    pub cg: &'a dyn JobCgroup,
    /// The work root as the agent sees it (a slot's, or the lane's).
    pub phys_work_root: &'a Path,
    /// The job's Nix store as the agent sees it (a slot's, or the lane's).
    pub phys_nix: &'a Path,
    pub mounts: Vec<Mount>,
    pub job: &'a str,
    /// The job's uid and gid.
    pub ids: (u32, u32),
    /// A descriptor the job's daemon keeps (the slot's lock).
    pub hold: Option<i32>,
    pub span: &'a tracing::Span,
}

/// Create the job's directory and start the command inside the cgroup.
pub(super) async fn launch(
    args: LaunchArgs<'_>,
    receipt: &Receipt,
    reaper: &Reaper,
) -> Result<Launched, EnvelopeError> {
    let LaunchArgs {
        spec,
        user,
        cg,
        phys_work_root,
        phys_nix,
        mut mounts,
        job,
        ids: (uid, gid),
        hold,
        span: job_span,
    } = args;
    let tree = |path: PathBuf| Thing::Tree { path };
    receipt.record(Scope::Job, What::JobDir, tree(phys_work_root.join(job)))?;
    let job_dir = workdir::create(phys_work_root, job, uid, gid)
        .map_err(io_at("create the job's directory under", phys_work_root))?;
    let net = job_network(spec, &job_dir, &mut mounts, reaper).await?;
    if let Some(cache) = &spec.bazel {
        // Before anything of the job runs: its endpoint is there when its first step is.
        match (&net, &spec.lane.network) {
            (Some(n), _) => cache.start(n.fd(), &spec.background)?,
            // An ARC pod's network is its one job's: the endpoint is on the pod's loopback.
            (None, Network::Pod) => {
                let own = std::fs::File::open("/proc/self/ns/net")
                    .map_err(|e| EnvelopeError::Bazel(crate::bazel::BazelError::Bind(e)))?;
                cache.start(own.as_raw_fd(), &spec.background)?;
            }
            (None, _) => return Err(EnvelopeError::Bazel(crate::bazel::BazelError::Bind(
                io::Error::other(
                    "the lane has no network namespace per job (network = \"isolated\" or \"pod\")",
                ),
            ))),
        }
    }
    let root_seen = spec.work_root.join(job);
    let mut cwd_path = root_seen.join(workdir::WORK);
    let mut command = spec.command.clone();
    let mut deferred = None;
    if let Some(n) = &spec.nix {
        let paths = DaemonPaths::new(n);
        // Removed with the job, whatever happens next (a daemon that will not start, or one
        // that never starts, included).
        receipt.record(Scope::Job, What::DaemonSocket, tree(paths.dir.clone()))?;
        receipt.record(Scope::Job, What::DaemonTmp, tree(paths.tmp.clone()))?;
        // Hidden in the job's namespace whether or not its daemon has started.
        std::fs::create_dir_all(&n.sockets).map_err(io_at("create", &n.sockets))?;
        // Mount points in the store a job's daemon may have written: made by descriptor,
        // never through a symlink.
        for seen in [&n.userpool_seen, &n.store_seen.join("var/log/nix")] {
            let rel = seen.strip_prefix(&n.store_seen).unwrap_or(seen);
            workdir::dirs_at(phys_nix, rel).map_err(io_at("create", &phys_nix.join(rel)))?;
        }
        let layer = layer_dir(phys_work_root, job);
        let view = n.sockets.with_file_name("nix-views").join(job);
        if n.at_job_started {
            // Its layer and its mounts come at job-started (`deferred.rs`), after it in the
            // receipt: they go first.
            receipt.record(Scope::Job, What::View, tree(view.clone()))?;
            view::make_point(&view)?;
        }
        // The daemon's user namespace, before its layer (whose lower is idmapped with it).
        let mut ids = None;
        if !n.at_job_started {
            ids = daemon_ids(n, user, reaper, phys_nix, receipt)?;
        }
        if !n.at_job_started && n.throwaway {
            receipt.record(Scope::Job, What::Layer, tree(layer.clone()))?;
            let merged = throwaway_layer(phys_nix, &layer, ids.as_ref()).await?;
            store_mount(&mut mounts, merged, &n.store_seen);
        }
        // The daemon gets the job's own mounts (not its /tmp or /proc: `confine.rs` gives it a
        // private /tmp, and it keeps the host's /proc).
        let mut daemon_mounts: Vec<Mount> = mounts
            .iter()
            .filter(|m| matches!(m, Mount::Bind { .. } | Mount::Hide { .. }))
            .cloned()
            .collect();
        if !n.at_job_started && shares_pool(n.throwaway, ids.as_ref()) {
            daemon_mounts.push(userpool_mount(n)?);
        }
        // A runner's record and logs outlive its job until the agent has published from them
        // and reported; an exec job's go with it (a daemon that never started too).
        let scope = if spec.hook.is_none() {
            Scope::Job
        } else {
            Scope::Runner
        };
        receipt.record(scope, What::Built, tree(built_list(n, job)))?;
        receipt.record(scope, What::BuildLogs, tree(build_logs(n, job)))?;
        if let Some(u) = user {
            // Nix 2.8's daemon gives the user `var/nix/{profiles,gcroots}/per-user/<user>`
            // (the user's own, in a store every later job of this user reuses, a trusted one
            // included): gone with the job, like its HOME.
            // Removed below the store's root by descriptors: the daemon writes `var/nix`, and
            // may have swapped a directory above the user's for a symlink.
            for kind in ["profiles", "gcroots"] {
                let rel = Path::new("var/nix")
                    .join(kind)
                    .join("per-user")
                    .join(&u.name);
                let root = phys_nix.to_path_buf();
                receipt.record(Scope::Job, What::PerUser, Thing::TreeBelow { root, rel })?;
            }
        }
        if n.at_job_started {
            // The job sees its store only through the view; the daemon gets its store when
            // the trust decision says which.
            mounts.retain(|m| !matches!(m, Mount::Bind { dst, .. } if dst == &n.store_seen));
            mounts.push(Mount::View {
                src: view.clone(),
                dst: n.store_seen.clone(),
            });
            deferred = Some(DeferredStore {
                nix: n.clone(),
                owner: user.cloned(),
                daemon_mounts,
                job: job.to_owned(),
                hold,
                reaper: reaper.clone(),
                span: job_span.clone(),
                bg: spec.background.clone(),
                netns: net
                    .as_ref()
                    .map(JobNet::dup)
                    .transpose()
                    .map_err(EnvelopeError::Spawn)?,
                phys_nix: phys_nix.to_path_buf(),
                view,
                layer,
                paths,
                receipt: receipt.clone(),
            });
        } else {
            let dir = start_nix_daemon(
                n,
                user,
                cg,
                &daemon_mounts,
                job,
                hold,
                reaper,
                job_span,
                &spec.background,
                &paths,
                net.as_ref().map(JobNet::fd),
                DaemonStore {
                    layer: n.throwaway,
                    ids,
                },
            )
            .await?;
            if let Some(p) = &spec.probe {
                p.set_idle(2);
            }
            mounts.push(Mount::Bind {
                src: dir,
                dst: n.socket_seen.clone(),
                readonly: false,
            });
            // `nix log` in the job reads its own daemon's logs, and no neighbour's.
            mounts.push(Mount::Bind {
                src: build_logs(n, job),
                dst: spec.lane.nix_store.join("var/log/nix"),
                readonly: true,
            });
        }
        mounts.push(Mount::Hide {
            dst: n.sockets.clone(),
        });
    }
    if let Some(h) = &spec.hook {
        std::fs::create_dir_all(&h.seen).map_err(io_at("create", &h.seen))?;
        mounts.push(Mount::Bind {
            src: h.dir.clone(),
            dst: h.seen.clone(),
            readonly: false,
        });
        mounts.push(Mount::Hide { dst: h.all.clone() });
    }
    if let Some(r) = &spec.runner {
        for (src, point) in prepare_runner_root(&job_dir, r)? {
            let rel = point.strip_prefix(&job_dir).unwrap_or(&point).to_path_buf();
            mounts.push(Mount::Bind {
                src,
                dst: root_seen.join(rel),
                readonly: true,
            });
        }
        cwd_path = root_seen.clone();
        if let Some(first) = command.first_mut() {
            if Path::new(first).is_relative() {
                *first = root_seen.join(&first).into_os_string();
            }
        }
    }
    // Everything root writes into the job's directory is written; now it becomes the user's.
    workdir::hand_over(&job_dir, uid, gid)
        .map_err(io_at("hand the job's directory over to its user", &job_dir))?;
    mounts.push(Mount::Proc);
    let home = root_seen.join(workdir::HOME);

    let Some(program) = command.first().cloned() else {
        return Ok(Launched::Failed {
            code: 127,
            message: "no command given".into(),
        });
    };
    let mut cmd = std::process::Command::new(&program);
    cmd.args(&command[1..])
        .env_clear()
        .envs(job_environment(spec, user, &home));
    if spec.log_output.is_some() {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
    }
    let (fail_r, fail_w) = fail_pipe()?;
    if let Some(d) = deferred {
        // Armed before the job's first process exists: its job-started hook finds it.
        let Some(p) = &spec.probe else {
            return Err(NixSetupError::NoProbe.into());
        };
        p.arm_store(d).await?;
    }
    let mut setup = ChildSetup::new(cg, &mounts, user, &cwd_path, true)?;
    setup.netns = net.as_ref().map(JobNet::fd);
    setup.install(&mut cmd, fail_w.as_raw_fd());
    let spawned = reaper.spawn(|| {
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        Ok((pid, child))
    });
    drop(cmd);
    // The job's processes hold its network namespace from here: it goes with the last of them.
    drop(net);
    match spawned {
        Ok((pid, mut child, exit)) => {
            let mut output = Vec::new();
            if let Some(out) = child.stdout.take() {
                output.push(
                    log_lines(
                        OwnedFd::from(out),
                        "stdout",
                        job_span.clone(),
                        &spec.background,
                    )
                    .map_err(EnvelopeError::Spawn)?,
                );
            }
            if let Some(err) = child.stderr.take() {
                output.push(
                    log_lines(
                        OwnedFd::from(err),
                        "stderr",
                        job_span.clone(),
                        &spec.background,
                    )
                    .map_err(EnvelopeError::Spawn)?,
                );
            }
            // The child is reaped by the Reaper, never by std.
            drop(child);
            Ok(Launched::Running { pid, exit, output })
        }
        Err(e) => {
            if agent_side_failure(&fail_r) {
                return Err(EnvelopeError::Spawn(e));
            }
            drop(fail_w);
            let name = program.to_string_lossy();
            Ok(match e.kind() {
                io::ErrorKind::NotFound => Launched::Failed {
                    code: 127,
                    message: format!("command not found: {name}"),
                },
                _ => Launched::Failed {
                    code: 126,
                    message: format!("command cannot be executed: {name}: {e}"),
                },
            })
        }
    }
}

/// A lane with `network = "isolated"`: the job's own network namespace (made and linked before
/// its daemon starts), and the `resolv.conf` it sees there (root's, in the job directory,
/// bound read-only over `/etc/resolv.conf`).
async fn job_network(
    spec: &JobSpec,
    job_dir: &Path,
    mounts: &mut Vec<Mount>,
    reaper: &Reaper,
) -> Result<Option<JobNet>, EnvelopeError> {
    let Network::Isolated {
        allow_metadata,
        dns,
    } = &spec.lane.network
    else {
        return Ok(None);
    };
    let t = Instant::now();
    let (reaper, allow_metadata, dns) = (reaper.clone(), *allow_metadata, dns.clone());
    let (net, resolv, made) = tokio::task::spawn_blocking(move || {
        crate::netns::ensure_host(&reaper)?;
        let resolv = crate::netns::host_resolv(&dns)?;
        let t = Instant::now();
        Ok::<_, NetError>((JobNet::create(allow_metadata)?, resolv, t.elapsed()))
    })
    .await
    .map_err(|e| EnvelopeError::Spawn(io::Error::other(e)))??;
    let file = job_dir.join(RESOLV);
    workdir::write_new(&file, resolv.as_bytes(), 0o644).map_err(io_at("write", &file))?;
    mounts.push(Mount::Bind {
        src: file,
        dst: PathBuf::from("/etc/resolv.conf"),
        readonly: true,
    });
    info!(
        link = %net.link, address = %net.addr, gateway = %net.gateway,
        net_ms = ms(t.elapsed()),
        netns_ms = ms(made),
        "the job's network namespace is linked"
    );
    Ok(Some(net))
}

/// The job's `resolv.conf`, in its job directory.
const RESOLV: &str = ".resolv.conf";

/// Bind `src` at the store's path `seen` in place of a slot's store (before anything hides the
/// slots, the layer's among them), or first.
pub(super) fn store_mount(mounts: &mut Vec<Mount>, src: PathBuf, seen: &Path) {
    let bind = Mount::Bind {
        src,
        dst: seen.to_path_buf(),
        readonly: false,
    };
    match mounts
        .iter()
        .position(|m| matches!(m, Mount::Bind { dst, .. } if dst == seen))
    {
        Some(i) => mounts[i] = bind,
        None => mounts.insert(0, bind),
    }
}

/// Whether a daemon locks its build users in the shared pool. One in a user namespace of its
/// own on a throwaway layer does not: its build users are host ids of its own range (`B+999`,
/// …), which no other daemon's build can be, and Nix kills a build user's processes only in
/// the daemon's PID namespace; its pool is the layer's copy, thrown away with it, so nothing
/// it writes there (a lock held forever, a symlink a trusted daemon would follow, a setuid
/// file) reaches the shared one. Every other daemon shares it: trusted daemons write the
/// shared store anyway, and a daemon that is root of the host (a root job's) has the host's
/// `nixbld` users, which it must not take from another.
pub(super) fn shares_pool(throwaway: bool, ids: Option<&super::userns::DaemonIds>) -> bool {
    !(throwaway && ids.is_some())
}

/// The build-user pool where the daemon sees it (after its store's mount): the pool's mount
/// tree copied by descriptor in the agent's namespace, its path walked without following a
/// symlink, so every daemon on a store locks the same files, the pool's default place below
/// the store (`<nix_store>/var/nix/userpool`) included: a path bound in the daemon's
/// namespace after an untrusted job's layer covers the store would resolve to the layer's
/// copy, and that daemon and a trusted one would take the same build user at once (Nix kills
/// a build user's processes before it builds as that user).
pub(super) fn userpool_mount(n: &NixJob) -> Result<Mount, EnvelopeError> {
    let rel = n.userpool.strip_prefix("/").unwrap_or(&n.userpool);
    let dir = workdir::dirs_at(Path::new("/"), rel)
        .map_err(io_at("open without following symlinks", &n.userpool))?;
    let tree = view::clone_tree(
        dir.as_raw_fd(),
        c"",
        libc::AT_EMPTY_PATH as libc::c_uint,
        view::MOUNT_ATTR_NOSUID | view::MOUNT_ATTR_NODEV | view::MOUNT_ATTR_NOEXEC,
        None,
    )
    .map_err(io_at("copy the build-user pool's mount", &n.userpool))?;
    Ok(Mount::Tree {
        tree: std::sync::Arc::new(tree),
        dst: n.userpool_seen.clone(),
    })
}

/// Where a job's throwaway layer lives: `<work root>/<job>.layer`, on the work root's
/// fast-local filesystem.
pub(super) fn layer_dir(phys_work_root: &Path, job: &str) -> PathBuf {
    phys_work_root.join(format!("{job}.layer"))
}

/// A layer of the job's own over the store at `phys_nix` (kernel overlayfs: lower = the store,
/// read-only; upper and work in `layer`, root's 0700), mounted in the agent's namespace and
/// bound at the store in the job's and its daemon's. Returns the merged directory. Removed at
/// teardown (`remove_tree` detaches the mount first; the caller lists `layer` for it before
/// calling): whatever the daemon wrote there — builds, added paths, signatures, the database —
/// is gone, and the store below never changed.
pub(super) async fn throwaway_layer(
    phys_nix: &Path,
    layer: &Path,
    ids: Option<&super::userns::DaemonIds>,
) -> Result<PathBuf, EnvelopeError> {
    use std::os::unix::fs::DirBuilderExt;
    // Overlayfs's lower is the store's own filesystem: a store with a filesystem mounted below
    // it (a separate `/nix/store`) would show the job an empty directory there.
    let below: Vec<String> = workdir::mounts_below(phys_nix)
        .into_iter()
        .filter(|m| m != phys_nix)
        .map(|m| m.display().to_string())
        .collect();
    if !below.is_empty() {
        return Err(NixSetupError::MountsBelow {
            store: phys_nix.to_path_buf(),
            below,
        }
        .into());
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(layer)
        .map_err(io_at("create", layer))?;
    let (upper, work, merged) = (
        layer.join("upper"),
        layer.join("work"),
        layer.join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).map_err(io_at("create", d))?;
    }
    snapshot_db(phys_nix, &upper, ids).await?;
    // With the daemon in a user namespace of its own, the lower is the store through an
    // idmapped mount (on-disk uid 0 is the daemon's root): overlayfs itself cannot be
    // idmapped. The copy is attached for the overlay's mount only.
    let lower = match ids {
        None => phys_nix.to_path_buf(),
        Some(ids) => {
            use std::os::unix::fs::MetadataExt;
            let top = std::fs::metadata(phys_nix).map_err(io_at("inspect", phys_nix))?;
            std::os::unix::fs::chown(&upper, Some(ids.kuid(top.uid())), Some(ids.kgid(top.gid())))
                .map_err(io_at("chown", &upper))?;
            let lower = layer.join("lower");
            std::fs::create_dir(&lower).map_err(io_at("create", &lower))?;
            view::attach_idmapped(phys_nix, &lower, std::os::fd::AsFd::as_fd(&ids.ns)).map_err(
                io_at(
                    "attach the store idmapped for the daemon's layer at",
                    &lower,
                ),
            )?;
            lower
        }
    };
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| EnvelopeError::Io {
        what: "mount the job's throwaway store layer (kernel overlayfs)",
        path: merged.clone(),
        source: e.into(),
    })?;
    if lower != phys_nix {
        // The overlay holds a copy of its own.
        nix::mount::umount2(&lower, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
            EnvelopeError::Io {
                what: "detach the idmapped copy of the store",
                path: lower.clone(),
                source: e.into(),
            }
        })?;
    }
    Ok(merged)
}

/// The store's database in the layer before it is mounted: one consistent snapshot (SQLite's
/// `VACUUM INTO`, a read transaction: what trusted daemons commit meanwhile is not in it), its
/// WAL and shared-memory files whited out. Without it the layer's daemon copies up
/// `db.sqlite`, `-wal` and `-shm` one at a time on its first write while trusted daemons keep
/// writing them (a torn or mismatched database), and would read a trusted daemon's live WAL
/// over its own copy. A store without a database yet (not bootstrapped) gets nothing.
async fn snapshot_db(
    phys_nix: &Path,
    upper: &Path,
    ids: Option<&super::userns::DaemonIds>,
) -> Result<(), EnvelopeError> {
    // The owners as the layer's daemon sees them through its idmapped lower.
    let (kuid, kgid) = (
        |u: u32| ids.map_or(u, |i| i.kuid(u)),
        |g: u32| ids.map_or(g, |i| i.kgid(g)),
    );
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let (mut lower, mut up) = (phys_nix.to_path_buf(), upper.to_path_buf());
    for part in ["var", "nix", "db"] {
        lower.push(part);
        up.push(part);
        let m = match std::fs::symlink_metadata(&lower) {
            Ok(m) if m.is_dir() => m,
            Ok(_) => return Err(NixSetupError::NotADirectory(lower).into()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_at("inspect", &lower)(e)),
        };
        std::fs::DirBuilder::new()
            .mode(m.mode() & 0o7777)
            .create(&up)
            .map_err(io_at("create", &up))?;
        std::os::unix::fs::chown(&up, Some(kuid(m.uid())), Some(kgid(m.gid())))
            .map_err(io_at("chown", &up))?;
    }
    let db = lower.join("db.sqlite");
    // A daemon that writes this store (a trusted job's) could make a directory on the way, or
    // the database itself, a symlink to another SQLite file of the host's, which root would
    // then copy into this untrusted job's layer: the directory is walked by descriptor and the
    // files checked there; SQLite opens them through a private bind of that very directory
    // (`snapshot_held`: no directory on its path is the daemon's to swap), refusing a symlink
    // as the file (`O_NOFOLLOW` on the database, its journal, `-wal` and `-shm`).
    let dir = workdir::open_dir_below(phys_nix, Path::new("var/nix/db"))
        .map_err(io_at("open without following a symlink", &lower))?;
    let at = |name: &str| {
        nix::sys::stat::fstatat(
            Some(std::os::fd::AsRawFd::as_raw_fd(&dir)),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    };
    let regular = |st: &nix::sys::stat::FileStat| {
        nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
            == nix::sys::stat::SFlag::S_IFREG
    };
    let st = match at("db.sqlite") {
        Ok(st) => st,
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io_at("inspect", &db)(e.into())),
    };
    if !regular(&st) {
        return Err(io_at("snapshot", &db)(io::Error::other(
            "not a regular file (a symlink planted by a job's daemon?)",
        )));
    }
    // Nor a journal, WAL or shared-memory file that is not one: SQLite opens them beside the
    // database without O_NONBLOCK, and a FIFO there would hold root's open for ever. (Each
    // is opened by name later: a daemon that swaps one in after this check still can.)
    for name in ["db.sqlite-journal", "db.sqlite-wal", "db.sqlite-shm"] {
        match at(name) {
            Ok(st) if !regular(&st) => {
                return Err(io_at("snapshot", &lower.join(name))(io::Error::other(
                    "not a regular file (planted by a job's daemon?)",
                )))
            }
            Ok(_) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(io_at("inspect", &lower.join(name))(e.into())),
        }
    }
    let copy = up.join("db.sqlite");
    // The private path SQLite is given: an empty directory of root's beside the layer's upper
    // (in the layer's own directory, 0700), removed again after.
    let via = upper.with_file_name("db-source");
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&via)
        .map_err(io_at("create", &via))?;
    // Linear in the database and waiting on a writer's lock: on a blocking thread, through
    // the store's facade, while the runtime only awaits it.
    let (into, bound, store) = (copy.clone(), via.clone(), phys_nix.to_path_buf());
    let held = crate::store::HeldDir {
        dir,
        reopen: Box::new(move || workdir::open_dir_below(&store, Path::new("var/nix/db"))),
    };
    let done = crate::store::blocking(move |b| b.snapshot_held(held, &bound, &into))
        .await
        .and_then(|r| r);
    // Empty again once the snapshot's thread (and its namespace) is gone.
    let _ = std::fs::remove_dir(&via);
    done.map_err(|e| EnvelopeError::Io {
        what: "snapshot the store's database into the job's layer",
        path: db.clone(),
        source: match e {
            // SQLite's own words, as before the facade.
            crate::store::StoreError::Open(s) | crate::store::StoreError::Read(s) => {
                io::Error::other(s)
            }
            other => io::Error::other(other),
        },
    })?;
    std::os::unix::fs::chown(&copy, Some(kuid(st.st_uid)), Some(kgid(st.st_gid)))
        .map_err(io_at("chown", &copy))?;
    for name in ["db.sqlite-wal", "db.sqlite-shm"] {
        let w = up.join(name);
        // An overlayfs whiteout: a character device 0/0 in the upper layer.
        nix::sys::stat::mknod(
            &w,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .map_err(|e| io_at("white out", &w)(e.into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose database a job's daemon swapped for a symlink to another SQLite file of
    /// the host's: the snapshot for an untrusted job's layer refuses it, and nothing of that
    /// file reaches the layer.
    #[tokio::test]
    async fn a_layer_never_gets_a_database_a_symlink_points_at() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP a_layer_never_gets_a_database_a_symlink_points_at: the snapshot's private mount namespace needs root");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("host-secrets.sqlite");
        let conn = rusqlite::Connection::open(&secret).unwrap();
        conn.execute_batch("CREATE TABLE s (v TEXT); INSERT INTO s VALUES ('host secret');")
            .unwrap();
        drop(conn);
        let store = t.path().join("nix");
        std::fs::create_dir_all(store.join("var/nix/db")).unwrap();
        // The route is real: SQLite itself follows the link.
        std::os::unix::fs::symlink(&secret, store.join("var/nix/db/db.sqlite")).unwrap();
        let through = rusqlite::Connection::open(store.join("var/nix/db/db.sqlite")).unwrap();
        let v: String = through
            .query_row("SELECT v FROM s", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, "host secret");
        drop(through);
        let upper = t.path().join("upper");
        std::fs::create_dir(&upper).unwrap();
        let e = snapshot_db(&store, &upper, None)
            .await
            .expect_err("a symlinked database is refused");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        assert!(!upper.join("var/nix/db/db.sqlite").exists());
        // And SQLite's own open refuses it too (a swap after the check above).
        let (from, into) = (
            store.join("var/nix/db/db.sqlite"),
            t.path().join("through.sqlite"),
        );
        let r = crate::store::blocking(move |b| b.snapshot(&from, &into))
            .await
            .unwrap();
        assert!(r.is_err(), "{r:?}");
        assert!(!t.path().join("through.sqlite").exists());
        // A real database is copied.
        std::fs::remove_file(store.join("var/nix/db/db.sqlite")).unwrap();
        std::fs::copy(&secret, store.join("var/nix/db/db.sqlite")).unwrap();
        let upper = t.path().join("upper2");
        std::fs::create_dir(&upper).unwrap();
        snapshot_db(&store, &upper, None).await.expect("snapshot");
        assert!(upper.join("var/nix/db/db.sqlite").is_file());
        assert!(
            !upper.with_file_name("db-source").exists(),
            "the private path is removed"
        );
    }

    /// The swap lands exactly between the agent's walk to the database's directory and
    /// SQLite's open: the path then leads to the other database (the attack); SQLite given
    /// the private bind reads the store's own.
    #[tokio::test]
    async fn a_swap_between_the_walk_and_sqlites_open_is_read_past() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP a_swap_between_the_walk_and_sqlites_open_is_read_past: the snapshot's private mount namespace needs root");
            return;
        }
        let (t, store, dbdir, decoy) = store_and_decoy();
        let swap = {
            let (dbdir, decoy) = (dbdir.clone(), decoy.clone());
            move || {
                std::fs::rename(&dbdir, dbdir.with_file_name("db.real")).unwrap();
                std::os::unix::fs::symlink(&decoy, &dbdir).unwrap();
            }
        };
        let unswap = || {
            std::fs::remove_file(&dbdir).unwrap();
            std::fs::rename(dbdir.with_file_name("db.real"), &dbdir).unwrap();
        };
        // The attack: the directory walked, then swapped. The path now leads to the other
        // database; SQLite's own check refuses it when the swap is already there when it
        // looks (it can still lose the race between its look and its open: the test above).
        let held = workdir::open_dir_below(&store, Path::new("var/nix/db")).unwrap();
        swap();
        assert_eq!(
            says(&dbdir.join("db.sqlite")).unwrap(),
            "another database",
            "the attack did not land"
        );
        let (from, into) = (dbdir.join("db.sqlite"), t.path().join("by-path.sqlite"));
        let r = crate::store::blocking(move |b| b.snapshot(&from, &into))
            .await
            .unwrap();
        assert!(r.is_err(), "{r:?}");
        drop(held);
        unswap();
        // The same swap, the same moment, through the private bind.
        let held = workdir::open_dir_below(&store, Path::new("var/nix/db")).unwrap();
        let via = t.path().join("via");
        std::fs::create_dir(&via).unwrap();
        let store2 = store.clone();
        let h = crate::store::HeldDir {
            dir: held,
            reopen: Box::new(move || {
                let d = workdir::open_dir_below(&store2, Path::new("var/nix/db"));
                swap();
                d
            }),
        };
        let (at, into) = (via.clone(), t.path().join("held.sqlite"));
        crate::store::blocking(move |b| b.snapshot_held(h, &at, &into))
            .await
            .unwrap()
            .unwrap();
        assert!(std::fs::symlink_metadata(&dbdir)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            says(&t.path().join("held.sqlite")).unwrap(),
            "the store's own"
        );
        unswap();
        // A FIFO planted as the journal would hold SQLite's open for ever: refused first.
        nix::unistd::mkfifo(
            &dbdir.join("db.sqlite-journal"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let upper = t.path().join("layer/upper");
        std::fs::create_dir_all(&upper).unwrap();
        let e = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            snapshot_db(&store, &upper, None),
        )
        .await
        .expect("the snapshot returned")
        .expect_err("a FIFO journal is refused");
        assert!(e.to_string().contains("db.sqlite-journal"), "{e}");
    }

    /// A store whose database says "the store's own", and another directory whose database
    /// says "another database": the tempdir, the store, its database's directory, the other.
    fn store_and_decoy() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let store = t.path().join("nix");
        let dbdir = store.join("var/nix/db");
        std::fs::create_dir_all(&dbdir).unwrap();
        db_saying(&dbdir.join("db.sqlite"), "the store's own");
        let decoy = t.path().join("elsewhere");
        std::fs::create_dir(&decoy).unwrap();
        db_saying(&decoy.join("db.sqlite"), "another database");
        (t, store, dbdir, decoy)
    }

    /// A SQLite database at `path` whose one row says `v`.
    fn db_saying(path: &Path, v: &str) {
        let c = rusqlite::Connection::open(path).unwrap();
        c.execute_batch("CREATE TABLE s (v TEXT)").unwrap();
        c.execute("INSERT INTO s VALUES (?1)", [v]).unwrap();
    }

    fn says(path: &Path) -> rusqlite::Result<String> {
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?
            .query_row("SELECT v FROM s", [], |r| r.get(0))
    }

    /// A daemon that writes the store swaps the database's directory for a symlink to a
    /// directory holding another database, over and over, while untrusted layers are made. A
    /// path-based open lands on the other database (the attack works); a layer's snapshot
    /// is the store's own database or refused, never the other.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_swapped_on_the_way_to_the_database_never_sends_the_snapshot_elsewhere() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIP a_directory_swapped_on_the_way_to_the_database_never_sends_the_snapshot_elsewhere: the snapshot's private mount namespace needs root");
            return;
        }
        let (t, store, dbdir, decoy) = store_and_decoy();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (stop, dbdir, decoy) = (stop.clone(), dbdir.clone(), decoy.clone());
            std::thread::spawn(move || {
                let aside = dbdir.with_file_name("db.real");
                let mut swaps = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::fs::rename(&dbdir, &aside).unwrap();
                    std::os::unix::fs::symlink(&decoy, &dbdir).unwrap();
                    std::thread::sleep(std::time::Duration::from_micros(300));
                    std::fs::remove_file(&dbdir).unwrap();
                    std::fs::rename(&aside, &dbdir).unwrap();
                    swaps += 1;
                    std::thread::sleep(std::time::Duration::from_micros(600));
                }
                swaps
            })
        };
        // The attack works against a path: an open of it lands on the other database.
        let mut landed = 0;
        for _ in 0..2000 {
            if says(&dbdir.join("db.sqlite")).is_ok_and(|v| v == "another database") {
                landed += 1;
            }
        }
        let (mut copied, mut refused) = (0, 0);
        for i in 0..800 {
            let upper = t.path().join(format!("layer{i}/upper"));
            std::fs::create_dir_all(&upper).unwrap();
            let copy = upper.join("var/nix/db/db.sqlite");
            match snapshot_db(&store, &upper, None).await {
                // Made while the directory was away: a store without a database, no copy.
                Ok(()) if !copy.exists() => refused += 1,
                Ok(()) => {
                    copied += 1;
                    // Read beside the layer: the upper holds overlayfs whiteouts for its
                    // `-wal` and `-shm`, which SQLite would not open.
                    let read = t.path().join(format!("copy{i}.sqlite"));
                    std::fs::copy(&copy, &read).unwrap();
                    assert_eq!(
                        says(&read).unwrap(),
                        "the store's own",
                        "snapshot {i} copied another database"
                    );
                }
                Err(_) => refused += 1,
            }
            assert!(!upper.with_file_name("db-source").exists());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let swaps = swapper.join().unwrap();
        eprintln!("{swaps} swaps; a path-based open landed elsewhere {landed} times of 2000; snapshots: {copied} copied, {refused} refused");
        assert!(
            swaps > 50 && landed > 0,
            "the attack did not run: {swaps} swaps, {landed} landings"
        );
        assert!(
            copied > 0,
            "no snapshot was made under the attack: {refused} refused"
        );
    }
}
