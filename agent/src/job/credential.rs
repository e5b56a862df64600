//! The Attic credential the agent holds: what it mints job tokens with, or pushes with.

use std::path::PathBuf;

use flywheel_jit_config::Secret;

use crate::attic::{AtticError, SigningKey};
use crate::config::AtticSettings;

/// Credentials the agent can hand out.
#[derive(Debug, Clone)]
pub enum AtticCredential {
    Sign(SigningKey),
    Static(Secret<String>),
    None,
}

/// Why the configured credential could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error(transparent)]
    SigningKey(#[from] AtticError),
    #[error("attic.push_token_file {}: {source}", path.display())]
    PushToken {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AtticCredential {
    /// How the agent itself pushes with this credential; `None` without one.
    pub fn publish_auth(&self) -> Option<crate::publish::Auth> {
        match self {
            AtticCredential::Sign(k) => Some(crate::publish::Auth::Sign(k.clone())),
            AtticCredential::Static(t) => Some(crate::publish::Auth::Static(t.clone())),
            AtticCredential::None => None,
        }
    }

    pub fn load(a: &AtticSettings) -> Result<AtticCredential, CredentialError> {
        if let Some(k) = &a.signing_key_file {
            return Ok(AtticCredential::Sign(SigningKey::load(k)?));
        }
        if let Some(t) = &a.push_token_file {
            let text = std::fs::read_to_string(t).map_err(|source| CredentialError::PushToken {
                path: t.clone(),
                source,
            })?;
            return Ok(AtticCredential::Static(Secret::new(text.trim().to_owned())));
        }
        Ok(AtticCredential::None)
    }
}
