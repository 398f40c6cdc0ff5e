//! What a VMM process may still do once its VM is built: no capabilities, and a seccomp
//! filter (seccompiler) on the vCPU thread that allows only the system calls of the run loop.
//! A guest that finds a bug in a device model is then stuck in a process that can run guest
//! code, write its console log and exit — nothing else.

use crate::{Error, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};
use std::collections::BTreeMap;

/// `KVM_RUN`: the only ioctl the vCPU loop makes.
const KVM_RUN: u64 = 0xae80;

// What a snapshot reads of the VM (read-only ioctls; restoring happens before the sandbox).
const KVMIO: u32 = 0xae;
vmm_sys_util::ioctl_iowr_nr!(
    KVM_GET_MSR_INDEX_LIST,
    KVMIO,
    0x02,
    kvm_bindings::kvm_msr_list
);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_bindings::kvm_irqchip);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_bindings::kvm_pit_state2);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_bindings::kvm_cpuid2);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
vmm_sys_util::ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);

/// The run loop's system calls. `ioctl` is limited to `KVM_RUN`; anything else kills the
/// process (SIGSYS), which the supervisor sees as the VM's end.
pub fn vcpu_filter() -> Result<BpfProgram> {
    let bad = |e: seccompiler::BackendError| Error::Config(format!("seccomp filter: {e}"));
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for sc in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_close,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_futex,
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_clock_gettime,
        libc::SYS_sched_yield,
        // The control thread waits for a paused vCPU in 1 ms sleeps.
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_getrandom,
        // Devices: the I/O thread's poll, disk I/O and flush.
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
        // A snapshot sizes the memory file the control client handed over.
        libc::SYS_ftruncate,
        // vsock's host side: accepting host connections, connecting to `<uds_path>_<port>`.
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_shutdown,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        // abort(): a panic (panic = "abort") ends as SIGABRT, not as a seccomp kill.
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_rt_sigaction,
    ] {
        rules.insert(sc, vec![]);
    }
    // abort(), and the kick that takes the vCPU out of KVM_RUN for a pause.
    let signal_is = |sig: libc::c_int| -> Result<SeccompRule> {
        SeccompRule::new(vec![SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            sig as u64,
        )
        .map_err(bad)?])
        .map_err(bad)
    };
    rules.insert(
        libc::SYS_tgkill,
        vec![
            signal_is(libc::SIGABRT)?,
            signal_is(crate::vm::kick_signal())?,
        ],
    );
    // F_GETFD only: closing a descriptor in a debug build asks whether it is open first.
    rules.insert(
        libc::SYS_fcntl,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::F_GETFD as u64,
        )
        .map_err(bad)?])
        .map_err(bad)?],
    );
    // Sockets: Unix ones only (vsock's host side).
    rules.insert(
        libc::SYS_socket,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AF_UNIX as u64,
        )
        .map_err(bad)?])
        .map_err(bad)?],
    );
    let ioctl_is = |req: u64| -> Result<SeccompRule> {
        SeccompRule::new(vec![SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            req,
        )
        .map_err(bad)?])
        .map_err(bad)
    };
    // KVM_RUN, FIONBIO (a socket made non-blocking), and the reads of a snapshot.
    let mut ioctls = vec![ioctl_is(KVM_RUN)?, ioctl_is(libc::FIONBIO)?];
    for req in [
        KVM_GET_MSR_INDEX_LIST(),
        KVM_GET_IRQCHIP(),
        KVM_GET_CLOCK(),
        KVM_GET_PIT2(),
        KVM_GET_REGS(),
        KVM_GET_SREGS(),
        KVM_GET_MSRS(),
        KVM_GET_LAPIC(),
        KVM_GET_CPUID2(),
        KVM_GET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_GET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_GET_TSC_KHZ(),
    ] {
        ioctls.push(ioctl_is(req)?);
    }
    rules.insert(libc::SYS_ioctl, ioctls);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        std::env::consts::ARCH
            .try_into()
            .map_err(|e| Error::Config(format!("seccomp: {e:?}")))?,
    )
    .map_err(bad)?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| bad(e))
}

/// Drops every capability of this process (all sets, and the bounding set).
pub fn drop_capabilities() -> Result<()> {
    use caps::CapSet;
    let err = |e: caps::errors::CapsError| Error::Config(format!("dropping capabilities: {e}"));
    for cap in caps::all() {
        // Only possible while CAP_SETPCAP is held; without it the set is already limited.
        let _ = caps::drop(None, CapSet::Bounding, cap);
    }
    for set in [CapSet::Inheritable, CapSet::Effective, CapSet::Permitted] {
        caps::clear(None, set).map_err(err)?;
    }
    // SAFETY: prctl with constant arguments; it only changes this process's ambient set.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// Installs the seccomp filter on the calling thread (each VMM thread calls it for itself).
pub fn apply_filter() -> Result<()> {
    let prog = vcpu_filter()?;
    seccompiler::apply_filter(&prog).map_err(|e| Error::Config(format!("seccomp: {e}")))
}

/// Enters the sandbox on the calling (vCPU) thread.
pub fn enter() -> Result<()> {
    drop_capabilities()?;
    apply_filter()
}
