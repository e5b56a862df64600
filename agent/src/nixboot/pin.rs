//! The pin: the Nix release the agent installs (`images/nix-pin.toml`, compiled in) and the
//! hashes that check a tarball before anything is unpacked.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::NixError;

/// The manifest in `images/nix-pin.toml`, compiled in.
pub const PIN_TOML: &str = include_str!("../../../images/nix-pin.toml");

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    pub version: String,
    pub systems: BTreeMap<String, PinSystem>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PinSystem {
    pub url: String,
    pub sha256: String,
}

/// The compiled-in pin.
pub fn pin() -> Result<Pin, NixError> {
    toml::from_str(PIN_TOML).map_err(|e| NixError::Manifest(e.to_string()))
}

/// Nix's name for this machine's system.
pub fn current_system() -> String {
    format!("{}-linux", std::env::consts::ARCH)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, NixError> {
    let mut f = std::fs::File::open(path).map_err(|source| NixError::Tarball {
        path: path.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|source| NixError::Tarball {
            path: path.to_path_buf(),
            source,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn sha256_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}
