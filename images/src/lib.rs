//! Signed service packages and the image store.
//!
//! - [`beneath`]: trees reached through directory fds (`openat2` beneath a root): unpacking
//!   and copying that cannot leave the tree.
//! - [`builder`]: the publisher's side: a service folder built into a signed package (its
//!   tree packed as a container's rootfs and a microVM's initramfs).
//! - [`checkout`]: a service's root as an overlay of a store tree and its own writable
//!   layer (a packaged tree is on flash once).
//! - [`cpio`]: initramfs archives (newc) for microVM guests.
//! - [`idmap`]: idmapped mounts, for a stored tree to be seen with a container's own ids.
//! - [`keys`]: ed25519 publisher keys and the gateway's trust store (trust, revoke, list).
//! - [`oci`]: unchanged OCI and Docker images: resolved, signed by the operator, layers
//!   checked while streaming and stored once, shared by images and services.
//! - [`package`]: the package format (a tar: signed manifest, then artifacts), built
//!   reproducibly, read with the signature checked before anything is written and every
//!   artifact's digest and size checked while it streams.
//! - [`rootfs`]: root filesystem trees in packages, unpacked refusing anything unsafe.
//! - [`store`]: the content-addressed store on the gateway, with atomic installs that a power
//!   cut at any point leaves at the old or the new version, and garbage collection.

pub mod beneath;
pub mod builder;
pub mod checkout;
pub mod cpio;
pub mod http;
pub mod idmap;
pub mod keys;
pub mod loopdev;
pub mod oci;
pub mod package;
pub mod rootfs;
pub mod store;
