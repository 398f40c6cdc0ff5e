//! Installing services: package installs on a worker, admission, and building what a service runs from.

use super::*;

impl Supervisor {
    /// Starts installing a package: the quick checks here, the verification, unpacking and
    /// rootfs copy on a worker, which reports back with [`Msg::PackageReady`]; the loop goes
    /// on meanwhile. The reply goes out when the worker is done.
    pub(super) fn begin_install_package(
        &mut self,
        pkg: PathBuf,
        start: bool,
        runtime: Option<Kind>,
        reply: Sender<Reply>,
    ) {
        let refuse = |me: &mut Supervisor, e: ApiError| {
            me.event(
                EventKind::Refused,
                None,
                format!("{}: {}", pkg.display(), e.message),
            );
            let _ = reply.send(Reply::Error { error: e });
        };
        let invalid = |e: &(dyn std::error::Error + 'static)| {
            err(
                ErrorKind::Invalid,
                format!("{}: {}", pkg.display(), error_chain(e)),
            )
        };
        let peeked = match gatevisor_images::package::open_regular(&pkg)
            .map_err(|e| invalid(&e))
            .and_then(|f| {
                gatevisor_images::package::peek(std::io::BufReader::new(f)).map_err(|e| invalid(&e))
            }) {
            Ok(p) => p,
            Err(e) => return refuse(self, e),
        };
        let name = peeked.name;
        if self.doc.services.contains_key(&name) || self.installing.contains(&name) {
            let e = err(
                ErrorKind::Duplicate,
                format!(
                    "{}: a service named {name:?} is already installed; use `gatevisor service update`",
                    pkg.display()
                ),
            );
            return refuse(self, e);
        }
        self.installing.insert(name.clone());
        let images = self.images.clone();
        let policy = self.settings.policy.clone();
        let board = self.board.clone();
        let tx = self.tx.clone();
        let services = self.settings.state_dir.join("services");
        let (pkg2, name2) = (pkg.clone(), name.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("install-{name}"))
            .spawn(move || {
                let result =
                    prepare_package(&images, &policy, &board, &pkg2, &name2, &services, runtime);
                let _ = tx.send(Msg::PackageReady {
                    name: name2,
                    start,
                    runtime,
                    pkg: pkg2,
                    result,
                    reply,
                });
            });
        if let Err(e) = spawned {
            self.installing.remove(&name);
            tracing::error!("cannot start an install worker: {e}");
        }
    }

    /// The loop's part of a package install, once its worker verified and prepared it.
    pub(super) fn finish_install_package(
        &mut self,
        pkg: &Path,
        start: bool,
        runtime: Option<Kind>,
        p: Prepared,
    ) -> Result<serde_json::Value> {
        let inst = p.installed;
        let res = if self.doc.services.contains_key(&inst.name) {
            Err(err(
                ErrorKind::Duplicate,
                format!(
                    "{}: a service named {:?} is already installed",
                    pkg.display(),
                    inst.name
                ),
            ))
        } else {
            self.install_prepared(
                &inst.service_manifest(),
                start,
                Some((pkg.to_path_buf(), inst.version.clone())),
                p.rootfs.clone(),
                runtime,
            )
        };
        if let Some(r) = &p.rootfs {
            let _ = std::fs::remove_dir_all(r.parent().unwrap_or(r));
        }
        // Only what this install put into the store is taken out again when it fails.
        if res.is_err() && p.new_entry && !self.doc.services.contains_key(&inst.name) {
            let _ = self.images.remove(&inst.name);
            self.gc_images();
        }
        res
    }

    /// Removes unreferenced store entries, unless a worker is installing into the store now
    /// (its blobs are referenced only once its version is committed).
    pub(super) fn gc_images(&mut self) {
        if self.installing.is_empty() {
            if let Err(e) = self.images.gc() {
                tracing::warn!("image store: {}", error_chain(&e));
            }
        }
    }

    /// `package`: the package file and version, when the manifest comes from the image store.
    pub(super) fn install(
        &mut self,
        path: &Path,
        start: bool,
        package: Option<(PathBuf, String)>,
        runtime: Option<Kind>,
    ) -> Result<serde_json::Value> {
        self.install_prepared(path, start, package, None, runtime)
    }

    /// [`Self::install`] with the container's rootfs already copied by a worker (`rootfs`).
    pub(super) fn install_prepared(
        &mut self,
        path: &Path,
        start: bool,
        package: Option<(PathBuf, String)>,
        rootfs: Option<PathBuf>,
        wanted: Option<Kind>,
    ) -> Result<serde_json::Value> {
        let invalid = |e: &dyn std::fmt::Display| err(ErrorKind::Invalid, e.to_string());
        let path = std::path::absolute(path).map_err(|e| invalid(&e))?;
        let m = Manifest::load(&path).map_err(|e| err(ErrorKind::Invalid, error_chain(&e)))?;
        if package.is_none() {
            // A local manifest: root on the gateway wrote it, but what it may keep is still
            // the operator's policy.
            let caps = m.capability_set(&path).map_err(|e| invalid(&e))?;
            let denied = |e: crate::policy::PolicyError| {
                err(ErrorKind::Denied, format!("{}: {e}", path.display()))
            };
            self.settings
                .policy
                .check(&crate::policy::Requester::Local, &caps)
                .map_err(denied)?;
            if m.privileged {
                self.settings
                    .policy
                    .check_privileged(&crate::policy::Requester::Local)
                    .map_err(denied)?;
            }
        }
        let file = path.display();
        if self.doc.services.contains_key(&m.name) {
            return Err(err(
                ErrorKind::Duplicate,
                format!(
                    "{file}: field `name`: a service named {:?} is already installed (remove it first, or pick another name)",
                    m.name
                ),
            ));
        }
        let runtime = resolve_runtime(&self.board, &m, &path, wanted)?;
        let max = self.board.profile.max_services as usize;
        if self.doc.services.len() >= max {
            return Err(err(
                ErrorKind::NoResources,
                format!(
                    "{file}: board profile {} allows {max} services and {max} are installed",
                    self.board.profile.name
                ),
            ));
        }
        let budget = self.board.service_memory_budget_mib();
        let used: u64 = self
            .doc
            .services
            .values()
            .map(|r| memory_cost_mib(r.runtime, r.manifest.resources.memory_mib))
            .sum();
        let need = memory_cost_mib(runtime, m.resources.memory_mib);
        if used + need > budget {
            let guest = if need > m.resources.memory_mib as u64 {
                format!(" (as a microVM: {need} MiB, its kernel's share included)")
            } else {
                String::new()
            };
            return Err(err(
                ErrorKind::NoResources,
                format!(
                    "{file}: field `resources.memory_mib`: {} MiB{guest} does not fit the board's service memory budget ({} of {budget} MiB left)",
                    m.resources.memory_mib,
                    budget.saturating_sub(used)
                ),
            ));
        }
        if !m.network.steering.is_empty() && self.net.is_none() {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{file}: field `network.steering`: needs Open vSwitch, which is unavailable here: {}",
                    self.net_problem.clone().unwrap_or_default()
                ),
            ));
        }
        if m.resources.vcpus as usize > self.board.host.cpus {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{file}: field `resources.vcpus`: {} exceeds the board's {} CPUs",
                    m.resources.vcpus, self.board.host.cpus
                ),
            ));
        }
        let image = m
            .image_ref_as(&path, runtime == Kind::Microvm)
            .map_err(|e| invalid(&e))?;
        let caps = m.capability_set(&path).map_err(|e| invalid(&e))?;

        // Everything checked: now build. Any failure undoes what was made.
        let id = self.doc.services.values().map(|r| r.id).max().unwrap_or(0) + 1;
        let idmap = (runtime == Kind::Lxc && !m.privileged).then(|| idmap_for(id));
        let dir = self.service_dir(&m.name);
        let source = Source {
            from_store: package.is_some(),
            prepared: rootfs,
            idmap,
        };
        let made = self.materialise(&m, &image, caps, &dir, source);
        if let Err(e) = made {
            let _ = self.backends.get(runtime).undefine(&m.name);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let name = m.name.clone();
        let version = m.version.clone();
        self.doc.services.insert(
            name.clone(),
            ServiceRecord {
                id,
                manifest: m,
                source: package
                    .as_ref()
                    .map(|(p, _)| p.clone())
                    .unwrap_or_else(|| path.clone()),
                package_version: package.map(|(_, v)| v),
                runtime,
                idmap_base: idmap.map(|m| m.host_base),
                desired: if start {
                    Desired::Running
                } else {
                    Desired::Stopped
                },
                state: State::Installed,
                running: None,
                restarts: 0,
                consecutive_failures: 0,
                last_exit: None,
                failure_reason: None,
                installed_at_ms: now_ms(),
            },
        );
        if let Err(e) = self.persist() {
            self.doc.services.remove(&name);
            let _ = self.backends.get(runtime).undefine(&name);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.event(
            EventKind::Installed,
            Some(&name),
            format!("version {version}, runtime {runtime}"),
        );
        self.register_network(&name);
        // A start asked for with the install is the loop's next step for the service
        // (Step::Start): it runs on a worker.
        self.status(&name)
    }

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

    /// Builds the service's rootfs (owned by its container's root) and defines its container.
    pub(super) fn materialise(
        &mut self,
        m: &Manifest,
        image: &ImageRef,
        caps: Vec<caps::Capability>,
        dir: &Path,
        source: Source,
    ) -> Result<()> {
        let Source {
            from_store,
            prepared,
            idmap,
        } = source;
        // A microVM's scratch disk is the service's own data: kept across a rebuild (an
        // update, a rollback), as across restarts.
        let disk = dir.join("disk.img");
        let kept = dir.with_file_name(format!(".{}.disk.img", m.name));
        let keep_disk = matches!(image, ImageRef::Initramfs(_))
            && m.resources.disk_mib.is_some()
            && std::fs::rename(&disk, &kept).is_ok();
        let _ = std::fs::remove_dir_all(dir);
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
                return self.define_vm(m, src, dir);
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
            return self.define_vm(m, &via, dir);
        }
        match image {
            ImageRef::BuiltinBusybox => {
                check_static_busybox(&self.settings.busybox)?;
                lxc::rootfs::build_busybox(&self.settings.busybox, &rootfs).map_err(runtime_err)?
            }
            ImageRef::Rootfs(_) if prepared.is_some() => {
                let p = prepared.expect("checked");
                std::fs::rename(&p, &rootfs).map_err(runtime_err)?;
            }
            ImageRef::Rootfs(src) => {
                let from = if from_store {
                    Dir::open(src).map_err(runtime_err)?
                } else {
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
        // An unprivileged container's root owns its tree.
        if let Some(map) = idmap {
            lxc::rootfs::shift_owner(&rootfs, map.host_base).map_err(runtime_err)?;
        }
        let r = &m.resources;
        let root_owner = idmap.map_or(0, |m| m.host_base);
        let disk_image = match r.disk_mib {
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
                .chain((!m.network.steering.is_empty()).then(|| {
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
            limits: limits_of(r),
            capabilities: caps,
            veth_host: m.network.interface.then(|| veth_name(&m.name)),
            ipv4_address: m.network.address.clone(),
            seccomp_profile: lxc::default_seccomp_profile(),
            apparmor_profile: lxc::apparmor_profile(),
            bind_dirs: if m.network.steering.is_empty() {
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
    pub(super) fn define_vm(&mut self, m: &Manifest, initramfs: &Path, dir: &Path) -> Result<()> {
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
                if !m.network.steering.is_empty() {
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
                if let Some(a) = &m.network.address {
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
            memory_mib: crate::microvm::guest_memory_mib(m.resources.memory_mib),
            vcpus: m.resources.vcpus as u8,
            // The console goes to the VMM's stdout, which a log pump rotates into the log.
            console_log: None,
            console_rate: crate::microvm::CONSOLE_RATE,
            console_socket: Some(self.vms.console_path(&m.name)),
            exit_file: Some(self.run_files(&m.name).exit_file),
            // The tap is created at each start and handed over as TAP_FD.
            net: if m.network.interface {
                vec![gatevisor_vmm::vm::NetConfig {
                    tap: None,
                    tap_fd: Some(crate::microvm::TAP_FD),
                    mac: crate::microvm::guest_mac(&m.name),
                }]
            } else {
                vec![]
            },
            // `resources.disk_mib`: a sparse scratch disk (/dev/vda), kept across restarts.
            disk: match m.resources.disk_mib {
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
        host_base: IDMAP_BASE + id * 65_536,
        count: 65_536,
    }
}

/// Which runtime the service really gets: `wanted` (asked for with the install) where the
/// manifest allows it, else `auto` resolved for this board.
pub(super) fn resolve_runtime(
    board: &BoardReport,
    m: &Manifest,
    path: &Path,
    wanted: Option<Kind>,
) -> Result<Kind> {
    if let Some(k) = wanted {
        let said = match m.runtime {
            RuntimeKind::Auto => None,
            RuntimeKind::Lxc => Some(Kind::Lxc),
            RuntimeKind::Microvm => Some(Kind::Microvm),
        };
        if let Some(said) = said.filter(|s| *s != k) {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{}: field `runtime`: the manifest says \"{said}\"; it cannot be installed as {k} (only runtime = \"auto\" can go on either)",
                    path.display(),
                ),
            ));
        }
        if !Kind::available(board).contains(&k) {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{}: runtime {k} is not available on this board ({})",
                    path.display(),
                    board.auto_runtime_reason
                ),
            ));
        }
        return Ok(k);
    }
    Ok(match m.runtime {
        RuntimeKind::Lxc => Kind::Lxc,
        // A microVM where the board runs them, for an image that can boot as one (a
        // package carries an initramfs), with gatevisor's guest init present (it runs
        // the service and its control channel); LXC otherwise.
        RuntimeKind::Auto => match board.auto_runtime {
            AutoRuntime::Microvm
                if m.image == "package"
                    && Manifest::package_initramfs(path).is_file()
                    && crate::microvm::guest_init().is_some() =>
            {
                Kind::Microvm
            }
            _ => Kind::Lxc,
        },
        RuntimeKind::Microvm if !board.kvm.microvm_capable => {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{}: field `runtime`: this board's KVM cannot run microVMs ({}); use \"lxc\" or \"auto\"",
                    path.display(),
                    board.auto_runtime_reason
                ),
            ))
        }
        RuntimeKind::Microvm => Kind::Microvm,
    })
}

/// The gateway's checks of a verified package before the image store commits it: its service
/// manifest is valid, names the same service and version as the package and uses the
/// package's image, and the privilege policy grants what it asks for its publisher.
pub(super) fn package_check(
    policy: &crate::policy::Policy,
) -> impl FnMut(
    &Path,
    &gatevisor_images::package::PackageManifest,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>
       + '_ {
    move |dir, pm| {
        let file = dir.join("service.toml");
        let m = Manifest::load_packaged(&file).map_err(|e| {
            // The staging path means nothing to the user: name the file in the package.
            error_chain(&e).replace(&file.display().to_string(), "service.toml")
        })?;
        if m.name != pm.name || m.version != pm.version {
            return Err(format!(
                "service.toml: fields `name` and `version` ({:?} {:?}) must be the package's own ({:?} {:?})",
                m.name, m.version, pm.name, pm.version
            )
            .into());
        }
        let signer = std::fs::read_to_string(dir.join(gatevisor_images::package::SIGNER))?;
        let (id, name) = signer.trim().split_once(' ').unwrap_or((signer.trim(), ""));
        let who = crate::policy::Requester::Publisher {
            id: id.into(),
            name: name.into(),
        };
        let caps = m
            .capability_set(Path::new("service.toml"))
            .map_err(|e| e.to_string())?;
        policy.check(&who, &caps)?;
        if m.privileged {
            policy.check_privileged(&who)?;
        }
        Ok(())
    }
}

/// A package install's slow part, on a worker: verify and unpack into the image store (the
/// gateway's checks run before it commits), then, for a container, copy its rootfs into
/// `services/.NAME.prepared/rootfs` for the loop to move into place.
pub(super) fn prepare_package(
    images: &gatevisor_images::store::Store,
    policy: &crate::policy::Policy,
    board: &BoardReport,
    pkg: &Path,
    name: &str,
    services: &Path,
    runtime: Option<Kind>,
) -> Result<Prepared> {
    let new_entry = images.current(name).is_none();
    let mut check = package_check(policy);
    let installed = images
        .install_checked(pkg, &mut check, &mut |_| {})
        .map_err(|e| store_refusal(pkg, &e))?;
    let res = prepare_rootfs(installed, board, services, new_entry, runtime);
    if res.is_err() && new_entry {
        let _ = images.remove(name);
    }
    res
}

pub(super) fn prepare_rootfs(
    installed: gatevisor_images::store::Installed,
    board: &BoardReport,
    services: &Path,
    new_entry: bool,
    runtime: Option<Kind>,
) -> Result<Prepared> {
    let file = installed.service_manifest();
    let m = Manifest::load(&file).map_err(|e| err(ErrorKind::Invalid, error_chain(&e)))?;
    let rootfs = match (
        resolve_runtime(board, &m, &file, runtime)?,
        installed.rootfs(),
    ) {
        (Kind::Lxc, Some(src)) => {
            let staging = services.join(format!(".{}.prepared", installed.name));
            let _ = std::fs::remove_dir_all(&staging);
            let rootfs = staging.join("rootfs");
            let copied = std::fs::create_dir_all(&rootfs)
                .map_err(runtime_err)
                .and_then(|()| {
                    let (from, to) = (
                        Dir::open(&src).map_err(runtime_err)?,
                        Dir::open(&rootfs).map_err(runtime_err)?,
                    );
                    copy_rootfs(&from, &to).map_err(|e| runtime_err(error_chain(&e)))
                });
            if let Err(e) = copied {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
            Some(rootfs)
        }
        _ => None,
    };
    Ok(Prepared {
        installed,
        rootfs,
        new_entry,
    })
}

/// A refused package as an API error: the policy's refusals are `denied`, the rest
/// `invalid`; the message keeps every cause.
pub(super) fn store_refusal(pkg: &Path, e: &gatevisor_images::store::StoreError) -> ApiError {
    use gatevisor_images::package::PackageError as P;
    use gatevisor_images::store::StoreError as S;
    let kind = match e {
        S::Rejected { source, .. }
            if source
                .downcast_ref::<crate::policy::PolicyError>()
                .is_some() =>
        {
            ErrorKind::Denied
        }
        S::Package { source, .. } => match source {
            P::Unsigned
            | P::BadSignatureFormat
            | P::BadKeyId
            | P::UntrustedKey { .. }
            | P::RevokedKey { .. }
            | P::BadSignature
            | P::MissingArtifact { .. }
            | P::SizeMismatch { .. }
            | P::DigestMismatch { .. }
            | P::Trailing(_) => ErrorKind::Untrusted,
            P::TooLarge { .. } | P::TooManyFiles { .. } => ErrorKind::NoResources,
            _ => ErrorKind::Invalid,
        },
        _ => ErrorKind::Invalid,
    };
    err(
        kind,
        format!("{}: {}", pkg.display(), error_chain(e)).replacen(
            &format!("{}: package {}", pkg.display(), pkg.display()),
            &format!("package {}", pkg.display()),
            1,
        ),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ImageRootError {
    #[error("{0}: an image root must be an absolute path")]
    Relative(PathBuf),
    #[error("{path}: cannot use it as an image root")]
    Unusable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: an image root must not be / or hold the state directory {1} (an install would copy the store into itself)")]
    HoldsState(PathBuf, PathBuf),
    #[error("{0}: an image root must not be inside the state directory {1}")]
    InsideState(PathBuf, PathBuf),
}

/// The configured image roots, resolved (symlinks in the configuration are the operator's)
/// and checked: never `/`, never one that holds the state directory or lies inside it.
pub fn check_image_roots(
    roots: Vec<PathBuf>,
    state_dir: &Path,
) -> std::result::Result<Vec<PathBuf>, ImageRootError> {
    let _ = std::fs::create_dir_all(state_dir);
    let state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    roots
        .into_iter()
        .map(|r| {
            if !r.is_absolute() {
                return Err(ImageRootError::Relative(r));
            }
            let c = std::fs::canonicalize(&r).map_err(|source| ImageRootError::Unusable {
                path: r.clone(),
                source,
            })?;
            if state.starts_with(&c) {
                return Err(ImageRootError::HoldsState(r, state.clone()));
            }
            if c.starts_with(&state) {
                return Err(ImageRootError::InsideState(r, state.clone()));
            }
            Ok(c)
        })
        .collect()
}

/// Packages are files ending in `.gvpkg`.
/// The limits a service's resources ask for (its runtime may add to them: a VMM's memory).
pub(super) fn limits_of(r: &crate::manifest::Resources) -> lxc::Limits {
    lxc::Limits {
        memory_bytes: Some(r.memory_mib as u64 * 1024 * 1024),
        cpu_quota_us: r
            .cpu_quota_percent
            .map(|p| p as u64 * lxc::config::CPU_PERIOD_US / 100),
        pids: r.pids.map(u64::from),
        cpus: Some(r.vcpus),
    }
}

/// What a service takes from the board's memory budget: a container its limit, a microVM the
/// guest memory it really gets.
pub(super) fn memory_cost_mib(kind: Kind, memory_mib: u32) -> u64 {
    match kind {
        Kind::Lxc => memory_mib as u64,
        Kind::Microvm => crate::microvm::guest_memory_mib(memory_mib),
    }
}

/// A signed package: told by its content, so a package under any name is verified as one.
/// A file named `.gvpkg` is always taken for a package (a corrupt or truncated download is
/// refused by the verifier, never read as an unsigned service manifest).
pub(super) fn is_package(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gvpkg")
        || gatevisor_images::package::is_package_file(path)
}

pub(super) fn check_static_busybox(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| {
        err(
            ErrorKind::Runtime,
            format!(
                "cannot read {}: {e} (install busybox-static)",
                path.display()
            ),
        )
    })?;
    let needle = b"ld-linux";
    if bytes.windows(needle.len()).take(4096).any(|w| w == needle) {
        return Err(err(
            ErrorKind::Runtime,
            format!(
                "{} is dynamically linked; install busybox-static",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Copies a directory tree: files with their modes, directories and symlinks as they are.
/// Device nodes, FIFOs and sockets are refused.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_tree_keeps_symlinks_and_modes() {
        use std::os::unix::fs::PermissionsExt;
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
}
