//! The store database's reads, blocking: private to the facade (`super`), which runs them on
//! a blocking thread. Read-only and cheap per path, but linear in what a job or a store holds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::StoreError;

fn db_path(nix_root: &Path) -> PathBuf {
    nix_root.join("var/nix/db/db.sqlite")
}

pub(super) fn open(nix_root: &Path) -> Result<rusqlite::Connection, StoreError> {
    rusqlite::Connection::open_with_flags(
        db_path(nix_root),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(StoreError::Open)
}

/// Store paths a job's daemon added: (built, substituted). Built: the outputs of what its
/// post-build hook recorded (`built`: derivations and out paths) — on a shared store other
/// jobs build in the same seconds. Substituted: paths registered since `since` (unix seconds)
/// that nobody built here, less the bootstrap's own (the receipt's).
pub(super) fn job_paths(
    nix_root: &Path,
    built: &[String],
    since: u64,
) -> Result<(u64, u64), StoreError> {
    let conn = open(nix_root)?;
    // Each name once, each statement prepared once, the derivations a set: linear in the
    // record (a job decides how long its record is).
    let names: std::collections::BTreeSet<&str> = built.iter().map(String::as_str).collect();
    let drvs: std::collections::HashSet<&str> = names
        .iter()
        .copied()
        .filter(|p| p.ends_with(".drv"))
        .collect();
    let mut by_deriver =
        conn.prepare("SELECT COUNT(*) FROM ValidPaths WHERE deriver = ?1 AND ultimate = 1")?;
    let mut by_path =
        conn.prepare("SELECT deriver FROM ValidPaths WHERE path = ?1 AND ultimate = 1")?;
    let mut outputs = 0u64;
    for p in names {
        if p.ends_with(".drv") {
            let n: i64 = by_deriver.query_row([p], |r| r.get(0))?;
            outputs += u64::try_from(n).unwrap_or(0);
            continue;
        }
        // An out path counts unless its derivation is in the record (counted above).
        match by_path.query_row([p], |r| r.get::<_, Option<String>>(0)) {
            Ok(d) if d.as_deref().is_some_and(|d| drvs.contains(d)) => {}
            Ok(_) => outputs += 1,
            Err(rusqlite::Error::QueryReturnedNoRows) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (_, subst) = paths_since(nix_root, since)?;
    Ok((outputs, subst))
}

/// Store paths registered since `since` (unix seconds): (built here, substituted). The
/// bootstrap's own paths (the receipt's) are not a job's, though registered the same second.
pub(super) fn paths_since(nix_root: &Path, since: u64) -> Result<(u64, u64), StoreError> {
    let conn = open(nix_root)?;
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
    let mut q = conn.prepare(
        "SELECT path, ultimate FROM ValidPaths WHERE registrationTime >= ?1 AND path NOT LIKE '%.drv'",
    )?;
    let rows = q.query_map([i64::try_from(since).unwrap_or(i64::MAX)], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, Option<i64>>(1)?))
    })?;
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
    Ok((built, subst))
}

/// The derivations a job's daemon built (or started building) since `since` (unix seconds,
/// fractional), with start and end relative to `since`, from the daemon's own build log
/// directory `logs` (its `NIX_LOG_DIR`: nothing of a neighbour's is there). Start: the build log's creation (the
/// daemon creates it when the build starts); end: when the output was registered, or the log's
/// last write if later; no registered output: failed or killed (end = the log's last write).
///
/// `built`: the derivations this job's daemon recorded (post-build hook). A build it started
/// whose output another daemon registered first (a shared store) is left out.
pub(super) fn builds_since(
    nix_root: &Path,
    logs: &Path,
    since: f64,
    built: &[String],
) -> Vec<crate::timeline::Build> {
    let logs = logs.join("drvs");
    let secs = |t: std::io::Result<std::time::SystemTime>| {
        t.ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64())
    };
    // The logs written since `since`: (derivation, created, last write).
    let mut logged = Vec::new();
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
            logged.push((
                format!("{prefix}{}", file.trim_end_matches(".bz2")),
                created,
                modified,
            ));
        }
    }
    let registered = registered_by(nix_root, logged.iter().map(|(drv, ..)| drv.as_str()));
    let mut out = Vec::new();
    for (drv, created, modified) in &logged {
        let (drv, created, modified) = (drv.as_str(), *created, *modified);
        let registered = registered.get(drv).copied();
        let name = drv
            .split_once('-')
            .map_or(drv, |(_, n)| n)
            .trim_end_matches(".drv")
            .to_owned();
        if registered.is_some() && !built.iter().any(|b| b.ends_with(drv)) {
            continue;
        }
        let start = (created.max(since) - since).max(0.0);
        let end = match registered {
            Some(t) => (t as f64).max(modified) - since,
            None => modified - since,
        };
        out.push(crate::timeline::Build {
            name,
            start,
            end: end.max(start),
            failed: registered.is_none(),
            memory_bytes: None,
        });
    }
    out.sort_by(|a, b| {
        a.start
            .partial_cmp(&b.start)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    out
}

/// When the last output of each derivation (base names, `<hash>-<name>.drv`) was registered,
/// for those with a registered output: one pass over the store's paths (Nix keeps no index on
/// `deriver`, so a query per derivation would be a pass each). Empty without a database.
fn registered_by<'a>(
    nix_root: &Path,
    drvs: impl Iterator<Item = &'a str>,
) -> std::collections::HashMap<&'a str, i64> {
    let wanted: std::collections::HashSet<&str> = drvs.collect();
    let mut found = std::collections::HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    let Ok(conn) = open(nix_root) else {
        return found;
    };
    let Ok(mut q) = conn.prepare(
        "SELECT deriver, registrationTime FROM ValidPaths WHERE deriver LIKE '/nix/store/%'",
    ) else {
        return found;
    };
    let Ok(rows) = q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))) else {
        return found;
    };
    for (deriver, at) in rows.flatten() {
        let Some(drv) = deriver
            .strip_prefix("/nix/store/")
            .and_then(|d| wanted.get(d))
        else {
            continue;
        };
        let t = found.entry(*drv).or_insert(at);
        *t = (*t).max(at);
    }
    found
}

/// [`snapshot`] of the `db.sqlite` in the directory `held` holds. SQLite looks for a symlink
/// on the path once (`SQLITE_OPEN_NOFOLLOW`), then opens its files by that path (the
/// database, its journal, `-wal` and `-shm`), resolving every directory on the way each
/// time: whoever can change a directory on the path (a daemon that writes the store) could
/// swap it for a symlink between the look and an open and send root's SQLite to another
/// database, or make it create its `-shm` elsewhere. So SQLite gets a path none of whose
/// directories anyone but root can change: on a thread of its own, in a mount namespace that
/// thread alone is in (its mounts made private first, so nothing reaches the host's
/// namespace), the directory is opened again by `reopen` (by descriptor, no symlink followed;
/// a mount can only be bound from the namespace it is in), checked to be the one `held`
/// holds, and bound at `via`, an empty directory of root's; SQLite opens `via/db.sqlite`. The
/// namespace, and the bind with it, end with the thread.
pub(super) fn snapshot_held(
    super::HeldDir { dir: held, reopen }: super::HeldDir,
    via: &Path,
    into: &Path,
) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    let (via, into) = (via.to_path_buf(), into.to_path_buf());
    std::thread::Builder::new()
        .name("flywheel-snapshot".into())
        .spawn(move || {
            let private = |what: &str, e: nix::errno::Errno| {
                StoreError::Private(std::io::Error::other(format!("{what}: {e}")))
            };
            // This thread's own mount namespace (and its own root and working directory:
            // CLONE_NEWNS takes CLONE_FS along), never the process's.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .map_err(|e| private("unshare the mount namespace", e))?;
            nix::mount::mount(
                None::<&str>,
                "/",
                None::<&str>,
                nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .map_err(|e| private("make the mounts private", e))?;
            let dir = reopen().map_err(StoreError::Private)?;
            let id = |fd: &std::os::fd::OwnedFd| {
                nix::sys::stat::fstat(fd.as_raw_fd()).map(|s| (s.st_dev, s.st_ino))
            };
            if id(&dir).map_err(|e| private("inspect", e))?
                != id(&held).map_err(|e| private("inspect", e))?
            {
                return Err(StoreError::Private(std::io::Error::other(
                    "the database's directory was replaced while it was being snapshot",
                )));
            }
            nix::mount::mount(
                Some(format!("/proc/self/fd/{}", dir.as_raw_fd()).as_str()),
                &via,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(|e| private("bind the database's directory", e))?;
            drop((dir, held));
            snapshot(&via.join("db.sqlite"), &into)
        })
        .map_err(StoreError::Private)?
        .join()
        .map_err(|_| StoreError::Thread("the snapshot thread panicked".into()))?
}

pub(super) fn snapshot(db: &Path, into: &Path) -> Result<(), StoreError> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
            | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX
            | rusqlite::OpenFlags::SQLITE_OPEN_NOFOLLOW,
    )
    .map_err(StoreError::Open)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute("VACUUM INTO ?1", [into.to_string_lossy()])?;
    Ok(())
}

/// Valid paths in a store and the sum of their NAR sizes; [`StoreError::Open`] without a
/// database.
pub(super) fn size(nix_root: &Path) -> Result<(u64, u64), StoreError> {
    let conn = open(nix_root)?;
    let (n, b) = conn.query_row(
        "SELECT COUNT(*), COALESCE(SUM(narSize), 0) FROM ValidPaths",
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
    )?;
    Ok((u64::try_from(n).unwrap_or(0), u64::try_from(b).unwrap_or(0)))
}

/// Check a store whose holder died mid-job before it is reused: the database passes SQLite's
/// `quick_check` (structure, indexes, no torn pages; a hot journal is rolled back by opening
/// it) and every registered path's reference points at a registered path. Returns how long it
/// took. A store without a database is fine (it gets a cold bootstrap).
pub(super) fn check(nix_root: &Path) -> Result<Duration, StoreError> {
    let t = Instant::now();
    if !db_path(nix_root).exists() {
        return Ok(t.elapsed());
    }
    // Read-write, so SQLite can roll back a hot journal the dead holder left.
    let conn = rusqlite::Connection::open(db_path(nix_root)).map_err(StoreError::Open)?;
    let verdict: String = conn
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(StoreError::Unchecked)?;
    if verdict != "ok" {
        return Err(StoreError::Damaged(verdict));
    }
    let dangling: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM Refs WHERE reference NOT IN (SELECT id FROM ValidPaths) OR referrer NOT IN (SELECT id FROM ValidPaths)",
            [],
            |r| r.get(0),
        )
        .map_err(StoreError::Unchecked)?;
    if dangling > 0 {
        return Err(StoreError::Dangling(dangling));
    }
    Ok(t.elapsed())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A store database with Nix's schema (the tables this module reads) and `n` paths.
    pub(in crate::store) fn fake_db(root: &Path, n: usize) {
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
        assert_eq!(size(t.path()).ok(), Some((100_000, 100_000 * 100_000)));
        let took = check(t.path()).expect("sound");
        // Printed for the record (the figure in docs/operating-arc.md); not a timed assertion.
        eprintln!("check of a 100k-path store database: {took:?}");
        // A dangling reference is found.
        let c = rusqlite::Connection::open(db_path(t.path())).expect("db");
        c.execute("DELETE FROM ValidPaths WHERE id = 5", [])
            .expect("delete");
        drop(c);
        let e = check(t.path()).expect_err("dangling").to_string();
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
}
