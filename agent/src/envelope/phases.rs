//! The only place that orders a job's phases: setup (slot, scratch check, Nix bootstrap,
//! cgroup), run (launch, supervise), teardown (by a guard, within one deadline).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{info, info_span, warn, Instrument};

use super::daemon::{build_logs, built_list};
use super::launch::{launch, LaunchArgs, Launched};
use super::mounts::{tmp_keep, Mount, MQUEUE, RUN_LOCK, SHM, TMP, VAR_TMP};
use super::probe::{JobFacts, JobProbe};
use super::{
    bigger_lane, command_name, io_at, job_name, ms, now_unix_f64, EnvelopeError, JobOutcome,
    JobSpec, NixSetupError, Released, Stop, StopMode, TeardownError, Timings, UserChoice,
    DRAIN_TIMEOUT,
};
use crate::cgroup::{CgroupError, CgroupManager, JobCgroup, Limits, Stats};
use crate::config::{Config, Lane};
use crate::jobuser::JobUser;
use crate::reaper::{Exit, Reaper, Spawner};
use crate::receipt::{Receipt, Scope, Thing, What};
use crate::report::{Bootstrap, SlotCheck, StoreStart};
use crate::verdict::{Killed, KmsgWatch};
use crate::{scratch, slot, workdir};

/// The store a job gets: which node-local slot and whether it is warm. A slot whose last
/// holder died is checked first, and wiped when it is not sound (the job then bootstraps
/// cold). The check, the wipe and the size are a blocking thread's work.
pub(super) async fn store_start(
    lane: &Lane,
    slot: &slot::Slot,
    slot_nix: Option<&Path>,
) -> Option<StoreStart> {
    let Some(nix) = slot_nix else {
        return lane.slot_root.as_ref().map(|_| StoreStart::PodLocal {
            lane: lane.name.clone(),
            slots: lane.slots,
        });
    };
    let (index, dirty, root) = (slot.index, slot.dirty, nix.to_owned());
    let read = crate::store::blocking(move |b| {
        let mut check = SlotCheck::NotNeeded;
        if dirty {
            match b.check(&root) {
                Ok(took) => check = SlotCheck::Sound(took),
                Err(e) => {
                    warn!(slot = index, error = %e, "the slot's store is not sound after its holder died; wiping it");
                    let _ = workdir::remove_tree(&root);
                    check = SlotCheck::Wiped(e.to_string());
                }
            }
        }
        let receipt = crate::nixboot::receipt_path(&root).exists();
        (check, receipt, b.size(&root))
    })
    .await;
    let (check, receipt, size) = match read {
        Ok(r) => r,
        Err(e) => (SlotCheck::Failed(e.to_string()), false, Err(e)),
    };
    let warm = match size {
        Ok((paths, bytes)) if paths > 0 && receipt => Some((paths, bytes)),
        _ => None,
    };
    Some(StoreStart::Slot {
        lane: lane.name.clone(),
        index: slot.index,
        warm,
        idle_secs: slot.idle_secs,
        check,
    })
}

/// What the phases need from the world of processes: reaping exits, running helper programs,
/// starting the job. The agent's is [`Reaped`] (the reaper, fork and exec); the phase tests
/// use a fake, so the order of the phases is tested without a kernel.
pub(super) trait Processes: Sync {
    /// Reap exited children now (teardown does, so a zombie does not hold the cgroup up).
    fn reap(&self);
    /// Woken whenever an exited child was reaped, if there is a reaper to say so.
    fn on_reap(&self) -> Option<std::sync::Arc<tokio::sync::Notify>>;
    /// What runs helper programs on a blocking thread (the Nix bootstrap, a slot's gc).
    fn spawner(&self) -> std::sync::Arc<dyn Spawner>;
    /// Create the job's directory (in its receipt before it exists) and start its first
    /// process inside its cgroup.
    fn launch(
        &self,
        args: LaunchArgs<'_>,
        receipt: &Receipt,
    ) -> impl std::future::Future<Output = Result<Launched, EnvelopeError>> + Send;
}

/// The agent's processes: fork and exec, every child watched by the reaper.
pub(super) struct Reaped<'a>(pub &'a Reaper);

impl Processes for Reaped<'_> {
    fn reap(&self) {
        self.0.reap();
    }
    fn on_reap(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        Some(self.0.on_reap())
    }
    fn spawner(&self) -> std::sync::Arc<dyn Spawner> {
        std::sync::Arc::new(self.0.clone())
    }
    async fn launch(
        &self,
        args: LaunchArgs<'_>,
        receipt: &Receipt,
    ) -> Result<Launched, EnvelopeError> {
        launch(args, receipt, self.0).await
    }
}

/// Run one job of a lane to completion.
pub async fn run_job(
    cfg: &Config,
    mgr: &dyn CgroupManager,
    spec: JobSpec,
    stop: Stop,
    reaper: &Reaper,
) -> Result<JobOutcome, EnvelopeError> {
    let span = match &spec.log_output {
        Some(runner) => {
            info_span!("job", lane = %spec.lane.name, runner = %runner, job = tracing::field::Empty)
        }
        None => info_span!("job", lane = %spec.lane.name, job = tracing::field::Empty),
    };
    let bazel = spec.bazel.clone();
    let done = run_job_inner(cfg, mgr, spec, stop, &Reaped(reaper), span.clone())
        .instrument(span)
        .await;
    // The job's processes are gone: its cache endpoint (and with its socket, the last hold on
    // the job's network namespace) goes too.
    if let Some(b) = bazel {
        b.stop();
    }
    done
}

pub(super) async fn run_job_inner<P: Processes>(
    cfg: &Config,
    mgr: &dyn CgroupManager,
    spec: JobSpec,
    stop: Stop,
    procs: &P,
    span: tracing::Span,
) -> Result<JobOutcome, EnvelopeError> {
    let t0 = Instant::now();
    let lane = &spec.lane;
    let probe = spec.probe.clone().unwrap_or_default();
    let setup_span = info_span!("setup");
    let mut entered = setup_span.enter();

    // Every change the job makes to the host is in its receipt before it is made (a runner's
    // was begun with its hook service).
    let receipt = match &spec.receipt {
        Some(r) => r.clone(),
        None => Receipt::create(&crate::receipt::dir(&cfg.agent.state_dir), &lane.name)?,
    };
    receipt.record(
        Scope::Job,
        What::Slot,
        Thing::Lock {
            path: slot::locks_of(&cfg.agent.state_dir, lane),
        },
    )?;
    let slot = slot::acquire(&cfg.agent.state_dir, lane, spec.slot, spec.slot_fallback)?;
    let job = job_name(&lane.name, slot.index);
    span.record("job", job.as_str());
    receipt.set_job(&job);

    let slot_dirs = lane
        .slot_root
        .as_ref()
        .filter(|_| slot.node_local)
        .map(|root| slot::slot_dirs(root, slot.index));
    drop(entered);
    let store = store_start(
        lane,
        &slot,
        slot_dirs.as_ref().map(|(nix, _)| nix.as_path()),
    )
    .instrument(setup_span.clone())
    .await;
    entered = setup_span.enter();
    if let Some(store) = store {
        info!(
            slot = slot.index,
            node_local = slot.node_local,
            "store: {store}"
        );
        probe.with_setup(|s| s.store = Some(store));
    }
    let (phys_work_root, phys_nix) = match &slot_dirs {
        Some((nix, work)) => (work.clone(), nix.clone()),
        None => (spec.work_root.clone(), lane.nix_store.clone()),
    };
    let work_scratch = scratch::check(&phys_work_root, lane.min_free_bytes)?;
    // The store is scratch only for a job that uses Nix (`exec --no-nix` or a lane without
    // Nix may sit on a container's overlayfs /nix).
    let nix_scratch = match &spec.nix {
        Some(_) => Some(scratch::check(&phys_nix, lane.min_free_bytes)?),
        None => None,
    };
    info!(
        work = %work_scratch.inspected.display(), work_fs = %work_scratch.fs,
        nix = %nix_scratch.as_ref().map_or_else(|| "-".into(), |s| s.inspected.display().to_string()),
        nix_fs = %nix_scratch.as_ref().map_or("-", |s| s.fs.as_str()),
        slot = slot.index, "fast-local scratch ok"
    );
    if spec.nix.is_some() {
        let t = Instant::now();
        let on_slot = slot_dirs.as_ref().map(|_| slot.index);
        // The bootstrap unpacks, hashes and runs programs: a blocking thread's work, its
        // children watched by the reaper. The setup span is left while it runs, so the
        // runtime's other tasks are not attributed to it.
        let (cfg2, lane2, cpus, sp) = (cfg.clone(), lane.clone(), spec.host_cpus, procs.spawner());
        let in_span = tracing::Span::current();
        drop(entered);
        let r = tokio::task::spawn_blocking(move || {
            in_span.in_scope(|| crate::nixboot::ensure_for_job(&cfg2, &lane2, on_slot, cpus, &*sp))
        })
        .await;
        entered = setup_span.enter();
        let r = r
            .map_err(NixSetupError::BootstrapThread)?
            .map_err(NixSetupError::Bootstrap)?;
        info!(cold = r.cold, "{}", r.summary());
        // A runner job's trust is known only at job-started, after setup, and an exec
        // job's is the caller's word: every job's daemon is screened as an untrusted one's.
        let advisories = screen_advisories(&r.version, &cfg.nix.acknowledged_advisories)?;
        for line in &advisories {
            warn!("{line}");
        }
        let elapsed = t.elapsed();
        probe.with_setup(|s| {
            s.bootstrap = Some(Bootstrap { done: r, elapsed });
            s.advisories.extend(advisories);
        });
    }
    let stage = cfg.agent.state_dir.join("job-tmp");
    std::fs::create_dir_all(&stage).map_err(io_at("create", &stage))?;
    std::fs::set_permissions(&stage, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io_at("chmod", &stage))?;
    let exe = std::env::current_exe().unwrap_or_default();
    let exe_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let install_dir = spec.runner.as_ref().map(|r| r.install_dir.clone());
    let mut keep_candidates: Vec<&Path> = vec![
        &spec.work_root,
        &phys_work_root,
        &phys_nix,
        &lane.nix_store,
        &cfg.agent.state_dir,
        &exe_dir,
    ];
    keep_candidates.extend(install_dir.as_deref());
    for d in [&phys_work_root, &spec.work_root] {
        std::fs::create_dir_all(d).map_err(io_at("create", d))?;
    }
    // Nothing a job writes outside its job directory is seen by the next one: private /tmp,
    // /var/tmp (in the job directory), /dev/shm and /run/lock (tmpfs charged to its cgroup).
    let mut binds = vec![
        Mount::PrivateTmp {
            stage: stage.clone(),
            keep: tmp_keep(&keep_candidates, TMP),
            at: PathBuf::from(TMP),
            src: None,
        },
        Mount::PrivateTmp {
            stage,
            keep: tmp_keep(&keep_candidates, VAR_TMP),
            at: PathBuf::from(VAR_TMP),
            src: Some(phys_work_root.join(&job).join(workdir::VAR_TMP)),
        },
    ];
    for (dst, size) in [(SHM, spec.memory_bytes), (RUN_LOCK, 1 << 20)] {
        if Path::new(dst).is_dir() {
            binds.push(Mount::Scratch {
                dst: PathBuf::from(dst),
                size,
            });
        }
    }
    if Path::new(MQUEUE).is_dir() {
        binds.push(Mount::Mqueue);
    }
    if let Some((nix, work)) = &slot_dirs {
        for dir in [nix, work, &lane.nix_store, &spec.work_root] {
            std::fs::create_dir_all(dir).map_err(io_at("create", dir))?;
        }
        binds.push(Mount::Bind {
            src: nix.clone(),
            dst: lane.nix_store.clone(),
            readonly: false,
        });
        binds.push(Mount::Bind {
            src: work.clone(),
            dst: spec.work_root.clone(),
            readonly: false,
        });
    }
    if let Some(root) = &lane.slot_root {
        // Other slots' stores, work roots and locks are none of the job's business.
        binds.push(Mount::Hide { dst: root.clone() });
    }

    let user = match &spec.user {
        None => None,
        Some(UserChoice::Named(u)) => Some(u.clone()),
        Some(UserChoice::Slot) => Some(JobUser::lookup(
            &cfg.slot_user(&lane.name, slot.index),
            &cfg.runner.groups,
        )?),
    };
    if let Some(u) = &user {
        let mut owned: Vec<&Path> = vec![exe.as_path()];
        if let Some(r) = &spec.runner {
            owned.push(&r.install_dir);
        }
        u.refuse_owning(&owned)?;
        info!(user = %u.name, uid = u.uid, "the job runs as");
    }
    let (uid, gid) = user.as_ref().map_or_else(
        || {
            (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            )
        },
        |u| (u.uid, u.gid),
    );
    let limits = Limits {
        memory_bytes: spec.memory_bytes,
        pids_max: lane.pids_max,
        oom_group: lane.oom_group,
    };
    probe.watch_kmsg(KmsgWatch::start(), &job);
    receipt.record(
        Scope::Job,
        What::Cgroup,
        Thing::Cgroup { name: job.clone() },
    )?;
    let cg: std::sync::Arc<dyn JobCgroup> = match mgr.create(&job, &limits) {
        Ok(cg) => cg.into(),
        Err(e) => {
            receipt.forget(What::Cgroup);
            return Err(e.into());
        }
    };
    probe.set(Some(cg.clone()));
    probe.with_facts(|f| {
        *f = JobFacts {
            started_unix: now_unix_f64(),
            samples: None,
            nix_root: spec.nix.as_ref().map(|_| phys_nix.clone()),
            built: spec.nix.as_ref().map(|n| built_list(n, &job)),
            build_logs: spec.nix.as_ref().map(|n| build_logs(n, &job)),
            build_memory: std::sync::Arc::new(std::sync::Mutex::new(
                crate::buildmem::BuildMemory::new(uid),
            )),
        }
    });
    let sampler = probe.sample(&spec.background);
    drop(entered);
    // From here on, teardown runs whatever happens: the guard holds the cgroup, what to remove
    // after it and the slot, and tears them down itself if this future ends early.
    let (slot_index, slot_node_local, lock_fd) = (slot.index, slot.node_local, slot.lock_fd());
    let mut guard = JobGuard {
        cg: cg.clone(),
        receipt: receipt.clone(),
        slot: Some(slot),
        armed: true,
        probe: probe.clone(),
    };
    let launched = procs
        .launch(
            LaunchArgs {
                spec: &spec,
                user: user.as_ref(),
                cg: cg.as_ref(),
                phys_work_root: &phys_work_root,
                phys_nix: &phys_nix,
                mounts: binds,
                job: &job,
                ids: (uid, gid),
                hold: lock_fd,
                span: &span,
            },
            &receipt,
        )
        .instrument(setup_span.clone())
        .await;
    let setup = t0.elapsed();
    crate::receipt::failpoint("launched");

    let t_run = Instant::now();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut stopped = false;
    let mut pumps = Vec::new();
    let (exit, launch_error, code) = match launched {
        Ok(Launched::Running { pid, exit, output }) => {
            probe.launched();
            let exit = supervise(
                pid,
                exit,
                cg.as_ref(),
                &stop,
                spec.stop_mode,
                cfg,
                &mut stopped,
            )
            .instrument(info_span!("run", pid))
            .await;
            // The log pumps end when every writer of the pipes is gone, and a process the job
            // left behind (a step's `cmd &`, the job's nix-daemon) may hold them: they are
            // awaited after teardown has emptied the cgroup, never before it.
            pumps = output;
            (Some(exit), None, exit.code())
        }
        Ok(Launched::Failed { code, message }) => (None, Some(message), code),
        Err(e) => {
            probe.close_store().await;
            // Setup failed after the cgroup existed: tear down, then report the setup error.
            let torn = teardown(&mut guard, cfg, &stop, procs).await;
            sampler.abort();
            probe.set(None);
            keep_slot_if_torn_badly(&torn, lane, slot_index, slot_node_local);
            return Err(e);
        }
    };
    let run = t_run.elapsed();
    sampler.abort();
    probe.close_store().await;
    let facts = probe.facts();
    // Read on a blocking thread, before teardown: an untrusted job's store is its layer, gone
    // after it.
    let read = crate::store::job_builds(facts.store(), facts.started_unix, started_unix)
        .await
        .unwrap_or_else(|e| {
            warn!(error = %e, "cannot read what the job built");
            crate::store::JobBuilds::default()
        });
    let paths = if facts.build_logs.is_some() {
        read.paths
    } else {
        None
    };

    let t_down = Instant::now();
    let torn = teardown(&mut guard, cfg, &stop, procs)
        .instrument(info_span!("teardown"))
        .await;
    for mut task in pumps {
        // A writer outside the job (none is expected) cannot hold the runner up.
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
    probe.set(None);
    keep_slot_if_torn_badly(&torn, lane, slot_index, slot_node_local);
    // The job is gone (or what is left of it is kept) and the slot still ours: nothing can
    // collect its outputs yet. What the job's store still needs is done now, even after a
    // teardown that failed (what is published is checked against the database byte by byte).
    let mut before_release_time = Duration::ZERO;
    if let Some(before) = &spec.before_release {
        let t = Instant::now();
        let after = Released {
            left: cfg.agent.teardown_deadline.saturating_sub(t_down.elapsed()),
            oom: torn.as_ref().is_ok_and(|s| s.oom_kills > 0),
        };
        if let Some(line) = before
            .run(after)
            .instrument(info_span!("before_release"))
            .await
        {
            info!("{line}");
        }
        before_release_time = t.elapsed();
    }
    let stats = torn?;
    if slot_dirs.is_some() && spec.nix.is_some() {
        // Still holding the slot, its job gone: nothing live uses the store.
        let (cfg2, lane2, sp) = (cfg.clone(), lane.clone(), procs.spawner());
        let gc = crate::store::blocking(move |b| {
            crate::nixboot::gc_slot(&cfg2, &lane2, slot_index, &*sp, b)
        })
        .await;
        match gc {
            Ok(Ok(Some(done))) => info!("{done}"),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot collect the slot's garbage; its disk may fill"),
            Err(e) => warn!(error = %e, "the slot's garbage collection failed; its disk may fill"),
        }
    }
    drop(guard);
    // Publishing is not teardown: the teardown figure stays the kernel's and the store's.
    let teardown_time = t_down.elapsed().saturating_sub(before_release_time);

    let killed = if stats.oom_kills > 0 {
        let mut killed = probe.killed();
        if killed.is_empty() && exit == Some(Exit::Signal(libc::SIGKILL)) {
            killed.push(Killed {
                pid: 0,
                name: command_name(&spec.command),
            });
            killed.retain(|k| !k.name.is_empty());
        }
        killed
    } else {
        Vec::new()
    };
    let timings = Timings {
        setup,
        run,
        teardown: teardown_time,
    };
    info!(
        exit = code,
        oom_kills = stats.oom_kills,
        peak_bytes = stats.peak_bytes.unwrap_or(0),
        setup_ms = ms(timings.setup),
        run_ms = ms(timings.run),
        teardown_ms = ms(timings.teardown),
        stopped,
        "job finished"
    );
    Ok(JobOutcome {
        job,
        slot: slot_index,
        code,
        exit,
        launch_error,
        stopped,
        timings,
        report: crate::report::compute(
            &crate::report::Job {
                lane,
                envelope_bytes: spec.memory_bytes,
                host_cpus: spec.host_cpus,
                nix: spec.nix.is_some(),
                bigger_lane: bigger_lane(cfg, &lane.name, spec.memory_bytes)
                    .map(|(name, bytes)| (name.to_owned(), bytes)),
            },
            crate::report::Seen {
                stats,
                killed,
                paths,
                elapsed: run,
                ended: Some((code, stopped)),
                ..probe.seen(facts, read.builds)
            },
        ),
    })
}

/// The advisories (`advisory`) that affect the installed Nix: an error for one not
/// acknowledged, a line for the setup block for each acknowledged one.
fn screen_advisories(version: &str, acknowledged: &[String]) -> Result<Vec<String>, EnvelopeError> {
    let pin = crate::nixboot::pin().map_or_else(|_| "unknown".to_owned(), |p| p.version);
    crate::advisory::screen(version, acknowledged, &pin)
        .map_err(|e| EnvelopeError::Nix(NixSetupError::Advisory(e)))
}

pub(super) fn signal_all(cg: &dyn JobCgroup, sig: nix::sys::signal::Signal) {
    if let Err(e) = cg.signal(sig) {
        warn!(error = %e, signal = %sig, "cannot list the job's processes to signal them");
    }
}

/// Wait for the command; a graceful stop sends the stop signal and waits the stop grace, a
/// second (or an immediate) stop kills the cgroup.
pub(super) async fn supervise(
    pid: i32,
    mut exit: oneshot::Receiver<Exit>,
    cg: &dyn JobCgroup,
    stop: &Stop,
    mode: StopMode,
    cfg: &Config,
    stopped: &mut bool,
) -> Exit {
    enum Ev {
        Exited(Exit),
        Graceful,
        Kill,
    }
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut killed = false;
    loop {
        let far = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
        let ev = tokio::select! {
            e = &mut exit => Ev::Exited(e.unwrap_or(Exit::Signal(libc::SIGKILL))),
            () = stop.graceful.cancelled(), if deadline.is_none() && !killed => Ev::Graceful,
            () = stop.now.cancelled(), if !killed => Ev::Kill,
            () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() && !killed => Ev::Kill,
        };
        match ev {
            Ev::Exited(e) => return e,
            Ev::Graceful => {
                *stopped = true;
                warn!(grace = ?cfg.agent.stop_grace, signal = %mode.signal, whole_job = mode.whole_job, "stopping the job; the cgroup is killed after the grace");
                if mode.whole_job {
                    signal_all(cg, mode.signal);
                } else {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), mode.signal);
                }
                deadline = Some(tokio::time::Instant::now() + cfg.agent.stop_grace);
            }
            Ev::Kill => {
                *stopped = true;
                killed = true;
                warn!("killing the job's cgroup");
                if let Err(e) = cg.kill_all() {
                    warn!(error = %e, "cgroup kill failed; sending SIGKILL to each process");
                    signal_all(cg, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

/// A job from the moment its cgroup exists: the cgroup, what to remove after it, the slot.
/// [`teardown`] finishes it in the documented order within `agent.teardown_deadline`;
/// dropped unfinished (a panic, a cancelled future, an early return), it tears the job down on
/// a thread of its own and releases the slot only after that.
pub(super) struct JobGuard {
    cg: std::sync::Arc<dyn JobCgroup>,
    /// What the job changed on the host: its teardown walks it back.
    receipt: Receipt,
    slot: Option<slot::Slot>,
    armed: bool,
    /// The job's probe: its store is closed before the late teardown, so that no job-started
    /// hook opens one (a daemon, a layer) after the view and layer are gone.
    probe: JobProbe,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        let slot = self.slot.take();
        if !self.armed {
            return;
        }
        let (cg, receipt) = (self.cg.clone(), self.receipt.clone());
        let probe = self.probe.clone();
        warn!(
            job = cg.name(),
            "the job ended without its teardown (a panic or a cancelled task); tearing it down now"
        );
        let spawned = std::thread::Builder::new()
            .name("flywheel-teardown".into())
            .spawn(move || {
                // Waits for an opening under way: its daemon is in the cgroup killed next.
                probe.close_store_blocking();
                let drained = cg.kill_and_drain(DRAIN_TIMEOUT);
                let errors = remove_after_drain(cg.as_ref(), drained, &receipt);
                if !errors.is_empty() {
                    tracing::error!(job = cg.name(), errors = %crate::receipt::joined(&errors), "the job's late teardown left things behind");
                }
                drop(slot);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the job's late teardown; its cgroup and directory are left for the next start's reconciliation");
        }
    }
}

/// A teardown that failed leaves a node-local slot's store and work possibly in use: no other
/// job gets the slot until an operator has looked (`flywheel-agent status` shows it).
pub(super) fn keep_slot_if_torn_badly<T>(
    torn: &Result<T, EnvelopeError>,
    lane: &Lane,
    index: u32,
    node_local: bool,
) {
    if let (Err(e), Some(root)) = (torn, lane.slot_root.as_ref().filter(|_| node_local)) {
        slot::mark_unusable(root, index, &e.to_string());
        warn!(
            slot = index,
            "the slot is marked unusable until its leftovers are gone"
        );
    }
}

/// Tear a job down in the documented order — SIGTERM and the grace, the cgroup kill, the wait
/// until it is empty, the counters, `rmdir`, the job's directories — all within
/// `agent.teardown_deadline` from now.
pub(super) async fn teardown<P: Processes>(
    guard: &mut JobGuard,
    cfg: &Config,
    stop: &Stop,
    procs: &P,
) -> Result<Stats, EnvelopeError> {
    crate::receipt::failpoint("teardown");
    let start = Instant::now();
    let deadline = start + cfg.agent.teardown_deadline;
    let cg = guard.cg.clone();
    procs.reap();
    if !cg.is_empty()? {
        signal_all(cg.as_ref(), nix::sys::signal::Signal::SIGTERM);
        let grace_end = start + cfg.agent.teardown_grace.min(cfg.agent.teardown_deadline);
        // Woken when the reaper reaps one of the job's processes (the last one's exit is what
        // empties it) and when the kernel says it is empty (`cgroup.events`: it covers
        // processes the agent does not reap, but the kernel sends it at most every 20 ms);
        // without either (pure v1 in the fakes), a look every few milliseconds.
        let mut events = cg
            .events_file()
            .and_then(|f| crate::ready::Events::new(&f).ok());
        let on_reap = procs.on_reap();
        let mut pause = Duration::from_micros(500);
        while Instant::now() < grace_end && !stop.now.is_cancelled() {
            let reaped = on_reap.as_ref().map(|n| n.notified());
            procs.reap();
            if cg.is_empty()? {
                break;
            }
            let until = tokio::time::Instant::from_std(grace_end);
            match (events.as_mut(), reaped) {
                (Some(ev), Some(reaped)) => {
                    tokio::select! {
                        () = ev.changed() => {}
                        () = reaped => {}
                        () = tokio::time::sleep_until(until) => {}
                        () = stop.now.cancelled() => {}
                    }
                }
                _ => {
                    tokio::time::sleep(
                        pause.min(grace_end.saturating_duration_since(Instant::now())),
                    )
                    .await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
            }
        }
    }
    // The kill, the wait for an empty cgroup and the removal of a job's tree (100k files is
    // seconds) block: they run off the async thread, which keeps serving the other runners,
    // the hooks, /metrics and the watchdog. Nothing there starts a child process, so the
    // reaper cannot take a status meant for it. From here the blocking task owns the
    // teardown: the guard is disarmed.
    let left = deadline.saturating_duration_since(Instant::now());
    let (cg2, receipt) = (cg.clone(), guard.receipt.clone());
    guard.armed = false;
    let task = tokio::task::spawn_blocking(move || {
        // Half of what is left at most: the removal of the job's tree needs its share.
        let drained = cg2.kill_and_drain(DRAIN_TIMEOUT.min(left / 2));
        let stats = cg2.stats().unwrap_or_default();
        (stats, remove_after_drain(cg2.as_ref(), drained, &receipt))
    });
    let (stats, errors) = match tokio::time::timeout(left, task).await {
        Ok(done) => done.map_err(TeardownError::Task)?,
        Err(_) => return Err(TeardownError::Deadline(cfg.agent.teardown_deadline).into()),
    };
    procs.reap();
    if errors.is_empty() {
        Ok(stats)
    } else {
        Err(TeardownError::NotUndone(errors).into())
    }
}

/// After the kill: walk the job's receipt back — the cgroup removed, then the job's
/// directories, mounts and files, last made first — only when the cgroup is empty. With
/// processes left, everything is kept (removing a tree under a live process is the race the
/// removal is not built for), the errors say what was kept, and the receipt keeps it for the
/// next start.
pub(super) fn remove_after_drain(
    cg: &dyn JobCgroup,
    drained: Result<(), CgroupError>,
    receipt: &Receipt,
) -> Vec<crate::receipt::UndoError> {
    receipt.undo(Some(Scope::Job), &mut Drained { cg, drained })
}

/// The teardown's way of undoing a receipt: the job's cgroup, already killed and drained.
struct Drained<'a> {
    cg: &'a dyn JobCgroup,
    drained: Result<(), CgroupError>,
}

impl crate::receipt::Undo for Drained<'_> {
    fn cgroup(&mut self, _name: &str) -> Result<(), crate::receipt::Busy> {
        use crate::receipt::Busy;
        if let Err(e) = &self.drained {
            return Err(Busy::Processes(e.to_string()));
        }
        self.cg.remove().map_err(|e| Busy::Kept(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::{Result as CgResult, Stats};
    use crate::envelope::BeforeRelease;

    /// A job cgroup that cannot be emptied (a process stuck in the kernel).
    #[derive(Debug)]
    struct Stuck {
        removed: std::sync::atomic::AtomicBool,
    }

    impl JobCgroup for Stuck {
        fn name(&self) -> &str {
            "stuck"
        }
        fn procs_files(&self) -> Vec<PathBuf> {
            vec![PathBuf::from("/fake/stuck/cgroup.procs")]
        }
        fn pids(&self) -> CgResult<Vec<i32>> {
            Ok(vec![424242])
        }
        fn stats(&self) -> CgResult<Stats> {
            Ok(Stats::default())
        }
        fn memory_current(&self) -> Option<u64> {
            None
        }
        fn kill_all(&self) -> CgResult<()> {
            Ok(())
        }
        fn remove(&self) -> CgResult<()> {
            self.removed
                .store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn a_cgroup_that_cannot_be_emptied_keeps_the_job_directory() {
        let t = tempfile::tempdir().expect("tempdir");
        let dir = t.path().join("job");
        std::fs::create_dir_all(dir.join("_work")).expect("mkdir");
        let cg = Stuck {
            removed: std::sync::atomic::AtomicBool::new(false),
        };
        let drained = cg.kill_and_drain(Duration::from_millis(20));
        assert!(drained.is_err(), "the fake cannot be emptied");
        let receipt = Receipt::create(&t.path().join("receipts"), "stuck").unwrap();
        receipt
            .record(
                Scope::Job,
                What::Cgroup,
                Thing::Cgroup {
                    name: "stuck".into(),
                },
            )
            .unwrap();
        receipt
            .record(Scope::Job, What::JobDir, Thing::Tree { path: dir.clone() })
            .unwrap();
        let errors = remove_after_drain(&cg, drained, &receipt);
        assert!(dir.join("_work").is_dir(), "kept under a live process");
        assert!(!cg.removed.load(std::sync::atomic::Ordering::SeqCst));
        assert!(
            errors
                .iter()
                .any(|e| e.to_string().contains("kept") && e.to_string().contains("job")),
            "{errors:?}"
        );
        // Emptied: both go.
        let errors = remove_after_drain(&cg, Ok(()), &receipt);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!dir.exists());
        assert!(cg.removed.load(std::sync::atomic::Ordering::SeqCst));
    }

    // ---- phase order, against a fake cgroup and fake processes -------------------------

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    type Log = Arc<Mutex<Vec<String>>>;

    fn note(log: &Log, what: impl Into<String>) {
        log.lock().unwrap().push(what.into());
    }

    /// A job cgroup that records what is done to it. It is populated until killed (unless
    /// `stuck`), and notes at `rmdir` whether the job's directories still exist.
    #[derive(Debug)]
    struct FakeJob {
        name: String,
        log: Log,
        populated: AtomicBool,
        stuck: bool,
        work: PathBuf,
    }

    impl JobCgroup for FakeJob {
        fn name(&self) -> &str {
            &self.name
        }
        fn procs_files(&self) -> Vec<PathBuf> {
            Vec::new()
        }
        fn pids(&self) -> CgResult<Vec<i32>> {
            Ok(if self.populated.load(Ordering::SeqCst) {
                vec![i32::MAX]
            } else {
                Vec::new()
            })
        }
        fn signal(&self, sig: nix::sys::signal::Signal) -> CgResult<()> {
            note(&self.log, format!("signal {sig}"));
            Ok(())
        }
        fn stats(&self) -> CgResult<Stats> {
            note(&self.log, "stats");
            Ok(Stats::default())
        }
        fn memory_current(&self) -> Option<u64> {
            None
        }
        fn kill_all(&self) -> CgResult<()> {
            note(&self.log, "kill");
            if !self.stuck {
                self.populated.store(false, Ordering::SeqCst);
            }
            Ok(())
        }
        fn remove(&self) -> CgResult<()> {
            let dirs = std::fs::read_dir(&self.work).map_or(0, |d| d.count());
            note(&self.log, format!("rmdir ({dirs} job dirs left)"));
            Ok(())
        }
    }

    #[derive(Debug)]
    struct FakeManager {
        log: Log,
        stuck: bool,
        work: PathBuf,
    }

    impl CgroupManager for FakeManager {
        fn layout(&self) -> crate::cgroup::Layout {
            crate::cgroup::Layout::V2
        }
        fn create(&self, name: &str, _: &Limits) -> CgResult<Box<dyn JobCgroup>> {
            note(&self.log, "create cgroup");
            Ok(Box::new(FakeJob {
                name: name.to_owned(),
                log: self.log.clone(),
                populated: AtomicBool::new(true),
                stuck: self.stuck,
                work: self.work.clone(),
            }))
        }
        fn open(&self, name: &str) -> Box<dyn JobCgroup> {
            Box::new(FakeJob {
                name: name.to_owned(),
                log: self.log.clone(),
                populated: AtomicBool::new(false),
                stuck: false,
                work: self.work.clone(),
            })
        }
        fn list(&self) -> CgResult<Vec<String>> {
            Ok(Vec::new())
        }
        fn base_memory_limit(&self) -> Option<u64> {
            None
        }
    }

    /// How the fake job goes.
    #[derive(Clone, Copy)]
    enum Script {
        /// Starts and exits with this code at once.
        Exits(i32),
        /// The launch fails after the job's directory exists.
        LaunchFails,
        /// Starts and never exits.
        Hangs,
    }

    struct FakeProcesses {
        log: Log,
        script: Script,
        keep_exit: Mutex<Option<oneshot::Sender<Exit>>>,
    }

    impl Processes for FakeProcesses {
        fn reap(&self) {}
        fn on_reap(&self) -> Option<Arc<tokio::sync::Notify>> {
            None
        }
        fn spawner(&self) -> Arc<dyn Spawner> {
            Arc::new(crate::reaper::Unreaped)
        }
        async fn launch(
            &self,
            args: LaunchArgs<'_>,
            receipt: &Receipt,
        ) -> Result<Launched, EnvelopeError> {
            let dir = args.phys_work_root.join(args.job);
            receipt.record(Scope::Job, What::JobDir, Thing::Tree { path: dir.clone() })?;
            std::fs::create_dir_all(dir.join("_work")).map_err(io_at("create", &dir))?;
            note(&self.log, "launch");
            let (tx, rx) = oneshot::channel();
            match self.script {
                Script::Exits(code) => {
                    let _ = tx.send(Exit::Code(code));
                }
                Script::LaunchFails => {
                    return Err(EnvelopeError::Spawn(std::io::Error::other(
                        "the fake launch failed",
                    )))
                }
                Script::Hangs => *self.keep_exit.lock().unwrap() = Some(tx),
            }
            Ok(Launched::Running {
                pid: i32::MAX,
                exit: rx,
                output: Vec::new(),
            })
        }
    }

    struct Rig {
        _dir: tempfile::TempDir,
        cfg: Config,
        work: PathBuf,
        log: Log,
    }

    fn rig() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let text = format!(
            "[agent]\nstate_dir = \"{}\"\nteardown_grace = \"50ms\"\nteardown_deadline = \"2s\"\n\n[[lane]]\nname = \"fake\"\nmemory = \"64Mi\"\nmin_free = \"1Ki\"\nwork_root = \"{}\"\nnix = false\n",
            dir.path().join("state").display(),
            work.display()
        );
        let host = crate::config::HostFacts {
            memory_bytes: 8 << 30,
            cpus: 2,
        };
        let cfg = crate::config::parse(&text, &crate::config::Origin::Embedded, &host).unwrap();
        Rig {
            _dir: dir,
            cfg,
            work,
            log: Log::default(),
        }
    }

    fn spec(cfg: &Config) -> JobSpec {
        let lane = cfg.lanes[0].clone();
        JobSpec {
            memory_bytes: lane.memory_bytes,
            work_root: lane.work_root.clone(),
            lane,
            user: None,
            slot: None,
            slot_fallback: false,
            command: vec!["fake".into()],
            host_cpus: 2,
            runner: None,
            secret_env: Vec::new(),
            log_output: Some("fake".into()),
            stop_mode: StopMode::default(),
            probe: None,
            nix: None,
            hook: None,
            background: crate::tasks::Background::new(),
            before_release: None,
            bazel: None,
            receipt: None,
        }
    }

    fn run(r: &Rig, stuck: bool, script: Script) -> Result<JobOutcome, EnvelopeError> {
        run_spec(r, stuck, script, spec(&r.cfg))
    }

    fn run_spec(
        r: &Rig,
        stuck: bool,
        script: Script,
        sp: JobSpec,
    ) -> Result<JobOutcome, EnvelopeError> {
        let mgr = FakeManager {
            log: r.log.clone(),
            stuck,
            work: r.work.clone(),
        };
        let procs = FakeProcesses {
            log: r.log.clone(),
            script,
            keep_exit: Mutex::new(None),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_job_inner(
            &r.cfg,
            &mgr,
            sp,
            Stop::default(),
            &procs,
            tracing::Span::none(),
        ))
    }

    fn events(r: &Rig) -> Vec<String> {
        let mut v = r.log.lock().unwrap().clone();
        // The drain may look more than once; the order of the distinct steps is what counts.
        v.dedup();
        v
    }

    /// Set up, run, torn down: SIGTERM and the grace, kill, drain, counters, rmdir, and the
    /// job's directory last (still there at rmdir).
    const FULL_ORDER: [&str; 6] = [
        "create cgroup",
        "launch",
        "signal SIGTERM",
        "kill",
        "stats",
        "rmdir (1 job dirs left)",
    ];

    #[test]
    fn a_job_is_set_up_run_and_torn_down_in_the_documented_order() {
        let r = rig();
        let o = run(&r, false, Script::Exits(3)).unwrap();
        assert_eq!(o.code, 3);
        assert_eq!(
            events(&r),
            FULL_ORDER,
            "SIGTERM and grace, kill, drain, counters, rmdir, then the job's directory"
        );
        assert_eq!(
            std::fs::read_dir(&r.work).unwrap().count(),
            0,
            "directory removed last"
        );
    }

    #[derive(Debug)]
    struct Publishes(Log, PathBuf, Lane);

    impl BeforeRelease for Publishes {
        fn run(
            &self,
            _after: Released,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<String>> + Send + '_>>
        {
            Box::pin(async move {
                let held = slot::acquire(&self.1, &self.2, Some(0), false).is_err();
                note(&self.0, format!("before release (slot held: {held})"));
                Some("published".into())
            })
        }
    }

    /// A runner's leftover publication runs once the job is torn down (nothing of it still
    /// writes the store) and before the slot is collected or handed on: the last step of the
    /// envelope.
    #[test]
    fn work_before_release_runs_after_teardown_while_the_slot_is_still_held() {
        let r = rig();
        let mut sp = spec(&r.cfg);
        let lane = r.cfg.lanes[0].clone();
        sp.before_release = Some(Arc::new(Publishes(
            r.log.clone(),
            r.cfg.agent.state_dir.clone(),
            lane.clone(),
        )));
        run_spec(&r, false, Script::Exits(0), sp).unwrap();
        let mut want = FULL_ORDER.to_vec();
        want.push("before release (slot held: true)");
        assert_eq!(events(&r), want);
        // And the slot was given back after it: the next job gets it.
        let again = slot::acquire(&r.cfg.agent.state_dir, &lane, Some(0), false);
        assert!(again.is_ok(), "{again:?}");
    }

    #[test]
    fn a_launch_that_fails_after_the_cgroup_exists_is_still_torn_down() {
        let r = rig();
        let e = run(&r, false, Script::LaunchFails).unwrap_err();
        assert!(e.to_string().contains("fake launch failed"), "{e}");
        assert_eq!(events(&r), FULL_ORDER);
        assert_eq!(std::fs::read_dir(&r.work).unwrap().count(), 0);
    }

    fn receipts(r: &Rig) -> Vec<PathBuf> {
        std::fs::read_dir(crate::receipt::dir(&r.cfg.agent.state_dir))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    /// The job's receipt names its slot, cgroup and directory while it runs, and goes with its
    /// teardown; one that cannot be emptied keeps its receipt for the next start.
    #[test]
    fn a_jobs_receipt_lists_what_it_made_and_goes_with_its_teardown_unless_it_is_kept() {
        let r = rig();
        let receipt =
            Receipt::create(&crate::receipt::dir(&r.cfg.agent.state_dir), "fake").unwrap();
        let mut sp = spec(&r.cfg);
        sp.receipt = Some(receipt.clone());
        run_spec(&r, false, Script::Exits(0), sp).unwrap();
        assert!(receipt.entries().is_empty(), "{:?}", receipt.entries());
        drop(receipt);
        assert!(receipts(&r).is_empty(), "{:?}", receipts(&r));

        let r = rig();
        run(&r, true, Script::Exits(0)).unwrap_err();
        let kept = receipts(&r);
        assert_eq!(kept.len(), 1, "{kept:?}");
        let what: Vec<What> = Receipt::load(&kept[0])
            .unwrap()
            .entries()
            .iter()
            .map(|e| e.what)
            .collect();
        assert_eq!(what, [What::Slot, What::Cgroup, What::JobDir]);
    }

    #[test]
    fn a_job_that_cannot_be_emptied_keeps_its_cgroup_and_directory_within_the_deadline() {
        let r = rig();
        let t = Instant::now();
        let e = run(&r, true, Script::Exits(0)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(e.to_string().contains("kept"), "{e}");
        let ev = events(&r);
        assert!(!ev.iter().any(|e| e.starts_with("rmdir")), "{ev:?}");
        assert_eq!(std::fs::read_dir(&r.work).unwrap().count(), 1, "kept");
    }

    #[test]
    fn a_job_future_dropped_mid_run_is_torn_down_by_its_guard() {
        let r = rig();
        let mgr = FakeManager {
            log: r.log.clone(),
            stuck: false,
            work: r.work.clone(),
        };
        let procs = FakeProcesses {
            log: r.log.clone(),
            script: Script::Hangs,
            keep_exit: Mutex::new(None),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let job = run_job_inner(
                &r.cfg,
                &mgr,
                spec(&r.cfg),
                Stop::default(),
                &procs,
                tracing::Span::none(),
            );
            tokio::pin!(job);
            // Looked at while the job's future still exists: its guard tears down only once
            // the future is dropped (at the end of this block), on a thread of its own.
            let ended = tokio::time::timeout(Duration::from_millis(300), &mut job).await;
            assert!(ended.is_err(), "the job was still running when dropped");
            assert_eq!(
                events(&r),
                ["create cgroup", "launch"],
                "running, not torn down"
            );
        });
        let t = Instant::now();
        while !events(&r).iter().any(|e| e.starts_with("rmdir")) {
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", events(&r));
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            events(&r),
            ["create cgroup", "launch", "kill", "rmdir (1 job dirs left)"],
            "the guard's teardown: kill, drain, rmdir, then the directory"
        );
        while std::fs::read_dir(&r.work).unwrap().count() > 0 {
            assert!(t.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
