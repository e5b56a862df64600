//! Runtime hints a job finds in its environment: `ATTIC_SERVER`, `ATTIC_CACHE`,
//! `BAZEL_REMOTE_CACHE`, `NIX_CONFIG`, `FLYWHEEL_LANE`, `FLYWHEEL_MEMORY_LIMIT`.
//!
//! Rendering is a pure function of the lane, the envelope and the host's CPUs: identical inputs
//! give identical bytes. No secret is ever part of a hint.

use crate::config::{is_secret_var, Lane};

/// Parallelism derived for Nix from the envelope and the CPU share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parallelism {
    pub max_jobs: u32,
    pub cores: u32,
}

/// `max-jobs` = how many builds of `memory_per_build` fit the envelope, at least 1, at most the
/// CPUs; `cores` = the CPUs shared out between those builds, at least 1.
pub fn parallelism(lane: &Lane, memory_bytes: u64, host_cpus: u32) -> Parallelism {
    let cpus = lane.cpus.unwrap_or(host_cpus).max(1);
    let fit = memory_bytes / lane.memory_per_build_bytes.max(1);
    let max_jobs = u32::try_from(fit).unwrap_or(u32::MAX).clamp(1, cpus);
    Parallelism {
        max_jobs,
        cores: (cpus / max_jobs).max(1),
    }
}

/// The Attic cache URL a lane substitutes from, when both server and cache are configured.
pub fn attic_cache_url(lane: &Lane) -> Option<String> {
    let server = lane.hints.attic_server.as_deref()?;
    let cache = lane.hints.attic_cache.as_deref()?;
    Some(format!("{}/{}", server.trim_end_matches('/'), cache))
}

/// The `NIX_CONFIG` value for a job of `lane` with envelope `memory_bytes`.
pub fn nix_config(lane: &Lane, memory_bytes: u64, host_cpus: u32) -> String {
    let p = parallelism(lane, memory_bytes, host_cpus);
    let mut out = String::new();
    if let Some(url) = attic_cache_url(lane) {
        out.push_str(&format!("extra-substituters = {url}\n"));
    }
    if let Some(key) = &lane.hints.attic_public_key {
        out.push_str(&format!("extra-trusted-public-keys = {key}\n"));
    }
    out.push_str(&format!("max-jobs = {}\ncores = {}\n", p.max_jobs, p.cores));
    if let Some(extra) = &lane.hints.nix_extra_conf {
        for line in extra.lines().map(str::trim).filter(|l| !l.is_empty()) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// All hint variables for a job, in a fixed order. Unconfigured hints are absent.
pub fn job_env(lane: &Lane, memory_bytes: u64, host_cpus: u32) -> Vec<(String, String)> {
    let mut env = vec![
        ("FLYWHEEL_LANE".to_owned(), lane.name.clone()),
        ("FLYWHEEL_MEMORY_LIMIT".to_owned(), memory_bytes.to_string()),
    ];
    if let Some(s) = &lane.hints.attic_server {
        env.push(("ATTIC_SERVER".to_owned(), s.clone()));
    }
    if let Some(c) = &lane.hints.attic_cache {
        env.push(("ATTIC_CACHE".to_owned(), c.clone()));
    }
    // With `[lane.bazel]` the hint is the job's own endpoint (its token in the path), which
    // only the job's envelope knows (`envelope::env`); a lane's plain hint otherwise.
    if lane.bazel.is_none() {
        if let Some(b) = &lane.hints.bazel_remote_cache {
            env.push(("BAZEL_REMOTE_CACHE".to_owned(), b.clone()));
        }
    }
    env.push((
        "NIX_CONFIG".to_owned(),
        nix_config(lane, memory_bytes, host_cpus),
    ));
    env
}

/// Whether a variable of the agent's environment passes into a job's: a fixed base (the search
/// path, the locale, the time zone, the terminal type) and what the lane names in `pass_env`.
/// Everything else — secrets, the agent's own settings, whatever a unit or a pod spec adds —
/// stays out.
pub fn passes_to_job(name: &str, pass_env: &[String]) -> bool {
    !is_secret_var(name)
        && (matches!(name, "PATH" | "LANG" | "LANGUAGE" | "TZ" | "TERM")
            || name.starts_with("LC_")
            || pass_env.iter().any(|p| p == name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse, HostFacts, Origin};

    #[test]
    fn only_the_base_and_what_the_lane_names_reach_a_job() {
        let pass = vec!["HTTPS_PROXY".to_owned()];
        for ok in ["PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "HTTPS_PROXY"] {
            assert!(passes_to_job(ok, &pass), "{ok}");
        }
        for no in [
            "AWS_SECRET_ACCESS_KEY",
            "KUBERNETES_SERVICE_HOST",
            "HTTP_PROXY",
            "FLYWHEEL_CONFIG",
            "ACTIONS_RUNNER_INPUT_JITCONFIG",
            "GITHUB_TOKEN",
            "NIX_REMOTE",
            "XDG_CONFIG_HOME",
        ] {
            assert!(!passes_to_job(no, &pass), "{no}");
        }
        assert!(!passes_to_job("GITHUB_TOKEN", &["GITHUB_TOKEN".to_owned()]));
    }

    fn lane(extra: &str) -> Lane {
        let src = format!("[[lane]]\nname = \"l\"\nmemory = \"8Gi\"\n{extra}");
        let host = HostFacts {
            memory_bytes: 1 << 40,
            cpus: 8,
        };
        parse(&src, &Origin::Embedded, &host)
            .expect("parses")
            .lanes
            .remove(0)
    }

    #[test]
    fn parallelism_from_envelope_and_cpus() {
        let l = lane("");
        assert_eq!(
            parallelism(&l, 8 << 30, 2),
            Parallelism {
                max_jobs: 2,
                cores: 1
            }
        );
        assert_eq!(
            parallelism(&l, 8 << 30, 32),
            Parallelism {
                max_jobs: 4,
                cores: 8
            }
        );
        assert_eq!(
            parallelism(&l, 512 << 20, 32),
            Parallelism {
                max_jobs: 1,
                cores: 32
            }
        );
        let pinned = lane("cpus = 6\nmemory_per_build = \"4Gi\"\n");
        assert_eq!(
            parallelism(&pinned, 64 << 30, 128),
            Parallelism {
                max_jobs: 6,
                cores: 1
            }
        );
        assert_eq!(
            parallelism(&pinned, 8 << 30, 128),
            Parallelism {
                max_jobs: 2,
                cores: 3
            }
        );
    }

    #[test]
    fn nix_config_full_and_stable() {
        let l = lane(
            "[lane.hints]\nattic_server = \"https://attic.example/\"\nattic_cache = \"main\"\nattic_public_key = \"main:AAAA\"\nnix_extra_conf = \"fallback = true\\n\\n  connect-timeout = 5\\n\"\n",
        );
        let a = nix_config(&l, 8 << 30, 16);
        assert_eq!(
            a,
            "extra-substituters = https://attic.example/main\nextra-trusted-public-keys = main:AAAA\nmax-jobs = 4\ncores = 4\nfallback = true\nconnect-timeout = 5\n"
        );
        assert_eq!(a.as_bytes(), nix_config(&l, 8 << 30, 16).as_bytes());
    }

    #[test]
    fn unconfigured_hints_are_absent() {
        let env = job_env(&lane(""), 8 << 30, 2);
        let names: Vec<&str> = env.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            vec!["FLYWHEEL_LANE", "FLYWHEEL_MEMORY_LIMIT", "NIX_CONFIG"]
        );
        assert_eq!(env[1].1, (8u64 << 30).to_string());
        assert_eq!(env[2].1, "max-jobs = 2\ncores = 1\n");
    }

    #[test]
    fn configured_hints_are_present() {
        let l = lane("[lane.hints]\nattic_server = \"http://127.0.0.1:8080\"\nattic_cache = \"c\"\nbazel_remote_cache = \"grpc://127.0.0.1:9092\"\n");
        let env = job_env(&l, 1 << 30, 2);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("ATTIC_SERVER"), Some("http://127.0.0.1:8080"));
        assert_eq!(get("ATTIC_CACHE"), Some("c"));
        assert_eq!(get("BAZEL_REMOTE_CACHE"), Some("grpc://127.0.0.1:9092"));
        assert!(get("NIX_CONFIG")
            .is_some_and(|v| v.starts_with("extra-substituters = http://127.0.0.1:8080/c\n")));
    }

    #[test]
    fn secret_vars() {
        assert!(is_secret_var("ACTIONS_RUNNER_INPUT_JITCONFIG"));
        assert!(is_secret_var("FLYWHEEL_CONFIG"));
        assert!(is_secret_var("ATTIC_TOKEN"));
        // The agent's own Nix store settings never reach a job: a job gets its own daemon.
        assert!(is_secret_var("NIX_REMOTE"));
        assert!(is_secret_var("NIX_DAEMON_SOCKET_PATH"));
        assert!(!is_secret_var("PATH"));
    }
}
