//! One microVM: guest memory, the in-kernel irqchip and PIT, the boot vCPU and its exit loop.

use crate::devices::{ConsoleTee, PortAction, PortBus, RateLimitedLog, COM1_IRQ};
use crate::layout::*;
use crate::memory::Memory;
use crate::virtio::block::Block;
use crate::virtio::mmio::{self, Interrupt, MmioTransport};
use crate::virtio::net::Net;
use crate::virtio::vsock::Vsock;
use crate::virtio::VirtioDevice;
use crate::{acpi, boot, cpu, file_err, kvm, snapshot, Error, Result};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// What the guest boots.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Boot {
    /// A Linux kernel: a bzImage, entered through the 64-bit boot protocol, or an ELF
    /// `vmlinux` with a PVH note, entered through its 32-bit PVH entry.
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
    /// A Unix socket a console client attaches to (`gatevisor service console`): it sees the
    /// guest's serial output and types into its serial input. One client at a time; a new
    /// one takes over.
    #[serde(default)]
    pub console_socket: Option<PathBuf>,
    /// A Unix socket (mode 0600) the supervisor asks for snapshots on (see [`crate::control`]).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Console bytes per second kept in the log (burst: ten times that).
    #[serde(default = "default_console_rate")]
    pub console_rate: u64,
    /// Where `gatevisor vmm` records how the VM ended (JSON: `code`, `signal`,
    /// `start_failed`, the record the supervisor reads for containers too).
    #[serde(default)]
    pub exit_file: Option<PathBuf>,
    /// Network interfaces (virtio-net), each on a tap.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// Disks (virtio-blk), each a raw image file.
    #[serde(default)]
    pub disk: Vec<DiskConfig>,
    /// A virtio-vsock device, its host side on Unix sockets.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
}

/// virtio-vsock: the guest's context id, and the Unix socket host processes connect to
/// (`CONNECT <port>`); guest connections to host port P go to `<uds_path>_<P>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
}

/// A virtio-net interface's backend: a tap the supervisor opened and handed over as an
/// inherited descriptor (`tap_fd`), or one this process attaches by name (`tap`, which
/// needs CAP_NET_ADMIN until the sandbox drops it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    #[serde(default)]
    pub tap: Option<String>,
    #[serde(default)]
    pub tap_fd: Option<i32>,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
}

/// A virtio-blk disk: a raw image; the guest sees it as `/dev/vdX` in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

/// Parses `xx:xx:xx:xx:xx:xx`; a multicast address is refused (it cannot be a NIC's).
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || {
        Error::Config(format!(
            "MAC address {s:?}: expected six hex bytes xx:xx:xx:xx:xx:xx, unicast"
        ))
    };
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
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
    /// The guest powered off (ACPI S5): Linux's `poweroff`.
    PowerOff,
    /// The host paused the VM ([`Pauser::pause`]): it can be snapshotted, or run on.
    Paused,
}

impl VmConfig {
    /// `boot` with `memory_mib`, one vCPU, no device, its console into `console_log`: the
    /// shape of test guests and benchmarks.
    pub fn minimal(boot: Boot, memory_mib: u64, console_log: PathBuf) -> VmConfig {
        VmConfig {
            boot,
            memory_mib,
            vcpus: 1,
            console_log: Some(console_log),
            console_rate: default_console_rate(),
            console_socket: None,
            control_socket: None,
            exit_file: None,
            net: vec![],
            disk: vec![],
            vsock: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(16..=(MMIO_GAP_START >> 20)).contains(&self.memory_mib) {
            return Err(Error::Config(format!(
                "memory_mib {} must be between 16 and {}",
                self.memory_mib,
                MMIO_GAP_START >> 20
            )));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(Error::Config(format!(
                "vcpus {}: 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.console_rate == 0 {
            return Err(Error::Config("console_rate must be positive".into()));
        }
        if self.net.len() + self.disk.len() > VIRTIO_MAX_DEVICES {
            return Err(Error::Config(format!(
                "{} network interfaces and {} disks: at most {VIRTIO_MAX_DEVICES} devices",
                self.net.len(),
                self.disk.len()
            )));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u32::MAX as u64 {
                return Err(Error::Config(format!(
                    "vsock guest_cid {}: 3 to 2^32-1 (0-2 are reserved)",
                    v.guest_cid
                )));
            }
        }
        if self.net.len() + self.disk.len() + self.vsock.is_some() as usize > VIRTIO_MAX_DEVICES {
            return Err(Error::Config(format!(
                "at most {VIRTIO_MAX_DEVICES} virtio devices"
            )));
        }
        for n in &self.net {
            parse_mac(&n.mac)?;
            if n.tap.is_some() == n.tap_fd.is_some() {
                return Err(Error::Config(
                    "a network interface needs exactly one of tap (a name) and tap_fd".into(),
                ));
            }
            if n.tap_fd.is_some_and(|fd| fd < 3) {
                return Err(Error::Config(
                    "tap_fd must be an inherited descriptor (3 or more)".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The most vCPUs a VM gets (one MADT entry and thread each).
pub const MAX_VCPUS: u8 = 16;

type Bus = Arc<Mutex<PortBus<Box<dyn Write + Send>>>>;

pub struct Vm {
    kvm_fd: Kvm,
    vm_fd: VmFd,
    pub mem: Memory,
    /// What a snapshot of this VM is of.
    machine: snapshot::Machine,
    /// The boot files' CRC for `machine.boot_crc`, summed when a snapshot first needs it
    /// (a restored VM's is known from its snapshot: `None`).
    boot_crc: Option<Arc<snapshot::BootSum>>,
    /// The boot files' stamp, which a snapshot records (see [`snapshot::BootFiles::stamp`]).
    boot_stamp: Vec<u64>,
    pause: Arc<PauseState>,
    /// The boot vCPU stopped at a pause (not at the guest's end): its state can be saved.
    paused: bool,
    /// The boot vCPU, run by [`Vm::run`] on the calling thread.
    vcpu: VcpuFd,
    /// The other vCPUs (waiting for the guest's INIT/SIPI), until [`Vm::start_aps`].
    aps: Vec<VcpuFd>,
    bus: Bus,
    /// The virtio-mmio windows, in address order from [`VIRTIO_MMIO_START`].
    mmio: Vec<Arc<Mutex<MmioTransport>>>,
    /// What the I/O thread polls: devices with a backend (taps, vsock sockets) and their
    /// wake-ups.
    io: Vec<DeviceIo>,
    /// The console socket and its attached client, polled by the I/O thread too.
    console_io: Option<ConsoleIo>,
    /// The control socket, until [`Vm::start_control`] gives it its thread.
    control: Option<std::os::unix::net::UnixListener>,
    /// A snapshot the control thread asked for, served by [`Vm::run`] at the pause.
    pending: crate::control::Pending,
    /// Whether the control thread runs: then only it pauses this VM.
    serving: bool,
}

/// The console's part of the I/O loop: [`ConsoleIo`] and the bus its serial port is on.
type ConsoleLoop = (
    std::os::unix::net::UnixListener,
    Arc<Mutex<Option<std::os::unix::net::UnixStream>>>,
    Bus,
);

type ConsoleIo = (
    std::os::unix::net::UnixListener,
    Arc<Mutex<Option<std::os::unix::net::UnixStream>>>,
);

struct DeviceIo {
    transport: Arc<Mutex<MmioTransport>>,
    wake: EventFd,
}

/// Takes over inherited descriptor `fd` as the tap, non-blocking.
fn adopt_tap(fd: RawFd) -> Result<File> {
    let err = |e: std::io::Error| Error::Config(format!("tap_fd {fd}: {e}"));
    // SAFETY: F_GETFL only reads the status flags of `fd`; an invalid descriptor fails with
    // EBADF, checked below.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: as above; sets O_NONBLOCK on a descriptor known to be open.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: the supervisor handed this descriptor to this process for the tap alone;
    // nothing else in the process owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// How a [`Pauser`] and the boot vCPU's loop meet.
#[derive(Default)]
struct PauseState {
    /// A pause is asked for.
    want: AtomicBool,
    /// The vCPU loop stopped for it.
    done: AtomicBool,
    /// The thread in the vCPU loop (signalled out of KVM_RUN), while it is there.
    thread: Mutex<Option<libc::pthread_t>>,
}

/// Stops a running VM's boot vCPU where it is, from another thread: [`Vm::run`] then
/// returns [`VmEnd::Paused`] with any I/O the guest was doing completed.
#[derive(Clone)]
pub struct Pauser(Arc<PauseState>);

/// The signal that kicks a vCPU thread out of KVM_RUN (its handler does nothing).
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Pauser {
    /// Asks for the pause and waits up to `within` for the vCPU to stop.
    pub fn pause(&self, within: Duration) -> Result<()> {
        let p = &self.0;
        p.want.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        while !p.done.load(Ordering::SeqCst) {
            {
                let thread = p.thread.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(t) = *thread {
                    // SAFETY: `t` is the vCPU loop's thread, alive while it is recorded
                    // here (the loop clears it under this lock before it returns); the
                    // signal's handler does nothing but interrupt KVM_RUN.
                    unsafe { libc::pthread_kill(t, kick_signal()) };
                }
            }
            if t0.elapsed() > within {
                p.want.store(false, Ordering::SeqCst);
                return Err(Error::Config(format!(
                    "the vCPU did not pause within {} ms (is the VM running?)",
                    within.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }
}

/// Where a VM's memory and state come from.
enum Origin {
    Boot,
    Snapshot(Box<snapshot::MachineState>, File),
}

impl Vm {
    /// Creates the machine and loads the guest; the vCPU is ready to run.
    pub fn new(cfg: &VmConfig) -> Result<Vm> {
        Vm::build(cfg, Origin::Boot)
    }

    /// Creates the machine as the snapshot in `dir` left it (checked first: see
    /// [`snapshot`]); [`Vm::run`] goes on from there.
    pub fn restore(cfg: &VmConfig, dir: &std::path::Path) -> Result<Vm> {
        cfg.validate()?;
        let (state, memory) = snapshot::read(dir, cfg)?;
        Vm::build(cfg, Origin::Snapshot(Box::new(state), memory))
    }

    fn build(cfg: &VmConfig, origin: Origin) -> Result<Vm> {
        cfg.validate()?;
        let (machine, boot_crc, boot_stamp) = match &origin {
            // The boot files are opened now and summed when a snapshot first needs them.
            Origin::Boot => {
                let files = snapshot::BootFiles::open(cfg)?;
                let stamp = files.stamp().unwrap_or_default();
                (
                    snapshot::Machine::shaped(cfg, 0),
                    Some(Arc::new(snapshot::BootSum::new(files))),
                    stamp,
                )
            }
            Origin::Snapshot(state, _) => (state.machine, None, state.boot_stamp.clone()),
        };
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
        let mem_err = |detail: String| Error::Memory {
            mib: cfg.memory_mib,
            detail,
        };
        let mem = match &origin {
            Origin::Boot => crate::memory::anonymous(size).map_err(|e| mem_err(e.to_string()))?,
            // Private: pages come from the file when first touched, and what the guest
            // writes stays this VM's.
            Origin::Snapshot(_, file) => {
                let file = file
                    .try_clone()
                    .map_err(|e| mem_err(format!("snapshot memory: {e}")))?;
                let region = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
                    size,
                    crate::memory::Mapping::default(),
                )
                .with_file_offset(vm_memory::FileOffset::new(file, 0))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| mem_err(format!("mapping the snapshot's memory: {e}")))?;
                let region = vm_memory::GuestRegionMmap::new(region, GuestAddress(0))
                    .ok_or_else(|| mem_err("the snapshot's memory region".into()))?;
                Memory::from_regions(vec![region]).map_err(|e| mem_err(e.to_string()))?
            }
        };
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

        // The devices: one virtio-mmio window and GSI each; nets first, then disks, then
        // vsock. Those with a backend (`wake`: how the device wakes the I/O thread) are
        // polled by the I/O thread too.
        let mut mmio = Vec::new();
        let mut io = Vec::new();
        let mut acpi_devices = Vec::new();
        let mut add = |dev: Box<dyn VirtioDevice>, wake: Option<EventFd>| -> Result<()> {
            let index = mmio.len();
            let gsi = VIRTIO_GSIS[index];
            let evt =
                EventFd::new(libc::EFD_NONBLOCK).map_err(file_err("eventfd", "virtio irq"))?;
            vm.register_irqfd(&evt, gsi).map_err(kvm("KVM_IRQFD"))?;
            let t = Arc::new(Mutex::new(MmioTransport::new(
                dev,
                mem.clone(),
                Interrupt::new(evt),
            )));
            if let Some(wake) = wake {
                io.push(DeviceIo {
                    transport: t.clone(),
                    wake,
                });
            }
            mmio.push(t);
            acpi_devices.push(acpi::MmioDevice {
                base: VIRTIO_MMIO_START + index as u64 * mmio::WINDOW,
                len: mmio::WINDOW,
                gsi,
            });
            Ok(())
        };
        // A device's wake-up eventfd, and the copy the device keeps.
        let wake_pair = |what: &'static str| -> Result<(EventFd, EventFd)> {
            let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(file_err("eventfd", what))?;
            let copy = wake.try_clone().map_err(file_err("dup", what))?;
            Ok((wake, copy))
        };
        for n in &cfg.net {
            let tap = match (&n.tap, n.tap_fd) {
                (Some(name), _) => crate::tap::open(name)?,
                (None, Some(fd)) => adopt_tap(fd)?,
                (None, None) => unreachable!("validated"),
            };
            let (wake, copy) = wake_pair("net wake")?;
            add(
                Box::new(Net::new(tap, parse_mac(&n.mac)?, copy)),
                Some(wake),
            )?;
        }
        for (i, d) in cfg.disk.iter().enumerate() {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(!d.read_only)
                .open(&d.path)
                .map_err(file_err("open disk", d.path.clone()))?;
            let dev = Block::new(f, d.read_only, &format!("gatevisor-disk{i}"))
                .map_err(file_err("disk", d.path.clone()))?;
            add(Box::new(dev), None)?;
        }
        if let Some(v) = &cfg.vsock {
            let (wake, copy) = wake_pair("vsock wake")?;
            let dev = Vsock::new(v.guest_cid, v.uds_path.clone(), copy)
                .map_err(file_err("listen on", v.uds_path.clone()))?;
            add(Box::new(dev), Some(wake))?;
        }
        let mut vcpus = Vec::new();
        let state = match origin {
            Origin::Boot => {
                let rsdp =
                    acpi::write_tables(&mem, cfg.vcpus, &acpi_devices).map_err(Error::Config)?;
                let entry = match &cfg.boot {
                    Boot::Linux {
                        kernel,
                        initrd,
                        cmdline,
                    } => boot::load_linux(&mem, kernel, initrd.as_deref(), cmdline, rsdp)?,
                    Boot::Raw { image } => {
                        let bytes = std::fs::read(image)
                            .map_err(file_err("read raw image", image.clone()))?;
                        boot::load_raw(&mem, &bytes)?
                    }
                };
                let cpuid = kvm_fd
                    .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                    .map_err(kvm("KVM_GET_SUPPORTED_CPUID"))?;
                let tsc_deadline = kvm_fd.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
                for id in 0..cfg.vcpus {
                    let vcpu = vm.create_vcpu(id as u64).map_err(kvm("KVM_CREATE_VCPU"))?;
                    cpu::setup_cpuid(&vcpu, cpuid.clone(), id, tsc_deadline)?;
                    cpu::setup_msrs(&vcpu)?;
                    cpu::setup_fpu(&vcpu)?;
                    cpu::setup_lapic(&vcpu)?;
                    if id == 0 {
                        // The others start when the guest sends them INIT and SIPI (the
                        // in-kernel LAPIC keeps them waiting until then).
                        cpu::setup_boot_cpu(&mem, &vcpu, entry)?;
                    }
                    vcpus.push(vcpu);
                }
                None
            }
            Origin::Snapshot(state, _) => {
                for (id, saved) in state.vcpus.iter().enumerate() {
                    let vcpu = vm.create_vcpu(id as u64).map_err(kvm("KVM_CREATE_VCPU"))?;
                    saved.restore(&vcpu)?;
                    vcpus.push(vcpu);
                }
                state.restore_vm(&vm)?;
                // The devices after the interrupt controllers: an interrupt they raise
                // again must land in the restored IOAPIC.
                for (i, (t, saved)) in mmio.iter().zip(&state.devices).enumerate() {
                    lock(t).restore(saved).map_err(|why| {
                        Error::Snapshot(format!("{}: {why}", device_name(cfg, i)))
                    })?;
                }
                Some(state)
            }
        };
        let vcpu = vcpus.remove(0);

        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(file_err("eventfd", "serial irq"))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm("KVM_IRQFD"))?;
        let out: Box<dyn Write + Send> = match &cfg.console_log {
            Some(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(file_err("open console log", path.clone()))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        let console_client = Arc::new(Mutex::new(None));
        let console: Box<dyn Write + Send> = Box::new(ConsoleTee {
            log: RateLimitedLog::new(out, cfg.console_rate, cfg.console_rate * 10),
            client: console_client.clone(),
        });
        let console_io = match &cfg.console_socket {
            Some(path) => {
                let _ = std::fs::remove_file(path);
                let listener = std::os::unix::net::UnixListener::bind(path)
                    .and_then(|l| l.set_nonblocking(true).map(|()| l))
                    .map_err(file_err("listen on", path.clone()))?;
                Some((listener, console_client))
            }
            None => None,
        };
        let bus = match state {
            None => PortBus::new(serial_irq, console),
            Some(state) => PortBus {
                serial: vm_superio::Serial::from_state(
                    &state.serial,
                    crate::devices::IrqTrigger(serial_irq),
                    vm_superio::serial::NoEvents,
                    console,
                )
                .map_err(|e| Error::Snapshot(format!("its serial state: {e:?}")))?,
                i8042: crate::devices::I8042::from_state(&state.i8042),
                cmos: crate::devices::Cmos::from_state(&state.cmos),
            },
        };
        let control = cfg
            .control_socket
            .as_deref()
            .map(crate::control::listen)
            .transpose()?;
        // A pause interrupts KVM_RUN with a signal whose handler does nothing.
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| Error::Config(format!("the vCPU kick signal: {e}")))?;
        Ok(Vm {
            kvm_fd,
            vm_fd: vm,
            mem,
            machine,
            boot_crc,
            boot_stamp,
            pause: Arc::default(),
            paused: false,
            vcpu,
            aps: vcpus,
            bus: Arc::new(Mutex::new(bus)),
            console_io,
            mmio,
            io,
            control,
            pending: Arc::default(),
            serving: false,
        })
    }

    /// Starts the thread that serves the control socket (when there is one); it enters the
    /// seccomp filter first.
    pub fn start_control(&mut self) -> Result<()> {
        let Some(listener) = self.control.take() else {
            return Ok(());
        };
        let (pending, pauser) = (self.pending.clone(), self.pauser());
        let boot = self.boot_crc.clone();
        spawn_filtered(
            "vmm-control".into(),
            "the control thread",
            true,
            Box::new(move || crate::control::serve(listener, pending, pauser, boot)),
        )?;
        self.serving = true;
        Ok(())
    }

    /// Starts the thread that moves frames from the taps into the guest. It enters the
    /// sandbox's seccomp filter before it polls anything; an error here is the VMM's.
    pub fn start_io(&mut self) -> Result<()> {
        if self.io.is_empty() && self.console_io.is_none() {
            return Ok(());
        }
        let devices = std::mem::take(&mut self.io);
        let console = self
            .console_io
            .take()
            .map(|(l, c)| (l, c, self.bus.clone()));
        spawn_filtered(
            "vmm-io".into(),
            "the I/O thread",
            true,
            Box::new(move || io_loop(devices, console)),
        )
    }

    /// Starts a thread per application processor; each enters the seccomp filter (when
    /// `sandbox`), then runs its vCPU. A vCPU whose guest ends the machine calls `end`, which
    /// must end the process (the VM is over for every vCPU).
    pub fn start_aps(
        &mut self,
        sandbox: bool,
        end: Arc<dyn Fn(Result<VmEnd>) + Send + Sync>,
    ) -> Result<()> {
        for (i, mut vcpu) in std::mem::take(&mut self.aps).into_iter().enumerate() {
            let (bus, mmio, end) = (self.bus.clone(), self.mmio.clone(), end.clone());
            spawn_filtered(
                format!("vcpu{}", i + 1),
                "a vCPU thread",
                sandbox,
                Box::new(move || end(run_vcpu(&mut vcpu, &bus, &mmio, None))),
            )?;
        }
        Ok(())
    }

    /// Runs the boot vCPU until the guest ends its machine, or a [`Pauser`] pauses it. Once
    /// the control thread runs, pauses are its own: a pause for a control request is served
    /// here (the snapshot taken, the client answered) and the guest runs on.
    pub fn run(&mut self) -> Result<VmEnd> {
        loop {
            let end = self.run_until_pause()?;
            let req = self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            match (end, req) {
                (VmEnd::Paused, Some(mut req)) => {
                    let taken = self.snapshot_into(&mut req.memory, &mut req.state);
                    if let Err(e) = &taken {
                        eprintln!("gatevisor vmm: a snapshot failed: {e}");
                    }
                    req.answer(&taken);
                }
                // The control thread gave up waiting and took its request back just as
                // the vCPU stopped: nobody wants this pause.
                (VmEnd::Paused, None) if self.serving => {}
                (end, _) => return Ok(end),
            }
        }
    }

    fn run_until_pause(&mut self) -> Result<VmEnd> {
        let p = &self.pause;
        p.done.store(false, Ordering::SeqCst);
        // SAFETY: pthread_self has no preconditions.
        *p.thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(unsafe { libc::pthread_self() });
        let end = run_vcpu(&mut self.vcpu, &self.bus, &self.mmio, Some(p));
        *p.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.paused = matches!(end, Ok(VmEnd::Paused));
        if self.paused {
            p.done.store(true, Ordering::SeqCst);
        }
        end
    }

    /// What pauses this VM from another thread.
    pub fn pauser(&self) -> Pauser {
        Pauser(self.pause.clone())
    }

    /// Saves the paused VM to `dir` (see [`snapshot`]); [`Vm::run`] may go on after.
    pub fn snapshot(&mut self, dir: &std::path::Path) -> Result<()> {
        let (mut memory, mut state) = snapshot::create_tmp(dir)?;
        self.snapshot_into(&mut memory, &mut state)?;
        snapshot::commit(dir)
    }

    /// Saves the paused VM into two open files (see [`snapshot::write_into`]): what a
    /// sandboxed VMM does with the files its control client hands it.
    pub fn snapshot_into(&mut self, memory: &mut File, state_file: &mut File) -> Result<()> {
        if !self.paused {
            return Err(Error::Snapshot(
                "the VM is not paused (run it and pause it first)".into(),
            ));
        }
        if !self.aps.is_empty() || self.machine.vcpus > 1 {
            return Err(Error::Snapshot(
                "snapshots of VMs with more than one vCPU are not supported yet".into(),
            ));
        }
        if let Some(sum) = &self.boot_crc {
            self.machine.boot_crc = sum.get()?;
        }
        // Every device is held until its memory is saved: the I/O thread writes guest
        // memory (received frames) only while it holds the device.
        let devices: Vec<_> = self.mmio.iter().map(|t| lock(t)).collect();
        let vcpu = snapshot::VcpuState::save(&self.kvm_fd, &self.vcpu)?;
        let vm = snapshot::save_vm(&self.vm_fd)?;
        let mut state = {
            let bus = self.bus.lock().unwrap_or_else(|e| e.into_inner());
            snapshot::MachineState::new(
                self.machine,
                vm,
                vec![vcpu],
                bus.serial.state(),
                bus.i8042.state(),
                bus.cmos.state(),
                devices.iter().map(|t| t.save()).collect(),
            )
        };
        state.boot_stamp = self.boot_stamp.clone();
        let region = self
            .mem
            .iter()
            .next()
            .ok_or_else(|| Error::Snapshot("the VM has no memory".into()))?;
        let host = self
            .mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Snapshot(format!("guest memory: {e}")))?;
        // SAFETY: the one region from guest address 0 is a live mapping of `region.len()`
        // bytes owned by `self.mem`; the only vCPU is paused (this thread ran it) and the
        // I/O thread, the only other writer, waits for the devices held in `devices`, so
        // nothing changes it while it is read.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, region.len() as usize) };
        let written = snapshot::write_into(memory, state_file, bytes, &mut state);
        drop(devices);
        written
    }

    /// The virtio devices that stopped serving their driver, and why (for the exit report).
    pub fn broken_devices(&self) -> Vec<String> {
        self.mmio
            .iter()
            .filter_map(|t| {
                let t = lock(t);
                t.broken()
                    .map(|e| format!("virtio device {}: {e}", t.device_type()))
            })
            .collect()
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

/// A device lock: a panic while holding it aborts the process (panic = "abort"), so a
/// poisoned lock is never seen; take the data either way.
/// The console's turn in the I/O thread: a new client takes over, a client's keystrokes go
/// to the serial input (what fits its FIFO), a client that hung up is dropped.
fn console_ready(
    listener: &std::os::unix::net::UnixListener,
    client: &Mutex<Option<std::os::unix::net::UnixStream>>,
    bus: &Bus,
    fds: &[libc::pollfd],
) {
    use std::io::Read;
    let mut client = client.lock().unwrap_or_else(|p| p.into_inner());
    if fds.first().is_some_and(|p| p.revents != 0) {
        if let Ok((c, _)) = listener.accept() {
            if c.set_nonblocking(true).is_ok() {
                *client = Some(c);
            }
        }
        return;
    }
    if fds.get(1).is_none_or(|p| p.revents == 0) {
        return;
    }
    let Some(c) = client.as_mut() else { return };
    let mut buf = [0u8; 64];
    match c.read(&mut buf) {
        Ok(0) => *client = None,
        Ok(n) => {
            let mut bus = bus.lock().unwrap_or_else(|p| p.into_inner());
            // Beyond the FIFO's room, keystrokes are lost, as on a real UART.
            let _ = bus.serial.enqueue_raw_bytes(&buf[..n]);
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(_) => *client = None,
    }
}

/// One vCPU's exit loop, until the guest ends the machine or breaks it, or `pause` asks it
/// to stop.
fn run_vcpu(
    vcpu: &mut VcpuFd,
    bus: &Bus,
    mmio: &[Arc<Mutex<MmioTransport>>],
    pause: Option<&PauseState>,
) -> Result<VmEnd> {
    let lock_bus = || bus.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if pause.is_some_and(|p| p.want.swap(false, Ordering::SeqCst)) {
            // Enter once more with immediate_exit: KVM completes the port or MMIO access
            // the last exit was for, then returns at once, so the saved state is whole.
            vcpu.set_kvm_immediate_exit(1);
            let r = vcpu.run().map(|_| ());
            vcpu.set_kvm_immediate_exit(0);
            match r {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(()) => {}
                Err(e) => return Err(kvm("KVM_RUN")(e)),
            }
            return Ok(VmEnd::Paused);
        }
        let exit = vcpu.run();
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => match lock_bus().write(port, data) {
                PortAction::Continue => {}
                PortAction::Reset => return Ok(VmEnd::Reset),
                PortAction::DebugExit(code) => return Ok(VmEnd::DebugExit(code)),
                PortAction::PowerOff => return Ok(VmEnd::PowerOff),
            },
            Ok(VcpuExit::IoIn(port, data)) => lock_bus().read(port, data),
            // Outside the virtio windows: reads see all ones, writes vanish.
            Ok(VcpuExit::MmioRead(addr, data)) => match mmio_device(mmio, addr) {
                Some((dev, off)) => lock(dev).read(off, data),
                None => data.fill(0xff),
            },
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if let Some((dev, off)) = mmio_device(mmio, addr) {
                    lock(dev).write(off, data);
                }
            }
            Ok(VcpuExit::Shutdown) => {
                // Where it happened, for whoever reads the service log. (On AMD, KVM has
                // already reset the vCPU at the shutdown intercept: the registers are the
                // reset state, and only the host's kvm_exit trace keeps the guest's rip.)
                eprintln!("gatevisor vmm: triple fault: {}", cpu_state(vcpu));
                return Ok(VmEnd::TripleFault);
            }
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
            // Named by KVM's number (`KVM_EXIT_*`): printing the exit with its data took
            // a kilobyte of the flash budget.
            Ok(_) => {
                let reason = vcpu.get_kvm_run().exit_reason;
                return Err(Error::Guest(format!("unexpected KVM exit {reason}")));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => return Err(kvm("KVM_RUN")(e)),
        }
    }
}

/// The registers that say where a vCPU was and what it ran on, as one line.
fn cpu_state(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "(hex) rip rsp rflags cr0 cr2 cr3 cr4 efer cs idt gdt (base, limit) {:x?}",
            [
                r.rip,
                r.rsp,
                r.rflags,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector.into(),
                s.idt.base,
                s.idt.limit.into(),
                s.gdt.base,
                s.gdt.limit.into(),
            ]
        ),
        (Err(e), _) | (_, Err(e)) => format!("registers unreadable: {e}"),
    }
}

/// Starts thread `name` (`what` in errors), which enters the seccomp filter (when
/// `sandbox`) before it runs `body`; returns once it is filtered, or why it could not be.
/// (`body` is boxed: one copy of the thread start-up code serves every thread.)
fn spawn_filtered(
    name: String,
    what: &'static str,
    sandbox: bool,
    body: Box<dyn FnOnce() + Send>,
) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let filtered = if sandbox {
                crate::sandbox::apply_filter()
            } else {
                Ok(())
            };
            let ok = filtered.is_ok();
            let _ = tx.send(filtered);
            if ok {
                body();
            }
        })
        .map_err(file_err("spawn", what))?;
    rx.recv()
        .map_err(|_| Error::Config(format!("{what} ended before its sandbox")))?
}

/// How a person names the `i`th virtio device of `cfg` (nets, then disks, then vsock).
fn device_name(cfg: &VmConfig, i: usize) -> String {
    if i < cfg.net.len() {
        format!("network interface {i}")
    } else if i < cfg.net.len() + cfg.disk.len() {
        format!("disk {}", i - cfg.net.len())
    } else {
        "the vsock device".into()
    }
}

fn mmio_device(
    devices: &[Arc<Mutex<MmioTransport>>],
    addr: u64,
) -> Option<(&Arc<Mutex<MmioTransport>>, u64)> {
    let off = addr.checked_sub(VIRTIO_MMIO_START)?;
    let dev = devices.get(usize::try_from(off / mmio::WINDOW).ok()?)?;
    Some((dev, off % mmio::WINDOW))
}

fn lock(m: &Mutex<MmioTransport>) -> std::sync::MutexGuard<'_, MmioTransport> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The I/O thread: waits on what each device's backend asks for (a tap with frames that
/// have somewhere to go, vsock sockets) and on the wake-ups that say a device's buffers
/// changed.
fn io_loop(devices: Vec<DeviceIo>, console: Option<ConsoleLoop>) {
    loop {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut owner: Vec<usize> = Vec::new();
        // The console first: its listener, and its client when one is attached.
        let mut console_fds = 0;
        if let Some((listener, client, _)) = &console {
            fds.push(libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            console_fds = 1;
            if let Some(c) = client.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
                fds.push(libc::pollfd {
                    fd: c.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                console_fds = 2;
            }
        }
        for (i, d) in devices.iter().enumerate() {
            fds.push(libc::pollfd {
                fd: d.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            owner.push(i);
            for (fd, events) in lock(&d.transport).backend_fds() {
                fds.push(libc::pollfd {
                    fd,
                    events,
                    revents: 0,
                });
                owner.push(i);
            }
        }
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            continue; // EINTR
        }
        if let Some((listener, client, bus)) = &console {
            console_ready(listener, client, bus, &fds[..console_fds]);
        }
        let mut ready = vec![false; devices.len()];
        for (k, p) in fds.iter().enumerate().skip(console_fds) {
            let k = k - console_fds;
            if p.revents == 0 {
                continue;
            }
            if p.fd == devices[owner[k]].wake.as_raw_fd() {
                let _ = devices[owner[k]].wake.read();
            } else {
                ready[owner[k]] = true;
            }
        }
        for (i, d) in devices.iter().enumerate() {
            if ready[i] {
                lock(&d.transport).backend_ready();
            }
        }
    }
}
