//! `flywheel-agent hook job-started|job-completed`: the one part of the agent that runs as the
//! job's user. It asks the agent over the runner's hook socket, prints the answer's lines into
//! the job's log, appends the summary to `$GITHUB_STEP_SUMMARY` and installs a push token's
//! attic client config where the answer says.

use std::path::Path;
use std::time::Duration;

use flywheel_jit_config::Secret;

use super::{HookRequest, HookResponse};

/// Run the hook `op` for the job whose environment this process has.
/// Fails the job only when the agent says so (its store could not be opened): without an
/// answer the job is read-only (and, on a Nix lane, has no store).
pub fn run_hook(op: &str) -> i32 {
    use std::io::{BufRead, BufReader, Write};
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let req = HookRequest {
        op: op.to_owned(),
        repository: env("GITHUB_REPOSITORY"),
        run_id: env("GITHUB_RUN_ID"),
        run_attempt: env("GITHUB_RUN_ATTEMPT"),
        event_name: env("GITHUB_EVENT_NAME"),
        git_ref: env("GITHUB_REF"),
    };
    let socket = env("FLYWHEEL_HOOK_SOCKET");
    let mut out = std::io::stdout().lock();
    let answer = (|| -> Result<HookResponse, String> {
        let mut s = std::os::unix::net::UnixStream::connect(&socket)
            .map_err(|e| format!("cannot reach the agent at {socket:?}: {e}"))?;
        // job-completed waits for the agent to publish what the job built.
        s.set_read_timeout(Some(Duration::from_secs(if op == "job-completed" {
            3600
        } else {
            60
        })))
        .map_err(|e| e.to_string())?;
        let body = serde_json::to_string(&req).map_err(|e| e.to_string())?;
        s.write_all(body.as_bytes())
            .and_then(|()| s.write_all(b"\n"))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| format!("the agent's answer: {e}"))
    })();
    let resp = match answer {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(out, "flywheel: {e}; this job is read-only");
            return 0;
        }
    };
    for l in &resp.lines {
        let _ = writeln!(out, "{l}");
    }
    if resp.fail {
        return 1;
    }
    if let (Some(md), Ok(file)) = (&resp.summary, std::env::var("GITHUB_STEP_SUMMARY")) {
        let written = std::fs::OpenOptions::new()
            .append(true)
            .open(&file)
            .and_then(|mut f| f.write_all(md.as_bytes()));
        if let Err(e) = written {
            let _ = writeln!(out, "flywheel: cannot write the job summary to {file}: {e}");
        }
    }
    if let (Some(cfg), Some(xdg)) = (resp.attic_config, &resp.xdg_config_home) {
        if let Err(e) = install_attic_config(Path::new(xdg), &cfg) {
            let _ = writeln!(
                out,
                "flywheel: cannot install the attic client config: {e}; this job is read-only"
            );
        }
    }
    0
}

fn install_attic_config(xdg: &Path, cfg: &Secret<String>) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = xdg.join("attic");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dir.join("config.toml"))?;
    f.write_all(cfg.expose().as_bytes())?;
    if let Ok(github_env) = std::env::var("GITHUB_ENV") {
        let mut e = std::fs::OpenOptions::new().append(true).open(github_env)?;
        writeln!(e, "XDG_CONFIG_HOME={}", xdg.display())?;
    }
    Ok(())
}
