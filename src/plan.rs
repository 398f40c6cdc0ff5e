//! A service's plan: what it runs as, resolved once when it is installed (and again when
//! it switches version), and kept in its record. The supervisor, both backends, admission,
//! status and USP read the plan instead of each deriving the same facts again from the
//! manifest, the board and the runtime kind.
//!
//! - `runtime`: `auto` resolved for the board (and what the install asked for);
//! - `resources`: what the service really receives, and what the board's budget is charged
//!   (a microVM's guest memory is at least [`crate::microvm::MIN_GUEST_MIB`]); a VMM's cgroup
//!   adds its own overhead on top ([`crate::runtime::microvm::vm_limits`]);
//! - `root`: what its root is in its service directory (a tree of its own, a read-only
//!   checkout of the image store under its own writable layer, or an initramfs);
//! - `port`: its port on the bridge (name, pinned MAC, address), `control_channel`: whether
//!   it gets the verdict socket;
//! - `idmap_base`: a container's user namespace;
//! - logs: every service's console and output go to `logs/NAME.log`, rotated by the
//!   daemon's `log_max_bytes` and `log_keep` (daemon settings, not the plan's).

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::runtime::Kind;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub runtime: Kind,
    pub resources: Resources,
    pub root: Root,
    pub port: Option<Port>,
    pub control_channel: bool,
    /// A container's user namespace starts at this host id (`None`: privileged, or a
    /// microVM).
    pub idmap_base: Option<u32>,
    /// Who its program runs as inside (`None`: its root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<User>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// What the manifest asked for (`resources.memory_mib`).
    pub memory_mib: u32,
    /// What the service really receives, and the board's memory budget is charged: a
    /// container its limit, a microVM its guest memory.
    pub receives_mib: u64,
    pub cpu_quota_percent: Option<u32>,
    pub pids: Option<u32>,
    pub vcpus: u32,
    pub disk_mib: Option<u32>,
}

/// What a service's root is, in its service directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Root {
    /// A tree of its own (`rootfs/`): the busybox system, or a tree copied from under an
    /// image root.
    Own,
    /// The image store's tree of this version of the service, read-only under the
    /// service's own writable layer (an overlay, mounted at each start).
    Checkout { version: String },
    /// A microVM's initramfs (`initramfs.cpio`, the guest init's archive appended).
    Initramfs,
    /// An OCI image's layers in the image store (`image`: its digest), read-only under the
    /// service's own writable layer; each layer idmapped for the container's user namespace.
    Layers { image: String },
}

/// A container's program's user inside (`manifest.user`, names resolved at install).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

/// A service's port on the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    /// The host side: a container's veth, a microVM's tap.
    pub name: String,
    /// The address its frames must carry (pinned by flows).
    pub mac: String,
    /// `network.address`, set inside the service.
    pub address: Option<String>,
}

/// How many host ids a container's user namespace maps.
pub const IDMAP_COUNT: u32 = 65_536;

impl Plan {
    /// The plan of manifest `m` run with `runtime`, its root being `root`.
    pub fn resolve(m: &Manifest, runtime: Kind, root: Root, idmap_base: Option<u32>) -> Plan {
        let r = &m.resources;
        Plan {
            runtime,
            resources: Resources {
                memory_mib: r.memory_mib,
                receives_mib: receives_mib(runtime, r.memory_mib),
                cpu_quota_percent: r.cpu_quota_percent,
                pids: r.pids,
                vcpus: r.vcpus,
                disk_mib: r.disk_mib,
            },
            root,
            port: m.network.interface.then(|| Port {
                name: crate::supervisor::veth_name(&m.name),
                mac: crate::network::mac_text(&crate::network::service_mac(&m.name)),
                address: m.network.address.clone(),
            }),
            control_channel: m.has_control_channel(),
            idmap_base: idmap_base.filter(|_| runtime == Kind::Lxc),
            user: m.user_ids().map(|(uid, gid)| User { uid, gid }),
        }
    }

    /// The plan of a record written before records had one (state document version 1):
    /// the root is told by the runtime and whether the service came from a package.
    pub fn of_version_1(
        m: &Manifest,
        runtime: Kind,
        package_version: Option<&str>,
        idmap_base: Option<u32>,
    ) -> Plan {
        let root = match (runtime, package_version) {
            (Kind::Microvm, _) => Root::Initramfs,
            (Kind::Lxc, Some(v)) => Root::Checkout {
                version: v.to_string(),
            },
            (Kind::Lxc, None) => Root::Own,
        };
        Plan::resolve(m, runtime, root, idmap_base)
    }

    /// The service's limits, as its container or its VMM's cgroup applies them (a VMM adds
    /// its own overhead to the memory).
    pub fn limits(&self) -> gatevisor_lxc::Limits {
        let r = &self.resources;
        gatevisor_lxc::Limits {
            memory_bytes: Some(r.memory_mib as u64 * 1024 * 1024),
            cpu_quota_us: r
                .cpu_quota_percent
                .map(|p| p as u64 * gatevisor_lxc::config::CPU_PERIOD_US / 100),
            pids: r.pids.map(u64::from),
            cpus: Some(r.vcpus),
        }
    }

    /// A container's user namespace: [`IDMAP_COUNT`] ids from `idmap_base`.
    pub fn idmap(&self) -> Option<gatevisor_lxc::IdMap> {
        self.idmap_base.map(|host_base| gatevisor_lxc::IdMap {
            host_base,
            count: IDMAP_COUNT,
        })
    }

    pub fn port_name(&self) -> Option<&str> {
        self.port.as_ref().map(|p| p.name.as_str())
    }
}

/// What a service that asks for `memory_mib` really receives with `runtime`: a container
/// its limit, a microVM the guest memory (its kernel's share included).
pub fn receives_mib(runtime: Kind, memory_mib: u32) -> u64 {
    match runtime {
        Kind::Lxc => memory_mib as u64,
        Kind::Microvm => crate::microvm::guest_memory_mib(memory_mib),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(extra: &str) -> Manifest {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("svc.toml");
        std::fs::write(
            &f,
            format!(
                "name = \"svc\"\nversion = \"1.0.0\"\nruntime = \"lxc\"\nimage = \"builtin:busybox\"\ncommand = [\"/bin/sh\"]\n{extra}"
            ),
        )
        .unwrap();
        Manifest::load(&f).unwrap()
    }

    #[test]
    fn a_plan_holds_what_the_service_really_receives() {
        let m = manifest(
            "[resources]\nmemory_mib = 32\ncpu_quota_percent = 50\npids = 64\nvcpus = 1\n[network]\ninterface = true\naddress = \"10.0.0.2/24\"\n",
        );
        let c = Plan::resolve(&m, Kind::Lxc, Root::Own, Some(0x1000_0000));
        assert_eq!(c.resources.receives_mib, 32);
        assert_eq!(c.idmap_base, Some(0x1000_0000));
        let port = c.port.as_ref().unwrap();
        assert_eq!(port.name, crate::supervisor::veth_name("svc"));
        assert_eq!(port.address.as_deref(), Some("10.0.0.2/24"));
        let l = c.limits();
        assert_eq!(l.memory_bytes, Some(32 << 20));
        assert_eq!(
            l.cpu_quota_us,
            Some(gatevisor_lxc::config::CPU_PERIOD_US / 2)
        );
        assert_eq!((l.pids, l.cpus), (Some(64), Some(1)));

        // A microVM receives its guest memory, and has no user namespace.
        let v = Plan::resolve(&m, Kind::Microvm, Root::Initramfs, Some(0x1000_0000));
        assert_eq!(
            v.resources.receives_mib,
            crate::microvm::MIN_GUEST_MIB.max(32)
        );
        assert_eq!(v.idmap_base, None);
        assert_eq!(v.port, c.port, "the same port whatever the runtime");

        // Without an interface: no port.
        let m = manifest("[resources]\nmemory_mib = 32\n[network]\ninterface = false\n");
        assert_eq!(Plan::resolve(&m, Kind::Lxc, Root::Own, None).port, None);
    }

    #[test]
    fn a_version_1_record_gets_the_plan_its_install_would_have_made() {
        let m = manifest("[resources]\nmemory_mib = 32\n");
        let p = Plan::of_version_1(&m, Kind::Lxc, Some("1.0.0"), Some(7));
        assert_eq!(
            p.root,
            Root::Checkout {
                version: "1.0.0".into()
            }
        );
        assert_eq!(
            Plan::of_version_1(&m, Kind::Lxc, None, None).root,
            Root::Own
        );
        assert_eq!(
            Plan::of_version_1(&m, Kind::Microvm, Some("1.0.0"), None).root,
            Root::Initramfs
        );
        // It round-trips as the state document stores it.
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), p);
    }
}
