//! A service's root filesystem as a read-only checkout of the image store: the store's
//! unpacked tree is the lower layer of an overlay, the service's own directory holds the
//! writable layer above it. A packaged tree is on flash once, however often it is started,
//! and nothing the service writes reaches the store.
//!
//! ```text
//! SERVICE_DIR/rootfs          the overlay (what the container's root is)
//! SERVICE_DIR/layer/upper     what the service wrote (owned by its root)
//! SERVICE_DIR/layer/work      the overlay's scratch
//! SERVICE_DIR/lower/N         an OCI image's layer N (top first), idmapped for the
//!                             container's user namespace
//! ```
//!
//! An OCI image's root is the overlay of its layers, each stored once with the image's own
//! owners: for an unprivileged container each layer is first attached under `lower/` through
//! an idmapped mount ([`crate::idmap`]), so that the image's root and users are the
//! container's, and the same layer serves every service and user namespace.
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
        self.mount_lowers(&[lower.to_path_buf()], owner)
    }

    /// Puts the service's writable layer (`layer/`) on a filesystem of its own, `mib` MiB
    /// (`layer.img`, ext4, made the first time and kept: what the service wrote stays across
    /// restarts and reboots), so that what it writes is bounded while the read-only lower
    /// layers are shared. Mounted already: nothing to do. Before [`Self::mount_layers`].
    pub fn bound_layer(&self, mib: u32) -> Result<(), CheckoutError> {
        let layer = self.dir.join("layer");
        std::fs::create_dir_all(&layer).map_err(io(&layer))?;
        if mounted_at(&layer) {
            return Ok(());
        }
        let img = self.dir.join("layer.img");
        if !img.exists() {
            let tmp = self.dir.join("layer.img.tmp");
            let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.set_len(u64::from(mib) << 20).map_err(io(&tmp))?;
            drop(f);
            let out = std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&tmp)
                .output()
                .map_err(io(&tmp))?;
            if !out.status.success() {
                let _ = std::fs::remove_file(&tmp);
                return Err(io(&tmp)(std::io::Error::other(format!(
                    "mkfs.ext4: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))));
            }
            std::fs::rename(&tmp, &img).map_err(io(&img))?;
        }
        crate::loopdev::mount_ext4(&img, &layer).map_err(io(&img))
    }

    fn lower_mount(&self, i: usize) -> PathBuf {
        self.dir.join("lower").join(i.to_string())
    }

    /// Mounts the overlay of an image's layers (`lowers`, top first) under the service's
    /// writable layer, owned by `owner`. With `idmap` (host base, count), each layer is seen
    /// through an idmapped mount under `lower/`: its ids 0.. are the container's.
    pub fn mount_layers(
        &self,
        lowers: &[PathBuf],
        idmap: Option<(u32, u32)>,
        owner: u32,
    ) -> Result<(), CheckoutError> {
        if self.is_mounted() {
            return Ok(());
        }
        let Some((base, count)) = idmap else {
            return self.mount_lowers(lowers, owner);
        };
        let userns = crate::idmap::user_namespace(base, count).map_err(io(&self.dir))?;
        let mut seen = Vec::new();
        for (i, lower) in lowers.iter().enumerate() {
            let at = self.lower_mount(i);
            std::fs::create_dir_all(&at).map_err(io(&at))?;
            if !mounted_at(&at) {
                crate::idmap::bind_idmapped(lower, &at, &userns).map_err(|e| {
                    CheckoutError::Mount {
                        lower: lower.clone(),
                        rootfs: at.clone(),
                        source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                    }
                })?;
            }
            seen.push(at);
        }
        self.mount_lowers(&seen, owner)
    }

    fn mount_lowers(&self, lowers: &[PathBuf], owner: u32) -> Result<(), CheckoutError> {
        if self.is_mounted() {
            return Ok(());
        }
        let Some(lower) = lowers.first() else {
            return Err(CheckoutError::BadPath(self.dir.clone()));
        };
        let (rootfs, upper, work) = (self.rootfs(), self.upper(), self.work());
        for p in lowers.iter().chain([&upper, &work]) {
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
        let lowerdir = lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let data = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
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
        // An image's idmapped layers under it, and a bounded writable layer's filesystem.
        let lowers = std::fs::read_dir(self.dir.join("lower"))
            .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for at in lowers.into_iter().chain([self.dir.join("layer")]) {
            while mounted_at(&at) {
                nix::mount::umount2(&at, nix::mount::MntFlags::MNT_DETACH)
                    .map_err(|e| CheckoutError::Unmount(at.clone(), e))?;
            }
        }
        Ok(())
    }

    /// Unmounts the overlay and removes the writable layer (the service's root is something
    /// else from now on: a disk image built from it).
    pub fn discard(&self) -> Result<(), CheckoutError> {
        self.unmount()?;
        for d in ["layer", "lower", "layer.img"] {
            let p = self.dir.join(d);
            let removed = if d == "layer.img" {
                std::fs::remove_file(&p)
            } else {
                std::fs::remove_dir_all(&p)
            };
            match removed {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&p)(e)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Something is mounted at `p`: it is another filesystem, or another mount of the same one
/// (an idmapped bind), than its parent directory's.
fn mounted_at(p: &Path) -> bool {
    let (Ok(m), Some(parent)) = (std::fs::metadata(p), p.parent()) else {
        return false;
    };
    let Ok(pm) = std::fs::metadata(parent) else {
        return false;
    };
    if m.dev() != pm.dev() {
        return true;
    }
    // A bind of the same filesystem: its mount id differs from its parent's.
    mount_id(p)
        .zip(mount_id(parent))
        .is_some_and(|(a, b)| a != b)
}

/// The mount id of the mount `p` is on (`statx(STATX_MNT_ID)`).
fn mount_id(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statx writes into a zeroed struct that outlives the call, reading a
    // NUL-terminated path that outlives it too.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut st,
        )
    };
    (r == 0 && st.stx_mask & libc::STATX_MNT_ID != 0).then_some(st.stx_mnt_id)
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
    fn an_images_layers_are_seen_with_the_containers_ids_and_never_written() {
        if !root() {
            eprintln!("skipped: idmapped mounts and overlays need root");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let (base, top) = (d.path().join("layers/base"), d.path().join("layers/top"));
        std::fs::create_dir_all(base.join("srv")).unwrap();
        std::fs::write(base.join("srv/owned"), "base").unwrap();
        std::os::unix::fs::chown(base.join("srv/owned"), Some(1000), Some(1000)).unwrap();
        std::fs::create_dir_all(top.join("etc")).unwrap();
        std::fs::write(top.join("etc/name"), "top").unwrap();
        let c = Checkout::at(&d.path().join("svc"));
        let host_base = 300_000;
        c.mount_layers(
            &[top.clone(), base.clone()],
            Some((host_base, 65_536)),
            host_base,
        )
        .unwrap();
        let owner = |p: &Path| {
            let m = std::fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        // Through the checkout, the image's ids are the container's on the host.
        assert_eq!(
            owner(&c.rootfs().join("srv/owned")),
            (host_base + 1000, host_base + 1000)
        );
        assert_eq!(owner(&c.rootfs().join("etc/name")), (host_base, host_base));
        assert_eq!(
            std::fs::read_to_string(c.rootfs().join("etc/name")).unwrap(),
            "top"
        );
        std::fs::write(c.rootfs().join("etc/name"), "service").unwrap();
        // The stored layers keep their own ids and contents.
        assert_eq!(owner(&base.join("srv/owned")), (1000, 1000));
        assert_eq!(
            std::fs::read_to_string(top.join("etc/name")).unwrap(),
            "top"
        );
        c.unmount().unwrap();
        assert!(!mounted_at(&d.path().join("svc/lower/0")));
        // Removing the service directory after the unmount leaves the layers alone.
        std::fs::remove_dir_all(d.path().join("svc")).unwrap();
        assert!(base.join("srv/owned").exists() && top.join("etc/name").exists());
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
