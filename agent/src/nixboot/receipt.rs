//! The receipt of a finished bootstrap and the warm check against it: what drifted.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;
use serde::Serialize;

use super::pin::sha256_bytes;
use super::Plan;
use super::Report;
use super::Timings;

/// Where the receipt lives under a Nix root (`/nix`).
pub fn receipt_path(nix_root: &Path) -> PathBuf {
    nix_root.join("var/flywheel-agent/receipt.json")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Receipt {
    pub version: String,
    pub system: String,
    pub tarball_sha256: String,
    pub nix_path: String,
    pub store_paths: Vec<String>,
    pub conf_file: String,
    pub conf_sha256: String,
    pub timings_ms: BTreeMap<String, f64>,
}

pub(super) fn read_receipt(nix_root: &Path) -> Option<Receipt> {
    let text = std::fs::read(receipt_path(nix_root)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Why the store (not its configuration) differs from the plan; empty when the store is warm.
/// A pod's fresh `/etc/nix` with a warm node-local store is configuration drift only.
pub(super) fn drift(plan: &Plan, version: &str) -> (Vec<String>, Vec<String>) {
    let mut config = Vec::new();
    match std::fs::read(&plan.conf_file) {
        Ok(b) if sha256_bytes(&b) == sha256_bytes(plan.conf_text.as_bytes()) => {}
        Ok(_) => config.push(format!("{} was edited", plan.conf_file.display())),
        Err(_) => config.push(format!("{} is missing", plan.conf_file.display())),
    }
    if !plan.netrc_file.exists() {
        config.push(format!("{} is missing", plan.netrc_file.display()));
    }
    (store_drift(plan, version), config)
}

pub(super) fn store_drift(plan: &Plan, version: &str) -> Vec<String> {
    let Some(r) = read_receipt(&plan.nix_root) else {
        return vec!["no receipt (fresh /nix)".into()];
    };
    let mut why = Vec::new();
    if r.version != version {
        why.push(format!(
            "receipt is for nix {}, the pin is {version}",
            r.version
        ));
    }
    if r.tarball_sha256 != plan.sha256 {
        why.push("receipt is for another tarball".into());
    }
    let (mut missing, mut unfinished) = (0, 0);
    for p in &r.store_paths {
        match std::fs::symlink_metadata(plan.nix_root.join("store").join(p)) {
            Err(_) => missing += 1,
            Ok(m) if !finished(&m) => unfinished += 1,
            Ok(_) => {}
        }
    }
    if missing > 0 {
        why.push(format!("{missing} store paths are missing"));
    }
    if unfinished > 0 {
        why.push(format!(
            "{unfinished} store paths are not read-only and root's (an install stopped half-way)"
        ));
    }
    let profile = plan.nix_root.join("var/nix/profiles/default");
    if std::fs::canonicalize(&profile).ok() != Some(plan.nix_root.join("store").join(&r.nix_path)) {
        why.push("the default profile does not point at the pinned nix".into());
    }
    if !plan.nix_root.join("var/nix/db/db.sqlite").exists() {
        why.push("the store database is missing".into());
    }
    if nix::unistd::Group::from_name("nixbld")
        .ok()
        .flatten()
        .is_none()
    {
        why.push("the nixbld build users are missing".into());
    }
    why
}

/// The report of a store found warm (`changed`: configuration written for it).
pub(super) fn warm(plan: &Plan, version: &str, changed: Vec<String>, timings: Timings) -> Report {
    Report {
        cold: false,
        version: version.to_owned(),
        nix_path: read_receipt(&plan.nix_root)
            .map(|r| plan.nix_root.join("store").join(r.nix_path))
            .unwrap_or_default(),
        changed,
        timings,
        relayed: None,
    }
}

/// Whether a store path's top is as an install leaves it: root's and read-only (a symlink is
/// root's, its mode means nothing).
pub(super) fn finished(m: &std::fs::Metadata) -> bool {
    m.uid() == 0 && (m.file_type().is_symlink() || m.mode() & 0o222 == 0)
}
