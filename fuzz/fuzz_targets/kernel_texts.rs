//! What the kernel shows the agent: mountinfo and `/proc/self/cgroup` (the layout detection),
//! and `/dev/kmsg` OOM records. The input is split at its first NUL into two texts.
#![no_main]

use std::path::Path;

use flywheel_agent::cgroup::detect::{from_texts, own_path, parse_mountinfo};
use flywheel_agent::verdict::parse_oom_record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (a, b) = text.split_once('\0').unwrap_or((&text, ""));
    let _ = parse_mountinfo(a);
    for c in [None, Some("memory"), Some("pids")] {
        let _ = own_path(b, c);
    }
    for kill in [false, true] {
        let _ = from_texts(a, b, Path::new("/sys/fs/cgroup"), None, kill).map(|m| m.layout());
        let _ = from_texts(a, b, Path::new("/sys/fs/cgroup"), Some("/flywheel"), kill);
    }
    for line in a.lines() {
        let _ = parse_oom_record(line, "lane.s0.1.abc");
    }
});
