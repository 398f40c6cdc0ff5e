//! The supervisor: owns the desired state, the runtimes and the event log, handles every
//! control request, and reconciles what runs with what should run.
//!
//! It is an actor: one thread owns all state and takes [`Msg`]s from a channel (requests from
//! the API server, exits from watcher threads, reports from workers, timers from its own
//! loop), so there are no locks around service records, and it never waits on a service:
//! starts, stops, health checks and package unpacking run on worker threads that report back
//! with a generation number ([`Msg::StartDone`], [`Msg::StopDone`], [`Msg::Checked`],
//! [`Msg::PackageReady`]). Requests for one service queue behind its start or stop
//! (`queue`). Each running service's monitor process has a watcher thread blocked on its
//! pidfd, so an exit is noticed at once whether the monitor is our child or was re-adopted
//! after a daemon restart (`adopt`).
//!
//! - `actor`: the loop and the requests it answers itself; `adopt`: what the daemon finds
//!   at its start; `install`: admission, runtime choice and package installs; `build`:
//!   materialising images (a packaged container's read-only checkout) and defining
//!   containers and VMs; `lifecycle`: starts, stops, exits, restart
//!   policy; `update`: version switches and health checks; `net`: ports, flows, verdicts,
//!   heartbeats; `views`: status and logs; `decide`: the decisions that are not a lifecycle
//!   transition (hung, lost port, health probe, after a check) as pure, table-tested
//!   functions. What each service runs as is its [`crate::plan::Plan`], resolved at install.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use gatevisor_board::{AutoRuntime, BoardReport, CgroupVersion};
use gatevisor_lxc as lxc;
use serde_json::json;

use crate::api::{self, error_chain, ApiError, ErrorKind, Reply, Request};
use crate::events::{Event, EventKind, EventLog};
use crate::lifecycle::{Op, State};
use crate::manifest::{ImageRef, Manifest, RuntimeKind};
use crate::network::Network;
use crate::notify::Notifier;
use crate::plan::{Plan, Root};
use crate::proc;
use crate::runtime::{Backend, Backends, Definition, Image, Kind, RuntimeError, StartSpec};
use crate::state::{now_ms, Desired, LastExit, Running, ServiceRecord, StateDoc, Store};
use gatevisor_images::beneath::Dir;

mod actor;
mod adopt;
mod build;
mod config;
mod decide;
mod images;
mod install;
mod lifecycle;
mod net;
mod queue;
mod update;
mod views;

#[cfg(test)]
mod tests;

use build::*;
use install::*;
pub use install::{check_image_roots, is_package, ImageRootError};
pub use lifecycle::backoff;
use lifecycle::{spawn_worker, Busy};
use queue::Step;

/// Daemon settings (from `/etc/gatevisor/gatevisor.toml` and flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    /// Stop services when the daemon stops on SIGTERM (default: leave them running).
    pub stop_services_on_exit: bool,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    pub events_max_bytes: u64,
    pub start_timeout: Duration,
    /// How long a service that gave up (more failures in a row than its restart policy
    /// allows) waits before it is tried again, and again after every such give-up; `None`:
    /// it stays `failed` until someone starts it.
    pub failed_retry: Option<Duration>,
    /// How to run the per-container monitor (this binary's hidden subcommand).
    pub monitor: lxc::MonitorCommand,
    pub busybox: PathBuf,
    /// Plug services into Open vSwitch and steer their traffic.
    pub network: bool,
    /// Bridge to use instead of the board profile's.
    pub bridge: Option<String>,
    /// Trusted publisher keys (`trusted/`, `revoked/`).
    pub keys_dir: PathBuf,
    /// What services may keep (capabilities), by publisher and board.
    pub policy: crate::policy::Policy,
    /// Where local manifests' `rootfs:DIR` images may come from (checked at daemon start).
    pub image_roots: Vec<PathBuf>,
    /// How OCI registries are reached (their CAs, credentials).
    pub registries: gatevisor_images::oci::registry::Registries,
}

pub enum Msg {
    Request(Request, Sender<Reply>),
    /// An image pull's worker is done.
    ImagePulled {
        reference: String,
        result: std::result::Result<Box<gatevisor_images::oci::store::Imported>, ApiError>,
        reply: Sender<Reply>,
    },
    Follow(Sender<Event>),
    MonitorExited {
        name: String,
        generation: u64,
    },
    /// The container's init died: its traffic fails over now, before the container's teardown
    /// ends and its monitor exits.
    InitExited {
        name: String,
        generation: u64,
    },
    /// Open vSwitch reports a port gone or broken.
    PortLost {
        port: String,
    },
    /// A service said on its verdict socket that it can take its traffic.
    Ready {
        name: String,
    },
    /// A service made a host call on its control channel (`refused`: why not, if it was).
    HostCalled {
        name: String,
        call: String,
        refused: Option<&'static str>,
        micros: u64,
    },
    /// A verdict from a service's verdict API.
    Verdict {
        name: String,
        session: flowbridge::steering::Session,
        allow: bool,
        reply: Sender<std::result::Result<(), String>>,
    },
    /// A start's worker is done: the service runs, or could not be started.
    StartDone {
        name: String,
        generation: u64,
        result: std::result::Result<crate::runtime::Started, crate::runtime::RuntimeError>,
    },
    /// A stop's worker is done: the service (and its monitor) ended.
    StopDone {
        name: String,
        generation: u64,
        result: std::result::Result<crate::runtime::Stopped, crate::runtime::RuntimeError>,
    },
    /// An update's health check is done.
    Checked {
        name: String,
        generation: u64,
        result: std::result::Result<(), String>,
    },
    /// An update's worker verified the package into the image store and gave its tree to the
    /// service's container (or refused it).
    UpdateReady {
        name: String,
        pkg: PathBuf,
        old_version: String,
        result: std::result::Result<Prepared, ApiError>,
        reply: Sender<Reply>,
    },
    /// A package install's worker is done: verified into the image store and, for a
    /// container, its tree given to the container's root, or refused.
    PackageReady {
        name: String,
        start: bool,
        runtime: Option<Kind>,
        pkg: PathBuf,
        result: std::result::Result<Prepared, ApiError>,
        reply: Sender<Reply>,
    },
    /// One of the private switch's daemons ended (its pidfd said so).
    SwitchEnded,
    /// The switch was checked and restored on a worker: the network back, and whether it
    /// was restarted (or why it could not be restored).
    NetworkChecked {
        net: Box<Network>,
        result: std::result::Result<bool, String>,
    },
    Shutdown,
}

/// What a package install's worker made, off the supervisor loop.
pub struct Prepared {
    installed: gatevisor_images::store::Installed,
    /// The store had no version of this service before.
    new_entry: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("cannot create {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Lxc(#[from] lxc::LxcError),
    #[error(transparent)]
    Images(#[from] gatevisor_images::store::StoreError),
    #[error(transparent)]
    OciImages(#[from] gatevisor_images::oci::OciError),
}

/// What only this process knows about a service (not persisted).
#[derive(Default)]
struct Live {
    /// The monitor, when this daemon spawned it (so it must reap it).
    child: Option<Child>,
    pidfd: Option<OwnedFd>,
    /// Bumped whenever a watcher's report must be ignored (stop on request, restart).
    generation: u64,
    retry_at: Option<Instant>,
    /// Why the service's port or flows could not be set up, if they could not.
    net_error: Option<String>,
    /// When its port was last plugged again after vanishing (at most once per 5 s: a dying
    /// container's interface vanishes too, and re-plugging it would only break again).
    replugged_at: Option<Instant>,
    /// Verdicts received over the verdict API.
    api_verdicts: u64,
    /// The start or stop a worker runs for the service now; steps wait meanwhile.
    busy: Option<Busy>,
    /// What runs once the service is neither starting nor stopping, in order.
    queue: std::collections::VecDeque<Step>,
    /// How the last start or stop failed, for the next [`Step::Reply`].
    error: Option<ApiError>,
    /// How an update's health check ended, for its [`Step::Judge`].
    checked: Option<std::result::Result<(), String>>,
    /// Since when this daemon expects the service's heartbeat (it was started or adopted);
    /// `None` once it was killed as hung. The heartbeat itself is the verdict server's
    /// last-seen time.
    heartbeat_since: Option<Instant>,
    /// The service said `ready` since it was last started (or it was adopted running).
    said_ready: bool,
    /// The host-call audit window: its start, the calls logged in it, the calls left out.
    audit: Option<(Instant, u32, u64)>,
}

pub struct Supervisor {
    settings: Settings,
    store: Store,
    doc: StateDoc,
    events: EventLog,
    /// liblxc: where container definitions are written at install.
    rt: lxc::Runtime,
    /// microVM definitions (one `gatevisor vmm` process per running microVM).
    vms: crate::microvm::MicrovmRuntime,
    /// What starts, stops and watches services, by runtime.
    backends: Backends,
    board: BoardReport,
    live: HashMap<String, Live>,
    tx: Sender<Msg>,
    generation: u64,
    net: Option<Network>,
    /// Why there is no network, when there is none.
    net_problem: Option<String>,
    /// The switch is being restored on a worker, which holds [`Self::net`] meanwhile
    /// ([`Msg::NetworkChecked`] gives it back).
    net_restoring: bool,
    /// When the next running service's heartbeat timeout runs out (if it stays silent): the
    /// loop checks heartbeats then.
    heartbeat_due: Option<Instant>,
    /// The switch daemons' pids a watcher thread waits on (so one ending is noticed at once,
    /// not at the next check).
    switch_watched: Vec<i32>,
    /// What host calls read on this board (its profile's lease file and facts).
    host_sources: std::sync::Arc<crate::hostcall::Sources>,
    /// Verdict sockets of the services that steer traffic.
    verdict_servers: HashMap<String, crate::verdict::VerdictServer>,
    /// Signed packages, verified and unpacked.
    images: gatevisor_images::store::Store,
    /// OCI images: layers stored once, image records (shared with pull workers).
    oci: std::sync::Arc<gatevisor_images::oci::store::ImageStore>,
    /// Services whose package a worker is installing now (no second install or update of
    /// the same name meanwhile, and no store garbage collection under it).
    installing: std::collections::HashSet<String>,
    /// The service id each package install in flight will get (its worker already shifted
    /// the rootfs to that id's user namespace).
    reserved_ids: HashMap<String, u32>,
}

type Result<T> = std::result::Result<T, ApiError>;

fn err(kind: ErrorKind, msg: impl Into<String>) -> ApiError {
    ApiError::new(kind, msg)
}

fn runtime_err(e: impl std::fmt::Display) -> ApiError {
    err(ErrorKind::Runtime, e.to_string())
}

/// Host-side interface name of a service's veth.
pub fn veth_name(service: &str) -> String {
    format!("gv-{service}")
}

impl Supervisor {
    pub fn new(
        settings: Settings,
        board: BoardReport,
        tx: Sender<Msg>,
    ) -> std::result::Result<Supervisor, StartupError> {
        // Other local users may pass through the state directory (containers' roots live
        // below it) but read nothing: configurations hold services' environments, logs what
        // services print.
        for (d, mode) in [
            ("", 0o711),
            ("services", 0o711),
            ("logs", 0o700),
            ("run", 0o711),
            ("lxc", 0o711),
        ] {
            let path = settings.state_dir.join(d);
            std::fs::create_dir_all(&path)
                .and_then(|()| {
                    std::fs::set_permissions(
                        &path,
                        std::os::unix::fs::PermissionsExt::from_mode(mode),
                    )
                })
                .map_err(|source| StartupError::CreateDir { path, source })?;
        }
        let store = Store::new(&settings.state_dir);
        let doc = store.load()?;
        let cgroups = match board.cgroup.version {
            CgroupVersion::V2 => lxc::Cgroups::V2,
            _ => lxc::Cgroups::V1,
        };
        let rt = lxc::Runtime::new(
            &settings.state_dir.join("lxc"),
            cgroups,
            settings.monitor.clone(),
        )?;
        let vms = crate::microvm::MicrovmRuntime::new(
            &settings.state_dir.join("vm"),
            &settings.monitor.program,
            cgroups,
        )
        .map_err(|source| StartupError::CreateDir {
            path: settings.state_dir.join("vm"),
            source,
        })?;
        let events = EventLog::new(&settings.state_dir, settings.events_max_bytes);
        let images = gatevisor_images::store::Store::open(
            &settings.state_dir.join("images"),
            gatevisor_images::keys::TrustStore::new(&settings.keys_dir),
            gatevisor_images::package::Limits::default(),
        )?;
        let oci = std::sync::Arc::new(
            gatevisor_images::oci::store::ImageStore::open(
                &settings.state_dir.join("images"),
                gatevisor_images::keys::TrustStore::new(&settings.keys_dir),
                gatevisor_images::oci::layer::Rules::default(),
            )?
            .with_registries(settings.registries.clone()),
        );
        let (net, net_problem) = if settings.network {
            let bridge = settings
                .bridge
                .clone()
                .unwrap_or_else(|| board.profile.bridge.clone());
            let system = board.ovs.system_db_socket.as_ref().map(PathBuf::from);
            match Network::start(
                system.as_deref(),
                &settings.state_dir.join("ovs"),
                &bridge,
                &board.profile.datapath_type,
            ) {
                Ok(n) => {
                    tracing::info!(
                        "bridge {bridge} on {} Open vSwitch ({} datapath)",
                        if n.is_private() {
                            "the private"
                        } else {
                            "the system"
                        },
                        board.profile.datapath_type
                    );
                    (Some(n), None)
                }
                Err(e) => {
                    tracing::error!("no steering: {e}");
                    (None, Some(e.to_string()))
                }
            }
        } else {
            (
                None,
                Some("networking disabled by configuration".to_string()),
            )
        };
        let backends = Backends {
            lxc: std::sync::Arc::new(crate::runtime::lxc::LxcBackend(rt.clone())),
            microvm: std::sync::Arc::new(vms.clone()),
        };
        let host_sources = std::sync::Arc::new(crate::hostcall::Sources {
            dhcp_leases: board.profile.dhcp_leases.clone(),
            facts: board.profile.facts.clone(),
        });
        Ok(Supervisor {
            settings,
            store,
            doc,
            events,
            rt,
            vms,
            backends,
            board,
            live: HashMap::new(),
            tx,
            generation: 0,
            net,
            net_problem,
            net_restoring: false,
            heartbeat_due: None,
            switch_watched: Vec::new(),
            host_sources,
            verdict_servers: HashMap::new(),
            images,
            oci,
            installing: Default::default(),
            reserved_ids: Default::default(),
        })
    }

    fn event(&mut self, kind: EventKind, service: Option<&str>, detail: impl Into<String>) {
        self.event_exit(kind, service, None, detail);
    }

    fn event_exit(
        &mut self,
        kind: EventKind,
        service: Option<&str>,
        exit: Option<&LastExit>,
        detail: impl Into<String>,
    ) {
        self.events.record(Event {
            at_ms: now_ms(),
            kind,
            service: service.map(str::to_string),
            code: exit.and_then(|e| e.code),
            signal: exit.and_then(|e| e.signal),
            detail: detail.into(),
        });
    }

    fn persist(&mut self) -> Result<()> {
        self.store
            .save(&self.doc)
            .map_err(|e| err(ErrorKind::Internal, format!("{e}")))
    }

    fn record(&self, name: &str) -> Result<&ServiceRecord> {
        self.doc
            .services
            .get(name)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("no service named {name:?}")))
    }

    fn record_mut(&mut self, name: &str) -> Result<&mut ServiceRecord> {
        self.doc
            .services
            .get_mut(name)
            .ok_or_else(|| err(ErrorKind::NotFound, format!("no service named {name:?}")))
    }

    /// The backend that runs `name`.
    fn backend(&self, name: &str) -> Result<std::sync::Arc<dyn Backend>> {
        Ok(self.backends.get(self.record(name)?.plan.runtime).clone())
    }

    /// Runs services with other backends (tests: [`crate::runtime::fake`]).
    #[cfg(test)]
    pub(crate) fn set_backends(&mut self, backends: Backends) {
        self.backends = backends;
    }

    fn transition(&mut self, name: &str, op: Op) -> Result<State> {
        let rec = self.record_mut(name)?;
        let next = rec
            .state
            .apply(op)
            .map_err(|e| err(ErrorKind::Conflict, format!("service {name}: {e}")))?;
        rec.state = next;
        Ok(next)
    }

    fn service_dir(&self, name: &str) -> PathBuf {
        self.settings.state_dir.join("services").join(name)
    }

    fn run_files(&self, name: &str) -> lxc::RunFiles {
        lxc::RunFiles {
            exit_file: self
                .settings
                .state_dir
                .join("run")
                .join(format!("{name}.exit")),
            log_file: self.log_file(name),
            log_max_bytes: self.settings.log_max_bytes,
            log_keep: self.settings.log_keep,
        }
    }

    fn log_file(&self, name: &str) -> PathBuf {
        self.settings
            .state_dir
            .join("logs")
            .join(format!("{name}.log"))
    }
}
