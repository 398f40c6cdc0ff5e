//! `gatevisor daemon`: the control socket, signal handling and the supervisor thread.
//!
//! The socket server only parses and forwards: each connection carries one request line and
//! gets one reply line (or, for `events` with `follow`, a stream of event lines).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};

use anyhow::{Context, Result};
use serde::Deserialize;

use gatevisor::api::{ApiError, Envelope, ErrorKind, Reply, Request, API_VERSION};
use gatevisor::supervisor::{Msg, Settings, Supervisor};

/// `/etc/gatevisor/gatevisor.toml`; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    /// Board profile name, or "auto".
    pub board: Option<String>,
    pub boards_dir: Option<PathBuf>,
    pub stop_services_on_exit: Option<bool>,
    pub log_max_bytes: Option<u64>,
    pub log_keep: Option<u32>,
    /// Seconds before a service that gave up (its restart policy's max_retries) is tried
    /// again, and again after every give-up (default 300; 0: never, it stays failed).
    pub failed_retry_s: Option<u64>,
    /// Plug services into Open vSwitch and steer their traffic (default true).
    pub network: Option<bool>,
    /// Bridge to use instead of the board profile's.
    pub bridge: Option<String>,
    /// Trusted publisher keys (default /etc/gatevisor/keys).
    pub keys_dir: Option<PathBuf>,
    /// The embedded USP agent (remote control by the operator's launcher over MQTT).
    pub usp: Option<gatevisor::usp::mqtt::MqttConfig>,
    /// Serve `Device.SoftwareModules.` to the gateway's USP Broker (a USP Service over UDS).
    pub usp_service: Option<gatevisor::usp::uds::UdsConfig>,
    /// The CAs `https://` package URLs are checked against (default: the system's bundle).
    pub package_ca: Option<PathBuf>,
    /// How long a remote InstallDU/Update/Uninstall may take before it is failed
    /// (default 3600 s, at most 86400 s: TR-181's R-SMM.1).
    pub usp_operation_deadline_s: Option<u64>,
    /// The privilege policy: which capabilities services may keep (see `gatevisor::policy`).
    pub policy: Option<gatevisor::policy::PolicyConfig>,
    /// Host directories under which local manifests may name `rootfs:DIR` images (default:
    /// none; never `/`, never one that holds the state directory).
    pub image_roots: Option<Vec<PathBuf>>,
    /// How OCI registries are reached, by `HOST[:PORT]`: `ca`, `username`, `password_file`
    /// (every registry also trusts `package_ca`).
    pub registries:
        Option<std::collections::BTreeMap<String, gatevisor_images::oci::registry::RegistryAccess>>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile> {
        match std::fs::read_to_string(path) {
            Ok(text) => toml::from_str(&text)
                .with_context(|| format!("invalid configuration file {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }
}

pub struct DaemonOptions {
    pub socket: PathBuf,
    pub settings: Settings,
    pub board: gatevisor_board::BoardReport,
    pub usp: Option<gatevisor::usp::mqtt::MqttConfig>,
    pub usp_service: Option<gatevisor::usp::uds::UdsConfig>,
    pub package_ca: PathBuf,
    pub usp_operation_deadline: std::time::Duration,
}

/// The USP model's way to the supervisor: the same requests the control socket carries.
struct LoopBackend(std::sync::Mutex<Sender<Msg>>);

impl LoopBackend {
    /// The supervisor's events from now on (none once it is gone).
    fn follow(&self) -> mpsc::Receiver<gatevisor::events::Event> {
        let (etx, erx) = mpsc::channel();
        let _ = self.0.lock().unwrap().send(Msg::Follow(etx));
        erx
    }
}

/// How often USP compares its whole tree for what changes without an event (steering
/// counters, memory and CPU use).
const USP_COUNTERS_PERIOD: std::time::Duration = std::time::Duration::from_secs(10);

impl gatevisor::usp::model::Backend for LoopBackend {
    fn call(&self, req: Request) -> std::result::Result<serde_json::Value, ApiError> {
        let (rtx, rrx) = mpsc::channel();
        let gone = || ApiError::new(ErrorKind::Internal, "the daemon is shutting down");
        self.0
            .lock()
            .unwrap()
            .send(Msg::Request(req, rtx))
            .map_err(|_| gone())?;
        match rrx.recv().map_err(|_| gone())? {
            Reply::Ok { result } => Ok(result),
            Reply::Error { error } => Err(error),
        }
    }
}

/// Runs until SIGTERM or SIGINT.
pub fn run(opts: DaemonOptions) -> Result<()> {
    // Block the termination signals in every thread; one thread takes them with sigwait.
    let mut sigs = nix::sys::signal::SigSet::empty();
    sigs.add(nix::sys::signal::Signal::SIGTERM);
    sigs.add(nix::sys::signal::Signal::SIGINT);
    sigs.thread_block().context("cannot block signals")?;

    let (tx, rx) = mpsc::channel::<Msg>();
    let state_dir = opts.settings.state_dir.clone();
    let runtimes = gatevisor::runtime::Kind::available(&opts.board);
    let registries = opts.settings.registries.clone();
    let supervisor = Supervisor::new(opts.settings, opts.board, tx.clone())?;
    if opts.usp.is_some() || opts.usp_service.is_some() {
        let backend = std::sync::Arc::new(LoopBackend(std::sync::Mutex::new(tx.clone())));
        let (mqtt, uds) = (opts.usp, opts.usp_service);
        let model_opts = gatevisor::usp::model::ModelOptions {
            runtimes,
            package_ca: opts.package_ca,
            operation_deadline: opts.usp_operation_deadline,
            controllers: mqtt
                .iter()
                .flat_map(|m| m.controllers.iter().map(|c| c.endpoint_id.clone()))
                .collect(),
            registries,
        };
        // The model asks the supervisor loop, which starts below: open it on its own thread.
        std::thread::Builder::new()
            .name("usp-start".into())
            .spawn(move || {
                if let Err(e) = start_usp(backend, &state_dir, model_opts, mqtt, uds) {
                    tracing::error!("usp: the agent did not start: {e:#}");
                }
            })?;
    }
    let listener = bind(&opts.socket)?;
    tracing::info!("control socket {}", opts.socket.display());

    let sig_tx = tx.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = sigs.wait() {
                tracing::info!("received {sig:?}, shutting down");
            }
            let _ = sig_tx.send(Msg::Shutdown);
        })?;

    let srv_tx = tx.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || serve(listener, srv_tx))?;
    drop(tx);

    let notifier = gatevisor::notify::Notifier::from_env();
    supervisor.run(rx, notifier);
    let _ = std::fs::remove_file(&opts.socket);
    Ok(())
}

/// Opens the USP data model and starts its transports; notifications go to the transport
/// that knows their recipient (a configured MQTT controller, else the Broker over UDS).
fn start_usp(
    backend: std::sync::Arc<LoopBackend>,
    state_dir: &Path,
    model_opts: gatevisor::usp::model::ModelOptions,
    mqtt: Option<gatevisor::usp::mqtt::MqttConfig>,
    uds: Option<gatevisor::usp::uds::UdsConfig>,
) -> Result<()> {
    use gatevisor::usp;
    let (out_tx, out_rx) = mpsc::channel::<usp::model::Notification>();
    let events = backend.follow();
    let model = usp::model::Model::open(backend, state_dir, model_opts, out_tx)?;
    let codec: std::sync::Arc<dyn usp::codec::Codec> = std::sync::Arc::new(usp::codec::Rusp);
    let (mqtt_tx, mqtt_rx) = mpsc::channel();
    let (uds_tx, uds_rx) = mpsc::channel();
    let controllers: Vec<String> = mqtt
        .iter()
        .flat_map(|m| m.controllers.iter().map(|c| c.endpoint_id.clone()))
        .collect();
    let has_uds = uds.is_some();
    std::thread::Builder::new()
        .name("usp-route".into())
        .spawn(move || {
            for (recipient, out) in out_rx {
                let to_mqtt = controllers.contains(&recipient) || !has_uds;
                let _ = if to_mqtt {
                    mqtt_tx.send((recipient, out))
                } else {
                    uds_tx.send((recipient, out))
                };
            }
        })?;
    // Value changes and object creation/deletion: looked for at once when the supervisor
    // tells of a change (an install, a start, an end, a setting, a removal; a burst is one
    // look), and every USP_COUNTERS_PERIOD for what changes without telling; the tree a
    // new subscriber's changes are found against is taken within a second. Overdue
    // notifications (NotifRetry) are sent again within a second.
    let watched = model.clone();
    std::thread::Builder::new()
        .name("usp-watch".into())
        .spawn(move || {
            use std::sync::mpsc::RecvTimeoutError;
            use std::time::{Duration, Instant};
            let mut prev = None;
            let mut next_full = Instant::now();
            loop {
                let told = match events.recv_timeout(Duration::from_secs(1)) {
                    Ok(_) => {
                        while events.try_recv().is_ok() {}
                        true
                    }
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(Duration::from_secs(1));
                        false
                    }
                };
                // A new subscriber's baseline is taken within a second, not at the change
                // it waits for.
                let baseline = prev.is_none() && watched.watched();
                if told || baseline || Instant::now() >= next_full {
                    watched.watch(&mut prev);
                    next_full = Instant::now() + USP_COUNTERS_PERIOD;
                }
                watched.retry_due();
            }
        })?;
    if let Some(cfg) = mqtt {
        let what = format!("agent {} on broker {}", cfg.endpoint_id, cfg.broker);
        usp::mqtt::spawn(cfg, model.clone(), codec.clone(), mqtt_rx)?;
        tracing::info!("usp: {what}");
    }
    if let Some(cfg) = uds {
        let what = format!(
            "service {} for the Broker at {}",
            cfg.endpoint_id,
            cfg.broker_path.display()
        );
        usp::uds::spawn(cfg, model, codec, uds_rx)?;
        tracing::info!("usp: {what}");
    }
    Ok(())
}

fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if UnixStream::connect(socket).is_ok() {
        anyhow::bail!(
            "another gatevisor daemon is already listening on {}",
            socket.display()
        );
    }
    let _ = std::fs::remove_file(socket);
    // Create the socket with no access for others from the first instant.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(socket);
    nix::sys::stat::umask(old);
    let listener = listener.with_context(|| format!("cannot bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn serve(listener: UnixListener, tx: Sender<Msg>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let tx = tx.clone();
        let _ = std::thread::Builder::new()
            .name("api-conn".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                if let Err(e) = serve_one(conn, tx) {
                    tracing::debug!("api connection: {e}");
                }
            });
    }
}

fn write_line<T: serde::Serialize>(w: &mut UnixStream, body: &T) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(&Envelope {
        v: API_VERSION,
        body,
    })
    .expect("serialises");
    line.push(b'\n');
    w.write_all(&line)
}

/// How long a client may take to send its request line before the connection is closed.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn serve_one(mut conn: UnixStream, tx: Sender<Msg>) -> std::io::Result<()> {
    let mut line = String::new();
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    // A client that does not read its reply cannot hold the connection's thread forever.
    conn.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    BufReader::new(conn.try_clone()?)
        .take(1 << 20)
        .read_line(&mut line)?;
    let parsed: Result<Envelope<Request>, _> = serde_json::from_str(&line);
    let req = match parsed {
        Ok(e) if e.v == API_VERSION => e.body,
        Ok(e) => {
            let error = ApiError::new(
                ErrorKind::Version,
                format!(
                    "API version {} is not supported; this daemon speaks {API_VERSION}",
                    e.v
                ),
            );
            return write_line(&mut conn, &Reply::Error { error });
        }
        Err(e) => {
            let error = ApiError::new(ErrorKind::Invalid, format!("bad request: {e}"));
            return write_line(&mut conn, &Reply::Error { error });
        }
    };
    if let Request::Events { follow: true, .. } = req {
        // Past events first, then a stream until the client goes away.
        let (rtx, rrx) = mpsc::channel();
        let _ = tx.send(Msg::Request(req, rtx));
        if let Ok(reply) = rrx.recv() {
            write_line(&mut conn, &reply)?;
        }
        let (etx, erx) = mpsc::channel();
        let _ = tx.send(Msg::Follow(etx));
        for ev in erx {
            write_line(&mut conn, &ev)?;
        }
        return Ok(());
    }
    let (rtx, rrx) = mpsc::channel();
    if tx.send(Msg::Request(req, rtx)).is_err() {
        let error = ApiError::new(ErrorKind::Internal, "the daemon is shutting down");
        return write_line(&mut conn, &Reply::Error { error });
    }
    match rrx.recv() {
        Ok(reply) => write_line(&mut conn, &reply),
        Err(_) => {
            let error = ApiError::new(ErrorKind::Internal, "the daemon is shutting down");
            write_line(&mut conn, &Reply::Error { error })
        }
    }
}
