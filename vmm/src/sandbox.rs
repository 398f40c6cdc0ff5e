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
        libc::SYS_getrandom,
        // Devices: the I/O thread's poll, disk I/O and flush.
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_fdatasync,
        libc::SYS_fsync,
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
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            2,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::SIGABRT as u64,
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
    // KVM_RUN, and FIONBIO (a socket made non-blocking).
    rules.insert(
        libc::SYS_ioctl,
        vec![ioctl_is(KVM_RUN)?, ioctl_is(libc::FIONBIO)?],
    );
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
