//! What a service guest needs from the gateway's kernel: the modules that give Debian's
//! stock cloud kernel (`VIRTIO_MMIO=m`) its virtio devices, found in a module tree.

use std::path::{Path, PathBuf};

/// The guest's modules in load order (each after what it depends on): virtio-mmio found
/// through the VMM's ACPI tables, then net, block and vsock.
pub const MODULES: [&str; 10] = [
    "virtio",
    "virtio_ring",
    "virtio_mmio",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// The files of [`MODULES`] in module tree `tree` (`/lib/modules/<release>`), in order,
/// found through its `modules.dep`. A module built into the kernel is simply absent there
/// and skipped; the error names what could not be read.
pub fn find_modules(tree: &Path) -> std::io::Result<Vec<(&'static str, PathBuf)>> {
    let dep = std::fs::read_to_string(tree.join("modules.dep"))?;
    let mut out = Vec::new();
    for name in MODULES {
        let want = format!("/{name}.ko");
        let found = dep.lines().find_map(|l| {
            let (path, _) = l.split_once(':')?;
            format!("/{path}").ends_with(&want).then(|| tree.join(path))
        });
        if let Some(p) = found {
            out.push((name, p));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_found_in_load_order_and_built_ins_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("modules.dep"),
            "kernel/drivers/net/virtio_net.ko: kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/virtio/virtio.ko:\n\
             kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio.ko\n\
             kernel/drivers/virtio/not_virtio.ko:\n",
        )
        .unwrap();
        let found = find_modules(d.path()).unwrap();
        let names: Vec<_> = found.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["virtio", "virtio_mmio", "virtio_net"]);
        assert!(found[1].1.ends_with("kernel/drivers/virtio/virtio_mmio.ko"));
    }
}
