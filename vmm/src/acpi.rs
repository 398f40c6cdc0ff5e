//! ACPI tables, built with the rust-vmm `acpi_tables` crate, which is how Debian's stock cloud
//! kernel finds this machine's devices: it has `VIRTIO_MMIO=m` and no command-line device
//! parameter, but its virtio-mmio driver matches the ACPI id `LNRO0005`.
//!
//! - RSDP at [`RSDP_START`] (where Linux also scans for it) → XSDT → FADT, MADT;
//! - FADT: hardware-reduced ACPI (no PM timer, no GPE blocks), its DSDT, and a sleep
//!   control register at port [`SLEEP_CONTROL_PORT`]: Linux's power-off writes S5 there and
//!   the VMM ends with "power off";
//! - MADT: one local APIC per vCPU and the IOAPIC;
//! - DSDT: COM1 (`PNP0501`, so its IRQ is mapped), one `LNRO0005` device per virtio-mmio window, with its memory range and GSI, and
//!   the `_S5` sleep state that makes Linux offer power-off.

use crate::devices::{COM1, COM1_IRQ};
use crate::layout::{IOAPIC_START, LAPIC_START};
use crate::memory::Memory;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

/// The RSDP: in the BIOS area Linux scans, and passed in the zero page too.
pub const RSDP_START: u64 = 0xe_0000;
/// The tables must end before the 1 MiB mark (the kernel's load address).
const TABLES_END: u64 = 0x10_0000;
/// Hardware-reduced ACPI's sleep control register (one byte): SLP_TYP in bits 2..4, SLP_EN
/// bit 5.
pub const SLEEP_CONTROL_PORT: u16 = 0x3c0;
pub const SLEEP_STATUS_PORT: u16 = 0x3c1;
/// The S5 (soft off) sleep type the DSDT's `_S5` names.
pub const S5_SLEEP_TYPE: u8 = 5;
/// IAPC boot flags: no VGA, no MSI (there is no PCI), ASPM not ours to control.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;

const OEM_ID: [u8; 6] = *b"GATEVS";
const OEM_TABLE: [u8; 8] = *b"GVMICRO ";
const OEM_REVISION: u32 = 1;

/// A virtio-mmio window the DSDT describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// What the guest's power-off wrote, decoded.
pub fn is_s5_poweroff(value: u8) -> bool {
    value & 0x20 != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE
}

struct Bytes_(Vec<u8>);
impl AmlSink for Bytes_ {
    fn byte(&mut self, b: u8) {
        self.0.push(b);
    }
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut s = Bytes_(Vec::new());
    t.to_aml_bytes(&mut s);
    s.0
}

fn dsdt(devices: &[MmioDevice]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, OEM_REVISION);
    let mut body = Vec::new();
    // COM1: hardware-reduced ACPI has no legacy PIC, so Linux maps ISA IRQs only for devices
    // the DSDT describes; without this, ttyS0 cannot get IRQ 4 and /dev/console fails to open.
    {
        let io = aml::IO::new(COM1, COM1, 1, 8);
        let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
        let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let crs = aml::Name::new("_CRS".into(), &crs);
        body.extend(bytes(&aml::Device::new(
            "_SB_.COM1".into(),
            vec![&hid, &uid, &crs],
        )));
    }
    for (i, d) in devices.iter().enumerate() {
        let mem = aml::Memory32Fixed::new(true, d.base as u32, d.len as u32);
        // Edge-triggered, active high, exclusive: the irqfd delivers an edge.
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &(i as u32));
        let cca = aml::Name::new("_CCA".into(), &aml::ONE);
        let crs = aml::Name::new("_CRS".into(), &crs);
        let name = format!("_SB_.V{i:03X}");
        body.extend(bytes(&aml::Device::new(
            name.as_str().into(),
            vec![&hid, &uid, &cca, &crs],
        )));
    }
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]);
    body.extend(bytes(&aml::Name::new("_S5_".into(), &s5)));
    dsdt.append_slice(&body);
    dsdt
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.iapc_boot_arch =
        (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_PCIE_ASPM_CONTROLS).into();
    f.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_CONTROL_PORT as u64,
    );
    f.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        SLEEP_STATUS_PORT as u64,
    );
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"GATEVISR").into();
    bytes(&f.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for id in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(0, IOAPIC_START as u32, 0));
    bytes(&m)
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn write_tables(mem: &Memory, vcpus: u8, devices: &[MmioDevice]) -> Result<u64, String> {
    let mut at = RSDP_START + Rsdp::len() as u64;
    let mut place = |data: &[u8]| -> Result<u64, String> {
        let addr = (at + 15) & !15;
        let end = addr + data.len() as u64;
        if end > TABLES_END {
            return Err("ACPI tables do not fit below 1 MiB".into());
        }
        mem.write_slice(data, GuestAddress(addr))
            .map_err(|e| format!("ACPI tables: {e}"))?;
        at = end;
        Ok(addr)
    };
    let dsdt_addr = place(dsdt(devices).as_slice())?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(vcpus))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&bytes(&xsdt))?;
    mem.write_slice(
        &bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(RSDP_START),
    )
    .map_err(|e| format!("RSDP: {e}"))?;
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn every_table_is_checksummed_and_the_xsdt_reaches_fadt_and_madt() {
        let mem = crate::memory::Memory::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let devs = [MmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        }];
        let rsdp = write_tables(&mem, 2, &devs).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let table = |addr: u64| {
            let mut h = [0u8; 8];
            mem.read_slice(&mut h, GuestAddress(addr)).unwrap();
            let len = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
            let mut t = vec![0u8; len];
            mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
            t
        };
        let x = table(xsdt);
        assert!(checksum_ok(&x));
        let entries: Vec<u64> = x[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<[u8; 4]> = entries
            .iter()
            .map(|a| {
                let t = table(*a);
                assert!(checksum_ok(&t));
                t[..4].try_into().unwrap()
            })
            .collect();
        assert_eq!(sigs, [*b"FACP", *b"APIC"]);
        let fadt = table(entries[0]);
        let dsdt = table(u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
        assert!(checksum_ok(&dsdt));
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        assert!(dsdt.windows(4).any(|w| w == b"COM1"));
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        // Two local APICs (type 0) in the MADT.
        let madt = table(entries[1]);
        let mut at = 44;
        let mut lapics = 0;
        while at < madt.len() {
            if madt[at] == 0 {
                lapics += 1;
            }
            at += madt[at + 1] as usize;
        }
        assert_eq!(lapics, 2);
    }

    #[test]
    fn only_an_s5_write_with_sleep_enable_powers_off() {
        assert!(is_s5_poweroff(0x34));
        assert!(!is_s5_poweroff(0x14)); // no SLP_EN
        assert!(!is_s5_poweroff(0x20 | (3 << 2))); // S3
    }
}
