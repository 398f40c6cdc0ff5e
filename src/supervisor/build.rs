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
        let idmap = plan.idmap_base.map(idmap_at);
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
                return self.define_vm(m, plan, src, dir);
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
            return self.define_vm(m, plan, &via, dir);
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
            ImageRef::Initramfs(_) => unreachable!("handled above"),
        }
        // An unprivileged container's root owns its tree (a checkout's is given above).
        if let Some(map) = idmap.filter(|_| checkout.is_none()) {
            lxc::rootfs::shift_owner(&rootfs, map.host_base).map_err(runtime_err)?;
        }
        let disk_image = match plan.resources.disk_mib {
            Some(mib) => Some(make_disk_image(
                &rootfs,
                &dir.join("disk.img"),
                mib,
                root_owner,
            )?),
            None => None,
        };
        let spec = lxc::ContainerSpec {
            name: m.name.clone(),
            hostname: m.name.clone(),
            rootfs,
            disk_image,
            env: m
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain(plan.control_channel.then(|| {
                    (
                        "GATEVISOR_VERDICT_SOCKET".to_string(),
                        format!(
                            "{}/{}",
                            crate::verdict::CONTAINER_DIR,
                            crate::verdict::SOCKET_NAME
                        ),
                    )
                }))
                .collect(),
            limits: plan.limits(),
            capabilities: caps,
            veth_host: plan.port.as_ref().map(|p| p.name.clone()),
            ipv4_address: plan.port.as_ref().and_then(|p| p.address.clone()),
            mac: plan.port.as_ref().map(|p| p.mac.clone()),
            seccomp_profile: lxc::default_seccomp_profile(),
            apparmor_profile: lxc::apparmor_profile(),
            bind_dirs: if !plan.control_channel {
                vec![]
            } else {
                let dir = self.service_run_dir(&m.name);
                std::fs::create_dir_all(&dir).map_err(runtime_err)?;
                if let Some(map) = idmap {
                    std::os::unix::fs::chown(&dir, Some(map.host_base), Some(map.host_base))
                        .map_err(runtime_err)?;
                }
                vec![(dir, crate::verdict::CONTAINER_DIR.to_string())]
            },
            idmap,
        };
        self.rt.define(&spec).map_err(runtime_err)
    }

    /// Copies the initramfs and writes the VM configuration of a microVM service.
    pub(super) fn define_vm(
        &mut self,
        m: &Manifest,
        plan: &Plan,
        initramfs: &Path,
        dir: &Path,
    ) -> Result<()> {
        let initrd = dir.join("initramfs.cpio");
        let kernel = m
            .microvm
            .kernel
            .clone()
            .unwrap_or_else(crate::microvm::MicrovmRuntime::default_kernel);
        if !kernel.is_file() {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "field `microvm.kernel`: {} does not exist on this gateway",
                    kernel.display()
                ),
            ));
        }
        // With gatevisor's guest init (the usual case), the service's initramfs gets a second
        // archive: the init, and the virtio modules of the gateway's kernel when the guest
        // runs that kernel. The init runs the service, and answers the control port (vsock)
        // through which stop powers the guest off gracefully.
        let guest_init = crate::microvm::guest_init();
        let modules_of = m
            .microvm
            .kernel
            .is_none()
            .then(crate::microvm::running_kernel_modules);
        let (cmdline, vsock) = match &guest_init {
            Some(init) => {
                let mut env: Vec<(String, String)> =
                    m.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                if plan.control_channel {
                    // The service reaches its verdict socket over vsock: the VMM maps guest
                    // connections to host port P onto `<vsock>_P`, a link to the socket.
                    env.push((
                        "GATEVISOR_VERDICT_SOCKET".into(),
                        format!("vsock:2:{}", crate::microvm::VERDICT_PORT),
                    ));
                    let link = self
                        .vms
                        .vsock_port_path(&m.name, crate::microvm::VERDICT_PORT);
                    let _ = std::fs::remove_file(&link);
                    let dir = self.service_run_dir(&m.name);
                    std::fs::create_dir_all(&dir).map_err(runtime_err)?;
                    std::os::unix::fs::symlink(dir.join(crate::verdict::SOCKET_NAME), &link)
                        .map_err(runtime_err)?;
                }
                crate::microvm::initramfs_with_init(
                    initramfs,
                    init,
                    modules_of.as_deref(),
                    &env,
                    &initrd,
                )
                .map_err(runtime_err)?;
                let mut c = format!(
                    "{} {} rdinit={} gatevisor.grace_s={}",
                    crate::microvm::BASE_CMDLINE,
                    m.microvm.cmdline,
                    crate::microvm::GUEST_INIT_PATH,
                    m.stop_timeout_s
                );
                if let Some(a) = plan.port.as_ref().and_then(|p| p.address.as_ref()) {
                    c.push_str(&format!(" gatevisor.ip={a}"));
                }
                c.push_str(" -- ");
                c.push_str(&m.command.join(" "));
                let vsock = gatevisor_vmm::vm::VsockConfig {
                    guest_cid: crate::microvm::GUEST_CID,
                    uds_path: self.vms.vsock_path(&m.name),
                };
                (c, Some(vsock))
            }
            None => {
                let needs_init = [
                    ("network.address", m.network.address.is_some()),
                    ("network.steering", !m.network.steering.is_empty()),
                    ("settings", !m.settings.is_empty()),
                    ("health.exec", m.health.exec.is_some()),
                    ("health.tcp_port", m.health.tcp_port.is_some()),
                    ("env", !m.env.is_empty()),
                ];
                if let Some((field, _)) = needs_init.iter().find(|(_, set)| *set) {
                    return Err(err(
                        ErrorKind::Invalid,
                        format!("field `{field}`: a microVM needs gatevisor-guest-init for it, which is not installed on this gateway"),
                    ));
                }
                std::fs::copy(initramfs, &initrd).map_err(runtime_err)?;
                let mut c = format!(
                    "{} {} rdinit={}",
                    crate::microvm::BASE_CMDLINE,
                    m.microvm.cmdline,
                    m.command[0]
                );
                if m.command.len() > 1 {
                    c.push_str(" -- ");
                    c.push_str(&m.command[1..].join(" "));
                }
                (c, None)
            }
        };
        let cfg = gatevisor_vmm::VmConfig {
            boot: gatevisor_vmm::Boot::Linux {
                kernel,
                initrd: Some(initrd),
                cmdline,
            },
            // A Linux guest needs room for its own kernel beyond the service's budget.
            memory_mib: plan.resources.receives_mib,
            vcpus: plan.resources.vcpus as u8,
            // The console goes to the VMM's stdout, which a log pump rotates into the log.
            console_log: None,
            console_rate: crate::microvm::CONSOLE_RATE,
            console_socket: Some(self.vms.console_path(&m.name)),
            exit_file: Some(self.run_files(&m.name).exit_file),
            // The tap is created at each start and handed over as TAP_FD.
            net: plan
                .port
                .iter()
                .map(|p| gatevisor_vmm::vm::NetConfig {
                    tap: None,
                    tap_fd: Some(crate::microvm::TAP_FD),
                    mac: p.mac.clone(),
                })
                .collect(),
            // `resources.disk_mib`: a sparse scratch disk (/dev/vda), kept across restarts.
            disk: match plan.resources.disk_mib {
                Some(mib) => {
                    let path = dir.join("disk.img");
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)
                        .map_err(runtime_err)?;
                    f.set_len(mib as u64 * 1024 * 1024).map_err(runtime_err)?;
                    vec![gatevisor_vmm::vm::DiskConfig {
                        path,
                        read_only: false,
                    }]
                }
                None => vec![],
            },
            vsock,
        };
        self.vms.define(&m.name, &cfg).map_err(runtime_err)
    }
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
    idmap_at(IDMAP_BASE + id * 65_536)
}

/// The user namespace of 65,536 ids from `host_base`.
pub(super) fn idmap_at(host_base: u32) -> lxc::IdMap {
    lxc::IdMap {
        host_base,
        count: 65_536,
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
    /// Puts a packaged container's overlay back before it starts: after a reboot its layers
    /// are there and the mount is not. Anything else: nothing to do.
    pub(super) fn mount_checkout(&self, name: &str) -> Result<()> {
        let rec = self.record(name)?;
        let c = gatevisor_images::checkout::Checkout::at(&self.service_dir(name));
        let Root::Checkout { version } = &rec.plan.root else {
            return Ok(());
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
