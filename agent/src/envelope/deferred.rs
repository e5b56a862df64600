//! A runner job's store and nix-daemon, opened at its job-started hook once GitHub's answer
//! decided its trust (the runner runs no step before the hook returns): a trusted job's daemon
//! writes the shared warm store, any other job's a throwaway layer over it (`launch.rs`'s
//! `throwaway_layer`), and the job sees the same store through its view (`view.rs`). A job
//! whose hook never asks (its listener died first) never gets a store; its teardown removes
//! the view and what was named for it.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use tracing::info;

use super::daemon::{build_logs, daemon_ids, start_nix_daemon, DaemonPaths, DaemonStore};
use super::launch::{shares_pool, store_mount, throwaway_layer, userpool_mount};
use super::mounts::Mount;
use super::view::{
    self, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY,
};
use super::{EnvelopeError, NixJob};
use crate::cgroup::JobCgroup;
use crate::jobuser::JobUser;
use crate::reaper::Reaper;
use crate::receipt::{Receipt, Scope, Thing, What};

/// Everything the job's daemon needs, prepared at launch.
#[derive(Debug)]
pub(super) struct DeferredStore {
    pub nix: NixJob,
    pub owner: Option<JobUser>,
    /// The job's own mounts (a slot's store bound at the store's path among them).
    pub daemon_mounts: Vec<Mount>,
    pub job: String,
    /// The slot's lock, which the daemon holds while it lives.
    pub hold: Option<i32>,
    pub reaper: Reaper,
    pub span: tracing::Span,
    pub bg: crate::tasks::Background,
    /// The job's network namespace (a descriptor of the agent's own).
    pub netns: Option<OwnedFd>,
    pub phys_nix: PathBuf,
    /// The agent's mount point the job sees its store through.
    pub view: PathBuf,
    /// Where the layer goes if the job is not trusted.
    pub layer: PathBuf,
    pub paths: DaemonPaths,
    /// The job's receipt: the layer and the view's mounts are recorded before they are made.
    pub receipt: Receipt,
}

/// What opening the store did: a line for the job's setup block, and the store as the agent
/// sees it (the layer's merged directory for an untrusted job).
#[derive(Debug)]
pub(super) struct Opened {
    pub line: String,
    pub root: PathBuf,
}

impl DeferredStore {
    /// Open the job's store (`trusted`: the shared one; else a throwaway layer), start its
    /// daemon on it, then show the job the store with the daemon's socket and build logs.
    pub(super) async fn open(
        self,
        cg: &dyn JobCgroup,
        trusted: bool,
    ) -> Result<Opened, EnvelopeError> {
        let n = &self.nix;
        let mut mounts = self.daemon_mounts.clone();
        let ids = daemon_ids(
            n,
            self.owner.as_ref(),
            &self.reaper,
            &self.phys_nix,
            &self.receipt,
        )?;
        let root = if trusted {
            self.phys_nix.clone()
        } else {
            self.receipt.record(
                Scope::Job,
                What::Layer,
                Thing::Tree {
                    path: self.layer.clone(),
                },
            )?;
            let merged = throwaway_layer(&self.phys_nix, &self.layer, ids.as_ref()).await?;
            store_mount(&mut mounts, merged.clone(), &n.store_seen);
            merged
        };
        if shares_pool(!trusted, ids.as_ref()) {
            mounts.push(userpool_mount(n)?);
        }
        let dir = start_nix_daemon(
            n,
            self.owner.as_ref(),
            cg,
            &mounts,
            &self.job,
            self.hold,
            &self.reaper,
            &self.span,
            &self.bg,
            &self.paths,
            self.netns.as_ref().map(|f| f.as_raw_fd()),
            DaemonStore {
                layer: !trusted,
                ids,
            },
        )
        .await?;
        let rel = |seen: &Path| {
            seen.strip_prefix(&n.store_seen)
                .unwrap_or(seen)
                .to_path_buf()
        };
        let plain = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        // Detached before the layer below them is removed.
        self.receipt.record(
            Scope::Job,
            What::ViewMounts,
            Thing::Mounts {
                path: self.view.clone(),
            },
        )?;
        view::attach_at(&root, &self.view, Path::new(""), plain)?;
        view::attach_at(
            &dir,
            &self.view,
            &rel(&n.socket_seen),
            plain | MOUNT_ATTR_NOEXEC,
        )?;
        // `nix log` in the job reads its own daemon's logs, and no neighbour's.
        view::attach_at(
            &build_logs(n, &self.job),
            &self.view,
            &rel(&n.store_seen.join("var/log/nix")),
            plain | MOUNT_ATTR_NOEXEC | MOUNT_ATTR_RDONLY,
        )?;
        let line = if trusted {
            "store: trusted: this job's nix-daemon writes the shared warm store".to_owned()
        } else {
            "store: not trusted to publish: this job reads the warm store, and its nix-daemon writes only a layer of its own, discarded when the job ends".to_owned()
        };
        info!(parent: &self.span, trusted, store = %root.display(), "the job's store is open");
        Ok(Opened { line, root })
    }
}
