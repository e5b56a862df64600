//! `flywheel-agent run` against the fake GitHub and the fake listener: a config with lanes, the
//! installation, the agent's log, waits with the fake's state shown on a timeout.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use fake_github::{app_key, FakeGitHub, FakeJob, APP_ID};

use super::{fake_listener, unique, AGENT};

/// The HS256 secret of the tests' Attic signing key.
pub fn hs256_secret() -> Vec<u8> {
    (100u8..148).collect()
}

pub struct Rig {
    pub gh: FakeGitHub,
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub config: PathBuf,
    pub lanes: Vec<String>,
    /// Agents started by this rig: killed when the rig goes (a failed test included), so none
    /// outlives its test.
    started: std::cell::RefCell<Vec<u32>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let config = self.config.display().to_string();
        for pid in self.started.borrow().iter() {
            // Only if that pid is still this rig's agent (not reaped and reused).
            let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&config))
                .unwrap_or(false);
            if ours {
                if let Ok(pid) = i32::try_from(*pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

impl Rig {
    /// Lanes: (suffix, memory, max_runners).
    pub fn new(lanes: &[(&str, &str, u32)], drain_grace: &str) -> Rig {
        let gh = FakeGitHub::start();
        let dir = super::open_tempdir("flywheel-run");
        let prefix = unique("fw").replace('-', "x");
        let install = dir.path().join("install");
        std::fs::create_dir_all(install.join("bin")).expect("mkdir");
        std::fs::create_dir_all(install.join("externals/node20/bin")).expect("mkdir");
        std::fs::copy(fake_listener(), install.join("bin/Runner.Listener"))
            .expect("install listener");
        std::fs::write(install.join("externals/node20/bin/node"), "#!/bin/sh\n").expect("write");
        std::fs::write(install.join("run.sh"), "#!/bin/sh\n").expect("write");
        let key = dir.path().join("app.pem");
        std::fs::write(&key, app_key().0).expect("key");
        let mut text = format!(
            r#"[agent]
state_dir = "{state}"
teardown_grace = "300ms"
stop_grace = "2s"
reserve = "64Mi"

[metrics]
listen = "127.0.0.1:0"

[github]
api_url = "{url}"
scope = "org"
target = "tinyland"
app_id = "{APP_ID}"
private_key_file = "{key}"
runner_group_id = 1

[runner]
install_dir = "{install}"
user = "{user}"
name_prefix = "{prefix}"
drain_grace = "{drain_grace}"
backoff = "100ms"
"#,
            state = dir.path().join("state").display(),
            url = gh.url,
            key = key.display(),
            install = install.display(),
            user = super::runner_pool(),
        );
        let mut names = Vec::new();
        for (suffix, memory, max) in lanes {
            let name = format!("{prefix}-{suffix}");
            text.push_str(&format!(
                "\n[[lane]]\nname = \"{name}\"\nlabels = [\"{name}\"]\nmemory = \"{memory}\"\nmax_runners = {max}\npids_max = 1024\nmin_free = \"1Mi\"\nnix = false\nnetwork = \"host\"\nwork_root = \"{}\"\n",
                dir.path().join("work").join(suffix).display()
            ));
            names.push(name);
        }
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, text).expect("config");
        Rig {
            gh,
            dir,
            prefix,
            config,
            lanes: names,
            started: std::cell::RefCell::default(),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Start `run`; its output goes to `agent.log` (appended), shown when a wait times out.
    pub fn start(&self) -> Child {
        self.start_with(&[])
    }

    pub fn start_with(&self, env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log");
        let child = Command::new(AGENT)
            .args(["run", "--config"])
            .arg(&self.config)
            .envs(env.iter().copied())
            .env("FLYWHEEL_LOG", "info")
            .env("FLYWHEEL_LOG_FORMAT", "text")
            .env_remove("ACTIONS_RUNNER_INPUT_JITCONFIG")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start agent");
        self.started.borrow_mut().push(child.id());
        child
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn job(&self, lane: usize, script: &str) -> FakeJob {
        fake_job(&self.lanes[lane], script)
    }

    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&fake_github::State) -> bool,
    ) {
        let t = Instant::now();
        loop {
            if self.gh.with(|s| f(s)) {
                return;
            }
            if t.elapsed() > timeout {
                let state = self.gh.with(|s| {
                    format!(
                        "runners={:?}\ncompleted={:?}\ncalls={:?}",
                        s.runners,
                        s.completed,
                        s.calls
                            .iter()
                            .map(|c| (c.endpoint, c.status))
                            .collect::<Vec<_>>()
                    )
                });
                panic!(
                    "timed out waiting for {what}\n{state}\n--- agent log ---\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn leftovers(&self) -> (Vec<String>, Vec<PathBuf>) {
        let mgr =
            flywheel_agent::cgroup::detect(Path::new("/sys/fs/cgroup"), None).expect("detect");
        let cgroups: Vec<String> = mgr
            .list()
            .expect("list")
            .into_iter()
            .filter(|n| self.lanes.iter().any(|l| n.starts_with(&format!("{l}."))))
            .collect();
        let mut dirs = Vec::new();
        for entry in std::fs::read_dir(self.dir.path().join("work"))
            .into_iter()
            .flatten()
            .flatten()
        {
            dirs.extend(
                std::fs::read_dir(entry.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        }
        (cgroups, dirs)
    }
}

/// A job for runners of `label`: run 1001 of tinyland/flywheel, running SCRIPT.
pub fn fake_job(label: &str, script: &str) -> FakeJob {
    FakeJob {
        labels: vec![label.to_owned()],
        script: script.into(),
        env: [
            ("GITHUB_REPOSITORY", "tinyland/flywheel"),
            ("GITHUB_RUN_ID", "1001"),
            ("GITHUB_RUN_ATTEMPT", "1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..FakeJob::default()
    }
}

pub fn term(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal");
}

pub fn wait_exit(rig: &Rig, mut child: Child, timeout: Duration) -> (i32, String) {
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return (st.code().unwrap_or(-1), rig.log());
        }
        if t.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("agent did not exit in time:\n{}", rig.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Rig {
    /// Give the rig's lane an Attic cache and the agent the HS256 signing key, publishing for
    /// `tinyland/flywheel`; `extra` goes into `[attic]`.
    pub fn with_attic(&self, server: &str, extra: &str) {
        use base64::Engine;
        let key = self.dir.path().join("attic-hs256.b64");
        std::fs::write(
            &key,
            base64::engine::general_purpose::STANDARD.encode(hs256_secret()),
        )
        .expect("key");
        let cfg = std::fs::read_to_string(&self.config).expect("config");
        std::fs::write(
            &self.config,
            format!(
                "{cfg}[lane.hints]\nattic_server = \"{server}\"\nattic_cache = \"tinyland\"\n\n[attic]\nsigning_key_file = \"{}\"\npublish_repositories = [\"tinyland/flywheel\"]\n{extra}",
                key.display()
            ),
        )
        .expect("config");
    }

    /// See [`push_and_fork_pr_runs`].
    pub fn push_and_fork_pr_runs(&self) {
        push_and_fork_pr_runs(&self.gh);
    }
}

/// GitHub's side of two runs of `tinyland/flywheel`: 101, a push to main (its commit the head
/// of main), and 102, a pull request from a fork.
pub fn push_and_fork_pr_runs(gh: &FakeGitHub) {
    gh.push_and_fork_pr_runs();
}

/// Make `job` run 101 of [`push_and_fork_pr_runs`]: the push to main.
pub fn as_push(job: &mut FakeJob) {
    for (k, v) in [
        ("GITHUB_RUN_ID", "101"),
        ("GITHUB_EVENT_NAME", "push"),
        ("GITHUB_REF", "refs/heads/main"),
    ] {
        job.env.insert(k.into(), v.into());
    }
}

/// Make `job` run 102 of [`push_and_fork_pr_runs`]: the pull request from a fork.
pub fn as_fork_pr(job: &mut FakeJob) {
    for (k, v) in [
        ("GITHUB_RUN_ID", "102"),
        ("GITHUB_EVENT_NAME", "pull_request"),
        ("GITHUB_REF", "refs/pull/5/merge"),
    ] {
        job.env.insert(k.into(), v.into());
    }
}

/// Register a runner the way ARC's controller does, returning the encoded JIT config.
pub fn register_directly(gh: &FakeGitHub, label: &str, name: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let c = flywheel_jit_config::Client::new(flywheel_jit_config::ClientConfig {
            api_url: gh.url.clone(),
            scope: flywheel_jit_config::Scope::Org("tinyland".into()),
            credentials: flywheel_jit_config::Credentials::App {
                app_id: APP_ID.into(),
                private_key_pem: flywheel_jit_config::Secret::new(app_key().0),
                installation_id: None,
            },
            user_agent: "arc-controller".into(),
            retry: flywheel_jit_config::RetryPolicy::default(),
        })
        .expect("client");
        let r = c
            .generate_jitconfig(name, 1, &[label.to_owned()], "_work")
            .await
            .expect("register");
        r.encoded.expose().clone()
    })
}
