//! Nix's archive format (NAR): the bytes `nix-store --dump PATH` writes, produced from a store
//! path on disk into any writer, a piece at a time, so a path of any size is streamed with a
//! bounded buffer. Never follows a symlink (it is archived as one), never opens anything but a
//! regular file or a directory, and reaches every entry by its parent's descriptor.
//!
//! Format: every string is a little-endian u64 length, the bytes, and zero padding to a multiple
//! of 8. `nix-archive-1`, then a node: `(` `type` `regular` [`executable` ``] `contents` <bytes>
//! `)`, or `(` `type` `symlink` `target` <target> `)`, or `(` `type` `directory` then for each
//! entry in byte order `entry` `(` `name` <name> `node` <node> `)`, then `)`.

use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::workdir::{open_dir_at, stat_at};

fn pad(w: &mut impl Write, len: u64) -> io::Result<()> {
    let rem = (len % 8) as usize;
    if rem != 0 {
        w.write_all(&[0u8; 8][..8 - rem])?;
    }
    Ok(())
}

fn string(w: &mut impl Write, s: &[u8]) -> io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s)?;
    pad(w, s.len() as u64)
}

/// Write the NAR of `path` into `w`. Every entry below `path` is reached through its parent
/// directory's descriptor with `O_NOFOLLOW` and checked to be the entry that was listed: a
/// symlink swapped in is never followed (the path fails), a FIFO or device is never opened
/// for reading (`O_NONBLOCK`, and anything but a file, directory or symlink fails the path).
pub fn dump(path: &Path, w: &mut impl Write) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::other(format!("{} names no entry", path.display())))?;
    let dir = open_dir_at(None, parent.as_os_str())?;
    dump_at(dir.as_fd(), name, w)
}

/// Write the NAR of the entry `name` in the directory `dir` into `w`. Directories are walked
/// with a stack of their descriptors (at most [`MAX_DEPTH`] deep), not by recursion.
pub fn dump_at(dir: BorrowedFd<'_>, name: &OsStr, w: &mut impl Write) -> io::Result<()> {
    string(w, b"nix-archive-1")?;
    let name = CString::new(name.as_bytes()).map_err(io::Error::other)?;
    let mut stack: Vec<Listing> = Vec::new();
    if let Some(d) = node(dir, &name, w)? {
        stack.push(d);
    }
    while let Some(top) = stack.last_mut() {
        match top.names.next() {
            Some(n) => {
                string(w, b"entry")?;
                string(w, b"(")?;
                string(w, b"name")?;
                string(w, n.as_bytes())?;
                string(w, b"node")?;
                match node(top.fd.as_fd(), &n, w)? {
                    Some(_) if stack.len() >= MAX_DEPTH => {
                        return Err(io::Error::other(format!(
                            "{} is more than {MAX_DEPTH} directories deep",
                            n.to_string_lossy()
                        )))
                    }
                    Some(d) => stack.push(d),
                    // The entry's node is complete: close the entry.
                    None => string(w, b")")?,
                }
            }
            None => {
                stack.pop();
                // Close the directory's node, and the entry it was in.
                string(w, b")")?;
                if !stack.is_empty() {
                    string(w, b")")?;
                }
            }
        }
    }
    Ok(())
}

/// Directories deeper than this fail the path (one descriptor a level).
const MAX_DEPTH: usize = 512;

/// A directory being archived: its descriptor and the names still to write, in byte order.
struct Listing {
    fd: OwnedFd,
    names: std::vec::IntoIter<CString>,
}

fn kind(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// Open `name` in `dir` without following a symlink or blocking on a FIFO, and check that it
/// is still the entry `st` describes.
fn open_same(dir: BorrowedFd<'_>, name: &CStr, st: &FileStat, flags: OFlag) -> io::Result<OwnedFd> {
    let fd = nix::fcntl::openat(
        Some(dir.as_raw_fd()),
        name,
        flags
            | OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_CLOEXEC
            | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| changed(name, e.into()))?;
    // SAFETY: openat returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let now = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(io::Error::from)?;
    if (now.st_dev, now.st_ino, kind(&now)) != (st.st_dev, st.st_ino, kind(st)) {
        return Err(changed(
            name,
            io::Error::other("another entry took its place"),
        ));
    }
    Ok(fd)
}

fn changed(name: &CStr, e: io::Error) -> io::Error {
    io::Error::other(format!(
        "{} changed while it was archived: {e}",
        name.to_string_lossy()
    ))
}

/// Write the node of `name` in `dir`: a symlink or a regular file whole; a directory's
/// opening, returned as a [`Listing`] for the caller to walk and close.
fn node(dir: BorrowedFd<'_>, name: &CStr, w: &mut impl Write) -> io::Result<Option<Listing>> {
    let st = stat_at(dir, name)?;
    string(w, b"(")?;
    let k = kind(&st);
    if k == SFlag::S_IFLNK {
        string(w, b"type")?;
        string(w, b"symlink")?;
        string(w, b"target")?;
        let target =
            nix::fcntl::readlinkat(Some(dir.as_raw_fd()), name).map_err(io::Error::from)?;
        string(w, target.as_bytes())?;
    } else if k == SFlag::S_IFREG {
        let fd = open_same(dir, name, &st, OFlag::empty())?;
        string(w, b"type")?;
        string(w, b"regular")?;
        if st.st_mode & 0o100 != 0 {
            string(w, b"executable")?;
            string(w, b"")?;
        }
        string(w, b"contents")?;
        let len = u64::try_from(st.st_size).unwrap_or(0);
        w.write_all(&len.to_le_bytes())?;
        let mut f = std::fs::File::from(fd);
        let copied = io::copy(&mut (&mut f).take(len), w)?;
        if copied != len {
            return Err(changed(name, io::Error::other("it shrank")));
        }
        pad(w, len)?;
    } else if k == SFlag::S_IFDIR {
        let fd = open_same(dir, name, &st, OFlag::O_DIRECTORY)?;
        string(w, b"type")?;
        string(w, b"directory")?;
        let listing = nix::dir::Dir::openat(
            Some(fd.as_raw_fd()),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)?;
        let mut names: Vec<CString> = Vec::new();
        for entry in listing.into_iter() {
            let entry = entry.map_err(io::Error::from)?;
            let n = entry.file_name();
            if n != c"." && n != c".." {
                names.push(n.to_owned());
            }
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        return Ok(Some(Listing {
            fd,
            names: names.into_iter(),
        }));
    } else {
        return Err(io::Error::other(format!(
            "{} is neither a file, a directory nor a symlink",
            name.to_string_lossy()
        )));
    }
    string(w, b")")?;
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_tree_deeper_than_the_bound_fails_instead_of_exhausting_the_stack() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("out");
        let mut d = p.clone();
        for _ in 0..=MAX_DEPTH + 1 {
            d.push("d");
        }
        std::fs::create_dir_all(&d).expect("mkdir");
        let e = dump(&p, &mut std::io::sink()).expect_err("too deep");
        assert!(e.to_string().contains("directories deep"), "{e}");
    }

    #[test]
    fn a_fifo_fails_the_path_at_once_instead_of_blocking() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("out");
        std::fs::create_dir(&p).expect("mkdir");
        nix::unistd::mkfifo(&p.join("pipe"), Mode::from_bits_truncate(0o644)).expect("mkfifo");
        let started = std::time::Instant::now();
        let e = dump(&p, &mut Vec::new()).expect_err("a fifo is not archived");
        assert!(e.to_string().contains("pipe is neither a file"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    /// A job that can write the tree while the agent archives it swaps a directory for a
    /// symlink to a file outside: the archive must never hold the outside file's bytes.
    #[test]
    fn a_directory_swapped_for_a_symlink_while_archived_is_never_followed() {
        let t = tempfile::tempdir().expect("tempdir");
        let outside = t.path().join("outside");
        std::fs::create_dir(&outside).expect("mkdir");
        let secret = format!("outside-secret-{}", std::process::id());
        std::fs::write(outside.join("f"), &secret).expect("write");
        let p = t.path().join("out");
        std::fs::create_dir_all(p.join("sub")).expect("mkdir");
        std::fs::write(p.join("sub/f"), "inside").expect("write");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swaps = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let racer = {
            let (p, outside, stop, swaps) =
                (p.clone(), outside.clone(), stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                let (real, link, tmp) = (p.join("sub"), p.join("link"), p.join("real"));
                std::os::unix::fs::symlink(&outside, &link).expect("symlink");
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // sub: directory -> symlink -> directory, each by an atomic rename.
                    std::fs::rename(&real, &tmp).expect("rename");
                    std::fs::rename(&link, &real).expect("rename");
                    std::fs::rename(&real, &link).expect("rename");
                    std::fs::rename(&tmp, &real).expect("rename");
                    swaps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        };
        let (mut archived, mut refused, mut saw_link) = (0, 0, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            let mut out = Vec::new();
            match dump(&p, &mut out) {
                Ok(()) => archived += 1,
                Err(_) => refused += 1,
            }
            let text = String::from_utf8_lossy(&out);
            assert!(!text.contains(&secret), "the archive followed the symlink");
            if text.contains(outside.to_str().expect("utf-8")) {
                saw_link += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        racer.join().expect("racer");
        // The race ran: the tree changed under the archiver many times.
        assert!(swaps.load(std::sync::atomic::Ordering::Relaxed) > 100);
        assert!(archived + refused > 100, "{archived} {refused}");
        assert!(
            saw_link + refused > 0,
            "the swap was never seen: {archived} archived"
        );
    }

    #[test]
    fn a_tree_archives_to_the_known_bytes() {
        let t = tempfile::tempdir().expect("tempdir");
        let p = t.path().join("out");
        std::fs::create_dir(&p).expect("mkdir");
        std::fs::write(p.join("b"), "hello").expect("write");
        std::fs::write(p.join("a"), "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(p.join("a"), std::fs::Permissions::from_mode(0o555))
            .expect("chmod");
        std::os::unix::fs::symlink("b", p.join("c")).expect("symlink");
        let mut out = Vec::new();
        dump(&p, &mut out).expect("dump");
        let mut want = Vec::new();
        for s in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"a",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"#!/bin/sh\n",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"b",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"hello",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"c",
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"b",
            b")",
            b")",
            b")",
        ] {
            string(&mut want, s).expect("string");
        }
        assert_eq!(out, want);
        assert_eq!(out.len() % 8, 0);
    }
}
