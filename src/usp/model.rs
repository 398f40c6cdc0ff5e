//! TR-181 `Device.SoftwareModules.` (and the agent's `Device.LocalAgent.Subscription.` and
//! `.Request.` tables) over gatevisor's real state, transport-independent: a transport hands
//! [`Model::handle`] each request from a trusted Controller and sends what the model puts in
//! its outbox (notifications) to their recipients.
//!
//! Every Get builds the tree afresh from the supervisor (`List`), so it never disagrees with
//! the CLI. Instance numbers, DU UUIDs and URLs, subscriptions and in-flight operations persist
//! in `usp.json` under the state directory (written with fsync before an OperateResp leaves).

use super::codec::{
    GetResult, Incoming, NotifyKind, OperateOutcome, Outgoing, ParamType, PathsResult,
    SupportedObject,
};
use super::path::Pattern;
use crate::api::{ApiError, ErrorKind, Request};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

pub const SM: &str = "Device.SoftwareModules.";
const SUBS: &str = "Device.LocalAgent.Subscription.";
const REQS: &str = "Device.LocalAgent.Request.";
/// The vendor prefix of gatevisor's own parameters (TR-106: `X_<VENDOR>_`).
pub const VENDOR: &str = "X_GATEVISOR-ORG_";

// USP error codes (TR-369).
pub const E_GENERAL: u32 = 7000;
pub const E_NOT_SUPPORTED: u32 = 7001;
pub const E_PERMISSION: u32 = 7006;
pub const E_INVALID_ARGS: u32 = 7027;
pub const E_INVALID_PATH: u32 = 7026;
pub const E_COMMAND_FAILURE: u32 = 7022;
// TR-181 software module faults.
pub const F_BAD_SIGNATURE: u32 = 7036;
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
    cpu: Mutex<BTreeMap<String, (u64, std::time::Instant)>>,
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
        ErrorKind::Untrusted => F_BAD_SIGNATURE,
        ErrorKind::Duplicate => F_DUPLICATE_DU,
        ErrorKind::NoResources => F_RESOURCES,
        ErrorKind::Conflict => F_INVALID_DU_STATE,
        _ => E_COMMAND_FAILURE,
    }
}

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
            cpu: Mutex::new(BTreeMap::new()),
        });
        model.settle_interrupted();
        Ok(model)
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

    fn services(&self) -> Vec<Value> {
        self.backend
            .call(Request::List)
            .ok()
            .and_then(|v| v.get("services").and_then(|s| s.as_array().cloned()))
            .unwrap_or_default()
    }

    /// Gives every installed service a DU/EU instance number (kept across restarts) and
    /// forgets those that are gone. Returns the services by name.
    fn sync_units(&self) -> BTreeMap<String, Value> {
        let services: BTreeMap<String, Value> = self
            .services()
            .into_iter()
            .filter_map(|s| Some((s.get("name")?.as_str()?.to_string(), s)))
            .collect();
        let mut st = self.st.lock().unwrap();
        let mut changed = false;
        for name in services.keys() {
            if !st.units.contains_key(name) {
                st.next_instance += 1;
                let instance = st.next_instance;
                st.units.insert(
                    name.clone(),
                    Unit {
                        instance,
                        uuid: random_uuid(),
                        url: String::new(),
                    },
                );
                changed = true;
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

    /// Every parameter of the agent's data model, by full path.
    pub fn parameters(&self) -> BTreeMap<String, String> {
        let services = self.sync_units();
        let st = self.st.lock().unwrap();
        let mut p = BTreeMap::new();
        let mut put = |k: String, v: String| {
            p.insert(k, v);
        };
        put(
            format!("{SM}ExecEnvNumberOfEntries"),
            self.runtimes.len().to_string(),
        );
        let mem_avail = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        // Packages and container roots live in the state directory: its free space (KiB).
        let disk_avail = self
            .state_file
            .parent()
            .and_then(|d| nix::sys::statvfs::statvfs(d).ok())
            .map(|s| s.blocks_available() * s.fragment_size() / 1024)
            .unwrap_or(0);
        for (i, rt) in self.runtimes.iter().enumerate() {
            let ee = format!("{SM}ExecEnv.{}.", i + 1);
            put(format!("{ee}Enable"), "true".into());
            put(format!("{ee}Status"), "Up".into());
            put(format!("{ee}Name"), rt.to_string());
            put(format!("{ee}Type"), rt.description().into());
            put(format!("{ee}Vendor"), "gatevisor".into());
            put(format!("{ee}Version"), env!("CARGO_PKG_VERSION").into());
            put(format!("{ee}AvailableMemory"), mem_avail.to_string());
            put(format!("{ee}AvailableDiskSpace"), disk_avail.to_string());
            let eus: Vec<String> = services
                .iter()
                .filter(|(_, s)| s.get("runtime").and_then(|r| r.as_str()) == Some(rt.name()))
                .filter_map(|(n, _)| st.units.get(n))
                .map(|u| format!("{SM}ExecutionUnit.{}", u.instance))
                .collect();
            put(format!("{ee}ActiveExecutionUnits"), eus.join(","));
        }
        put(
            format!("{SM}DeploymentUnitNumberOfEntries"),
            services.len().to_string(),
        );
        put(
            format!("{SM}ExecutionUnitNumberOfEntries"),
            services.len().to_string(),
        );
        let mut cpu = self.cpu.lock().unwrap();
        for (name, s) in &services {
            let Some(u) = st.units.get(name) else {
                continue;
            };
            let str_of = |k: &str| {
                s.get(k)
                    .map(|v| match v {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        v => v.to_string(),
                    })
                    .unwrap_or_default()
            };
            let runtime = str_of("runtime");
            let ee_ref = self
                .runtimes
                .iter()
                .position(|r| r.name() == runtime)
                .map(|i| format!("{SM}ExecEnv.{}", i + 1))
                .unwrap_or_default();
            let version = {
                let pv = str_of("package_version");
                if pv.is_empty() {
                    str_of("version")
                } else {
                    pv
                }
            };
            let du = format!("{SM}DeploymentUnit.{}.", u.instance);
            let eu = format!("{SM}ExecutionUnit.{}.", u.instance);
            put(format!("{du}UUID"), u.uuid.clone());
            put(format!("{du}DUID"), name.clone());
            put(format!("{du}Name"), name.clone());
            put(format!("{du}Status"), "Installed".into());
            put(format!("{du}Resolved"), "true".into());
            put(format!("{du}URL"), u.url.clone());
            // The publisher key that signed the package (its name on this gateway).
            put(format!("{du}Vendor"), str_of("publisher"));
            put(format!("{du}Version"), version.clone());
            put(
                format!("{du}ExecutionUnitList"),
                eu.trim_end_matches('.').into(),
            );
            put(format!("{du}ExecutionEnvRef"), ee_ref.clone());

            let state = str_of("state");
            let desired = str_of("desired");
            let status = match state.as_str() {
                "running" => "Active",
                "starting" => "Starting",
                "stopping" => "Stopping",
                _ => "Idle",
            };
            let (fault_code, fault_msg) = match state.as_str() {
                "failed" | "backoff" => ("FailureOnStart", str_of("failure_reason")),
                _ => ("NoFault", String::new()),
            };
            put(format!("{eu}EUID"), name.clone());
            put(format!("{eu}Name"), name.clone());
            put(format!("{eu}ExecEnvLabel"), name.clone());
            put(format!("{eu}Status"), status.into());
            put(
                format!("{eu}RequestedState"),
                if desired == "running" {
                    "Active"
                } else {
                    "Idle"
                }
                .into(),
            );
            put(format!("{eu}ExecutionFaultCode"), fault_code.into());
            put(format!("{eu}ExecutionFaultMessage"), fault_msg);
            put(format!("{eu}AutoStart"), (desired == "running").to_string());
            put(format!("{eu}Vendor"), str_of("publisher"));
            put(format!("{eu}Version"), version);
            put(format!("{eu}References"), du.trim_end_matches('.').into());
            put(format!("{eu}ExecutionEnvRef"), ee_ref);
            let mem = s
                .pointer("/memory/usage_bytes")
                .and_then(|v| v.as_u64())
                .map(|b| (b / 1024).to_string())
                .unwrap_or_else(|| "0".into());
            put(format!("{eu}MemoryInUse"), mem);
            // CPU: the share of one core used since the previous reading.
            if let Some(usec) = s.get("cpu_usec").and_then(|v| v.as_u64()) {
                let now = std::time::Instant::now();
                if let Some((prev, at)) = cpu.get(name) {
                    let wall = now.duration_since(*at).as_micros() as u64;
                    if let Some(pct) = (usec.saturating_sub(*prev) * 100).checked_div(wall) {
                        put(format!("{eu}CPUPercentInUse"), pct.min(100).to_string());
                    }
                }
                cpu.insert(name.clone(), (usec, now));
            }
            put(
                format!("{eu}AutoRestart.Enable"),
                (desired == "running").to_string(),
            );
            put(
                format!("{eu}AutoRestart.RetryCount"),
                str_of("consecutive_failures"),
            );
            put(format!("{eu}{VENDOR}Restarts"), str_of("restarts"));
            put(format!("{eu}{VENDOR}Runtime"), runtime);
            if let Some(c) = s.pointer("/steering/counters").and_then(|c| c.as_object()) {
                for (k, v) in c {
                    let mut flat = Vec::new();
                    flatten(&mut flat, &camel(k), v);
                    for (k, v) in flat {
                        put(format!("{eu}{VENDOR}Steering.{k}"), v);
                    }
                }
            }
        }
        drop(cpu);
        put(
            "Device.LocalAgent.SubscriptionNumberOfEntries".into(),
            st.subscriptions.len().to_string(),
        );
        for s in &st.subscriptions {
            let o = format!("{SUBS}{}.", s.instance);
            put(format!("{o}Enable"), s.enable.to_string());
            put(format!("{o}ID"), s.id.clone());
            put(format!("{o}Recipient"), s.recipient.clone());
            put(format!("{o}NotifType"), s.notif_type.clone());
            put(format!("{o}ReferenceList"), s.reference_list.join(","));
            put(format!("{o}NotifRetry"), s.notif_retry.to_string());
            put(format!("{o}Persistent"), s.persistent.to_string());
        }
        put(
            "Device.LocalAgent.RequestNumberOfEntries".into(),
            st.requests.len().to_string(),
        );
        for r in &st.requests {
            let o = format!("{REQS}{}.", r.instance);
            put(format!("{o}Originator"), r.originator.clone());
            put(format!("{o}Command"), r.command.clone());
            put(format!("{o}CommandKey"), r.command_key.clone());
            put(format!("{o}Status"), "Active".into());
        }
        p
    }

    /// Answers one request from Controller `from` (trusted, with `role`); `None` for messages
    /// that take no answer (a NotifyResp).
    pub fn handle(self: &Arc<Self>, from: &str, role: Role, req: Incoming) -> Option<Outgoing> {
        let writes = matches!(
            req,
            Incoming::Add { .. } | Incoming::Delete { .. } | Incoming::Operate { .. }
        );
        if writes && role == Role::Observer {
            // Observers may manage their own subscriptions, nothing else.
            let own_subs = match &req {
                Incoming::Add { objects } => objects.iter().all(|(p, _)| p == SUBS),
                Incoming::Delete { paths } => paths.iter().all(|p| p.starts_with(SUBS)),
                _ => false,
            };
            if !own_subs {
                return Some(Outgoing::Error(
                    E_PERMISSION,
                    format!("controller {from} may only read and subscribe"),
                ));
            }
        }
        Some(match req {
            Incoming::Get { paths, .. } => Outgoing::GetResp(self.get(&paths)),
            Incoming::GetInstances {
                paths,
                first_level_only,
            } => Outgoing::GetInstancesResp(self.get_instances(&paths, first_level_only)),
            Incoming::GetSupportedDM {
                paths,
                first_level_only,
            } => Outgoing::GetSupportedDMResp(
                paths
                    .into_iter()
                    .map(|p| {
                        let r = supported(&p, first_level_only);
                        (p, r)
                    })
                    .collect(),
            ),
            Incoming::Add { objects } => Outgoing::AddResp(
                objects
                    .into_iter()
                    .map(|(path, params)| {
                        let r = self.add_subscription(from, &path, &params);
                        (path, r)
                    })
                    .collect(),
            ),
            Incoming::Delete { paths } => Outgoing::DeleteResp(
                paths
                    .into_iter()
                    .map(|p| {
                        let r = self.delete_subscription(&p);
                        (p, r)
                    })
                    .collect(),
            ),
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
            Incoming::Unsupported(what) => {
                Outgoing::Error(E_NOT_SUPPORTED, format!("{what} is not supported here"))
            }
        })
    }

    /// `path` parsed, if it is a well-formed `Device.` path.
    fn check_path(path: &str) -> Result<Pattern, (u32, String)> {
        let pattern = Pattern::parse(path).map_err(|e| (E_INVALID_PATH, e))?;
        if !path.starts_with("Device.") {
            return Err((E_INVALID_PATH, format!("{path}: not a Device. path")));
        }
        Ok(pattern)
    }

    fn get(&self, paths: &[String]) -> Vec<(String, GetResult)> {
        let params = self.parameters();
        paths
            .iter()
            .map(|path| {
                let r = Self::check_path(path).and_then(|pattern| {
                    let mut by_obj: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
                    let hits = params.iter().filter(|(k, _)| pattern.matches(k, &params));
                    for (k, v) in hits {
                        let obj = object_of(k);
                        by_obj
                            .entry(obj.to_string())
                            .or_default()
                            .insert(k[obj.len()..].to_string(), v.clone());
                    }
                    // A search that finds nothing is an empty answer, not an error.
                    // An empty table is an empty answer too.
                    if by_obj.is_empty() && !pattern.has_search() && !is_table(path) {
                        return Err((E_INVALID_PATH, format!("{path}: no such path")));
                    }
                    Ok(by_obj.into_iter().collect())
                });
                (path.clone(), r)
            })
            .collect()
    }

    fn get_instances(&self, paths: &[String], first_level_only: bool) -> PathsResult {
        let params = self.parameters();
        let objects = instance_objects(&params);
        paths
            .iter()
            .map(|path| {
                let r = Self::check_path(path).and_then(|pattern| {
                    if !path.ends_with('.') {
                        return Err((E_INVALID_PATH, format!("{path}: not an object path")));
                    }
                    let depth = pattern.depth();
                    Ok(objects
                        .iter()
                        .filter(|o| pattern.matches(o, &params) && o.as_str() != path.as_str())
                        .filter(|o| {
                            !first_level_only
                                || o.trim_end_matches('.').split('.').count() == depth + 1
                        })
                        .cloned()
                        .collect())
                });
                (path.clone(), r)
            })
            .collect()
    }

    fn add_subscription(
        &self,
        from: &str,
        path: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<String, (u32, String)> {
        if path != SUBS {
            return Err((
                E_NOT_SUPPORTED,
                format!("{path}: objects are created here only in {SUBS}"),
            ));
        }
        let notif_type = params.get("NotifType").cloned().unwrap_or_default();
        const TYPES: [&str; 5] = [
            "ValueChange",
            "ObjectCreation",
            "ObjectDeletion",
            "Event",
            "OperationComplete",
        ];
        if !TYPES.contains(&notif_type.as_str()) {
            return Err((
                E_INVALID_ARGS,
                format!("NotifType {notif_type:?} is not one of {TYPES:?}"),
            ));
        }
        let reference_list: Vec<String> = params
            .get("ReferenceList")
            .map(|r| {
                r.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        if reference_list.is_empty() {
            return Err((E_INVALID_ARGS, "ReferenceList is empty".into()));
        }
        for r in &reference_list {
            let pattern = Self::check_path(r).map_err(|(_, m)| (E_INVALID_ARGS, m))?;
            if pattern.has_search() {
                return Err((
                    E_INVALID_ARGS,
                    format!("{r}: search expressions in a ReferenceList are not supported"),
                ));
            }
        }
        let bool_of =
            |k: &str, d: bool| params.get(k).map(|v| v == "true" || v == "1").unwrap_or(d);
        let mut st = self.st.lock().unwrap();
        st.next_subscription += 1;
        let instance = st.next_subscription;
        let id = params
            .get("ID")
            .cloned()
            .unwrap_or_else(|| format!("gv-sub-{instance}"));
        if st.subscriptions.iter().any(|s| s.id == id) {
            return Err((E_INVALID_ARGS, format!("subscription ID {id:?} exists")));
        }
        st.subscriptions.push(Subscription {
            instance,
            id,
            recipient: params
                .get("Recipient")
                .cloned()
                .unwrap_or_else(|| from.to_string()),
            notif_type,
            reference_list,
            notif_retry: bool_of("NotifRetry", false),
            enable: bool_of("Enable", false),
            persistent: bool_of("Persistent", true),
        });
        self.persist(&st)
            .map_err(|e| (E_GENERAL, format!("cannot save the subscription: {e}")))?;
        Ok(format!("{SUBS}{instance}."))
    }

    fn delete_subscription(&self, path: &str) -> Result<Vec<String>, (u32, String)> {
        let pattern = Self::check_path(path)?;
        // A search (`Subscription.[ID=="x"].`) looks at the subscriptions' parameters.
        let params = if pattern.has_search() {
            self.parameters()
        } else {
            BTreeMap::new()
        };
        let mut st = self.st.lock().unwrap();
        let gone: Vec<String> = st
            .subscriptions
            .iter()
            .map(|s| format!("{SUBS}{}.", s.instance))
            .filter(|p| pattern.matches(p, &params))
            .collect();
        st.subscriptions
            .retain(|s| !gone.contains(&format!("{SUBS}{}.", s.instance)));
        self.persist(&st)
            .map_err(|e| (E_GENERAL, format!("cannot save: {e}")))?;
        Ok(gone)
    }

    /// The commands a command path names: itself, or with a search expression
    /// (`ExecutionUnit.[Name=="x"].Restart()`) one per instance that satisfies it (none is
    /// an empty answer).
    fn expand_command(&self, command: &str) -> Result<Vec<String>, (u32, String)> {
        let (object, name) = match command.rsplit_once('.') {
            Some(split) if command.contains('[') => split,
            _ => return Ok(vec![command.to_string()]),
        };
        let pattern = Self::check_path(object)?;
        let params = self.parameters();
        Ok(instance_objects(&params)
            .into_iter()
            .filter(|o| pattern.matches(o.trim_end_matches('.'), &params))
            .map(|o| format!("{o}{name}"))
            .collect())
    }

    /// The service behind `Device.SoftwareModules.{table}.{i}.`.
    fn unit_name(&self, table: &str, rest: &str) -> Option<(String, String)> {
        let rest = rest.strip_prefix(table)?.strip_prefix('.')?;
        let (num, tail) = rest.split_once('.')?;
        let n: u32 = num.parse().ok()?;
        self.sync_units();
        let st = self.st.lock().unwrap();
        let name = st
            .units
            .iter()
            .find(|(_, u)| u.instance == n)
            .map(|(n, _)| n.clone())?;
        Some((name, tail.to_string()))
    }

    fn operate(
        self: &Arc<Self>,
        from: &str,
        command: &str,
        command_key: &str,
        args: &BTreeMap<String, String>,
    ) -> OperateOutcome {
        let Some(rest) = command.strip_prefix(SM) else {
            return OperateOutcome::Failed(E_INVALID_PATH, format!("{command}: no such command"));
        };
        let call = |req| {
            self.backend
                .call(req)
                .map(|_| BTreeMap::new())
                .map_err(|e| (E_COMMAND_FAILURE, e.message))
        };
        let done = |r: Result<BTreeMap<String, String>, (u32, String)>| match r {
            Ok(out) => OperateOutcome::Done(out),
            Err((c, m)) => OperateOutcome::Failed(c, m),
        };
        if rest == "InstallDU()" {
            let url = args.get("URL").cloned().unwrap_or_default();
            if url.is_empty() {
                return OperateOutcome::Failed(E_INVALID_ARGS, "InstallDU() needs a URL".into());
            }
            let uuid = args
                .get("UUID")
                .filter(|u| !u.is_empty())
                .cloned()
                .unwrap_or_else(random_uuid);
            // The unit goes to the execution environment asked for: its runtime.
            let mut runtime = None;
            if let Some(ee) = args.get("ExecutionEnvRef").filter(|e| !e.is_empty()) {
                runtime = (1..=self.runtimes.len())
                    .find(|i| ee.trim_end_matches('.') == format!("{SM}ExecEnv.{i}"))
                    .map(|i| self.runtimes[i - 1]);
                if runtime.is_none() {
                    // Reported like any other install failure: the operation ran, the DU
                    // was not created.
                    return self.start_op(
                        from,
                        command,
                        command_key,
                        OpKind::Install { url, uuid, runtime },
                        Some((F_UNKNOWN_EE, format!("{ee}: no such execution environment"))),
                    );
                }
            }
            return self.start_op(
                from,
                command,
                command_key,
                OpKind::Install { url, uuid, runtime },
                None,
            );
        }
        if let Some((name, tail)) = self.unit_name("DeploymentUnit", rest) {
            return match tail.as_str() {
                "Update()" => {
                    let url = match args.get("URL").filter(|u| !u.is_empty()) {
                        Some(u) => u.clone(),
                        None => {
                            let st = self.st.lock().unwrap();
                            st.units
                                .get(&name)
                                .map(|u| u.url.clone())
                                .unwrap_or_default()
                        }
                    };
                    if url.is_empty() {
                        return OperateOutcome::Failed(
                            E_INVALID_ARGS,
                            "Update() needs a URL (the DU has none on record)".into(),
                        );
                    }
                    self.start_op(
                        from,
                        command,
                        command_key,
                        OpKind::Update { name, url },
                        None,
                    )
                }
                "Uninstall()" => {
                    self.start_op(from, command, command_key, OpKind::Uninstall { name }, None)
                }
                _ => OperateOutcome::Failed(E_INVALID_PATH, format!("{command}: no such command")),
            };
        }
        if let Some((name, tail)) = self.unit_name("ExecutionUnit", rest) {
            return match tail.as_str() {
                "SetRequestedState()" => match args.get("RequestedState").map(|s| s.as_str()) {
                    Some("Active") => done(call(Request::Start { name })),
                    Some("Idle") => done(call(Request::Stop { name })),
                    other => OperateOutcome::Failed(
                        E_INVALID_ARGS,
                        format!("RequestedState {other:?}: Idle or Active"),
                    ),
                },
                "Restart()" => done(call(Request::Restart { name })),
                _ => OperateOutcome::Failed(E_INVALID_PATH, format!("{command}: no such command")),
            };
        }
        OperateOutcome::Failed(
            E_INVALID_PATH,
            format!("{command}: no such object or command"),
        )
    }

    /// Journals an asynchronous operation (fsync'd before the OperateResp leaves), then runs
    /// it on its own thread. `fail_now` completes it at once with that fault.
    fn start_op(
        self: &Arc<Self>,
        from: &str,
        command: &str,
        command_key: &str,
        kind: OpKind,
        fail_now: Option<(u32, String)>,
    ) -> OperateOutcome {
        let op = {
            let mut st = self.st.lock().unwrap();
            st.next_request += 1;
            let op = PendingOp {
                instance: st.next_request,
                command: command.to_string(),
                command_key: command_key.to_string(),
                originator: from.to_string(),
                name: match &kind {
                    OpKind::Update { name, .. } | OpKind::Uninstall { name } => Some(name.clone()),
                    OpKind::Install { .. } => None,
                },
                kind,
                started: now_iso(),
                outcome: None,
            };
            st.requests.push(op.clone());
            if let Err(e) = self.persist(&st) {
                st.requests.retain(|r| r.instance != op.instance);
                return OperateOutcome::Failed(E_GENERAL, format!("cannot journal: {e}"));
            }
            op
        };
        let path = format!("{REQS}{}", op.instance);
        let deadline = std::time::Instant::now() + self.operation_deadline;
        let me = self.clone();
        let op2 = op.clone();
        let spawned = std::thread::Builder::new()
            .name("usp-op".into())
            .spawn(move || {
                let result = match fail_now {
                    Some(f) => Err(f),
                    None => me.run_op(&op2, deadline),
                };
                me.complete(&op2, result);
            });
        if let Err(e) = spawned {
            // No thread for it (the system is out of them): the operation fails, reported as
            // any other failure, and the daemon goes on.
            self.complete(
                &op,
                Err((E_GENERAL, format!("cannot start the operation: {e}"))),
            );
        }
        OperateOutcome::Started(path)
    }

    /// Fetches a package (`file://`, `http://`, `https://`) into the downloads folder, giving
    /// up at `deadline`.
    fn fetch(
        &self,
        url: &str,
        instance: u32,
        deadline: std::time::Instant,
    ) -> Result<PathBuf, (u32, String)> {
        let dest = self.downloads.join(format!("request-{instance}.gvpkg"));
        let tls = match (url.starts_with("https://"), &self.https) {
            (false, _) => None,
            (true, Ok(cfg)) => Some(cfg),
            (true, Err(e)) => return Err((E_COMMAND_FAILURE, format!("{url}: {e}"))),
        };
        super::fetch::fetch(url, &dest, tls, deadline).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                // R-SMM.1: the download is the step whose length the network decides.
                (
                    E_COMMAND_FAILURE,
                    format!(
                        "the operation's deadline of {} s passed while fetching {url}; nothing \
                         was changed",
                        self.operation_deadline.as_secs()
                    ),
                )
            } else {
                (E_COMMAND_FAILURE, format!("{url}: {e}"))
            }
        })?;
        Ok(dest)
    }

    /// Journals a successful operation's result (`name`) before anyone is told of it.
    fn record_outcome(&self, st: &mut Persisted, instance: u32, name: &str) {
        if let Some(r) = st.requests.iter_mut().find(|r| r.instance == instance) {
            r.outcome = Some(name.to_string());
        }
        self.persist_or_warn(st);
    }

    /// Runs an operation; Ok(service name) or a fault. Past `deadline` nothing more is
    /// started: the fetch is the only step whose length the network decides; the install
    /// itself is bounded by the package's limits and its health-check deadline.
    fn run_op(
        &self,
        op: &PendingOp,
        deadline: std::time::Instant,
    ) -> Result<String, (u32, String)> {
        let fault = |e: ApiError| (fault_of(&e), e.message);
        match &op.kind {
            OpKind::Install { url, uuid, runtime } => {
                let pkg = self.fetch(url, op.instance, deadline)?;
                let r = self.backend.call(Request::Install {
                    manifest: pkg.clone(),
                    start: false,
                    runtime: *runtime,
                });
                let _ = std::fs::remove_file(&pkg);
                let v = r.map_err(fault)?;
                let name = v
                    .get("name")
                    .and_then(|n| n.as_str())
                    .unwrap_or_default()
                    .to_string();
                self.sync_units();
                let mut st = self.st.lock().unwrap();
                if let Some(u) = st.units.get_mut(&name) {
                    u.uuid = uuid.clone();
                    u.url = url.clone();
                }
                self.record_outcome(&mut st, op.instance, &name);
                Ok(name)
            }
            OpKind::Update { name, url } => {
                let pkg = self.fetch(url, op.instance, deadline)?;
                let r = self.backend.call(Request::Update {
                    name: name.clone(),
                    package: pkg.clone(),
                });
                let _ = std::fs::remove_file(&pkg);
                r.map_err(fault)?;
                let mut st = self.st.lock().unwrap();
                if let Some(u) = st.units.get_mut(name) {
                    u.url = url.clone();
                }
                self.record_outcome(&mut st, op.instance, name);
                Ok(name.clone())
            }
            OpKind::Uninstall { name } => {
                self.backend
                    .call(Request::Remove { name: name.clone() })
                    .map_err(fault)?;
                self.record_outcome(&mut self.st.lock().unwrap(), op.instance, name);
                Ok(name.clone())
            }
        }
    }

    /// Tells subscribers how an operation ended (`DUStateChange!`, `OperationComplete`) and
    /// drops it from the journal.
    fn complete(&self, op: &PendingOp, result: Result<String, (u32, String)>) {
        let name = result.as_ref().ok().cloned().or(op.name.clone());
        let params = self.parameters();
        let unit = {
            let st = self.st.lock().unwrap();
            name.as_ref().and_then(|n| st.units.get(n).cloned())
        };
        let du_path = unit
            .as_ref()
            .map(|u| format!("{SM}DeploymentUnit.{}", u.instance))
            .unwrap_or_default();
        let get = |k: &str| {
            params
                .get(&format!("{du_path}.{k}"))
                .cloned()
                .unwrap_or_default()
        };
        let (performed, ok_state, fail_state) = match op.kind {
            OpKind::Install { .. } => ("Install", "Installed", "Failed"),
            OpKind::Update { .. } => ("Update", "Installed", "Installed"),
            OpKind::Uninstall { .. } => ("Uninstall", "Uninstalled", "Installed"),
        };
        let uuid = match (&op.kind, &unit) {
            (_, Some(u)) => u.uuid.clone(),
            (OpKind::Install { uuid, .. }, None) => uuid.clone(),
            _ => String::new(),
        };
        let (fault_code, fault_string) = match &result {
            Ok(_) => (0, String::new()),
            Err((c, m)) => (*c, m.clone()),
        };
        let uninstalled = matches!(op.kind, OpKind::Uninstall { .. }) && result.is_ok();
        let mut args = BTreeMap::new();
        args.insert("UUID".into(), uuid);
        args.insert(
            "DeploymentUnitRef".into(),
            if uninstalled {
                String::new()
            } else {
                du_path.clone()
            },
        );
        args.insert("Version".into(), get("Version"));
        args.insert(
            "CurrentState".into(),
            if result.is_ok() {
                ok_state
            } else if unit.is_some() {
                "Installed"
            } else {
                fail_state
            }
            .into(),
        );
        args.insert(
            "Resolved".into(),
            (result.is_ok() && !uninstalled).to_string(),
        );
        args.insert("ExecutionUnitRefList".into(), get("ExecutionUnitList"));
        args.insert("StartTime".into(), op.started.clone());
        args.insert("CompleteTime".into(), now_iso());
        args.insert("OperationPerformed".into(), performed.into());
        args.insert("Fault.FaultCode".into(), fault_code.to_string());
        args.insert("Fault.FaultString".into(), fault_string.clone());
        let event = NotifyKind::Event {
            obj_path: SM.into(),
            name: "DUStateChange!".into(),
            args,
        };
        let (obj, cmd) = match op.command.rfind('.') {
            Some(i) => (
                op.command[..=i].to_string(),
                op.command[i + 1..].to_string(),
            ),
            None => (String::new(), op.command.clone()),
        };
        let done = NotifyKind::OperationComplete {
            obj_path: obj.clone(),
            command: cmd.clone(),
            command_key: op.command_key.clone(),
            result: result.map(|_| BTreeMap::new()),
        };
        // The operation leaves the journal in the same write that keeps its notifications
        // for NotifRetry: a crash reports it either again or never twice.
        let out = {
            let mut st = self.st.lock().unwrap();
            let mut out = queue(&mut st, "Event", &format!("{SM}DUStateChange!"), &event);
            out.extend(queue(
                &mut st,
                "OperationComplete",
                &format!("{obj}{cmd}"),
                &done,
            ));
            st.requests.retain(|r| r.instance != op.instance);
            self.persist_or_warn(&st);
            out
        };
        self.dispatch(out);
    }

    /// Operations a previous daemon journaled but did not finish: an install or update whose
    /// result is visible (the service exists at the package's name) is reported done, anything
    /// else failed; either way the Controller hears of it.
    fn settle_interrupted(&self) {
        let pending = self.st.lock().unwrap().requests.clone();
        if pending.is_empty() {
            return;
        }
        let services = self.sync_units();
        for op in pending {
            let result = match (&op.kind, &op.outcome) {
                (_, Some(name)) => Ok(name.clone()),
                (OpKind::Uninstall { name }, _) if !services.contains_key(name) => Ok(name.clone()),
                _ => Err((
                    E_COMMAND_FAILURE,
                    "interrupted: the daemon restarted before the operation finished; nothing \
                     was changed"
                        .to_string(),
                )),
            };
            tracing::info!("usp: settling {} left by a previous daemon", op.command);
            self.complete(&op, result);
        }
    }

    /// Queues `kind` for the subscribers of `notif_type` on `path` (see [`queue`]), saving
    /// the state first when some of them want an answer.
    fn notify(&self, notif_type: &str, path: &str, kind: NotifyKind) {
        let out = {
            let mut st = self.st.lock().unwrap();
            let waiting = st.unacked.len();
            let out = queue(&mut st, notif_type, path, &kind);
            if st.unacked.len() != waiting {
                self.persist_or_warn(&st);
            }
            out
        };
        self.dispatch(out);
    }

    fn dispatch(&self, out: Vec<Notification>) {
        let outbox = self.outbox.lock().unwrap();
        for n in out {
            let _ = outbox.send(n);
        }
    }

    /// Sends again the notifications whose NotifyResp is overdue (NotifRetry), waiting twice
    /// as long each time; gives up after [`RETRY_MAX_ATTEMPTS`], or when the subscription is
    /// gone. Those a previous daemon left are due at once. Called every second.
    pub fn retry_due(&self) {
        let now = std::time::Instant::now();
        let mut due = Vec::new();
        {
            let mut guard = self.st.lock().unwrap();
            let st = &mut *guard;
            let waiting = st.unacked.len();
            let subscriptions = &st.subscriptions;
            st.unacked.retain_mut(|x| {
                if x.next.is_some_and(|n| n > now) {
                    return true;
                }
                let live = subscriptions
                    .iter()
                    .any(|s| s.enable && s.id == x.subscription_id && s.recipient == x.recipient);
                if !live || x.attempts >= RETRY_MAX_ATTEMPTS {
                    tracing::warn!(
                        "usp: {} never acknowledged a notification of {}; given up",
                        x.recipient,
                        x.subscription_id
                    );
                    return false;
                }
                x.attempts += 1;
                x.next = Some(now + RETRY_FIRST * 2u32.pow(x.attempts.min(16)));
                due.push((
                    x.recipient.clone(),
                    Outgoing::Notify {
                        subscription_id: x.subscription_id.clone(),
                        send_resp: true,
                        kind: x.kind.clone(),
                    },
                ));
                true
            });
            if st.unacked.len() != waiting {
                self.persist_or_warn(st);
            }
        }
        self.dispatch(due);
    }

    /// Compares the tree with the previous one and notifies ValueChange, ObjectCreation and
    /// ObjectDeletion subscribers. Run every second by the transport.
    pub fn watch(&self, prev: &mut Option<BTreeMap<String, String>>) {
        // The tree costs the supervisor a List: build it only while someone subscribed to
        // what a comparison finds.
        let wanted = self.st.lock().unwrap().subscriptions.iter().any(|s| {
            s.enable
                && matches!(
                    s.notif_type.as_str(),
                    "ValueChange" | "ObjectCreation" | "ObjectDeletion"
                )
        });
        if !wanted {
            *prev = None;
            return;
        }
        let now = self.parameters();
        if let Some(before) = prev.as_ref() {
            for (k, v) in &now {
                if before.get(k) != Some(v) && before.contains_key(k) {
                    self.notify(
                        "ValueChange",
                        k,
                        NotifyKind::ValueChange {
                            path: k.clone(),
                            value: v.clone(),
                        },
                    );
                }
            }
            let objs = |m: &BTreeMap<String, String>| -> BTreeSet<String> {
                m.keys()
                    .filter_map(|k| {
                        let segs: Vec<&str> = k.split('.').collect();
                        let i = segs.iter().rposition(|s| s.parse::<u32>().is_ok())?;
                        Some(format!("{}.", segs[..=i].join(".")))
                    })
                    .collect()
            };
            let (was, is) = (objs(before), objs(&now));
            for o in is.difference(&was) {
                self.notify(
                    "ObjectCreation",
                    o,
                    NotifyKind::ObjectCreation { path: o.clone() },
                );
            }
            for o in was.difference(&is) {
                self.notify(
                    "ObjectDeletion",
                    o,
                    NotifyKind::ObjectDeletion { path: o.clone() },
                );
            }
        }
        *prev = Some(now);
    }
}

/// The notifications of `kind` for the enabled subscribers of `notif_type` on `path`; those
/// with NotifRetry are kept in `st.unacked` until answered (the caller saves `st`).
fn queue(st: &mut Persisted, notif_type: &str, path: &str, kind: &NotifyKind) -> Vec<Notification> {
    let subs: Vec<Subscription> = st
        .subscriptions
        .iter()
        .filter(|s| s.enable && s.notif_type == notif_type)
        .filter(|s| {
            s.reference_list
                .iter()
                .any(|r| r == "Device." || matches(r, path) || path.starts_with(r.as_str()))
        })
        .cloned()
        .collect();
    let next = std::time::Instant::now() + RETRY_FIRST;
    subs.into_iter()
        .map(|s| {
            if s.notif_retry {
                st.unacked.push(Unacked {
                    recipient: s.recipient.clone(),
                    subscription_id: s.id.clone(),
                    kind: kind.clone(),
                    attempts: 0,
                    next: Some(next),
                });
            }
            (
                s.recipient,
                Outgoing::Notify {
                    subscription_id: s.id,
                    send_resp: s.notif_retry,
                    kind: kind.clone(),
                },
            )
        })
        .collect()
}

/// The objects this agent serves (its supported data model).
pub fn schema() -> Vec<SupportedObject> {
    use ParamType::*;
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let params = |v: &[(&str, ParamType)]| {
        v.iter()
            .map(|(n, t)| (n.to_string(), *t, false))
            .collect::<Vec<_>>()
    };
    let du_args = strs(&[
        "UUID",
        "DeploymentUnitRef",
        "Version",
        "CurrentState",
        "Resolved",
        "ExecutionUnitRefList",
        "StartTime",
        "CompleteTime",
        "OperationPerformed",
        "Fault.FaultCode",
        "Fault.FaultString",
    ]);
    let obj = |path: &str, multi: bool| SupportedObject {
        path: path.into(),
        multi_instance: multi,
        add_delete: false,
        params: vec![],
        commands: vec![],
        events: vec![],
    };
    vec![
        SupportedObject {
            params: params(&[
                ("ExecEnvNumberOfEntries", UnsignedInt),
                ("DeploymentUnitNumberOfEntries", UnsignedInt),
                ("ExecutionUnitNumberOfEntries", UnsignedInt),
            ]),
            commands: vec![(
                "InstallDU()".into(),
                strs(&["URL", "UUID", "Username", "Password", "ExecutionEnvRef"]),
                vec![],
                true,
            )],
            events: vec![("DUStateChange!".into(), du_args)],
            ..obj(SM, false)
        },
        SupportedObject {
            params: params(&[
                ("Enable", Boolean),
                ("Status", String),
                ("Name", String),
                ("Type", String),
                ("Vendor", String),
                ("Version", String),
                ("AvailableMemory", UnsignedInt),
                ("AvailableDiskSpace", UnsignedInt),
                ("ActiveExecutionUnits", String),
            ]),
            ..obj(&format!("{SM}ExecEnv.{{i}}."), true)
        },
        SupportedObject {
            params: params(&[
                ("UUID", String),
                ("DUID", String),
                ("Name", String),
                ("Status", String),
                ("Resolved", Boolean),
                ("URL", String),
                ("Vendor", String),
                ("Version", String),
                ("ExecutionUnitList", String),
                ("ExecutionEnvRef", String),
            ]),
            commands: vec![
                (
                    "Update()".into(),
                    strs(&["URL", "Username", "Password"]),
                    vec![],
                    true,
                ),
                ("Uninstall()".into(), vec![], vec![], true),
            ],
            ..obj(&format!("{SM}DeploymentUnit.{{i}}."), true)
        },
        SupportedObject {
            params: params(&[
                ("EUID", String),
                ("Name", String),
                ("ExecEnvLabel", String),
                ("Status", String),
                ("RequestedState", String),
                ("ExecutionFaultCode", String),
                ("ExecutionFaultMessage", String),
                ("AutoStart", Boolean),
                ("Vendor", String),
                ("Version", String),
                ("References", String),
                ("ExecutionEnvRef", String),
                ("MemoryInUse", UnsignedInt),
                ("CPUPercentInUse", UnsignedInt),
                (&format!("{VENDOR}Restarts"), UnsignedInt),
                (&format!("{VENDOR}Runtime"), String),
            ]),
            commands: vec![
                (
                    "SetRequestedState()".into(),
                    strs(&["RequestedState"]),
                    vec![],
                    false,
                ),
                ("Restart()".into(), vec![], vec![], false),
            ],
            ..obj(&format!("{SM}ExecutionUnit.{{i}}."), true)
        },
        SupportedObject {
            params: params(&[("Enable", Boolean), ("RetryCount", UnsignedInt)]),
            ..obj(&format!("{SM}ExecutionUnit.{{i}}.AutoRestart."), false)
        },
        SupportedObject {
            params: params(&[
                ("SteeredPackets", UnsignedInt),
                ("SteeredBytes", UnsignedInt),
                ("ReturnedPackets", UnsignedInt),
            ]),
            ..obj(&format!("{SM}ExecutionUnit.{{i}}.{VENDOR}Steering."), false)
        },
        SupportedObject {
            add_delete: true,
            params: [
                "Enable",
                "ID",
                "Recipient",
                "NotifType",
                "ReferenceList",
                "NotifRetry",
                "Persistent",
            ]
            .iter()
            .map(|n| {
                let t = if matches!(*n, "Enable" | "NotifRetry" | "Persistent") {
                    Boolean
                } else {
                    String
                };
                (n.to_string(), t, true)
            })
            .collect(),
            ..obj(&format!("{SUBS}{{i}}."), true)
        },
        SupportedObject {
            params: params(&[
                ("Originator", String),
                ("Command", String),
                ("CommandKey", String),
                ("Status", String),
            ]),
            ..obj(&format!("{REQS}{{i}}."), true)
        },
    ]
}

/// The supported objects at or below `path` (`{i}` or instance numbers accepted).
fn supported(path: &str, first_level_only: bool) -> Result<Vec<SupportedObject>, (u32, String)> {
    // Instance numbers in the request name the same supported object as `{i}`.
    let norm: String = path
        .split('.')
        .map(|s| if s.parse::<u32>().is_ok() { "{i}" } else { s })
        .collect::<Vec<_>>()
        .join(".");
    let norm = if norm.ends_with('.') {
        norm
    } else {
        format!("{norm}.")
    };
    let depth = norm.trim_end_matches('.').split('.').count();
    let all = schema();
    let found: Vec<SupportedObject> = all
        .into_iter()
        .filter(|o| {
            let below = o.path.starts_with(&norm);
            let d = o
                .path
                .trim_end_matches('.')
                .trim_end_matches(".{i}")
                .split('.')
                .count();
            below && (!first_level_only || d <= depth + 1)
        })
        .collect();
    if found.is_empty() && !["Device.", "Device.LocalAgent."].contains(&norm.as_str()) {
        return Err((
            E_INVALID_PATH,
            format!("{path}: not in the supported data model"),
        ));
    }
    Ok(found)
}

/// Multi-instance tables that exist even when empty.
fn is_table(path: &str) -> bool {
    ["Device.", "Device.LocalAgent.", SM].contains(&path)
        || schema()
            .iter()
            .any(|o| o.multi_instance && o.path.strip_suffix("{i}.") == Some(path))
}

fn camel(k: &str) -> String {
    k.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

fn flatten(out: &mut Vec<(String, String)>, prefix: &str, v: &Value) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(out, &format!("{prefix}.{}", camel(k)), v);
            }
        }
        Value::Null => {}
        Value::String(s) => out.push((prefix.into(), s.clone())),
        v => out.push((prefix.into(), v.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn supported_data_model_lists_objects_below_a_path() {
        let all = supported("Device.SoftwareModules.", false).unwrap();
        assert!(all
            .iter()
            .any(|o| o.path == "Device.SoftwareModules.DeploymentUnit.{i}."
                && o.commands.iter().any(|c| c.0 == "Uninstall()" && c.3)));
        let eu = supported("Device.SoftwareModules.ExecutionUnit.3.", true).unwrap();
        assert_eq!(eu[0].path, "Device.SoftwareModules.ExecutionUnit.{i}.");
        assert!(supported("Device.Nothing.", false).is_err());
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
            (ErrorKind::Untrusted, F_BAD_SIGNATURE),
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
    }
}
