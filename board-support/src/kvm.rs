//! KVM probe: open `/dev/kvm`, check the API version, create a VM and the in-kernel devices a
//! microVM needs, and tell hardware-assisted KVM from KVM-PVM by the loaded module.

use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What kind of KVM backs `/dev/kvm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KvmKind {
    /// `kvm_intel` (VT-x) is loaded.
    HardwareIntel,
    /// `kvm_amd` (AMD-V) is loaded.
    HardwareAmd,
    /// `kvm_pvm`: paravirtualised KVM that runs small guests but not a stock Linux kernel.
    Pvm,
    /// `/dev/kvm` works but no known vendor module was found.
    Unknown,
    /// `/dev/kvm` is missing or cannot be used.
    Absent,
}

/// One KVM extension and whether the kernel offers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Extension {
    pub name: String,
    pub present: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KvmReport {
    pub kind: KvmKind,
    /// `KVM_GET_API_VERSION`, when `/dev/kvm` opened.
    pub api_version: Option<i32>,
    /// Whether `KVM_CREATE_VM` succeeded.
    pub create_vm: bool,
    /// Whether an in-kernel irqchip and PIT could be created on a probe VM.
    pub irqchip: bool,
    pub extensions: Vec<Extension>,
    pub max_vcpus: Option<usize>,
    /// All a microVM booting a stock Linux kernel needs is there.
    pub microvm_capable: bool,
    /// Why not, when not.
    pub problem: Option<String>,
}

impl KvmReport {
    pub fn summary(&self) -> String {
        match (&self.problem, self.kind) {
            (Some(p), _) => p.clone(),
            (None, kind) => format!("{kind:?} KVM, usable for microVMs"),
        }
    }
}

/// Extensions our VMM relies on; missing any of them rules microVMs out.
const REQUIRED: &[(&str, Cap)] = &[
    ("KVM_CAP_IRQCHIP", Cap::Irqchip),
    ("KVM_CAP_USER_MEMORY", Cap::UserMemory),
    ("KVM_CAP_PIT2", Cap::Pit2),
    ("KVM_CAP_IRQFD", Cap::Irqfd),
    ("KVM_CAP_IOEVENTFD", Cap::Ioeventfd),
    ("KVM_CAP_SET_TSS_ADDR", Cap::SetTssAddr),
    ("KVM_CAP_EXT_CPUID", Cap::ExtCpuid),
    ("KVM_CAP_MP_STATE", Cap::MpState),
    ("KVM_CAP_IMMEDIATE_EXIT", Cap::ImmediateExit),
];

/// The vendor module decides the kind; `/sys/module/<name>` exists for loaded and built-in
/// modules that have parameters, which all three have.
pub fn kind_from_sysfs(sys_module: &Path) -> KvmKind {
    if sys_module.join("kvm_pvm").exists() {
        KvmKind::Pvm
    } else if sys_module.join("kvm_intel").exists() {
        KvmKind::HardwareIntel
    } else if sys_module.join("kvm_amd").exists() {
        KvmKind::HardwareAmd
    } else {
        KvmKind::Unknown
    }
}

pub fn probe() -> KvmReport {
    probe_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

pub fn probe_at(dev: &Path, sys_module: &Path) -> KvmReport {
    let mut report = KvmReport {
        kind: KvmKind::Absent,
        api_version: None,
        create_vm: false,
        irqchip: false,
        extensions: Vec::new(),
        max_vcpus: None,
        microvm_capable: false,
        problem: None,
    };
    let c_path = match std::ffi::CString::new(dev.as_os_str().as_encoded_bytes()) {
        Ok(p) => p,
        Err(_) => {
            report.problem = Some(format!("bad device path {}", dev.display()));
            return report;
        }
    };
    let kvm = match Kvm::new_with_path(c_path) {
        Ok(kvm) => kvm,
        Err(e) => {
            report.problem = Some(format!("cannot open {}: {e}", dev.display()));
            return report;
        }
    };
    report.kind = kind_from_sysfs(sys_module);
    let api = kvm.get_api_version();
    report.api_version = Some(api);
    report.max_vcpus = Some(kvm.get_max_vcpus());
    report.extensions = REQUIRED
        .iter()
        .map(|(name, cap)| Extension {
            name: (*name).to_string(),
            present: kvm.check_extension(*cap),
        })
        .collect();
    match kvm.create_vm() {
        Ok(vm) => {
            report.create_vm = true;
            report.irqchip = vm.create_irq_chip().is_ok()
                && vm
                    .create_pit2(kvm_bindings::kvm_pit_config::default())
                    .is_ok();
        }
        Err(e) => report.problem = Some(format!("KVM_CREATE_VM failed: {e}")),
    }
    let missing: Vec<&str> = report
        .extensions
        .iter()
        .filter(|e| !e.present)
        .map(|e| e.name.as_str())
        .collect();
    if report.problem.is_none() {
        report.problem = if api != 12 {
            Some(format!("KVM API version {api}, expected 12"))
        } else if !missing.is_empty() {
            Some(format!("missing KVM extensions: {}", missing.join(", ")))
        } else if !report.irqchip {
            Some("cannot create an in-kernel irqchip and PIT".into())
        } else {
            match report.kind {
                KvmKind::HardwareIntel | KvmKind::HardwareAmd => None,
                KvmKind::Pvm => Some(
                    "KVM-PVM (kvm_pvm) runs small guest programs but cannot boot a stock \
                     Linux kernel"
                        .into(),
                ),
                KvmKind::Unknown => Some(
                    "no kvm_intel or kvm_amd module: cannot tell whether a Linux guest boots"
                        .into(),
                ),
                KvmKind::Absent => Some("no KVM".into()),
            }
        };
    }
    report.microvm_capable = report.problem.is_none();
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_module_wins_over_vendor_modules() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("kvm_amd")).unwrap();
        assert_eq!(kind_from_sysfs(dir.path()), KvmKind::HardwareAmd);
        std::fs::create_dir(dir.path().join("kvm_pvm")).unwrap();
        assert_eq!(kind_from_sysfs(dir.path()), KvmKind::Pvm);
    }

    #[test]
    fn missing_device_is_absent_and_not_capable() {
        let dir = tempfile::tempdir().unwrap();
        let r = probe_at(&dir.path().join("no-kvm"), dir.path());
        assert_eq!(r.kind, KvmKind::Absent);
        assert!(!r.microvm_capable);
        assert!(r.problem.unwrap().contains("cannot open"));
    }

    #[test]
    fn real_kvm_probe_matches_loaded_module() {
        if !Path::new("/dev/kvm").exists() {
            eprintln!("skipped: no /dev/kvm on this machine");
            return;
        }
        let r = probe();
        assert_eq!(r.api_version, Some(12));
        assert!(r.create_vm, "KVM_CREATE_VM must work: {:?}", r.problem);
        if Path::new("/sys/module/kvm_pvm").exists() {
            assert_eq!(r.kind, KvmKind::Pvm);
            assert!(!r.microvm_capable, "PVM cannot boot stock Linux guests");
        }
    }
}
