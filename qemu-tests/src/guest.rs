//! MicroVM guests for the emulated gateway's KVM: an initramfs made of the host's static
//! busybox and an `/init` script, packed with gatevisor-images' cpio writer.

use crate::{io, Result};
use gatevisor_images::cpio::Cpio;
use std::path::Path;

/// The marker a guest's `/init` prints once it runs.
pub const INIT_MARKER: &str = "gatevisor-guest: init reached";

/// The guest modules a microVM's devices need, in load order (see gatevisor-vmm).
pub use gatevisor_vmm::guest::MODULES as GUEST_MODULES;

/// An initramfs whose `/init` runs `script` (a busybox sh script) after mounting /proc, /sys
/// and /dev, then reboots (which ends the VM).
pub fn busybox_initramfs(out: &Path, script: &str) -> Result<()> {
    initramfs(out, script, None, &[])
}

/// [`busybox_initramfs`] with more programs in `/bin` (name, static binary).
pub fn busybox_initramfs_with_programs(
    out: &Path,
    script: &str,
    programs: &[(&str, &Path)],
) -> Result<()> {
    initramfs(out, script, None, programs)
}

/// [`busybox_initramfs`] that first loads [`GUEST_MODULES`] from `modules` (a folder of
/// `<name>.ko`, see [`crate::image::guest_modules`]), so the guest has its virtio devices.
pub fn busybox_initramfs_with_modules(out: &Path, script: &str, modules: &Path) -> Result<()> {
    initramfs(out, script, Some(modules), &[])
}

fn initramfs(
    out: &Path,
    script: &str,
    modules: Option<&Path>,
    programs: &[(&str, &Path)],
) -> Result<()> {
    let mut bins = Vec::new();
    for (name, path) in programs {
        bins.push((
            *name,
            std::fs::read(path).map_err(io(format!("read {}", path.display())))?,
        ));
    }
    let mut kos = Vec::new();
    if let Some(dir) = modules {
        for name in GUEST_MODULES {
            let p = dir.join(format!("{name}.ko"));
            kos.push((
                name,
                std::fs::read(&p).map_err(io(format!("read {}", p.display())))?,
            ));
        }
    }
    let load: String = kos
        .iter()
        .map(|(n, _)| format!("insmod /lib/modules/{n}.ko\n"))
        .collect();
    let busybox =
        std::fs::read("/bin/busybox").map_err(io("read /bin/busybox (busybox-static)"))?;
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev 2>/dev/null\n\
         {load}\
         echo \"{INIT_MARKER}, kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime)\"\n\
         {script}\n\
         reboot -f\n"
    );
    let f = std::fs::File::create(out).map_err(io(format!("create {}", out.display())))?;
    let mut c = Cpio::new(std::io::BufWriter::new(f));
    let w = (|| -> std::io::Result<()> {
        for d in ["bin", "dev", "proc", "sys", "tmp", "root"] {
            c.dir(d)?;
        }
        c.chardev("dev/console", 5, 1)?;
        c.file("bin/busybox", 0o755, &busybox)?;
        c.file("init", 0o755, init.as_bytes())?;
        for (name, bytes) in &bins {
            c.file(&format!("bin/{name}"), 0o755, bytes)?;
        }
        if !kos.is_empty() {
            c.dir("lib")?;
            c.dir("lib/modules")?;
            for (name, bytes) in &kos {
                c.file(&format!("lib/modules/{name}.ko"), 0o644, bytes)?;
            }
        }
        let mut out = c.finish()?;
        std::io::Write::flush(&mut out)
    })();
    w.map_err(io(format!("write {}", out.display())))
}
