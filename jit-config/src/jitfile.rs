//! The encoded JIT configuration: base64 of a JSON object mapping file names in the runner
//! root (`.runner`, `.credentials`, `.credentials_rsaparams`) to base64 file contents.

use base64::Engine;

use crate::Secret;

#[derive(Debug, thiserror::Error)]
pub enum JitFileError {
    #[error("the JIT config is not base64: {0}")]
    Base64(String),
    #[error("the JIT config is not a JSON object of file names to base64 contents: {0}")]
    Json(String),
    #[error("the JIT config has no .runner file")]
    NoRunner,
}

/// What the agent reads from a JIT config: the runner's name and id from `.runner`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerFile {
    pub agent_id: u64,
    pub agent_name: String,
    pub work_folder: Option<String>,
}

/// A file of the runner root: its name and contents.
pub type RootFile = (String, Secret<Vec<u8>>);

/// Decode the files of an encoded JIT config (names → contents).
pub fn decode_files(encoded: &Secret<String>) -> Result<Vec<RootFile>, JitFileError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let json = Secret::new(
        b64.decode(encoded.expose().trim())
            .map_err(|e| JitFileError::Base64(e.to_string()))?,
    );
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json.expose()).map_err(|e| JitFileError::Json(e.to_string()))?;
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        let s = v
            .as_str()
            .ok_or_else(|| JitFileError::Json(format!("{name} is not a string")))?;
        let bytes = b64
            .decode(s)
            .map_err(|e| JitFileError::Base64(format!("{name}: {e}")))?;
        out.push((name, Secret::new(bytes)));
    }
    Ok(out)
}

/// Read the runner's identity out of an encoded JIT config.
pub fn runner_file(encoded: &Secret<String>) -> Result<RunnerFile, JitFileError> {
    let files = decode_files(encoded)?;
    let (_, runner) = files
        .iter()
        .find(|(n, _)| n == ".runner")
        .ok_or(JitFileError::NoRunner)?;
    // The real runner writes .runner with a UTF-8 BOM.
    let text = String::from_utf8_lossy(runner.expose());
    let v: serde_json::Value = serde_json::from_str(text.trim_start_matches('\u{feff}'))
        .map_err(|e| JitFileError::Json(format!(".runner: {e}")))?;
    Ok(RunnerFile {
        agent_id: v["AgentId"]
            .as_u64()
            .or_else(|| v["AgentId"].as_str().and_then(|s| s.parse().ok()))
            .unwrap_or(0),
        agent_name: v["AgentName"].as_str().unwrap_or_default().to_owned(),
        work_folder: v["WorkFolder"].as_str().map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(files: &[(&str, &str)]) -> Secret<String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let map: serde_json::Map<String, serde_json::Value> = files
            .iter()
            .map(|(n, c)| ((*n).to_owned(), serde_json::Value::String(b64.encode(c))))
            .collect();
        Secret::new(b64.encode(serde_json::to_vec(&map).expect("json")))
    }

    #[test]
    fn decodes_runner_identity() {
        let enc = encode(&[
            (".runner", "\u{feff}{\"AgentId\": 42, \"AgentName\": \"sting-tinyland-nix-ab12\", \"WorkFolder\": \"_work\"}"),
            (".credentials", "{\"Scheme\": \"OAuth\"}"),
        ]);
        let r = runner_file(&enc).expect("decode");
        assert_eq!(
            r,
            RunnerFile {
                agent_id: 42,
                agent_name: "sting-tinyland-nix-ab12".into(),
                work_folder: Some("_work".into())
            }
        );
        assert_eq!(decode_files(&enc).expect("files").len(), 2);
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        for bad in ["", "!!!", "eyJ9", "bnVsbA==", "eyJhIjogMX0="] {
            assert!(runner_file(&Secret::new(bad.to_owned())).is_err(), "{bad}");
        }
        let no_runner = encode(&[(".credentials", "{}")]);
        assert!(matches!(
            runner_file(&no_runner),
            Err(JitFileError::NoRunner)
        ));
    }
}
