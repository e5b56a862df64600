//! The JIT config decoder (what ARC hands the pod, what GitHub answers): raw, or the fuzz
//! input base64-encoded so that the JSON inside is reached.
#![no_main]

use base64::Engine;
use flywheel_jit_config::{jitfile::decode_files, Secret};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let text = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        base64::engine::general_purpose::STANDARD.encode(rest)
    };
    if let Ok(files) = decode_files(&Secret::new(text)) {
        for f in &files {
            let _ = format!("{f:?}");
        }
    }
});
