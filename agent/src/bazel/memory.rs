//! A lane's CAS blobs kept in the agent's memory (`[lane.bazel] memory_cache`): what the
//! lane's upstream served, each blob checked to hash to its name before it is kept, the least
//! recently read dropped first, none kept longer than an hour. A job's read of a blob kept
//! here is answered without the round trip to the upstream.
//!
//! Only CAS blobs: a blob is its own proof (its name is its SHA-256), so whoever is answered
//! from here gets exactly what the upstream would have had to serve under that name. Never an
//! action-cache entry (a name that proves nothing about its content: it always comes from the
//! upstream, so an entry deleted or replaced there is never served from here), never what a
//! job wrote (only what the upstream answered to a read), never another lane's (one per
//! lane's upstream).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::body::Bytes;
use sha2::{Digest, Sha256};

/// A blob's name: its SHA-256.
type Name = [u8; 32];

/// What keeping a blob costs besides its bytes (its place in both maps, its allocation's
/// header), counted against the total: a million tiny blobs are not free.
const ENTRY_OVERHEAD: u64 = 256;

/// How long a blob is kept at most, however often it is read: a blob purged upstream (say,
/// one that leaked a secret) is gone from every agent within this time, without a restart.
const MAX_AGE: Duration = Duration::from_secs(3600);

/// A kept blob: its bytes, when it was last read (the clock), when it was kept.
#[derive(Debug)]
struct Kept {
    blob: Bytes,
    used: u64,
    since: Instant,
}

/// The kept blobs of one lane, at most `max` bytes of them.
#[derive(Debug)]
pub(super) struct Memory {
    max: u64,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    blobs: HashMap<Name, Kept>,
    /// Each blob's name by when it was last read (a counter): the oldest first.
    by_use: BTreeMap<u64, Name>,
    bytes: u64,
    clock: u64,
}

/// `hash` (64 lowercase hex digits) as a name.
fn name(hash: &str) -> Option<Name> {
    let b = hash.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        let d = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        *o = d(b[2 * i])? << 4 | d(b[2 * i + 1])?;
    }
    Some(out)
}

impl Memory {
    /// At most `max` bytes of blobs (0: none kept).
    pub(super) fn new(max: u64) -> Memory {
        Memory {
            max,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Whether blobs of `len` bytes may be kept at all (a blob larger than an eighth of the
    /// whole would push out too much for one read).
    fn takes(&self, len: u64) -> bool {
        len + ENTRY_OVERHEAD <= self.max / 8
    }

    /// The blob named `hash`, if it is kept (and now the most recently read).
    pub(super) fn get(&self, hash: &str) -> Option<Bytes> {
        self.get_at(hash, Instant::now())
    }

    fn get_at(&self, hash: &str, at: Instant) -> Option<Bytes> {
        if self.max == 0 {
            return None;
        }
        let n = name(hash)?;
        let mut g = self.inner.lock().ok()?;
        let inner = &mut *g;
        inner.clock += 1;
        let now = inner.clock;
        let k = inner.blobs.get_mut(&n)?;
        inner.by_use.remove(&k.used);
        if at.saturating_duration_since(k.since) >= MAX_AGE {
            if let Some(k) = inner.blobs.remove(&n) {
                inner.bytes -= k.blob.len() as u64 + ENTRY_OVERHEAD;
            }
            return None;
        }
        k.used = now;
        inner.by_use.insert(now, n);
        Some(k.blob.clone())
    }

    /// Keep `blob`, which the upstream served as `hash`, when it hashes to that name (else
    /// nothing is kept, and false is returned); the least recently read go until all fit.
    pub(super) fn put(&self, hash: &str, blob: &[u8]) -> bool {
        self.put_at(hash, blob, Instant::now())
    }

    fn put_at(&self, hash: &str, blob: &[u8], at: Instant) -> bool {
        let len = blob.len() as u64;
        if !self.takes(len) {
            return false;
        }
        let Some(n) = name(hash) else { return false };
        if Sha256::digest(blob).as_slice() != n {
            return false;
        }
        // A copy of its own: the body read may be a slice of a larger buffer, which would
        // stay allocated as long as the blob is kept.
        let blob = Bytes::copy_from_slice(blob);
        let Ok(mut g) = self.inner.lock() else {
            return false;
        };
        let inner = &mut *g;
        inner.clock += 1;
        let now = inner.clock;
        let kept = Kept {
            blob,
            used: now,
            since: at,
        };
        if let Some(old) = inner.blobs.insert(n, kept) {
            // Kept already (two reads raced): the same bytes, by its name.
            inner.by_use.remove(&old.used);
        } else {
            inner.bytes += len + ENTRY_OVERHEAD;
        }
        inner.by_use.insert(now, n);
        while inner.bytes > self.max {
            let Some((_, old)) = inner.by_use.pop_first() else {
                break;
            };
            if let Some(k) = inner.blobs.remove(&old) {
                inner.bytes -= k.blob.len() as u64 + ENTRY_OVERHEAD;
            }
        }
        true
    }

    /// Bytes kept now.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> u64 {
        self.inner.lock().map(|g| g.bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(b: &[u8]) -> String {
        Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    }

    #[test]
    fn a_blob_is_kept_only_when_it_hashes_to_its_name() {
        let m = Memory::new(1 << 20);
        let good = b"a blob".to_vec();
        let other = hash(b"another blob");
        assert!(
            !m.put(&other, &good),
            "kept under a name it does not hash to"
        );
        assert_eq!(m.get(&other), None);
        assert_eq!(m.bytes(), 0);
        assert!(m.put(&hash(&good), &good));
        assert_eq!(m.get(&hash(&good)).as_deref(), Some(&good[..]));
        // Names that are not 64 lowercase hex digits are never found, nor kept.
        let upper = hash(&good).to_uppercase();
        assert_eq!(m.get(&upper), None);
        assert!(!m.put(&upper, &good));
        assert_eq!(m.get("../x"), None);
    }

    #[test]
    fn the_least_recently_read_go_first_and_the_total_stays_bounded() {
        let blob = |i: u8| vec![i; 100];
        let each = 100 + ENTRY_OVERHEAD;
        let m = Memory::new(8 * each); // 8 blobs of 100 bytes; each may be at most 100
        for i in 0..8 {
            assert!(m.put(&hash(&blob(i)), &blob(i)));
        }
        assert_eq!(m.bytes(), 8 * each);
        // Read blob 0: blob 1 is now the least recently read.
        assert!(m.get(&hash(&blob(0))).is_some());
        assert!(m.put(&hash(&blob(8)), &blob(8)));
        assert_eq!(m.bytes(), 8 * each);
        assert!(m.get(&hash(&blob(1))).is_none(), "the oldest stayed");
        for i in [0, 2, 3, 4, 5, 6, 7, 8] {
            assert!(m.get(&hash(&blob(i))).is_some(), "blob {i} went");
        }
        // The same blob twice is counted once.
        assert!(m.put(&hash(&blob(8)), &blob(8)));
        assert_eq!(m.bytes(), 8 * each);
        // Too large for a share of it: not kept, nothing pushed out.
        let big = vec![9u8; 101];
        assert!(!m.put(&hash(&big), &big));
        assert_eq!(m.bytes(), 8 * each);
    }

    #[test]
    fn tiny_blobs_count_what_keeping_them_costs() {
        let m = Memory::new(10 * (1 + ENTRY_OVERHEAD));
        for i in 0..100u8 {
            assert!(m.put(&hash(&[i]), &[i]));
        }
        // Ten kept, not the 2,570 their bytes alone would allow.
        assert_eq!(m.bytes(), 10 * (1 + ENTRY_OVERHEAD));
        let kept = (0..100u8).filter(|i| m.get(&hash(&[*i])).is_some()).count();
        assert_eq!(kept, 10);
    }

    #[test]
    fn a_blob_is_kept_an_hour_at_most_however_often_it_is_read() {
        let m = Memory::new(1 << 20);
        let b = b"purged upstream later".to_vec();
        let t0 = Instant::now();
        assert!(m.put_at(&hash(&b), &b, t0));
        assert!(m.get_at(&hash(&b), t0 + MAX_AGE / 2).is_some());
        assert!(m
            .get_at(&hash(&b), t0 + MAX_AGE - Duration::from_secs(1))
            .is_some());
        assert!(m.get_at(&hash(&b), t0 + MAX_AGE).is_none());
        assert_eq!(m.bytes(), 0, "dropped, not only hidden");
        assert!(m.get_at(&hash(&b), t0).is_none());
    }

    #[test]
    fn nothing_is_kept_when_it_is_off() {
        let m = Memory::new(0);
        assert!(!m.put(&hash(b""), b""));
        assert_eq!(m.get(&hash(b"")), None);
    }
}
