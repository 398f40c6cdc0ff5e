//! The supervisor: owns the desired state, the runtime and the event log, handles every control
//! request, and reconciles what runs with what should run.
//!
//! It is an actor: one thread owns all state and takes [`Msg`]s from a channel (requests from
//! the API server, exits from watcher threads, timers from its own loop), so there are no locks
//! around service records. Each running service's monitor process has a watcher thread blocked
//! on its pidfd, so an exit is noticed at once whether the monitor is our child or was re-adopted
//! after a daemon restart.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use gatevisor_board::{AutoRuntime, BoardReport, CgroupVersion};
use gatevisor_lxc as lxc;
use serde_json::json;

use crate::api::{error_chain, ApiError, ErrorKind, Reply, Request};
use crate::events::{Event, EventKind, EventLog};
use crate::lifecycle::{Op, State};
use crate::manifest::{ImageRef, Manifest, RestartPolicy, RuntimeKind};
use crate::network::Network;
use crate::notify::Notifier;
use crate::proc;
use crate::state::{now_ms, Desired, LastExit, Running, ServiceRecord, StateDoc, Store};
use gatevisor_images::beneath::Dir;

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
    /// A verdict from a service's verdict API.
    Verdict {
        name: String,
        session: flowbridge::steering::Session,
        allow: bool,
        reply: Sender<std::result::Result<(), String>>,
    },
    /// A package install's worker is done: verified into the image store and, for a
    /// container, its rootfs copied (`prepared`), or refused.
    PackageReady {
        name: String,
        start: bool,
        pkg: PathBuf,
        result: std::result::Result<Prepared, ApiError>,
        reply: Sender<Reply>,
    },
    Shutdown,
}

/// Where a service's files come from and whom they belong to, for `materialise`.
struct Source {
    /// The image is in the verified image store (else: a local manifest's, under
    /// `image_roots`).
    from_store: bool,
    /// A container rootfs a worker already copied.
    prepared: Option<PathBuf>,
    /// The container's user namespace (`None`: privileged).
    idmap: Option<lxc::IdMap>,
}

/// What a package install's worker made, off the supervisor loop.
pub struct Prepared {
    installed: gatevisor_images::store::Installed,
    /// The container's rootfs, copied from the store (none for a microVM).
    rootfs: Option<PathBuf>,
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
    /// Since when this daemon expects the service's heartbeat (it was started or adopted);
    /// `None` once it was killed as hung. The heartbeat itself is the verdict server's
    /// last-seen time.
    heartbeat_since: Option<Instant>,
}

pub struct Supervisor {
    settings: Settings,
    store: Store,
    doc: StateDoc,
    events: EventLog,
    rt: lxc::Runtime,
    /// microVM services: one `gatevisor vmm` process each.
    vms: crate::microvm::MicrovmRuntime,
    board: BoardReport,
    live: HashMap<String, Live>,
    tx: Sender<Msg>,
    generation: u64,
    net: Option<Network>,
    /// Why there is no network, when there is none.
    net_problem: Option<String>,
    /// Verdict sockets of the services that steer traffic.
    verdict_servers: HashMap<String, crate::verdict::VerdictServer>,
    /// Signed packages, verified and unpacked.
    images: gatevisor_images::store::Store,
    /// Services whose package a worker is installing now (no second install or update of
    /// the same name meanwhile, and no store garbage collection under it).
    installing: std::collections::HashSet<String>,
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
        Ok(Supervisor {
            settings,
            store,
            doc,
            events,
            rt,
            vms,
            board,
            live: HashMap::new(),
            tx,
            generation: 0,
            net,
            net_problem,
            verdict_servers: HashMap::new(),
            images,
            installing: Default::default(),
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
                Ok(Msg::Request(Request::Install { manifest, start }, reply))
                    if is_package(&manifest) =>
                {
                    self.begin_install_package(manifest, start, reply);
                }
                Ok(Msg::PackageReady {
                    name,
                    start,
                    pkg,
                    result,
                    reply,
                }) => {
                    self.installing.remove(&name);
                    let res = result.and_then(|p| self.finish_install_package(&pkg, start, p));
                    if let Err(e) = &res {
                        self.event(
                            EventKind::Refused,
                            None,
                            format!("{}: {}", pkg.display(), e.message),
                        );
                    }
                    let _ = reply.send(match res {
                        Ok(result) => Reply::Ok { result },
                        Err(error) => Reply::Error { error },
                    });
                }
                Ok(Msg::Request(req, reply)) => {
                    let refusable = matches!(req, Request::Install { .. } | Request::Update { .. });
                    let what = match &req {
                        Request::Install { manifest, .. } => manifest.display().to_string(),
                        Request::Update { name, package } => {
                            format!("{name} from {}", package.display())
                        }
                        _ => String::new(),
                    };
                    let res = self.handle(req);
                    if let (true, Err(e)) = (refusable, &res) {
                        // Every refusal is an event, with its reason.
                        let detail = if e.message.starts_with(&what) {
                            e.message.clone()
                        } else {
                            format!("{what}: {}", e.message)
                        };
                        self.event(EventKind::Refused, None, detail);
                    }
                    let r = match res {
                        Ok(result) => Reply::Ok { result },
                        Err(error) => Reply::Error { error },
                    };
                    let _ = reply.send(r);
                }
                Ok(Msg::Follow(tx)) => self.events.follow(tx),
                Ok(Msg::MonitorExited { name, generation }) => self.on_exit(&name, generation),
                Ok(Msg::InitExited { name, generation }) => {
                    let current = self
                        .live
                        .get(&name)
                        .is_some_and(|l| l.generation == generation);
                    if current && self.record(&name).is_ok_and(|r| r.state == State::Running) {
                        self.unplug(&name);
                    }
                }
                Ok(Msg::PortLost { port }) => self.on_port_lost(&port),
                Ok(Msg::Verdict {
                    name,
                    session,
                    allow,
                    reply,
                }) => {
                    let _ = reply.send(self.verdict(&name, &session, allow));
                }
                Ok(Msg::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
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
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let names: Vec<String> = self.doc.services.keys().cloned().collect();
        if self.settings.stop_services_on_exit {
            for name in &names {
                let _ = self.stop_service(name, false);
            }
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

    /// Running services with a heartbeat that went silent are hung: their traffic fails over
    /// and they are killed, so their restart policy brings them back.
    fn check_heartbeats(&mut self) {
        let hung: Vec<(String, u64)> = self
            .doc
            .services
            .values()
            .filter(|r| r.state == State::Running)
            .filter_map(|r| {
                let timeout = r.manifest.network.heartbeat_timeout_ms?;
                let since = self.live.get(&r.manifest.name)?.heartbeat_since?;
                let last_seen_ms = self
                    .verdict_servers
                    .get(&r.manifest.name)
                    .map_or(0, |v| v.last_seen_ms());
                let silent_ms =
                    (since.elapsed().as_millis() as u64).min(now_ms().saturating_sub(last_seen_ms));
                // A microVM boots a kernel before its service can speak: its first word is
                // awaited for up to MICROVM_BOOT_GRACE, then the heartbeat applies.
                let booting = r.runtime == "microvm"
                    && r.running
                        .as_ref()
                        .is_some_and(|run| last_seen_ms < run.started_at_ms)
                    && since.elapsed() < crate::microvm::BOOT_GRACE;
                (silent_ms > timeout && !booting).then(|| (r.manifest.name.clone(), timeout))
            })
            .collect();
        for (name, timeout) in hung {
            self.event(
                EventKind::Hung,
                Some(&name),
                format!("no heartbeat on its verdict socket for {timeout} ms; failing over and restarting it"),
            );
            self.unplug(&name);
            if let Some(l) = self.live.get_mut(&name) {
                l.heartbeat_since = None;
            }
            // Killing it ends in its monitor's exit, which applies the restart policy.
            if let Err(e) = self.rt.stop(&name, Duration::ZERO) {
                tracing::warn!("{name}: cannot kill the hung service: {e}");
            }
        }
    }

    /// A port vanished from the bridge (or broke): a running service gets it back.
    fn on_port_lost(&mut self, port: &str) {
        let Some(name) = self
            .doc
            .services
            .values()
            .find(|r| veth_name(&r.manifest.name) == port)
            .map(|r| r.manifest.name.clone())
        else {
            return;
        };
        if self.doc.services.get(&name).map(|r| r.state) != Some(State::Running) {
            return; // we removed it ourselves
        }
        if self.rt.init_pid(&name).ok().flatten().is_none() {
            return; // its container just died: its exit is being handled
        }
        let live = self.live.entry(name.clone()).or_default();
        if live
            .replugged_at
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        live.replugged_at = Some(Instant::now());
        self.unplug(&name);
        self.plug(&name);
        let restored = self.live.get(&name).is_some_and(|l| l.net_error.is_none());
        self.event(
            EventKind::NetworkRestored,
            Some(&name),
            if restored {
                format!("port {port} was removed from the bridge; plugged again")
            } else {
                format!("port {port} was removed from the bridge and could not be plugged again")
            },
        );
    }

    /// Restores flows after an Open vSwitch restart.
    fn check_network(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        match net.check() {
            Ok(true) => self.event(
                EventKind::NetworkRestored,
                None,
                "Open vSwitch came back; flows restored",
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!("Open vSwitch check failed: {e}"),
        }
    }

    /// Plugs a running service into the bridge and starts steering to it.
    fn plug(&mut self, name: &str) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(rec) = self.doc.services.get(name) else {
            return;
        };
        if !rec.manifest.network.interface {
            return;
        }
        let m = &rec.manifest;
        let res = net.plug(
            rec.id,
            &veth_name(name),
            name,
            &m.network.steering,
            m.failure_mode.to_flowbridge(),
        );
        let live = self.live.entry(name.to_string()).or_default();
        live.net_error = res.err().map(|e| {
            tracing::warn!("{name}: {e}");
            e.to_string()
        });
    }

    /// The service ended or is stopping: its traffic class fails open or closed now.
    fn unplug(&mut self, name: &str) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(rec) = self.doc.services.get(name) else {
            return;
        };
        if rec.manifest.network.interface {
            if let Err(e) = net.unplug(rec.id, &veth_name(name)) {
                tracing::warn!("{name}: {e}");
            }
        }
    }

    /// Host directory bind-mounted into the service at `/run/gatevisor` (its verdict socket).
    fn service_run_dir(&self, name: &str) -> PathBuf {
        self.settings.state_dir.join("run").join(name)
    }

    fn verdict(
        &mut self,
        name: &str,
        session: &flowbridge::steering::Session,
        allow: bool,
    ) -> std::result::Result<(), String> {
        let id = self
            .doc
            .services
            .get(name)
            .map(|r| r.id)
            .ok_or("no such service")?;
        let net = self.net.as_mut().ok_or("no Open vSwitch")?;
        match net.session_verdict(id, session, allow) {
            Ok(true) => {
                self.live.entry(name.to_string()).or_default().api_verdicts += 1;
                Ok(())
            }
            Ok(false) => Err("the service is not active on the bridge".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Puts a service that is not running into its failure mode on the bridge, and opens its
    /// verdict socket.
    fn register_network(&mut self, name: &str) {
        let Some(rec) = self.doc.services.get(name) else {
            return;
        };
        if rec.manifest.network.steering.is_empty() {
            return;
        }
        if !self.verdict_servers.contains_key(name) {
            let owner = rec.idmap_base;
            match crate::verdict::serve(&self.service_run_dir(name), name, owner, self.tx.clone()) {
                Ok(v) => {
                    self.verdict_servers.insert(name.to_string(), v);
                }
                Err(e) => tracing::warn!("{name}: cannot open its verdict socket: {e}"),
            }
        }
        let Some(net) = self.net.as_mut() else { return };
        let Some(rec) = self.doc.services.get(name) else {
            return;
        };
        let m = &rec.manifest;
        if let Err(e) = net.register(rec.id, &m.network.steering, m.failure_mode.to_flowbridge()) {
            tracing::warn!("{name}: {e}");
        }
    }

    fn flows(&mut self) -> Result<serde_json::Value> {
        let Some(net) = self.net.as_mut() else {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "no Open vSwitch: {}",
                    self.net_problem.clone().unwrap_or_default()
                ),
            ));
        };
        let bridge = net.bridge.clone();
        let flows = net.flows().map_err(runtime_err)?;
        let owner = |cookie: u64| -> String {
            if cookie == flowbridge::steering::BASE_COOKIE {
                return "base".into();
            }
            self.doc
                .services
                .values()
                .find(|r| {
                    cookie == flowbridge::steering::service_cookie(r.id, false)
                        || cookie == flowbridge::steering::service_cookie(r.id, true)
                })
                .map(|r| r.manifest.name.clone())
                .unwrap_or_else(|| "other".into())
        };
        let list: Vec<serde_json::Value> = flows
            .iter()
            .map(|f| {
                json!({
                    "owner": owner(f.flow.cookie),
                    "cookie": format!("{:#x}", f.flow.cookie),
                    "table": f.flow.table,
                    "priority": f.flow.priority,
                    "packets": f.packet_count,
                    "bytes": f.byte_count,
                    "flow": f.flow.to_string(),
                })
            })
            .collect();
        Ok(json!({ "bridge": bridge, "flows": list }))
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| l.retry_at.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            if let Some(l) = self.live.get_mut(&name) {
                l.retry_at = None;
            }
            let still_wanted = self
                .doc
                .services
                .get(&name)
                .is_some_and(|r| r.desired == Desired::Running && r.state == State::Backoff);
            if still_wanted {
                if let Ok(rec) = self.record_mut(&name) {
                    rec.restarts += 1;
                }
                let _ = self.start_service(&name, Op::Retry);
            }
        }
    }

    // ---------------------------------------------------------------- requests

    pub fn handle(&mut self, req: Request) -> Result<serde_json::Value> {
        match req {
            Request::Ping => Ok(json!({"pong": true, "version": env!("CARGO_PKG_VERSION")})),
            // The loop hands package installs to a worker (begin_install_package) before
            // they get here.
            Request::Install { manifest, .. } if is_package(&manifest) => Err(err(
                ErrorKind::Internal,
                "package installs run on a worker, not in handle()",
            )),
            Request::Install { manifest, start } => self.install(&manifest, start, None),
            Request::Update { name, package } => self.update(&name, &package),
            Request::Rollback { name } => self.rollback(&name),
            Request::Start { name } => {
                let rec = self.record_mut(&name)?;
                rec.desired = Desired::Running;
                match rec.state {
                    State::Running | State::Starting => {}
                    State::Backoff => {
                        rec.restarts += 1;
                        self.start_service(&name, Op::Retry)?
                    }
                    _ => {
                        rec.consecutive_failures = 0;
                        rec.failure_reason = None;
                        self.start_service(&name, Op::Start)?
                    }
                }
                self.persist()?;
                self.status(&name)
            }
            Request::Stop { name } => {
                self.stop_service(&name, true)?;
                self.status(&name)
            }
            Request::Restart { name } => {
                self.stop_service(&name, true)?;
                let rec = self.record_mut(&name)?;
                rec.desired = Desired::Running;
                rec.consecutive_failures = 0;
                rec.failure_reason = None;
                self.start_service(&name, Op::Start)?;
                self.persist()?;
                self.status(&name)
            }
            Request::Remove { name } => self.remove(&name),
            Request::Freeze { name } => {
                self.require_running(&name)?;
                if self.is_vm(&name) {
                    self.vms.signal(&name, libc::SIGSTOP).map_err(runtime_err)?;
                } else {
                    self.rt.freeze(&name).map_err(runtime_err)?;
                }
                self.status(&name)
            }
            Request::Thaw { name } => {
                self.require_running(&name)?;
                if self.is_vm(&name) {
                    self.vms.signal(&name, libc::SIGCONT).map_err(runtime_err)?;
                } else {
                    self.rt.thaw(&name).map_err(runtime_err)?;
                }
                self.status(&name)
            }
            Request::List => {
                let names: Vec<String> = self.doc.services.keys().cloned().collect();
                let mut list = Vec::new();
                for n in &names {
                    list.extend(self.status(n).ok());
                }
                Ok(json!({ "services": list }))
            }
            Request::Status { name } => self.status(&name),
            Request::Logs {
                name,
                offset,
                tail_bytes,
            } => self.logs(&name, offset, tail_bytes),
            Request::Events { last, .. } => Ok(json!({ "events": self.events.last(last) })),
            Request::Flows => self.flows(),
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

    /// Replaces a packaged service with a new version from `pkg`; if the new version does not
    /// pass its health check, the previous one is restored by itself.
    fn update(&mut self, name: &str, pkg: &Path) -> Result<serde_json::Value> {
        let invalid =
            |e: &dyn std::fmt::Display| err(ErrorKind::Invalid, format!("{}: {e}", pkg.display()));
        if self.installing.contains(name) {
            return Err(err(
                ErrorKind::Conflict,
                format!("{name} is being installed; update it once that is done"),
            ));
        }
        let rec = self.record(name)?;
        let old_version = rec.package_version.clone().ok_or_else(|| {
            err(ErrorKind::Conflict, format!("service {name} was not installed from a package; remove and install the package instead"))
        })?;
        let peeked = gatevisor_images::package::open_regular(pkg)
            .map_err(|e| invalid(&e))
            .and_then(|f| {
                gatevisor_images::package::peek(std::io::BufReader::new(f)).map_err(|e| invalid(&e))
            })?;
        if peeked.name != name {
            return Err(invalid(&format!(
                "the package is for service {:?}, not {name:?}",
                peeked.name
            )));
        }
        let inst = {
            let mut check = package_check(&self.settings.policy);
            self.images
                .install_checked(pkg, &mut check, &mut |_| {})
                .map_err(|e| store_refusal(pkg, &e))?
        };
        if inst.version == old_version {
            return Err(err(
                ErrorKind::Conflict,
                format!("{name} already runs version {old_version}"),
            ));
        }
        match self.switch_version(name, &inst) {
            Ok(()) => {
                self.record_mut(name)?.source = pkg.to_path_buf();
                self.persist()?;
                self.event(
                    EventKind::Updated,
                    Some(name),
                    format!("updated from {old_version} to {}", inst.version),
                );
                self.status(name)
            }
            Err(why) => {
                // Back to the version that worked.
                let restored = self
                    .images
                    .rollback(name)
                    .map_err(runtime_err)
                    .and_then(|prev| {
                        self.switch_version(name, &prev)
                            .map_err(|e| err(ErrorKind::Runtime, e))
                    });
                let detail = format!(
                    "update to {} failed: {why}; rolled back to {old_version}",
                    inst.version
                );
                self.event(EventKind::RolledBack, Some(name), detail.clone());
                let _ = self.persist();
                match restored {
                    Ok(()) => Err(err(ErrorKind::Runtime, detail)),
                    Err(e) => Err(err(
                        ErrorKind::Runtime,
                        format!("{detail}, but the rollback failed too: {e}"),
                    )),
                }
            }
        }
    }

    /// Goes back to the previous packaged version by hand.
    fn rollback(&mut self, name: &str) -> Result<serde_json::Value> {
        self.record(name)?;
        let prev = self
            .images
            .rollback(name)
            .map_err(|e| err(ErrorKind::Conflict, e.to_string()))?;
        let version = prev.version.clone();
        self.switch_version(name, &prev)
            .map_err(|e| err(ErrorKind::Runtime, e))?;
        self.event(
            EventKind::RolledBack,
            Some(name),
            format!("rolled back by hand to {version}"),
        );
        self.persist()?;
        self.status(name)
    }

    /// Stops the service, rebuilds it from `inst` (its manifest and rootfs) and starts it; Ok
    /// once it passes its health check.
    fn switch_version(
        &mut self,
        name: &str,
        inst: &gatevisor_images::store::Installed,
    ) -> std::result::Result<(), String> {
        let file = inst.service_manifest();
        let m = Manifest::load(&file).map_err(|e| e.to_string())?;
        if m.name != name {
            return Err(format!(
                "{}: the manifest is for {:?}",
                file.display(),
                m.name
            ));
        }
        let runtime = self.record(name).map_err(|e| e.message)?.runtime.clone();
        let image = m
            .image_ref_as(&file, runtime == "microvm")
            .map_err(|e| e.to_string())?;
        let caps = m.capability_set(&file).map_err(|e| e.to_string())?;
        self.stop_service(name, false).map_err(|e| e.message)?;
        let dir = self.service_dir(name);
        let idmap = (runtime == "lxc" && !m.privileged)
            .then(|| idmap_for(self.record(name).map(|r| r.id).unwrap_or(0)));
        let source = Source {
            from_store: true,
            prepared: None,
            idmap,
        };
        self.materialise(&m, &image, caps, &dir, source)
            .map_err(|e| e.message)?;
        {
            let rec = self.record_mut(name).map_err(|e| e.message)?;
            rec.manifest = m;
            rec.idmap_base = idmap.map(|m| m.host_base);
            rec.package_version = Some(inst.version.clone());
            rec.desired = Desired::Running;
            rec.consecutive_failures = 0;
            rec.failure_reason = None;
        }
        let since_ms = now_ms();
        self.start_service(name, Op::Start).map_err(|e| e.message)?;
        let _ = self.persist();
        self.health_check(name, since_ms)
    }

    /// Waits (up to the manifest's deadline) until the service runs and its check passes.
    /// `since_ms`: just before the start (a service may say hello at once).
    fn health_check(&mut self, name: &str, since_ms: u64) -> std::result::Result<(), String> {
        let rec = self.record(name).map_err(|e| e.message)?;
        let health = rec.manifest.health.clone();
        let deadline = Instant::now() + Duration::from_secs(health.deadline_s as u64);
        // Without a check, "healthy" means: still running a second after the start.
        let settle = Instant::now() + Duration::from_secs(1);
        let mut last = String::from("it did not start");
        while Instant::now() < deadline {
            let init = self.service_pid(name);
            let Some(init) = init else {
                last = "it is not running".into();
                std::thread::sleep(Duration::from_millis(100));
                continue;
            };
            let vm = self.is_vm(name).then(|| self.vms.vsock_path(name));
            let passed = if let Some(cmd) = &health.exec {
                // Inside the guest (its init runs it) or inside the container.
                let ran = match &vm {
                    Some(vsock) => {
                        crate::microvm::health_exec(vsock, cmd).map_err(|e| e.to_string())
                    }
                    None => self.rt.exec(name, cmd).map_err(|e| e.to_string()),
                };
                match ran {
                    Ok(0) => true,
                    Ok(code) => {
                        last = format!("health command exited with {code}");
                        false
                    }
                    Err(e) => {
                        last = e;
                        false
                    }
                }
            } else if let (Some(port), Some(vsock), false) =
                (health.tcp_port, &vm, health.verdict_ping)
            {
                let ok = crate::microvm::health_tcp(vsock, port).unwrap_or(false);
                if !ok {
                    last = format!("nothing accepts on TCP port {port} in the guest");
                }
                ok
            } else if health.verdict_ping {
                let spoke = self
                    .verdict_servers
                    .get(name)
                    .is_some_and(|v| v.last_seen_ms() >= since_ms);
                if !spoke {
                    last = "it did not speak on its verdict socket".into();
                }
                spoke
            } else if let Some(port) = health.tcp_port {
                let ok = tcp_in_netns(init, port);
                if !ok {
                    last = format!("nothing accepts on TCP port {port}");
                }
                ok
            } else {
                Instant::now() >= settle
            };
            if passed {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "no healthy start within {} s ({last})",
            health.deadline_s
        ))
    }

    /// Starts installing a package: the quick checks here, the verification, unpacking and
    /// rootfs copy on a worker, which reports back with [`Msg::PackageReady`]; the loop goes
    /// on meanwhile. The reply goes out when the worker is done.
    fn begin_install_package(&mut self, pkg: PathBuf, start: bool, reply: Sender<Reply>) {
        let refuse = |me: &mut Supervisor, e: ApiError| {
            me.event(
                EventKind::Refused,
                None,
                format!("{}: {}", pkg.display(), e.message),
            );
            let _ = reply.send(Reply::Error { error: e });
        };
        let invalid = |e: &(dyn std::error::Error + 'static)| {
            err(
                ErrorKind::Invalid,
                format!("{}: {}", pkg.display(), error_chain(e)),
            )
        };
        let peeked = match gatevisor_images::package::open_regular(&pkg)
            .map_err(|e| invalid(&e))
            .and_then(|f| {
                gatevisor_images::package::peek(std::io::BufReader::new(f)).map_err(|e| invalid(&e))
            }) {
            Ok(p) => p,
            Err(e) => return refuse(self, e),
        };
        let name = peeked.name;
        if self.doc.services.contains_key(&name) || self.installing.contains(&name) {
            let e = err(
                ErrorKind::Conflict,
                format!(
                    "{}: a service named {name:?} is already installed; use `gatevisor service update`",
                    pkg.display()
                ),
            );
            return refuse(self, e);
        }
        self.installing.insert(name.clone());
        let images = self.images.clone();
        let policy = self.settings.policy.clone();
        let board = self.board.clone();
        let tx = self.tx.clone();
        let services = self.settings.state_dir.join("services");
        let (pkg2, name2) = (pkg.clone(), name.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("install-{name}"))
            .spawn(move || {
                let result = prepare_package(&images, &policy, &board, &pkg2, &name2, &services);
                let _ = tx.send(Msg::PackageReady {
                    name: name2,
                    start,
                    pkg: pkg2,
                    result,
                    reply,
                });
            });
        if let Err(e) = spawned {
            self.installing.remove(&name);
            tracing::error!("cannot start an install worker: {e}");
        }
    }

    /// The loop's part of a package install, once its worker verified and prepared it.
    fn finish_install_package(
        &mut self,
        pkg: &Path,
        start: bool,
        p: Prepared,
    ) -> Result<serde_json::Value> {
        let inst = p.installed;
        let res = if self.doc.services.contains_key(&inst.name) {
            Err(err(
                ErrorKind::Conflict,
                format!(
                    "{}: a service named {:?} is already installed",
                    pkg.display(),
                    inst.name
                ),
            ))
        } else {
            self.install_prepared(
                &inst.service_manifest(),
                start,
                Some((pkg.to_path_buf(), inst.version.clone())),
                p.rootfs.clone(),
            )
        };
        if let Some(r) = &p.rootfs {
            let _ = std::fs::remove_dir_all(r.parent().unwrap_or(r));
        }
        // Only what this install put into the store is taken out again when it fails.
        if res.is_err() && p.new_entry && !self.doc.services.contains_key(&inst.name) {
            let _ = self.images.remove(&inst.name);
            self.gc_images();
        }
        res
    }

    /// Removes unreferenced store entries, unless a worker is installing into the store now
    /// (its blobs are referenced only once its version is committed).
    fn gc_images(&mut self) {
        if self.installing.is_empty() {
            if let Err(e) = self.images.gc() {
                tracing::warn!("image store: {}", error_chain(&e));
            }
        }
    }

    /// `package`: the package file and version, when the manifest comes from the image store.
    fn install(
        &mut self,
        path: &Path,
        start: bool,
        package: Option<(PathBuf, String)>,
    ) -> Result<serde_json::Value> {
        self.install_prepared(path, start, package, None)
    }

    /// [`Self::install`] with the container's rootfs already copied by a worker (`rootfs`).
    fn install_prepared(
        &mut self,
        path: &Path,
        start: bool,
        package: Option<(PathBuf, String)>,
        rootfs: Option<PathBuf>,
    ) -> Result<serde_json::Value> {
        let invalid = |e: &dyn std::fmt::Display| err(ErrorKind::Invalid, e.to_string());
        let path = std::path::absolute(path).map_err(|e| invalid(&e))?;
        let m = Manifest::load(&path).map_err(|e| err(ErrorKind::Invalid, error_chain(&e)))?;
        if package.is_none() {
            // A local manifest: root on the gateway wrote it, but what it may keep is still
            // the operator's policy.
            let caps = m.capability_set(&path).map_err(|e| invalid(&e))?;
            let denied = |e: crate::policy::PolicyError| {
                err(ErrorKind::Denied, format!("{}: {e}", path.display()))
            };
            self.settings
                .policy
                .check(&crate::policy::Requester::Local, &caps)
                .map_err(denied)?;
            if m.privileged {
                self.settings
                    .policy
                    .check_privileged(&crate::policy::Requester::Local)
                    .map_err(denied)?;
            }
        }
        let file = path.display();
        if self.doc.services.contains_key(&m.name) {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "{file}: field `name`: a service named {:?} is already installed (remove it first, or pick another name)",
                    m.name
                ),
            ));
        }
        let runtime = resolve_runtime(&self.board, &m, &path)?;
        let max = self.board.profile.max_services as usize;
        if self.doc.services.len() >= max {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "{file}: board profile {} allows {max} services and {max} are installed",
                    self.board.profile.name
                ),
            ));
        }
        let budget = self.board.service_memory_budget_mib();
        let used: u64 = self
            .doc
            .services
            .values()
            .map(|r| r.manifest.resources.memory_mib as u64)
            .sum();
        if used + m.resources.memory_mib as u64 > budget {
            return Err(err(
                ErrorKind::Conflict,
                format!(
                    "{file}: field `resources.memory_mib`: {} MiB does not fit the board's service memory budget ({} of {budget} MiB left)",
                    m.resources.memory_mib,
                    budget.saturating_sub(used)
                ),
            ));
        }
        if !m.network.steering.is_empty() && self.net.is_none() {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{file}: field `network.steering`: needs Open vSwitch, which is unavailable here: {}",
                    self.net_problem.clone().unwrap_or_default()
                ),
            ));
        }
        if m.resources.vcpus as usize > self.board.host.cpus {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{file}: field `resources.vcpus`: {} exceeds the board's {} CPUs",
                    m.resources.vcpus, self.board.host.cpus
                ),
            ));
        }
        let image = m
            .image_ref_as(&path, runtime == "microvm")
            .map_err(|e| invalid(&e))?;
        let caps = m.capability_set(&path).map_err(|e| invalid(&e))?;

        // Everything checked: now build. Any failure undoes what was made.
        let id = self.doc.services.values().map(|r| r.id).max().unwrap_or(0) + 1;
        let idmap = (runtime == "lxc" && !m.privileged).then(|| idmap_for(id));
        let dir = self.service_dir(&m.name);
        let source = Source {
            from_store: package.is_some(),
            prepared: rootfs,
            idmap,
        };
        let made = self.materialise(&m, &image, caps, &dir, source);
        if let Err(e) = made {
            let _ = self.rt.undefine(&m.name);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let name = m.name.clone();
        let version = m.version.clone();
        self.doc.services.insert(
            name.clone(),
            ServiceRecord {
                id,
                manifest: m,
                source: package
                    .as_ref()
                    .map(|(p, _)| p.clone())
                    .unwrap_or_else(|| path.clone()),
                package_version: package.map(|(_, v)| v),
                runtime: runtime.into(),
                idmap_base: idmap.map(|m| m.host_base),
                desired: if start {
                    Desired::Running
                } else {
                    Desired::Stopped
                },
                state: State::Installed,
                running: None,
                restarts: 0,
                consecutive_failures: 0,
                last_exit: None,
                failure_reason: None,
                installed_at_ms: now_ms(),
            },
        );
        if let Err(e) = self.persist() {
            self.doc.services.remove(&name);
            let _ = self.rt.undefine(&name);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.event(
            EventKind::Installed,
            Some(&name),
            format!("version {version}, runtime {runtime}"),
        );
        self.register_network(&name);
        if start {
            self.start_service(&name, Op::Start)?;
            self.persist()?;
        }
        self.status(&name)
    }

    /// Opens a local manifest's image (`rootfs:DIR`, `initramfs:FILE`, a folder's `package`
    /// tree) beneath the configured image root that holds it: symlinks may not lead out of
    /// that root, and a path under no root is refused.
    fn local_image(&self, src: &Path) -> Result<(Dir, PathBuf)> {
        let refused = |why: String| err(ErrorKind::Denied, format!("field `image`: {why}"));
        let abs =
            std::path::absolute(src).map_err(|e| refused(format!("{}: {e}", src.display())))?;
        let Some(root) = self
            .settings
            .image_roots
            .iter()
            .find(|r| abs.starts_with(r))
        else {
            return Err(refused(format!(
                "{} is not under a directory this gateway takes images from (image_roots in the daemon's configuration: {})",
                abs.display(),
                if self.settings.image_roots.is_empty() {
                    "none configured".to_string()
                } else {
                    self.settings
                        .image_roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )));
        };
        let rel = abs
            .strip_prefix(root)
            .unwrap_or(Path::new(""))
            .to_path_buf();
        let root_dir =
            Dir::open(root).map_err(|e| refused(format!("image root {}: {e}", root.display())))?;
        Ok((root_dir, rel))
    }

    /// Builds the service's rootfs (owned by its container's root) and defines its container.
    fn materialise(
        &mut self,
        m: &Manifest,
        image: &ImageRef,
        caps: Vec<caps::Capability>,
        dir: &Path,
        source: Source,
    ) -> Result<()> {
        let Source {
            from_store,
            prepared,
            idmap,
        } = source;
        let _ = std::fs::remove_dir_all(dir);
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(dir).map_err(runtime_err)?;
        let escaped = |src: &Path, e: gatevisor_images::beneath::BeneathError| {
            err(
                ErrorKind::Denied,
                format!("field `image`: {}: {e}", src.display()),
            )
        };
        if let ImageRef::Initramfs(src) = image {
            if from_store {
                return self.define_vm(m, src, dir);
            }
            // Opened beneath its image root, then read through the open file only.
            let (root, rel) = self.local_image(src)?;
            let (parent, name) = gatevisor_images::beneath::split(&rel);
            let f = root
                .dir_following(parent)
                .map_err(|e| escaped(src, e))?
                .open_file(name)
                .map_err(|e| escaped(src, e.into()))?;
            let via = PathBuf::from(format!(
                "/proc/self/fd/{}",
                std::os::fd::AsRawFd::as_raw_fd(&f)
            ));
            return self.define_vm(m, &via, dir);
        }
        match image {
            ImageRef::BuiltinBusybox => {
                check_static_busybox(&self.settings.busybox)?;
                lxc::rootfs::build_busybox(&self.settings.busybox, &rootfs).map_err(runtime_err)?
            }
            ImageRef::Rootfs(_) if prepared.is_some() => {
                let p = prepared.expect("checked");
                std::fs::rename(&p, &rootfs).map_err(runtime_err)?;
            }
            ImageRef::Rootfs(src) => {
                let from = if from_store {
                    Dir::open(src).map_err(runtime_err)?
                } else {
                    let (root, rel) = self.local_image(src)?;
                    root.dir_following(&rel).map_err(|e| escaped(src, e))?
                };
                std::fs::create_dir(&rootfs).map_err(runtime_err)?;
                let to = Dir::open(&rootfs).map_err(runtime_err)?;
                copy_rootfs(&from, &to).map_err(|e| {
                    err(
                        ErrorKind::Invalid,
                        format!(
                            "field `image`: cannot copy {}: {}",
                            src.display(),
                            crate::api::error_chain(&e)
                        ),
                    )
                })?;
            }
            ImageRef::Initramfs(_) => unreachable!("handled above"),
        }
        // An unprivileged container's root owns its tree.
        if let Some(map) = idmap {
            lxc::rootfs::shift_owner(&rootfs, map.host_base).map_err(runtime_err)?;
        }
        let r = &m.resources;
        let root_owner = idmap.map_or(0, |m| m.host_base);
        let disk_image = match r.disk_mib {
            Some(mib) => Some(make_disk_image(
                &rootfs,
                &dir.join("disk.img"),
                mib,
                root_owner,
            )?),
            None => None,
        };
        let spec = lxc::ContainerSpec {
            name: m.name.clone(),
            hostname: m.name.clone(),
            rootfs,
            disk_image,
            env: m
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain((!m.network.steering.is_empty()).then(|| {
                    (
                        "GATEVISOR_VERDICT_SOCKET".to_string(),
                        format!(
                            "{}/{}",
                            crate::verdict::CONTAINER_DIR,
                            crate::verdict::SOCKET_NAME
                        ),
                    )
                }))
                .collect(),
            limits: lxc::Limits {
                memory_bytes: Some(r.memory_mib as u64 * 1024 * 1024),
                cpu_quota_us: r
                    .cpu_quota_percent
                    .map(|p| p as u64 * lxc::config::CPU_PERIOD_US / 100),
                pids: r.pids.map(u64::from),
                cpus: Some(r.vcpus),
            },
            capabilities: caps,
            veth_host: m.network.interface.then(|| veth_name(&m.name)),
            ipv4_address: m.network.address.clone(),
            seccomp_profile: lxc::default_seccomp_profile(),
            apparmor_profile: lxc::apparmor_profile(),
            bind_dirs: if m.network.steering.is_empty() {
                vec![]
            } else {
                let dir = self.service_run_dir(&m.name);
                std::fs::create_dir_all(&dir).map_err(runtime_err)?;
                if let Some(map) = idmap {
                    std::os::unix::fs::chown(&dir, Some(map.host_base), Some(map.host_base))
                        .map_err(runtime_err)?;
                }
                vec![(dir, crate::verdict::CONTAINER_DIR.to_string())]
            },
            idmap,
        };
        self.rt.define(&spec).map_err(runtime_err)
    }

    /// Copies the initramfs and writes the VM configuration of a microVM service.
    fn define_vm(&mut self, m: &Manifest, initramfs: &Path, dir: &Path) -> Result<()> {
        let initrd = dir.join("initramfs.cpio");
        let kernel = m
            .microvm
            .kernel
            .clone()
            .unwrap_or_else(crate::microvm::MicrovmRuntime::default_kernel);
        if !kernel.is_file() {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "field `microvm.kernel`: {} does not exist on this gateway",
                    kernel.display()
                ),
            ));
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
                if !m.network.steering.is_empty() {
                    // The service reaches its verdict socket over vsock: the VMM maps guest
                    // connections to host port P onto `<vsock>_P`, a link to the socket.
                    env.push((
                        "GATEVISOR_VERDICT_SOCKET".into(),
                        format!("vsock:2:{}", crate::microvm::VERDICT_PORT),
                    ));
                    let link = self
                        .vms
                        .vsock_port_path(&m.name, crate::microvm::VERDICT_PORT);
                    let _ = std::fs::remove_file(&link);
                    let dir = self.service_run_dir(&m.name);
                    std::fs::create_dir_all(&dir).map_err(runtime_err)?;
                    std::os::unix::fs::symlink(dir.join(crate::verdict::SOCKET_NAME), &link)
                        .map_err(runtime_err)?;
                }
                crate::microvm::initramfs_with_init(
                    initramfs,
                    init,
                    modules_of.as_deref(),
                    &env,
                    &initrd,
                )
                .map_err(runtime_err)?;
                let mut c = format!(
                    "{} {} rdinit={} gatevisor.grace_s={}",
                    crate::microvm::BASE_CMDLINE,
                    m.microvm.cmdline,
                    crate::microvm::GUEST_INIT_PATH,
                    m.stop_timeout_s
                );
                if let Some(a) = &m.network.address {
                    c.push_str(&format!(" gatevisor.ip={a}"));
                }
                c.push_str(" -- ");
                c.push_str(&m.command.join(" "));
                let vsock = gatevisor_vmm::vm::VsockConfig {
                    guest_cid: crate::microvm::GUEST_CID,
                    uds_path: self.vms.vsock_path(&m.name),
                };
                (c, Some(vsock))
            }
            None => {
                let needs_init = [
                    ("network.address", m.network.address.is_some()),
                    ("network.steering", !m.network.steering.is_empty()),
                    ("health.exec", m.health.exec.is_some()),
                    ("health.tcp_port", m.health.tcp_port.is_some()),
                    ("env", !m.env.is_empty()),
                ];
                if let Some((field, _)) = needs_init.iter().find(|(_, set)| *set) {
                    return Err(err(
                        ErrorKind::Invalid,
                        format!("field `{field}`: a microVM needs gatevisor-guest-init for it, which is not installed on this gateway"),
                    ));
                }
                std::fs::copy(initramfs, &initrd).map_err(runtime_err)?;
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
            memory_mib: crate::microvm::guest_memory_mib(m.resources.memory_mib),
            vcpus: m.resources.vcpus as u8,
            console_log: Some(self.log_file(&m.name)),
            console_rate: crate::microvm::CONSOLE_RATE,
            console_socket: Some(self.vms.console_path(&m.name)),
            exit_file: Some(self.run_files(&m.name).exit_file),
            // The tap is created at each start and handed over as TAP_FD.
            net: if m.network.interface {
                vec![gatevisor_vmm::vm::NetConfig {
                    tap: None,
                    tap_fd: Some(crate::microvm::TAP_FD),
                    mac: crate::microvm::guest_mac(&m.name),
                }]
            } else {
                vec![]
            },
            // `resources.disk_mib`: a sparse scratch disk (/dev/vda), kept across restarts.
            disk: match m.resources.disk_mib {
                Some(mib) => {
                    let path = dir.join("disk.img");
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(false)
                        .write(true)
                        .open(&path)
                        .map_err(runtime_err)?;
                    f.set_len(mib as u64 * 1024 * 1024).map_err(runtime_err)?;
                    vec![gatevisor_vmm::vm::DiskConfig {
                        path,
                        read_only: false,
                    }]
                }
                None => vec![],
            },
            vsock,
        };
        self.vms.define(&m.name, &cfg).map_err(runtime_err)
    }

    fn is_vm(&self, name: &str) -> bool {
        self.doc
            .services
            .get(name)
            .is_some_and(|r| r.runtime == "microvm")
    }

    /// The process that is the running service: a container's init, or a VM's VMM.
    fn service_pid(&self, name: &str) -> Option<i32> {
        if self.is_vm(name) {
            self.vms.pid(name)
        } else {
            self.rt.init_pid(name).ok().flatten()
        }
    }

    fn remove(&mut self, name: &str) -> Result<serde_json::Value> {
        self.record(name)?;
        self.stop_service(name, false)?;
        if let (Some(net), Some(rec)) = (self.net.as_mut(), self.doc.services.get(name)) {
            if let Err(e) = net.forget(rec.id, &veth_name(name)) {
                tracing::warn!("{name}: {e}");
            }
        }
        if self.is_vm(name) {
            self.vms.undefine(name);
        } else {
            self.rt.undefine(name).map_err(runtime_err)?;
        }
        let rec = self.doc.services.remove(name);
        if let Err(e) = self.persist() {
            if let Some(rec) = rec {
                self.doc.services.insert(name.to_string(), rec);
            }
            return Err(e);
        }
        self.live.remove(name);
        self.verdict_servers.remove(name);
        let _ = std::fs::remove_dir_all(self.service_run_dir(name));
        let _ = std::fs::remove_dir_all(self.service_dir(name));
        let _ = std::fs::remove_file(self.run_files(name).exit_file);
        // Everything the service owned goes: its versions in the image store (so the same
        // name and version installed again is that package's content, not the old one),
        // their blobs, and its logs.
        if let Err(e) = self.images.remove(name) {
            tracing::warn!("{name}: image store: {}", error_chain(&e));
        }
        self.gc_images();
        let log = self.log_file(name);
        let _ = std::fs::remove_file(&log);
        for n in 1..=self.settings.log_keep.max(1) {
            let _ = std::fs::remove_file(log.with_extension(format!("log.{n}")));
        }
        self.event(EventKind::Removed, Some(name), "removed");
        Ok(json!({ "removed": name }))
    }

    // ---------------------------------------------------------------- lifecycle

    /// Starts (or retries) a service; on failure applies its restart policy and returns the
    /// error.
    fn start_service(&mut self, name: &str, op: Op) -> Result<()> {
        self.transition(name, op)?;
        let rec = self.record(name)?;
        let argv = rec.manifest.command.clone();
        let files = self.run_files(name);
        let started = if self.is_vm(name) {
            let tap = if rec.manifest.network.interface {
                match crate::microvm::create_tap(&veth_name(name)) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let reason = format!("start failed: tap {}: {e}", veth_name(name));
                        self.after_end(name, None, reason.clone(), false);
                        return Err(err(ErrorKind::Runtime, reason));
                    }
                }
            } else {
                None
            };
            self.vms
                .start(name, &files.log_file, tap)
                .map(|child| lxc::Started {
                    init_pid: child.id() as i32,
                    monitor: child,
                })
                .map_err(|e| e.to_string())
        } else {
            self.rt
                .start(name, &argv, &files, self.settings.start_timeout)
                .map_err(|e| e.to_string())
        };
        match started {
            Ok(started) => {
                let monitor_pid = started.monitor.id() as i32;
                let running = Running {
                    monitor_pid,
                    init_pid: started.init_pid,
                    started_at_ms: now_ms(),
                    boot_id: proc::boot_id(),
                };
                self.transition(name, Op::Started)?;
                self.record_mut(name)?.running = Some(running);
                self.watch(name, monitor_pid, started.init_pid, Some(started.monitor));
                self.plug(name);
                let _ = self.persist();
                let kind = if op == Op::Retry {
                    EventKind::Restarted
                } else {
                    EventKind::Started
                };
                let restarts = self.record(name)?.restarts;
                self.event(
                    kind,
                    Some(name),
                    format!("init pid {}, restarts {restarts}", started.init_pid),
                );
                Ok(())
            }
            Err(e) => {
                let reason = format!("start failed: {e}");
                self.after_end(name, None, reason.clone(), false);
                Err(err(ErrorKind::Runtime, reason))
            }
        }
    }

    /// Starts a watcher thread for the monitor `pid`.
    /// Watches the monitor `pid` (the service's lifecycle) and the container's `init_pid` (the
    /// earliest sign of its death, for failing its traffic over).
    fn watch(&mut self, name: &str, pid: i32, init_pid: i32, child: Option<Child>) {
        self.generation += 1;
        let generation = self.generation;
        let live = self.live.entry(name.to_string()).or_default();
        live.generation = generation;
        live.child = child;
        live.retry_at = None;
        live.heartbeat_since = Some(Instant::now());
        let pidfd = match proc::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("cannot watch monitor {pid} of {name}: {e}");
                let _ = self.tx.send(Msg::MonitorExited {
                    name: name.into(),
                    generation,
                });
                return;
            }
        };
        let watcher_fd = pidfd.try_clone();
        live.pidfd = Some(pidfd);
        let init_fd = proc::pidfd_open(init_pid).ok();
        let tx = self.tx.clone();
        let name = name.to_string();
        let spawned = watcher_fd.map(|fd| {
            std::thread::Builder::new()
                .name(format!("watch-{name}"))
                .stack_size(64 * 1024)
                .spawn(move || {
                    if let Some(init_fd) = init_fd {
                        if proc::wait_either(&init_fd, &fd) {
                            let _ = tx.send(Msg::InitExited {
                                name: name.clone(),
                                generation,
                            });
                        }
                    }
                    proc::wait_pidfd(&fd, None);
                    let _ = tx.send(Msg::MonitorExited { name, generation });
                })
        });
        if !matches!(spawned, Ok(Ok(_))) {
            tracing::error!("cannot start a watcher thread; exits of this service will be missed");
        }
    }

    /// The monitor of `name` exited without being asked to.
    fn on_exit(&mut self, name: &str, generation: u64) {
        let Some(live) = self.live.get_mut(name) else {
            return;
        };
        if live.generation != generation {
            return;
        }
        live.generation = 0;
        live.pidfd = None;
        let status = live.child.take().and_then(|mut c| c.wait().ok());
        let Ok(rec) = self.record(name) else { return };
        if !rec.state.is_active() {
            return;
        }
        // Its traffic first: fail open (or closed) before anything else.
        self.unplug(name);
        let mut exit = self.read_exit(name);
        if let (None, None, Some(sig)) = (
            exit.code,
            exit.signal,
            status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        ) {
            // A VMM killed by a signal had no chance to write its record.
            exit.signal = Some(sig);
            exit.description = format!("killed by signal {sig}");
        }
        let desc = exit.description.clone();
        self.after_end(name, Some(exit), desc, true);
        let _ = self.persist();
    }

    fn read_exit(&self, name: &str) -> LastExit {
        match lxc::monitor::read_exit_record(&self.run_files(name).exit_file) {
            Some(r) => LastExit {
                code: r.code,
                signal: r.signal,
                at_ms: now_ms(),
                description: r.describe(),
            },
            // A VMM records its end as it exits; an empty record means it was killed (by a
            // signal a restarted daemon, not being its parent, cannot learn).
            None if self.is_vm(name) => LastExit {
                code: None,
                signal: None,
                at_ms: now_ms(),
                description: "killed (its VMM ended without recording how)".into(),
            },
            None => LastExit {
                code: None,
                signal: None,
                at_ms: now_ms(),
                description: "its monitor process ended without an exit record".into(),
            },
        }
    }

    /// Applies the restart policy after the program ended (`exit`) or failed to start.
    fn after_end(&mut self, name: &str, exit: Option<LastExit>, reason: String, was_running: bool) {
        let Ok(rec) = self.record_mut(name) else {
            return;
        };
        let ran_ms = rec
            .running
            .as_ref()
            .map(|r| now_ms().saturating_sub(r.started_at_ms))
            .unwrap_or(0);
        rec.running = None;
        if exit.is_some() {
            rec.last_exit = exit.clone();
        }
        let policy = rec.manifest.restart.clone();
        if ran_ms >= policy.stable_after_s * 1000 {
            rec.consecutive_failures = 0;
        }
        let clean = exit.as_ref().is_some_and(|e| e.code == Some(0));
        let wanted = rec.desired == Desired::Running;
        let retry = wanted
            && match policy.policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => !clean,
                RestartPolicy::Never => false,
            };
        if was_running {
            self.event_exit(EventKind::Exited, Some(name), exit.as_ref(), reason.clone());
        }
        let Ok(rec) = self.record_mut(name) else {
            return;
        };
        if !retry {
            if clean || !wanted {
                rec.desired = Desired::Stopped;
                let _ = rec.state.apply(Op::Exited).map(|s| rec.state = s);
                self.event(
                    EventKind::Stopped,
                    Some(name),
                    "ended; restart policy does not restart it",
                );
            } else {
                let why = format!("{reason}; restart policy is {:?}", policy.policy);
                rec.failure_reason = Some(why.clone());
                let _ = rec.state.apply(Op::GiveUp).map(|s| rec.state = s);
                self.event(EventKind::Failed, Some(name), why);
            }
            return;
        }
        rec.consecutive_failures += 1;
        let n = rec.consecutive_failures;
        if n > policy.max_retries {
            let why = format!(
                "{reason}; gave up after {} restarts in a row",
                policy.max_retries
            );
            rec.failure_reason = Some(why.clone());
            let _ = rec.state.apply(Op::GiveUp).map(|s| rec.state = s);
            self.event(EventKind::Failed, Some(name), why);
            return;
        }
        let _ = rec.state.apply(Op::Crashed).map(|s| rec.state = s);
        let delay = backoff(policy.backoff_initial_ms, policy.backoff_max_ms, n);
        self.live.entry(name.to_string()).or_default().retry_at = Some(Instant::now() + delay);
        tracing::info!("{name}: restart {n} of {} in {delay:?}", policy.max_retries);
    }

    /// Stops a service (if it runs). `by_request` records that the user wants it stopped.
    fn stop_service(&mut self, name: &str, by_request: bool) -> Result<()> {
        let rec = self.record_mut(name)?;
        if by_request {
            rec.desired = Desired::Stopped;
        }
        let timeout = Duration::from_secs(rec.manifest.stop_timeout_s as u64);
        match rec.state {
            State::Backoff => {
                self.transition(name, Op::Stop)?;
                if let Some(l) = self.live.get_mut(name) {
                    l.retry_at = None;
                }
            }
            State::Starting | State::Running => {
                self.transition(name, Op::Stop)?;
                // Its traffic fails over before the service goes away.
                self.unplug(name);
                // The exit that follows is ours: the watcher's report is ignored.
                let live = self.live.remove(name).unwrap_or_default();
                let how = if self.is_vm(name) {
                    if self.vms.stop(name, timeout) {
                        lxc::Stopped::Killed
                    } else {
                        lxc::Stopped::WasNotRunning
                    }
                } else {
                    self.rt.stop(name, timeout).map_err(runtime_err)?
                };
                if let Some(fd) = &live.pidfd {
                    proc::wait_pidfd(fd, Some(Duration::from_secs(10)));
                }
                if let Some(mut child) = live.child {
                    let _ = child.wait();
                }
                let exit = self.read_exit(name);
                let rec = self.record_mut(name)?;
                rec.running = None;
                rec.last_exit = Some(exit.clone());
                self.transition(name, Op::Exited)?;
                self.event_exit(
                    EventKind::Stopped,
                    Some(name),
                    Some(&exit),
                    format!("stopped ({how:?}): {}", exit.description),
                );
            }
            _ => {}
        }
        self.persist()
    }

    // ---------------------------------------------------------------- adoption

    /// After a daemon (re)start: adopt running containers, account for exits that happened
    /// while the daemon was away, and start what should run.
    fn adopt_all(&mut self) {
        let names: Vec<String> = self.doc.services.keys().cloned().collect();
        // Services from before ids existed get one.
        let mut next_id = self.doc.services.values().map(|r| r.id).max().unwrap_or(0);
        for rec in self.doc.services.values_mut().filter(|r| r.id == 0) {
            next_id += 1;
            rec.id = next_id;
        }
        for name in &names {
            self.register_network(name);
        }
        for name in names {
            let Ok(rec) = self.record(&name) else {
                continue;
            };
            let desired = rec.desired;
            let state = rec.state;
            let init = self.service_pid(&name);
            match init {
                Some(init_pid) => {
                    // The container's init is a child of its monitor; a VMM is its own.
                    let monitor_pid = if self.is_vm(&name) {
                        init_pid
                    } else {
                        proc::ppid(init_pid).unwrap_or(0)
                    };
                    let rec = self.record_mut(&name).expect("listed");
                    let started_at_ms = rec
                        .running
                        .as_ref()
                        .map(|r| r.started_at_ms)
                        .unwrap_or_else(now_ms);
                    rec.running = Some(Running {
                        monitor_pid,
                        init_pid,
                        started_at_ms,
                        boot_id: proc::boot_id(),
                    });
                    rec.state = State::Running;
                    self.watch(&name, monitor_pid, init_pid, None);
                    self.plug(&name);
                    self.event(
                        EventKind::Adopted,
                        Some(&name),
                        format!("re-adopted running container, init pid {init_pid}"),
                    );
                    if desired == Desired::Stopped {
                        let _ = self.stop_service(&name, false);
                    }
                }
                None if state.is_active() && self.ended_with_previous_boot(&name) => {
                    // The gateway restarted: the service did not fail, the machine went down
                    // under it. It comes back as it was, whatever its restart policy says.
                    let exit = self.read_exit(&name);
                    let desc = exit.description.clone();
                    if let Ok(rec) = self.record_mut(&name) {
                        rec.running = None;
                        rec.last_exit = Some(exit.clone());
                        rec.state = State::Stopped;
                    }
                    self.event_exit(
                        EventKind::Exited,
                        Some(&name),
                        Some(&exit),
                        format!("{desc} (ended with the previous boot of the gateway)"),
                    );
                    if desired == Desired::Running {
                        let _ = self.start_service(&name, Op::Start);
                    }
                }
                None if state.is_active() => {
                    // It ended while we were away.
                    let exit = self.read_exit(&name);
                    let desc = exit.description.clone();
                    if let Ok(rec) = self.record_mut(&name) {
                        rec.state = State::Running;
                    }
                    self.after_end(
                        &name,
                        Some(exit),
                        format!("{desc} (while the daemon was down)"),
                        true,
                    );
                }
                None if desired == Desired::Running && state == State::Backoff => {
                    self.live.entry(name.clone()).or_default().retry_at = Some(Instant::now());
                }
                // Installed, or stopped by a daemon shutdown with stop_services_on_exit.
                None if desired == Desired::Running
                    && matches!(state, State::Installed | State::Stopped) =>
                {
                    let _ = self.start_service(&name, Op::Start);
                }
                None => {}
            }
        }
        let _ = self.persist();
    }

    /// Whether `name` was last started in another boot of this machine.
    fn ended_with_previous_boot(&self, name: &str) -> bool {
        let recorded = self
            .record(name)
            .ok()
            .and_then(|r| r.running.as_ref())
            .and_then(|r| r.boot_id.clone());
        matches!((recorded, proc::boot_id()), (Some(then), Some(now)) if then != now)
    }

    // ---------------------------------------------------------------- views

    fn status(&mut self, name: &str) -> Result<serde_json::Value> {
        let (id, has_steering) = {
            let rec = self.record(name)?;
            (rec.id, !rec.manifest.network.steering.is_empty())
        };
        let (counters, fast_path_bytes) = match self.net.as_mut() {
            Some(net) if has_steering => (net.counters(id).ok(), net.fast_path_bytes().ok()),
            _ => (None, None),
        };
        let rec = self.record(name)?;
        let vm = rec.runtime == "microvm";
        let usage = match (rec.state == State::Running, vm) {
            // A VM's memory: its VMM's resident set, guest pages it has touched included.
            (true, true) => Some(lxc::Usage {
                memory_bytes: self.vms.rss_bytes(name),
                cpu_usec: None,
                pids: None,
            }),
            (true, false) => self.rt.usage(name).ok(),
            _ => None,
        };
        let running = rec.running.as_ref();
        let m = &rec.manifest;
        let live = self.live.get(name);
        Ok(json!({
            "id": id,
            "steering": has_steering.then(|| json!({
                "policies": m.network.steering,
                "counters": counters,
                "api_verdicts": live.map(|l| l.api_verdicts).unwrap_or_default(),
                "bridge_fast_path_bytes": fast_path_bytes,
            })),
            "network_error": live.and_then(|l| l.net_error.clone()),
            "name": name,
            "version": m.version,
            "package_version": rec.package_version,
            // The publisher key that signed the installed package.
            "publisher": rec
                .package_version
                .as_ref()
                .and_then(|v| self.images.version(name, v).ok())
                .and_then(|i| i.publisher()),
            "runtime": rec.runtime,
            "state": rec.state,
            "desired": rec.desired,
            "init_pid": running.map(|r| r.init_pid),
            "monitor_pid": running.map(|r| r.monitor_pid),
            "started_at_ms": running.map(|r| r.started_at_ms),
            "uptime_s": running.map(|r| now_ms().saturating_sub(r.started_at_ms) / 1000),
            "restarts": rec.restarts,
            "consecutive_failures": rec.consecutive_failures,
            "last_exit": rec.last_exit,
            "failure_reason": rec.failure_reason,
            "memory": {
                "usage_bytes": usage.as_ref().and_then(|u| u.memory_bytes),
                "limit_bytes": m.resources.memory_mib as u64 * 1024 * 1024,
            },
            "cpu_usec": usage.as_ref().and_then(|u| u.cpu_usec),
            "pids": usage.as_ref().and_then(|u| u.pids),
            "failure_mode": m.failure_mode,
            "interface": m.network.interface.then(|| veth_name(name)),
            "container": (!vm).then(|| json!({ "lxcpath": self.rt.lxcpath(), "name": name })),
            "microvm": vm.then(|| json!({
                "config": self.vms.config_path(name),
                "guest_memory_bytes": crate::microvm::guest_memory_mib(m.resources.memory_mib) * 1024 * 1024,
                "console": self.vms.console_path(name),
                "vmm_rss_bytes": usage.as_ref().and_then(|u| u.memory_bytes),
            })),
            "log_file": self.log_file(name),
            "source": rec.source,
        }))
    }

    fn logs(&self, name: &str, offset: Option<u64>, tail_bytes: u64) -> Result<serde_json::Value> {
        use std::io::{Read, Seek, SeekFrom};
        self.record(name)?;
        let path = self.log_file(name);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(_) => return Ok(json!({"data": "", "next_offset": 0})),
        };
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = match offset {
            // A smaller file than the offset means it was rotated: start over.
            Some(o) if o <= size => o,
            Some(_) => 0,
            None => size.saturating_sub(tail_bytes),
        };
        let want = (size - from).min(1 << 20);
        let mut buf = vec![0u8; want as usize];
        f.seek(SeekFrom::Start(from)).map_err(runtime_err)?;
        f.read_exact(&mut buf).map_err(runtime_err)?;
        Ok(json!({"data": String::from_utf8_lossy(&buf), "next_offset": from + want}))
    }
}

/// Builds `rootfs` into an ext4 image of `mib` MiB (the service's disk limit) and removes the
/// directory: the container runs from the image through a loop device.
fn make_disk_image(rootfs: &Path, img: &Path, mib: u32, root_owner: u32) -> Result<PathBuf> {
    if !Path::new("/dev/loop-control").exists() {
        return Err(err(
            ErrorKind::Invalid,
            "field `resources.disk_mib`: this board has no loop devices to enforce a disk limit; remove the field".to_string(),
        ));
    }
    let f = std::fs::File::create(img).map_err(runtime_err)?;
    f.set_len(mib as u64 * 1024 * 1024).map_err(runtime_err)?;
    drop(f);
    let out = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E"])
        .arg(format!("root_owner={root_owner}:{root_owner}"))
        .arg("-d")
        .arg(rootfs)
        .arg(img)
        .output()
        .map_err(|e| {
            err(
                ErrorKind::Runtime,
                format!("cannot run mkfs.ext4 (e2fsprogs): {e}"),
            )
        })?;
    if !out.status.success() {
        let _ = std::fs::remove_file(img);
        return Err(err(
            ErrorKind::Invalid,
            format!(
                "field `resources.disk_mib`: the image does not fit in {mib} MiB ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let _ = std::fs::remove_dir_all(rootfs);
    Ok(img.to_path_buf())
}

/// Copies a rootfs tree within the package limits (files and bytes).
fn copy_rootfs(
    from: &Dir,
    to: &Dir,
) -> std::result::Result<(), gatevisor_images::beneath::CopyError> {
    let limits = gatevisor_images::package::Limits::default();
    gatevisor_images::beneath::copy_tree(
        from,
        to,
        gatevisor_images::beneath::CopyLimits {
            max_files: limits.max_files,
            max_bytes: limits.max_total_bytes,
        },
    )
}

/// Host ids of service containers' user namespaces: service `id` gets 65,536 ids from
/// `IDMAP_BASE + id * 65,536`, far above the ranges Debian gives users in /etc/subuid.
const IDMAP_BASE: u32 = 0x1000_0000;

fn idmap_for(id: u32) -> lxc::IdMap {
    lxc::IdMap {
        host_base: IDMAP_BASE + id * 65_536,
        count: 65_536,
    }
}

/// Which runtime the service really gets (`auto` resolved for this board).
fn resolve_runtime(board: &BoardReport, m: &Manifest, path: &Path) -> Result<&'static str> {
    Ok(match m.runtime {
        RuntimeKind::Lxc => "lxc",
        // A microVM where the board runs them, for an image that can boot as one (a
        // package carries an initramfs), with gatevisor's guest init present (it runs
        // the service and its control channel); LXC otherwise.
        RuntimeKind::Auto => match board.auto_runtime {
            AutoRuntime::Microvm
                if m.image == "package"
                    && Manifest::package_initramfs(path).is_file()
                    && crate::microvm::guest_init().is_some() =>
            {
                "microvm"
            }
            _ => "lxc",
        },
        RuntimeKind::Microvm if !board.kvm.microvm_capable => {
            return Err(err(
                ErrorKind::Invalid,
                format!(
                    "{}: field `runtime`: this board's KVM cannot run microVMs ({}); use \"lxc\" or \"auto\"",
                    path.display(),
                    board.auto_runtime_reason
                ),
            ))
        }
        RuntimeKind::Microvm => "microvm",
    })
}

/// The gateway's checks of a verified package before the image store commits it: its service
/// manifest is valid, names the same service and version as the package and uses the
/// package's image, and the privilege policy grants what it asks for its publisher.
fn package_check(
    policy: &crate::policy::Policy,
) -> impl FnMut(
    &Path,
    &gatevisor_images::package::PackageManifest,
) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync>>
       + '_ {
    move |dir, pm| {
        let file = dir.join("service.toml");
        let m = Manifest::load_packaged(&file).map_err(|e| {
            // The staging path means nothing to the user: name the file in the package.
            error_chain(&e).replace(&file.display().to_string(), "service.toml")
        })?;
        if m.name != pm.name || m.version != pm.version {
            return Err(format!(
                "service.toml: fields `name` and `version` ({:?} {:?}) must be the package's own ({:?} {:?})",
                m.name, m.version, pm.name, pm.version
            )
            .into());
        }
        let signer = std::fs::read_to_string(dir.join(gatevisor_images::package::SIGNER))?;
        let (id, name) = signer.trim().split_once(' ').unwrap_or((signer.trim(), ""));
        let who = crate::policy::Requester::Publisher {
            id: id.into(),
            name: name.into(),
        };
        let caps = m
            .capability_set(Path::new("service.toml"))
            .map_err(|e| e.to_string())?;
        policy.check(&who, &caps)?;
        if m.privileged {
            policy.check_privileged(&who)?;
        }
        Ok(())
    }
}

/// A package install's slow part, on a worker: verify and unpack into the image store (the
/// gateway's checks run before it commits), then, for a container, copy its rootfs into
/// `services/.NAME.prepared/rootfs` for the loop to move into place.
fn prepare_package(
    images: &gatevisor_images::store::Store,
    policy: &crate::policy::Policy,
    board: &BoardReport,
    pkg: &Path,
    name: &str,
    services: &Path,
) -> Result<Prepared> {
    let new_entry = images.current(name).is_none();
    let mut check = package_check(policy);
    let installed = images
        .install_checked(pkg, &mut check, &mut |_| {})
        .map_err(|e| store_refusal(pkg, &e))?;
    let res = prepare_rootfs(installed, board, services, new_entry);
    if res.is_err() && new_entry {
        let _ = images.remove(name);
    }
    res
}

fn prepare_rootfs(
    installed: gatevisor_images::store::Installed,
    board: &BoardReport,
    services: &Path,
    new_entry: bool,
) -> Result<Prepared> {
    let file = installed.service_manifest();
    let m = Manifest::load(&file).map_err(|e| err(ErrorKind::Invalid, error_chain(&e)))?;
    let rootfs = match (resolve_runtime(board, &m, &file)?, installed.rootfs()) {
        ("lxc", Some(src)) => {
            let staging = services.join(format!(".{}.prepared", installed.name));
            let _ = std::fs::remove_dir_all(&staging);
            let rootfs = staging.join("rootfs");
            let copied = std::fs::create_dir_all(&rootfs)
                .map_err(runtime_err)
                .and_then(|()| {
                    let (from, to) = (
                        Dir::open(&src).map_err(runtime_err)?,
                        Dir::open(&rootfs).map_err(runtime_err)?,
                    );
                    copy_rootfs(&from, &to).map_err(|e| runtime_err(error_chain(&e)))
                });
            if let Err(e) = copied {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(e);
            }
            Some(rootfs)
        }
        _ => None,
    };
    Ok(Prepared {
        installed,
        rootfs,
        new_entry,
    })
}

/// A refused package as an API error: the policy's refusals are `denied`, the rest
/// `invalid`; the message keeps every cause.
fn store_refusal(pkg: &Path, e: &gatevisor_images::store::StoreError) -> ApiError {
    let denied = matches!(e, gatevisor_images::store::StoreError::Rejected { source, .. }
        if source.downcast_ref::<crate::policy::PolicyError>().is_some());
    err(
        if denied {
            ErrorKind::Denied
        } else {
            ErrorKind::Invalid
        },
        format!("{}: {}", pkg.display(), error_chain(e)).replacen(
            &format!("{}: package {}", pkg.display(), pkg.display()),
            &format!("package {}", pkg.display()),
            1,
        ),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ImageRootError {
    #[error("{0}: an image root must be an absolute path")]
    Relative(PathBuf),
    #[error("{path}: cannot use it as an image root")]
    Unusable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: an image root must not be / or hold the state directory {1} (an install would copy the store into itself)")]
    HoldsState(PathBuf, PathBuf),
    #[error("{0}: an image root must not be inside the state directory {1}")]
    InsideState(PathBuf, PathBuf),
}

/// The configured image roots, resolved (symlinks in the configuration are the operator's)
/// and checked: never `/`, never one that holds the state directory or lies inside it.
pub fn check_image_roots(
    roots: Vec<PathBuf>,
    state_dir: &Path,
) -> std::result::Result<Vec<PathBuf>, ImageRootError> {
    let _ = std::fs::create_dir_all(state_dir);
    let state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    roots
        .into_iter()
        .map(|r| {
            if !r.is_absolute() {
                return Err(ImageRootError::Relative(r));
            }
            let c = std::fs::canonicalize(&r).map_err(|source| ImageRootError::Unusable {
                path: r.clone(),
                source,
            })?;
            if state.starts_with(&c) {
                return Err(ImageRootError::HoldsState(r, state.clone()));
            }
            if c.starts_with(&state) {
                return Err(ImageRootError::InsideState(r, state.clone()));
            }
            Ok(c)
        })
        .collect()
}

/// Packages are files ending in `.gvpkg`.
fn is_package(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gvpkg")
}

/// Does something accept TCP connections on `port` inside the network namespace of `pid`?
fn tcp_in_netns(pid: i32, port: u16) -> bool {
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

/// `initial * 2^(n-1)`, capped at `max`.
pub fn backoff(initial_ms: u64, max_ms: u64, n: u32) -> Duration {
    let factor = 1u64.checked_shl(n.saturating_sub(1)).unwrap_or(u64::MAX);
    Duration::from_millis(initial_ms.saturating_mul(factor).min(max_ms))
}

fn check_static_busybox(path: &Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| {
        err(
            ErrorKind::Runtime,
            format!(
                "cannot read {}: {e} (install busybox-static)",
                path.display()
            ),
        )
    })?;
    let needle = b"ld-linux";
    if bytes.windows(needle.len()).take(4096).any(|w| w == needle) {
        return Err(err(
            ErrorKind::Runtime,
            format!(
                "{} is dynamically linked; install busybox-static",
                path.display()
            ),
        ));
    }
    Ok(())
}

/// Copies a directory tree: files with their modes, directories and symlinks as they are.
/// Device nodes, FIFOs and sockets are refused.
pub fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dst)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let to = dst.join(entry.file_name());
        if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &to)?;
        } else if ty.is_dir() {
            copy_tree(&entry.path(), &to)?;
            let mode = entry.metadata()?.permissions().mode();
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode))?;
        } else if ty.is_file() {
            std::fs::copy(entry.path(), &to)?;
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{}: special files are not allowed in a rootfs",
                    entry.path().display()
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_caps() {
        let b: Vec<u64> = (1..=6)
            .map(|n| backoff(200, 3000, n).as_millis() as u64)
            .collect();
        assert_eq!(b, [200, 400, 800, 1600, 3000, 3000]);
        assert_eq!(backoff(200, 3000, 200).as_millis(), 3000);
    }

    #[test]
    fn copy_tree_keeps_symlinks_and_modes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/tool"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(src.join("bin/tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("tool", src.join("bin/alias")).unwrap();
        copy_tree(&src, &d.path().join("dst")).unwrap();
        let dst = d.path().join("dst/bin");
        assert_eq!(
            std::fs::read_link(dst.join("alias")).unwrap(),
            Path::new("tool")
        );
        assert_eq!(
            std::fs::metadata(dst.join("tool"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o755
        );
    }
}
