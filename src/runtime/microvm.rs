//! microVMs: one `gatevisor vmm` process per service, which is both the service's main
//! process and its monitor (it records how the guest ended). Health checks and graceful
//! stops go to the guest's init over vsock.

use std::time::Duration;

use crate::microvm::MicrovmRuntime;

use super::{Backend, Definition, Image, Kind, RuntimeError, StartSpec, Started, Stopped, Usage};

impl MicrovmRuntime {
    fn running_pid(&self, name: &str) -> Result<i32, RuntimeError> {
        self.pid(name)
            .ok_or_else(|| RuntimeError::NotRunning { name: name.into() })
    }

    fn send(&self, name: &str, sig: i32, what: &'static str) -> Result<(), RuntimeError> {
        let pid = self.running_pid(name)?;
        // SAFETY: kill(2) of the VMM this runtime started (pid() checked its command line).
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(RuntimeError::Vm {
                name: name.into(),
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl Backend for MicrovmRuntime {
    fn kind(&self) -> Kind {
        Kind::Microvm
    }

    /// Copies the initramfs (with the guest init's archive appended) and writes the VM's
    /// configuration.
    fn prepare(&self, def: &Definition) -> Result<(), RuntimeError> {
        let (m, plan, dir) = (def.manifest, def.plan, def.dir);
        let Image::Initramfs(initramfs) = &def.image else {
            return Err(RuntimeError::Refused {
                field: "image",
                problem: "a microVM boots an initramfs, not a root tree".into(),
            });
        };
        let io = |what: &'static str| {
            let name = m.name.clone();
            move |source| RuntimeError::Vm { name, what, source }
        };
        let initrd = dir.join("initramfs.cpio");
        let kernel = m
            .microvm
            .kernel
            .clone()
            .unwrap_or_else(crate::microvm::MicrovmRuntime::default_kernel);
        if !kernel.is_file() {
            return Err(RuntimeError::Refused {
                field: "microvm.kernel",
                problem: format!("{} does not exist on this gateway", kernel.display()),
            });
        }
        // With gatevisor's guest init (the usual case), the service's initramfs gets a second
        // archive: the init, and the virtio modules of the gateway's kernel when the guest
        // runs that kernel. The init runs the service, and answers the control port (vsock)
        // through which stop powers the guest off gracefully.
        let guest_init = crate::microvm::guest_init();
        let modules_of = m
            .microvm
            .kernel
            .is_none()
            .then(crate::microvm::running_kernel_modules);
        let (cmdline, vsock) = match &guest_init {
            Some(init) => {
                let mut env: Vec<(String, String)> =
                    m.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
                if plan.control_channel {
                    // The service reaches its verdict socket over vsock: the VMM maps guest
                    // connections to host port P onto `<vsock>_P`, a link to the socket.
                    env.push((
                        "GATEVISOR_VERDICT_SOCKET".into(),
                        format!("vsock:2:{}", crate::microvm::VERDICT_PORT),
                    ));
                    let link = self.vsock_port_path(&m.name, crate::microvm::VERDICT_PORT);
                    let _ = std::fs::remove_file(&link);
                    if let Some(control) = &def.control_dir {
                        std::os::unix::fs::symlink(
                            control.join(crate::verdict::SOCKET_NAME),
                            &link,
                        )
                        .map_err(io("cannot link its verdict socket"))?;
                    }
                }
                crate::microvm::initramfs_with_init(
                    initramfs,
                    init,
                    modules_of.as_deref(),
                    &env,
                    &initrd,
                )
                .map_err(io("cannot write its initramfs"))?;
                let mut c = format!(
                    "{} {} rdinit={} gatevisor.grace_s={}",
                    crate::microvm::BASE_CMDLINE,
                    m.microvm.cmdline,
                    crate::microvm::GUEST_INIT_PATH,
                    m.stop_timeout_s
                );
                if let Some(a) = plan.port.as_ref().and_then(|p| p.address.as_ref()) {
                    c.push_str(&format!(" gatevisor.ip={a}"));
                }
                c.push_str(" -- ");
                c.push_str(&m.command.join(" "));
                let vsock = gatevisor_vmm::vm::VsockConfig {
                    guest_cid: crate::microvm::GUEST_CID,
                    uds_path: self.vsock_path(&m.name),
                };
                (c, Some(vsock))
            }
            None => {
                let needs_init = [
                    ("network.address", m.network.address.is_some()),
                    ("network.steering", !m.network.steering.is_empty()),
                    ("settings", !m.settings.is_empty()),
                    ("health.exec", m.health.exec.is_some()),
                    ("health.tcp_port", m.health.tcp_port.is_some()),
                    ("env", !m.env.is_empty()),
                ];
                if let Some((field, _)) = needs_init.iter().find(|(_, set)| *set) {
                    return Err(RuntimeError::Refused {
                        field,
                        problem: "a microVM needs gatevisor-guest-init for it, which is not installed on this gateway".into(),
                    });
                }
                std::fs::copy(initramfs, &initrd).map_err(io("cannot copy its initramfs"))?;
                let mut c = format!(
                    "{} {} rdinit={}",
                    crate::microvm::BASE_CMDLINE,
                    m.microvm.cmdline,
                    m.command[0]
                );
                if m.command.len() > 1 {
                    c.push_str(" -- ");
                    c.push_str(&m.command[1..].join(" "));
                }
                (c, None)
            }
        };
        let cfg = gatevisor_vmm::VmConfig {
            boot: gatevisor_vmm::Boot::Linux {
                kernel,
                initrd: Some(initrd),
                cmdline,
            },
            // A Linux guest needs room for its own kernel beyond the service's budget.
            memory_mib: plan.resources.receives_mib,
            vcpus: plan.resources.vcpus as u8,
            // The console goes to the VMM's stdout, which a log pump rotates into the log.
            console_log: None,
            console_rate: crate::microvm::CONSOLE_RATE,
            console_socket: Some(self.console_path(&m.name)),
            control_socket: Some(self.control_path(&m.name)),
            exit_file: Some(def.exit_file.clone()),
            // The tap is created at each start and handed over as TAP_FD.
            net: plan
                .port
                .iter()
                .map(|p| gatevisor_vmm::vm::NetConfig {
                    tap: None,
                    tap_fd: Some(crate::microvm::TAP_FD),
                    mac: p.mac.clone(),
                })
                .collect(),
            // `resources.disk_mib`: a sparse scratch disk (/dev/vda), kept across restarts.
            disk: match plan.resources.disk_mib {
                Some(mib) => {
                    let path = dir.join("disk.img");
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)
                        .map_err(io("cannot create its scratch disk"))?;
                    f.set_len(mib as u64 * 1024 * 1024)
                        .map_err(io("cannot size its scratch disk"))?;
                    vec![gatevisor_vmm::vm::DiskConfig {
                        path,
                        read_only: false,
                    }]
                }
                None => vec![],
            },
            vsock,
        };
        self.define(&m.name, &cfg)
            .map_err(io("cannot write its configuration"))
    }

    fn start(&self, name: &str, spec: &StartSpec) -> Result<Started, RuntimeError> {
        if self.pid(name).is_some() {
            return Err(RuntimeError::Failed {
                name: name.into(),
                reason: "its VMM is already running".into(),
            });
        }
        let _ = std::fs::remove_file(&spec.files.exit_file);
        let tap = match &spec.interface {
            Some(ifname) => {
                Some(
                    crate::microvm::create_tap(ifname).map_err(|source| RuntimeError::Vm {
                        name: name.into(),
                        what: "cannot create its tap",
                        source,
                    })?,
                )
            }
            None => None,
        };
        let cgroup = super::cgroup::VmCgroup::of(name, self.cgroups);
        cgroup
            .create(&vm_limits(&spec.limits))
            .map_err(|source| RuntimeError::Vm {
                name: name.into(),
                what: "cannot make its cgroup",
                source,
            })?;
        let child = MicrovmRuntime::start(self, name, &spec.files, tap, cgroup.procs_files())
            .map_err(|source| RuntimeError::Vm {
                name: name.into(),
                what: "cannot start its VMM",
                source,
            })?;
        let pid = child.id() as i32;
        Ok(Started {
            main_pid: pid,
            monitor_pid: pid,
            monitor: Some(child),
        })
    }

    fn stop(&self, name: &str, grace: Duration) -> Result<Stopped, RuntimeError> {
        Ok(MicrovmRuntime::stop(self, name, grace))
    }

    fn kill(&self, name: &str) -> Result<(), RuntimeError> {
        self.send(name, libc::SIGKILL, "cannot kill its VMM")
    }

    fn pause(&self, name: &str) -> Result<(), RuntimeError> {
        self.send(name, libc::SIGSTOP, "cannot pause its VMM")
    }

    fn resume(&self, name: &str) -> Result<(), RuntimeError> {
        self.send(name, libc::SIGCONT, "cannot resume its VMM")
    }

    fn main_pid(&self, name: &str) -> Option<i32> {
        self.pid(name)
    }

    fn enforced_limits(&self, plan: &crate::plan::Plan) -> gatevisor_lxc::Limits {
        vm_limits(&plan.limits())
    }

    fn console(&self, name: &str) -> Option<std::path::PathBuf> {
        Some(self.console_path(name))
    }

    fn usage(&self, name: &str) -> Option<Usage> {
        // The VMM's cgroup: guest pages it touched, the VMM's own memory, all its threads'
        // CPU time. Without one (a VMM started before cgroups were made), its process's.
        let pid = self.pid(name)?;
        super::cgroup::VmCgroup::of(name, self.cgroups)
            .usage()
            .or_else(|| {
                Some(Usage {
                    memory_bytes: self.rss_bytes(name),
                    cpu_usec: crate::proc::cpu_usec(pid),
                    pids: None,
                })
            })
    }

    fn exec(&self, name: &str, argv: &[String]) -> Result<i32, RuntimeError> {
        self.running_pid(name)?;
        crate::microvm::health_exec(&self.vsock_path(name), argv).map_err(|source| {
            RuntimeError::Vm {
                name: name.into(),
                what: "command in the guest",
                source,
            }
        })
    }

    fn tcp_listening(&self, name: &str, port: u16) -> bool {
        self.pid(name).is_some()
            && crate::microvm::health_tcp(&self.vsock_path(name), port).unwrap_or(false)
    }

    fn undefine(&self, name: &str) -> Result<(), RuntimeError> {
        if self.pid(name).is_some() {
            return Err(RuntimeError::Failed {
                name: name.into(),
                reason: "cannot forget a running microVM".into(),
            });
        }
        MicrovmRuntime::undefine(self, name);
        super::cgroup::VmCgroup::of(name, self.cgroups).remove();
        Ok(())
    }

    fn unrecorded_end(&self) -> &'static str {
        "killed (its VMM ended without recording how)"
    }
}

/// A VMM's cgroup limits from the service's: memory is the guest's (at least
/// [`crate::microvm::MIN_GUEST_MIB`]) plus the VMM's own; the task limit leaves room for the
/// VMM's vCPU and I/O threads.
pub fn vm_limits(service: &gatevisor_lxc::Limits) -> gatevisor_lxc::Limits {
    const MIB: u64 = 1024 * 1024;
    let vcpus = service.cpus.unwrap_or(1) as u64;
    gatevisor_lxc::Limits {
        memory_bytes: service.memory_bytes.map(|b| {
            (crate::microvm::guest_memory_mib((b / MIB) as u32) + crate::microvm::VMM_OVERHEAD_MIB)
                * MIB
        }),
        cpu_quota_us: service.cpu_quota_us,
        pids: service.pids.map(|p| p.max(vcpus + 4)),
        cpus: service.cpus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_vmm_gets_its_guests_memory_and_room_for_its_threads() {
        let service = gatevisor_lxc::Limits {
            memory_bytes: Some(32 << 20),
            cpu_quota_us: Some(50_000),
            pids: Some(2),
            cpus: Some(2),
        };
        let vm = vm_limits(&service);
        assert_eq!(vm.memory_bytes, Some((128 + 32) << 20));
        assert_eq!(vm.cpu_quota_us, Some(50_000));
        assert_eq!(vm.pids, Some(6));
        assert_eq!(vm.cpus, Some(2));
        let big = gatevisor_lxc::Limits {
            memory_bytes: Some(512 << 20),
            ..Default::default()
        };
        assert_eq!(vm_limits(&big).memory_bytes, Some((512 + 32) << 20));
        assert_eq!(vm_limits(&big).pids, None);
    }

    #[test]
    fn a_vmm_runs_in_a_cgroup_of_its_own_and_logs_through_its_pump() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped a_vmm_runs_in_a_cgroup_of_its_own_and_logs_through_its_pump: needs root (cgroups)");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        // A stand-in for the VMM: the same start path, a process that only waits.
        let exe = d.path().join("vmm");
        // (and for the log pump, which it is too: a plain copy here).
        std::fs::write(
            &exe,
            "#!/bin/sh\nif [ \"$1\" = __log-pump ]; then exec cat >> \"$2\"; fi\necho vmm-says-hello\nexec sleep 30\n",
        )
        .unwrap();
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let version = match gatevisor_board::cgroup::probe().version {
            gatevisor_board::CgroupVersion::V2 => gatevisor_lxc::Cgroups::V2,
            _ => gatevisor_lxc::Cgroups::V1,
        };
        let vms = MicrovmRuntime::new(&d.path().join("vm"), &exe, version).unwrap();
        let name = format!("t{}", std::process::id());
        let spec = StartSpec {
            argv: vec![],
            files: gatevisor_lxc::RunFiles {
                exit_file: d.path().join("exit"),
                log_file: d.path().join("log"),
                log_max_bytes: 1 << 16,
                log_keep: 1,
            },
            timeout: Duration::from_secs(5),
            interface: None,
            limits: gatevisor_lxc::Limits {
                memory_bytes: Some(64 << 20),
                cpu_quota_us: Some(25_000),
                pids: Some(16),
                cpus: Some(1),
            },
            full_checksums: false,
        };
        let mut started = Backend::start(&vms, &name, &spec).unwrap();
        // Its output reaches its log through the pump.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(d.path().join("log"))
            .unwrap_or_default()
            .contains("vmm-says-hello")
        {
            assert!(std::time::Instant::now() < deadline, "nothing in the log");
            std::thread::sleep(Duration::from_millis(20));
        }
        let cg = super::super::cgroup::VmCgroup::of(&name, version);
        let pids = cg.pids();
        let mut child = started.monitor.take().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(50));
        let usage = cg.usage();
        let root = std::path::Path::new("/sys/fs/cgroup");
        let leaf = format!("gatevisor.vm.{name}");
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap().trim().to_string();
        let limits = match version {
            gatevisor_lxc::Cgroups::V2 => (
                read(root.join(&leaf).join("memory.max")),
                read(root.join(&leaf).join("cpu.max")),
                read(root.join(&leaf).join("pids.max")),
            ),
            gatevisor_lxc::Cgroups::V1 => (
                read(
                    root.join("memory")
                        .join(&leaf)
                        .join("memory.limit_in_bytes"),
                ),
                read(root.join("cpu").join(&leaf).join("cpu.cfs_quota_us")),
                read(root.join("pids").join(&leaf).join("pids.max")),
            ),
        };
        Backend::undefine(&vms, &name).unwrap();
        assert_eq!(
            pids,
            [started.main_pid],
            "the VMM entered its cgroup before it ran"
        );
        assert!(usage.is_some());
        let memory = ((128 + crate::microvm::VMM_OVERHEAD_MIB) << 20).to_string();
        match version {
            gatevisor_lxc::Cgroups::V2 => {
                assert_eq!(limits, (memory, "25000 100000".into(), "16".into()))
            }
            gatevisor_lxc::Cgroups::V1 => {
                assert_eq!(limits, (memory, "25000".into(), "16".into()))
            }
        }
        assert!(!root.join("memory").join(&leaf).exists() && !root.join(&leaf).exists());
    }
}
