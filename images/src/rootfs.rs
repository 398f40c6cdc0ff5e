//! Root filesystem trees inside packages: packed reproducibly from a directory, and unpacked
//! on the gateway refusing anything that could reach outside the tree or gain privileges:
//! absolute paths, `..`, device nodes and FIFOs, setuid/setgid files, symlinks whose target
//! climbs out of the root, entries that would be written through a symlink, and more entries
//! or longer paths than the limits allow.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::package::{Limits, PackageError};

fn unsafe_entry(path: &str, why: &str) -> PackageError {
    PackageError::Unsafe {
        path: path.into(),
        why: why.into(),
    }
}

/// Packs `dir` into a tar: sorted entries, no timestamps or owners (reproducible).
pub fn pack(dir: &Path, out: impl Write) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut stack = vec![PathBuf::new()];
    let mut all = Vec::new();
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> =
            std::fs::read_dir(dir.join(&rel))?.collect::<Result<Vec<_>, _>>()?;
        names.sort_by_key(|e| e.file_name());
        for e in names {
            let r = rel.join(e.file_name());
            let ty = e.file_type()?;
            if ty.is_dir() {
                stack.push(r.clone());
            }
            all.push((r, ty));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    for (rel, ty) in all {
        let full = dir.join(&rel);
        let meta = std::fs::symlink_metadata(&full)?;
        let mut h = tar::Header::new_ustar();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(meta.permissions().mode() & 0o777);
        if ty.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            tar.append_link(&mut h, &rel, std::fs::read_link(&full)?)?;
        } else if ty.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            tar.append_data(&mut h, &rel, std::io::empty())?;
        } else if ty.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.len());
            tar.append_data(&mut h, &rel, std::fs::File::open(&full)?)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{}: special files cannot go into a package", full.display()),
            ));
        }
    }
    tar.into_inner()?.flush()
}

/// The entry's path as safe relative components, or why not.
fn relative(path: &str, limits: &Limits) -> Result<PathBuf, PackageError> {
    relative_path(path, limits.max_path_len).map_err(|why| unsafe_entry(path, why))
}

/// An archive entry's path as relative components (no root, no `..`, not empty, at most
/// `max_len` bytes), or why not. Shared by package trees and OCI layers.
pub(crate) fn relative_path(path: &str, max_len: usize) -> Result<PathBuf, &'static str> {
    if path.len() > max_len {
        return Err("path too long");
    }
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
            Component::ParentDir => return Err("`..` in the path"),
        }
    }
    if out.as_os_str().is_empty() {
        return Err("empty path");
    }
    Ok(out)
}

/// Starts writing `f`'s data to the device now, without waiting: the flush that makes the
/// install durable then finds most of it already written, while unpacking went on.
fn start_writeback(f: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on an fd we own for the duration of the call; it only
    // schedules writeback of the file's dirty pages and touches no memory of ours. A failure
    // is harmless: the durability comes from the syncfs that follows the unpack.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Unpacks a rootfs tar into `dest` (created), refusing unsafe entries. Every entry is made
/// relative to its parent directory's fd, found beneath `dest` through real directories only
/// ([`crate::beneath`]), so no entry, hard link or later entry can reach outside through a
/// symlink; symlinks are created as they are and then checked, chains included, not to climb
/// out of the root.
pub fn unpack(input: impl Read, dest: &Path, limits: &Limits) -> Result<u64, PackageError> {
    use crate::beneath::{is_kind, split, BeneathError, Dir};
    use nix::errno::Errno;
    use nix::sys::stat::SFlag;
    std::fs::create_dir_all(dest)?;
    let root = Dir::open(dest)?;
    let mut ar = tar::Archive::new(input);
    let mut count = 0u64;
    let mut symlinks = Vec::new();
    let archive = |e: std::io::Error| PackageError::Archive(e.to_string());
    for entry in ar.entries().map_err(archive)? {
        let mut e = entry.map_err(archive)?;
        count += 1;
        if count > limits.max_files {
            return Err(PackageError::TooManyFiles {
                limit: limits.max_files,
            });
        }
        let raw = e.path().map_err(archive)?.to_string_lossy().into_owned();
        let rel = relative(&raw, limits)?;
        let mode = e.header().mode().map_err(archive)?;
        if mode & 0o6000 != 0 {
            return Err(unsafe_entry(&raw, "setuid or setgid bit"));
        }
        let (parent_rel, name) = split(&rel);
        let beneath = |raw: &str, e: BeneathError| match e {
            BeneathError::Escapes => unsafe_entry(raw, "a parent directory is a symlink"),
            BeneathError::NotDirectory => unsafe_entry(raw, "a parent is not a directory"),
            BeneathError::Io(e) => PackageError::Io(e),
        };
        let parent = root.make_dirs(parent_rel).map_err(|e| beneath(&raw, e))?;
        let exists = |r: Result<_, Errno>| match r {
            Err(Errno::EEXIST) => unsafe_entry(&raw, "duplicate entry"),
            Err(e) => PackageError::Io(e.into()),
            Ok(()) => unreachable!(),
        };
        match e.header().entry_type() {
            tar::EntryType::Directory => {
                match parent.stat(name) {
                    Ok(st) if is_kind(&st, SFlag::S_IFDIR) => {}
                    Ok(_) => return Err(unsafe_entry(&raw, "a directory over an existing entry")),
                    Err(_) => parent.mkdir(name, 0o700).map_err(|e| exists(Err(e)))?,
                }
                parent
                    .chmod_dir(name, mode & 0o777)
                    .map_err(|e| beneath(&raw, e))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = parent
                    .create_file(name, 0o600)
                    .map_err(|e| exists(Err(e)))?;
                std::io::copy(&mut e, &mut f).map_err(archive)?;
                f.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))?;
                start_writeback(&f);
            }
            tar::EntryType::Symlink => {
                let link = e
                    .link_name()
                    .map_err(archive)?
                    .ok_or_else(|| unsafe_entry(&raw, "symlink without a target"))?;
                if link.as_os_str().len() > limits.max_path_len {
                    return Err(unsafe_entry(&raw, "symlink target too long"));
                }
                parent.symlink(&link, name).map_err(|e| exists(Err(e)))?;
                symlinks.push((raw, rel));
            }
            tar::EntryType::Link => {
                let link = e
                    .link_name()
                    .map_err(archive)?
                    .ok_or_else(|| unsafe_entry(&raw, "hard link without a target"))?;
                let src_rel = relative(&link.to_string_lossy(), limits)?;
                let (src_parent, src_name) = split(&src_rel);
                let not_there =
                    || unsafe_entry(&raw, "hard link to a missing entry, or through a symlink");
                let src_dir = root.dir(src_parent).map_err(|_| not_there())?;
                let st = src_dir.stat(src_name).map_err(|_| not_there())?;
                if !is_kind(&st, SFlag::S_IFREG) {
                    return Err(unsafe_entry(
                        &raw,
                        "hard link to something other than a regular file",
                    ));
                }
                parent
                    .link_from(&src_dir, src_name, name)
                    .map_err(|e| exists(Err(e)))?;
            }
            other => {
                return Err(unsafe_entry(
                    &raw,
                    &format!("{other:?} entries (device nodes, FIFOs) are not allowed"),
                ))
            }
        }
    }
    // Checked once the whole tree is there: a chain's links may come in any order.
    for (raw, rel) in symlinks {
        if crate::beneath::symlink_escapes(&root, &rel).map_err(|e| PackageError::Io(e.into()))? {
            return Err(unsafe_entry(&raw, "symlink target climbs out of the root"));
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_is_reproducible_and_unpack_restores_the_tree() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        std::os::unix::fs::symlink("tool", src.join("bin/alias")).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        pack(&src, &mut a).unwrap();
        pack(&src, &mut b).unwrap();
        assert_eq!(a, b);
        let n = unpack(&a[..], &d.path().join("out"), &Limits::default()).unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            std::fs::read(d.path().join("out/bin/tool")).unwrap(),
            b"#!/bin/sh\necho hi\n"
        );
        assert_eq!(
            std::fs::read_link(d.path().join("out/bin/alias")).unwrap(),
            Path::new("tool")
        );
    }
}
