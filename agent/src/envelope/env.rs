//! The job's environment: a fixed base, the lane's hints and what the lane names; nothing
//! else of the agent's own environment.

use std::ffi::OsString;
use std::path::Path;

use super::mounts::TMP;
use super::JobSpec;
use crate::hints;
use crate::jobuser::JobUser;

/// The job's environment: of the agent's only the fixed base and what the lane names
/// (`hints::passes_to_job`), plus the user's identity and private HOME, the lane's hints and
/// the job's own secret variables.
pub(super) fn job_environment(
    spec: &JobSpec,
    user: Option<&JobUser>,
    home: &Path,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| hints::passes_to_job(&k.to_string_lossy(), &spec.lane.pass_env))
        .collect();
    let mut set = |k: &str, v: OsString| {
        env.retain(|(n, _)| n != k);
        env.push((k.into(), v));
    };
    set("TMPDIR", TMP.into());
    if let Some(u) = user {
        // A fresh HOME in the job's directory: nothing an earlier job left in a home
        // (~/.config/nix, ~/.gitconfig) reaches this one.
        set("HOME", home.as_os_str().to_owned());
        set("USER", u.name.clone().into());
        set("LOGNAME", u.name.clone().into());
    }
    for (k, v) in hints::job_env(&spec.lane, spec.memory_bytes, spec.host_cpus) {
        set(&k, v.into());
    }
    if let Some(cache) = &spec.bazel {
        // The job's own endpoint, with its own first path segment.
        set("BAZEL_REMOTE_CACHE", cache.endpoint().into());
    }
    if let Some(n) = &spec.nix {
        set(
            "NIX_REMOTE",
            format!("unix://{}/socket", n.socket_seen.display()).into(),
        );
    }
    for (k, v) in &spec.secret_env {
        set(k, v.expose().clone().into());
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    if spec.nix.is_some() {
        // The job finds nix, nix-build, … of the pinned release first.
        let profile_bin = spec.lane.nix_store.join("var/nix/profiles/default/bin");
        for (k, v) in env.iter_mut().filter(|(k, _)| k == "PATH") {
            let _ = k;
            let mut p = profile_bin.clone().into_os_string();
            p.push(":");
            p.push(&*v);
            *v = p;
        }
    }
    env
}
