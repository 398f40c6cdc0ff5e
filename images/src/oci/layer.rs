//! A layer applied to a directory of its own, the way overlayfs stacks them: the store keeps
//! each layer once, and a service's root is an overlay of its image's layer directories.
//!
//! The rules of package trees hold ([`crate::rootfs`]): every entry is created beneath the
//! layer's directory through real directories only, no absolute paths or `..`, no device
//! nodes or FIFOs, no hard link out of the layer, no setuid/setgid file unless the operator
//! grants it, limits on entries, bytes and path lengths. What layers add:
//! - owners are kept (ids below 65,536: a container's user namespace maps that many), for the
//!   image's users (`mosquitto`, `nobody`) to own their files inside the container;
//! - a whiteout `.wh.NAME` becomes an overlayfs whiteout (a 0:0 character device) `NAME`, and
//!   `.wh..wh..opq` marks its directory opaque (`trusted.overlay.opaque`): the layers below
//!   are hidden exactly as the OCI image spec says;
//! - a symlink's target may be absolute (the service's kernel resolves it inside its own root;
//!   the host never follows it); a relative one may not climb above the root.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::sys::stat::SFlag;

use super::OciError;
use crate::beneath::{is_kind, split, BeneathError, Dir};

/// What a layer may hold.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub max_files: u64,
    /// Uncompressed bytes of the layer's tar.
    pub max_bytes: u64,
    pub max_path_len: usize,
    /// setuid/setgid files are kept (the operator's grant); refused otherwise.
    pub allow_setuid: bool,
}

impl Default for Rules {
    fn default() -> Rules {
        let p = crate::package::Limits::default();
        Rules {
            max_files: p.max_files,
            max_bytes: 2 * p.max_total_bytes,
            max_path_len: p.max_path_len,
            allow_setuid: false,
        }
    }
}

/// Ids a layer's entries may be owned by (a container's user namespace maps this many).
pub const MAX_ID: u64 = 65_536;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// What a layer held.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    pub entries: u64,
    pub whiteouts: u64,
}

/// Applies the layer tar `input` to `dest` (an empty directory). `layer` names it in errors.
pub fn apply(
    input: impl Read,
    dest: &Path,
    rules: &Rules,
    layer: &str,
) -> Result<Applied, OciError> {
    let root = Dir::open(dest).map_err(OciError::store(dest))?;
    let unsafe_entry = |path: &str, why: &str| OciError::Unsafe {
        layer: layer.into(),
        path: path.into(),
        why: why.into(),
    };
    let archive = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::FileTooLarge {
            OciError::TooLarge {
                what: format!("layer {layer}"),
                limit: rules.max_bytes,
            }
        } else {
            OciError::invalid(format!("layer {layer}"), format!("not a valid tar: {e}"))
        }
    };
    let io = |e: Errno| OciError::store(dest)(e.into());
    let mut ar = tar::Archive::new(input);
    let mut done = Applied::default();
    for entry in ar.entries().map_err(archive)? {
        let mut e = entry.map_err(archive)?;
        done.entries += 1;
        if done.entries > rules.max_files {
            return Err(OciError::TooLarge {
                what: format!("layer {layer} (entries)"),
                limit: rules.max_files,
            });
        }
        let raw = e.path().map_err(archive)?.to_string_lossy().into_owned();
        let h = e.header();
        // The layer's root itself (`./`): its mode and owner are the root's.
        if h.entry_type() == tar::EntryType::Directory && is_root(&raw) {
            let (uid, gid) = (h.uid().map_err(archive)?, h.gid().map_err(archive)?);
            if uid >= MAX_ID || gid >= MAX_ID {
                return Err(unsafe_entry(
                    &raw,
                    "owned by an id beyond the 65,536 a container maps",
                ));
            }
            root.chown_self(uid as u32, gid as u32).map_err(io)?;
            let mode = h.mode().map_err(archive)? & 0o7777;
            std::fs::set_permissions(dest, std::fs::Permissions::from_mode(mode))
                .map_err(OciError::store(dest))?;
            continue;
        }
        let rel = crate::rootfs::relative_path(&raw, rules.max_path_len)
            .map_err(|why| unsafe_entry(&raw, why))?;
        let mode = h.mode().map_err(archive)?;
        let (uid, gid) = (h.uid().map_err(archive)?, h.gid().map_err(archive)?);
        if uid >= MAX_ID || gid >= MAX_ID {
            return Err(unsafe_entry(
                &raw,
                "owned by an id beyond the 65,536 a container maps",
            ));
        }
        let (uid, gid) = (uid as u32, gid as u32);
        if mode & 0o6000 != 0 && !rules.allow_setuid && h.entry_type().is_file() {
            return Err(unsafe_entry(
                &raw,
                "setuid or setgid bit (the operator's policy does not grant them)",
            ));
        }
        let (parent_rel, name) = split(&rel);
        let beneath = |e: BeneathError| match e {
            BeneathError::Escapes => unsafe_entry(&raw, "a parent directory is a symlink"),
            BeneathError::NotDirectory => unsafe_entry(&raw, "a parent is not a directory"),
            BeneathError::Io(e) => OciError::store(dest)(e),
        };
        let parent = root.make_dirs(parent_rel).map_err(beneath)?;
        let exists = |e: Errno| match e {
            Errno::EEXIST => unsafe_entry(&raw, "duplicate entry"),
            e => io(e),
        };
        let name_text = name.to_string_lossy();
        if name_text == OPAQUE {
            parent.set_opaque().map_err(io)?;
            done.whiteouts += 1;
            continue;
        }
        if let Some(hidden) = name_text.strip_prefix(WHITEOUT) {
            // Other `.wh..wh.` names are AUFS bookkeeping, meaningless here.
            if hidden.starts_with(WHITEOUT) {
                continue;
            }
            if hidden.is_empty() || hidden == "." || hidden == ".." || hidden.contains('/') {
                return Err(unsafe_entry(&raw, "a whiteout of no name"));
            }
            parent.whiteout(OsStr::new(hidden)).map_err(exists)?;
            done.whiteouts += 1;
            continue;
        }
        match h.entry_type() {
            tar::EntryType::Directory => {
                match parent.stat(name) {
                    Ok(st) if is_kind(&st, SFlag::S_IFDIR) => {}
                    Ok(_) => return Err(unsafe_entry(&raw, "a directory over an existing entry")),
                    Err(_) => parent.mkdir(name, 0o700).map_err(exists)?,
                }
                let d = parent.dir(Path::new(name)).map_err(beneath)?;
                d.chown_self(uid, gid).map_err(io)?;
                parent.chmod_dir(name, mode & 0o7777).map_err(beneath)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let mut f = parent.create_file(name, 0o600).map_err(exists)?;
                std::io::copy(&mut e, &mut f).map_err(archive)?;
                nix::unistd::fchown(
                    &f,
                    Some(nix::unistd::Uid::from_raw(uid)),
                    Some(nix::unistd::Gid::from_raw(gid)),
                )
                .map_err(io)?;
                // After the owner: chown clears setuid bits.
                f.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(OciError::store(dest))?;
            }
            tar::EntryType::Symlink => {
                let link = e
                    .link_name()
                    .map_err(archive)?
                    .ok_or_else(|| unsafe_entry(&raw, "symlink without a target"))?;
                if link.as_os_str().len() > rules.max_path_len {
                    return Err(unsafe_entry(&raw, "symlink target too long"));
                }
                if climbs_out(parent_rel, &link) {
                    return Err(unsafe_entry(&raw, "symlink target climbs out of the root"));
                }
                parent.symlink(&link, name).map_err(exists)?;
                parent.chown(name, uid, gid).map_err(io)?;
            }
            tar::EntryType::Link => {
                let link = e
                    .link_name()
                    .map_err(archive)?
                    .ok_or_else(|| unsafe_entry(&raw, "hard link without a target"))?;
                let src_rel =
                    crate::rootfs::relative_path(&link.to_string_lossy(), rules.max_path_len)
                        .map_err(|why| unsafe_entry(&raw, why))?;
                let (src_parent, src_name) = split(&src_rel);
                let not_there = || {
                    unsafe_entry(
                        &raw,
                        "hard link to an entry that is not earlier in this layer, or through a symlink",
                    )
                };
                let src_dir = root.dir(src_parent).map_err(|_| not_there())?;
                let st = src_dir.stat(src_name).map_err(|_| not_there())?;
                if !is_kind(&st, SFlag::S_IFREG) {
                    return Err(unsafe_entry(
                        &raw,
                        "hard link to something other than a regular file",
                    ));
                }
                parent.link_from(&src_dir, src_name, name).map_err(exists)?;
            }
            other => {
                return Err(unsafe_entry(
                    &raw,
                    &format!("{other:?} entries (device nodes, FIFOs) are not allowed"),
                ))
            }
        }
    }
    Ok(done)
}

/// `.`, `./`, `/`: the layer's root.
fn is_root(path: &str) -> bool {
    Path::new(path)
        .components()
        .all(|c| matches!(c, Component::CurDir | Component::RootDir))
}

/// Does a relative symlink in `dir` reach above the root with its `..`s? (An absolute target
/// starts again at the root, as in the service.)
fn climbs_out(dir: &Path, target: &Path) -> bool {
    let mut depth = dir.components().count() as i64;
    for c in target.components() {
        match c {
            Component::RootDir => depth = 0,
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            Component::Normal(_) => depth += 1,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_symlinks_may_not_climb_above_the_root() {
        assert!(!climbs_out(Path::new("usr/bin"), Path::new("../lib/x")));
        assert!(!climbs_out(Path::new("usr/bin"), Path::new("../../etc")));
        assert!(climbs_out(Path::new("usr/bin"), Path::new("../../../etc")));
        assert!(!climbs_out(Path::new(""), Path::new("/etc/passwd")));
        assert!(climbs_out(Path::new(""), Path::new("a/../../x")));
    }
}
