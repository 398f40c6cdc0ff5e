//! Building what a service runs from: its image opened beneath its root, its rootfs or
//! initramfs materialised in its service directory, and its definition for liblxc or the VMM.

use super::*;

impl Supervisor {
    /// Opens a local manifest's image (`rootfs:DIR`, `initramfs:FILE`, a folder's `package`
    /// tree) beneath the configured image root that holds it: symlinks may not lead out of
    /// that root, and a path under no root is refused.
    pub(super) fn local_image(&self, src: &Path) -> Result<(Dir, PathBuf)> {
        let refused = |why: String| err(ErrorKind::Denied, format!("field `image`: {why}"));
        let abs =
            std::path::absolute(src).map_err(|e| refused(format!("{}: {e}", src.display())))?;
        let Some(root) = self
            .settings
            .image_roots
            .iter()
            .find(|r| abs.starts_with(r))
        else {
            return Err(refused(format!(
                "{} is not under a directory this gateway takes images from (image_roots in the daemon's configuration: {})",
                abs.display(),
                if self.settings.image_roots.is_empty() {
                    "none configured".to_string()
                } else {
                    self.settings
                        .image_roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        };
        let rel = abs
            .strip_prefix(root)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        let root_dir =
            Dir::open(root).map_err(|e| refused(format!("image root {}: {e}", root.display())))?;
        Ok((root_dir, rel))
    }

    /// Builds the service's root as its plan says (owned by its container's root) from
    /// `image` (`from_store`: in the verified image store; else a local manifest's, under
    /// `image_roots`), and defines its container or VM.
    pub(super) fn materialise(
        &mut self,
        m: &Manifest,
        plan: &Plan,
        image: &ImageRef,
        from_store: bool,
        caps: Vec<caps::Capability>,
        dir: &Path,
    ) -> Result<()> {
        let idmap = plan.idmap();
        let root_owner = plan.idmap_base.unwrap_or(0);
        // A packaged tree is not copied: the store's is the read-only lower layer.
        let mut checkout = None;
        // A microVM's scratch disk is the service's own data: kept across a rebuild (an
        // update, a rollback), as across restarts.
        let disk = dir.join("disk.img");
        let kept = dir.with_file_name(format!(".{}.disk.img", m.name));
        let keep_disk = matches!(image, ImageRef::Initramfs(_))
            && plan.resources.disk_mib.is_some()
            && std::fs::rename(&disk, &kept).is_ok();
        remove_service_dir(dir)?;
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(dir).map_err(runtime_err)?;
        if keep_disk {
            std::fs::rename(&kept, &disk).map_err(runtime_err)?;
        }
        let escaped = |src: &Path, e: gatevisor_images::beneath::BeneathError| {
            err(
                ErrorKind::Denied,
                format!("field `image`: {}: {e}", src.display()),
            )
        };
        if let ImageRef::Initramfs(src) = image {
            if from_store {
                return self.prepare(m, plan, Image::Initramfs(src.clone()), caps, dir);
            }
            // Opened beneath its image root, then read through the open file only.
            let (root, rel) = self.local_image(src)?;
            let (parent, name) = gatevisor_images::beneath::split(&rel);
            let f = root
                .dir_following(parent)
                .map_err(|e| escaped(src, e))?
                .open_file(name)
                .map_err(|e| escaped(src, e.into()))?;
            let via = PathBuf::from(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&f)
            ));
            let prepared = self.prepare(m, plan, Image::Initramfs(via), caps, dir);
            drop(f);
            return prepared;
        }
        match image {
            ImageRef::BuiltinBusybox => {
                check_static_busybox(&self.settings.busybox)?;
                lxc::rootfs::build_busybox(&self.settings.busybox, &rootfs).map_err(runtime_err)?
            }
            ImageRef::Rootfs(src) if matches!(plan.root, Root::Checkout { .. }) => {
                // Given to the container's root by the install's worker already (then this
                // is one stat); a rollback's older version was given at its install.
                gatevisor_images::checkout::give_tree(src, root_owner)
                    .map_err(|e| runtime_err(error_chain(&e)))?;
                let c = gatevisor_images::checkout::Checkout::at(dir);
                c.mount(src, root_owner)
                    .map_err(|e| runtime_err(error_chain(&e)))?;
                checkout = Some(c);
            }
            ImageRef::Rootfs(src) => {
                let from = {
                    let (root, rel) = self.local_image(src)?;
                    root.dir_following(&rel).map_err(|e| escaped(src, e))?
                };
                std::fs::create_dir(&rootfs).map_err(runtime_err)?;
                let to = Dir::open(&rootfs).map_err(runtime_err)?;
                copy_rootfs(&from, &to).map_err(|e| {
                    err(
                        ErrorKind::Invalid,
                        format!(
                            "field `image`: cannot copy {}: {}",
                            src.display(),
                            crate::api::error_chain(&e)
                        ),
                    )
                })?;
            }
            ImageRef::Layers(digest) => {
                let lowers = self.image_lowers(&m.name, digest)?;
                let c = gatevisor_images::checkout::Checkout::at(dir);
                if let Some(mib) = plan.resources.disk_mib {
                    bound_layer(&c, mib)?;
                }
                c.mount_layers(&lowers, idmap.map(|i| (i.host_base, i.count)), root_owner)
                    .map_err(|e| runtime_err(error_chain(&e)))?;
                checkout = Some(c);
            }
            ImageRef::Initramfs(_) => unreachable!("handled above"),
        }
        // An unprivileged container's root owns its tree (a checkout's is given above).
        if let Some(map) = idmap.filter(|_| checkout.is_none()) {
            lxc::rootfs::shift_owner(&rootfs, map.host_base).map_err(runtime_err)?;
        }
        let disk_image = match plan.resources.disk_mib {
            // An image's service: its writable layer alone is bounded (above).
            Some(_) if matches!(image, ImageRef::Layers(_)) => None,
            Some(mib) => Some(make_disk_image(
                &rootfs,
                &dir.join("disk.img"),
                mib,
                root_owner,
            )?),
            None => None,
        };
        self.prepare(m, plan, Image::Tree { rootfs, disk_image }, caps, dir)
    }

    /// Has the service's backend define it from its plan and image; its control channel's
    /// directory is made first (owned by a container's root).
    fn prepare(
        &mut self,
        m: &Manifest,
        plan: &Plan,
        image: Image,
        caps: Vec<caps::Capability>,
        dir: &Path,
    ) -> Result<()> {
        let control_dir = if plan.control_channel {
            let run = self.service_run_dir(&m.name);
            std::fs::create_dir_all(&run).map_err(runtime_err)?;
            if let Some(base) = plan.idmap_base {
                std::os::unix::fs::chown(&run, Some(base), Some(base)).map_err(runtime_err)?;
            }
            Some(run)
        } else {
            None
        };
        let def = Definition {
            manifest: m,
            plan,
            dir,
            image,
            caps,
            control_dir,
            exit_file: self.run_files(&m.name).exit_file,
        };
        self.backends
            .get(plan.runtime)
            .prepare(&def)
            .map_err(|e| match e {
                RuntimeError::Refused { .. } => err(ErrorKind::Invalid, e.to_string()),
                e => runtime_err(error_chain(&e)),
            })
    }
}

/// Puts an image service's writable layer on its own `mib` MiB filesystem.
fn bound_layer(c: &gatevisor_images::checkout::Checkout, mib: u32) -> Result<()> {
    if !Path::new("/dev/loop-control").exists() {
        return Err(err(
            ErrorKind::Invalid,
            "field `resources.disk_mib`: this board has no loop devices to enforce a disk limit; remove the field".to_string(),
        ));
    }
    c.bound_layer(mib).map_err(|e| {
        runtime_err(format!(
            "its writable layer of {mib} MiB: {}",
            error_chain(&e)
        ))
    })
}

/// Builds `rootfs` into an ext4 image of `mib` MiB (the service's disk limit) and removes the
/// directory: the container runs from the image through a loop device.
pub(super) fn make_disk_image(
    rootfs: &Path,
    img: &Path,
    mib: u32,
    root_owner: u32,
) -> Result<PathBuf> {
    if !Path::new("/dev/loop-control").exists() {
        return Err(err(
            ErrorKind::Invalid,
            "field `resources.disk_mib`: this board has no loop devices to enforce a disk limit; remove the field".to_string(),
        ));
    }
    let f = std::fs::File::create(img).map_err(runtime_err)?;
    f.set_len(mib as u64 * 1024 * 1024).map_err(runtime_err)?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E"])
        .arg(format!("root_owner={root_owner}:{root_owner}"))
        .arg("-d")
        .arg(rootfs)
        .arg(img)
        .output()
        .map_err(|e| {
            err(
                ErrorKind::Runtime,
                format!("cannot run mkfs.ext4 (e2fsprogs): {e}"),
            )
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(img);
        return Err(err(
            ErrorKind::Invalid,
            format!(
                "field `resources.disk_mib`: the image does not fit in {mib} MiB ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    // The disk holds the tree now: a packaged tree's overlay and layer go (never deleted
    // through the overlay, which would write to its layer).
    if let Some(dir) = rootfs.parent() {
        gatevisor_images::checkout::Checkout::at(dir)
            .discard()
            .map_err(|e| runtime_err(error_chain(&e)))?;
    }
    let _ = std::fs::remove_dir_all(rootfs);
    Ok(img.to_path_buf())
}

/// Copies a rootfs tree within the package limits (files and bytes).
pub(super) fn copy_rootfs(
    from: &Dir,
    to: &Dir,
) -> std::result::Result<(), gatevisor_images::beneath::CopyError> {
    let limits = gatevisor_images::package::Limits::default();
    gatevisor_images::beneath::copy_tree(
        from,
        to,
        gatevisor_images::beneath::CopyLimits {
            max_files: limits.max_files,
            max_bytes: limits.max_total_bytes,
        },
    )
}

/// Host ids of service containers' user namespaces: service `id` gets 65,536 ids from
/// `IDMAP_BASE + id * 65,536`, far above the ranges Debian gives users in /etc/subuid.
pub(super) const IDMAP_BASE: u32 = 0x1000_0000;

pub(super) fn idmap_for(id: u32) -> lxc::IdMap {
    lxc::IdMap {
        host_base: IDMAP_BASE + id * crate::plan::IDMAP_COUNT,
        count: crate::plan::IDMAP_COUNT,
    }
}

/// Removes a service's directory; a packaged container's overlay comes off first, so nothing
/// is deleted through it.
pub(super) fn remove_service_dir(dir: &Path) -> Result<()> {
    gatevisor_images::checkout::Checkout::at(dir)
        .unmount()
        .map_err(|e| runtime_err(error_chain(&e)))?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

impl Supervisor {
    /// The layer directories (top first) of OCI image `digest`, which service `name` runs:
    /// all of them in the store.
    pub(super) fn image_lowers(
        &self,
        name: &str,
        digest: &gatevisor_images::oci::Digest,
    ) -> Result<Vec<PathBuf>> {
        let rec = self.oci.get(&digest.to_string()).map_err(|e| {
            err(
                ErrorKind::NotFound,
                format!("{name}: its image: {}", error_chain(&e)),
            )
        })?;
        if !self.oci.complete(&rec) {
            return Err(err(
                ErrorKind::Runtime,
                format!("{name}: image {digest} lacks layers in the store: pull it again"),
            ));
        }
        Ok(self.oci.lower_dirs(&rec))
    }

    /// Puts a packaged container's overlay back before it starts: after a reboot its layers
    /// are there and the mount is not. Anything else: nothing to do.
    pub(super) fn mount_checkout(&self, name: &str) -> Result<()> {
        let rec = self.record(name)?;
        let c = gatevisor_images::checkout::Checkout::at(&self.service_dir(name));
        let version = match &rec.plan.root {
            Root::Checkout { version } => version,
            Root::Layers { image } => {
                if c.is_mounted() {
                    return Ok(());
                }
                let digest = gatevisor_images::oci::Digest::parse(image).map_err(|e| {
                    err(
                        ErrorKind::Internal,
                        format!("{name}: its plan's image: {e}"),
                    )
                })?;
                let lowers = self.image_lowers(name, &digest)?;
                let idmap = rec.plan.idmap().map(|i| (i.host_base, i.count));
                if let Some(mib) = rec.plan.resources.disk_mib {
                    bound_layer(&c, mib)?;
                }
                return c
                    .mount_layers(&lowers, idmap, rec.plan.idmap_base.unwrap_or(0))
                    .map_err(|e| {
                        err(
                            ErrorKind::Runtime,
                            format!("{name}: its root cannot be mounted: {}", error_chain(&e)),
                        )
                    });
            }
            _ => return Ok(()),
        };
        // (A container packaged before checkouts existed has a tree of its own.)
        if !c.exists() || c.is_mounted() {
            return Ok(());
        }
        let missing = |why: String| {
            err(
                ErrorKind::Runtime,
                format!("{name}: its root cannot be mounted: {why}"),
            )
        };
        let tree = self
            .images
            .version(name, version)
            .map_err(|e| missing(error_chain(&e)))?
            .rootfs()
            .ok_or_else(|| missing(format!("version {version} in the image store has no tree")))?;
        c.mount(&tree, rec.plan.idmap_base.unwrap_or(0))
            .map_err(|e| missing(error_chain(&e)))
    }
}
