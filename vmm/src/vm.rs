//! One microVM: guest memory, the in-kernel irqchip and PIT, the boot vCPU and its exit loop.

use crate::devices::{PortAction, PortBus, RateLimitedLog, COM1_IRQ};
use crate::layout::*;
use crate::{boot, cpu, kvm, Error, Result};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// What the guest boots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Boot {
    /// A Linux bzImage, entered through the 64-bit boot protocol.
    Linux {
        kernel: PathBuf,
        #[serde(default)]
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// A flat binary loaded at 1 MiB and entered there in long mode (test guests).
    Raw { image: PathBuf },
}

/// A microVM's configuration: what `gatevisor vmm --config FILE` reads.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub boot: Boot,
    pub memory_mib: u64,
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Where the serial console goes; standard output when unset.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// Console bytes per second kept in the log (burst: ten times that).
    #[serde(default = "default_console_rate")]
    pub console_rate: u64,
    /// Where `gatevisor vmm` records how the VM ended (JSON: `code`, `signal`,
    /// `start_failed`, the record the supervisor reads for containers too).
    #[serde(default)]
    pub exit_file: Option<PathBuf>,
}

fn one() -> u8 {
    1
}
fn default_console_rate() -> u64 {
    64 * 1024
}

/// How a VM ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest reset the machine (i8042 reset line): Linux's `reboot`.
    Reset,
    /// A triple fault: the guest crashed beyond recovery.
    TripleFault,
    /// The guest wrote its status to the debug-exit port.
    DebugExit(u8),
}

impl VmConfig {
    pub fn validate(&self) -> Result<()> {
        if !(16..=(MMIO_GAP_START >> 20)).contains(&self.memory_mib) {
            return Err(Error::Config(format!(
                "memory_mib {} must be between 16 and {}",
                self.memory_mib,
                MMIO_GAP_START >> 20
            )));
        }
        if self.vcpus != 1 {
            return Err(Error::Config(format!(
                "vcpus {}: this VMM boots one vCPU (no MP tables or ACPI yet)",
                self.vcpus
            )));
        }
        if self.console_rate == 0 {
            return Err(Error::Config("console_rate must be positive".into()));
        }
        Ok(())
    }
}

pub struct Vm {
    _kvm: Kvm,
    _vm: VmFd,
    pub mem: GuestMemoryMmap,
    vcpu: VcpuFd,
    bus: PortBus<Box<dyn Write + Send>>,
}

impl Vm {
    /// Creates the machine and loads the guest; the vCPU is ready to run.
    pub fn new(cfg: &VmConfig) -> Result<Vm> {
        cfg.validate()?;
        let kvm_fd = Kvm::new().map_err(kvm("open /dev/kvm"))?;
        let vm = kvm_fd.create_vm().map_err(kvm("KVM_CREATE_VM"))?;
        vm.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(kvm("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm("KVM_CREATE_PIT2"))?;

        let size = (cfg.memory_mib << 20) as usize;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).map_err(|e| {
            Error::Memory {
                mib: cfg.memory_mib,
                detail: e.to_string(),
            }
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory {
                    mib: cfg.memory_mib,
                    detail: e.to_string(),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps for as long
            // as the VM exists; KVM only accesses guest pages inside it.
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let entry = match &cfg.boot {
            Boot::Linux {
                kernel,
                initrd,
                cmdline,
            } => boot::load_linux(&mem, kernel, initrd.as_deref(), cmdline)?,
            Boot::Raw { image } => {
                let bytes = std::fs::read(image).map_err(|source| Error::File {
                    what: "read raw image",
                    path: image.clone(),
                    source,
                })?;
                boot::load_raw(&mem, &bytes)?
            }
        };

        let vcpu = vm.create_vcpu(0).map_err(kvm("KVM_CREATE_VCPU"))?;
        let cpuid = kvm_fd
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
        cpu::setup_cpuid(&vcpu, cpuid, 0)?;
        cpu::setup_msrs(&vcpu)?;
        cpu::setup_fpu(&vcpu)?;
        cpu::setup_sregs(&mem, &vcpu)?;
        cpu::setup_regs(&vcpu, entry)?;
        cpu::setup_lapic(&vcpu)?;

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::File {
            what: "eventfd",
            path: PathBuf::from("serial irq"),
            source,
        })?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm("KVM_IRQFD"))?;
        let out: Box<dyn Write + Send> = match &cfg.console_log {
            Some(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| Error::File {
                        what: "open console log",
                        path: path.clone(),
                        source,
                    })?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let console: Box<dyn Write + Send> = Box::new(RateLimitedLog::new(
            out,
            cfg.console_rate,
            cfg.console_rate * 10,
        ));
        Ok(Vm {
            _kvm: kvm_fd,
            _vm: vm,
            mem,
            vcpu,
            bus: PortBus::new(serial_irq, console),
        })
    }

    /// Runs the guest until it ends its machine.
    pub fn run(&mut self) -> Result<VmEnd> {
        loop {
            let exit = self.vcpu.run();
            match exit {
                Ok(VcpuExit::IoOut(port, data)) => match self.bus.write(port, data) {
                    PortAction::Continue => {}
                    PortAction::Reset => return Ok(VmEnd::Reset),
                    PortAction::DebugExit(code) => return Ok(VmEnd::DebugExit(code)),
                },
                Ok(VcpuExit::IoIn(port, data)) => self.bus.read(port, data),
                // No MMIO devices yet: reads of nothing see all ones, writes vanish.
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
                Ok(VcpuExit::MmioWrite(..)) => {}
                Ok(VcpuExit::Shutdown) => return Ok(VmEnd::TripleFault),
                Ok(VcpuExit::Hlt) => return Err(Error::Guest("halted with interrupts off".into())),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    return Err(Error::Guest(format!(
                        "KVM could not enter the vCPU {cpu}: hardware reason {reason:#x}"
                    )))
                }
                Ok(VcpuExit::InternalError) => {
                    return Err(Error::Guest(
                        "KVM internal error (emulation failure)".into(),
                    ))
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    return Err(Error::Guest(format!("system event {kind}")))
                }
                Ok(other) => return Err(Error::Guest(format!("unexpected exit {other:?}"))),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return Err(kvm("KVM_RUN")(e)),
            }
        }
    }

    /// Bytes of guest memory the host has actually backed (pages the guest or the loader
    /// touched), from the mapping's resident set.
    pub fn guest_resident_bytes(&self) -> u64 {
        let mut total = 0;
        for region in self.mem.iter() {
            let Ok(host) = self.mem.get_host_address(region.start_addr()) else {
                continue;
            };
            let len = region.len() as usize;
            let pages = len.div_ceil(4096);
            let mut vec = vec![0u8; pages];
            // SAFETY: mincore reads the residency of a mapping this Vm owns into `vec`, which
            // has one byte per page of that mapping.
            let r = unsafe { libc::mincore(host as *mut libc::c_void, len, vec.as_mut_ptr()) };
            if r == 0 {
                total += vec.iter().filter(|b| **b & 1 == 1).count() as u64 * 4096;
            }
        }
        total
    }
}
