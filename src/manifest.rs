//! Service manifests (TOML): what a service is and what it may use.
//!
//! Parsing rejects unknown fields and wrong types; [`Manifest::validate`] then checks values.
//! Every error names the file, the field and what would be accepted.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    Microvm,
    Lxc,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// What happens to a service's steered traffic when the service is not running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    Open,
    Closed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub runtime: RuntimeKind,
    /// `builtin:busybox` or `rootfs:PATH` (a directory, relative to the manifest's folder),
    /// `initramfs:FILE`, `package`, or `image:sha256:HEX`: an OCI image of the image store
    /// (what `service install --image` sets).
    #[serde(default)]
    pub image: String,
    /// What runs; an OCI image's service runs its image's entrypoint and command when this
    /// is empty.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The user the program runs as in its container: `UID[:GID]`; an OCI image's service
    /// may name its image's users and groups (`NAME[:GROUP]`), or take its image's `User`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The directory the program starts in (absolute, inside its root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// The signal that asks it to stop (`SIGTERM` when unset, or its image's `StopSignal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Capabilities the service keeps (e.g. `NET_BIND_SERVICE`); all others are dropped.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Run the container without a user namespace (its root is the host's root). Only with a
    /// grant in the gateway's policy; containers are unprivileged by default.
    #[serde(default)]
    pub privileged: bool,
    #[serde(default = "default_failure_mode")]
    pub failure_mode: FailureMode,
    /// Seconds between the polite stop request and the kill.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_s: u32,
    pub resources: Resources,
    #[serde(default)]
    pub restart: Restart,
    #[serde(default)]
    pub network: Network,
    /// How an update proves the new version works (else it is rolled back).
    #[serde(default)]
    pub health: Health,
    /// The guest kernel of a `runtime = "microvm"` service.
    #[serde(default)]
    pub microvm: Microvm,
    /// The operator's settings the service takes (`[settings.NAME]`: type, default, bounds).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, crate::settings::SettingDecl>,
    /// The host calls the service may make (`[host_calls] allow = ["link.stats:wlan*"]`,
    /// see [`crate::hostcall`]), checked against the operator's policy at install.
    #[serde(default, skip_serializing_if = "HostCalls::is_empty")]
    pub host_calls: HostCalls,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostCalls {
    #[serde(default)]
    pub allow: Vec<String>,
}

impl HostCalls {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
    }

    /// The grants (checked when the manifest was loaded).
    pub fn grants(&self) -> crate::hostcall::Grants {
        crate::hostcall::Grants::parse(&self.allow).unwrap_or_default()
    }
}

/// A microVM service's kernel: its `image` is the initramfs, its `command` the guest's init.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Microvm {
    /// A bzImage on the gateway; by default the gateway's own kernel
    /// (`/boot/vmlinuz-$(uname -r)`).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Extra kernel command line arguments (the console, reboot and init arguments are set).
    #[serde(default)]
    pub cmdline: String,
}

/// The health check after a start or update: the service must be running and, when set, the
/// command must succeed inside it or the TCP port must accept, within `deadline_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default)]
    pub exec: Option<Vec<String>>,
    /// A TCP port inside the service's network namespace.
    #[serde(default)]
    pub tcp_port: Option<u16>,
    /// The service must speak on its verdict socket (hello or ping) after it starts.
    #[serde(default)]
    pub verdict_ping: bool,
    #[serde(default = "default_deadline")]
    pub deadline_s: u32,
}

impl Default for Health {
    fn default() -> Health {
        Health {
            exec: None,
            tcp_port: None,
            verdict_ping: false,
            deadline_s: default_deadline(),
        }
    }
}

fn default_deadline() -> u32 {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default = "one")]
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Percent of one CPU (100 = a whole CPU, 150 = one and a half).
    #[serde(default)]
    pub cpu_quota_percent: Option<u32>,
    #[serde(default)]
    pub pids: Option<u32>,
    /// Writable disk the service may use, MiB.
    #[serde(default)]
    pub disk_mib: Option<u32>,
}

/// `[restart]`: each field may be left out (it keeps its default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Restart {
    pub policy: RestartPolicy,
    /// Restarts in a row (without a stable run in between) before the service is `failed`.
    pub max_retries: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// A run this long resets the retry count.
    pub stable_after_s: u64,
}

impl Default for Restart {
    fn default() -> Restart {
        Restart {
            policy: RestartPolicy::OnFailure,
            max_retries: 5,
            backoff_initial_ms: 200,
            backoff_max_ms: 30_000,
            stable_after_s: 60,
        }
    }
}

/// The service's network attachment: its interface on the gateway's bridge and which of the
/// gateway's traffic is steered to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// Give the service an interface (a veth for containers) named after it on the host side,
    /// plugged into the board's Open vSwitch bridge.
    #[serde(default = "yes")]
    pub interface: bool,
    /// Steering policies (`kind = "dns" | "new-sessions" | "match"`).
    #[serde(default)]
    pub steering: Vec<flowbridge::steering::Policy>,
    /// A steering service that can hang while alive would black-hole its class: with this set
    /// it must send `{"op":"ping"}` on its verdict socket at least this often, or it is failed
    /// over and restarted.
    #[serde(default)]
    pub heartbeat_timeout_ms: Option<u64>,
    /// When steering to the service (re)starts: `started` as soon as its process runs, or
    /// `notify` once it sends `{"op":"ready"}` on its verdict socket (the service SDK does,
    /// once its packet port is open). Until then its failure mode applies, so a restarting
    /// service is never sent traffic it cannot answer yet. A `notify` service that stays
    /// silent for the daemon's start timeout is failed over and restarted.
    #[serde(default)]
    pub ready: Readiness,
    /// The service's IPv4 address on its interface, `A.B.C.D/PREFIX` (set on eth0 by liblxc
    /// for a container, by gatevisor's guest init for a microVM). Unset: the service
    /// configures its interface itself.
    #[serde(default)]
    pub address: Option<String>,
}

impl Default for Network {
    fn default() -> Network {
        Network {
            interface: true,
            steering: Vec::new(),
            heartbeat_timeout_ms: None,
            ready: Readiness::Started,
            address: None,
        }
    }
}

/// When a steering service is ready for its traffic (`[network] ready`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    /// As soon as its process runs.
    #[default]
    Started,
    /// When it says so on its verdict socket.
    Notify,
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_failure_mode() -> FailureMode {
    FailureMode::Open
}
fn default_stop_timeout() -> u32 {
    10
}

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageRef {
    /// A busybox rootfs gatevisor builds from the host's static busybox.
    BuiltinBusybox,
    /// A directory tree used as the root filesystem (copied at install).
    Rootfs(PathBuf),
    /// A microVM's initramfs (newc cpio, copied at install).
    Initramfs(PathBuf),
    /// An OCI image of the image store, by digest: its layers are the container's root.
    Layers(gatevisor_images::oci::Digest),
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {file}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("{file}: a manifest is at most {limit} bytes")]
    TooLarge { file: PathBuf, limit: u64 },
    #[error("{file}: field `{field}`: {problem}")]
    Field {
        file: PathBuf,
        field: String,
        problem: String,
    },
}

/// The longest service name: it becomes part of interface names (15 bytes at most).
pub const MAX_NAME_LEN: usize = 12;

/// Every key of the manifest's schema (named in parse errors).
const FIELDS: &[&str] = &[
    "name",
    "version",
    "runtime",
    "image",
    "command",
    "env",
    "user",
    "workdir",
    "stop_signal",
    "capabilities",
    "failure_mode",
    "stop_timeout_s",
    "resources",
    "restart",
    "network",
    "health",
    "microvm",
    "vcpus",
    "memory_mib",
    "cpu_quota_percent",
    "pids",
    "disk_mib",
    "policy",
    "max_retries",
    "backoff_initial_ms",
    "backoff_max_ms",
    "stable_after_s",
    "interface",
    "steering",
    "heartbeat_timeout_ms",
    "ready",
    "address",
    "exec",
    "tcp_port",
    "verdict_ping",
    "deadline_s",
    "kernel",
    "cmdline",
    "privileged",
    "settings",
    "type",
    "default",
    "description",
    "min",
    "max",
    "max_len",
    "max_items",
    "format",
    "allowed",
];

/// The largest manifest read (a real one is a few hundred bytes).
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

impl FailureMode {
    pub fn to_flowbridge(self) -> flowbridge::controller::FailureMode {
        match self {
            FailureMode::Open => flowbridge::controller::FailureMode::Open,
            FailureMode::Closed => flowbridge::controller::FailureMode::Closed,
        }
    }
}

impl Manifest {
    /// Reads, parses and validates a manifest file.
    pub fn load(file: &Path) -> Result<Manifest, ManifestError> {
        let m = Manifest::parse(file, &read_bounded(file)?)?;
        m.validate(file)?;
        Ok(m)
    }

    /// The operator's manifest of a service run from OCI image `digest` (its `config`): what
    /// the manifest leaves out comes from the image (command, environment, working
    /// directory, user, stop signal), names of users and groups resolved in the image's own
    /// `/etc/passwd` and `/etc/group` (`read` gives an image file's bytes), then every value
    /// is checked as for [`Self::load`].
    pub fn load_for_image(
        file: &Path,
        digest: &gatevisor_images::oci::Digest,
        config: &gatevisor_images::oci::spec::ImageConfig,
        read: &dyn Fn(&str) -> Option<Vec<u8>>,
    ) -> Result<Manifest, ManifestError> {
        let mut m = Manifest::parse(file, &read_bounded(file)?)?;
        let bad = |field: &str, problem: String| ManifestError::Field {
            file: file.into(),
            field: field.into(),
            problem,
        };
        if !m.image.is_empty() && m.image != format!("image:{digest}") {
            return Err(bad(
                "image",
                format!(
                    "{:?}: the service runs the image it is installed with; leave `image` out",
                    m.image
                ),
            ));
        }
        m.image = format!("image:{digest}");
        if m.command.is_empty() {
            m.command = config.argv();
            if m.command.is_empty() {
                return Err(bad(
                    "command",
                    "the image has no Entrypoint or Cmd: name the program to run".into(),
                ));
            }
        }
        for (k, v) in config.env() {
            let name_ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if name_ok && !v.contains(['\0', '\n']) {
                m.env.entry(k).or_insert(v);
            }
        }
        let run = config.run();
        if m.workdir.is_none() {
            m.workdir = run.working_dir.filter(|w| !w.is_empty());
        }
        if m.stop_signal.is_none() {
            m.stop_signal = run.stop_signal.filter(|s| !s.is_empty());
        }
        if let Some(u) = m.user.clone().or(run.user.filter(|u| !u.is_empty())) {
            let (uid, gid) = resolve_user(&u, read).map_err(|p| bad("user", p))?;
            m.user = Some(format!("{uid}:{gid}"));
        }
        m.validate(file)?;
        Ok(m)
    }

    /// The user the program runs as, as ids (`None`: its root).
    pub fn user_ids(&self) -> Option<(u32, u32)> {
        self.user.as_deref().and_then(|u| parse_ids(u).ok())
    }

    /// The service manifest inside a package (at `file`, staged): every value checked as for
    /// [`Self::load`], and its image must be the package's own.
    pub fn load_packaged(file: &Path) -> Result<Manifest, ManifestError> {
        let m = Manifest::parse(file, &read_bounded(file)?)?;
        m.validate_values(file)?;
        if m.image != "package" {
            return Err(ManifestError::Field {
                file: file.into(),
                field: "image".into(),
                problem: format!(
                    "{:?}: a packaged service runs the image inside its package only; use \"package\"",
                    m.image
                ),
            });
        }
        Ok(m)
    }

    /// Parses TOML; an error says where (line and column) and what, but never quotes the
    /// text (the file may be anything, e.g. a secret someone named as a manifest).
    pub fn parse(file: &Path, text: &str) -> Result<Manifest, ManifestError> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let at = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let start = before.rfind('\n').map_or(0, |i| i + 1);
                    let col = before.len() - start + 1;
                    // The field is named when it is one of the manifest's own: a key of the
                    // schema says nothing of a file that is not a manifest.
                    let key = text[start..]
                        .split(['=', '\n'])
                        .next()
                        .map(str::trim)
                        .filter(|k| FIELDS.contains(k));
                    match key {
                        Some(k) => format!("line {line}, column {col}: field `{k}`: "),
                        None => format!("line {line}, column {col}: "),
                    }
                })
                .unwrap_or_default();
            ManifestError::Parse {
                file: file.into(),
                message: format!("{at}{}", e.message().trim_end().replace('\n', " ")),
            }
        })
    }

    /// Checks every value; `file` is only used in messages.
    pub fn validate(&self, file: &Path) -> Result<(), ManifestError> {
        self.validate_values(file)?;
        self.image_ref(file)?;
        Ok(())
    }

    /// [`Self::validate`] but for the image, which only the caller can resolve.
    fn validate_values(&self, file: &Path) -> Result<(), ManifestError> {
        let bad = |field: &str, problem: String| ManifestError::Field {
            file: file.into(),
            field: field.into(),
            problem,
        };
        validate_name(&self.name).map_err(|p| bad("name", p))?;
        crate::hostcall::Grants::parse(&self.host_calls.allow)
            .map_err(|p| bad("host_calls.allow", p))?;
        if self.version.trim().is_empty() || self.version.len() > 64 {
            return Err(bad("version", "must be 1 to 64 characters".into()));
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            return Err(bad(
                "command",
                "must name the program to run, e.g. [\"/bin/sh\", \"-c\", \"...\"]".into(),
            ));
        }
        if let Some(u) = &self.user {
            parse_ids(u).map_err(|p| bad("user", p))?;
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') || w.len() > 1024 || w.contains('\0') {
                return Err(bad(
                    "workdir",
                    "must be an absolute path inside the service's root".into(),
                ));
            }
        }
        if let Some(sig) = &self.stop_signal {
            parse_signal(sig).map_err(|p| bad("stop_signal", p))?;
        }
        if self.runtime == RuntimeKind::Microvm
            && (self.user.is_some() || self.workdir.is_some() || self.stop_signal.is_some())
        {
            return Err(bad(
                "user",
                "user, workdir and stop_signal are for containers (a microVM's init runs its command)".into(),
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            return Err(bad(
                "command",
                "arguments must not contain NUL bytes".into(),
            ));
        }
        if self.runtime == RuntimeKind::Microvm {
            if self.resources.vcpus > gatevisor_vmm::vm::MAX_VCPUS as u32 {
                return Err(bad(
                    "resources.vcpus",
                    format!(
                        "a microVM has at most {} vCPUs",
                        gatevisor_vmm::vm::MAX_VCPUS
                    ),
                ));
            }
            if self.microvm.cmdline.contains('\0') || self.microvm.cmdline.len() > 1024 {
                return Err(bad(
                    "microvm.cmdline",
                    "must be at most 1024 characters, without NUL".into(),
                ));
            }
        } else if self.microvm != Microvm::default() {
            return Err(bad("microvm", "only for runtime = \"microvm\"".into()));
        }
        for (k, v) in &self.env {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(bad(
                    &format!("env.{k}"),
                    "variable names are letters, digits and _, not starting with a digit".into(),
                ));
            }
            if v.contains('\0') || v.contains('\n') {
                return Err(bad(&format!("env.{k}"), "value must be one line".into()));
            }
        }
        self.capability_set(file)?;
        let r = &self.resources;
        if r.memory_mib == 0 {
            return Err(bad(
                "resources.memory_mib",
                "must be at least 4 (MiB); 0 would leave the service no memory".into(),
            ));
        }
        if r.memory_mib < 4 {
            return Err(bad(
                "resources.memory_mib",
                "must be at least 4 (MiB)".into(),
            ));
        }
        if r.vcpus == 0 || r.vcpus > 64 {
            return Err(bad("resources.vcpus", "must be 1 to 64".into()));
        }
        if let Some(q) = r.cpu_quota_percent {
            if q == 0 || q > 100 * r.vcpus {
                return Err(bad(
                    "resources.cpu_quota_percent",
                    format!("must be 1 to {} (100 per vCPU)", 100 * r.vcpus),
                ));
            }
        }
        if r.pids == Some(0) {
            return Err(bad("resources.pids", "must be at least 1".into()));
        }
        if r.disk_mib == Some(0) {
            return Err(bad("resources.disk_mib", "must be at least 1".into()));
        }
        let rs = &self.restart;
        if rs.backoff_initial_ms == 0 || rs.backoff_initial_ms > rs.backoff_max_ms {
            return Err(bad(
                "restart.backoff_initial_ms",
                format!(
                    "must be at least 1 and at most restart.backoff_max_ms ({})",
                    rs.backoff_max_ms
                ),
            ));
        }
        if rs.max_retries > 1000 {
            return Err(bad("restart.max_retries", "must be at most 1000".into()));
        }
        if let Some(t) = self.network.heartbeat_timeout_ms {
            if !(500..=600_000).contains(&t) {
                return Err(bad(
                    "network.heartbeat_timeout_ms",
                    "must be 500 to 600000 (milliseconds)".into(),
                ));
            }
            if self.network.steering.is_empty() {
                return Err(bad(
                    "network.heartbeat_timeout_ms",
                    "needs network.steering (the heartbeat comes over the verdict socket)".into(),
                ));
            }
        }
        if self.network.ready == Readiness::Notify && self.network.steering.is_empty() {
            return Err(bad(
                "network.ready",
                "\"notify\" needs network.steering (the word comes over the verdict socket)".into(),
            ));
        }
        if let Some(a) = &self.network.address {
            let ok = a.split_once('/').is_some_and(|(ip, p)| {
                ip.parse::<std::net::Ipv4Addr>().is_ok()
                    && p.parse::<u8>().is_ok_and(|p| (1..=32).contains(&p))
            });
            if !ok {
                return Err(bad(
                    "network.address",
                    format!("{a:?}: expected an IPv4 address with its prefix, like 10.77.0.60/24"),
                ));
            }
            if !self.network.interface {
                return Err(bad(
                    "network.address",
                    "needs network.interface = true".into(),
                ));
            }
        }
        for (i, p) in self.network.steering.iter().enumerate() {
            p.validate()
                .map_err(|e| bad(&format!("network.steering[{i}]"), e.to_string()))?;
        }
        if !self.network.steering.is_empty() && !self.network.interface {
            return Err(bad(
                "network.interface",
                "must be true when network.steering is set (steered traffic reaches the service through it)".into(),
            ));
        }
        if self.health.deadline_s == 0 || self.health.deadline_s > 3600 {
            return Err(bad("health.deadline_s", "must be 1 to 3600 seconds".into()));
        }
        if self.health.verdict_ping && self.network.steering.is_empty() {
            return Err(bad(
                "health.verdict_ping",
                "needs network.steering (only steering services have a verdict socket)".into(),
            ));
        }
        if self
            .health
            .exec
            .as_ref()
            .is_some_and(|c| c.is_empty() || c[0].is_empty())
        {
            return Err(bad(
                "health.exec",
                "must name a program to run inside the service".into(),
            ));
        }
        if self.stop_timeout_s > 600 {
            return Err(bad("stop_timeout_s", "must be at most 600 seconds".into()));
        }
        crate::settings::validate_decls(&self.settings).map_err(|(f, p)| bad(&f, p))?;
        Ok(())
    }

    /// Does the service get a control channel (the verdict socket: steering verdicts,
    /// heartbeat, readiness, its settings)?
    pub fn has_control_channel(&self) -> bool {
        !self.network.steering.is_empty()
            || !self.settings.is_empty()
            || !self.host_calls.is_empty()
    }

    /// The image reference, resolved against the manifest's folder.
    pub fn image_ref(&self, file: &Path) -> Result<ImageRef, ManifestError> {
        self.image_ref_as(file, self.runtime == RuntimeKind::Microvm)
    }

    /// Where a package keeps its tree as a microVM's initramfs: beside the service manifest
    /// `file`.
    pub fn package_initramfs(file: &Path) -> PathBuf {
        file.with_file_name("initramfs.cpio")
    }

    /// [`Self::image_ref`] for the runtime the service really gets (`auto` resolved): what a
    /// microVM (`microvm` true) or a container boots.
    pub fn image_ref_as(&self, file: &Path, microvm: bool) -> Result<ImageRef, ManifestError> {
        let bad = |problem: String| ManifestError::Field {
            file: file.into(),
            field: "image".into(),
            problem,
        };
        if let Some(d) = self.image.strip_prefix("image:") {
            let digest = gatevisor_images::oci::Digest::parse(d).map_err(|e| bad(e.to_string()))?;
            if microvm {
                return Err(bad(
                    "an OCI image runs as a container on this gateway: set runtime = \"lxc\" or \"auto\"".into(),
                ));
            }
            return Ok(ImageRef::Layers(digest));
        }
        if self.image.is_empty() {
            return Err(bad(
                "missing: name the service's image (an OCI image's service is installed with --image)".into(),
            ));
        }
        if let Some(p) = self.image.strip_prefix("initramfs:") {
            if self.runtime != RuntimeKind::Microvm {
                return Err(bad(
                    "an initramfs is a microVM's image: set runtime = \"microvm\"".into(),
                ));
            }
            let f = file.parent().unwrap_or(Path::new(".")).join(p);
            if !f.is_file() {
                return Err(bad(format!("initramfs {} does not exist", f.display())));
            }
            return Ok(ImageRef::Initramfs(f));
        }
        if microvm {
            if self.image == "package" {
                // A package carries its tree as an initramfs too.
                let f = Self::package_initramfs(file);
                return if f.is_file() {
                    Ok(ImageRef::Initramfs(f))
                } else {
                    Err(bad("\"package\" means the image inside a signed package, and this one has no initramfs.cpio for a microVM".into()))
                };
            }
            return Err(bad(format!(
                "{:?}: a microVM boots an initramfs: use \"initramfs:FILE\" or \"package\"",
                self.image
            )));
        }
        if self.image == "builtin:busybox" {
            return Ok(ImageRef::BuiltinBusybox);
        }
        if self.image == "package" {
            // Inside a package (and in the folder it is built from) the rootfs sits beside
            // the service manifest.
            let dir = file.parent().unwrap_or(Path::new(".")).join("rootfs");
            return if dir.is_dir() {
                Ok(ImageRef::Rootfs(dir))
            } else {
                Err(bad("\"package\" means the rootfs inside a signed package: install the package (.gvpkg), not its service manifest".into()))
            };
        }
        let Some(p) = self.image.strip_prefix("rootfs:") else {
            return Err(bad(format!(
                "{:?} is not an image reference; use \"builtin:busybox\", \"rootfs:DIR\", \"initramfs:FILE\" or \"package\"",
                self.image
            )));
        };
        let base = file.parent().unwrap_or(Path::new("."));
        let dir = base.join(p);
        if !dir.is_dir() {
            return Err(bad(format!(
                "rootfs directory {} does not exist",
                dir.display()
            )));
        }
        Ok(ImageRef::Rootfs(dir))
    }

    pub fn capability_set(&self, file: &Path) -> Result<Vec<caps::Capability>, ManifestError> {
        self.capabilities
            .iter()
            .map(|c| {
                parse_capability(c).ok_or_else(|| ManifestError::Field {
                    file: file.into(),
                    field: "capabilities".into(),
                    problem: format!("{c:?} is not a Linux capability (e.g. \"NET_BIND_SERVICE\")"),
                })
            })
            .collect()
    }
}

/// `UID[:GID]` as ids inside a container (below 65,536: what its user namespace maps);
/// without a group, the group is the user's id.
pub fn parse_ids(u: &str) -> Result<(u32, u32), String> {
    let num = |s: &str| {
        s.parse::<u32>()
            .ok()
            .filter(|n| (*n as u64) < gatevisor_images::oci::layer::MAX_ID)
    };
    let bad = || {
        format!("{u:?}: use UID or UID:GID, numbers below 65536 (user names are resolved only in an OCI image)")
    };
    match u.split_once(':') {
        Some((a, b)) => Ok((num(a).ok_or_else(bad)?, num(b).ok_or_else(bad)?)),
        None => {
            let id = num(u).ok_or_else(bad)?;
            Ok((id, id))
        }
    }
}

/// An OCI `User` (`NAME`, `UID`, `NAME:GROUP`, `UID:GID`, …) as ids, names looked up in the
/// image's `/etc/passwd` and `/etc/group` (what `read` gives). A user without a group gets
/// the primary group of its passwd entry (0 without one), as container engines do.
pub fn resolve_user(
    spec: &str,
    read: &dyn Fn(&str) -> Option<Vec<u8>>,
) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let table = |file: &str| -> Vec<Vec<String>> {
        read(file)
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(|l| l.split(':').map(str::to_string).collect())
                    .collect()
            })
            .unwrap_or_default()
    };
    let in_range = |n: u32| (n as u64) < gatevisor_images::oci::layer::MAX_ID;
    let passwd = table("etc/passwd");
    let entry = |pred: &dyn Fn(&[String]) -> bool| {
        passwd
            .iter()
            .find(|f| f.len() >= 4 && pred(f))
            .and_then(|f| Some((f[2].parse::<u32>().ok()?, f[3].parse::<u32>().ok()?)))
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (
            uid,
            entry(&|f| f[2] == uid.to_string())
                .map(|e| e.1)
                .unwrap_or(0),
        ),
        Err(_) => entry(&|f| f[0] == user)
            .ok_or_else(|| format!("{user:?} is not a user of the image (its /etc/passwd)"))?,
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => table("etc/group")
                .iter()
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("{g:?} is not a group of the image (its /etc/group)"))?,
        },
    };
    if !in_range(uid) || !in_range(gid) {
        return Err(format!(
            "{spec:?}: ids must be below 65536 (what a container maps)"
        ));
    }
    Ok((uid, gid))
}

/// A signal's name (`SIGTERM`, `TERM`) or number, as a stop request.
pub fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    use std::str::FromStr;
    let bad = || format!("{s:?} is not a signal (e.g. \"SIGTERM\", \"SIGQUIT\", 15)");
    let sig = match s.parse::<i32>() {
        Ok(n) => nix::sys::signal::Signal::try_from(n).map_err(|_| bad())?,
        Err(_) => {
            let name = if s.starts_with("SIG") {
                s.to_string()
            } else {
                format!("SIG{s}")
            };
            nix::sys::signal::Signal::from_str(&name).map_err(|_| bad())?
        }
    };
    if sig == nix::sys::signal::Signal::SIGKILL || sig == nix::sys::signal::Signal::SIGSTOP {
        return Err(format!(
            "{s:?} cannot ask a program to stop: it ends or freezes it at once"
        ));
    }
    Ok(sig)
}

/// A capability by its name, with or without `CAP_` (`NET_RAW`, `CAP_NET_RAW`).
pub fn parse_capability(name: &str) -> Option<caps::Capability> {
    let full = if name.starts_with("CAP_") {
        name.to_string()
    } else {
        format!("CAP_{name}")
    };
    full.parse().ok()
}

/// A manifest file's text: a regular file only (a FIFO does not hang the reader), at most
/// [`MAX_MANIFEST_BYTES`], UTF-8.
fn read_bounded(file: &Path) -> Result<String, ManifestError> {
    use std::io::Read;
    let read = |source| ManifestError::Read {
        file: file.into(),
        source,
    };
    let f = gatevisor_images::package::open_regular(file).map_err(read)?;
    let mut bytes = Vec::new();
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            file: file.into(),
            limit: MAX_MANIFEST_BYTES,
        });
    }
    String::from_utf8(bytes).map_err(|_| ManifestError::Parse {
        file: file.into(),
        message: "not UTF-8 text".into(),
    })
}

/// Names are 1-12 characters of `a-z`, `0-9` and `-`, starting with a letter: they end up in
/// file names, container names and interface names.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{name:?} must be 1 to {MAX_NAME_LEN} characters (it becomes part of interface names)"
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(format!(
            "{name:?} may only use a-z, 0-9 and '-', starting with a letter (no '/', '..' or spaces)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "hello"
version = "1.0.0"
runtime = "lxc"
image = "builtin:busybox"
command = ["/bin/sh", "-c", "echo hi"]
[resources]
memory_mib = 32
"#;

    fn check(text: &str) -> Result<Manifest, ManifestError> {
        let f = Path::new("/etc/svc/test.toml");
        let m = Manifest::parse(f, text)?;
        m.validate(f)?;
        Ok(m)
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = check(GOOD).unwrap();
        assert_eq!(m.restart.policy, RestartPolicy::OnFailure);
        assert_eq!(m.failure_mode, FailureMode::Open);
        assert_eq!(m.resources.vcpus, 1);
        assert!(m.network.interface);
    }

    #[test]
    fn a_restart_section_may_name_only_what_it_changes() {
        let m = check(&format!("{GOOD}[restart]\npolicy = \"always\"\n")).unwrap();
        assert_eq!(m.restart.policy, RestartPolicy::Always);
        let d = Restart::default();
        assert_eq!(
            (m.restart.max_retries, m.restart.backoff_max_ms),
            (d.max_retries, d.backoff_max_ms)
        );
        // Unknown keys are still refused.
        let e = check(&format!("{GOOD}[restart]\nretries = 3\n")).unwrap_err();
        assert!(e.to_string().contains("retries"), "{e}");
    }

    #[test]
    fn names_are_restricted() {
        for bad in [
            "",
            "a/b",
            "..",
            "a..b",
            "Hello",
            "1abc",
            "much-too-long-name",
            "a b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "dns-filter", "iot2"] {
            assert!(validate_name(good).is_ok());
        }
    }

    #[test]
    fn the_shipped_services_declare_valid_settings() {
        for svc in ["dns-filter", "iot-guard"] {
            let f = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("images/services/{svc}/package/service.toml"));
            let m = Manifest::parse(&f, &std::fs::read_to_string(&f).unwrap()).unwrap();
            m.validate_values(&f).unwrap();
            assert!(m.settings.len() >= 4, "{svc}");
        }
    }

    #[test]
    fn capability_names_with_or_without_prefix() {
        let t = GOOD.replace(
            "[resources]",
            "capabilities = [\"NET_RAW\", \"CAP_NET_ADMIN\"]\n[resources]",
        );
        let m = check(&t).unwrap();
        assert_eq!(m.capability_set(Path::new("x")).unwrap().len(), 2);
    }

    #[test]
    fn an_images_user_is_resolved_in_its_own_passwd_and_group() {
        let files = |f: &str| -> Option<Vec<u8>> {
            match f {
                "etc/passwd" => Some(b"root:x:0:0::/root:/bin/sh\nmosquitto:x:101:103::/var/lib/mosquitto:/usr/sbin/nologin\n".to_vec()),
                "etc/group" => Some(b"root:x:0:\nmosquitto:x:103:\nstaff:x:50:\n".to_vec()),
                _ => None,
            }
        };
        let table = [
            ("mosquitto", Ok((101, 103))),
            ("mosquitto:staff", Ok((101, 50))),
            ("101", Ok((101, 103))),
            ("2000", Ok((2000, 0))),
            ("2000:7", Ok((2000, 7))),
            ("0:mosquitto", Ok((0, 103))),
            ("nobody", Err("not a user of the image")),
            ("mosquitto:wheel", Err("not a group of the image")),
            ("70000", Err("below 65536")),
        ];
        for (spec, want) in table {
            let got = resolve_user(spec, &files);
            match (want, got) {
                (Ok(ids), Ok(g)) => assert_eq!(g, ids, "{spec}"),
                (Err(why), Err(e)) => assert!(e.contains(why), "{spec}: {e}"),
                (w, g) => panic!("{spec}: want {w:?}, got {g:?}"),
            }
        }
        // Outside an image, only ids.
        assert_eq!(parse_ids("1000:100"), Ok((1000, 100)));
        assert!(parse_ids("mosquitto").is_err());
        assert_eq!(parse_signal("QUIT"), Ok(nix::sys::signal::Signal::SIGQUIT));
        assert_eq!(parse_signal("15"), Ok(nix::sys::signal::Signal::SIGTERM));
        assert!(parse_signal("SIGKILL").is_err() && parse_signal("SIGNOPE").is_err());
    }
}
