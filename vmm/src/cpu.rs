//! The boot vCPU: CPUID, MSRs, FPU, long mode, LAPIC — the state the Linux 64-bit boot
//! protocol expects at its entry point (and that raw test guests use too).

use crate::boot::Entry;
use crate::layout::*;
use crate::memory::Memory;
use crate::{kvm, Error, Result};
use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

// Control register and EFER bits.
const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// GDT selectors the 64-bit boot protocol requires: `__BOOT_CS` and `__BOOT_DS`; PVH's 32-bit
/// entry gets its own code segment.
pub const BOOT_CS: u16 = 0x10;
const BOOT_CS32: u16 = 0x28;
pub const BOOT_DS: u16 = 0x18;
const BOOT_TSS: u16 = 0x20;

/// A GDT entry from its flags, base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The KVM segment a GDT entry describes, for selector `sel`.
fn segment(entry: u64, sel: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    kvm_segment {
        base,
        limit: limit as u32,
        selector: sel,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if ((entry >> 47) & 1) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

const GDT: [u64; 6] = [
    0,                             // null
    0,                             // unused
    gdt_entry(0xa09b, 0, 0xfffff), // 0x10: 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // 0x18: data
    gdt_entry(0x808b, 0, 0xfffff), // 0x20: TSS
    gdt_entry(0xc09b, 0, 0xfffff), // 0x28: 32-bit code
];

fn write_mem<T: vm_memory::ByteValued>(mem: &Memory, v: T, at: u64) -> Result<()> {
    mem.write_obj(v, GuestAddress(at))
        .map_err(|e| Error::Memory {
            mib: 0,
            detail: format!("boot structures at {at:#x}: {e}"),
        })
}

/// CPUID as KVM supports it, with this vCPU's APIC id and the hypervisor bit, and the TSC
/// deadline timer when KVM emulates it (`tsc_deadline`: KVM_CAP_TSC_DEADLINE_TIMER; KVM does
/// not list it among the supported leaves). With it the guest arms its timer with one MSR
/// write and skips calibrating the LAPIC timer against another clock.
pub fn setup_cpuid(vcpu: &VcpuFd, mut cpuid: CpuId, id: u8, tsc_deadline: bool) -> Result<()> {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32) << 24);
                e.ecx |= 1 << 31; // running under a hypervisor
                e.ecx |= u32::from(tsc_deadline) << 24;
            }
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))
}

/// The MSRs a booting kernel expects cleared, and fast strings on.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1), // fast string operations
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Config(format!("MSRs: {e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(Error::Config(format!(
            "KVM accepted {set} of {} boot MSRs",
            entries.len()
        )));
    }
    Ok(())
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))
}

/// The boot vCPU's registers for `entry`: flat segments from [`GDT`], then either long mode
/// with paging through an identity map of the first GiB and `rsi` = the zero page (the 64-bit
/// boot protocol), or 32-bit protected mode without paging and `ebx` = `hvm_start_info` (PVH).
pub fn setup_boot_cpu(mem: &Memory, vcpu: &VcpuFd, entry: Entry) -> Result<()> {
    for (i, e) in GDT.iter().enumerate() {
        write_mem(mem, *e, GDT_START + (i as u64) * 8)?;
    }
    write_mem(mem, 0u64, IDT_START)?;
    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    let data = segment(GDT[(BOOT_DS >> 3) as usize], BOOT_DS);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(GDT[(BOOT_TSS >> 3) as usize], BOOT_TSS);
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Long64(rip) => {
            // PML4[0] → PDPT, PDPT[0] → PD, PD[i] → 2 MiB page i (present, writable, huge).
            write_mem(mem, PDPTE_START | 0x03, PML4_START)?;
            write_mem(mem, PDE_START | 0x03, PDPTE_START)?;
            for i in 0..512u64 {
                write_mem(mem, (i << 21) | 0x83, PDE_START + i * 8)?;
            }
            sregs.cs = segment(GDT[(BOOT_CS >> 3) as usize], BOOT_CS);
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rip = rip;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = ZERO_PAGE;
        }
        Entry::Pvh32(rip) => {
            sregs.cs = segment(GDT[(BOOT_CS32 >> 3) as usize], BOOT_CS32);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = rip;
            regs.rbx = PVH_INFO_START;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))
}

/// LINT0 as ExtINT (the PIC's interrupts) and LINT1 as NMI, as firmware leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[reg + i] as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let cs = segment(GDT[2], BOOT_CS);
        assert_eq!((cs.l, cs.db, cs.g, cs.present, cs.s), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(GDT[3], BOOT_DS);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 3));
        assert_eq!(segment(0, 0).unusable, 1);
        let cs32 = segment(GDT[5], BOOT_CS32);
        assert_eq!((cs32.l, cs32.db, cs32.g, cs32.type_), (0, 1, 1, 0xb));
        assert_eq!(cs32.limit, 0xffff_ffff);
    }
}
