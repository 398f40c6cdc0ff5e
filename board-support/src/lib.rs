//! What the board can do, found by probing, and the board profiles that tune gatevisor to it.
//!
//! Every fact in a [`BoardReport`] comes from trying the thing: KVM is opened and a VM created,
//! a tap and a veth are created in a throw-away network namespace, the Open vSwitch database
//! socket is connected to. CPU flags in `/proc/cpuinfo` are never used: under KVM-PVM they show
//! no `vmx`/`svm` although `/dev/kvm` works, and under nested setups they can claim what KVM
//! cannot deliver.
//!
//! [`links`] reads the host's links, their counters and its neighbour table over route netlink
//! (what a service's host calls may be granted).
//!
//! This crate depends on nothing of ours; facts about liblxc are added by the supervisor, which
//! owns the `lxc` crate.

pub mod cgroup;
pub mod host;
pub mod kvm;
pub mod links;
pub mod net;
pub mod ovs;
pub mod profile;

use serde::{Deserialize, Serialize};

pub use cgroup::{CgroupReport, CgroupVersion};
pub use host::HostReport;
pub use kvm::{KvmKind, KvmReport};
pub use net::NetReport;
pub use ovs::OvsReport;
pub use profile::{BoardProfile, ProfileError};

/// The runtime a service with `runtime = "auto"` gets on this board.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoRuntime {
    Microvm,
    Lxc,
}

/// Everything probed about the board, plus the profile in force.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BoardReport {
    pub profile: BoardProfile,
    pub host: HostReport,
    pub kvm: KvmReport,
    pub cgroup: CgroupReport,
    pub net: NetReport,
    pub ovs: OvsReport,
    /// The runtime `runtime = "auto"` picks, and why.
    pub auto_runtime: AutoRuntime,
    pub auto_runtime_reason: String,
}

impl BoardReport {
    /// Probes the board. `profile` is the profile chosen by the caller (see
    /// [`profile::select`]).
    pub fn probe(profile: BoardProfile) -> BoardReport {
        let kvm = kvm::probe();
        let (auto_runtime, auto_runtime_reason) = choose_auto(&kvm);
        BoardReport {
            profile,
            host: host::probe(),
            kvm,
            cgroup: cgroup::probe(),
            net: net::probe(),
            ovs: ovs::probe(),
            auto_runtime,
            auto_runtime_reason,
        }
    }

    /// Memory that services may use in total, in MiB, after applying the profile's rule.
    pub fn service_memory_budget_mib(&self) -> u64 {
        match self.profile.service_memory_budget_mib {
            0 => self.host.memory_total_mib / 2,
            n => n,
        }
    }
}

/// microVMs need hardware-assisted KVM that can boot a stock Linux kernel.
pub fn choose_auto(kvm: &KvmReport) -> (AutoRuntime, String) {
    if kvm.microvm_capable {
        (
            AutoRuntime::Microvm,
            "hardware-assisted KVM with the extensions a microVM needs".into(),
        )
    } else {
        (
            AutoRuntime::Lxc,
            format!("microVMs cannot run here: {}", kvm.summary()),
        )
    }
}
