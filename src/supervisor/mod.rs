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
//! - `install`: admission, runtime choice and package installs; `build`: materialising
//!   images and defining containers and VMs; `lifecycle`: starts, stops, exits, restart
//!   policy; `update`: version switches and health checks; `net`: ports, flows, verdicts,
//!   heartbeats; `views`: status and logs.

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
use crate::proc;
use crate::runtime::{Backend, Backends, Kind, StartSpec};
use crate::state::{now_ms, Desired, LastExit, Running, ServiceRecord, StateDoc, Store};
use gatevisor_images::beneath::Dir;

mod adopt;
mod build;
mod config;
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
pub use install::{check_image_roots, copy_tree, is_package, ImageRootError};
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
}

pub enum Msg {
    Request(Request, Sender<Reply>),
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
    /// The switch was checked and restored on a worker: the network back, and whether it
    /// was restarted (or why it could not be restored).
    NetworkChecked {
        net: Box<Network>,
        result: std::result::Result<bool, String>,
    },
    Shutdown,
}

/// Where a service's files come from and whom they belong to, for `materialise`.
struct Source {
    /// The image is in the verified image store (else: a local manifest's, under
    /// `image_roots`).
    from_store: bool,
    /// The container's user namespace (`None`: privileged).
    idmap: Option<lxc::IdMap>,
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
    /// Verdict sockets of the services that steer traffic.
    verdict_servers: HashMap<String, crate::verdict::VerdictServer>,
    /// Signed packages, verified and unpacked.
    images: gatevisor_images::store::Store,
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
            verdict_servers: HashMap::new(),
            images,
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
        Ok(self.backends.get(self.record(name)?.runtime).clone())
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

    // ---------------------------------------------------------------- the actor loop

    /// Re-adopts what survived a daemon restart, then serves messages until shutdown.
    pub fn run(mut self, rx: Receiver<Msg>, notifier: Option<Notifier>) {
        self.adopt_all();
        if let Some(net) = &self.net {
            let tx = self.tx.clone();
            let watched = net.spawn_port_monitor(move |change| {
                let port = match change {
                    flowbridge::ovsdb::PortChange::Gone(p)
                    | flowbridge::ovsdb::PortChange::Broken(p) => p,
                };
                !port.starts_with("gv-") || tx.send(Msg::PortLost { port }).is_ok()
            });
            if let Err(e) = watched {
                tracing::warn!("cannot monitor the bridge's ports: {e}");
            }
        }
        self.event(
            EventKind::DaemonStarted,
            None,
            format!("gatevisor {} ready", env!("CARGO_PKG_VERSION")),
        );
        if let Some(n) = &notifier {
            n.ready(&format!("{} services", self.doc.services.len()));
        }
        let ping_every = notifier
            .as_ref()
            .and_then(|n| n.watchdog)
            .map(|w| w / 2)
            .unwrap_or(Duration::from_secs(3600));
        let mut last_ping = Instant::now();
        let mut last_net_check = Instant::now();
        const NET_CHECK: Duration = Duration::from_secs(1);
        loop {
            let now = Instant::now();
            let next_timer = self.live.values().filter_map(|l| l.retry_at).min();
            let mut wait = next_timer
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(ping_every)
                .min(ping_every.saturating_sub(now - last_ping));
            if self.net.is_some() {
                wait = wait.min(NET_CHECK.saturating_sub(now - last_net_check));
            }
            let msg = rx.recv_timeout(wait);
            if let Some(n) = &notifier {
                if last_ping.elapsed() >= ping_every {
                    n.watchdog_ping();
                    last_ping = Instant::now();
                }
            }
            match msg {
                Ok(msg) => {
                    if !self.dispatch(msg) {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.fire_timers();
            if last_net_check.elapsed() >= NET_CHECK {
                last_net_check = Instant::now();
                self.check_network();
                self.check_heartbeats();
            }
        }
        if let Some(n) = &notifier {
            n.stopping();
        }
        self.shutdown(&rx);
    }

    /// Handles one message; `false` once the daemon must stop.
    pub(crate) fn dispatch(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Request(
                Request::Install {
                    manifest,
                    start,
                    runtime,
                },
                reply,
            ) => {
                let res = if is_package(&manifest) {
                    Err(err(
                        ErrorKind::Invalid,
                        format!(
                            "{} is a signed package, not a service manifest: install it as a package",
                            manifest.display()
                        ),
                    ))
                } else {
                    self.install(&manifest, start, None, runtime)
                };
                if let Err(e) = &res {
                    self.refused(&manifest.display().to_string(), e);
                }
                self.answer_install(res, start, reply);
            }
            Msg::Request(
                Request::InstallPackage {
                    package,
                    start,
                    runtime,
                },
                reply,
            ) => self.begin_install_package(package, start, runtime, reply),
            Msg::PackageReady {
                name,
                start,
                runtime,
                pkg,
                result,
                reply,
            } => {
                self.installing.remove(&name);
                let res = result.and_then(|p| self.finish_install_package(&pkg, start, runtime, p));
                self.reserved_ids.remove(&name);
                if let Err(e) = &res {
                    self.refused(&pkg.display().to_string(), e);
                }
                self.answer_install(res, start, reply);
            }
            Msg::Request(Request::Start { name }, reply) => {
                self.enqueue(&name, vec![Step::Start], Some(reply))
            }
            Msg::Request(Request::Stop { name }, reply) => {
                // Wanted stopped from now on: a start in flight that fails is not retried.
                if let Ok(rec) = self.record_mut(&name) {
                    rec.desired = Desired::Stopped;
                }
                self.enqueue(&name, vec![Step::Stop { by_request: true }], Some(reply))
            }
            Msg::Request(Request::Restart { name }, reply) => self.enqueue(
                &name,
                vec![Step::Stop { by_request: true }, Step::Start],
                Some(reply),
            ),
            Msg::Request(Request::Remove { name }, reply) => self.enqueue(
                &name,
                vec![Step::Stop { by_request: false }, Step::Remove(reply)],
                None,
            ),
            Msg::Request(Request::Update { name, package }, reply) => {
                self.begin_update(&name, &package, reply)
            }
            Msg::Request(Request::Rollback { name }, reply) => self.begin_rollback(&name, reply),
            Msg::Request(req, reply) => {
                let _ = reply.send(match self.handle(req) {
                    Ok(result) => Reply::Ok { result },
                    Err(error) => Reply::Error { error },
                });
            }
            Msg::StartDone {
                name,
                generation,
                result,
            } => self.on_start_done(&name, generation, result),
            Msg::StopDone {
                name,
                generation,
                result,
            } => self.on_stop_done(&name, generation, result),
            Msg::Checked {
                name,
                generation,
                result,
            } => self.on_checked(&name, generation, result),
            Msg::UpdateReady {
                name,
                pkg,
                old_version,
                result,
                reply,
            } => self.on_update_ready(&name, &pkg, old_version, result, reply),
            Msg::Follow(tx) => self.events.follow(tx),
            Msg::MonitorExited { name, generation } => self.on_exit(&name, generation),
            Msg::InitExited { name, generation } => {
                let current = self
                    .live
                    .get(&name)
                    .is_some_and(|l| l.generation == generation);
                if current && self.record(&name).is_ok_and(|r| r.state == State::Running) {
                    self.unplug(&name);
                }
            }
            Msg::PortLost { port } => self.on_port_lost(&port),
            Msg::Ready { name } => self.on_ready(&name),
            Msg::Verdict {
                name,
                session,
                allow,
                reply,
            } => {
                let _ = reply.send(self.verdict(&name, &session, allow));
            }
            Msg::NetworkChecked { net, result } => self.on_network_checked(*net, result),
            Msg::Shutdown => return false,
        }
        true
    }

    /// Every refused install or update is an event: what it was, and why (the reason names
    /// it already, or is prefixed with it).
    fn refused(&mut self, what: &str, e: &ApiError) {
        let detail = if e.message.starts_with(what) {
            e.message.clone()
        } else {
            format!("{what}: {}", e.message)
        };
        self.event(EventKind::Refused, None, detail);
    }

    /// Answers a request; an install that asked for a start answers once the start ended.
    fn answer_install(
        &mut self,
        res: Result<api::ServiceStatus>,
        start: bool,
        reply: Sender<Reply>,
    ) {
        match res {
            Ok(st) if start => self.enqueue(&st.name, vec![Step::Start], Some(reply)),
            res => {
                let _ = reply.send(match res.and_then(|st| api::to_result(&st)) {
                    Ok(result) => Reply::Ok { result },
                    Err(error) => Reply::Error { error },
                });
            }
        }
    }

    /// Serves the workers' reports until no start or stop is in flight (or `within` passed);
    /// requests meanwhile are refused.
    fn drain(&mut self, rx: &Receiver<Msg>, within: Duration) {
        let deadline = Instant::now() + within;
        while self.live.values().any(|l| l.busy.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("stopping with starts or stops still in flight");
                return;
            }
            match rx.recv_timeout(left) {
                Ok(Msg::Request(_, reply)) => {
                    let _ = reply.send(Reply::Error {
                        error: err(ErrorKind::Conflict, "the daemon is stopping"),
                    });
                }
                Ok(
                    m @ (Msg::StartDone { .. }
                    | Msg::StopDone { .. }
                    | Msg::Checked { .. }
                    | Msg::UpdateReady { .. }
                    | Msg::MonitorExited { .. }
                    | Msg::PackageReady { .. }),
                ) => {
                    self.dispatch(m);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    fn shutdown(&mut self, rx: &Receiver<Msg>) {
        // Starts in flight end first: what they start is then recorded (and stopped, or
        // left running, with the rest).
        let longest_stop = self
            .doc
            .services
            .values()
            .map(|r| Duration::from_secs(r.manifest.stop_timeout_s as u64))
            .max()
            .unwrap_or_default();
        self.drain(
            rx,
            self.settings.start_timeout + longest_stop + Duration::from_secs(20),
        );
        let names: Vec<String> = self.doc.services.keys().cloned().collect();
        if self.settings.stop_services_on_exit {
            for name in &names {
                if let Some(l) = self.live.get_mut(name) {
                    l.queue.clear();
                }
                let _ = self.stop_service(name, false);
            }
            self.drain(rx, longest_stop + Duration::from_secs(20));
            self.event(
                EventKind::DaemonStopping,
                None,
                "stopping; services stopped",
            );
        } else {
            self.event(
                EventKind::DaemonStopping,
                None,
                "stopping; services left running",
            );
        }
        // Reap our monitor children's zombies later: they keep running in their own sessions
        // and are re-parented when we exit.
        let _ = self.persist();
        // The private switch stays up only while services it carries stay up.
        let services_left_running = !self.settings.stop_services_on_exit
            && self.doc.services.values().any(|r| r.state.is_active());
        if let Some(net) = self.net.take() {
            net.shutdown(services_left_running);
        }
    }

    pub fn handle(&mut self, req: Request) -> Result<serde_json::Value> {
        match req {
            Request::Ping => Ok(json!({"pong": true, "version": env!("CARGO_PKG_VERSION")})),
            // The loop answers installs itself (a package's on a worker).
            Request::Install { .. } | Request::InstallPackage { .. } => Err(err(
                ErrorKind::Internal,
                "installs are answered by the loop, not in handle()",
            )),
            // Starts and stops run on workers, their answers queued behind them (dispatch).
            Request::Start { .. }
            | Request::Stop { .. }
            | Request::Restart { .. }
            | Request::Remove { .. }
            | Request::Update { .. }
            | Request::Rollback { .. } => Err(err(
                ErrorKind::Internal,
                "starts and stops are queued by the loop, not run in handle()",
            )),
            Request::Freeze { name } => {
                self.require_running(&name)?;
                self.backend(&name)?.pause(&name).map_err(runtime_err)?;
                self.status(&name).and_then(|s| api::to_result(&s))
            }
            Request::Thaw { name } => {
                self.require_running(&name)?;
                self.backend(&name)?.resume(&name).map_err(runtime_err)?;
                self.status(&name).and_then(|s| api::to_result(&s))
            }
            Request::List => {
                let names: Vec<String> = self.doc.services.keys().cloned().collect();
                let mut services = Vec::new();
                for n in &names {
                    services.extend(self.status(n).ok());
                }
                api::to_result(&api::ServiceList { services })
            }
            Request::Status { name } => self.status(&name).and_then(|s| api::to_result(&s)),
            Request::Logs {
                name,
                offset,
                tail_bytes,
            } => self
                .logs(&name, offset, tail_bytes)
                .and_then(|l| api::to_result(&l)),
            Request::Events { last, .. } => api::to_result(&api::Events {
                events: self.events.last(last),
            }),
            Request::Flows => self.flows().and_then(|f| api::to_result(&f)),
            Request::ConfigGet { name } => self.config_get(&name).and_then(|c| api::to_result(&c)),
            Request::ConfigSet {
                name,
                values,
                dry_run,
            } => self
                .config_set(&name, &values, dry_run)
                .and_then(|c| api::to_result(&c)),
        }
    }

    fn require_running(&self, name: &str) -> Result<()> {
        let rec = self.record(name)?;
        if rec.state != State::Running {
            return Err(err(
                ErrorKind::Conflict,
                format!("service {name} is {:?}, not running", rec.state),
            ));
        }
        Ok(())
    }
}
