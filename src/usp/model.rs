//! TR-181 `Device.SoftwareModules.` (and the agent's `Device.LocalAgent.Subscription.` and
//! `.Request.` tables) over gatevisor's real state, transport-independent: a transport hands
//! [`Model::handle`] each request from a trusted Controller and sends what the model puts in
//! its outbox (notifications) to their recipients.
//!
//! Every Get builds the tree afresh from the supervisor (`List`), so it never disagrees with
//! the CLI. Instance numbers, DU UUIDs and URLs, subscriptions and in-flight operations persist
//! in `usp.json` under the state directory (written with fsync before an OperateResp leaves).

use super::codec::{Fault, GetResult, Incoming, NotifyKind, OperateOutcome, Outgoing};
use super::path::Pattern;
use super::schema::{self, Known, CONTROLLERS, REQS, SUBS};
use crate::api::{ApiError, ErrorKind, Request, ServiceStatus};
use crate::lifecycle::State;
use crate::state::Desired;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

pub const SM: &str = "Device.SoftwareModules.";
/// The vendor prefix of gatevisor's own parameters (TR-106: `X_<VENDOR>_`).
pub const VENDOR: &str = "X_GATEVISOR-ORG_";

// USP error codes (TR-369).
pub const E_GENERAL: u32 = 7000;
pub const E_NOT_SUPPORTED: u32 = 7001;
pub const E_INVALID_ARGUMENTS: u32 = 7004;
pub const E_PERMISSION: u32 = 7006;
pub const E_PATH_SYNTAX: u32 = 7008;
pub const E_UNSUPPORTED_PARAM: u32 = 7010;
pub const E_INVALID_TYPE: u32 = 7011;
pub const E_INVALID_VALUE: u32 = 7012;
pub const E_READ_ONLY: u32 = 7013;
pub const E_NO_OBJECT: u32 = 7016;
pub const E_NOT_A_TABLE: u32 = 7018;
pub const E_NOT_CREATABLE: u32 = 7019;
pub const E_COMMAND_FAILURE: u32 = 7022;
pub const E_NOT_DELETABLE: u32 = 7024;
pub const E_UNIQUE_KEY: u32 = 7025;
pub const E_INVALID_PATH: u32 = 7026;
pub const E_INVALID_ARGS: u32 = 7027;
// TR-181 software module faults (TR-069's 90xx, as TR-181 numbers them for USP: 72xx).
pub const F_FILE_CORRUPTED: u32 = 7218;
pub const F_FILE_AUTHENTICATION: u32 = 7219;
pub const F_UNKNOWN_EE: u32 = 7223;
pub const F_DUPLICATE_DU: u32 = 7226;
pub const F_RESOURCES: u32 = 7227;
pub const F_INVALID_DU_STATE: u32 = 7229;

/// What the supervisor answers: the same requests the CLI sends.
pub trait Backend: Send + Sync {
    fn call(&self, req: Request) -> Result<Value, ApiError>;
}

/// What a Controller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The operator's launcher: everything.
    Launcher,
    /// Read and subscribe only.
    Observer,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Unit {
    instance: u32,
    uuid: String,
    url: String,
    /// The instance number of each setting the unit has declared (`…Setting.{i}.`), kept
    /// when later versions add or drop declarations; a number is never given to another
    /// setting of the unit.
    #[serde(default)]
    settings: BTreeMap<String, u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Subscription {
    instance: u32,
    id: String,
    recipient: String,
    notif_type: String,
    reference_list: Vec<String>,
    notif_retry: bool,
    enable: bool,
    persistent: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "lowercase")]
enum OpKind {
    Install {
        url: String,
        uuid: String,
        /// The execution environment asked for (`ExecutionEnvRef`), as a runtime.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runtime: Option<crate::runtime::Kind>,
    },
    Update {
        name: String,
        url: String,
    },
    Uninstall {
        name: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PendingOp {
    instance: u32,
    /// The command's full path, e.g. `Device.SoftwareModules.InstallDU()`.
    command: String,
    command_key: String,
    originator: String,
    kind: OpKind,
    /// The service name once known (an install learns it from the package).
    name: Option<String>,
    started: String,
    /// The supervisor's answer once it succeeded, journaled before anyone is told, so that a
    /// daemon that dies in between reports the truth after its restart.
    #[serde(default)]
    outcome: Option<String>,
    /// The DU as it was when an Update or Uninstall began: an Uninstall's `DUStateChange!`
    /// still names what was removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    du: Option<DuSnapshot>,
}

/// What `DUStateChange!` says of a DU.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct DuSnapshot {
    path: String,
    uuid: String,
    version: String,
    eu_list: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    next_instance: u32,
    units: BTreeMap<String, Unit>,
    next_subscription: u32,
    subscriptions: Vec<Subscription>,
    next_request: u32,
    requests: Vec<PendingOp>,
    /// Notifications sent with `send_resp` whose NotifyResp has not come yet (NotifRetry):
    /// kept on disk, so a restarted daemon sends them again.
    #[serde(default)]
    unacked: Vec<Unacked>,
}

/// A notification for `recipient` (a Controller's endpoint id).
pub type Notification = (String, Outgoing);

/// NotifRetry: first retry after this, then twice as long each time (TR-181's defaults for
/// `NotifRetryMinimumWaitInterval` and `NotifRetryIntervalMultiplier`).
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(5);
const RETRY_MAX_ATTEMPTS: u32 = 10;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Unacked {
    recipient: String,
    subscription_id: String,
    kind: NotifyKind,
    attempts: u32,
    /// When to send it again; `None` (as after a restart): at once.
    #[serde(skip)]
    next: Option<std::time::Instant>,
}

/// How long an asynchronous operation may take at most (R-SMM.1 allows 24 h).
pub const MAX_OPERATION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What the model is opened with, besides its backend and outbox.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// The runtimes this board offers, in ExecEnv instance order.
    pub runtimes: Vec<crate::runtime::Kind>,
    /// The CA bundle that `https://` package URLs are verified against.
    pub package_ca: PathBuf,
    /// Every InstallDU/Update/Uninstall ends within this, failed if need be
    /// (at most [`MAX_OPERATION_DEADLINE`]).
    pub operation_deadline: std::time::Duration,
    /// The Controllers configured to reach this agent (endpoint ids), in
    /// `Device.LocalAgent.Controller.{i}` order; a Broker met later is added with
    /// [`Model::add_controller`].
    pub controllers: Vec<String>,
    /// How OCI registries are reached (InstallDU of `docker://` images), and where each
    /// keeps its images' deployment documents.
    pub registries: gatevisor_images::oci::registry::Registries,
}

pub struct Model {
    backend: Arc<dyn Backend>,
    state_file: PathBuf,
    downloads: PathBuf,
    /// The runtimes this board offers, in ExecEnv instance order.
    runtimes: Vec<crate::runtime::Kind>,
    st: Mutex<Persisted>,
    outbox: Mutex<Sender<Notification>>,
    /// TLS for `https://` package URLs (or why there is none).
    https: Result<Arc<rustls::ClientConfig>, String>,
    operation_deadline: std::time::Duration,
    registries: gatevisor_images::oci::registry::Registries,
    cpu: Mutex<BTreeMap<String, (u64, std::time::Instant)>>,
    /// `Device.LocalAgent.Controller.{i}`: endpoint ids.
    controllers: Mutex<Vec<String>>,
}

fn now_iso() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (year, month, day) = gatevisor_vmm::devices::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn random_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Does `path` match `pattern` (no search expressions: a subscription's reference)?
fn matches(pattern: &str, path: &str) -> bool {
    super::path::matches(pattern, path, &BTreeMap::new())
}

/// Every instance object on the way to some parameter of `params`.
fn instance_objects(params: &BTreeMap<String, String>) -> BTreeSet<String> {
    params
        .keys()
        .flat_map(|k| {
            let segs: Vec<&str> = k.split('.').collect();
            (0..segs.len())
                .filter(|i| segs[*i].parse::<u32>().is_ok())
                .map(|i| format!("{}.", segs[..=i].join(".")))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The object part of a parameter path (through its last dot).
fn object_of(param: &str) -> &str {
    match param.rfind('.') {
        Some(i) => &param[..=i],
        None => param,
    }
}

/// A supervisor error as a TR-181 fault code, by its kind.
fn fault_of(e: &ApiError) -> u32 {
    match e.kind {
        ErrorKind::Untrusted => F_FILE_AUTHENTICATION,
        ErrorKind::Corrupt => F_FILE_CORRUPTED,
        ErrorKind::Duplicate => F_DUPLICATE_DU,
        ErrorKind::NoResources => F_RESOURCES,
        ErrorKind::Conflict => F_INVALID_DU_STATE,
        _ => E_COMMAND_FAILURE,
    }
}

/// A supervisor error as a Controller reads it in a fault string: without the gateway's own
/// paths (`package`: the local download of a URL), advice to run a CLI command, or bytes of
/// a rejected file that are not text; at most [`FAULT_TEXT_MAX`] characters.
fn fault_text(message: &str, package: Option<&Path>) -> String {
    let mut m = message.to_string();
    if let Some(p) = package {
        let p = p.display().to_string();
        m = m.replace(&format!("{p}: package {p}"), "the package");
        m = m.replace(&format!("{p}: "), "");
        m = m.replace(&p, "the package");
    }
    // "…; use `gatevisor service update`", "(try `gatevisor …`)"
    while let Some(i) = m.find("`gatevisor") {
        let start = m[..i].rfind([';', '(', ',']).unwrap_or(i);
        let close = m[i + 1..]
            .find('`')
            .map(|e| i + 1 + e + 1)
            .unwrap_or(m.len());
        let end = if m[start..].starts_with('(') {
            m[close..].find(')').map(|e| close + e + 1).unwrap_or(close)
        } else {
            close
        };
        m.replace_range(start..end, "");
    }
    let clean: String = m
        .trim()
        .chars()
        .map(|c| {
            if c == '\n' || c == '\t' {
                ' '
            } else if c.is_control() || c == char::REPLACEMENT_CHARACTER {
                '?'
            } else {
                c
            }
        })
        .collect();
    if clean.chars().count() > FAULT_TEXT_MAX {
        let cut: String = clean.chars().take(FAULT_TEXT_MAX - 1).collect();
        format!("{cut}…")
    } else {
        clean
    }
}

/// The longest fault string sent.
const FAULT_TEXT_MAX: usize = 256;

mod notify;
use notify::queue;
mod ops;
mod requests;
mod tree;

impl Model {
    /// The model for `backend`, its persistent state in `state_dir/usp.json`. Operations a
    /// previous daemon left unfinished are settled now, and notifications it left
    /// unanswered are due again (their notifications wait in the outbox).
    pub fn open(
        backend: Arc<dyn Backend>,
        state_dir: &Path,
        opts: ModelOptions,
        outbox: Sender<Notification>,
    ) -> std::io::Result<Arc<Model>> {
        let state_file = state_dir.join("usp.json");
        let st: Persisted = match std::fs::read(&state_file) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", state_file.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(e) => return Err(e),
        };
        let downloads = state_dir.join("usp-downloads");
        std::fs::create_dir_all(&downloads)?;
        let model = Arc::new(Model {
            backend,
            state_file,
            downloads,
            runtimes: opts.runtimes,
            st: Mutex::new(st),
            outbox: Mutex::new(outbox),
            https: super::fetch::https_config(&opts.package_ca)
                .map(Arc::new)
                .map_err(|e| e.to_string()),
            operation_deadline: opts.operation_deadline,
            registries: opts.registries,
            cpu: Mutex::new(BTreeMap::new()),
            controllers: Mutex::new(opts.controllers),
        });
        model.settle_interrupted();
        Ok(model)
    }

    /// Adds Controller `endpoint` (a Broker this USP Service met) to
    /// `Device.LocalAgent.Controller.`, if it is not there yet.
    pub fn add_controller(&self, endpoint: &str) {
        let mut c = self.controllers.lock().unwrap();
        if !c.iter().any(|e| e == endpoint) {
            c.push(endpoint.to_string());
        }
    }

    /// Saves `st` where a failure cannot be answered to anyone: it is logged, and the next
    /// save tries again.
    fn persist_or_warn(&self, st: &Persisted) {
        if let Err(e) = self.persist(st) {
            tracing::warn!("usp: cannot save {}: {e}", self.state_file.display());
        }
    }

    fn persist(&self, st: &Persisted) -> std::io::Result<()> {
        let tmp = self.state_file.with_extension("json.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, &serde_json::to_vec_pretty(st)?)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.state_file)?;
        if let Some(dir) = self.state_file.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The daemon's services; `None` when it cannot tell.
    fn services(&self) -> Option<Vec<ServiceStatus>> {
        let v = self.backend.call(Request::List).ok()?;
        match crate::api::result_as::<crate::api::ServiceList>(v) {
            Ok(l) => Some(l.services),
            Err(e) => {
                tracing::warn!("usp: {e}");
                None
            }
        }
    }

    /// Gives every installed service a DU/EU instance number (kept across restarts) and
    /// forgets those that are gone. Returns the services by name (none, and nothing
    /// forgotten, when the daemon cannot list them).
    fn sync_units(&self) -> BTreeMap<String, ServiceStatus> {
        let Some(list) = self.services() else {
            return BTreeMap::new();
        };
        let services: BTreeMap<String, ServiceStatus> =
            list.into_iter().map(|s| (s.name.clone(), s)).collect();
        let mut st = self.st.lock().unwrap();
        let mut changed = false;
        for (name, s) in &services {
            if !st.units.contains_key(name) {
                st.next_instance += 1;
                let instance = st.next_instance;
                st.units.insert(
                    name.clone(),
                    Unit {
                        instance,
                        uuid: random_uuid(),
                        url: String::new(),
                        settings: BTreeMap::new(),
                    },
                );
                changed = true;
            }
            let unit = st.units.get_mut(name).expect("inserted above");
            for e in &s.settings {
                if !unit.settings.contains_key(&e.name) {
                    let next = unit.settings.values().max().copied().unwrap_or(0) + 1;
                    unit.settings.insert(e.name.clone(), next);
                    changed = true;
                }
            }
        }
        let before = st.units.len();
        st.units.retain(|n, _| services.contains_key(n));
        changed |= st.units.len() != before;
        if changed {
            self.persist_or_warn(&st);
        }
        services
    }

    /// Answers one request from Controller `from` (trusted, with `role`); `None` for messages
    /// that take no answer (a NotifyResp).
    pub fn handle(self: &Arc<Self>, from: &str, role: Role, req: Incoming) -> Option<Outgoing> {
        let writes = matches!(
            req,
            Incoming::Add { .. }
                | Incoming::Delete { .. }
                | Incoming::Set { .. }
                | Incoming::Operate { .. }
        );
        if writes && role == Role::Observer {
            // Observers may manage their own subscriptions, nothing else (whose they are is
            // checked per subscription).
            let own_subs = match &req {
                Incoming::Add { objects, .. } => objects.iter().all(|(p, _)| p == SUBS),
                Incoming::Delete { paths, .. } => paths.iter().all(|p| p.starts_with(SUBS)),
                Incoming::Set { objects, .. } => objects.iter().all(|(p, _)| p.starts_with(SUBS)),
                _ => false,
            };
            if !own_subs {
                return Some(Outgoing::Error(
                    E_PERMISSION,
                    format!("controller {from} may only read and subscribe"),
                    vec![],
                ));
            }
        }
        Some(match req {
            Incoming::Get { paths, .. } => Outgoing::GetResp(self.get(&paths)),
            Incoming::GetInstances {
                paths,
                first_level_only,
            } => Outgoing::GetInstancesResp(self.get_instances(&paths, first_level_only)),
            Incoming::GetSupportedDM { paths, flags } => Outgoing::GetSupportedDMResp(
                paths
                    .into_iter()
                    .map(|p| {
                        let r = schema::supported(&p, flags);
                        (p, r)
                    })
                    .collect(),
            ),
            Incoming::Add {
                allow_partial,
                objects,
            } => self.add(from, role, allow_partial, objects),
            Incoming::Delete {
                allow_partial,
                paths,
            } => self.delete(from, role, allow_partial, paths),
            Incoming::Set {
                allow_partial,
                objects,
            } => self.set(from, role, allow_partial, objects),
            Incoming::Operate {
                command,
                command_key,
                args,
                send_resp,
            } => {
                let results = match self.expand_command(&command) {
                    Ok(commands) => commands
                        .into_iter()
                        .map(|c| {
                            let outcome = self.operate(from, &c, &command_key, &args);
                            (c, outcome)
                        })
                        .collect(),
                    Err((code, m)) => vec![(command, OperateOutcome::Failed(code, m))],
                };
                if !send_resp {
                    return None;
                }
                Outgoing::OperateResp(results)
            }
            Incoming::NotifyResp { subscription_id } => {
                // The oldest unanswered notification of that subscription is answered.
                let mut st = self.st.lock().unwrap();
                if let Some(i) = st
                    .unacked
                    .iter()
                    .position(|x| x.subscription_id == subscription_id && x.recipient == from)
                {
                    st.unacked.remove(i);
                    self.persist_or_warn(&st);
                }
                return None;
            }
            Incoming::Connect | Incoming::RegisterResp(_) => return None,
            Incoming::Unsupported(what) => Outgoing::Error(
                E_NOT_SUPPORTED,
                format!("{what} is not supported here"),
                vec![],
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervisor that lists the services it holds.
    struct Listing(Mutex<Value>);

    impl Backend for Listing {
        fn call(&self, req: Request) -> Result<Value, ApiError> {
            Ok(match req {
                Request::List => serde_json::json!({"services": self.0.lock().unwrap().clone()}),
                _ => serde_json::json!({}),
            })
        }
    }

    /// A model with no runtimes, Controllers or package CA.
    fn options() -> ModelOptions {
        ModelOptions {
            runtimes: vec![],
            package_ca: PathBuf::new(),
            operation_deadline: std::time::Duration::from_secs(60),
            controllers: vec![],
            registries: Default::default(),
        }
    }

    fn unit_with_settings(names: &[&str]) -> Value {
        let settings = names
            .iter()
            .map(|n| crate::api::Setting {
                name: n.to_string(),
                ty: "string".into(),
                value: format!("v-{n}"),
                default: String::new(),
                set: true,
                description: String::new(),
            })
            .collect();
        let svc = ServiceStatus {
            settings,
            ..crate::api::ServiceStatus::sample("svc")
        };
        serde_json::to_value([svc]).unwrap()
    }

    #[test]
    fn a_setting_keeps_its_instance_number_when_declarations_change_and_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(Listing(Mutex::new(unit_with_settings(&["Beta", "Gamma"]))));
        let opts = options();
        let (tx, _rx) = std::sync::mpsc::channel();
        let m = Model::open(backend.clone(), dir.path(), opts.clone(), tx.clone()).unwrap();
        let at = |p: &BTreeMap<String, String>, name: &str| {
            p.iter()
                .find(|(k, v)| k.ends_with(".Name") && k.contains("Setting.") && *v == name)
                .map(|(k, _)| k.trim_end_matches("Name").to_string())
        };
        let p = m.parameters();
        let (beta, gamma) = (at(&p, "Beta").unwrap(), at(&p, "Gamma").unwrap());
        // A new version declares one more setting (before the others in name order) and
        // drops one: the others keep their numbers, the new one gets a new number.
        *backend.0.lock().unwrap() = unit_with_settings(&["Alpha", "Beta"]);
        let p = m.parameters();
        assert_eq!(at(&p, "Beta").as_ref(), Some(&beta));
        let alpha = at(&p, "Alpha").unwrap();
        assert!(alpha != beta && alpha != gamma, "{alpha} reuses a number");
        assert_eq!(p[&format!("{alpha}Value")], "v-Alpha");
        assert!(at(&p, "Gamma").is_none());
        assert_eq!(
            p.iter()
                .filter(|(k, _)| k.ends_with("SettingNumberOfEntries"))
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>(),
            ["2"]
        );
        // Gamma comes back: its old number; a restarted agent keeps them all.
        *backend.0.lock().unwrap() = unit_with_settings(&["Alpha", "Beta", "Gamma"]);
        drop(m);
        let m = Model::open(backend, dir.path(), opts, tx).unwrap();
        let p = m.parameters();
        assert_eq!(
            [at(&p, "Alpha"), at(&p, "Beta"), at(&p, "Gamma")],
            [Some(alpha), Some(beta), Some(gamma)]
        );
    }

    #[test]
    fn a_unit_whose_update_is_under_way_is_updating() {
        let dir = tempfile::tempdir().unwrap();
        let updating = ServiceStatus {
            updating: Some(crate::api::Updating {
                to_version: Some("2.0.0".into()),
            }),
            ..ServiceStatus::sample("svc")
        };
        let backend = Arc::new(Listing(Mutex::new(
            serde_json::to_value([updating]).unwrap(),
        )));
        let (tx, _rx) = std::sync::mpsc::channel();
        let m = Model::open(backend.clone(), dir.path(), options(), tx).unwrap();
        let status = |m: &Model| {
            m.parameters()
                .into_iter()
                .find(|(k, _)| {
                    k.starts_with(&format!("{SM}DeploymentUnit.")) && k.ends_with(".Status")
                })
                .map(|(_, v)| v)
        };
        assert_eq!(status(&m).as_deref(), Some("Updating"));
        *backend.0.lock().unwrap() = serde_json::to_value([ServiceStatus::sample("svc")]).unwrap();
        assert_eq!(status(&m).as_deref(), Some("Installed"));
    }

    #[test]
    fn a_units_host_call_grants_are_a_vendor_parameter() {
        let dir = tempfile::tempdir().unwrap();
        let granted = ServiceStatus {
            host_calls: vec!["link.stats:wlan*".into(), "dhcp.leases:*".into()],
            ..ServiceStatus::sample("svc")
        };
        let backend = Arc::new(Listing(Mutex::new(
            serde_json::to_value([granted, ServiceStatus::sample("other")]).unwrap(),
        )));
        let (tx, _rx) = std::sync::mpsc::channel();
        let m = Model::open(backend, dir.path(), options(), tx).unwrap();
        let mut values: Vec<String> = m
            .parameters()
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with(&format!("{SM}ExecutionUnit."))
                    && k.ends_with(&format!(".{VENDOR}HostCalls"))
            })
            .map(|(_, v)| v)
            .collect();
        values.sort();
        // Declared for every unit (an empty list where none is granted).
        assert_eq!(values, ["", "link.stats:wlan*,dhcp.leases:*"]);
    }

    #[test]
    fn paths_match_by_segment_with_instance_wildcards() {
        assert!(matches(
            "Device.SoftwareModules.DeploymentUnit.*.Status",
            "Device.SoftwareModules.DeploymentUnit.3.Status"
        ));
        assert!(!matches(
            "Device.SoftwareModules.DeploymentUnit.*.Status",
            "Device.SoftwareModules.DeploymentUnit.3.Name"
        ));
        assert!(matches(
            "Device.SoftwareModules.",
            "Device.SoftwareModules.ExecEnv.1.Name"
        ));
        assert!(!matches(
            "Device.SoftwareModules.ExecEnv.1.",
            "Device.SoftwareModules.ExecEnv.10.Name"
        ));
    }

    #[test]
    fn fault_strings_hold_no_local_paths_cli_advice_or_binary() {
        let pkg = Path::new("/var/lib/gatevisor/usp-downloads/request-7.gvpkg");
        let t = fault_text(
            "/var/lib/gatevisor/usp-downloads/request-7.gvpkg: package \
             /var/lib/gatevisor/usp-downloads/request-7.gvpkg: the package is not a valid \
             archive or is truncated: numeric field \u{1}\u{fffd}x",
            Some(pkg),
        );
        assert!(!t.contains("usp-downloads"), "{t}");
        assert!(!t.chars().any(|c| c.is_control()), "{t}");
        assert!(
            t.starts_with("the package: the package is not a valid archive"),
            "{t}"
        );
        let t = fault_text(
            "a service named \"x\" is already installed; use `gatevisor service update`",
            None,
        );
        assert_eq!(t, "a service named \"x\" is already installed");
        let t = fault_text("not a console (try `gatevisor service logs x`) here", None);
        assert_eq!(t, "not a console  here");
        assert_eq!(
            fault_text(&"x".repeat(1000), None).chars().count(),
            FAULT_TEXT_MAX
        );
    }

    #[test]
    fn timestamps_are_iso_8601_utc() {
        let t = now_iso();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    #[test]
    fn supervisor_errors_map_to_software_module_faults_by_kind_not_wording() {
        let e = |k| ApiError::new(k, "whatever it says");
        let table = [
            (ErrorKind::Untrusted, F_FILE_AUTHENTICATION),
            (ErrorKind::Corrupt, F_FILE_CORRUPTED),
            (ErrorKind::Duplicate, F_DUPLICATE_DU),
            (ErrorKind::NoResources, F_RESOURCES),
            (ErrorKind::Conflict, F_INVALID_DU_STATE),
            (ErrorKind::Invalid, E_COMMAND_FAILURE),
            (ErrorKind::Runtime, E_COMMAND_FAILURE),
        ];
        for (kind, fault) in table {
            assert_eq!(fault_of(&e(kind)), fault, "{kind:?}");
        }
        // A message that mentions a signature does not make a full board a bad signature.
        assert_eq!(
            fault_of(&ApiError::new(
                ErrorKind::NoResources,
                "signed-svc: board allows 8 services"
            )),
            F_RESOURCES
        );
        // Every fault is in a range TR-369 assigns: general, data model or vendor.
        for kind in [
            ErrorKind::Untrusted,
            ErrorKind::Corrupt,
            ErrorKind::Duplicate,
            ErrorKind::NoResources,
            ErrorKind::Conflict,
            ErrorKind::Invalid,
        ] {
            let c = fault_of(&e(kind));
            assert!(
                (7000..=7031).contains(&c)
                    || (7200..=7299).contains(&c)
                    || (7800..=7999).contains(&c),
                "{kind:?} → {c}"
            );
        }
    }
}
