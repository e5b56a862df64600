//! Nix's archive format (NAR): the bytes `nix-store --dump PATH` writes, produced from a store
//! path on disk into any writer, a piece at a time, so a path of any size is streamed with a
//! bounded buffer. Never follows a symlink (it is archived as one).
//!
//! Format: every string is a little-endian u64 length, the bytes, and zero padding to a multiple
//! of 8. `nix-archive-1`, then a node: `(` `type` `regular` [`executable` ``] `contents` <bytes>
//! `)`, or `(` `type` `symlink` `target` <target> `)`, or `(` `type` `directory` then for each
//! entry in byte order `entry` `(` `name` <name> `node` <node> `)`, then `)`.

use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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

/// Write the NAR of `path` into `w`.
pub fn dump(path: &Path, w: &mut impl Write) -> io::Result<()> {
    string(w, b"nix-archive-1")?;
    node(path, w)
}

fn node(path: &Path, w: &mut impl Write) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(path)?;
    string(w, b"(")?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        string(w, b"type")?;
        string(w, b"symlink")?;
        string(w, b"target")?;
        string(w, std::fs::read_link(path)?.as_os_str().as_bytes())?;
    } else if ft.is_file() {
        string(w, b"type")?;
        string(w, b"regular")?;
        if meta.permissions().mode() & 0o100 != 0 {
            string(w, b"executable")?;
            string(w, b"")?;
        }
        string(w, b"contents")?;
        let len = meta.len();
        w.write_all(&len.to_le_bytes())?;
        let mut f = std::fs::File::open(path)?;
        let copied = io::copy(&mut (&mut f).take(len), w)?;
        if copied != len {
            return Err(io::Error::other(format!(
                "{} changed while it was archived",
                path.display()
            )));
        }
        pad(w, len)?;
    } else if ft.is_dir() {
        string(w, b"type")?;
        string(w, b"directory")?;
        let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            string(w, b"entry")?;
            string(w, b"(")?;
            string(w, b"name")?;
            string(w, name.as_bytes())?;
            string(w, b"node")?;
            node(&path.join(&name), w)?;
            string(w, b")")?;
        }
    } else {
        return Err(io::Error::other(format!(
            "{} is neither a file, a directory nor a symlink",
            path.display()
        )));
    }
    string(w, b")")
}

#[cfg(test)]
mod tests {
    use super::*;

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
