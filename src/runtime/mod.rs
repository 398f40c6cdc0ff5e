//! Runtime backends: how a service is defined from its plan, and how its processes are
//! started, stopped, watched and measured.
//!
//! The supervisor decides and a [`Backend`] does; the supervisor never asks which backend it
//! talks to. A record's plan holds its [`Kind`], and [`Backends`] hands out the backend for
//! it. The supervisor materialises a service's image and hands it over as a [`Definition`]
//! (`prepare`); a remote placement or a snapshot restore is meant to be one more backend.
//! Backends are shared with worker threads (a start that waits for init, a stop's grace
//! period, a health check), so they are `Send + Sync` and keep no per-call state of their own.
//!
//! - [`lxc`]: liblxc containers under a `gatevisor monitor` process each;
//! - [`crate::microvm::MicrovmRuntime`]: one `gatevisor vmm` process per microVM;
//! - `fake` (tests only): real child processes (`sleep`) that stand in for services in unit tests.

use std::process::Child;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod cgroup;
#[cfg(test)]
pub mod fake;
pub mod lxc;
pub mod microvm;

/// The runtime a service was installed with (`auto` resolved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Lxc,
    Microvm,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Lxc => "lxc",
            Kind::Microvm => "microvm",
        }
    }

    /// The kind named `s` (`lxc`, `microvm`).
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "lxc" => Some(Kind::Lxc),
            "microvm" => Some(Kind::Microvm),
            _ => None,
        }
    }

    /// How TR-181 `ExecEnv.{i}.Type` names it.
    pub fn description(self) -> &'static str {
        match self {
            Kind::Lxc => "Linux Container (LXC)",
            Kind::Microvm => "gatevisor KVM microVM",
        }
    }

    /// The runtimes a board can run services with.
    pub fn available(board: &gatevisor_board::BoardReport) -> Vec<Kind> {
        let mut v = vec![Kind::Lxc];
        if board.kvm.microvm_capable {
            v.push(Kind::Microvm);
        }
        v
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a service is defined from, at install and at a version switch (never while it
/// runs): its manifest and plan, its directory, and its image as the supervisor made it there.
pub struct Definition<'a> {
    pub manifest: &'a crate::manifest::Manifest,
    pub plan: &'a crate::plan::Plan,
    /// The service's directory (its root tree, initramfs or scratch disk live here).
    pub dir: &'a std::path::Path,
    pub image: Image,
    /// The capabilities the manifest grants (a container's bounding set).
    pub caps: Vec<caps::Capability>,
    /// The host directory of its control channel (the verdict socket), when it has one; it
    /// exists and belongs to the service's root.
    pub control_dir: Option<std::path::PathBuf>,
    /// Where its end is recorded.
    pub exit_file: std::path::PathBuf,
}

/// A service's image as the supervisor materialised it.
pub enum Image {
    /// A container's root tree, and the ext4 image it runs from when its disk is limited.
    Tree {
        rootfs: std::path::PathBuf,
        disk_image: Option<std::path::PathBuf>,
    },
    /// A microVM's initramfs (the service's tree as an archive).
    Initramfs(std::path::PathBuf),
}

/// What a start needs beyond the service's definition (written at install).
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub argv: Vec<String>,
    /// Where the service's exit record and (rotated) log go.
    pub files: gatevisor_lxc::RunFiles,
    /// How long to wait until the service's first process runs.
    pub timeout: Duration,
    /// The host-side interface the backend creates for the service (a microVM's tap; a
    /// container's veth is made by liblxc from its definition).
    pub interface: Option<String>,
    /// The service's resource limits (a container's are in its definition too; a microVM's
    /// VMM gets a cgroup with them at each start).
    pub limits: gatevisor_lxc::Limits,
    /// The bridge forwards frames as they are (a userspace datapath): the service's
    /// interface must fill in its own checksums.
    pub full_checksums: bool,
}

/// A service that runs.
#[derive(Debug)]
pub struct Started {
    /// The process whose life is the service's: a container's init, a microVM's VMM.
    pub main_pid: i32,
    /// The process that records how the service ended (a container's monitor; the VMM).
    pub monitor_pid: i32,
    /// The monitor when it is this daemon's child (it must be reaped).
    pub monitor: Option<Child>,
}

/// How a stop ended, and what a running service uses: the same for every runtime.
pub use gatevisor_lxc::{Stopped, Usage};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Lxc(#[from] gatevisor_lxc::LxcError),
    #[error("microVM {name}: {what}")]
    Vm {
        name: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{name} is not running")]
    NotRunning { name: String },
    #[error("{name}: {reason}")]
    Failed { name: String, reason: String },
    /// The service cannot be defined as its manifest says on this gateway (`field`: the
    /// manifest field at fault).
    #[error("field `{field}`: {problem}")]
    Refused {
        field: &'static str,
        problem: String,
    },
}

/// A runtime. Every method may be called from any thread; `start` and `stop` may block for
/// as long as their timeouts, so the supervisor calls them on workers.
pub trait Backend: Send + Sync {
    fn kind(&self) -> Kind;
    /// Defines the service from its plan and materialised image (what `start` runs).
    fn prepare(&self, def: &Definition) -> Result<(), RuntimeError>;
    /// Starts the defined service and returns once its first process runs.
    fn start(&self, name: &str, spec: &StartSpec) -> Result<Started, RuntimeError>;
    /// Asks the service to end, and ends it after `grace`.
    fn stop(&self, name: &str, grace: Duration) -> Result<Stopped, RuntimeError>;
    /// Ends the service now (a hung service); its monitor records the end.
    fn kill(&self, name: &str) -> Result<(), RuntimeError>;
    fn pause(&self, name: &str) -> Result<(), RuntimeError>;
    fn resume(&self, name: &str) -> Result<(), RuntimeError>;
    /// The main process of the running service (see [`Started::main_pid`]).
    fn main_pid(&self, name: &str) -> Option<i32>;
    /// Its monitor, given the main process (for re-adoption after a daemon restart); the
    /// main process records its own end unless the backend says otherwise.
    fn monitor_pid(&self, _name: &str, main_pid: i32) -> Option<i32> {
        Some(main_pid)
    }
    fn usage(&self, name: &str) -> Option<Usage>;
    /// The limits the backend enforces for a service with `plan` (a VMM's cgroup holds the
    /// guest's memory and the VMM's own).
    fn enforced_limits(&self, plan: &crate::plan::Plan) -> gatevisor_lxc::Limits {
        plan.limits()
    }
    /// The socket that carries the service's console, for a backend that has one (a
    /// microVM's serial console); a container's output is its log, its shell `exec`.
    fn console(&self, _name: &str) -> Option<std::path::PathBuf> {
        None
    }
    /// Runs `argv` inside the running service; its exit code.
    fn exec(&self, name: &str, argv: &[String]) -> Result<i32, RuntimeError>;
    /// Whether something inside the service accepts on TCP `port`.
    fn tcp_listening(&self, name: &str, port: u16) -> bool;
    /// Forgets the service's definition (it must be stopped).
    fn undefine(&self, name: &str) -> Result<(), RuntimeError>;
    /// How the end of a service that left no exit record is told.
    fn unrecorded_end(&self) -> &'static str;
}

/// One backend per runtime kind.
#[derive(Clone)]
pub struct Backends {
    pub lxc: Arc<dyn Backend>,
    pub microvm: Arc<dyn Backend>,
}

impl Backends {
    pub fn get(&self, kind: Kind) -> &Arc<dyn Backend> {
        match kind {
            Kind::Lxc => &self.lxc,
            Kind::Microvm => &self.microvm,
        }
    }
}

/// Does something accept TCP connections on `port` (loopback) inside the network namespace
/// of `pid`? Asked from a short-lived thread that enters that namespace.
pub fn tcp_accepts_in_netns(pid: i32, port: u16) -> bool {
    let ns = format!("/proc/{pid}/ns/net");
    std::thread::spawn(move || {
        let Ok(f) = std::fs::File::open(&ns) else {
            return false;
        };
        if nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).is_err() {
            return false;
        }
        std::net::TcpStream::connect_timeout(
            &([127, 0, 0, 1], port).into(),
            Duration::from_millis(300),
        )
        .is_ok()
    })
    .join()
    .unwrap_or(false)
}
