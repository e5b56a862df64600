//! A runner root: the runner installation's files bound read-only into the job directory,
//! and the `.env` root writes before the directory is handed to the job's user.

use std::io;
use std::path::{Path, PathBuf};

use super::{io_at, EnvelopeError, RunnerRoot};
use crate::workdir;

/// Make the runner root while it is still root's (mode 0700): `.env`, and empty mount points
/// for the installation's directories. Nothing here follows a symlink: the directory was just
/// created by root in a root-owned work root, and files are created exclusively.
pub(super) fn prepare_runner_root(
    root: &Path,
    r: &RunnerRoot,
) -> Result<Vec<(PathBuf, PathBuf)>, EnvelopeError> {
    let mut mounts = Vec::new();
    let entries = std::fs::read_dir(&r.install_dir)
        .map_err(io_at("read the runner installation", &r.install_dir))?;
    for entry in entries {
        let entry = entry.map_err(io_at("read the runner installation", &r.install_dir))?;
        let name = entry.file_name();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if !is_dir || name == "_work" || name == "_diag" || name == workdir::HOME {
            continue;
        }
        let point = root.join(&name);
        std::fs::create_dir(&point).map_err(io_at("create", &point))?;
        mounts.push((entry.path(), point));
    }
    if !mounts
        .iter()
        .any(|(src, _)| src.file_name().is_some_and(|n| n == "bin"))
    {
        return Err(EnvelopeError::Io {
            what: "find bin/Runner.Listener in",
            path: r.install_dir.clone(),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    }
    let mut dotenv = String::new();
    for (k, v) in &r.dotenv {
        dotenv.push_str(k);
        dotenv.push('=');
        dotenv.push_str(v);
        dotenv.push('\n');
    }
    let env_file = root.join(".env");
    workdir::write_new(&env_file, dotenv.as_bytes(), 0o644).map_err(io_at("write", &env_file))?;
    Ok(mounts)
}
