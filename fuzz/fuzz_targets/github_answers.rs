//! GitHub's answers: every wire type the client decodes, and the JIT files inside a
//! registration answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flywheel_jit_config::decode_github_answers(data);
});
