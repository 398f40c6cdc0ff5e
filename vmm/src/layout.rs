//! Guest physical memory layout (x86_64, below 4 GiB).

/// The GDT the boot vCPU starts with.
pub const GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before enabling interrupts.
pub const IDT_START: u64 = 0x520;
/// Top of the boot stack.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PVH boot: `hvm_start_info`, the module list (the initramfs) and the memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Page tables identity-mapping the first GiB with 2 MiB pages: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// End of the low RAM that the e820 map gives the guest (the EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// Where kernels (and raw test images) are loaded: 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// KVM's three-page TSS region, just below the 4 GiB boundary's MMIO hole.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// Guest RAM ends below this (the MMIO hole): guests are at most 3 GiB for now.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// The first virtio-mmio window; each device has [`crate::virtio::mmio::WINDOW`] bytes.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// At most this many virtio devices (windows and GSIs).
pub const VIRTIO_MAX_DEVICES: usize = 8;
/// The GSIs of virtio devices, in order (IOAPIC pins no legacy device uses).
pub const VIRTIO_GSIS: [u32; VIRTIO_MAX_DEVICES] = [5, 6, 7, 9, 10, 11, 14, 15];
/// The IOAPIC and the local APICs (the in-kernel irqchip's default addresses).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;
