//! Containers through liblxc: each runs under its own `gatevisor monitor` process, which
//! starts it in the foreground, pumps its output into the rotated log and records its end.

use std::time::Duration;

use gatevisor_lxc as lxc;

use super::{Backend, Kind, RuntimeError, StartSpec, Started, Stopped, Usage};

/// The liblxc runtime as a [`Backend`].
pub struct LxcBackend(pub lxc::Runtime);

impl Backend for LxcBackend {
    fn kind(&self) -> Kind {
        Kind::Lxc
    }

    fn start(&self, name: &str, spec: &StartSpec) -> Result<Started, RuntimeError> {
        let s = self.0.start(name, &spec.argv, &spec.files, spec.timeout)?;
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
