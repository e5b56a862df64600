//! A fake `Runner.Listener` for flywheel-agent's tests. At the process level it behaves like the
//! real one (actions/runner):
//!
//! - its root is the parent of the directory holding the executable (`<root>/bin/…`);
//! - it takes the JIT config from `ACTIONS_RUNNER_INPUT_JITCONFIG` (or `run --jitconfig X`),
//!   removes the variable from its environment, and writes the decoded files (`.runner`,
//!   `.credentials`, …) into its root; without one it exits 1 (not configured);
//! - it reads `<root>/.env` (`KEY=VALUE`, split at the first `=`);
//! - for its one job it runs `ACTIONS_RUNNER_HOOK_JOB_STARTED` (`bash -e FILE`), the job, then
//!   `ACTIONS_RUNNER_HOOK_JOB_COMPLETED`, with the `GITHUB_*` variables of the job; a failing
//!   started hook fails the job; values the hook writes to `GITHUB_ENV` reach the job;
//! - SIGINT/SIGTERM cancel the job ("The runner has received a shutdown signal") and exit 0;
//! - an ephemeral runner deletes its local config after its job and exits.
//!
//! What GitHub would assign it comes from the fake GitHub server, inside `.runner`:
//! `"FakeJob": {"script": "...", "listener_exit": 0, "env": {"GITHUB_REPOSITORY": ...},
//! "delay_ms": 0}`. Without `FakeJob` the runner idles until signalled. The fake server is told
//! `busy` and `done` at `<ServerUrl>/_fake/runners/<AgentId>/{busy,done}`.
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn die(code: u8, msg: &str) -> ExitCode {
    eprintln!("{msg}");
    ExitCode::from(code)
}

fn post(server: &str, path: &str, body: &str) {
    let Some(rest) = server.strip_prefix("http://") else {
        return;
    };
    let hostport = rest.split('/').next().unwrap_or(rest);
    let Ok(mut s) = std::net::TcpStream::connect(hostport) else {
        return;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {hostport}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(req.as_bytes());
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

fn read_env_file(path: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some((k, delim)) = line.split_once("<<") {
            let mut v = Vec::new();
            for l in lines.by_ref() {
                if l == delim {
                    break;
                }
                v.push(l);
            }
            out.push((k.to_owned(), v.join("\n")));
        } else if let Some((k, v)) = line.split_once('=') {
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    out
}

/// Run a command, cancelling it (SIGTERM, then SIGKILL) when the listener is signalled.
fn run_cancellable(mut cmd: Command) -> Option<i32> {
    let Ok(mut child) = cmd.spawn() else {
        return Some(127);
    };
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st.code().unwrap_or(128 + 9));
        }
        if STOP.load(Ordering::SeqCst) {
            println!("The runner has received a shutdown signal. This can happen when the runner service is stopped, or a manually started runner is canceled.");
            // SAFETY: plain kill(2).
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(2) {
                if let Ok(Some(_)) = child.try_wait() {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn hook(var: &str, env: &BTreeMap<String, String>, cwd: &Path, summary: &Path) -> Option<i32> {
    let file = env.get(var).cloned().or_else(|| std::env::var(var).ok())?;
    println!("##[group]Run '{file}'");
    let _ = std::fs::write(summary, "");
    let mut c = Command::new("bash");
    c.arg("-e")
        .arg(&file)
        .envs(env)
        .env("GITHUB_STEP_SUMMARY", summary)
        .current_dir(cwd);
    let t = Instant::now();
    let code = run_cancellable(c);
    // Not the real runner's output: the benches read the hook's time from it.
    println!(
        "fake-runner: hook {var} took {:.1} ms",
        t.elapsed().as_secs_f64() * 1000.0
    );
    println!("##[endgroup]");
    Some(code.unwrap_or(1))
}

fn main() -> ExitCode {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let args: Vec<String> = std::env::args().collect();
    let from_arg = args
        .iter()
        .position(|a| a == "--jitconfig")
        .and_then(|i| args.get(i + 1).cloned());
    let Some(jit) = std::env::var("ACTIONS_RUNNER_INPUT_JITCONFIG")
        .ok()
        .or(from_arg)
    else {
        return die(
            1,
            "Not configured. Run config.(sh/cmd) to configure the runner.",
        );
    };
    std::env::remove_var("ACTIONS_RUNNER_INPUT_JITCONFIG");
    let Ok(exe) = std::env::current_exe() else {
        return die(1, "cannot find myself");
    };
    let root: PathBuf = match exe.parent().and_then(Path::parent) {
        Some(r) => r.to_path_buf(),
        None => return die(1, "no root"),
    };

    let b64 = base64::engine::general_purpose::STANDARD;
    let Ok(json) = b64.decode(jit.trim()) else {
        return die(1, "invalid jitconfig");
    };
    let Ok(serde_json::Value::Object(files)) = serde_json::from_slice(&json) else {
        return die(1, "invalid jitconfig");
    };
    for (name, v) in &files {
        let Some(bytes) = v.as_str().and_then(|s| b64.decode(s).ok()) else {
            return die(1, "invalid jitconfig file");
        };
        let path = root.join(name);
        if std::fs::write(&path, bytes).is_err() {
            return die(1, &format!("cannot write {}", path.display()));
        }
        let _ =
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
    }
    let runner: serde_json::Value = std::fs::read_to_string(root.join(".runner"))
        .ok()
        .and_then(|s| serde_json::from_str(s.trim_start_matches('\u{feff}')).ok())
        .unwrap_or_default();
    let server = runner["ServerUrl"].as_str().unwrap_or_default().to_owned();
    let id = runner["AgentId"].as_u64().unwrap_or(0);
    let name = runner["AgentName"].as_str().unwrap_or_default().to_owned();
    for (k, v) in read_env_file(&root.join(".env")) {
        std::env::set_var(k, v);
    }
    println!("√ Connected to GitHub");
    println!("Current runner version: '2.321.0-fake'");
    println!("Listening for Jobs");

    let job = &runner["FakeJob"];
    if job.is_null() {
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("Exiting...");
        return ExitCode::SUCCESS;
    }
    let delay = Duration::from_millis(job["delay_ms"].as_u64().unwrap_or(0));
    let t = Instant::now();
    while t.elapsed() < delay {
        if STOP.load(Ordering::SeqCst) {
            println!("Exiting...");
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    post(&server, &format!("/_fake/runners/{id}/busy"), "{}");
    println!("Running job: {}", job["name"].as_str().unwrap_or("build"));

    let work = root.join(runner["WorkFolder"].as_str().unwrap_or("_work"));
    let mut env: BTreeMap<String, String> = job["env"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let repo = env
        .get("GITHUB_REPOSITORY")
        .cloned()
        .unwrap_or_else(|| "o/r".into());
    let repo_name = repo.rsplit('/').next().unwrap_or("r").to_owned();
    let workspace = work.join(&repo_name).join(&repo_name);
    let temp = work.join("_temp");
    let _ = std::fs::create_dir_all(&workspace);
    let _ = std::fs::create_dir_all(&temp);
    let github_env = temp.join("github_env_started");
    let _ = std::fs::write(&github_env, "");
    env.insert("GITHUB_WORKSPACE".into(), workspace.display().to_string());
    env.insert("GITHUB_ENV".into(), github_env.display().to_string());
    env.insert("RUNNER_NAME".into(), name);
    env.insert("RUNNER_TEMP".into(), temp.display().to_string());
    env.insert("GITHUB_ACTIONS".into(), "true".into());
    env.insert("CI".into(), "true".into());

    let mut result = 0;
    let mut cancelled = false;
    // Each step (a hook too) gets a summary file of its own; the runner uploads them after the
    // step, and GitHub shows them on the run's page.
    let summaries = [
        temp.join("summary_started"),
        temp.join("summary_job"),
        temp.join("summary_completed"),
    ];
    if let Some(code) = hook(
        "ACTIONS_RUNNER_HOOK_JOB_STARTED",
        &env,
        &workspace,
        &summaries[0],
    ) {
        if code != 0 {
            println!("##[error]Process completed with exit code {code}.");
            result = code;
        }
    }
    if result == 0 && !STOP.load(Ordering::SeqCst) {
        let mut job_env = env.clone();
        job_env.extend(read_env_file(&github_env));
        let _ = std::fs::write(&summaries[1], "");
        let mut c = Command::new("bash");
        c.arg("-e")
            .arg("-c")
            .arg(job["script"].as_str().unwrap_or("true"))
            .envs(&job_env)
            .env("GITHUB_STEP_SUMMARY", &summaries[1])
            .current_dir(&workspace);
        match run_cancellable(c) {
            Some(code) => result = code,
            None => cancelled = true,
        }
    }
    if !cancelled {
        let mut done_env = env.clone();
        let completed_env = temp.join("github_env_completed");
        let _ = std::fs::write(&completed_env, "");
        done_env.insert("GITHUB_ENV".into(), completed_env.display().to_string());
        let _ = hook(
            "ACTIONS_RUNNER_HOOK_JOB_COMPLETED",
            &done_env,
            &workspace,
            &summaries[2],
        );
    }
    let verdict = if cancelled {
        "cancelled"
    } else if result == 0 {
        "succeeded"
    } else {
        "failed"
    };
    println!("Job build completed with result: {verdict}");
    let summary: String = summaries
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect();
    post(
        &server,
        &format!("/_fake/runners/{id}/done"),
        &serde_json::json!({"result": verdict, "exit": result, "summary": summary}).to_string(),
    );
    for f in files.keys() {
        let _ = std::fs::remove_file(root.join(f));
    }
    let code = job["listener_exit"].as_u64().unwrap_or(0);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
