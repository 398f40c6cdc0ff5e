//! A service's root filesystem as a read-only checkout of the image store: the store's
//! unpacked tree is the lower layer of an overlay, the service's own directory holds the
//! writable layer above it. A packaged tree is on flash once, however often it is started,
//! and nothing the service writes reaches the store.
//!
//! ```text
//! SERVICE_DIR/rootfs          the overlay (what the container's root is)
//! SERVICE_DIR/layer/upper     what the service wrote (owned by its root)
//! SERVICE_DIR/layer/work      the overlay's scratch
//! ```
//!
//! The mount lives as long as the host's mount table: after a reboot the directories are
//! there and the overlay is not, and [`Checkout::mount`] puts it back.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("checkout {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot mount the overlay of {lower} at {rootfs}")]
    Mount {
        lower: PathBuf,
        rootfs: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("cannot unmount {0}")]
    Unmount(PathBuf, #[source] nix::Error),
    /// Overlay options are a comma-separated list of `key=path:path`: a path holding one
    /// of those characters cannot be named.
    #[error("{0}: an overlay layer's path may not contain ',', ':' or '\\'")]
    BadPath(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckoutError + '_ {
    move |source| CheckoutError::Io {
        path: path.into(),
        source,
    }
}

/// The checkout layout inside one service directory.
#[derive(Debug, Clone)]
pub struct Checkout {
    dir: PathBuf,
}

impl Checkout {
    pub fn at(service_dir: &Path) -> Checkout {
        Checkout {
            dir: service_dir.to_path_buf(),
        }
    }

    /// Where the service's root is (the overlay, once mounted).
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }
    pub fn upper(&self) -> PathBuf {
        self.dir.join("layer/upper")
    }
    fn work(&self) -> PathBuf {
        self.dir.join("layer/work")
    }

    /// This service directory was made as a checkout (its writable layer is there), mounted
    /// or not.
    pub fn exists(&self) -> bool {
        self.upper().is_dir()
    }

    /// The overlay is mounted at [`Self::rootfs`]: it is another filesystem than the service
    /// directory's.
    pub fn is_mounted(&self) -> bool {
        match (
            std::fs::metadata(self.rootfs()),
            std::fs::metadata(&self.dir),
        ) {
            (Ok(r), Ok(d)) => r.dev() != d.dev(),
            _ => false,
        }
    }

    /// Mounts `lower` (read-only: the overlay never writes to it) under the service's
    /// writable layer, creating that layer (owned by `owner`, the container's root on the
    /// host) if it is not there. Mounted already: nothing to do.
    pub fn mount(&self, lower: &Path, owner: u32) -> Result<(), CheckoutError> {
        if self.is_mounted() {
            return Ok(());
        }
        let (rootfs, upper, work) = (self.rootfs(), self.upper(), self.work());
        for p in [lower, &upper, &work] {
            let s = p.as_os_str().as_encoded_bytes();
            if s.iter().any(|c| b",:\\".contains(c)) {
                return Err(CheckoutError::BadPath(p.to_path_buf()));
            }
        }
        for d in [&rootfs, &upper, &work] {
            std::fs::create_dir_all(d).map_err(io(d))?;
        }
        // The merged root takes its owner and mode from the upper layer's root.
        let lower_meta = std::fs::metadata(lower).map_err(io(lower))?;
        std::os::unix::fs::chown(&upper, Some(owner), Some(owner)).map_err(io(&upper))?;
        std::fs::set_permissions(
            &upper,
            std::os::unix::fs::PermissionsExt::from_mode(lower_meta.mode() & 0o7777),
        )
        .map_err(io(&upper))?;
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|source| CheckoutError::Mount {
            lower: lower.to_path_buf(),
            rootfs: rootfs.clone(),
            source,
        })
    }

    /// Takes the overlay off (detached: a container that still has it as its root keeps it
    /// until it ends). Not mounted: nothing to do.
    pub fn unmount(&self) -> Result<(), CheckoutError> {
        let rootfs = self.rootfs();
        while self.is_mounted() {
            nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH)
                .map_err(|e| CheckoutError::Unmount(rootfs.clone(), e))?;
        }
        Ok(())
    }

    /// Unmounts the overlay and removes the writable layer (the service's root is something
    /// else from now on: a disk image built from it).
    pub fn discard(&self) -> Result<(), CheckoutError> {
        self.unmount()?;
        let layer = self.dir.join("layer");
        match std::fs::remove_dir_all(&layer) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&layer)(e)),
            _ => Ok(()),
        }
    }
}

/// Gives a tree the store unpacked (every entry root's) to `owner` as owner and group, every
/// entry, symlinks themselves. The tree's root is changed last, so a tree whose root is
/// `owner`'s was given whole, and giving it again costs one `stat`. Answers whether it
/// changed anything.
pub fn give_tree(root: &Path, owner: u32) -> Result<bool, CheckoutError> {
    let m = std::fs::symlink_metadata(root).map_err(io(root))?;
    if m.uid() == owner && m.gid() == owner {
        return Ok(false);
    }
    fn walk(dir: &Path, owner: u32) -> Result<(), CheckoutError> {
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let p = e.map_err(io(dir))?.path();
            let m = std::fs::symlink_metadata(&p).map_err(io(&p))?;
            if m.is_dir() {
                walk(&p, owner)?;
            }
            if m.uid() != owner || m.gid() != owner {
                std::os::unix::fs::lchown(&p, Some(owner), Some(owner)).map_err(io(&p))?;
            }
        }
        Ok(())
    }
    walk(root, owner)?;
    std::os::unix::fs::lchown(root, Some(owner), Some(owner)).map_err(io(root))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn a_checkout_reads_the_store_writes_its_own_layer_and_comes_back_after_an_unmount() {
        if !root() {
            eprintln!("skipped: mounting an overlay needs root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let lower = d.path().join("store/rootfs");
        std::fs::create_dir_all(lower.join("etc")).unwrap();
        std::fs::write(lower.join("etc/name"), "store").unwrap();
        assert!(give_tree(&lower, 100_000).unwrap());
        assert!(!give_tree(&lower, 100_000).unwrap(), "given already");
        let c = Checkout::at(&d.path().join("svc"));
        assert!(!c.exists() && !c.is_mounted());
        c.mount(&lower, 100_000).unwrap();
        assert!(c.exists() && c.is_mounted());
        c.mount(&lower, 100_000).unwrap();
        let meta = std::fs::metadata(c.rootfs()).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (100_000, 100_000));
        assert_eq!(
            std::fs::read_to_string(c.rootfs().join("etc/name")).unwrap(),
            "store"
        );
        std::fs::write(c.rootfs().join("etc/name"), "service").unwrap();
        std::fs::write(c.rootfs().join("new"), "x").unwrap();
        assert_eq!(
            std::fs::read_to_string(lower.join("etc/name")).unwrap(),
            "store",
            "the store's tree is not written"
        );
        assert!(!lower.join("new").exists());
        assert!(c.upper().join("etc/name").exists());
        c.unmount().unwrap();
        assert!(!c.is_mounted());
        c.unmount().unwrap();
        // A reboot: the layers are there, the mount is not.
        c.mount(&lower, 100_000).unwrap();
        assert_eq!(
            std::fs::read_to_string(c.rootfs().join("etc/name")).unwrap(),
            "service"
        );
        c.unmount().unwrap();
    }

    #[test]
    fn a_layer_path_the_overlay_options_cannot_name_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let c = Checkout::at(&d.path().join("svc"));
        let e = c.mount(&d.path().join("a,upperdir=/x"), 0).unwrap_err();
        assert!(matches!(e, CheckoutError::BadPath(_)), "{e}");
        assert!(!c.rootfs().exists(), "nothing made");
    }
}
