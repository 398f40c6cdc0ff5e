//! Putting a guest into memory: a Linux bzImage (64-bit boot protocol) with its command line,
//! initramfs and e820 map in the zero page, or a raw flat image (test guests).

use crate::layout::*;
use crate::{Error, Result};
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use std::path::Path;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;

fn kernel_err(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Kernel {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// Loads bzImage `kernel` (and `initrd`) with `cmdline`; returns the entry point.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    acpi_rsdp: u64,
) -> Result<u64> {
    let mut f = std::fs::File::open(kernel).map_err(|source| Error::File {
        what: "open kernel",
        path: kernel.to_path_buf(),
        source,
    })?;
    let loaded = BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| kernel_err(kernel, format!("not a loadable bzImage: {e}")))?;
    let mut hdr = loaded
        .setup_header
        .ok_or_else(|| kernel_err(kernel, "no setup header"))?;
    let version = hdr.version;
    if version < 0x020c {
        return Err(kernel_err(
            kernel,
            format!("boot protocol {version:#x} has no 64-bit entry (2.12 needed)"),
        ));
    }

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Config(format!("{e}")))?;
    cl.insert_str(cmdline)
        .map_err(|e| Error::Config(format!("kernel command line: {e}")))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| Error::Config(format!("kernel command line: {e}")))?;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = (cmdline.len() + 1) as u32;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;

    let mem_end = mem.last_addr().raw_value() + 1;
    if let Some(path) = initrd {
        let data = std::fs::read(path).map_err(|source| Error::File {
            what: "read initramfs",
            path: path.to_path_buf(),
            source,
        })?;
        // As high as the kernel allows, page-aligned, above the kernel.
        let addr_max = hdr.initrd_addr_max;
        let max = (addr_max as u64 + 1).min(mem_end);
        let at = max
            .checked_sub(data.len() as u64)
            .map(|a| a & !0xfff)
            .filter(|a| *a > loaded.kernel_load.raw_value() + loaded.kernel_end)
            .ok_or_else(|| {
                Error::Config(format!(
                    "initramfs {} ({} bytes) does not fit in guest memory",
                    path.display(),
                    data.len()
                ))
            })?;
        mem.write_slice(&data, GuestAddress(at))
            .map_err(|e| Error::Config(format!("initramfs: {e}")))?;
        hdr.ramdisk_image = at as u32;
        hdr.ramdisk_size = data.len() as u32;
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: acpi_rsdp,
        ..Default::default()
    };
    let e820 = [(0, EBDA_START), (HIMEM_START, mem_end - HIMEM_START)];
    for (i, (addr, size)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| Error::Config(format!("zero page: {e}")))?;
    Ok(loaded.kernel_load.raw_value() + STARTUP_64_OFFSET)
}

/// Copies a raw image to [`HIMEM_START`] and returns it as the entry point.
pub fn load_raw(mem: &GuestMemoryMmap, image: &[u8]) -> Result<u64> {
    mem.write_slice(image, GuestAddress(HIMEM_START))
        .map_err(|e| Error::Config(format!("raw image of {} bytes: {e}", image.len())))?;
    Ok(HIMEM_START)
}
