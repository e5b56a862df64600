//! The config parser: any bytes give a config or a `FILE:LINE:COL` error, never a panic.
#![no_main]

use flywheel_agent::config::{parse, HostFacts, Origin};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let host = HostFacts {
        memory_bytes: 64 << 30,
        cpus: 16,
    };
    match parse(text, &Origin::File("fuzz.toml".into()), &host) {
        Ok(cfg) => {
            for l in &cfg.lanes {
                let _ = cfg.slot_user(&l.name, 0);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
