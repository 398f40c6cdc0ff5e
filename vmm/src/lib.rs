//! gatevisor's microVM monitor: a KVM virtual machine in one process, built on the rust-vmm
//! crates (kvm-ioctls, vm-memory, linux-loader, vm-superio).
//!
//! - [`layout`]: where things live in guest memory;
//! - [`boot`]: loading a Linux bzImage (64-bit boot protocol: zero page, e820 map, command line,
//!   initramfs) or a raw flat binary (test guests);
//! - [`cpu`]: the boot vCPU's state (CPUID, MSRs, FPU, long mode with identity-mapped page
//!   tables, LAPIC);
//! - [`devices`]: the port-I/O devices: 8250 serial (vm-superio) to a rate-limited log, the
//!   i8042 reset line (how the guest ends its VM), a debug-exit port;
//! - [`vm`]: the machine: memory, in-kernel irqchip and PIT, the vCPU loop, how it ended;
//! - [`snapshot`]: a paused machine saved to a directory and restored into a fresh VM;
//!
//! Every address, length and port value comes from the guest and is treated as hostile: an
//! access outside guest memory is an error of the VM (its VMM stops), never of the host.

pub mod acpi;
pub mod boot;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod guest;
pub mod layout;
pub mod memory;
pub mod process;
pub mod sandbox;
pub mod snapshot;
pub mod tap;
pub mod virtio;
pub mod vm;

pub use vm::{Boot, VmConfig, VmEnd};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM: {op}: {source}")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory of {mib} MiB: {detail}")]
    Memory { mib: u64, detail: String },
    #[error("{what} {path}: {source}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path}: {detail}")]
    Kernel {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("snapshot refused: {0}")]
    Snapshot(String),
    #[error("the guest broke its machine: {0}")]
    Guest(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// An I/O error about `path`, as [`Error::File`].
pub(crate) fn file_err(
    what: &'static str,
    path: impl Into<std::path::PathBuf>,
) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::File { what, path, source }
}
