//! Putting a guest into memory: a Linux kernel with its command line and initramfs, either a
//! bzImage (64-bit boot protocol, e820 map in the zero page) or an uncompressed ELF `vmlinux`
//! with a PVH entry note (32-bit entry, `hvm_start_info` with the memory map and the initramfs
//! as module 0), or a raw flat image (test guests).

use crate::layout::*;
use crate::memory::Memory;
use crate::{Error, Result};
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use std::path::Path;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
const STARTUP_64_OFFSET: u64 = 0x200;
/// `hvm_start_info.magic` ("xEn3" with the high bit of each byte set).
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Long mode with paging, `rsi` = the zero page (bzImage and raw guests).
    Long64(u64),
    /// 32-bit protected mode without paging, `ebx` = `hvm_start_info` (PVH).
    Pvh32(u64),
}

fn kernel_err(path: &Path, detail: impl std::fmt::Display) -> Error {
    Error::Kernel {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// Loads `kernel` (and `initrd`) with `cmdline`: an ELF kernel through its PVH entry, anything
/// else as a bzImage.
pub fn load_linux(
    mem: &Memory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    acpi_rsdp: u64,
) -> Result<Entry> {
    let mut f = std::fs::File::open(kernel).map_err(|source| Error::File {
        what: "open kernel",
        path: kernel.to_path_buf(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let is_elf = std::io::Read::read_exact(&mut f, &mut magic).is_ok() && magic == *b"\x7fELF";
    std::io::Seek::rewind(&mut f).map_err(|source| Error::File {
        what: "read kernel",
        path: kernel.to_path_buf(),
        source,
    })?;
    if is_elf {
        load_pvh(mem, kernel, &mut f, initrd, cmdline, acpi_rsdp)
    } else {
        load_bzimage(mem, kernel, &mut f, initrd, cmdline, acpi_rsdp)
    }
}

/// Writes the command line at [`CMDLINE_START`].
fn write_cmdline(mem: &Memory, cmdline: &str) -> Result<()> {
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| Error::Config(format!("{e}")))?;
    cl.insert_str(cmdline)
        .map_err(|e| Error::Config(format!("kernel command line: {e}")))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| Error::Config(format!("kernel command line: {e}")))
}

/// Puts the initramfs page-aligned as high as possible below `max` and above `kernel_end`;
/// returns its address and size.
fn place_initrd(mem: &Memory, path: &Path, max: u64, kernel_end: u64) -> Result<(u64, u64)> {
    let data = std::fs::read(path).map_err(|source| Error::File {
        what: "read initramfs",
        path: path.to_path_buf(),
        source,
    })?;
    let at = max
        .checked_sub(data.len() as u64)
        .map(|a| a & !0xfff)
        .filter(|a| *a > kernel_end)
        .ok_or_else(|| {
            Error::Config(format!(
                "initramfs {} ({} bytes) does not fit in guest memory",
                path.display(),
                data.len()
            ))
        })?;
    mem.write_slice(&data, GuestAddress(at))
        .map_err(|e| Error::Config(format!("initramfs: {e}")))?;
    Ok((at, data.len() as u64))
}

/// The guest's RAM as the memory map gives it: low memory below the EBDA, and everything
/// from 1 MiB up (the ACPI tables at 0xe0000 sit in the hole between).
fn ram_ranges(mem: &Memory) -> [(u64, u64); 2] {
    let mem_end = mem.last_addr().raw_value() + 1;
    [(0, EBDA_START), (HIMEM_START, mem_end - HIMEM_START)]
}

fn load_bzimage(
    mem: &Memory,
    kernel: &Path,
    f: &mut std::fs::File,
    initrd: Option<&Path>,
    cmdline: &str,
    acpi_rsdp: u64,
) -> Result<Entry> {
    let loaded = BzImage::load(mem, None, f, Some(GuestAddress(HIMEM_START)))
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

    write_cmdline(mem, cmdline)?;
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = (cmdline.len() + 1) as u32;
    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;

    let mem_end = mem.last_addr().raw_value() + 1;
    if let Some(path) = initrd {
        let addr_max = hdr.initrd_addr_max;
        let max = (addr_max as u64 + 1).min(mem_end);
        let kernel_end = loaded.kernel_load.raw_value() + loaded.kernel_end;
        let (at, size) = place_initrd(mem, path, max, kernel_end)?;
        hdr.ramdisk_image = at as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: acpi_rsdp,
        ..Default::default()
    };
    let ram = ram_ranges(mem);
    for (i, (addr, size)) in ram.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = ram.len() as u8;
    LinuxBootConfigurator::write_bootparams::<Memory>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE)),
        mem,
    )
    .map_err(|e| Error::Config(format!("zero page: {e}")))?;
    Ok(Entry::Long64(
        loaded.kernel_load.raw_value() + STARTUP_64_OFFSET,
    ))
}

fn load_pvh(
    mem: &Memory,
    kernel: &Path,
    f: &mut std::fs::File,
    initrd: Option<&Path>,
    cmdline: &str,
    acpi_rsdp: u64,
) -> Result<Entry> {
    let loaded = Elf::load(mem, None, f, Some(GuestAddress(HIMEM_START)))
        .map_err(|e| kernel_err(kernel, format!("not a loadable ELF kernel: {e}")))?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(kernel_err(
            kernel,
            "ELF kernel without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY; CONFIG_PVH=y)",
        ));
    };
    write_cmdline(mem, cmdline)?;
    let module = match initrd {
        Some(path) => {
            let mem_end = mem.last_addr().raw_value() + 1;
            let (paddr, size) = place_initrd(mem, path, mem_end, loaded.kernel_end)?;
            Some(hvm_modlist_entry {
                paddr,
                size,
                ..Default::default()
            })
        }
        None => None,
    };
    let memmap: Vec<hvm_memmap_table_entry> = ram_ranges(mem)
        .iter()
        .map(|&(addr, size)| hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: module.is_some() as u32,
        modlist_paddr: if module.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: acpi_rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some(m) = module {
        params.set_modules(&[m], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams::<Memory>(&params, mem)
        .map_err(|e| Error::Config(format!("PVH start info: {e}")))?;
    Ok(Entry::Pvh32(entry.raw_value()))
}

/// Copies a raw image to [`HIMEM_START`] and returns it as the entry point.
pub fn load_raw(mem: &Memory, image: &[u8]) -> Result<Entry> {
    mem.write_slice(image, GuestAddress(HIMEM_START))
        .map_err(|e| Error::Config(format!("raw image of {} bytes: {e}", image.len())))?;
    Ok(Entry::Long64(HIMEM_START))
}
