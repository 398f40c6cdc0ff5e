//! The package format: one uncompressed tar holding, in this order,
//! 1. `manifest.toml`: the package's name, version and the list of artifacts with their
//!    SHA-256 and size;
//! 2. `manifest.sig`: `ed25519 KEYID HEXSIG`, a detached signature over the exact bytes of
//!    `manifest.toml`;
//! 3. each artifact, in the order the manifest lists them.
//!
//! The order lets a gateway check the signature before it writes anything, then check every
//! artifact's digest and size while streaming it to disk. Nothing after the listed artifacts is
//! accepted. Building is reproducible: entries carry no timestamps, owners or host modes.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::keys::{self, SecretKey, TrustStore};

pub const FORMAT: u32 = 1;
pub const MANIFEST: &str = "manifest.toml";
pub const SIGNATURE: &str = "manifest.sig";
/// Written next to an installed manifest: `KEY-ID NAME` of the publisher key that signed it.
pub const SIGNER: &str = "signer";
const MAX_MANIFEST: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ArtifactKind {
    /// The service manifest (gatevisor's TOML), always present.
    Service,
    /// A root filesystem as a tar (LXC services).
    Rootfs,
    /// A guest kernel (microVM services).
    Kernel,
    /// A guest initramfs (microVM services).
    Initramfs,
    /// A raw disk image (microVM services).
    Disk,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    pub name: String,
    pub kind: ArtifactKind,
    pub sha256: String,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageManifest {
    pub format: u32,
    pub name: String,
    pub version: String,
    #[serde(rename = "artifact")]
    pub artifacts: Vec<Artifact>,
}

/// Limits a gateway puts on what it accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_total_bytes: u64,
    pub max_files: u64,
    pub max_path_len: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_total_bytes: 512 << 20,
            max_files: 262_144,
            max_path_len: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("cannot read the package")]
    Io(#[from] std::io::Error),
    #[error("the package is not a valid archive or is truncated: {0}")]
    Archive(String),
    #[error("the package does not start with {MANIFEST}")]
    NoManifest,
    #[error("the package is not signed (no {SIGNATURE} after {MANIFEST})")]
    Unsigned,
    #[error("{MANIFEST} is invalid: {0}")]
    BadManifest(String),
    #[error("{SIGNATURE} is malformed (expected `ed25519 KEYID HEXSIG`)")]
    BadSignatureFormat,
    #[error("the signature in {SIGNATURE} names a key id that is not 16 lowercase hex digits")]
    BadKeyId,
    #[error("the package is signed by key {id}, which this gateway does not trust")]
    UntrustedKey { id: String },
    #[error("the package is signed by key {id}, which was revoked")]
    RevokedKey { id: String },
    #[error("the signature does not match {MANIFEST} (tampered with, or signed by another key)")]
    BadSignature,
    #[error("artifact {name}: expected next in the package, found {}", found.as_deref().unwrap_or("the end of it"))]
    MissingArtifact { name: String, found: Option<String> },
    #[error("artifact {name}: size {actual} bytes, the signed manifest says {expected}")]
    SizeMismatch {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("artifact {name}: SHA-256 {actual}, the signed manifest says {expected}")]
    DigestMismatch {
        name: String,
        expected: String,
        actual: String,
    },
    #[error("unexpected entry {0:?} after the listed artifacts")]
    Trailing(String),
    #[error("the package is too large: more than {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("unsafe rootfs entry {path:?}: {why}")]
    Unsafe { path: String, why: String },
    #[error("the rootfs has more than {limit} entries")]
    TooManyFiles { limit: u64 },
    #[error(transparent)]
    Key(#[from] keys::KeyError),
}

fn archive(e: std::io::Error) -> PackageError {
    PackageError::Archive(e.to_string())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

fn is_safe_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        && !n.starts_with('.')
}

impl PackageManifest {
    pub fn parse(bytes: &[u8]) -> Result<PackageManifest, PackageError> {
        let text =
            std::str::from_utf8(bytes).map_err(|e| PackageError::BadManifest(e.to_string()))?;
        let m: PackageManifest =
            toml::from_str(text).map_err(|e| PackageError::BadManifest(e.to_string()))?;
        if m.format != FORMAT {
            return Err(PackageError::BadManifest(format!(
                "format {} is not supported (this gateway reads {FORMAT})",
                m.format
            )));
        }
        for a in &m.artifacts {
            if !is_safe_name(&a.name) || a.name == MANIFEST || a.name == SIGNATURE {
                return Err(PackageError::BadManifest(format!(
                    "artifact name {:?} is not allowed",
                    a.name
                )));
            }
            if a.sha256.len() != 64 || hex::decode(&a.sha256).is_err() {
                return Err(PackageError::BadManifest(format!(
                    "artifact {}: sha256 must be 64 hex digits",
                    a.name
                )));
            }
        }
        if m.artifacts
            .iter()
            .filter(|a| a.kind == ArtifactKind::Service)
            .count()
            != 1
        {
            return Err(PackageError::BadManifest(
                "exactly one artifact of kind \"service\" is required".into(),
            ));
        }
        Ok(m)
    }

    pub fn artifact(&self, kind: ArtifactKind) -> Option<&Artifact> {
        self.artifacts.iter().find(|a| a.kind == kind)
    }
}

/// Writes one tar entry with fixed metadata (reproducible).
pub fn append(
    tar: &mut tar::Builder<impl Write>,
    name: &str,
    data: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_ustar();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, data)
}

/// Builds a package from named artifacts (their bytes), signed with `key`.
pub fn build(
    name: &str,
    version: &str,
    artifacts: &[(&str, ArtifactKind, &[u8])],
    key: &SecretKey,
    out: impl Write,
) -> Result<PackageManifest, PackageError> {
    let manifest = PackageManifest {
        format: FORMAT,
        name: name.into(),
        version: version.into(),
        artifacts: artifacts
            .iter()
            .map(|(n, kind, data)| Artifact {
                name: n.to_string(),
                kind: *kind,
                sha256: sha256_hex(data),
                size: data.len() as u64,
            })
            .collect(),
    };
    let text = toml::to_string(&manifest).map_err(|e| PackageError::BadManifest(e.to_string()))?;
    PackageManifest::parse(text.as_bytes())?;
    let sig = format!(
        "ed25519 {} {}\n",
        keys::key_id(&key.public()),
        hex::encode(key.sign(text.as_bytes()))
    );
    let mut tar = tar::Builder::new(out);
    append(&mut tar, MANIFEST, text.as_bytes(), 0o644)?;
    append(&mut tar, SIGNATURE, sig.as_bytes(), 0o644)?;
    for (n, _, data) in artifacts {
        append(&mut tar, n, data, 0o644)?;
    }
    tar.into_inner()?.flush()?;
    Ok(manifest)
}

/// Hashes and counts what is read through it (ring's SHA-256 uses the CPU's SHA extensions
/// where it has them).
struct Hashing<R> {
    inner: R,
    hasher: BackgroundDigest,
    read: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// SHA-256 on a helper thread, so that hashing runs beside the unpacking on a second core:
/// the bytes go over in [`BATCH`]-sized buffers that come back to be filled again (at most
/// [`IN_FLIGHT`] of them, so memory stays bounded).
struct BackgroundDigest {
    batch: Vec<u8>,
    full: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    empty: std::sync::mpsc::Receiver<Vec<u8>>,
    worker: Option<std::thread::JoinHandle<ring::digest::Digest>>,
}

const BATCH: usize = 256 * 1024;
const IN_FLIGHT: usize = 4;

impl BackgroundDigest {
    fn new() -> BackgroundDigest {
        let (full, full_rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(IN_FLIGHT);
        let (empty_tx, empty) = std::sync::mpsc::sync_channel(IN_FLIGHT + 1);
        let worker = std::thread::Builder::new()
            .name("gv-sha256".into())
            .spawn(move || {
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                for mut b in full_rx {
                    ctx.update(&b);
                    b.clear();
                    let _ = empty_tx.try_send(b);
                }
                ctx.finish()
            })
            .ok();
        BackgroundDigest {
            batch: Vec::with_capacity(BATCH),
            full: Some(full),
            empty,
            worker,
        }
    }

    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = data.len().min(BATCH - self.batch.len());
            self.batch.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.batch.len() == BATCH {
                let next = self
                    .empty
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(BATCH));
                let full = std::mem::replace(&mut self.batch, next);
                self.send(full);
            }
        }
    }

    fn send(&mut self, b: Vec<u8>) {
        if let Some(full) = &self.full {
            if full.send(b).is_err() {
                // The worker is gone (it could not start): finish() reports no digest.
                self.full = None;
            }
        }
    }

    /// The digest of everything given, or `None` if the helper thread failed.
    fn finish(mut self) -> Option<ring::digest::Digest> {
        let rest = std::mem::take(&mut self.batch);
        if !rest.is_empty() {
            self.send(rest);
        }
        self.full = None;
        self.worker.take()?.join().ok()
    }
}

/// Reads a package: checks the signature against `trust` before anything else, writes the
/// signed `manifest.toml` into `manifest_dir`, then hands each artifact's stream to `sink`
/// (which writes or unpacks it) while checking its size and digest. A digest mismatch is
/// reported after `sink` consumed the stream: whatever `sink` wrote must stay in staging
/// until this returns Ok.
pub fn verify_with(
    input: impl Read,
    trust: &TrustStore,
    limits: &Limits,
    manifest_dir: &Path,
    mut sink: impl FnMut(&Artifact, &mut dyn Read) -> Result<(), PackageError>,
    mut after_each: impl FnMut(&str),
) -> Result<PackageManifest, PackageError> {
    let mut ar = tar::Archive::new(input);
    let mut entries = ar.entries().map_err(archive)?;
    let small =
        |entries: &mut tar::Entries<_>, want: &str| -> Result<Option<Vec<u8>>, PackageError> {
            match entries.next() {
                None => Ok(None),
                Some(Err(e)) => Err(archive(e)),
                Some(Ok(mut e)) => {
                    if e.path().map_err(archive)?.to_string_lossy() != want {
                        return Ok(None);
                    }
                    if e.size() > MAX_MANIFEST {
                        return Err(PackageError::TooLarge {
                            limit: MAX_MANIFEST,
                        });
                    }
                    let mut buf = Vec::with_capacity(e.size() as usize);
                    e.read_to_end(&mut buf).map_err(archive)?;
                    Ok(Some(buf))
                }
            }
        };
    // 1. The manifest, 2. its signature: verified before anything is written.
    let manifest_bytes = small(&mut entries, MANIFEST)?.ok_or(PackageError::NoManifest)?;
    let sig = small(&mut entries, SIGNATURE)?.ok_or(PackageError::Unsigned)?;
    let sig_text = String::from_utf8(sig).map_err(|_| PackageError::BadSignatureFormat)?;
    let mut parts = sig_text.split_whitespace();
    let (Some("ed25519"), Some(id), Some(hexsig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(PackageError::BadSignatureFormat);
    };
    let signature: [u8; 64] = hex::decode(hexsig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or(PackageError::BadSignatureFormat)?;
    let (key, publisher) = trust.get(id)?;
    if !keys::verify(&key, &manifest_bytes, &signature) {
        return Err(PackageError::BadSignature);
    }
    let manifest = PackageManifest::parse(&manifest_bytes)?;
    let total: u64 = manifest.artifacts.iter().map(|a| a.size).sum();
    if total > limits.max_total_bytes {
        return Err(PackageError::TooLarge {
            limit: limits.max_total_bytes,
        });
    }
    std::fs::write(manifest_dir.join(MANIFEST), &manifest_bytes)?;
    std::fs::write(manifest_dir.join(SIGNER), format!("{id} {publisher}\n"))?;
    after_each(MANIFEST);
    // 3. The artifacts, in order, each checked while it streams.
    for a in &manifest.artifacts {
        let e = match entries.next() {
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(archive(e)),
            None => {
                return Err(PackageError::MissingArtifact {
                    name: a.name.clone(),
                    found: None,
                })
            }
        };
        let found = e.path().map_err(archive)?.to_string_lossy().into_owned();
        if found != a.name || e.header().entry_type() != tar::EntryType::Regular {
            return Err(PackageError::MissingArtifact {
                name: a.name.clone(),
                found: Some(found),
            });
        }
        if e.size() != a.size {
            return Err(PackageError::SizeMismatch {
                name: a.name.clone(),
                expected: a.size,
                actual: e.size(),
            });
        }
        let mut r = Hashing {
            inner: e,
            hasher: BackgroundDigest::new(),
            read: 0,
        };
        let res = sink(a, &mut r);
        // What the sink did not read (a tar's end blocks, say) still counts for the digest.
        std::io::copy(&mut r, &mut std::io::sink()).map_err(archive)?;
        if r.read != a.size {
            return Err(PackageError::Archive(format!(
                "artifact {} is truncated ({} of {} bytes)",
                a.name, r.read, a.size
            )));
        }
        let actual = r
            .hasher
            .finish()
            .map(hex::encode)
            .ok_or_else(|| PackageError::Archive("the SHA-256 thread failed".into()))?;
        if actual != a.sha256 {
            return Err(PackageError::DigestMismatch {
                name: a.name.clone(),
                expected: a.sha256.clone(),
                actual,
            });
        }
        // A digest mismatch explains a failed unpack better than the unpack error does.
        res?;
        after_each(&a.name);
    }
    if let Some(extra) = entries.next() {
        let name = extra
            .ok()
            .and_then(|e| e.path().ok().map(|p| p.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "?".into());
        return Err(PackageError::Trailing(name));
    }
    Ok(manifest)
}

/// `verify_with` writing every artifact as a file `dest/NAME`.
pub fn verify_into(
    input: impl Read,
    trust: &TrustStore,
    limits: &Limits,
    dest: &Path,
    after_each: impl FnMut(&str),
) -> Result<PackageManifest, PackageError> {
    verify_with(
        input,
        trust,
        limits,
        dest,
        |a, r| {
            let mut out = std::fs::File::create(dest.join(&a.name))?;
            std::io::copy(r, &mut out).map_err(archive)?;
            Ok(())
        },
        after_each,
    )
}

/// Opens a file named from outside for reading only if it is a regular file: a FIFO, a device
/// or a directory is refused at once (opened non-blocking, so a FIFO with no writer cannot
/// hang the caller), with the kernel's answer as the error.
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let ty = f.metadata()?.file_type();
    if !ty.is_file() {
        let what = if ty.is_fifo() {
            "a FIFO"
        } else if ty.is_dir() {
            "a directory"
        } else if ty.is_block_device() || ty.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{what}, not a regular file"),
        ));
    }
    Ok(f)
}

/// Whether `path` holds a package (by its content, not its name): a tar archive whose first
/// member is the package manifest. Anything that cannot be read as one is not.
pub fn is_package_file(path: &Path) -> bool {
    let Ok(mut f) = open_regular(path) else {
        return false;
    };
    let mut header = [0u8; 512];
    if f.read_exact(&mut header).is_err() {
        return false;
    }
    let name_end = header[..100].iter().position(|b| *b == 0).unwrap_or(100);
    &header[257..262] == b"ustar" && &header[..name_end] == MANIFEST.as_bytes()
}

/// The package's manifest, read without checking anything: only to learn its name before the
/// real, verified install.
pub fn peek(input: impl Read) -> Result<PackageManifest, PackageError> {
    let mut ar = tar::Archive::new(input);
    let mut entries = ar.entries().map_err(archive)?;
    let mut e = entries
        .next()
        .ok_or(PackageError::NoManifest)?
        .map_err(archive)?;
    if e.path().map_err(archive)?.to_string_lossy() != MANIFEST || e.size() > MAX_MANIFEST {
        return Err(PackageError::NoManifest);
    }
    let mut buf = Vec::new();
    e.read_to_end(&mut buf).map_err(archive)?;
    PackageManifest::parse(&buf)
}

/// Where a verified package's artifacts were written.
pub fn artifact_path(dir: &Path, a: &Artifact) -> PathBuf {
    dir.join(&a.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_package_is_told_by_its_content_not_its_name() {
        let d = tempfile::tempdir().unwrap();
        let key = crate::keys::SecretKey::generate().unwrap();
        let pkg = d.path().join("service.toml");
        build(
            "svc",
            "1.0.0",
            &[(
                "service.toml",
                ArtifactKind::Service,
                &b"name = \"svc\"\n"[..],
            )],
            &key,
            std::fs::File::create(&pkg).unwrap(),
        )
        .unwrap();
        assert!(is_package_file(&pkg), "a package named like a manifest");
        let text = d.path().join("x.gvpkg");
        std::fs::write(&text, "name = \"svc\"\n").unwrap();
        assert!(!is_package_file(&text), "a manifest named like a package");
        let mut other = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        h.set_mode(0o644);
        other.append_data(&mut h, "readme", &b"x"[..]).unwrap();
        let tar = d.path().join("other.tar");
        std::fs::write(&tar, other.into_inner().unwrap()).unwrap();
        assert!(!is_package_file(&tar), "a tar that is not a package");
        assert!(!is_package_file(d.path()), "a directory");
        assert!(!is_package_file(&d.path().join("absent")));
    }

    #[test]
    fn background_digest_equals_sha256_of_everything_given_in_any_pieces() {
        let data: Vec<u8> = (0..3 * BATCH + 12345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let expected = ring::digest::digest(&ring::digest::SHA256, &data);
        for piece in [1, 511, 4096, BATCH - 1, BATCH, BATCH + 7, data.len()] {
            let mut d = BackgroundDigest::new();
            for c in data.chunks(piece) {
                d.update(c);
            }
            let got = d.finish().expect("a digest");
            assert_eq!(got.as_ref(), expected.as_ref(), "pieces of {piece} bytes");
        }
        let empty = BackgroundDigest::new().finish().expect("a digest");
        assert_eq!(
            empty.as_ref(),
            ring::digest::digest(&ring::digest::SHA256, b"").as_ref()
        );
    }
}
