//! Containers through liblxc: each runs under its own `gatevisor monitor` process, which
//! starts it in the foreground, pumps its output into the rotated log and records its end.

use std::time::Duration;

use gatevisor_lxc as lxc;

use super::{Backend, Definition, Image, Kind, RuntimeError, StartSpec, Started, Stopped, Usage};

/// The liblxc runtime as a [`Backend`].
pub struct LxcBackend(pub lxc::Runtime);

impl Backend for LxcBackend {
    fn kind(&self) -> Kind {
        Kind::Lxc
    }

    fn prepare(&self, def: &Definition) -> Result<(), RuntimeError> {
        let (m, plan) = (def.manifest, def.plan);
        let Image::Tree { rootfs, disk_image } = &def.image else {
            return Err(RuntimeError::Refused {
                field: "image",
                problem: "a container runs a root tree, not an initramfs".into(),
            });
        };
        let socket = format!(
            "{}/{}",
            crate::verdict::CONTAINER_DIR,
            crate::verdict::SOCKET_NAME
        );
        let spec = lxc::ContainerSpec {
            name: m.name.clone(),
            hostname: m.name.clone(),
            rootfs: rootfs.clone(),
            disk_image: disk_image.clone(),
            env: m
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain(
                    def.control_dir
                        .is_some()
                        .then(|| ("GATEVISOR_VERDICT_SOCKET".to_string(), socket)),
                )
                .collect(),
            limits: plan.limits(),
            capabilities: def.caps.clone(),
            veth_host: plan.port.as_ref().map(|p| p.name.clone()),
            ipv4_address: plan.port.as_ref().and_then(|p| p.address.clone()),
            mac: plan.port.as_ref().map(|p| p.mac.clone()),
            seccomp_profile: lxc::default_seccomp_profile(),
            apparmor_profile: lxc::apparmor_profile(),
            bind_dirs: def
                .control_dir
                .iter()
                .map(|d| (d.clone(), crate::verdict::CONTAINER_DIR.to_string()))
                .collect(),
            idmap: plan.idmap(),
            user: plan.user.map(|u| (u.uid, u.gid)),
            cwd: m.workdir.clone(),
            stop_signal: m
                .stop_signal
                .as_deref()
                .and_then(|s| crate::manifest::parse_signal(s).ok())
                .map(|s| s.as_str().to_string()),
        };
        Ok(self.0.define(&spec)?)
    }

    fn start(&self, name: &str, spec: &StartSpec) -> Result<Started, RuntimeError> {
        let s = self.0.start(name, &spec.argv, &spec.files, spec.timeout)?;
        // A veth leaves TCP and UDP checksums to the hardware, which a userspace datapath
        // does not fill in: the container's frames would reach the LAN broken.
        if spec.full_checksums {
            if let Err(e) = gatevisor_board::links::tx_checksum_off(s.init_pid, "eth0") {
                tracing::warn!("{name}: cannot turn off eth0's checksum offload: {e}");
            }
        }
        Ok(Started {
            main_pid: s.init_pid,
            monitor_pid: s.monitor.id() as i32,
            monitor: Some(s.monitor),
        })
    }

    fn stop(&self, name: &str, grace: Duration) -> Result<Stopped, RuntimeError> {
        Ok(self.0.stop(name, grace)?)
    }

    fn kill(&self, name: &str) -> Result<(), RuntimeError> {
        match self.0.stop(name, Duration::ZERO)? {
            Stopped::WasNotRunning => Err(RuntimeError::NotRunning { name: name.into() }),
            _ => Ok(()),
        }
    }

    fn pause(&self, name: &str) -> Result<(), RuntimeError> {
        Ok(self.0.freeze(name)?)
    }

    fn resume(&self, name: &str) -> Result<(), RuntimeError> {
        Ok(self.0.thaw(name)?)
    }

    fn main_pid(&self, name: &str) -> Option<i32> {
        self.0.init_pid(name).ok().flatten()
    }

    fn monitor_pid(&self, _name: &str, main_pid: i32) -> Option<i32> {
        // The container's init is a child of its monitor.
        crate::proc::ppid(main_pid).filter(|p| *p > 1)
    }

    fn usage(&self, name: &str) -> Option<Usage> {
        self.0.usage(name).ok()
    }

    fn exec(&self, name: &str, argv: &[String]) -> Result<i32, RuntimeError> {
        Ok(self.0.exec(name, argv)?)
    }

    fn tcp_listening(&self, name: &str, port: u16) -> bool {
        self.main_pid(name)
            .is_some_and(|pid| super::tcp_accepts_in_netns(pid, port))
    }

    fn undefine(&self, name: &str) -> Result<(), RuntimeError> {
        Ok(self.0.undefine(name)?)
    }

    fn unrecorded_end(&self) -> &'static str {
        "its monitor process ended without an exit record"
    }
}
