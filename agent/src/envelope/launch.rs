//! Launch: the job's directory, its nix-daemon, its mounts, its first process.

use super::*;
use crate::config::Network;
use crate::netns::{JobNet, NetError};

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
    cleanup: &mut Vec<PathBuf>,
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
    let job_dir = workdir::create(phys_work_root, job, uid, gid)
        .map_err(io_at("create the job's directory under", phys_work_root))?;
    cleanup.push(job_dir.clone());
    let net = job_network(spec, &job_dir, &mut mounts, reaper).await?;
    if let Some(cache) = &spec.bazel {
        // Before anything of the job runs: its endpoint is there when its first step is.
        let Some(n) = &net else {
            return Err(EnvelopeError::Bazel(crate::bazel::BazelError::Bind(
                io::Error::other(
                    "the lane has no network namespace per job (network = \"isolated\")",
                ),
            )));
        };
        cache.start(n.fd(), &spec.background)?;
    }
    let root_seen = spec.work_root.join(job);
    let mut cwd_path = root_seen.join(workdir::WORK);
    let mut command = spec.command.clone();
    if let Some(n) = &spec.nix {
        if n.throwaway {
            let merged = throwaway_layer(phys_nix, phys_work_root, job, cleanup)?;
            mounts.push(Mount::Bind {
                src: merged,
                dst: n.store_seen.clone(),
                readonly: false,
            });
        }
        // The daemon gets the job's own mounts (not its /tmp or /proc: `confine.rs` gives it a
        // private /tmp, and it keeps the host's /proc).
        let mut daemon_mounts: Vec<Mount> = mounts
            .iter()
            .filter(|m| matches!(m, Mount::Bind { .. } | Mount::Hide { .. }))
            .cloned()
            .collect();
        for d in [&n.userpool, &n.userpool_seen] {
            std::fs::create_dir_all(d).map_err(io_at("create", d))?;
        }
        daemon_mounts.push(Mount::Bind {
            src: n.userpool.clone(),
            dst: n.userpool_seen.clone(),
            readonly: false,
        });
        if spec.hook.is_none() {
            // A runner's record and logs outlive its job until the agent has published from
            // them and reported; an exec job's go with it (a daemon that never started too).
            cleanup.push(built_list(n, job));
            cleanup.push(build_logs(n, job));
        }
        if let Some(u) = user {
            // Nix 2.8's daemon gives the user `var/nix/{profiles,gcroots}/per-user/<user>`
            // (the user's own, in a store every later job of this user reuses, a trusted one
            // included): gone with the job, like its HOME.
            for kind in ["profiles", "gcroots"] {
                cleanup.push(
                    phys_nix
                        .join("var/nix")
                        .join(kind)
                        .join("per-user")
                        .join(&u.name),
                );
            }
        }
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
            cleanup,
            net.as_ref().map(JobNet::fd),
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
        let logs_seen = phys_nix.join("var/log/nix");
        std::fs::create_dir_all(&logs_seen).map_err(io_at("create", &logs_seen))?;
        mounts.push(Mount::Bind {
            src: build_logs(n, job),
            dst: spec.lane.nix_store.join("var/log/nix"),
            readonly: true,
        });
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

/// A layer of the job's own over the store at `phys_nix` (kernel overlayfs: lower = the store,
/// read-only; upper and work = `<work root>/<job>.layer`, root's 0700, on the work root's
/// fast-local filesystem), mounted in the agent's namespace and bound at the store in the job's
/// and its daemon's. Returns the merged directory. Removed at teardown (`remove_tree` detaches
/// the mount first): whatever the daemon wrote there — builds, added paths, signatures, the
/// database — is gone, and the store below never changed.
fn throwaway_layer(
    phys_nix: &Path,
    phys_work_root: &Path,
    job: &str,
    cleanup: &mut Vec<PathBuf>,
) -> Result<PathBuf, EnvelopeError> {
    use std::os::unix::fs::DirBuilderExt;
    let layer = phys_work_root.join(format!("{job}.layer"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&layer)
        .map_err(io_at("create", &layer))?;
    cleanup.push(layer.clone());
    let (upper, work, merged) = (
        layer.join("upper"),
        layer.join("work"),
        layer.join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).map_err(io_at("create", d))?;
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        phys_nix.display(),
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
    Ok(merged)
}
