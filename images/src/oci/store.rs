//! The image store (`STATE/images/oci`): layers kept once by content, shared by every image
//! and service that has them.
//!
//! ```text
//! layers/HEX/     a layer applied (HEX: its uncompressed digest, the config's diff_id)
//! images/HEX/     an imported image (HEX: the digest its signature names): image.json (what
//!                 was imported, from where, signed by whom), config.json (as the image has it)
//! tmp/            staging; whatever is here after a crash is garbage
//! ```
//!
//! An import resolves the image and checks the operator's signature before it writes
//! anything; each layer the store lacks is applied in `tmp/` while its digests are checked
//! as it streams, flushed, then renamed into `layers/` (atomic): a layer directory is always
//! complete. The image's record is written last, the same way. A pull killed half-way leaves
//! complete layers, which the next import of any image reuses, and garbage in `tmp/`, which
//! [`ImageStore::open`] removes. A layer no image record names is removed by
//! [`ImageStore::gc`].

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::digest::Hashing;
use super::layer::{self, Rules};
use super::registry::Registries;
use super::source::{self, Reference, Resolved};
use super::spec::ImageConfig;
use super::{Digest, OciError};
use crate::keys::TrustStore;

/// An imported image, as its record says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// What its signature names (see [`Resolved::digest`]).
    pub digest: Digest,
    /// The references it was imported from, latest last.
    pub references: Vec<String>,
    pub config_digest: Digest,
    /// Its layers' uncompressed digests, base first.
    pub layers: Vec<Digest>,
    /// The key that signed it, and the name that key was trusted under.
    pub key: String,
    pub publisher: String,
    pub imported_at_ms: u64,
}

/// Points of an import where a crash is simulated in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportStep {
    /// The manifest, config and signature were checked; nothing is written yet.
    Verified,
    /// This layer is complete in `layers/`.
    Layer(Digest),
    /// The image's record is written.
    Recorded,
}

/// What an import did.
#[derive(Debug, Clone)]
pub struct Imported {
    pub record: ImageRecord,
    pub config: ImageConfig,
    /// Layers applied by this import, and layers the store had already.
    pub layers_added: usize,
    pub layers_shared: usize,
}

pub struct ImageStore {
    root: PathBuf,
    trust: TrustStore,
    rules: Rules,
    registries: Registries,
}

/// A compressed layer's blob may be larger than its tar only by this much (a tar of random
/// data does not compress).
const BLOB_SLACK: u64 = 1 << 20;
/// Layers applied at once by an import (container engines pull three at a time too).
const PARALLEL_LAYERS: usize = 3;

impl ImageStore {
    /// Opens (creating) the store under `images_root`; clears what a crash left in `tmp/`.
    pub fn open(
        images_root: &Path,
        trust: TrustStore,
        rules: Rules,
    ) -> Result<ImageStore, OciError> {
        let root = images_root.join("oci");
        for d in ["layers", "images", "tmp"] {
            let p = root.join(d);
            std::fs::create_dir_all(&p).map_err(OciError::store(&p))?;
        }
        let s = ImageStore {
            root,
            trust,
            rules,
            registries: Registries::default(),
        };
        s.clear_tmp();
        Ok(s)
    }

    fn clear_tmp(&self) {
        if let Ok(rd) = std::fs::read_dir(self.root.join("tmp")) {
            for e in rd.flatten() {
                let _ =
                    std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            }
        }
    }

    /// How registries are reached (their CAs and credentials).
    pub fn with_registries(mut self, registries: Registries) -> ImageStore {
        self.registries = registries;
        self
    }

    /// Checks a signature (or deployment) document of image `digest` against the store's
    /// trusted keys.
    pub fn verify_signature(
        &self,
        doc: &[u8],
        digest: &Digest,
    ) -> Result<super::signature::Verified, OciError> {
        super::signature::verify_document(doc, digest, &self.trust)
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    fn image_dir(&self, d: &Digest) -> PathBuf {
        self.root.join("images").join(d.hex())
    }

    /// The directories of `rec`'s layers, top first (overlayfs's `lowerdir` order).
    pub fn lower_dirs(&self, rec: &ImageRecord) -> Vec<PathBuf> {
        rec.layers.iter().rev().map(|d| self.layer_dir(d)).collect()
    }

    /// Imports the image at `r`, signed by `signature` (a [`super::signature`] document).
    /// `rules_for` gives the unpacking rules for the key that signed it (its id and name:
    /// the operator's grants to that publisher).
    pub fn import(
        &self,
        r: &Reference,
        signature: &[u8],
        rules_for: &dyn Fn(&str, &str) -> Rules,
        hook: &mut dyn FnMut(ImportStep),
    ) -> Result<Imported, OciError> {
        let resolved = source::resolve(r, &self.registries)?;
        let (key, publisher) = super::signature::verify(signature, &resolved.digest, &self.trust)?;
        let rules = &rules_for(&key, &publisher);
        hook(ImportStep::Verified);
        // The layers not stored yet (each once, however often the image lists it) are
        // applied side by side, each to a directory of its own, as a container engine pulls
        // them: one layer's download overlaps another's decompression and flush.
        let mut missing: Vec<&source::LayerSource> = Vec::new();
        for l in &resolved.layers {
            if !self.layer_dir(&l.diff_id).is_dir()
                && !missing.iter().any(|m| m.diff_id == l.diff_id)
            {
                missing.push(l);
            }
        }
        let shared = resolved.layers.len() - missing.len();
        let added = missing.len();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut results: Vec<Option<Result<(), OciError>>> = missing.iter().map(|_| None).collect();
        std::thread::scope(|s| {
            for _ in 0..missing.len().min(PARALLEL_LAYERS) {
                let tx = tx.clone();
                let (next, failed, missing, resolved) = (&next, &failed, &missing, &resolved);
                s.spawn(move || loop {
                    use std::sync::atomic::Ordering;
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    // After a failure nothing new is started; layers under way finish.
                    if i >= missing.len() || failed.load(Ordering::SeqCst) {
                        break;
                    }
                    let r = self.add_layer(resolved, missing[i], rules);
                    if r.is_err() {
                        failed.store(true, Ordering::SeqCst);
                    }
                    if tx.send((i, r)).is_err() {
                        break;
                    }
                });
            }
            drop(tx);
            for (i, r) in rx {
                if r.is_ok() {
                    hook(ImportStep::Layer(missing[i].diff_id.clone()));
                }
                results[i] = Some(r);
            }
        });
        // The first failing layer in the image's order is the reason, whatever the timing.
        for r in results.into_iter().flatten() {
            r?;
        }
        let mut references = self
            .record(&resolved.digest)
            .map(|r| r.references)
            .unwrap_or_default();
        references.retain(|x| *x != resolved.reference);
        references.push(resolved.reference.clone());
        let record = ImageRecord {
            digest: resolved.digest.clone(),
            references,
            config_digest: resolved.config_digest.clone(),
            layers: resolved.layers.iter().map(|l| l.diff_id.clone()).collect(),
            key,
            publisher,
            imported_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        };
        self.write_record(&record, &resolved.config_raw)?;
        hook(ImportStep::Recorded);
        Ok(Imported {
            record,
            config: resolved.config,
            layers_added: added,
            layers_shared: shared,
        })
    }

    /// Applies one layer in `tmp/`, checking its blob's and its tar's digests as it streams,
    /// flushes it and moves it into `layers/`.
    fn add_layer(
        &self,
        resolved: &Resolved,
        l: &source::LayerSource,
        rules: &Rules,
    ) -> Result<(), OciError> {
        let name = l.diff_id.to_string();
        let tmp = self.tmp_path(l.diff_id.hex());
        std::fs::create_dir(&tmp).map_err(OciError::store(&tmp))?;
        let result = (|| {
            let blob = resolved.open_layer(l)?;
            let mut outer = Hashing::new(blob, rules.max_bytes + BLOB_SLACK);
            let applied = {
                let mut buffered = BufReader::new(&mut outer);
                let magic = buffered
                    .fill_buf()
                    .map_err(OciError::io(format!("layer {name}")))?
                    .to_vec();
                let decoded: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
                    Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
                } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                    Box::new(ZstdFrames::new(buffered)?)
                } else {
                    Box::new(buffered)
                };
                let mut inner = Hashing::new(decoded, rules.max_bytes);
                layer::apply(&mut inner, &tmp, rules, &name).and_then(|_| {
                    inner.finish(
                        &format!("layer {name} (its uncompressed tar)"),
                        &l.diff_id,
                        None,
                    )
                })
            };
            // A blob that is not what its manifest says is the reason, whatever else failed.
            if let Some(d) = &l.digest {
                outer.finish(&format!("layer blob {d}"), d, l.size)?;
            }
            applied
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let dir = crate::beneath::Dir::open(&tmp).map_err(OciError::store(&tmp))?;
        syncfs(&dir).map_err(OciError::store(&tmp))?;
        let dest = self.layer_dir(&l.diff_id);
        match std::fs::rename(&tmp, &dest) {
            Ok(()) => {}
            // Another import stored it meanwhile.
            Err(_) if dest.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => return Err(OciError::store(&dest)(e)),
        }
        fsync_dir(&self.root.join("layers"))
    }

    fn tmp_path(&self, what: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        self.root.join("tmp").join(format!(
            "{what}.{}.{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    fn write_record(&self, rec: &ImageRecord, config_raw: &[u8]) -> Result<(), OciError> {
        let tmp = self.tmp_path(rec.digest.hex());
        std::fs::create_dir(&tmp).map_err(OciError::store(&tmp))?;
        let write = |name: &str, bytes: &[u8]| -> Result<(), OciError> {
            use std::io::Write;
            let p = tmp.join(name);
            let mut f = std::fs::File::create(&p).map_err(OciError::store(&p))?;
            f.write_all(bytes)
                .and_then(|()| f.sync_all())
                .map_err(OciError::store(&p))
        };
        write(
            "image.json",
            &serde_json::to_vec_pretty(rec).expect("a record serialises"),
        )?;
        write("config.json", config_raw)?;
        fsync_dir(&tmp)?;
        let dest = self.image_dir(&rec.digest);
        // A record that is there already is replaced whole (its references grew).
        let old = self.tmp_path(&format!("old-{}", rec.digest.hex()));
        let had = std::fs::rename(&dest, &old).is_ok();
        std::fs::rename(&tmp, &dest).map_err(OciError::store(&dest))?;
        fsync_dir(&self.root.join("images"))?;
        if had {
            let _ = std::fs::remove_dir_all(&old);
        }
        Ok(())
    }

    fn record(&self, d: &Digest) -> Option<ImageRecord> {
        let bytes = std::fs::read(self.image_dir(d).join("image.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Every image, by digest.
    pub fn list(&self) -> Vec<ImageRecord> {
        let mut v: Vec<ImageRecord> = std::fs::read_dir(self.root.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                Digest::parse(&format!("sha256:{}", e.file_name().to_string_lossy())).ok()
            })
            .filter_map(|d| self.record(&d))
            .collect();
        v.sort_by(|a, b| a.digest.cmp(&b.digest));
        v
    }

    /// The image `what` names: its digest (`sha256:HEX`), at least 12 of its first hex
    /// digits, or a reference it was imported from.
    pub fn get(&self, what: &str) -> Result<ImageRecord, OciError> {
        if let Ok(d) = Digest::parse(what) {
            return self
                .record(&d)
                .ok_or_else(|| OciError::NotFound(what.into()));
        }
        let prefix = what.strip_prefix("sha256:").unwrap_or(what);
        let by_prefix = prefix.len() >= 12 && prefix.bytes().all(|c| c.is_ascii_hexdigit());
        let found: Vec<ImageRecord> = self
            .list()
            .into_iter()
            .filter(|r| {
                if by_prefix {
                    r.digest.hex().starts_with(prefix)
                } else {
                    r.references.iter().any(|x| x == what)
                }
            })
            .collect();
        match found.len() {
            0 => Err(OciError::NotFound(what.into())),
            1 => Ok(found.into_iter().next().expect("one")),
            _ if !by_prefix => Ok(found
                .into_iter()
                .max_by_key(|r| r.imported_at_ms)
                .expect("several")),
            _ => Err(OciError::Ambiguous(what.into())),
        }
    }

    /// The configuration of image `rec`, as imported.
    pub fn config(&self, rec: &ImageRecord) -> Result<ImageConfig, OciError> {
        let p = self.image_dir(&rec.digest).join("config.json");
        let bytes = std::fs::read(&p).map_err(OciError::store(&p))?;
        serde_json::from_slice(&bytes).map_err(|e| OciError::invalid(p.display().to_string(), e))
    }

    /// The regular file `rel` (e.g. `etc/passwd`) as the image's merged root has it: from
    /// its topmost layer that has it, unless a layer above removed it (a whiteout) or hid its
    /// directory (opaque); at most `limit` bytes. Read beneath each layer through real
    /// directories only.
    pub fn read_file(&self, rec: &ImageRecord, rel: &str, limit: u64) -> Option<Vec<u8>> {
        use crate::beneath::{is_kind, Dir};
        use nix::sys::stat::SFlag;
        let (parent, name) = crate::beneath::split(Path::new(rel));
        'layers: for dir in self.lower_dirs(rec) {
            let mut cur = Dir::open(&dir).ok()?;
            // An opaque directory on the way hides what the layers below have under it.
            let mut opaque = false;
            for c in parent.components() {
                let std::path::Component::Normal(n) = c else {
                    return None;
                };
                match cur.stat(n) {
                    Ok(st) if is_kind(&st, SFlag::S_IFDIR) => {
                        cur = cur.dir(Path::new(n)).ok()?;
                        opaque |= cur.is_opaque();
                    }
                    // A whiteout (or a file) hides the directory and all below it.
                    Ok(_) => return None,
                    Err(_) if opaque => return None,
                    Err(_) => continue 'layers,
                }
            }
            match cur.stat(name) {
                Ok(st) if is_kind(&st, SFlag::S_IFREG) => {
                    let mut buf = Vec::new();
                    let f = cur.open_file(name).ok()?;
                    f.take(limit).read_to_end(&mut buf).ok()?;
                    return Some(buf);
                }
                // A whiteout, or anything else that hides it.
                Ok(_) => return None,
                Err(_) if opaque => return None,
                Err(_) => {}
            }
        }
        None
    }

    /// Every layer of `rec` is in the store.
    pub fn complete(&self, rec: &ImageRecord) -> bool {
        rec.layers.iter().all(|d| self.layer_dir(d).is_dir())
    }

    /// Removes image `d`'s record, then the layers nothing else uses; answers how many.
    pub fn remove(&self, d: &Digest) -> Result<usize, OciError> {
        let dir = self.image_dir(d);
        if !dir.is_dir() {
            return Err(OciError::NotFound(d.to_string()));
        }
        let old = self.tmp_path(&format!("rm-{}", d.hex()));
        std::fs::rename(&dir, &old).map_err(OciError::store(&dir))?;
        fsync_dir(&self.root.join("images"))?;
        let _ = std::fs::remove_dir_all(&old);
        self.gc()
    }

    /// Removes the layers no image record names (and staging garbage); answers how many
    /// layers went.
    pub fn gc(&self) -> Result<usize, OciError> {
        let used: std::collections::HashSet<Digest> =
            self.list().into_iter().flat_map(|r| r.layers).collect();
        let layers = self.root.join("layers");
        let mut removed = 0;
        for e in std::fs::read_dir(&layers)
            .map_err(OciError::store(&layers))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = Digest::parse(&format!("sha256:{name}")).is_ok_and(|d| used.contains(&d));
            if !keep {
                // Renamed out first: a layer directory is complete or absent.
                let old = self.tmp_path(&format!("gc-{name}"));
                if std::fs::rename(e.path(), &old).is_ok() {
                    let _ = std::fs::remove_dir_all(&old);
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Bytes the store's files take on disk (allocated blocks), layers and records.
    pub fn disk_bytes(&self) -> u64 {
        disk_usage(&self.root.join("layers")) + disk_usage(&self.root.join("images"))
    }
}

/// Bytes `p` takes on disk (allocated blocks), a directory with everything below it;
/// symlinks are not followed.
pub fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    let mut n = m.blocks() * 512;
    if m.is_dir() {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            n += disk_usage(&e.path());
        }
    }
    n
}

fn syncfs(d: &crate::beneath::Dir) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(d.proc_path())?;
    // SAFETY: syncfs on an fd we own for the duration of the call; it flushes the
    // filesystem's dirty data and touches no memory of ours.
    let r = unsafe { libc::syncfs(f.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn fsync_dir(p: &Path) -> Result<(), OciError> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(OciError::store(p))
}

/// A zstd stream of one or more frames, decoded.
struct ZstdFrames<R: BufRead> {
    cur: Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(src: R) -> Result<ZstdFrames<R>, OciError> {
        let d = ruzstd::decoding::StreamingDecoder::new(src)
            .map_err(|e| OciError::invalid("a zstd layer", e))?;
        Ok(ZstdFrames { cur: Some(d) })
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let Some(d) = self.cur.as_mut() else {
                return Ok(0);
            };
            let n = d.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            // This frame ended: another may follow.
            let (mut src, dec) = self.cur.take().expect("a frame").into_parts();
            if src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            self.cur = Some(
                ruzstd::decoding::StreamingDecoder::new_with_decoder(src, dec)
                    .map_err(std::io::Error::other)?,
            );
        }
    }
}
