//! The publisher's side: a service folder built into a signed package.
//!
//! A service folder holds `service.toml` and either `rootfs/` (the whole tree) or `files/`
//! (laid over a base tree the caller writes, e.g. a busybox system). The tree is packed
//! twice, as `rootfs.tar` for a container and as `initramfs.cpio` for a microVM, so one
//! package serves either runtime; both are reproducible (the same folder gives the same
//! bytes). What a service manifest may say is not this crate's business: the caller checks
//! it, as the gateway will at install, through [`Service`].

use std::path::{Path, PathBuf};

use crate::keys::SecretKey;
use crate::package::{self, ArtifactKind, PackageManifest};

/// What only the caller knows about a service folder.
pub trait Service {
    /// Checks the folder's service manifest, copied to `staged` next to the staged tree
    /// (`staged`'s directory has `rootfs/` and `initramfs.cpio`), as the gateway will check
    /// it at install;
    /// answers the service's name and version.
    fn check(&self, staged: &Path) -> Result<(String, String), String>;
    /// Writes the base tree that a folder's `files/` are laid over into `root` (an empty
    /// directory), for a folder without `rootfs/`.
    fn base(&self, root: &Path) -> Result<(), String>;
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{dir}: no service.toml")]
    NoServiceManifest { dir: PathBuf },
    #[error("{0}")]
    InvalidService(String),
    #[error("cannot assemble the rootfs: {0}")]
    Rootfs(String),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error(transparent)]
    Package(#[from] crate::package::PackageError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Builds the service folder `dir` into a package at `out`, signed with the key in
/// `key_file`.
pub fn build(
    dir: &Path,
    out: &Path,
    key_file: &Path,
    service: &dyn Service,
) -> Result<PackageManifest, BuildError> {
    let manifest_file = dir.join("service.toml");
    if !manifest_file.is_file() {
        return Err(BuildError::NoServiceManifest { dir: dir.into() });
    }
    let key = SecretKey::load(key_file)?;
    let staging = staging_dir(out)?;
    let res = (|| {
        let rootfs = staging.join("rootfs");
        let tree_err = |e: std::io::Error| BuildError::Rootfs(e.to_string());
        if dir.join("rootfs").is_dir() {
            copy_tree(&dir.join("rootfs"), &rootfs).map_err(tree_err)?;
        } else {
            std::fs::create_dir_all(&rootfs).map_err(tree_err)?;
            service.base(&rootfs).map_err(BuildError::Rootfs)?;
            if dir.join("files").is_dir() {
                copy_tree(&dir.join("files"), &rootfs).map_err(tree_err)?;
            }
        }
        let initramfs = cpio_of(&rootfs).map_err(tree_err)?;
        let cpio_file = staging.join("initramfs.cpio");
        std::fs::write(&cpio_file, &initramfs).map_err(|source| BuildError::Write {
            path: cpio_file,
            source,
        })?;
        let staged = staging.join("service.toml");
        std::fs::copy(&manifest_file, &staged).map_err(|source| BuildError::Write {
            path: staged.clone(),
            source,
        })?;
        let (name, version) = service.check(&staged).map_err(|e| {
            // Errors about the staged copy name the publisher's file.
            BuildError::InvalidService(e.replace(
                &staged.display().to_string(),
                &manifest_file.display().to_string(),
            ))
        })?;
        let mut rootfs_tar = Vec::new();
        crate::rootfs::pack(&rootfs, &mut rootfs_tar)
            .map_err(|e| BuildError::Rootfs(e.to_string()))?;
        let service_bytes = std::fs::read(&manifest_file).map_err(|source| BuildError::Write {
            path: manifest_file.clone(),
            source,
        })?;
        let write_err = |source| BuildError::Write {
            path: out.into(),
            source,
        };
        let file = std::fs::File::create(out).map_err(write_err)?;
        let mut w = std::io::BufWriter::new(file);
        let manifest = package::build(
            &name,
            &version,
            &[
                ("service.toml", ArtifactKind::Service, &service_bytes),
                ("rootfs.tar", ArtifactKind::Rootfs, &rootfs_tar),
                ("initramfs.cpio", ArtifactKind::Initramfs, &initramfs),
            ],
            &key,
            &mut w,
        )?;
        std::io::Write::flush(&mut w).map_err(write_err)?;
        Ok(manifest)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    res
}

/// A scratch directory next to `near` (same filesystem, emptied first).
fn staging_dir(near: &Path) -> Result<PathBuf, BuildError> {
    let parent = near
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let p = parent.join(format!(".gvbuild-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).map_err(|source| BuildError::Write {
        path: p.clone(),
        source,
    })?;
    Ok(p)
}

/// Copies a directory tree on the publisher's machine: files with their modes, directories
/// and symlinks as they are. Device nodes, FIFOs and sockets are refused. (Trees from
/// outside on the gateway are copied with [`crate::beneath::copy_tree`] instead.)
pub fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let to = dst.join(entry.file_name());
        if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &to)?;
        } else if ty.is_dir() {
            copy_tree(&entry.path(), &to)?;
            let mode = entry.metadata()?.permissions().mode();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        } else if ty.is_file() {
            std::fs::copy(entry.path(), &to)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{}: special files are not allowed in a rootfs",
                    entry.path().display()
                ),
            ));
        }
    }
    Ok(())
}

/// The rootfs tree `dir` as a newc cpio archive (a microVM's initramfs), in name order with
/// fixed metadata, so the same tree gives the same bytes.
pub fn cpio_of(dir: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let mut all = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                stack.push(r.clone());
            }
            all.push(r);
        }
    }
    all.sort();
    let mut c = crate::cpio::Cpio::new(Vec::new());
    for rel in all {
        let full = dir.join(&rel);
        let name = rel.to_string_lossy();
        let meta = std::fs::symlink_metadata(&full)?;
        let ty = meta.file_type();
        if ty.is_symlink() {
            let target = std::fs::read_link(&full)?;
            c.symlink(&name, &target.to_string_lossy())?;
        } else if ty.is_dir() {
            c.dir(&name)?;
        } else if ty.is_file() {
            c.file(
                &name,
                meta.permissions().mode() & 0o777,
                &std::fs::read(&full)?,
            )?;
        }
        // Device nodes, sockets and FIFOs are not part of a service image.
    }
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_initramfs_of_a_tree_is_reproducible_and_keeps_links_and_modes() {
        let make = |root: &Path| {
            std::fs::create_dir_all(root.join("bin")).unwrap();
            std::fs::write(root.join("bin/svc"), b"ELF...").unwrap();
            std::fs::set_permissions(root.join("bin/svc"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            std::os::unix::fs::symlink("svc", root.join("bin/alias")).unwrap();
            std::fs::create_dir_all(root.join("etc")).unwrap();
            std::fs::write(root.join("etc/conf"), b"x = 1\n").unwrap();
        };
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        make(a.path());
        make(b.path());
        let ca = cpio_of(a.path()).unwrap();
        assert_eq!(ca, cpio_of(b.path()).unwrap(), "same tree, same bytes");
        let text = String::from_utf8_lossy(&ca);
        // Entries in name order: bin, bin/alias (a symlink to svc), bin/svc (0755), etc, ...
        let order: Vec<usize> = ["bin\0", "bin/alias\0", "bin/svc\0", "etc\0", "etc/conf\0"]
            .iter()
            .map(|n| text.find(n).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert!(text.contains("000081ed"), "bin/svc keeps mode 0755");
        assert!(text.contains("0000a1ff"), "bin/alias is a symlink");
    }

    #[test]
    fn copy_tree_keeps_symlinks_and_modes() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(src.join("bin/tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("tool", src.join("bin/alias")).unwrap();
        copy_tree(&src, &d.path().join("dst")).unwrap();
        let dst = d.path().join("dst/bin");
        assert_eq!(
            std::fs::read_link(dst.join("alias")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(
            std::fs::metadata(dst.join("tool"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
    }

    /// A folder with `files/` over the caller's base, checked by the caller, signed: the
    /// package verifies with the key and carries the tree in both forms; the same folder
    /// builds the same bytes; a manifest the caller refuses builds nothing and names the
    /// publisher's file.
    #[test]
    fn a_folder_builds_into_a_signed_reproducible_package_or_a_clear_error() {
        struct Svc;
        impl Service for Svc {
            fn check(&self, staged: &Path) -> Result<(String, String), String> {
                let text = std::fs::read_to_string(staged).unwrap();
                if text.contains("bad") {
                    return Err(format!("{}: field `bad` is not allowed", staged.display()));
                }
                assert!(staged.with_file_name("rootfs").join("bin/svc").is_file());
                assert!(staged.with_file_name("initramfs.cpio").is_file());
                Ok(("svc".into(), "1.0.0".into()))
            }
            fn base(&self, root: &Path) -> Result<(), String> {
                std::fs::create_dir_all(root.join("etc")).map_err(|e| e.to_string())?;
                std::fs::write(root.join("etc/base"), b"base\n").map_err(|e| e.to_string())
            }
        }
        let d = tempfile::tempdir().unwrap();
        let key = crate::keys::SecretKey::generate().unwrap();
        let key_file = d.path().join("publisher.key");
        key.save(&key_file, "test").unwrap();
        let folder = d.path().join("svc");
        std::fs::create_dir_all(folder.join("files/bin")).unwrap();
        std::fs::write(folder.join("files/bin/svc"), b"ELF...").unwrap();
        std::fs::write(folder.join("service.toml"), b"name = \"svc\"\n").unwrap();
        let (a, b) = (d.path().join("a.gvpkg"), d.path().join("b.gvpkg"));
        let m = build(&folder, &a, &key_file, &Svc).unwrap();
        build(&folder, &b, &key_file, &Svc).unwrap();
        assert_eq!((m.name.as_str(), m.version.as_str()), ("svc", "1.0.0"));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let kinds: Vec<ArtifactKind> = m.artifacts.iter().map(|a| a.kind).collect();
        assert_eq!(
            kinds,
            [
                ArtifactKind::Service,
                ArtifactKind::Rootfs,
                ArtifactKind::Initramfs
            ]
        );
        let peeked = package::peek(std::fs::File::open(&a).unwrap()).unwrap();
        assert_eq!(peeked, m);
        let rootfs = m.artifact(ArtifactKind::Rootfs).unwrap();
        assert!(rootfs.size > 0);

        std::fs::write(folder.join("service.toml"), b"bad = 1\n").unwrap();
        let c = d.path().join("c.gvpkg");
        let e = build(&folder, &c, &key_file, &Svc).unwrap_err().to_string();
        assert!(
            e.contains(&folder.join("service.toml").display().to_string()),
            "{e}"
        );
        assert!(e.contains("field `bad`"), "{e}");
        assert!(!c.exists(), "nothing is written");
        let e = build(d.path(), &c, &key_file, &Svc).unwrap_err();
        assert!(matches!(e, BuildError::NoServiceManifest { .. }), "{e}");
        // The staging directory is gone either way.
        let left: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".gvbuild"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
