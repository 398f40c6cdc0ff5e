//! Building service packages from a service folder: the builder is
//! [`gatevisor_images::builder`]; this adds what only the gateway's side knows: the service
//! manifest is checked exactly as an install will check it (and must say
//! `image = "package"`), and a folder without `rootfs/` gets the static busybox system as
//! the base its `files/` are laid over.

use std::path::Path;

pub use gatevisor_images::builder::BuildError;
use gatevisor_images::package::PackageManifest;

use crate::manifest::{ImageRef, Manifest};

/// Builds the service folder `dir` into a package at `out`, signed with `key_file`.
pub fn build(dir: &Path, out: &Path, key_file: &Path) -> Result<PackageManifest, BuildError> {
    gatevisor_images::builder::build(dir, out, key_file, &ServiceFolder)
}

struct ServiceFolder;

impl gatevisor_images::builder::Service for ServiceFolder {
    fn check(&self, staged: &Path) -> Result<(String, String), String> {
        let m = Manifest::load(staged).map_err(|e| e.to_string())?;
        let packaged = matches!(
            m.image_ref(staged).map_err(|e| e.to_string())?,
            ImageRef::Rootfs(_) | ImageRef::Initramfs(_)
        ) && m.image == "package";
        if !packaged {
            return Err(format!(
                "{}: field `image` must be \"package\" in a packaged service",
                staged.display()
            ));
        }
        Ok((m.name, m.version))
    }

    fn base(&self, root: &Path) -> Result<(), String> {
        let busybox =
            gatevisor_board::ovs::find_sbin("busybox").unwrap_or_else(|| "/bin/busybox".into());
        gatevisor_lxc::rootfs::build_busybox(&busybox, root).map_err(|e| e.to_string())
    }
}
