//! The commands. Each is a few lines: build a request, call, print (`--json` or a table).

use clap::{Args, Subcommand};
use gatevisor::api::{self, ErrorKind, Request};
use gatevisor::client::{Client, ClientError};
use std::path::{Path, PathBuf};

mod attach;
mod publisher;
use attach::{console, exec};
pub use publisher::{absolute_reference, image, key, ImageCmd, KeyCmd, DEFAULT_KEYS_DIR};

/// Exit codes scripts can rely on (see README).
pub const EXIT_DAEMON_DOWN: i32 = 3;

#[derive(Args)]
pub struct DaemonArgs {
    #[arg(long, default_value = crate::DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Where desired state, logs and service files live.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Board profile name (default: chosen by the board's DMI name, else generic).
    #[arg(long)]
    pub board: Option<String>,
    /// Stop all services when the daemon stops (default: leave them running).
    #[arg(long)]
    pub stop_services_on_exit: bool,
    /// Open vSwitch bridge to plug services into (default: the board profile's).
    #[arg(long)]
    pub bridge: Option<String>,
    /// Do not use Open vSwitch at all (no steering).
    #[arg(long)]
    pub no_network: bool,
    /// Trusted publisher keys (default /etc/gatevisor/keys).
    #[arg(long, env = "GATEVISOR_KEYS_DIR")]
    pub keys_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Install a service from its manifest (TOML) or a signed package; with --image, from an
    /// OCI image of the store (or pulled first, with --signature), the manifest giving what
    /// the image does not.
    Install {
        manifest: PathBuf,
        /// An OCI image: in the store (digest, prefix, reference), or a reference to pull.
        #[arg(long)]
        image: Option<String>,
        /// The image's signature, to pull it first.
        #[arg(long, requires = "image")]
        signature: Option<PathBuf>,
        /// Start it right away (the command answers once it runs).
        #[arg(long)]
        start: bool,
        /// Run it with this runtime instead of what its manifest resolves to (a manifest
        /// with `runtime = "auto"` can go on either).
        #[arg(long, value_parser = ["lxc", "microvm"])]
        runtime: Option<String>,
        #[arg(long)]
        json: bool,
    },
    Start(NameArgs),
    /// Update a packaged service to the version in a signed package (rolled back by itself
    /// when the new version fails its health check).
    Update {
        name: String,
        package: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Go back to the previous packaged version.
    Rollback(NameArgs),
    Stop(NameArgs),
    Restart(NameArgs),
    Remove(NameArgs),
    /// Freeze all processes of a service (cgroup freezer).
    Freeze(NameArgs),
    Thaw(NameArgs),
    List {
        #[arg(long)]
        json: bool,
    },
    Status(NameArgs),
    /// Print the service's log (its stdout and stderr).
    Logs {
        name: String,
        /// Keep printing new output.
        #[arg(short, long)]
        follow: bool,
        /// How much of the end of the log to print first.
        #[arg(long, default_value_t = 16 * 1024)]
        bytes: u64,
    },
    /// Attach to a microVM service's serial console: its output appears here, what is typed
    /// goes to the guest. Ctrl-] detaches (on a terminal); otherwise input ends at end of file.
    Console {
        name: String,
        /// Detach after this many seconds.
        #[arg(long = "for")]
        for_s: Option<u64>,
    },
    /// Show or change the operator's settings of a service (those its manifest declares).
    /// Values are text: true/false, a number, a string, or a comma-separated list.
    Config {
        name: String,
        #[command(subcommand)]
        action: Option<ConfigAction>,
        #[arg(long, global = true)]
        json: bool,
    },
    /// Run a command inside a running service.
    Exec {
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum ConfigAction {
    /// Print one setting's value.
    Get { key: String },
    /// Change settings, all or nothing: `KEY=VALUE` ...
    Set {
        #[arg(required = true)]
        values: Vec<String>,
    },
}

#[derive(Args)]
pub struct NameArgs {
    pub name: String,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct BoardArgs {
    #[arg(long)]
    pub json: bool,
    /// Profile to report against (default: auto).
    #[arg(long)]
    pub board: Option<String>,
    #[arg(long)]
    pub boards_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct EventsArgs {
    /// Keep printing new events.
    #[arg(short, long)]
    pub follow: bool,
    #[arg(long)]
    pub json: bool,
    /// How many past events to print.
    #[arg(short = 'n', long, default_value_t = 50)]
    pub last: usize,
}

/// Prints the error and returns the exit code for it.
fn fail(e: &ClientError) -> i32 {
    eprintln!("gatevisor: {}", gatevisor::api::error_chain(e));
    match e {
        ClientError::NotRunning { .. } => EXIT_DAEMON_DOWN,
        ClientError::PermissionDenied { .. } => ErrorKind::Denied.exit_code(),
        ClientError::Api(a) => a.kind.exit_code(),
        _ => ErrorKind::Internal.exit_code(),
    }
}

/// Sends `req` and prints its answer: as it came with `json`, else read as `T` for `human`.
/// A request about one service (`request(name)`) whose answer is its status.
fn on_status(socket: &Path, a: NameArgs, request: impl FnOnce(String) -> Request) -> i32 {
    run(socket, request(a.name), a.json, print_status)
}

fn run<T: serde::de::DeserializeOwned>(
    socket: &Path,
    req: Request,
    json: bool,
    human: impl Fn(&T),
) -> i32 {
    match Client::new(socket).call(&req) {
        Ok(v) if json => {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            0
        }
        Ok(v) => match api::result_as::<T>(v) {
            Ok(t) => {
                human(&t);
                0
            }
            Err(e) => fail(&ClientError::Api(e)),
        },
        Err(e) => fail(&e),
    }
}

pub fn service(socket: &Path, cmd: ServiceCmd) -> i32 {
    match cmd {
        ServiceCmd::Install {
            manifest,
            image,
            signature,
            start,
            runtime,
            json,
        } => {
            let manifest = std::path::absolute(&manifest).unwrap_or(manifest);
            let runtime = runtime.as_deref().and_then(gatevisor::runtime::Kind::parse);
            let req = match image {
                // An OCI image of the store, or pulled first with its signature.
                Some(image) => {
                    let mut image = absolute_reference(&image);
                    if let Some(signature) = signature {
                        let pull = Request::ImagePull {
                            reference: image.clone(),
                            signature: std::path::absolute(&signature).unwrap_or(signature),
                        };
                        match Client::new(socket).call(&pull).and_then(|v| {
                            api::result_as::<api::ImageInfo>(v).map_err(ClientError::Api)
                        }) {
                            Ok(info) => image = info.digest,
                            Err(e) => return fail(&e),
                        }
                    }
                    Request::InstallImage {
                        image,
                        manifest,
                        start,
                        runtime,
                        deployment: None,
                    }
                }
                // A signed package is told by its content (or a `.gvpkg` name, which is
                // never read as a manifest); the daemon refuses a package sent as a manifest.
                None if gatevisor::supervisor::is_package(&manifest) => Request::InstallPackage {
                    package: manifest,
                    start,
                    runtime,
                },
                None => Request::Install {
                    manifest,
                    start,
                    runtime,
                },
            };
            run(socket, req, json, |v: &api::ServiceStatus| {
                println!("installed {} ({})", v.name, v.state.name())
            })
        }
        ServiceCmd::Update {
            name,
            package,
            json,
        } => {
            let package = std::path::absolute(&package).unwrap_or(package);
            run(
                socket,
                Request::Update { name, package },
                json,
                print_status,
            )
        }
        ServiceCmd::Rollback(a) => on_status(socket, a, |name| Request::Rollback { name }),
        ServiceCmd::Start(a) => on_status(socket, a, |name| Request::Start { name }),
        ServiceCmd::Stop(a) => on_status(socket, a, |name| Request::Stop { name }),
        ServiceCmd::Restart(a) => on_status(socket, a, |name| Request::Restart { name }),
        ServiceCmd::Freeze(a) => on_status(socket, a, |name| Request::Freeze { name }),
        ServiceCmd::Thaw(a) => on_status(socket, a, |name| Request::Thaw { name }),
        ServiceCmd::Remove(a) => run(
            socket,
            Request::Remove { name: a.name },
            a.json,
            |v: &api::Removed| println!("removed {}", v.removed),
        ),
        ServiceCmd::Status(a) => on_status(socket, a, |name| Request::Status { name }),
        ServiceCmd::List { json } => run(socket, Request::List, json, print_list),
        ServiceCmd::Logs {
            name,
            follow,
            bytes,
        } => logs(socket, name, follow, bytes),
        ServiceCmd::Config { name, action, json } => config(socket, name, action, json),
        ServiceCmd::Exec { name, command } => exec(socket, name, command),
        ServiceCmd::Console { name, for_s } => console(socket, name, for_s),
    }
}

fn config(socket: &Path, name: String, action: Option<ConfigAction>, json: bool) -> i32 {
    match action {
        None => run(
            socket,
            Request::ConfigGet { name },
            json,
            |v: &api::Settings| {
                if v.settings.is_empty() {
                    println!("{} declares no settings", v.service);
                }
                for e in &v.settings {
                    let mark = if e.set { "" } else { "  (default)" };
                    println!("{} = {}{mark}", e.name, e.value);
                    println!("    {}; default {}", e.ty, e.default);
                    if !e.description.is_empty() {
                        println!("    {}", e.description);
                    }
                }
            },
        ),
        Some(ConfigAction::Get { key }) => {
            let got = Client::new(socket)
                .call_as::<api::Settings>(&Request::ConfigGet { name: name.clone() });
            match got {
                Ok(v) => match v.settings.iter().find(|e| e.name == key) {
                    Some(e) if json => {
                        println!("{}", serde_json::to_string_pretty(e).unwrap_or_default());
                        0
                    }
                    Some(e) => {
                        println!("{}", e.value);
                        0
                    }
                    None => {
                        eprintln!("error: service {name} declares no setting {key}");
                        ErrorKind::NotFound.exit_code()
                    }
                },
                Err(e) => fail(&e),
            }
        }
        Some(ConfigAction::Set { values }) => {
            let mut map = std::collections::BTreeMap::new();
            for kv in values {
                let Some((k, v)) = kv.split_once('=') else {
                    eprintln!("error: {kv:?}: expected KEY=VALUE");
                    return ErrorKind::Invalid.exit_code();
                };
                map.insert(k.trim().to_string(), v.to_string());
            }
            run(
                socket,
                Request::ConfigSet {
                    name,
                    values: map,
                    dry_run: false,
                },
                json,
                |v: &api::ConfigChanged| {
                    if v.changed.is_empty() {
                        println!("{}: nothing changed", v.service);
                    } else {
                        println!("{}: changed {}", v.service, v.changed.join(", "));
                    }
                },
            )
        }
    }
}

fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn mib(v: Option<u64>) -> String {
    v.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
        .unwrap_or_else(|| "-".into())
}

fn print_status(v: &api::ServiceStatus) {
    println!("{}  {}  ({} runtime)", v.name, v.version, v.runtime);
    println!(
        "  state:       {} (desired {})",
        v.state.name(),
        v.desired.name()
    );
    println!("  init pid:    {}", or_dash(v.init_pid));
    println!("  uptime:      {} s", or_dash(v.uptime_s));
    println!("  restarts:    {}", v.restarts);
    if let Some(u) = &v.updating {
        println!(
            "  updating:    to {}",
            u.to_version
                .as_deref()
                .unwrap_or("a package being verified")
        );
    }
    println!(
        "  memory:      {} of {}",
        mib(v.memory.usage_bytes),
        mib(v.memory.limit_bytes)
    );
    println!("  interface:   {}", or_dash(v.interface.as_deref()));
    if let Some(image) = &v.image {
        println!("  image:       {image}");
    }
    if let Some(user) = &v.user {
        println!("  user:        {user}");
    }
    if !v.host_calls.is_empty() {
        println!("  host calls:  {}", v.host_calls.join(", "));
    }
    if let Some(vm) = &v.microvm {
        println!(
            "  microvm:     guest {}, VMM resident {} ({})",
            mib(Some(vm.guest_memory_bytes)),
            mib(vm.vmm_rss_bytes),
            vm.config.display()
        );
    }
    if let Some((st, c)) = v.steering.as_ref().and_then(|st| Some((st, st.counters?))) {
        println!(
            "  steered:     {} packets, {} bytes to the service; bridge fast path {} bytes",
            c.steered_packets,
            c.steered_bytes,
            or_dash(st.bridge_fast_path_bytes)
        );
        let vd = c.verdicts;
        println!(
            "  verdicts:    {} forward, {} allow, {} block, {} reply (in band); {} over the API",
            vd.forward, vd.allow, vd.block, vd.reply, st.api_verdicts
        );
    }
    if let Some(e) = &v.network_error {
        println!("  network:     {e}");
    }
    if let Some(e) = &v.last_exit {
        println!("  last exit:   {}", e.description);
    }
    if let Some(r) = &v.failure_reason {
        println!("  failed:      {r}");
    }
}

fn print_list(v: &api::ServiceList) {
    println!(
        "{:<13} {:<10} {:<8} {:<9} {:>8} {:>8} {:>11}",
        "NAME", "VERSION", "RUNTIME", "STATE", "PID", "RESTARTS", "MEMORY"
    );
    for x in &v.services {
        println!(
            "{:<13} {:<10} {:<8} {:<9} {:>8} {:>8} {:>11}",
            x.name,
            x.version,
            x.runtime.to_string(),
            x.state.name(),
            or_dash(x.init_pid),
            x.restarts,
            mib(x.memory.usage_bytes)
        );
    }
}

fn logs(socket: &Path, name: String, follow: bool, bytes: u64) -> i32 {
    use std::io::Write;
    let client = Client::new(socket);
    let mut offset = None;
    loop {
        let req = Request::Logs {
            name: name.clone(),
            offset,
            tail_bytes: bytes,
        };
        let got = client.call_as::<api::Logs>(&req);
        match got {
            Ok(v) => {
                print!("{}", v.data);
                let _ = std::io::stdout().flush();
                offset = Some(v.next_offset);
            }
            Err(e) => return fail(&e),
        }
        if !follow {
            return 0;
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
}

pub fn board(args: BoardArgs) -> i32 {
    let report = match gatevisor::board::probe(args.board.as_deref(), args.boards_dir.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gatevisor: {e}");
            return ErrorKind::Invalid.exit_code();
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
        return 0;
    }
    let b = &report.board;
    let ok = |r: &Result<(), String>| match r {
        Ok(()) => "yes".to_string(),
        Err(e) => format!("no ({e})"),
    };
    println!(
        "profile:        {} ({})",
        b.profile.name, b.profile.description
    );
    println!("kernel:         {}", b.host.kernel);
    println!("cpus:           {}", b.host.cpus);
    println!(
        "memory:         {} MiB total, {} MiB available, {} MiB for services",
        b.host.memory_total_mib,
        b.host.memory_available_mib,
        b.service_memory_budget_mib()
    );
    println!(
        "kvm:            {:?}, api {:?}, microVM capable: {}",
        b.kvm.kind, b.kvm.api_version, b.kvm.microvm_capable
    );
    if let Some(p) = &b.kvm.problem {
        println!("                {p}");
    }
    println!(
        "cgroups:        {:?} ({})",
        b.cgroup.version,
        b.cgroup.controllers.join(" ")
    );
    println!("liblxc:         {}", report.lxc_version);
    println!(
        "netns/tap/veth: {} / {} / {}",
        ok(&b.net.netns),
        ok(&b.net.tap),
        ok(&b.net.veth)
    );
    println!(
        "open vswitch:   {}",
        b.ovs
            .system_db_socket
            .clone()
            .map(|s| format!("system instance at {s}"))
            .unwrap_or_else(|| {
                if b.ovs.binaries_installed {
                    "no system instance; binaries installed (private instance possible)".into()
                } else {
                    "not installed".into()
                }
            })
    );
    println!(
        "bridge:         {} (datapath {}, hardware offload {})",
        b.profile.bridge, b.profile.datapath_type, b.profile.hardware_offload
    );
    println!(
        "auto runtime:   {:?} — {}",
        b.auto_runtime, b.auto_runtime_reason
    );
    let runtimes: Vec<&str> = report.runtimes_available.iter().map(|k| k.name()).collect();
    println!("runtimes available: {}", runtimes.join(", "));
    0
}

pub fn events(socket: &Path, args: EventsArgs) -> i32 {
    let client = Client::new(socket);
    let print = |e: &gatevisor::events::Event| {
        if args.json {
            println!("{}", serde_json::to_string(e).unwrap_or_default());
        } else {
            println!(
                "{}  {:<14} {:<12} {}",
                clock(e.at_ms),
                format!("{:?}", e.kind).to_lowercase(),
                e.service.clone().unwrap_or_else(|| "-".into()),
                e.detail
            );
        }
        use std::io::Write;
        std::io::stdout().flush().is_ok()
    };
    let res = if args.follow {
        client.follow_events(args.last, print)
    } else {
        client
            .call_as::<api::Events>(&Request::Events {
                follow: false,
                last: args.last,
            })
            .map(|v| {
                for e in &v.events {
                    print(e);
                }
            })
    };
    match res {
        Ok(_) => 0,
        Err(e) => fail(&e),
    }
}

/// `HH:MM:SS.mmm` (UTC) of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

pub fn flows(socket: &Path, json: bool) -> i32 {
    run(socket, Request::Flows, json, |v: &api::Flows| {
        println!("bridge {}", v.bridge);
        println!("{:<10} {:>10} {:>12}  FLOW", "OWNER", "PACKETS", "BYTES");
        for f in &v.flows {
            println!(
                "{:<10} {:>10} {:>12}  {}",
                f.owner, f.packets, f.bytes, f.flow
            );
        }
    })
}
