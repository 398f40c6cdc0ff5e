//! The image store on the gateway (`STATE/images`):
//!
//! ```text
//! blobs/sha256/HEX            verified artifacts, content-addressed
//! services/NAME/VERSION/      unpacked: manifest.toml, service.toml, rootfs/, kernel, ...
//! services/NAME/current       symlink to the version in use
//! services/NAME/previous      symlink to the version before it (for rollback)
//! tmp/                        staging; whatever is here after a crash is garbage
//! ```
//!
//! An install verifies and unpacks into `tmp/`, fsyncs everything, stores the blobs, then
//! renames the complete version directory into `services/NAME/` (atomic), then swaps the
//! `current` symlink (atomic). A power cut before the rename leaves only garbage in `tmp/`
//! and unreferenced blobs (removed by `open` and `gc`); after it, the store has the old or the
//! new version, never a mix. Installing a version that is already there just makes it current.

use std::path::{Path, PathBuf};

use crate::keys::TrustStore;
use crate::package::{self, ArtifactKind, Limits, PackageError, PackageManifest};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("package {path}")]
    Package {
        path: PathBuf,
        #[source]
        source: PackageError,
    },
    /// The gateway's own checks of the verified package (its service manifest, the privilege
    /// policy) refused it before anything was committed.
    #[error("package {path}")]
    Rejected {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("image store I/O on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no installed version {version} of {name}")]
    NoVersion { name: String, version: String },
    #[error(
        "package names and versions are 1-64 characters of a-z, A-Z, 0-9, '.', '_', '-', not starting with '.' and not \"current\" or \"previous\": {0:?}"
    )]
    BadName(String),
}

/// Points of an install where a crash is simulated in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The signed manifest, then each artifact by name, were verified and written to staging.
    Verified(String),
    Unpacked,
    Synced,
    BlobsStored,
    Committed,
    CurrentSet,
}

/// An installed version.
#[derive(Debug, Clone)]
pub struct Installed {
    pub name: String,
    pub version: String,
    pub dir: PathBuf,
    pub manifest: PackageManifest,
}

impl Installed {
    /// The name of the publisher key that signed this version (`None` for a version
    /// installed before the signer was recorded).
    pub fn publisher(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join(package::SIGNER)).ok()?;
        let name = text.trim().split_once(' ')?.1.trim();
        (!name.is_empty()).then(|| name.to_string())
    }

    pub fn service_manifest(&self) -> PathBuf {
        self.dir.join("service.toml")
    }
    pub fn rootfs(&self) -> Option<PathBuf> {
        Some(self.dir.join("rootfs")).filter(|p| p.is_dir())
    }
}

/// The gateway's check of a verified package before it is committed (see
/// [`Store::install_checked`]): a refusal, or what the version keeps.
pub type Check<'a> = dyn FnMut(&Path, &PackageManifest) -> Result<Keep, Box<dyn std::error::Error + Send + Sync>>
    + 'a;

/// What a committed version keeps of its verified package.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keep {
    /// Every artifact.
    #[default]
    All,
    /// A container's: its unpacked tree. The same tree again as a microVM's boot artifacts
    /// (initramfs, kernel) is not written to flash.
    Tree,
}

#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    trust: TrustStore,
    limits: Limits,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.into(),
        source,
    }
}

/// Names the store itself uses inside a service's directory.
const RESERVED: [&str; 2] = ["current", "previous"];

fn check_name(n: &str) -> Result<(), StoreError> {
    let ok = !n.is_empty()
        && n.len() <= 64
        && !n.starts_with('.')
        && !RESERVED.contains(&n)
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    ok.then_some(())
        .ok_or_else(|| StoreError::BadName(n.into()))
}

fn fsync_dir(path: &Path) -> Result<(), StoreError> {
    std::fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io(path))
}

/// Flushes the whole filesystem holding `dir` (file data and metadata).
fn syncfs(dir: &Path) -> Result<(), StoreError> {
    use std::os::fd::AsRawFd;
    let d = std::fs::File::open(dir).map_err(io(dir))?;
    // SAFETY: syncfs takes an open fd we own for the duration of the call; no memory is shared.
    if unsafe { libc::syncfs(d.as_raw_fd()) } != 0 {
        return Err(io(dir)(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// fsyncs every directory under `dir` (their entries; file data went with `syncfs`).
fn fsync_tree_dirs(dir: &Path) -> Result<(), StoreError> {
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        if e.file_type().map_err(io(dir))?.is_dir() {
            fsync_tree_dirs(&e.path())?;
        }
    }
    fsync_dir(dir)
}

/// Points `link` at `target` atomically (new symlink, then rename over the old one).
fn swap_symlink(link: &Path, target: &str) -> Result<(), StoreError> {
    // A dot name: no version can have it (names never start with '.').
    let tmp = link.with_file_name(format!(
        ".{}.tmp",
        link.file_name().unwrap_or_default().to_string_lossy()
    ));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, link).map_err(io(link))?;
    fsync_dir(link.parent().expect("has parent"))
}

impl Store {
    /// Opens the store, removing what an interrupted install left in `tmp/`.
    pub fn open(root: &Path, trust: TrustStore, limits: Limits) -> Result<Store, StoreError> {
        for d in ["blobs/sha256", "services", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        let tmp = root.join("tmp");
        for e in std::fs::read_dir(&tmp).map_err(io(&tmp))?.flatten() {
            let _ = std::fs::remove_dir_all(e.path());
        }
        Ok(Store {
            root: root.into(),
            trust,
            limits,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn service_dir(&self, name: &str) -> PathBuf {
        self.root.join("services").join(name)
    }

    /// Verifies and installs `pkg`, making it the current version of its service (the one
    /// before becomes `previous`). `hook` is called at each step (tests crash there).
    pub fn install(&self, pkg: &Path, hook: &mut dyn FnMut(Step)) -> Result<Installed, StoreError> {
        self.install_checked(pkg, &mut |_, _| Ok(Keep::All), hook)
    }

    /// [`Self::install`] with the gateway's own check of the verified, unpacked package
    /// (`check` gets the staged version directory and its manifest) before anything is
    /// committed: a refusal leaves the store as it was.
    pub fn install_checked(
        &self,
        pkg: &Path,
        check: &mut Check,
        hook: &mut dyn FnMut(Step),
    ) -> Result<Installed, StoreError> {
        let staging =
            self.root
                .join("tmp")
                .join(format!("install-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(staging.join("artifacts")).map_err(io(&staging))?;
        let res = self.install_staged(pkg, &staging, check, hook);
        let _ = std::fs::remove_dir_all(&staging);
        res
    }

    fn install_staged(
        &self,
        pkg: &Path,
        staging: &Path,
        check: &mut Check,
        hook: &mut dyn FnMut(Step),
    ) -> Result<Installed, StoreError> {
        let perr = |source| StoreError::Package {
            path: pkg.into(),
            source,
        };
        let file = package::open_regular(pkg).map_err(io(pkg))?;
        let arts = staging.join("artifacts");
        let tree = staging.join("tree");
        std::fs::create_dir_all(&tree).map_err(io(&tree))?;
        // One pass: the rootfs is unpacked straight from the verified stream (into staging;
        // a digest mismatch discards it), single-file artifacts are written once and become
        // blobs.
        let limits = self.limits;
        let manifest = package::verify_with(
            std::io::BufReader::with_capacity(256 * 1024, file),
            &self.trust,
            &self.limits,
            &tree,
            |a, r| {
                match a.kind {
                    ArtifactKind::Rootfs => {
                        crate::rootfs::unpack(r, &tree.join("rootfs"), &limits)?;
                    }
                    ArtifactKind::Service => {
                        let mut out = std::fs::File::create(tree.join("service.toml"))?;
                        std::io::copy(r, &mut out)?;
                    }
                    ArtifactKind::Kernel | ArtifactKind::Initramfs | ArtifactKind::Disk => {
                        let mut out = std::fs::File::create(arts.join(&a.name))?;
                        std::io::copy(r, &mut out)?;
                    }
                }
                Ok(())
            },
            |n| hook(Step::Verified(n.to_string())),
        )
        .map_err(perr)?;
        check_name(&manifest.name)?;
        check_name(&manifest.version)?;
        // The check sees the version as it would be committed, every artifact in place.
        let files: Vec<_> = manifest
            .artifacts
            .iter()
            .filter(|a| !matches!(a.kind, ArtifactKind::Rootfs | ArtifactKind::Service))
            .collect();
        for a in &files {
            std::fs::hard_link(package::artifact_path(&arts, a), tree.join(&a.name))
                .map_err(io(&tree))?;
        }
        let keep = check(&tree, &manifest).map_err(|source| StoreError::Rejected {
            path: pkg.into(),
            source,
        })?;
        let boot = |a: &&package::Artifact| {
            matches!(a.kind, ArtifactKind::Initramfs | ArtifactKind::Kernel)
        };
        let (blobs, dropped): (Vec<_>, Vec<_>) = files
            .into_iter()
            .partition(|a| keep == Keep::All || !boot(a));
        for a in dropped {
            let f = tree.join(&a.name);
            std::fs::remove_file(&f).map_err(io(&f))?;
        }
        let svc = self.service_dir(&manifest.name);
        let final_dir = svc.join(&manifest.version);
        if !final_dir.exists() {
            hook(Step::Unpacked);
            // One filesystem-wide flush instead of one per file: the same durability before
            // the rename, a fraction of the device flushes.
            syncfs(&tree)?;
            fsync_tree_dirs(&tree)?;
            hook(Step::Synced);
            for a in &blobs {
                let blob = self.root.join("blobs/sha256").join(&a.sha256);
                if !blob.exists() {
                    std::fs::rename(package::artifact_path(&arts, a), &blob).map_err(io(&blob))?;
                }
            }
            fsync_dir(&self.root.join("blobs/sha256"))?;
            hook(Step::BlobsStored);
            std::fs::create_dir_all(&svc).map_err(io(&svc))?;
            std::fs::rename(&tree, &final_dir).map_err(io(&final_dir))?;
            fsync_dir(&svc)?;
            hook(Step::Committed);
        }
        let old = self.current(&manifest.name).map(|i| i.version);
        if old.as_deref() != Some(manifest.version.as_str()) {
            if let Some(old) = &old {
                swap_symlink(&svc.join("previous"), old)?;
            }
            swap_symlink(&svc.join("current"), &manifest.version)?;
        }
        hook(Step::CurrentSet);
        Ok(Installed {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            dir: final_dir,
            manifest,
        })
    }

    fn version_at(&self, name: &str, link: &str) -> Option<Installed> {
        let svc = self.service_dir(name);
        let version = std::fs::read_link(svc.join(link))
            .ok()?
            .to_string_lossy()
            .into_owned();
        self.version(name, &version).ok()
    }

    pub fn version(&self, name: &str, version: &str) -> Result<Installed, StoreError> {
        let dir = self.service_dir(name).join(version);
        let bytes =
            std::fs::read(dir.join(package::MANIFEST)).map_err(|_| StoreError::NoVersion {
                name: name.into(),
                version: version.into(),
            })?;
        let manifest = PackageManifest::parse(&bytes).map_err(|source| StoreError::Package {
            path: dir.clone(),
            source,
        })?;
        Ok(Installed {
            name: name.into(),
            version: version.into(),
            dir,
            manifest,
        })
    }

    pub fn current(&self, name: &str) -> Option<Installed> {
        self.version_at(name, "current")
    }

    pub fn previous(&self, name: &str) -> Option<Installed> {
        self.version_at(name, "previous")
    }

    /// Makes the previous version current again (and the current one previous).
    pub fn rollback(&self, name: &str) -> Result<Installed, StoreError> {
        let prev = self.previous(name).ok_or_else(|| StoreError::NoVersion {
            name: name.into(),
            version: "previous".into(),
        })?;
        let svc = self.service_dir(name);
        if let Some(cur) = self.current(name) {
            swap_symlink(&svc.join("previous"), &cur.version)?;
        }
        swap_symlink(&svc.join("current"), &prev.version)?;
        Ok(prev)
    }

    /// Forgets a service entirely (its blobs go at the next `gc`).
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let svc = self.service_dir(name);
        match std::fs::remove_dir_all(&svc) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&svc)(e)),
            _ => Ok(()),
        }
    }

    /// Removes versions that are neither current nor previous, staging leftovers, and blobs no
    /// remaining version refers to. Returns how many entries went.
    pub fn gc(&self) -> Result<usize, StoreError> {
        let mut removed = 0;
        let mut referenced = std::collections::HashSet::new();
        let services = self.root.join("services");
        for svc in std::fs::read_dir(&services)
            .map_err(io(&services))?
            .flatten()
        {
            let name = svc.file_name().to_string_lossy().into_owned();
            let keep: Vec<String> = [self.current(&name), self.previous(&name)]
                .into_iter()
                .flatten()
                .map(|i| i.version)
                .collect();
            for v in std::fs::read_dir(svc.path())
                .map_err(io(&svc.path()))?
                .flatten()
            {
                let vname = v.file_name().to_string_lossy().into_owned();
                if vname == "current" || vname == "previous" {
                    continue;
                }
                if keep.contains(&vname) {
                    if let Ok(i) = self.version(&name, &vname) {
                        referenced.extend(i.manifest.artifacts.iter().map(|a| a.sha256.clone()));
                    }
                } else {
                    let _ = std::fs::remove_dir_all(v.path());
                    removed += 1;
                }
            }
        }
        let blobs = self.root.join("blobs/sha256");
        for b in std::fs::read_dir(&blobs).map_err(io(&blobs))?.flatten() {
            if !referenced.contains(&*b.file_name().to_string_lossy()) {
                let _ = std::fs::remove_file(b.path());
                removed += 1;
            }
        }
        Ok(removed)
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}
