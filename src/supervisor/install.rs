//! Installing services: package installs on a worker, admission, runtime choice, and the
//! checks of what a package or manifest asks for.

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
            me.refused(&pkg.display().to_string(), &e);
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
                gatevisor_images::package::peek(std::io::BufReader::new(f)).map_err(|e| {
                    err(
                        package_error_kind(&e),
                        format!("{}: {}", pkg.display(), error_chain(&e)),
                    )
                })
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
        // The id it will get, so the worker can give the tree to its user namespace.
        let id = self.next_id();
        self.reserved_ids.insert(name.clone(), id);
        let owner = Some(idmap_for(id).host_base);
        let images = self.images.clone();
        let policy = self.settings.policy.clone();
        let board = self.board.clone();
        let tx = self.tx.clone();
        let (pkg2, name2) = (pkg.clone(), name.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("install-{name}"))
            .spawn(move || {
                let target = Target { runtime, owner };
                let result = prepare_package(&images, &policy, &board, &pkg2, &name2, target);
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
    ) -> Result<api::ServiceStatus> {
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
            self.install(
                &inst.service_manifest(),
                start,
                Some((pkg.to_path_buf(), inst.version.clone())),
                runtime,
                None,
            )
        };
        // Only what this install put into the store is taken out again when it fails.
        if res.is_err() && p.new_entry && !self.doc.services.contains_key(&inst.name) {
            let _ = self.images.remove(&inst.name);
            self.gc_images();
        }
        res
    }

    /// The next free service id (ids of installs in flight are taken).
    pub(super) fn next_id(&self) -> u32 {
        self.doc
            .services
            .values()
            .map(|r| r.id)
            .chain(self.reserved_ids.values().copied())
            .max()
            .unwrap_or(0)
            + 1
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

    /// `package`: the package file and version, when the manifest comes from the image store
    /// (a worker gave its tree to the container's root already).
    pub(super) fn install(
        &mut self,
        path: &Path,
        start: bool,
        package: Option<(PathBuf, String)>,
        wanted: Option<Kind>,
        oci: Option<(
            &gatevisor_images::oci::store::ImageRecord,
            Option<crate::policy::Requester>,
        )>,
    ) -> Result<api::ServiceStatus> {
        let invalid = |e: &dyn std::fmt::Display| err(ErrorKind::Invalid, e.to_string());
        let path = std::path::absolute(path).map_err(|e| invalid(&e))?;
        let (oci, who) = match oci {
            Some((rec, who)) => (Some(rec), who),
            None => (None, None),
        };
        let who = who.unwrap_or(crate::policy::Requester::Local);
        let mut image_meta = None;
        let m = match oci {
            Some(rec) => {
                let (m, meta) = self.image_manifest(&path, rec)?;
                image_meta = Some(meta);
                m
            }
            None => Manifest::load(&path).map_err(|e| err(ErrorKind::Invalid, error_chain(&e)))?,
        };
        // An OCI image runs as a container (`auto` included).
        let wanted = wanted.or(oci.map(|_| Kind::Lxc));
        if package.is_none() {
            // A local manifest: root on the gateway wrote it, but what it may keep is still
            // the operator's policy (a publisher's, for one signed with its image).
            let caps = m.capability_set(&path).map_err(|e| invalid(&e))?;
            let denied = |e: crate::policy::PolicyError| {
                err(ErrorKind::Denied, format!("{}: {e}", path.display()))
            };
            self.settings.policy.check(&who, &caps).map_err(denied)?;
            self.settings
                .policy
                .check_host_calls(&who, &m.host_calls.grants())
                .map_err(denied)?;
            if m.privileged {
                self.settings
                    .policy
                    .check_privileged(&who)
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
            .map(|r| r.plan.resources.receives_mib)
            .sum();
        let need = crate::plan::receives_mib(runtime, m.resources.memory_mib);
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
        if !m.network.steering.is_empty() && self.net_restoring {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "{file}: field `network.steering`: Open vSwitch is being restored; try again in a moment"
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
        let id = self
            .reserved_ids
            .get(&m.name)
            .copied()
            .unwrap_or_else(|| self.next_id());
        let version = package.as_ref().map(|(_, v)| v.as_str());
        let plan = plan_for(&m, runtime, id, &image, version);
        let dir = self.service_dir(&m.name);
        let made = self.materialise(&m, &plan, &image, package.is_some(), caps, &dir);
        if let Err(e) = made {
            let _ = self.backends.get(runtime).undefine(&m.name);
            let _ = remove_service_dir(&dir);
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
                image_meta,
                plan,
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
                settings: Default::default(),
            },
        );
        if let Err(e) = self.persist() {
            self.doc.services.remove(&name);
            let _ = self.backends.get(runtime).undefine(&name);
            let _ = remove_service_dir(&dir);
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
}

/// The plan of service number `id` installed (or switched to another version) as `m` with
/// `runtime`, from `image` (`package_version`: from the image store, whose tree is checked
/// out, never copied). An unprivileged container gets its own user namespace.
pub(super) fn plan_for(
    m: &Manifest,
    runtime: Kind,
    id: u32,
    image: &ImageRef,
    package_version: Option<&str>,
) -> Plan {
    let root = match (image, package_version) {
        (ImageRef::Initramfs(_), _) => Root::Initramfs,
        (ImageRef::Layers(d), _) => Root::Layers {
            image: d.to_string(),
        },
        (ImageRef::Rootfs(_), Some(v)) => Root::Checkout {
            version: v.to_string(),
        },
        _ => Root::Own,
    };
    let idmap_base = (runtime == Kind::Lxc && !m.privileged).then(|| idmap_for(id).host_base);
    Plan::resolve(m, runtime, root, idmap_base)
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
/// package's image, and the privilege policy grants what it asks for its publisher. A
/// version that will run as a container (`runtime` asked for, or the manifest's resolved for
/// `board`) keeps only its tree.
pub(super) fn package_check<'a>(
    policy: &'a crate::policy::Policy,
    board: &'a BoardReport,
    runtime: Option<Kind>,
) -> impl FnMut(
    &Path,
    &gatevisor_images::package::PackageManifest,
) -> std::result::Result<
    gatevisor_images::store::Keep,
    Box<dyn std::error::Error + Send + Sync>,
> + 'a {
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
        policy.check_host_calls(&who, &m.host_calls.grants())?;
        if m.privileged {
            policy.check_privileged(&who)?;
        }
        // A runtime that does not resolve is refused after the commit, with its own kind.
        Ok(match resolve_runtime(board, &m, &file, runtime) {
            Ok(Kind::Lxc) => gatevisor_images::store::Keep::Tree,
            _ => gatevisor_images::store::Keep::All,
        })
    }
}

/// What a worker prepares a package's tree for: the runtime asked for, and the host uid its
/// container's root will be.
pub(super) struct Target {
    pub(super) runtime: Option<Kind>,
    pub(super) owner: Option<u32>,
}

/// A package install's slow part, on a worker: verify and unpack into the image store (the
/// gateway's checks run before it commits), then, for an unprivileged container, give the
/// store's tree to the container's root (a walk over every file), so that the loop only
/// mounts it as the service's read-only lower layer.
pub(super) fn prepare_package(
    images: &gatevisor_images::store::Store,
    policy: &crate::policy::Policy,
    board: &BoardReport,
    pkg: &Path,
    name: &str,
    target: Target,
) -> Result<Prepared> {
    let Target { runtime, owner } = target;
    let new_entry = images.current(name).is_none();
    let mut check = package_check(policy, board, runtime);
    let installed = images
        .install_checked(pkg, &mut check, &mut |_| {})
        .map_err(|e| store_refusal(pkg, &e))?;
    let res = give_to_container(&installed, board, runtime, owner);
    if res.is_err() && new_entry {
        let _ = images.remove(name);
    }
    res.map(|()| Prepared {
        installed,
        new_entry,
    })
}

/// Gives a store version's container tree to the host uid its container's root has
/// (`owner`; root's for a privileged container). A microVM's version has no tree to give.
pub(super) fn give_to_container(
    installed: &gatevisor_images::store::Installed,
    board: &BoardReport,
    runtime: Option<Kind>,
    owner: Option<u32>,
) -> Result<()> {
    let file = installed.service_manifest();
    let m = Manifest::load(&file).map_err(|e| err(ErrorKind::Invalid, error_chain(&e)))?;
    if let (Kind::Lxc, Some(tree)) = (
        resolve_runtime(board, &m, &file, runtime)?,
        installed.rootfs(),
    ) {
        let owner = owner.filter(|_| !m.privileged).unwrap_or(0);
        gatevisor_images::checkout::give_tree(&tree, owner)
            .map_err(|e| runtime_err(error_chain(&e)))?;
    }
    Ok(())
}

/// What kind of refusal a package error is: its signature (`untrusted`), its content
/// (`corrupt`), its size (`no-resources`), or anything else (`invalid`).
pub(super) fn package_error_kind(e: &gatevisor_images::package::PackageError) -> ErrorKind {
    use gatevisor_images::package::PackageError as P;
    match e {
        P::Unsigned
        | P::BadSignatureFormat
        | P::BadKeyId
        | P::UntrustedKey { .. }
        | P::RevokedKey { .. }
        | P::BadSignature => ErrorKind::Untrusted,
        P::Archive(_)
        | P::NoManifest
        | P::MissingArtifact { .. }
        | P::SizeMismatch { .. }
        | P::DigestMismatch { .. }
        | P::Trailing(_) => ErrorKind::Corrupt,
        P::TooLarge { .. } | P::TooManyFiles { .. } => ErrorKind::NoResources,
        _ => ErrorKind::Invalid,
    }
}

/// A refused package as an API error: the policy's refusals are `denied`, the rest
/// `invalid`; the message keeps every cause.
pub(super) fn store_refusal(pkg: &Path, e: &gatevisor_images::store::StoreError) -> ApiError {
    use gatevisor_images::store::StoreError as S;
    let kind = match e {
        S::Rejected { source, .. }
            if source
                .downcast_ref::<crate::policy::PolicyError>()
                .is_some() =>
        {
            ErrorKind::Denied
        }
        S::Package { source, .. } => package_error_kind(source),
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
/// A signed package: told by its content, so a package under any name is verified as one.
/// A file named `.gvpkg` is always taken for a package (a corrupt or truncated download is
/// refused by the verifier, never read as an unsigned service manifest).
pub fn is_package(path: &Path) -> bool {
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
