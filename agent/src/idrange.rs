//! The band of host ids the agent gives its jobs' nix-daemons: a range of [`SIZE`] ids per
//! running daemon, [`RANGES`] ranges from [`BASE`] up, between systemd's container range
//! (524288–1879048191) and its foreign range (2147352576–), which systemd leaves unused. A
//! daemon's root and build users are host ids of its range (`envelope/userns.rs`); a job's user
//! is never one of them (`jobuser.rs`), or it would be the same user to the kernel as another
//! job's builders (signals, ptrace, `/proc`, files they write).

/// The first id of the first range.
pub const BASE: u32 = 0x7000_0000;
/// Ids in one daemon's range.
pub const SIZE: u32 = 65536;
/// Ranges available (daemons that run at once).
pub const RANGES: u32 = 4094;

/// Whether host id `id` lies in some daemon's range.
pub fn in_band(id: u32) -> bool {
    id >= BASE && (id - BASE) / SIZE < RANGES
}

/// Whether host uid `uid` is a job's daemon's root (the first id of a range): its processes
/// are the daemon's, never a build's.
pub fn is_daemon_root(uid: u32) -> bool {
    in_band(uid) && (uid - BASE) % SIZE == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_band_and_its_roots() {
        assert!(!in_band(BASE - 1));
        assert!(in_band(BASE));
        assert!(in_band(BASE + RANGES * SIZE - 1));
        assert!(!in_band(BASE + RANGES * SIZE));
        assert!(!in_band(65534));
        assert!(is_daemon_root(BASE));
        assert!(is_daemon_root(BASE + 3 * SIZE));
        assert!(!is_daemon_root(BASE + 3 * SIZE + 999));
        assert!(!is_daemon_root(BASE + RANGES * SIZE));
    }
}
