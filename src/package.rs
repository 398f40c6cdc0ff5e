//! Building service packages from a service folder (the publisher's side of
//! `gatevisor-images`): the service manifest is validated exactly as the gateway will, the
//! rootfs is assembled and packed reproducibly, and the package is signed.

use std::path::{Path, PathBuf};

use gatevisor_images::keys::SecretKey;
use gatevisor_images::package::{self, ArtifactKind, PackageManifest};

use crate::manifest::{ImageRef, Manifest};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{dir}: no service.toml")]
    NoServiceManifest { dir: PathBuf },
    #[error(transparent)]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error("{file}: field `image` must be \"package\" in a packaged service")]
    NotPackageImage { file: PathBuf },
    #[error("cannot assemble the rootfs: {0}")]
    Rootfs(String),
    #[error("{0}")]
    InvalidService(String),
    #[error(transparent)]
    Key(#[from] gatevisor_images::keys::KeyError),
    #[error(transparent)]
    Package(#[from] gatevisor_images::package::PackageError),
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Builds `dir` into a signed package at `out`.
pub fn build(dir: &Path, out: &Path, key_file: &Path) -> Result<PackageManifest, BuildError> {
    let service = dir.join("service.toml");
    if !service.is_file() {
        return Err(BuildError::NoServiceManifest { dir: dir.into() });
    }
    let key = SecretKey::load(key_file)?;
    let staging = tempdir(out)?;
    let res = (|| {
        let rootfs = staging.join("rootfs");
        if dir.join("rootfs").is_dir() {
            crate::supervisor::copy_tree(&dir.join("rootfs"), &rootfs)
                .map_err(|e| BuildError::Rootfs(e.to_string()))?;
        } else {
            let busybox =
                gatevisor_board::ovs::find_sbin("busybox").unwrap_or_else(|| "/bin/busybox".into());
            gatevisor_lxc::rootfs::build_busybox(&busybox, &rootfs)
                .map_err(|e| BuildError::Rootfs(e.to_string()))?;
            if dir.join("files").is_dir() {
                crate::supervisor::copy_tree(&dir.join("files"), &rootfs)
                    .map_err(|e| BuildError::Rootfs(e.to_string()))?;
            }
        }
        // The same tree as a microVM's initramfs: one package serves either runtime.
        let initramfs = cpio_of(&rootfs).map_err(|e| BuildError::Rootfs(e.to_string()))?;
        std::fs::write(staging.join("initramfs.cpio"), &initramfs).map_err(|source| {
            BuildError::Write {
                path: staging.join("initramfs.cpio"),
                source,
            }
        })?;
        let staged = staging.join("service.toml");
        std::fs::copy(&service, &staged).map_err(|source| BuildError::Write {
            path: staged.clone(),
            source,
        })?;
        let m = Manifest::load(&staged).map_err(|e| rename_file(e, &staged, &service))?;
        if !matches!(
            m.image_ref(&staged)?,
            ImageRef::Rootfs(_) | ImageRef::Initramfs(_)
        ) || m.image != "package"
        {
            return Err(BuildError::NotPackageImage {
                file: service.clone(),
            });
        }
        let mut rootfs_tar = Vec::new();
        gatevisor_images::rootfs::pack(&rootfs, &mut rootfs_tar)
            .map_err(|e| BuildError::Rootfs(e.to_string()))?;
        let service_bytes = std::fs::read(&service).map_err(|source| BuildError::Write {
            path: service.clone(),
            source,
        })?;
        let file = std::fs::File::create(out).map_err(|source| BuildError::Write {
            path: out.into(),
            source,
        })?;
        let mut w = std::io::BufWriter::new(file);
        let manifest = package::build(
            &m.name,
            &m.version,
            &[
                ("service.toml", ArtifactKind::Service, &service_bytes),
                ("rootfs.tar", ArtifactKind::Rootfs, &rootfs_tar),
                ("initramfs.cpio", ArtifactKind::Initramfs, &initramfs),
            ],
            &key,
            &mut w,
        )?;
        std::io::Write::flush(&mut w).map_err(|source| BuildError::Write {
            path: out.into(),
            source,
        })?;
        Ok(manifest)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    res
}

/// Errors about the staged copy name the publisher's file.
fn rename_file(e: crate::manifest::ManifestError, staged: &Path, original: &Path) -> BuildError {
    let text = e.to_string().replace(
        &staged.display().to_string(),
        &original.display().to_string(),
    );
    BuildError::InvalidService(text)
}

fn tempdir(near: &Path) -> Result<PathBuf, BuildError> {
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
    let mut c = gatevisor_vmm::cpio::Cpio::new(Vec::new());
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

    #[test]
    fn the_initramfs_of_a_tree_is_reproducible_and_keeps_links_and_modes() {
        let make = |root: &Path| {
            std::fs::create_dir_all(root.join("bin")).unwrap();
            std::fs::write(root.join("bin/svc"), b"ELF...").unwrap();
            std::fs::set_permissions(
                root.join("bin/svc"),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
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
}
