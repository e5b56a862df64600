//! The runner hooks' channel: a transport between a job's hooks and its lifecycle.
//!
//! Each runner's `.env` points `ACTIONS_RUNNER_HOOK_JOB_STARTED` / `…_COMPLETED` at root-owned
//! scripts that run `flywheel-agent hook job-started|job-completed` ([`client`], as the job's
//! user). Those talk to the agent over a per-runner unix socket ([`server`]): bound into the
//! runner's own mount namespace at a fixed path (every other runner's socket is under an empty
//! tmpfs there), answered only for processes of the runner's own job, and each op is answered
//! once — the job-started hook runs before any step of the job, so the job can neither ask
//! again nor ask for another runner.
//!
//! The server decides nothing about the job: a request becomes a [`HookEvent`] for the job's
//! lifecycle (`crate::job`), which decides trust, hands out credentials, publishes and writes
//! the summary, and the server writes back the answer it is given.

use std::path::{Path, PathBuf};

use flywheel_jit_config::Secret;
use serde::{Deserialize, Serialize};

use crate::trust::Claims;

pub mod client;
pub mod server;

pub use client::run_hook;
pub use server::{serve, RequestError};

/// What the hook sends.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HookRequest {
    pub op: String,
    pub repository: String,
    pub run_id: String,
    pub run_attempt: String,
    pub event_name: String,
    pub git_ref: String,
}

impl HookRequest {
    /// What the job claims, for the trust decision (never trusted on its own); the runner's
    /// name is the agent's.
    pub fn claims(&self, runner_name: &str) -> Claims {
        Claims {
            repository: self.repository.clone(),
            run_id: self.run_id.parse().unwrap_or(0),
            run_attempt: self.run_attempt.parse().unwrap_or(0),
            event_name: self.event_name.clone(),
            git_ref: self.git_ref.clone(),
            runner_name: runner_name.to_owned(),
        }
    }
}

/// What the agent answers. `attic_config` is a secret: the hook writes it to a 0600 file.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HookResponse {
    pub ok: bool,
    pub lines: Vec<String>,
    #[serde(with = "secret_text", default)]
    pub attic_config: Option<Secret<String>>,
    pub xdg_config_home: Option<String>,
    /// The job summary (Markdown) for `$GITHUB_STEP_SUMMARY`.
    #[serde(default)]
    pub summary: Option<String>,
    /// The hook exits non-zero, which fails the job (its store could not be opened).
    #[serde(default)]
    pub fail: bool,
}

impl HookResponse {
    /// A refusal: one line saying why, nothing else.
    pub fn refused(why: impl std::fmt::Display) -> HookResponse {
        HookResponse {
            ok: false,
            lines: vec![format!("flywheel: {why}")],
            ..HookResponse::default()
        }
    }
}

/// A secret on the hook's wire: the one place it is written out (to the job it belongs to).
mod secret_text {
    use flywheel_jit_config::Secret;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Secret<String>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(t) => s.serialize_some(t.expose()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Secret<String>>, D::Error> {
        Ok(Option::<String>::deserialize(d)?.map(Secret::new))
    }
}

/// A hook request the server accepted (from the job, the first of its op), for the job's
/// lifecycle to answer through `reply`. A reply never sent is answered as a refusal.
#[derive(Debug)]
pub enum HookEvent {
    /// `job-started`: what the job claims about its run (the runner's name is the agent's).
    Started {
        claims: Claims,
        reply: tokio::sync::oneshot::Sender<HookResponse>,
    },
    /// `job-completed` (only after `job-started`).
    Completed {
        reply: tokio::sync::oneshot::Sender<HookResponse>,
    },
}

/// Make the root-owned hook scripts the runners' `.env` points at.
pub fn write_hook_scripts(state_dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let dir = state_dir.join("hooks");
    std::fs::create_dir_all(&dir)?;
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let exe = std::env::current_exe()?;
    let mut paths = Vec::new();
    for op in ["job-started", "job-completed"] {
        let p = dir.join(format!("{op}.sh"));
        let tmp = dir.join(format!(".{op}.sh.tmp"));
        std::fs::write(&tmp, format!("#!/bin/sh\n# Written by flywheel-agent; runners cannot change it.\nexec '{}' hook {op}\n", exe.display()))?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::rename(&tmp, &p)?;
        paths.push(p);
    }
    Ok((paths[0].clone(), paths[1].clone()))
}

/// Where jobs find their hook socket, and where the per-runner socket directories live.
pub fn socket_seen(state_dir: &Path) -> PathBuf {
    state_dir.join("hook")
}

pub fn sockets_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("hook-sockets")
}
