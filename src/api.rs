//! The control API: one request enum, one reply shape, shared by the CLI (Unix socket) and the
//! remote channel. Requests and replies are versioned JSON, one per line.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub const API_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    /// Installs the service described by a local manifest file (root's on the gateway, its
    /// image under the configured image roots). A signed package sent as a manifest is
    /// refused: it is never read as one.
    Install {
        manifest: PathBuf,
        #[serde(default)]
        start: bool,
        /// Run it with this runtime (a USP `ExecutionEnvRef`, `--runtime`) instead of the one
        /// its manifest resolves to; its manifest must say that runtime or `auto`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runtime: Option<crate::runtime::Kind>,
    },
    /// Installs a signed package: verified against the trusted publisher keys before
    /// anything is written, then installed from the image store.
    InstallPackage {
        package: PathBuf,
        #[serde(default)]
        start: bool,
        /// As for [`Request::Install`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runtime: Option<crate::runtime::Kind>,
    },
    /// Installs a service from an OCI image of the image store (`image`: its digest, a
    /// unique prefix of at least 12 digits, or a reference it was pulled from), with the
    /// operator's manifest (what the manifest leaves out comes from the image).
    InstallImage {
        image: String,
        manifest: PathBuf,
        #[serde(default)]
        start: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runtime: Option<crate::runtime::Kind>,
        /// The deployment document the manifest came in (a signature of the image that
        /// signs `manifest`'s text too, `image sign --service`): what the service may keep
        /// is then checked as that publisher's, not as a local manifest's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deployment: Option<PathBuf>,
    },
    /// Imports an OCI image (`oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
    /// `docker-archive:FILE[:NAME:TAG]`) into the image store, if the operator's detached
    /// signature (`signature`, a file) signs its digest with a trusted key.
    ImagePull {
        reference: String,
        signature: PathBuf,
    },
    ImageList,
    /// Removes an image no service runs, and the layers no other image has.
    ImageRemove {
        image: String,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
    },
    Restart {
        name: String,
    },
    Remove {
        name: String,
    },
    /// Installs a new version from a signed package; rolls back by itself when the new version
    /// does not pass its health check.
    Update {
        name: String,
        package: PathBuf,
    },
    /// Goes back to the previous packaged version.
    Rollback {
        name: String,
    },
    Freeze {
        name: String,
    },
    /// Runs `argv` inside the running service through its backend (a microVM's guest init;
    /// a container's namespaces) and answers its exit code ([`Executed`]). The CLI attaches
    /// to a container itself, with a terminal; this is for what has none.
    Exec {
        name: String,
        argv: Vec<String>,
    },
    Thaw {
        name: String,
    },
    List,
    Status {
        name: String,
    },
    /// Bytes of the service log from `offset` (None: the last `tail_bytes`).
    Logs {
        name: String,
        offset: Option<u64>,
        #[serde(default = "default_tail")]
        tail_bytes: u64,
    },
    /// The flows on the bridge, by owner (base pipeline or service), with counters.
    Flows,
    /// The service's declared settings with their values.
    ConfigGet {
        name: String,
    },
    /// Changes settings of a service (`NAME` → value as text), all or nothing; with
    /// `dry_run` only checks them.
    ConfigSet {
        name: String,
        values: BTreeMap<String, String>,
        #[serde(default)]
        dry_run: bool,
    },
    /// Recent events; with `follow` the connection stays open and new events stream.
    Events {
        #[serde(default)]
        follow: bool,
        #[serde(default = "default_events")]
        last: usize,
    },
}

fn default_tail() -> u64 {
    16 * 1024
}
fn default_events() -> usize {
    50
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub v: u32,
    #[serde(flatten)]
    pub body: T,
}

/// What went wrong, in a form scripts can branch on (it maps to the CLI's exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The request or the manifest it names is invalid.
    Invalid,
    NotFound,
    /// The request conflicts with the current state (duplicate name, wrong state, no room).
    Conflict,
    /// The runtime failed (liblxc, the kernel).
    Runtime,
    Internal,
    /// The API version is not spoken here.
    Version,
    /// The gateway's policy does not grant what the package or manifest asks for (a
    /// capability, an image from a host path).
    Denied,
    /// A service of that name is installed already.
    Duplicate,
    /// The board has no room for it (its service count, its memory budget, the image store's
    /// limits).
    NoResources,
    /// A package whose signature cannot be trusted (unsigned, signed by a key the gateway
    /// does not trust or revoked, a manifest tampered with).
    Untrusted,
    /// A package that is not what it claims: not an archive, truncated, an artifact that is
    /// not what its signed manifest says.
    Corrupt,
}

impl ErrorKind {
    /// The CLI's exit code for this kind (documented in the README).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Invalid | ErrorKind::Untrusted | ErrorKind::Corrupt => 5,
            ErrorKind::NotFound => 4,
            ErrorKind::Conflict | ErrorKind::Duplicate | ErrorKind::NoResources => 6,
            ErrorKind::Runtime | ErrorKind::Internal => 1,
            ErrorKind::Version => 7,
            ErrorKind::Denied => 8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

/// An error with its causes, `outer: cause: cause`, for the one line a reply carries (a
/// cause already quoted by the message above it is not repeated).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !s.is_empty() && !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cur = c.source();
    }
    text
}

// ------------------------------------------------------------------ typed replies
//
// What a request answers, as the daemon writes it and as the CLI, USP and scripts read it:
// one type each, never a key looked up by name.

/// One service as `status`, `list`, `install`, `start`, `update` and the others answer it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub id: u32,
    pub name: String,
    /// The manifest's version.
    pub version: String,
    /// The packaged version installed (none for a local manifest).
    pub package_version: Option<String>,
    /// What the labels of the OCI image it runs say: its vendor and version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_vendor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_version: Option<String>,
    /// The publisher key that signed the installed package.
    pub publisher: Option<String>,
    pub runtime: crate::runtime::Kind,
    pub state: crate::lifecycle::State,
    pub desired: crate::state::Desired,
    pub init_pid: Option<i32>,
    pub monitor_pid: Option<i32>,
    pub started_at_ms: Option<u64>,
    pub uptime_s: Option<u64>,
    pub restarts: u64,
    pub consecutive_failures: u32,
    pub last_exit: Option<crate::state::LastExit>,
    pub failure_reason: Option<String>,
    pub memory: Memory,
    pub cpu_usec: Option<u64>,
    pub pids: Option<u64>,
    pub failure_mode: crate::manifest::FailureMode,
    /// When it last spoke on its control channel (a heartbeat, ready, a verdict), in ms since
    /// the epoch: its heartbeat timeout counts from then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heard_at_ms: Option<u64>,
    /// The host calls it is granted (`OP:PATTERN`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_calls: Vec<String>,
    /// The host end of its network interface.
    pub interface: Option<String>,
    pub container: Option<ContainerInfo>,
    pub microvm: Option<MicrovmInfo>,
    pub log_file: PathBuf,
    /// The package or manifest it was installed from.
    pub source: PathBuf,
    /// The OCI image it runs (`sha256:HEX`), and who runs it inside (`UID:GID`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    pub settings: Vec<Setting>,
    pub steering: Option<Steering>,
    /// Why it is not on the bridge as it should be.
    pub network_error: Option<String>,
    /// An update or rollback is under way, from the verification of its package to the
    /// judgement of the version switched to (its deployment is `Updating` for USP); the
    /// lifecycle `state` says where the service is meanwhile (`updating` while the new
    /// version runs under its health check).
    #[serde(default)]
    pub updating: Option<Updating>,
}

/// An update or rollback under way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Updating {
    /// The version it switches to (or back to); none while the package is verified.
    pub to_version: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    pub usage_bytes: Option<u64>,
    /// A microVM's is its VMM's: the guest's memory and the VMM's own.
    pub limit_bytes: Option<u64>,
}

/// How a command run in a service ([`Request::Exec`]) ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Executed {
    pub service: String,
    pub exit_code: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub lxcpath: PathBuf,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MicrovmInfo {
    pub config: PathBuf,
    pub guest_memory_bytes: u64,
    pub console: PathBuf,
    pub vmm_rss_bytes: Option<u64>,
    pub cgroup: Option<PathBuf>,
}

/// A declared setting with its value, all as text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub value: String,
    pub default: String,
    /// Set by the operator (else: its default).
    pub set: bool,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Steering {
    pub policies: Vec<flowbridge::steering::Policy>,
    /// None while the switch cannot tell (not plugged, no Open vSwitch).
    pub counters: Option<flowbridge::controller::Counters>,
    /// Session verdicts it gave over its verdict socket.
    pub api_verdicts: u64,
    pub bridge_fast_path_bytes: Option<u64>,
}

#[cfg(test)]
impl ServiceStatus {
    /// A running container with nothing else to tell, for tests of what reads statuses.
    pub(crate) fn sample(name: &str) -> ServiceStatus {
        ServiceStatus {
            id: 1,
            name: name.into(),
            version: "1.0.0".into(),
            package_version: None,
            image_vendor: None,
            image_version: None,
            publisher: None,
            runtime: crate::runtime::Kind::Lxc,
            state: crate::lifecycle::State::Running,
            desired: crate::state::Desired::Running,
            init_pid: Some(2),
            monitor_pid: Some(1),
            started_at_ms: Some(0),
            uptime_s: Some(0),
            restarts: 0,
            consecutive_failures: 0,
            last_exit: None,
            failure_reason: None,
            memory: Memory::default(),
            cpu_usec: None,
            pids: None,
            failure_mode: crate::manifest::FailureMode::Open,
            last_heard_at_ms: None,
            host_calls: vec![],
            interface: None,
            container: None,
            microvm: None,
            log_file: PathBuf::new(),
            source: PathBuf::new(),
            image: None,
            user: None,
            settings: vec![],
            steering: None,
            network_error: None,
            updating: None,
        }
    }
}

/// `list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceList {
    pub services: Vec<ServiceStatus>,
}

/// An OCI image of the store, as `image list` and `image pull` answer it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// What its signature names (`sha256:HEX`).
    pub digest: String,
    /// Where it was pulled from, latest last.
    pub references: Vec<String>,
    /// The publisher key that signed it, and the name it was trusted under.
    pub key: String,
    pub publisher: String,
    /// Its layers' uncompressed digests, base first.
    pub layers: Vec<String>,
    /// What it runs (entrypoint and command) and as whom.
    pub command: Vec<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub imported_at_ms: u64,
    /// The services that run it.
    pub used_by: Vec<String>,
    /// For a pull: layers it stored, and layers the store had already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_added: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_shared: Option<usize>,
}

/// `image list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

/// `image rm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRemoved {
    pub removed: String,
    /// Layers that went with it (no other image had them).
    pub layers_freed: usize,
}

/// `remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub removed: String,
}

/// `events` (without `follow`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Events {
    pub events: Vec<crate::events::Event>,
}

/// `logs`: the bytes read, and where the next read starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logs {
    pub data: String,
    pub next_offset: u64,
}

/// `config-get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub service: String,
    pub settings: Vec<Setting>,
}

/// `config-set`: the settings whose value changed (none with `dry_run`: would change).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigChanged {
    pub service: String,
    pub changed: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

/// `flows`: what the bridge holds, by owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flows {
    pub bridge: String,
    pub flows: Vec<FlowEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEntry {
    /// `base` (the pipeline), a service's name, or `other` (not gatevisor's).
    pub owner: String,
    /// Hexadecimal, `0x…`.
    pub cookie: String,
    pub table: u8,
    pub priority: u16,
    pub packets: u64,
    pub bytes: u64,
    /// The flow as `ovs-ofctl` would write it.
    pub flow: String,
}

/// The result of a reply, as `T`: a reply that does not have that shape is an `internal`
/// error (a daemon of another version).
pub fn result_as<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| {
        ApiError::new(
            ErrorKind::Internal,
            format!("the daemon's answer does not have the expected shape: {e}"),
        )
    })
}

/// A typed result as a reply's body.
pub fn to_result<T: Serialize>(t: &T) -> Result<serde_json::Value, ApiError> {
    serde_json::to_value(t).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub enum Reply {
    Ok { result: serde_json::Value },
    Error { error: ApiError },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_tagged_and_versioned() {
        let e = Envelope {
            v: API_VERSION,
            body: Request::Start {
                name: "hello".into(),
            },
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"v":1,"op":"start","name":"hello"}"#);
        let back: Envelope<Request> = serde_json::from_str(&s).unwrap();
        assert_eq!(back.body, e.body);
    }

    #[test]
    fn typed_replies_read_back_as_written_and_another_shape_is_an_internal_error() {
        let st = ServiceStatus {
            settings: vec![Setting {
                name: "profile".into(),
                ty: "string".into(),
                value: "kids".into(),
                default: "open".into(),
                set: true,
                description: String::new(),
            }],
            ..ServiceStatus::sample("dns-filter")
        };
        let v = to_result(&st).unwrap();
        assert_eq!(v["state"], "running");
        assert_eq!(v["settings"][0]["type"], "string");
        assert_eq!(result_as::<ServiceStatus>(v).unwrap(), st);
        // `dry_run` is written only when it is one.
        let c = ConfigChanged {
            service: "s".into(),
            changed: vec![],
            dry_run: false,
        };
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"{"service":"s","changed":[]}"#
        );
        let e =
            result_as::<ServiceList>(serde_json::json!({"services": [{"name": "x"}]})).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Internal);
        assert!(e.message.contains("expected shape"), "{e}");
    }

    #[test]
    fn unknown_op_is_rejected() {
        assert!(
            serde_json::from_str::<Envelope<Request>>(r#"{"v":1,"op":"format-disk"}"#).is_err()
        );
    }
}
