//! The supervisor's side of flowbridge: which Open vSwitch to use, the bridge, and each
//! service's port and steering flows.
//!
//! - A system Open vSwitch (its database socket answers) is used as it is; gatevisor touches
//!   only the bridge it was told to use, the ports it added and the flows carrying its cookies.
//! - Otherwise gatevisor runs its own private switch under `STATE/ovs` (the embedded default).
//!   The private switch follows the services: left running when the daemon exits and leaves
//!   services running (so their traffic keeps flowing and the next daemon re-attaches without
//!   a blip), stopped when the services are stopped.
//! - A service's host-side interface is (re)added to the bridge each time it starts and removed
//!   when it ends, in separate transactions (re-creating a same-named veth and swapping the port
//!   in one transaction left it unable to receive on this OVS).

use std::path::{Path, PathBuf};
use std::time::Duration;

use flowbridge::controller::{Controller, Counters, FailureMode};
use flowbridge::ofconn::OfError;
use flowbridge::ovsdb::{Ovsdb, OvsdbError};
use flowbridge::private::{PrivateError, PrivateOvs};
use flowbridge::steering::Policy;

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("Open vSwitch is not installed and no system instance runs (apt-get install openvswitch-switch)")]
    NoSwitch,
    #[error(transparent)]
    Private(#[from] PrivateError),
    #[error(transparent)]
    Ovsdb(#[from] OvsdbError),
    #[error(transparent)]
    OpenFlow(#[from] OfError),
    #[error("ovs-vswitchd could not open port {port} (is the interface gone?)")]
    NoOfport { port: String },
}

pub struct Network {
    pub bridge: String,
    pub datapath_type: String,
    db_socket: PathBuf,
    private: Option<PrivateOvs>,
    ctl: Controller,
}

const SYSTEM_RUNDIR: &str = "/var/run/openvswitch";

/// The unixctl socket of the system `ovs-vswitchd` (`ovs-vswitchd.PID.ctl`).
fn system_vswitchd_ctl() -> Option<PathBuf> {
    let pid = std::fs::read_to_string(Path::new(SYSTEM_RUNDIR).join("ovs-vswitchd.pid")).ok()?;
    let p = Path::new(SYSTEM_RUNDIR).join(format!("ovs-vswitchd.{}.ctl", pid.trim()));
    p.exists().then_some(p)
}

/// Whether the system `ovs-vswitchd` runs in another network namespace than this daemon: it
/// could not open the interfaces the daemon and its services create here (the demo gateway
/// runs in a namespace of its own), so the daemon runs its private switch instead.
fn system_switch_elsewhere() -> bool {
    let Some(pid) = std::fs::read_to_string(Path::new(SYSTEM_RUNDIR).join("ovs-vswitchd.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return false;
    };
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net")).ok();
    match (ns("self"), ns(&pid.to_string())) {
        (Some(mine), Some(theirs)) => mine != theirs,
        _ => false,
    }
}

impl Network {
    /// Connects to the system switch (`system_db`) or starts/re-attaches the private one under
    /// `private_dir`, makes sure `bridge` exists, and installs the base pipeline.
    pub fn start(
        system_db: Option<&Path>,
        private_dir: &Path,
        bridge: &str,
        datapath_type: &str,
    ) -> Result<Network, NetworkError> {
        let system_db = system_db.filter(|_| {
            let elsewhere = system_switch_elsewhere();
            if elsewhere {
                tracing::info!(
                    "the system Open vSwitch runs in another network namespace; using a private one"
                );
            }
            !elsewhere
        });
        let (private, db_socket, mgmt_socket, vswitchd_ctl) = match system_db {
            Some(db) => (
                None,
                db.to_path_buf(),
                Path::new(SYSTEM_RUNDIR).join(format!("{bridge}.mgmt")),
                system_vswitchd_ctl(),
            ),
            None => {
                if gatevisor_board::ovs::find_sbin("ovs-vswitchd").is_none() {
                    return Err(NetworkError::NoSwitch);
                }
                // A switch that has to start forwards nothing until the flows are in.
                let p = PrivateOvs::attach_or_start(private_dir, true)?;
                let (db, mgmt, ctl) = (p.db_socket(), p.mgmt_socket(bridge), p.vswitchd_ctl());
                (Some(p), db, mgmt, Some(ctl))
            }
        };
        let mut db = Ovsdb::connect(&db_socket)?;
        db.init()?;
        db.ensure_bridge(bridge, datapath_type)?;
        db.wait_applied(Duration::from_secs(20))?;
        let mut ctl = Controller::connect(&mgmt_socket, Duration::from_secs(20))?;
        if let Some(c) = vswitchd_ctl {
            ctl = ctl.with_vswitchd_ctl(c);
        }
        Ok(Network {
            bridge: bridge.into(),
            datapath_type: datapath_type.into(),
            db_socket,
            private,
            ctl,
        })
    }

    pub fn is_private(&self) -> bool {
        self.private.is_some()
    }

    /// Records the policies and failure mode of a service that does not run (a `closed`
    /// service's class is dropped until it runs).
    pub fn register(
        &mut self,
        id: u32,
        policies: &[Policy],
        mode: FailureMode,
    ) -> Result<(), NetworkError> {
        // Port 0 until plugged: no flow refers to it while the service is inactive.
        self.ctl.add_service(id, 0, policies.to_vec(), mode)?;
        Ok(())
    }

    /// Plugs the service's interface into the bridge (unless it is there: a re-adopted
    /// service keeps its port) and steers to it when it is `ready`; until then its failure
    /// mode applies. Its own frames must carry `mac` when that is known. Flows already on
    /// the switch that are right stay untouched.
    #[allow(clippy::too_many_arguments)]
    pub fn plug(
        &mut self,
        id: u32,
        port: &str,
        service: &str,
        policies: &[Policy],
        mode: FailureMode,
        ready: bool,
        mac: Option<[u8; 6]>,
    ) -> Result<u32, NetworkError> {
        let mut db = Ovsdb::connect(&self.db_socket)?;
        if !db.ports(&self.bridge)?.iter().any(|p| p.name == port) {
            db.add_port(&self.bridge, port, service)?;
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let ofport = loop {
            if let Some(n) = db
                .ports(&self.bridge)?
                .iter()
                .find(|p| p.name == port)
                .and_then(|p| p.ofport)
            {
                break n as u32;
            }
            if std::time::Instant::now() > deadline {
                return Err(NetworkError::NoOfport { port: port.into() });
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.ctl
            .set_service(id, ofport, policies.to_vec(), mode, ready, mac)?;
        Ok(ofport)
    }

    /// The plugged service said it is ready: steer to it.
    pub fn activate(&mut self, id: u32) -> Result<(), NetworkError> {
        Ok(self.ctl.activate(id)?)
    }

    /// Whether service `id` is steered to now.
    pub fn is_active(&self, id: u32) -> bool {
        self.ctl.is_active(id)
    }

    /// Whether service `id` has a port on the bridge.
    pub fn is_plugged(&self, id: u32) -> bool {
        self.ctl.port_of(id).is_some_and(|p| p != 0)
    }

    /// After a daemon restart, once every service is registered or plugged: flows of services
    /// that no longer exist go.
    pub fn prune(&mut self) -> Result<(), NetworkError> {
        Ok(self.ctl.prune()?)
    }

    /// Every service is registered or plugged: a private switch that was started holding
    /// (`flow-restore-wait`) may forward now, with all flows in place.
    pub fn release(&mut self) -> Result<(), NetworkError> {
        if self.private.is_some() {
            let mut db = Ovsdb::connect(&self.db_socket)?;
            if db.flow_restore_wait()? {
                db.set_flow_restore_wait(false)?;
            }
        }
        Ok(())
    }

    /// The service ended: its class fails open or closed at once, then its port is removed
    /// and no flow refers to its number any more.
    pub fn unplug(&mut self, id: u32, port: &str) -> Result<(), NetworkError> {
        self.ctl.deactivate(id)?;
        let mut db = Ovsdb::connect(&self.db_socket)?;
        db.del_port(&self.bridge, port)?;
        self.ctl.port_gone(id)?;
        Ok(())
    }

    /// The service is removed: all its flows and its port go.
    pub fn forget(&mut self, id: u32, port: &str) -> Result<(), NetworkError> {
        self.ctl.remove_service(id)?;
        let mut db = Ovsdb::connect(&self.db_socket)?;
        db.del_port(&self.bridge, port)?;
        Ok(())
    }

    /// A verdict from service `id`'s verdict API; false when the service is not active.
    pub fn session_verdict(
        &mut self,
        id: u32,
        session: &flowbridge::steering::Session,
        allow: bool,
    ) -> Result<bool, NetworkError> {
        Ok(self.ctl.session_verdict(id, session, allow)?)
    }

    pub fn counters(&mut self, id: u32) -> Result<Counters, NetworkError> {
        Ok(self.ctl.counters(id)?)
    }

    /// Bytes the base pipeline forwarded (the bridge's fast path).
    pub fn fast_path_bytes(&mut self) -> Result<u64, NetworkError> {
        Ok(self.ctl.fast_path_bytes()?)
    }

    pub fn flows(&mut self) -> Result<Vec<flowbridge::ofp::FlowStats>, NetworkError> {
        Ok(self.ctl.dump()?)
    }

    /// Whether the switch is as it should be: a private switch's daemons run, and it answers
    /// the controller. Cheap enough for the supervisor loop (no restart, one echo);
    /// [`Self::check`] restores what is not.
    /// The private switch's daemons' process ids (none for the system switch, which is not
    /// ours to watch).
    pub fn switch_pids(&self) -> Vec<i32> {
        self.private.as_ref().map(|p| p.pids()).unwrap_or_default()
    }

    pub fn healthy(&mut self) -> bool {
        self.private.as_mut().is_none_or(|p| p.all_running()) && self.ctl.alive()
    }

    /// Restores the flows if the switch restarted (its OpenFlow connection broke).
    ///
    /// A private switch is supervised here: the daemon that died is restarted alone (reaped,
    /// its pid file removed), `ovs-vswitchd` with `flow-restore-wait`, so it forwards nothing
    /// until every flow is back; then the flag is cleared. During the gap the userspace
    /// datapath forwards nothing at all (fail-open services lose their class with everything
    /// else, fail-closed ones stay closed); the kernel datapath keeps its cached flows, which
    /// still carry the old pipeline.
    pub fn check(&mut self) -> Result<bool, NetworkError> {
        let restarted = match self.private.as_mut() {
            Some(p) => p.restart_dead(true, false)?,
            None => Default::default(),
        };
        if !restarted.vswitchd && self.ctl.alive() {
            if restarted.ovsdb_server {
                tracing::warn!("the private ovsdb-server had ended; restarted it");
            }
            return Ok(false);
        }
        // The switch stopped answering: a private one that runs but hangs is killed and
        // started again.
        if !restarted.vswitchd {
            if let Some(p) = self.private.as_mut() {
                p.restart_dead(true, true)?;
            }
        }
        tracing::warn!("Open vSwitch connection lost; reconnecting and restoring flows");
        let mut db = Ovsdb::connect(&self.db_socket)?;
        db.ensure_bridge(&self.bridge, &self.datapath_type)?;
        db.wait_applied(Duration::from_secs(20))?;
        self.ctl.resync(Duration::from_secs(20))?;
        self.release()?;
        Ok(true)
    }

    /// Watches the bridge's interfaces on a thread of its own (its own OVSDB connection,
    /// re-established if the database restarts) and reports ports that disappear or break.
    pub fn spawn_port_monitor(
        &self,
        on_change: impl Fn(flowbridge::ovsdb::PortChange) -> bool + Send + 'static,
    ) -> std::io::Result<()> {
        let db = self.db_socket.clone();
        std::thread::Builder::new()
            .name("ovsdb-monitor".into())
            .stack_size(256 * 1024)
            .spawn(move || loop {
                let mut stopped = false;
                if let Ok(c) = Ovsdb::connect(&db) {
                    let _ = c.monitor_interfaces(|change| {
                        stopped = !on_change(change);
                        !stopped
                    });
                }
                if stopped {
                    return;
                }
                std::thread::sleep(Duration::from_secs(1));
            })
            .map(|_| ())
    }

    /// Daemon exit: keep the private switch running when services keep running.
    pub fn shutdown(self, services_keep_running: bool) {
        if let Some(p) = self.private {
            if services_keep_running {
                p.leave_running();
            }
        }
    }
}

/// The stable, locally administered MAC of service `name`'s interface (a container's eth0, a
/// microVM's virtio-net): 02:47:56 ("GV") and three bytes of a hash of the name. Steering
/// lets the service's own frames out only with this source.
pub fn service_mac(name: &str) -> [u8; 6] {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    [0x02, 0x47, 0x56, (h >> 16) as u8, (h >> 8) as u8, h as u8]
}

pub use flowbridge::ofp::mac_text;
