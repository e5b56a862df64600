//! The deploy surfaces as artefacts: the systemd unit, the example config, the ARC Helm values
//! and lane configs, the Containerfile (linted with hadolint, checked for what it must
//! contain). Built and run for real: the image in tests/container.rs, the unit under systemd
//! in tests/sting.rs.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use flywheel_agent::config::{parse, HostFacts, Origin};
use flywheel_agent::size::{parse_duration, parse_size};

const AGENT: &str = env!("CARGO_BIN_EXE_flywheel-agent");
const BIG_HOST: HostFacts = HostFacts {
    memory_bytes: 1 << 40,
    cpus: 64,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is missing and CI must not skip this test"
        );
        eprintln!("SKIP: {name} is not installed");
    }
    found
}

fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} missing"))
}

fn systemd_duration(v: &str) -> Duration {
    let v = v.trim();
    if let Some(m) = v.strip_suffix("min") {
        return Duration::from_secs(m.parse::<u64>().unwrap() * 60);
    }
    parse_duration(v).unwrap()
}

#[test]
fn the_systemd_unit_verifies_and_fits_the_drain() {
    let unit = read("systemd/flywheel-agent.service");
    assert_eq!(unit_value(&unit, "Type"), "notify");
    assert_eq!(unit_value(&unit, "Delegate"), "yes");
    assert_eq!(unit_value(&unit, "KillMode"), "mixed");
    assert_eq!(unit_value(&unit, "RestartPreventExitStatus"), "78");
    let cfg = parse(
        &read("systemd/agent.toml.example"),
        &Origin::File("agent.toml.example".into()),
        &BIG_HOST,
    )
    .expect("the example config is valid");
    let stop = systemd_duration(unit_value(&unit, "TimeoutStopSec"));
    assert!(
        stop > cfg.runner.drain_grace + cfg.agent.stop_grace,
        "TimeoutStopSec {stop:?} must exceed the drain"
    );
    assert!(cfg.github.is_some() && cfg.lanes.len() == 3);

    if !tool("systemd-analyze") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("flywheel-agent.service");
    std::fs::write(&local, unit.replace("/usr/local/bin/flywheel-agent", AGENT)).unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
    // The check can fail: an unknown key is reported.
    std::fs::write(
        &local,
        unit.replace("Delegate=yes", "Delegate=yes\nDelegateSubgroupp=x")
            .replace("/usr/local/bin/flywheel-agent", AGENT),
    )
    .unwrap();
    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&local)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Unknown key"),
        "the verification is real"
    );
}

#[test]
fn tmpfiles_and_sysusers_cover_the_paths_and_users() {
    let tmp = read("systemd/flywheel-agent.tmpfiles.conf");
    for p in [
        "/run/flywheel-agent",
        "/var/lib/flywheel-agent/nix",
        "/var/lib/flywheel/work",
        "/var/lib/flywheel/fast",
    ] {
        assert!(
            tmp.lines()
                .any(|l| l.starts_with("d ") && l.split_whitespace().nth(1) == Some(p)),
            "{p}"
        );
    }
    let users = read("systemd/flywheel-agent.sysusers.conf");
    // One user per runner slot of the example config, none of them in another group.
    let cfg = parse(
        &read("systemd/agent.toml.example"),
        &Origin::File("agent.toml.example".into()),
        &BIG_HOST,
    )
    .expect("the example config is valid");
    for lane in &cfg.lanes {
        for slot in 0..lane.max_runners {
            let name = cfg.slot_user(&lane.name, slot);
            assert!(
                users.lines().any(|l| l.starts_with(&format!("u {name} "))),
                "sysusers lacks {name}"
            );
            assert!(!users.lines().any(|l| l.starts_with(&format!("m {name} "))));
        }
    }
    assert!(!users.lines().any(|l| l.starts_with("u runner ")));
    assert!(users.lines().any(|l| l.starts_with("g nixbld ")));
}

#[test]
fn helm_values_carry_what_arc_and_the_agent_need() {
    let lanes = [
        ("tinyland-nix", 8u64 << 30, None),
        ("tinyland-nix-heavy", 64 << 30, Some(2)),
        ("tinyland-nix-compute-expansion", 8 << 30, None),
    ];
    for (lane, envelope, max) in lanes {
        let v: serde_yaml::Value =
            serde_yaml::from_str(&read(&format!("images/helm/{lane}.yaml"))).expect("yaml");
        assert_eq!(v["runnerScaleSetName"].as_str(), Some(lane));
        if let Some(m) = max {
            assert_eq!(v["maxRunners"].as_u64(), Some(m), "{lane}");
        }
        let spec = &v["template"]["spec"];
        let c = spec["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "runner")
            .expect("a container named runner");
        assert_eq!(
            c["command"][0].as_str(),
            Some("/usr/local/bin/flywheel-agent")
        );
        assert_eq!(
            c["securityContext"]["privileged"].as_bool(),
            Some(true),
            "writable cgroups"
        );
        let env = |k: &str| {
            c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|e| e["name"] == k)
                .and_then(|e| e["value"].as_str())
                .map(str::to_owned)
        };
        assert_eq!(env("FLYWHEEL_LANE").as_deref(), Some(lane));
        let cfg_path = env("FLYWHEEL_CONFIG").unwrap();
        let local = root()
            .join("images/arc")
            .join(Path::new(&cfg_path).file_name().unwrap());
        let cfg = parse(
            &std::fs::read_to_string(&local).unwrap(),
            &Origin::File(local.clone()),
            &BIG_HOST,
        )
        .expect("the lane's config is valid");
        let l = cfg.lane(lane).expect("the config has the lane");
        assert_eq!(l.memory_bytes, envelope);
        assert_eq!(cfg.runner.lane.as_deref(), Some(lane));
        // The container limit is the envelope plus the agent's reserve.
        let limit = parse_size(c["resources"]["limits"]["memory"].as_str().unwrap()).unwrap();
        assert_eq!(limit, envelope + cfg.agent.reserve_bytes, "{lane}");
        let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            Duration::from_secs(grace) >= cfg.runner.drain_grace + cfg.agent.stop_grace,
            "{lane}: grace {grace}"
        );
        let mounts: Vec<&str> = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        assert!(
            mounts.contains(&"/nix") && mounts.contains(&"/home/runner/_work"),
            "{lane}: {mounts:?}"
        );
        // Node-local slots: a hostPath at the lane's slot_root, shared by the node's pods;
        // the pod-local /nix and _work are the fallback when every slot is busy.
        let slot_root = l
            .slot_root
            .as_ref()
            .expect("the ARC lanes use node-local slots");
        assert!(l.slots >= 1 && l.slot_max_bytes.is_some(), "{lane}");
        let mount = c["volumeMounts"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"].as_str() == Some(slot_root.to_str().unwrap()))
            .unwrap_or_else(|| panic!("{lane}: slot_root is not mounted"));
        let vol = spec["volumes"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert_eq!(vol["hostPath"]["path"].as_str(), slot_root.to_str());
        assert_eq!(vol["hostPath"]["type"].as_str(), Some("DirectoryOrCreate"));
        for pod_local in ["nix", "work"] {
            let v = spec["volumes"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|v| v["name"] == pod_local)
                .unwrap();
            assert!(v["emptyDir"].is_mapping(), "{lane}: {pod_local}");
        }
    }
}

#[test]
fn the_containerfile_lints_clean_and_has_what_it_must() {
    let cf = read("Containerfile");
    for must in [
        "ARG RUNNER_VERSION=",
        // Production's bases are the defaults; tests/container.rs builds with stand-ins.
        "ARG RUNNER_BASE=ghcr.io/actions/actions-runner:${RUNNER_VERSION}",
        "FROM ${RUNNER_BASE}",
        "ARG BUILD_BASE=docker.io/library/rust:${RUST_VERSION}-bookworm",
        "FROM ${BUILD_BASE} AS build",
        "sha256sum -c",
        "COPY --from=build /out/flywheel-agent /usr/local/bin/flywheel-agent",
        "COPY images/arc/ /etc/flywheel-agent/",
        "ENTRYPOINT [\"/usr/local/bin/flywheel-agent\"]",
        "/var/lib/flywheel-agent/nix/",
        // No way up to root: runner leaves sudo, the grant goes, xz is there without sudo.
        "gpasswd -d runner sudo",
        "sed -i '/^%sudo/d' /etc/sudoers",
        "xz-utils",
        "chown -R root:root /home/runner/bin /home/runner/externals",
    ] {
        assert!(cf.contains(must), "Containerfile lacks {must:?}");
    }
    // The slot users the ARC configs name exist in the image.
    for lane in [
        "tinyland-nix",
        "tinyland-nix-heavy",
        "tinyland-nix-compute-expansion",
    ] {
        let cfg = parse(
            &read(&format!("images/arc/{lane}.toml")),
            &Origin::File(format!("{lane}.toml").into()),
            &BIG_HOST,
        )
        .unwrap();
        let l = cfg.lane(lane).unwrap();
        // Every slot's user, and the pod-local fallback's.
        for slot in 0..l.user_slots() {
            let user = cfg.slot_user(lane, slot);
            let n = user.trim_start_matches("runner-");
            assert!(
                cf.contains("for i in 0 1 2 3 4 5 6 7; do useradd") && "01234567".contains(n),
                "the image lacks {user}"
            );
        }
    }
    let pin: toml::Value = toml::from_str(&read("images/nix-pin.toml")).unwrap();
    let sha = pin["systems"]["x86_64-linux"]["sha256"].as_str().unwrap();
    assert!(
        cf.contains(&format!("ARG NIX_SHA256={sha}")),
        "the Containerfile bakes the pinned tarball"
    );
    assert!(cf.contains(&format!(
        "ARG NIX_VERSION={}",
        pin["version"].as_str().unwrap()
    )));
    // The default release URL is the pinned one.
    let url = cf
        .lines()
        .find_map(|l| l.strip_prefix("ARG NIX_URL="))
        .expect("ARG NIX_URL")
        .replace("${NIX_VERSION}", pin["version"].as_str().unwrap())
        .replace("${NIX_SYSTEM}", "x86_64-linux");
    assert_eq!(url, pin["systems"]["x86_64-linux"]["url"].as_str().unwrap());
    if !tool("hadolint") {
        return;
    }
    let o = Command::new("hadolint")
        .arg("--no-color")
        .arg(root().join("Containerfile"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "hadolint: {}",
        String::from_utf8_lossy(&o.stdout)
    );
}
