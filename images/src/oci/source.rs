//! Where an image comes from, resolved to the one manifest this gateway runs.
//!
//! References (skopeo's transport names):
//! - `oci:DIR[:TAG]`: an OCI image layout directory;
//! - `oci-archive:FILE[:TAG]`: the same layout in a tar;
//! - `docker-archive:FILE[:NAME:TAG]` (FILE without ':'): what `docker save` (or `skopeo copy … docker-archive:`)
//!   writes;
//! - `docker://HOST[:PORT]/REPO[:TAG|@sha256:HEX]`: a registry ([`super::registry`]).
//!
//! An index is followed to the manifest tagged `TAG` (its `org.opencontainers.image.ref.name`),
//! nested indexes to the `linux/amd64` entry; the manifest and the config are read whole
//! (at most [`spec::MAX_DOCUMENT`]) and checked against their digests before they are parsed.
//! A layer's blob is handed out as a reader; [`super::store`] checks its digests while it
//! streams.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::digest::{read_verified, Digest};
use super::registry::{Registries, RegistryFiles, RegistryRef};
use super::spec::{self, Descriptor, ImageConfig};
use super::OciError;
use crate::beneath::{split, Dir};

/// Where an image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    OciDir { path: PathBuf, tag: Option<String> },
    OciArchive { path: PathBuf, tag: Option<String> },
    DockerArchive { path: PathBuf, tag: Option<String> },
    Registry(RegistryRef),
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, OciError> {
        let bad = || OciError::BadReference(s.into());
        if let Some(rest) = s.strip_prefix("docker://") {
            return Ok(Reference::Registry(RegistryRef::parse(rest)?));
        }
        let (transport, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        // The tag follows the path's last ':' when what follows it has no '/'. A docker
        // archive's is NAME:TAG, after the path's first ':' (as skopeo reads it).
        let (path, tag) = if transport == "docker-archive" {
            match rest.split_once(':') {
                Some((p, t)) => (p, Some(t)),
                None => (rest, None),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((p, t)) if !t.contains('/') => (p, Some(t)),
                _ => (rest, None),
            }
        };
        if path.is_empty() || tag.is_some_and(str::is_empty) {
            return Err(bad());
        }
        let (path, tag) = (PathBuf::from(path), tag.map(str::to_string));
        Ok(match transport {
            "oci" => Reference::OciDir { path, tag },
            "oci-archive" => Reference::OciArchive { path, tag },
            "docker-archive" => Reference::DockerArchive { path, tag },
            _ => return Err(bad()),
        })
    }

    /// The file or directory of a local reference (`None` for a registry's).
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            Reference::OciDir { path, .. }
            | Reference::OciArchive { path, .. }
            | Reference::DockerArchive { path, .. } => Some(path),
            Reference::Registry(_) => None,
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (t, path, tag) = match self {
            Reference::OciDir { path, tag } => ("oci", path, tag),
            Reference::OciArchive { path, tag } => ("oci-archive", path, tag),
            Reference::DockerArchive { path, tag } => ("docker-archive", path, tag),
            Reference::Registry(r) => return r.fmt(f),
        };
        write!(f, "{t}:{}", path.display())?;
        match tag {
            Some(tag) => write!(f, ":{tag}"),
            None => Ok(()),
        }
    }
}

/// Files of an image's source, by their path in it.
trait Files {
    fn open(&self, path: &str) -> Result<Box<dyn Read + Send + '_>, OciError>;
    fn exists(&self, path: &str) -> bool;
    /// Where the manifest or index `d` is (a layout keeps them with the blobs).
    fn manifest_path(&self, d: &Digest) -> String {
        blob_path(d)
    }
}

impl Files for RegistryFiles {
    fn open(&self, path: &str) -> Result<Box<dyn Read + Send + '_>, OciError> {
        self.open_path(path)
    }
    fn exists(&self, _path: &str) -> bool {
        false
    }
    fn manifest_path(&self, d: &Digest) -> String {
        format!("manifests/{d}")
    }
}

/// A layout directory: files are opened beneath it, through real directories only.
struct DirFiles {
    root: Dir,
    name: String,
}

impl Files for DirFiles {
    fn open(&self, path: &str) -> Result<Box<dyn Read + Send + '_>, OciError> {
        let what = format!("{}/{path}", self.name);
        let (parent, name) = split(Path::new(path));
        let f = self
            .root
            .dir(parent)
            .map_err(|e| OciError::Io {
                what: what.clone(),
                source: std::io::Error::other(e),
            })?
            .open_file(name)
            .map_err(|e| OciError::io(what.clone())(e.into()))?;
        // Opened non-blocking (a FIFO cannot hold the open); a regular file reads as usual.
        let st = nix::sys::stat::fstat(&f).map_err(|e| OciError::io(what.clone())(e.into()))?;
        if !crate::beneath::is_kind(&st, nix::sys::stat::SFlag::S_IFREG) {
            return Err(OciError::invalid(what, "not a regular file"));
        }
        Ok(Box::new(f))
    }

    fn exists(&self, path: &str) -> bool {
        self.open(path).is_ok()
    }
}

/// A tar (an OCI layout or a `docker save` archive), indexed once: each regular file's data
/// is read in place.
struct TarFiles {
    path: PathBuf,
    /// Path in the archive (without `./`) -> (offset of its data, size).
    entries: HashMap<String, (u64, u64)>,
}

impl TarFiles {
    fn index(path: &Path) -> Result<TarFiles, OciError> {
        let what = path.display().to_string();
        let f = File::open(path).map_err(OciError::io(what.clone()))?;
        let mut ar = tar::Archive::new(f);
        let mut entries = HashMap::new();
        let mut links = Vec::new();
        let bad = |e: std::io::Error| OciError::invalid(what.clone(), e);
        for e in ar.entries().map_err(bad)? {
            let e = e.map_err(bad)?;
            let name = clean(&e.path().map_err(bad)?.to_string_lossy());
            match e.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    entries.insert(name, (e.raw_file_position(), e.size()));
                }
                // Older `docker save` links a layer seen twice to its first copy.
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    if let Some(target) = e.link_name().map_err(bad)? {
                        links.push((name, target.to_string_lossy().into_owned()));
                    }
                }
                _ => {}
            }
        }
        for (name, target) in links {
            let base = Path::new(&name).parent().unwrap_or(Path::new(""));
            let joined = clean(&normalise(&base.join(&target)));
            if let Some(v) = entries.get(&joined).copied() {
                entries.insert(name, v);
            }
        }
        Ok(TarFiles {
            path: path.into(),
            entries,
        })
    }
}

fn clean(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .to_string()
}

/// `a/../b` as `b`, without touching the filesystem.
fn normalise(p: &Path) -> String {
    let mut out: Vec<&std::ffi::OsStr> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out.iter()
        .map(|s| s.to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

impl Files for TarFiles {
    fn open(&self, path: &str) -> Result<Box<dyn Read + Send + '_>, OciError> {
        let what = format!("{}:{path}", self.path.display());
        let (offset, size) = *self
            .entries
            .get(path)
            .ok_or_else(|| OciError::invalid(what.clone(), "not in the archive"))?;
        let mut f = File::open(&self.path).map_err(OciError::io(what.clone()))?;
        f.seek(SeekFrom::Start(offset))
            .map_err(OciError::io(what))?;
        Ok(Box::new(f.take(size)))
    }

    fn exists(&self, path: &str) -> bool {
        self.entries.contains_key(path)
    }
}

/// One layer of a resolved image.
#[derive(Debug, Clone)]
pub struct LayerSource {
    /// Its file in the source.
    path: String,
    /// Its blob's digest and size, when the source says (a docker archive's layers are known
    /// by their uncompressed digest only).
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    /// The digest of its uncompressed tar (the config's `rootfs.diff_ids`): what the store
    /// keeps it by, whatever its compression.
    pub diff_id: Digest,
}

/// An image resolved to what this gateway runs.
pub struct Resolved {
    pub reference: String,
    /// What the operator signs: the manifest's digest (a docker archive has no manifest:
    /// its config's, the image ID, which names every layer through `rootfs.diff_ids`).
    pub digest: Digest,
    pub config_digest: Digest,
    pub config_raw: Vec<u8>,
    pub config: ImageConfig,
    /// Base first.
    pub layers: Vec<LayerSource>,
    files: Box<dyn Files + Send + Sync>,
}

impl Resolved {
    /// The blob of `layer`, as stored in the source (compressed or not).
    pub fn open_layer(&self, layer: &LayerSource) -> Result<Box<dyn Read + Send + '_>, OciError> {
        self.files.open(&layer.path)
    }
}

/// What kind of image archive the tar at `path` is, told by the names of its first entries:
/// `oci-archive` (it has `oci-layout`), `docker-archive` (`manifest.json`), or none (a
/// gatevisor package starts with `manifest.toml`; anything else is not an image).
pub fn archive_kind(path: &Path) -> Option<&'static str> {
    let mut a = tar::Archive::new(File::open(path).ok()?);
    for e in a.entries().ok()?.take(64) {
        let e = e.ok()?;
        let p = e.path().ok()?;
        match p.to_str()?.trim_start_matches("./") {
            "oci-layout" => return Some("oci-archive"),
            "manifest.json" => return Some("docker-archive"),
            "manifest.toml" => return None,
            _ => {}
        }
    }
    None
}

/// Resolves `r` to its `linux/amd64` image; a registry is reached as `registries` say.
pub fn resolve(r: &Reference, registries: &Registries) -> Result<Resolved, OciError> {
    let reference = r.to_string();
    match r {
        Reference::OciDir { path, tag } => {
            let root = Dir::open(path).map_err(OciError::io(path.display().to_string()))?;
            let files = DirFiles {
                root,
                name: path.display().to_string(),
            };
            resolve_layout(Box::new(files), reference, tag.as_deref())
        }
        Reference::OciArchive { path, tag } => {
            resolve_layout(Box::new(TarFiles::index(path)?), reference, tag.as_deref())
        }
        Reference::DockerArchive { path, tag } => {
            let files = TarFiles::index(path)?;
            if files.exists("index.json") && !files.exists("manifest.json") {
                return resolve_layout(Box::new(files), reference, tag.as_deref());
            }
            resolve_docker(Box::new(files), reference, tag.as_deref())
        }
        Reference::Registry(rr) => {
            resolve_registry(RegistryFiles::open(rr, registries)?, reference)
        }
    }
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

fn read_small(files: &dyn Files, path: &str, what: &str) -> Result<Vec<u8>, OciError> {
    let mut buf = Vec::new();
    files
        .open(path)?
        .take(spec::MAX_DOCUMENT + 1)
        .read_to_end(&mut buf)
        .map_err(OciError::io(what))?;
    if buf.len() as u64 > spec::MAX_DOCUMENT {
        return Err(OciError::TooLarge {
            what: what.into(),
            limit: spec::MAX_DOCUMENT,
        });
    }
    Ok(buf)
}

fn read_blob(files: &dyn Files, d: &Descriptor, what: &str) -> Result<Vec<u8>, OciError> {
    read_document(files, &blob_path(&d.digest), d, what)
}

fn read_manifest(files: &dyn Files, d: &Descriptor, what: &str) -> Result<Vec<u8>, OciError> {
    read_document(files, &files.manifest_path(&d.digest), d, what)
}

fn read_document(
    files: &dyn Files,
    path: &str,
    d: &Descriptor,
    what: &str,
) -> Result<Vec<u8>, OciError> {
    read_verified(
        files.open(path)?,
        what,
        &d.digest,
        Some(d.size),
        spec::MAX_DOCUMENT,
    )
}

fn parse<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, OciError> {
    serde_json::from_slice(bytes).map_err(|e| OciError::invalid(what, e))
}

fn is_amd64(p: &spec::Platform) -> bool {
    p.os == "linux" && p.architecture == "amd64"
}

/// Picks, from an index's entries, the one tagged `tag` (any, when no tag is asked for and
/// there is one), following nested indexes to their `linux/amd64` entry.
fn pick(
    files: &dyn Files,
    index: spec::Index,
    reference: &str,
    tag: Option<&str>,
    depth: u32,
) -> Result<Descriptor, OciError> {
    let mut candidates = index.manifests;
    if let Some(tag) = tag {
        let available = candidates
            .iter()
            .filter_map(|d| d.annotations.get(spec::REF_NAME).cloned())
            .collect::<Vec<_>>()
            .join(", ");
        candidates.retain(|d| d.annotations.get(spec::REF_NAME).map(String::as_str) == Some(tag));
        if candidates.is_empty() {
            return Err(OciError::NoTag {
                reference: reference.into(),
                tag: tag.into(),
                available: if available.is_empty() {
                    "no tags".into()
                } else {
                    available
                },
            });
        }
    }
    // Entries that say their platform must say linux/amd64.
    let platforms: Vec<String> = candidates
        .iter()
        .filter_map(|d| d.platform.as_ref().map(spec::Platform::text))
        .collect();
    candidates.retain(|d| d.platform.as_ref().is_none_or(is_amd64));
    let chosen = match candidates.len() {
        0 => {
            return Err(OciError::NoPlatform {
                reference: reference.into(),
                available: platforms.join(", "),
            })
        }
        1 => candidates.remove(0),
        _ => {
            // Several left: the one entry that says linux/amd64, if there is exactly one.
            let amd64: Vec<usize> = (0..candidates.len())
                .filter(|&i| candidates[i].platform.as_ref().is_some_and(is_amd64))
                .collect();
            match amd64[..] {
                [i] => candidates.remove(i),
                _ => {
                    return Err(OciError::invalid(
                        reference,
                        "it holds several images: name one with :TAG",
                    ))
                }
            }
        }
    };
    if chosen.is_index() {
        if depth >= 2 {
            return Err(OciError::invalid(reference, "indexes nested too deep"));
        }
        let what = format!("index {}", chosen.digest);
        let nested: spec::Index = parse(&read_manifest(files, &chosen, &what)?, &what)?;
        return pick(files, nested, reference, None, depth + 1);
    }
    Ok(chosen)
}

fn resolve_layout(
    files: Box<dyn Files + Send + Sync>,
    reference: String,
    tag: Option<&str>,
) -> Result<Resolved, OciError> {
    let layout = read_small(&*files, "oci-layout", &format!("{reference}: oci-layout"))?;
    let v: serde_json::Value = parse(&layout, "oci-layout")?;
    if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
        return Err(OciError::invalid(
            format!("{reference}: oci-layout"),
            "not an OCI image layout 1.0.0",
        ));
    }
    let index: spec::Index = parse(
        &read_small(&*files, "index.json", "index.json")?,
        "index.json",
    )?;
    let chosen = pick(&*files, index, &reference, tag, 0)?;
    let what = format!("manifest {}", chosen.digest);
    let raw = read_manifest(&*files, &chosen, &what)?;
    from_manifest(files, reference, chosen.digest, &raw)
}

/// The image of the manifest `raw` (whose digest is `digest`): its config and layers.
fn from_manifest(
    files: Box<dyn Files + Send + Sync>,
    reference: String,
    digest: Digest,
    raw: &[u8],
) -> Result<Resolved, OciError> {
    let what = format!("manifest {digest}");
    let manifest: spec::Manifest = parse(raw, &what)?;
    let what = format!("config {}", manifest.config.digest);
    let config_raw = read_blob(&*files, &manifest.config, &what)?;
    let config: ImageConfig = parse(&config_raw, &what)?;
    check_config(&config, &reference)?;
    if manifest.layers.len() != config.rootfs.diff_ids.len() {
        return Err(OciError::invalid(
            what,
            format!(
                "{} layers in the manifest, {} in rootfs.diff_ids",
                manifest.layers.len(),
                config.rootfs.diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::new();
    for (d, diff_id) in manifest.layers.iter().zip(&config.rootfs.diff_ids) {
        if !d.urls.is_empty()
            || d.media_type.contains("nondistributable")
            || d.media_type.contains("foreign")
        {
            return Err(OciError::invalid(
                format!("layer {}", d.digest),
                "a layer fetched from elsewhere (urls) is not followed",
            ));
        }
        layers.push(LayerSource {
            path: blob_path(&d.digest),
            digest: Some(d.digest.clone()),
            size: Some(d.size),
            diff_id: diff_id.clone(),
        });
    }
    Ok(Resolved {
        reference,
        digest,
        config_digest: manifest.config.digest,
        config_raw,
        config,
        layers,
        files,
    })
}

/// A registry's image: the manifest the reference names (checked against its digest, if
/// it names one), followed from an index to its `linux/amd64` entry.
fn resolve_registry(files: RegistryFiles, reference: String) -> Result<Resolved, OciError> {
    let (raw, content_type) = files.top_manifest(spec::MAX_DOCUMENT)?;
    let digest = Digest::of(&raw);
    if let Some(want) = &files.r.digest {
        if *want != digest {
            return Err(OciError::DigestMismatch {
                what: format!("manifest of {reference}"),
                expected: want.to_string(),
                actual: digest.to_string(),
            });
        }
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Kind {
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    let kind: Kind = parse(&raw, &format!("manifest of {reference}"))?;
    let media_type = kind.media_type.unwrap_or_else(|| {
        content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    });
    let is_index = media_type == spec::OCI_INDEX
        || media_type == spec::DOCKER_LIST
        || (media_type.is_empty() && kind.manifests.is_some());
    if !is_index {
        if media_type.starts_with("application/vnd.docker.distribution.manifest.v1") {
            return Err(OciError::invalid(
                &reference,
                "a Docker schema 1 manifest: the registry must serve schema 2 or OCI",
            ));
        }
        return from_manifest(Box::new(files), reference, digest, &raw);
    }
    let what = format!("index of {reference}");
    let index: spec::Index = parse(&raw, &what)?;
    let chosen = pick(&files, index, &reference, None, 0)?;
    let what = format!("manifest {}", chosen.digest);
    let raw = read_manifest(&files, &chosen, &what)?;
    from_manifest(Box::new(files), reference, chosen.digest, &raw)
}

/// The image must be for this gateway (a config that says another platform is refused even
/// when the index said nothing).
fn check_config(config: &ImageConfig, reference: &str) -> Result<(), OciError> {
    if config.os != "linux" || config.architecture != "amd64" {
        return Err(OciError::NoPlatform {
            reference: reference.into(),
            available: format!("{}/{}", config.os, config.architecture),
        });
    }
    if config.rootfs.kind != "layers" {
        return Err(OciError::invalid(
            reference,
            format!("rootfs.type is {:?}, not \"layers\"", config.rootfs.kind),
        ));
    }
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn resolve_docker(
    files: Box<dyn Files + Send + Sync>,
    reference: String,
    tag: Option<&str>,
) -> Result<Resolved, OciError> {
    let what = format!("{reference}: manifest.json");
    let mut entries: Vec<DockerEntry> =
        parse(&read_small(&*files, "manifest.json", &what)?, &what)?;
    let available = entries
        .iter()
        .flat_map(|e| e.repo_tags.clone().unwrap_or_default())
        .collect::<Vec<_>>()
        .join(", ");
    let entry = match tag {
        Some(t) => {
            let i = entries
                .iter()
                .position(|e| {
                    e.repo_tags.as_ref().is_some_and(|tags| {
                        tags.iter().any(|x| x == t || x.ends_with(&format!("/{t}")))
                    })
                })
                .ok_or_else(|| OciError::NoTag {
                    reference: reference.clone(),
                    tag: t.into(),
                    available: available.clone(),
                })?;
            entries.swap_remove(i)
        }
        None if entries.len() == 1 => entries.remove(0),
        None => {
            return Err(OciError::invalid(
                &reference,
                format!("it holds several images ({available}): name one with :NAME:TAG"),
            ))
        }
    };
    let config_path = clean(&entry.config);
    let config_raw = read_small(&*files, &config_path, &what)?;
    let config_digest = Digest::of(&config_raw);
    // The config's file is named by its digest ("HEX.json", "blobs/sha256/HEX").
    let named = Path::new(&config_path)
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".json").to_string())
        .unwrap_or_default();
    if named != config_digest.hex() {
        return Err(OciError::DigestMismatch {
            what: format!("config {config_path}"),
            expected: format!("sha256:{named}"),
            actual: config_digest.to_string(),
        });
    }
    let config: ImageConfig = parse(&config_raw, &format!("config {config_path}"))?;
    check_config(&config, &reference)?;
    if entry.layers.len() != config.rootfs.diff_ids.len() {
        return Err(OciError::invalid(
            format!("config {config_path}"),
            "its rootfs.diff_ids do not match the archive's layers",
        ));
    }
    let layers = entry
        .layers
        .iter()
        .zip(&config.rootfs.diff_ids)
        .map(|(p, diff_id)| LayerSource {
            path: clean(p),
            digest: None,
            size: None,
            diff_id: diff_id.clone(),
        })
        .collect();
    Ok(Resolved {
        reference,
        digest: config_digest.clone(),
        config_digest,
        config_raw,
        config,
        layers,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_skopeo_writes_them() {
        let p = |s: &str| Reference::parse(s).unwrap();
        assert_eq!(
            p("oci:/srv/img:v1"),
            Reference::OciDir {
                path: "/srv/img".into(),
                tag: Some("v1".into())
            }
        );
        assert_eq!(
            p("oci:/srv/img"),
            Reference::OciDir {
                path: "/srv/img".into(),
                tag: None
            }
        );
        assert_eq!(
            p("docker-archive:/tmp/a.tar:gv/broker:2.0"),
            Reference::DockerArchive {
                path: "/tmp/a.tar".into(),
                tag: Some("gv/broker:2.0".into())
            }
        );
        assert_eq!(
            p("oci-archive:x.tar:latest").to_string(),
            "oci-archive:x.tar:latest"
        );
        assert_eq!(
            p("docker://127.0.0.1:5000/gv/broker:2.0").to_string(),
            "docker://127.0.0.1:5000/gv/broker:2.0"
        );
        assert_eq!(p("docker://reg.example/gv/broker").local_path(), None);
        for bad in [
            "",
            "oci:",
            "docker://x/Y:1",
            "docker:/x",
            "/tmp/x",
            "oci:/x:",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
