//! Facts about a Nix store from its database (`<nix>/var/nix/db/db.sqlite`), read-only and
//! cheap: what a job added, how big a slot's store is, whether a store whose holder died is
//! still sound, and when a slot's store needs garbage collection.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn db_path(nix_root: &Path) -> PathBuf {
    nix_root.join("var/nix/db/db.sqlite")
}

fn open(nix_root: &Path) -> rusqlite::Result<rusqlite::Connection> {
    rusqlite::Connection::open_with_flags(
        db_path(nix_root),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// Store paths a job's daemon added: (built, substituted). Built: the outputs of what its
/// post-build hook recorded (`built`: derivations and out paths) — on a shared store other
/// jobs build in the same seconds. Substituted: paths registered since `since` (unix seconds)
/// that nobody built here, less the bootstrap's own (the receipt's).
pub fn job_paths(nix_root: &Path, built: &[String], since: u64) -> Option<(u64, u64)> {
    let conn = open(nix_root).ok()?;
    // Each name once, each statement prepared once, the derivations a set: linear in the
    // record (a job decides how long its record is).
    let names: std::collections::BTreeSet<&str> = built.iter().map(String::as_str).collect();
    let drvs: std::collections::HashSet<&str> = names
        .iter()
        .copied()
        .filter(|p| p.ends_with(".drv"))
        .collect();
    let mut by_deriver = conn
        .prepare("SELECT COUNT(*) FROM ValidPaths WHERE deriver = ?1 AND ultimate = 1")
        .ok()?;
    let mut by_path = conn
        .prepare("SELECT deriver FROM ValidPaths WHERE path = ?1 AND ultimate = 1")
        .ok()?;
    let mut outputs = 0u64;
    for p in names {
        if p.ends_with(".drv") {
            let n: i64 = by_deriver.query_row([p], |r| r.get(0)).ok()?;
            outputs += u64::try_from(n).unwrap_or(0);
            continue;
        }
        // An out path counts unless its derivation is in the record (counted above).
        match by_path.query_row([p], |r| r.get::<_, Option<String>>(0)) {
            Ok(d) if d.as_deref().is_some_and(|d| drvs.contains(d)) => {}
            Ok(_) => outputs += 1,
            Err(rusqlite::Error::QueryReturnedNoRows) => {}
            Err(_) => return None,
        }
    }
    let (_, subst) = paths_since(nix_root, since)?;
    Some((outputs, subst))
}

/// Store paths registered since `since` (unix seconds): (built here, substituted). The
/// bootstrap's own paths (the receipt's) are not a job's, though registered the same second.
pub fn paths_since(nix_root: &Path, since: u64) -> Option<(u64, u64)> {
    let conn = open(nix_root).ok()?;
    let bootstrap: Vec<String> = std::fs::read(crate::nixboot::receipt_path(nix_root))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|r| {
            r["store_paths"].as_array().map(|a| {
                a.iter()
                    .filter_map(|p| p.as_str().map(|p| format!("/nix/store/{p}")))
                    .collect()
            })
        })
        .unwrap_or_default();
    let mut q = conn
        .prepare("SELECT path, ultimate FROM ValidPaths WHERE registrationTime >= ?1 AND path NOT LIKE '%.drv'")
        .ok()?;
    let rows = q
        .query_map([i64::try_from(since).unwrap_or(i64::MAX)], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
        })
        .ok()?;
    let (mut built, mut subst) = (0, 0);
    for (path, ultimate) in rows.flatten() {
        if bootstrap.contains(&path) {
            continue;
        }
        if ultimate == Some(1) {
            built += 1;
        } else {
            subst += 1;
        }
    }
    Some((built, subst))
}

/// The derivations a job's daemon built (or started building) since `since` (unix seconds,
/// fractional), with start and end relative to `since`, from the daemon's own build log
/// directory `logs` (its `NIX_LOG_DIR`: nothing of a neighbour's is there). Start: the build log's creation (the
/// daemon creates it when the build starts); end: when the output was registered, or the log's
/// last write if later; no registered output: failed or killed (end = the log's last write).
///
/// `built`: the derivations this job's daemon recorded (post-build hook). A build it started
/// whose output another daemon registered first (a shared store) is left out.
pub fn builds_since(
    nix_root: &Path,
    logs: &Path,
    since: f64,
    built: &[String],
) -> Vec<crate::summary::Build> {
    let logs = logs.join("drvs");
    let conn = open(nix_root).ok();
    let mut out = Vec::new();
    let secs = |t: std::io::Result<std::time::SystemTime>| {
        t.ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64())
    };
    for dir in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        let prefix = dir.file_name().to_string_lossy().into_owned();
        for f in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(meta) = f.metadata() else { continue };
            let Some(modified) = secs(meta.modified()) else {
                continue;
            };
            let created = secs(meta.created()).unwrap_or(modified);
            if modified < since {
                continue;
            }
            let file = f.file_name().to_string_lossy().into_owned();
            let drv = format!("{prefix}{}", file.trim_end_matches(".bz2"));
            let registered: Option<i64> = conn.as_ref().and_then(|c| {
                c.query_row(
                    "SELECT MAX(registrationTime) FROM ValidPaths WHERE deriver = ?1",
                    [format!("/nix/store/{drv}")],
                    |r| r.get(0),
                )
                .ok()
                .flatten()
            });
            let name = drv
                .split_once('-')
                .map_or(drv.as_str(), |(_, n)| n)
                .trim_end_matches(".drv")
                .to_owned();
            if registered.is_some() && !built.iter().any(|b| b.ends_with(&drv)) {
                continue;
            }
            let start = (created.max(since) - since).max(0.0);
            let end = match registered {
                Some(t) => (t as f64).max(modified) - since,
                None => modified - since,
            };
            out.push(crate::summary::Build {
                name,
                start,
                end: end.max(start),
                failed: registered.is_none(),
                memory_bytes: None,
            });
        }
    }
    out.sort_by(|a, b| {
        a.start
            .partial_cmp(&b.start)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    out
}

/// Valid paths in a store and the sum of their NAR sizes; `None` without a database.
pub fn size(nix_root: &Path) -> Option<(u64, u64)> {
    let conn = open(nix_root).ok()?;
    conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(narSize), 0) FROM ValidPaths",
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
    )
    .ok()
    .map(|(n, b)| (u64::try_from(n).unwrap_or(0), u64::try_from(b).unwrap_or(0)))
}

/// Check a store whose holder died mid-job before it is reused: the database passes SQLite's
/// `quick_check` (structure, indexes, no torn pages; a hot journal is rolled back by opening
/// it) and every registered path's reference points at a registered path. Returns how long it
/// took. A store without a database is fine (it gets a cold bootstrap).
pub fn check(nix_root: &Path) -> Result<Duration, String> {
    let t = Instant::now();
    if !db_path(nix_root).exists() {
        return Ok(t.elapsed());
    }
    // Read-write, so SQLite can roll back a hot journal the dead holder left.
    let conn = rusqlite::Connection::open(db_path(nix_root))
        .map_err(|e| format!("cannot open the store database: {e}"))?;
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|e| format!("the store database cannot be checked: {e}"))?;
    if verdict != "ok" {
        return Err(format!("the store database is damaged: {verdict}"));
    }
    let dangling: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM Refs WHERE reference NOT IN (SELECT id FROM ValidPaths) OR referrer NOT IN (SELECT id FROM ValidPaths)",
            [],
            |r| r.get(0),
        )
        .map_err(|e| format!("the store database cannot be checked: {e}"))?;
    if dangling > 0 {
        return Err(format!(
            "the store database has {dangling} references to unregistered paths"
        ));
    }
    Ok(t.elapsed())
}

/// How much a slot's store should free now, if anything: below the filesystem's free-space
/// threshold (`min_free`) free up to `max_free`; above the slot's size cap free down to 90% of
/// it. `fs_free`/`fs_size` are the slot filesystem's, `store_bytes` the store's NAR total.
pub fn gc_bytes(fs_free: u64, fs_size: u64, store_bytes: u64, cap: Option<u64>) -> Option<u64> {
    let (min_free, max_free) = crate::nixboot::free_thresholds(fs_size);
    let for_disk = (fs_free < min_free).then(|| max_free.saturating_sub(fs_free));
    let for_cap = cap
        .filter(|c| store_bytes > *c)
        .map(|c| store_bytes - c / 10 * 9);
    match (for_disk, for_cap) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0).max(b.unwrap_or(0)).max(1)),
    }
}

/// Free and total bytes of the filesystem holding `path`.
pub fn fs_space(path: &Path) -> Option<(u64, u64)> {
    let v = nix::sys::statvfs::statvfs(path).ok()?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let (avail, blocks, frag) = (
        v.blocks_available() as u64,
        v.blocks() as u64,
        v.fragment_size() as u64,
    );
    Some((avail.saturating_mul(frag), blocks.saturating_mul(frag)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store database with Nix's schema (the tables this module reads) and `n` paths.
    fn fake_db(root: &Path, n: usize) {
        std::fs::create_dir_all(root.join("var/nix/db")).expect("mkdir");
        let mut c = rusqlite::Connection::open(db_path(root)).expect("db");
        c.execute_batch(
            "CREATE TABLE ValidPaths (id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL, path TEXT UNIQUE NOT NULL, hash TEXT NOT NULL, registrationTime INTEGER NOT NULL, deriver TEXT, narSize INTEGER, ultimate INTEGER, sigs TEXT, ca TEXT);
             CREATE TABLE Refs (referrer INTEGER NOT NULL, reference INTEGER NOT NULL, PRIMARY KEY (referrer, reference));
             CREATE INDEX IndexReferrer ON Refs(referrer);
             CREATE INDEX IndexReference ON Refs(reference);",
        )
        .expect("schema");
        let tx = c.transaction().expect("tx");
        for i in 0..n {
            tx.execute(
                "INSERT INTO ValidPaths (path, hash, registrationTime, narSize, ultimate) VALUES (?1, 'sha256:00', 1, 100000, 1)",
                [format!("/nix/store/{i:032}-p")],
            )
            .expect("insert");
            if i > 0 {
                tx.execute(
                    "INSERT INTO Refs (referrer, reference) VALUES (?1, ?2)",
                    [i as i64 + 1, i as i64],
                )
                .expect("ref");
            }
        }
        tx.commit().expect("commit");
    }

    #[test]
    fn size_and_check_of_a_store_with_100k_paths() {
        let t = tempfile::tempdir().expect("tempdir");
        fake_db(t.path(), 100_000);
        assert_eq!(size(t.path()), Some((100_000, 100_000 * 100_000)));
        let took = check(t.path()).expect("sound");
        // Printed for the record (the figure in docs/operating-arc.md); not a timed assertion.
        eprintln!("check of a 100k-path store database: {took:?}");
        // A dangling reference is found.
        let c = rusqlite::Connection::open(db_path(t.path())).expect("db");
        c.execute("DELETE FROM ValidPaths WHERE id = 5", [])
            .expect("delete");
        drop(c);
        let e = check(t.path()).expect_err("dangling");
        assert!(e.contains("references to unregistered paths"), "{e}");
        // A store without a database is fine: it gets a cold bootstrap.
        check(&t.path().join("none")).expect("no database");
    }

    #[test]
    fn a_jobs_record_counts_each_output_once_whatever_its_length() {
        let t = tempfile::tempdir().expect("tempdir");
        fake_db(t.path(), 40_000);
        let c = rusqlite::Connection::open(db_path(t.path())).expect("db");
        // Paths 0..10 are outputs of one derivation the job built; the rest derive from none.
        c.execute(
            "UPDATE ValidPaths SET deriver = '/nix/store/x-a.drv' WHERE id <= 10",
            [],
        )
        .expect("deriver");
        drop(c);
        let p = |i: usize| format!("/nix/store/{i:032}-p");
        // A record as a hostile job may write it: 40,000 out paths, each twice, the
        // derivation, its outputs again, and names that are not in the store.
        let mut built: Vec<String> = (0..40_000).chain(0..40_000).map(p).collect();
        built.push("/nix/store/x-a.drv".into());
        built.extend((0..10).map(p));
        built.extend((0..100).map(|i| format!("/nix/store/{i:032}-gone")));
        let (outputs, _) = job_paths(t.path(), &built, u64::MAX).expect("read");
        // The derivation's 10 outputs once (through it), the other 39,990 out paths once.
        assert_eq!(outputs, 40_000);
    }

    #[test]
    fn a_damaged_database_is_refused() {
        let t = tempfile::tempdir().expect("tempdir");
        fake_db(t.path(), 2000);
        // Overwrite pages in the middle of the file.
        let p = db_path(t.path());
        let mut bytes = std::fs::read(&p).expect("read");
        let mid = bytes.len() / 2;
        for b in &mut bytes[mid..mid + 8192] {
            *b = 0xa5;
        }
        std::fs::write(&p, bytes).expect("write");
        assert!(check(t.path()).is_err());
    }

    #[test]
    fn gc_by_disk_threshold_and_by_cap() {
        let gib = 1u64 << 30;
        // 100 GiB filesystem: min-free 5 GiB, max-free 15 GiB.
        assert_eq!(gc_bytes(50 * gib, 100 * gib, 10 * gib, None), None);
        assert_eq!(gc_bytes(4 * gib, 100 * gib, 10 * gib, None), Some(11 * gib));
        // Over a 10 GiB cap by 2 GiB: free down to 9 GiB.
        assert_eq!(
            gc_bytes(50 * gib, 100 * gib, 12 * gib, Some(10 * gib)),
            Some(3 * gib)
        );
        assert_eq!(gc_bytes(50 * gib, 100 * gib, 9 * gib, Some(10 * gib)), None);
    }
}
