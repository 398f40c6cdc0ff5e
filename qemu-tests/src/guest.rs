//! MicroVM guests for the emulated gateway's KVM: an initramfs made of the host's static
//! busybox and an `/init` script, packed with gatevisor-vmm's cpio writer.

use crate::{io, Result};
use gatevisor_vmm::cpio::Cpio;
use std::path::Path;

/// The marker a guest's `/init` prints once it runs.
pub const INIT_MARKER: &str = "gatevisor-guest: init reached";

/// An initramfs whose `/init` runs `script` (a busybox sh script) after mounting /proc, /sys
/// and /dev, then reboots (which ends the VM).
pub fn busybox_initramfs(out: &Path, script: &str) -> Result<()> {
    let busybox =
        std::fs::read("/bin/busybox").map_err(io("read /bin/busybox (busybox-static)"))?;
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev 2>/dev/null\n\
         echo \"{INIT_MARKER}, kernel $(uname -r)\"\n\
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
        let mut out = c.finish()?;
        std::io::Write::flush(&mut out)
    })();
    w.map_err(io(format!("write {}", out.display())))
}
