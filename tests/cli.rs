//! The command-line surface: lanes, check-config and their exit codes (no privileges needed).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{stderr, stdout, AGENT};

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(AGENT)
        .args(args)
        .env_remove("FLYWHEEL_CONFIG")
        .output()
        .expect("run agent")
}

#[test]
fn lanes_json_lists_the_embedded_lanes() {
    let o = agent(&["lanes", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let lanes = v.as_array().expect("array");
    let names: Vec<&str> = lanes
        .iter()
        .map(|l| l["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "tinyland-nix",
            "tinyland-nix-heavy",
            "tinyland-nix-compute-expansion"
        ]
    );
    assert_eq!(lanes[0]["memory_bytes"], 8u64 << 30);
    assert_eq!(lanes[1]["memory_bytes"], 64u64 << 30);
    assert_eq!(lanes[1]["max_runners"], 2);
    assert_eq!(lanes[0]["labels"][0], "tinyland-nix");
}

#[test]
fn lanes_text_and_config_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        "[[lane]]\nname = \"only\"\nmemory = \"512Mi\"\nlabels = [\"x\", \"y\"]\n",
    )
    .expect("write");
    let o = Command::new(AGENT)
        .args(["lanes"])
        .env("FLYWHEEL_CONFIG", &cfg)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(
        out.contains("only") && out.contains("512.0 MiB") && out.contains("x,y"),
        "{out}"
    );
    assert!(!out.contains("tinyland-nix"), "{out}");
}

#[test]
fn check_config_valid_and_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\n").expect("write");
    let o = agent(&["check-config", "--config", good.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\nmax_runners = \"two\"\n",
    )
    .expect("write");
    let o = agent(&["check-config", "--config", bad.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(78));
    let err = stderr(&o);
    assert!(
        err.starts_with(&format!("{}:4:15: ", bad.display())),
        "{err}"
    );

    let dup = dir.path().join("dup.toml");
    std::fs::write(
        &dup,
        "[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\n[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\n",
    )
    .expect("write");
    let o = agent(&["check-config", "--config", dup.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("duplicate lane name"), "{}", stderr(&o));

    let missing = dir.path().join("missing.toml");
    let o = agent(&["check-config", "--config", missing.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(78));
    assert!(stderr(&o).contains("cannot read the config file"));
}

#[test]
fn a_bad_config_changes_nothing_on_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let work = dir.path().join("work");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[agent]\nstate_dir = \"{}\"\n[[lane]]\nname = \"a\"\nmemory = \"1Gi\"\nwork_root = \"{}\"\nbogus = 1\n",
            state.display(),
            work.display()
        ),
    )
    .expect("write");
    let o = agent(&[
        "exec",
        "--lane",
        "a",
        "--config",
        cfg.to_str().expect("utf8"),
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        stderr(&o).contains(":7:1: unknown field `bogus`"),
        "{}",
        stderr(&o)
    );
    assert!(!state.exists() && !work.exists(), "nothing was created");
}

#[test]
fn usage_errors_exit_64() {
    let o = agent(&["exec", "--lane", "tinyland-nix"]);
    assert_eq!(o.status.code(), Some(64));
    let o = agent(&["--help"]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn attic_mint_token_prints_a_token_that_always_expires() {
    use base64::Engine;
    let dir = tempfile::tempdir().expect("tempdir");
    let secret: Vec<u8> = (7u8..71).collect();
    let key = dir.path().join("attic.key");
    std::fs::write(
        &key,
        base64::engine::general_purpose::STANDARD.encode(&secret),
    )
    .expect("write");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("[attic]\nsigning_key_file = \"{}\"\n", key.display()),
    )
    .expect("write");
    let o = agent(&[
        "attic",
        "mint-token",
        "--config",
        cfg.to_str().expect("utf8"),
        "--cache",
        "tinyland",
        "--sub",
        "ops:alice",
        "--validity",
        "1h",
        "--push",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let token = stdout(&o).trim().to_owned();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_required_spec_claims(&["exp", "sub"]);
    let c = jsonwebtoken::decode::<serde_json::Value>(
        &token,
        &jsonwebtoken::DecodingKey::from_secret(&secret),
        &v,
    )
    .expect("verifies")
    .claims;
    assert_eq!(c["sub"], "ops:alice");
    assert_eq!(
        c["https://jwt.attic.rs/v1"]["caches"]["tinyland"],
        serde_json::json!({"r": 1, "w": 1})
    );
    assert_eq!(
        c["exp"].as_u64().expect("exp") - c["nbf"].as_u64().expect("nbf"),
        3600
    );
    let o = agent(&[
        "attic",
        "mint-token",
        "--config",
        cfg.to_str().expect("utf8"),
        "--cache",
        "tiny*",
        "--sub",
        "x",
        "--validity",
        "1h",
    ]);
    assert_ne!(o.status.code(), Some(0), "a wildcard cache is refused");
}
