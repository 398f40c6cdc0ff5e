//! Unchanged OCI and Docker images, as service roots.
//!
//! - [`source`]: where an image comes from (an OCI image layout directory or tar, a
//!   `docker save` archive, a registry), resolved to one manifest for `linux/amd64`, its config and its
//!   layers, every document checked against its digest;
//! - [`registry`]: the OCI distribution API over HTTPS, with basic or token authentication;
//! - [`layer`]: a layer's tar applied to a directory of its own, under the unpacking rules of
//!   packages, its whiteouts and opaque directories turned into overlayfs's;
//! - [`signature`]: the operator's detached signature of an image's digest;
//! - [`store`]: layers stored once by content, shared by every image and service that has
//!   them, image records, garbage collection; crash-safe like the package store;
//! - [`spec`]: the OCI documents read (index, manifest, config).

pub mod digest;
pub mod layer;
pub mod registry;
pub mod signature;
pub mod source;
pub mod spec;
pub mod store;

pub use digest::Digest;

use std::path::PathBuf;

/// Why an image cannot be imported, found or used.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{0:?} is not an image reference: use oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:TAG] or docker://HOST/REPO[:TAG|@sha256:HEX]")]
    BadReference(String),
    #[error("{0:?} is not a sha256 digest (\"sha256:\" and 64 lowercase hex digits)")]
    BadDigest(String),
    #[error("cannot read {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not valid: {problem}")]
    Invalid { what: String, problem: String },
    #[error("{what} does not match its digest: it is {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    #[error("{reference} has no image for linux/amd64 (it has: {available})")]
    NoPlatform {
        reference: String,
        available: String,
    },
    #[error("{reference} has no image tagged {tag:?} (it has: {available})")]
    NoTag {
        reference: String,
        tag: String,
        available: String,
    },
    #[error("layer {layer}: unsafe entry {path:?}: {why}")]
    Unsafe {
        layer: String,
        path: String,
        why: String,
    },
    #[error("image {digest} is not signed as this gateway requires: {why}")]
    Signature { digest: String, why: String },
    #[error("no image {0} in the store")]
    NotFound(String),
    #[error("{0:?} names more than one image in the store: give more of its digest")]
    Ambiguous(String),
    #[error("registry {registry}: {why}")]
    Registry {
        registry: String,
        /// Its HTTP answer, when it gave one.
        status: Option<u16>,
        why: String,
    },
    #[error("registry {registry} refused access: {why}")]
    AccessDenied { registry: String, why: String },
    #[error("image store I/O on {path}")]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl OciError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
        let what = what.into();
        move |source| OciError::Io { what, source }
    }

    pub(crate) fn invalid(what: impl Into<String>, problem: impl std::fmt::Display) -> OciError {
        OciError::Invalid {
            what: what.into(),
            problem: problem.to_string(),
        }
    }

    pub(crate) fn store(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> OciError {
        let path = path.into();
        move |source| OciError::Store { path, source }
    }
}
