//! microVMs: one `gatevisor vmm` process per service, which is both the service's main
//! process and its monitor (it records how the guest ended). Health checks and graceful
//! stops go to the guest's init over vsock.

use std::time::Duration;

use crate::microvm::MicrovmRuntime;

use super::{Backend, Kind, RuntimeError, StartSpec, Started, Stopped, Usage};

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
        let child =
            MicrovmRuntime::start(self, name, &spec.files.log_file, tap).map_err(|source| {
                RuntimeError::Vm {
                    name: name.into(),
                    what: "cannot start its VMM",
                    source,
                }
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

    fn monitor_pid(&self, _name: &str, main_pid: i32) -> Option<i32> {
        Some(main_pid)
    }

    fn usage(&self, name: &str) -> Option<Usage> {
        // The VMM's resident set (guest pages it touched included) and its CPU time (the
        // vCPU threads' included).
        let pid = self.pid(name)?;
        Some(Usage {
            memory_bytes: self.rss_bytes(name),
            cpu_usec: crate::proc::cpu_usec(pid),
            pids: None,
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
        Ok(())
    }

    fn unrecorded_end(&self) -> &'static str {
        "killed (its VMM ended without recording how)"
    }
}
