//! `gatevisor`: one binary for the daemon, the field engineer's CLI and the per-container
//! monitor. Each command only parses arguments, calls the library or the daemon, and prints.

mod cli;
mod daemon;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

pub const DEFAULT_SOCKET: &str = "/run/gatevisor/gatevisor.sock";
pub const DEFAULT_CONFIG: &str = "/etc/gatevisor/gatevisor.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/gatevisor";

#[derive(Parser)]
#[command(
    name = "gatevisor",
    version,
    about = "Run isolated third-party services on a gateway"
)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "GATEVISOR_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the supervisor (normally started by the init system).
    Daemon(cli::DaemonArgs),
    /// Install, run and inspect services.
    #[command(subcommand)]
    Service(cli::ServiceCmd),
    /// Show what this board can do and which runtime `auto` picks.
    Board(cli::BoardArgs),
    /// Show the event log (started, exited, restarted, failed, ...).
    Events(cli::EventsArgs),
    /// Publisher keys and the gateway's trust store.
    #[command(subcommand)]
    Key(cli::KeyCmd),
    /// Build signed service packages; sign, pull, list and remove OCI images.
    #[command(subcommand)]
    Image(cli::ImageCmd),
    /// Show the flows on the bridge, by owner, with packet and byte counters.
    Flows {
        #[arg(long)]
        json: bool,
    },
    /// Run one microVM in this process (the daemon starts one per microVM service; by hand,
    /// a way to try a kernel). Exit status: 0 the guest ended its VM, 2 setup failed, 3 the
    /// guest crashed, 4 the guest broke its machine.
    Vmm {
        /// The VM's TOML configuration (boot, memory_mib, vcpus, console_log).
        #[arg(long)]
        config: PathBuf,
        /// Restore the VM from the snapshot in this directory instead of booting it.
        #[arg(long)]
        restore: Option<PathBuf>,
    },
    /// Internal: the per-container monitor process started by the daemon.
    #[command(name = "__lxc-monitor", hide = true)]
    LxcMonitor { config: String },
    /// Internal: copies a microVM's console (stdin) into its rotated log.
    #[command(name = "__log-pump", hide = true)]
    LogPump {
        file: PathBuf,
        max_bytes: u64,
        keep: u32,
    },
}

fn main() {
    // The per-VM process runs for as long as its guest: it goes straight to the VMM without
    // the argument parser, so that code it never needs is not paged into every VM's process.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let [_, cmd, flag, config, rest @ ..] = args.as_slice() {
        let restore = match rest {
            [] => Some(None),
            [r, dir] if r == "--restore" => Some(Some(std::path::Path::new(dir))),
            _ => None,
        };
        if let (true, Some(restore)) = (cmd == "vmm" && flag == "--config", restore) {
            std::process::exit(gatevisor_vmm::process::vmm_main(
                std::path::Path::new(config),
                restore,
            ));
        }
    }
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Daemon(_) | Command::LxcMonitor { .. } | Command::LogPump { .. }
    ) {
        // A CLI whose reader went away (`gatevisor events | head`) ends quietly, as other
        // command-line tools do, instead of failing a write.
        // SAFETY: resetting SIGPIPE to its default disposition before any thread exists;
        // no handler of ours is replaced.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let code = match cli.command {
        Command::LxcMonitor { config } => gatevisor_lxc::monitor::monitor_main(&config),
        Command::LogPump {
            file,
            max_bytes,
            keep,
        } => gatevisor_lxc::monitor::log_pump_main(&file, max_bytes, keep),
        Command::Vmm { config, restore } => {
            gatevisor_vmm::process::vmm_main(&config, restore.as_deref())
        }
        Command::Daemon(args) => match daemon_main(args, cli.socket) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("gatevisor daemon: {e:#}");
                1
            }
        },
        Command::Service(cmd) => cli::service(&cli.socket, cmd),
        Command::Board(args) => cli::board(args),
        Command::Events(args) => cli::events(&cli.socket, args),
        Command::Flows { json } => cli::flows(&cli.socket, json),
        Command::Key(cmd) => cli::key(cmd),
        Command::Image(cmd) => cli::image(&cli.socket, cmd),
    };
    std::process::exit(code);
}

fn daemon_main(args: cli::DaemonArgs, socket_flag: PathBuf) -> anyhow::Result<()> {
    use anyhow::Context;
    // The daemon is many small threads (watchers, workers, verdict sockets, connections) that
    // allocate little: one malloc arena between them, not one each (each arena keeps pages
    // resident that it once used).
    // SAFETY: mallopt(3) before any other thread exists; it only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // GATEVISOR_LOG: a level or `target=level` pairs (`info,gatevisor::usp=debug`).
    let filter: tracing_subscriber::filter::Targets = std::env::var("GATEVISOR_LOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    let mut file = daemon::ConfigFile::load(&args.config)?;
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    // An explicit --socket (or GATEVISOR_SOCKET) wins over the config file.
    let socket = if socket_flag.as_os_str() != DEFAULT_SOCKET {
        socket_flag
    } else {
        file.socket.unwrap_or(socket_flag)
    };
    let board_name = args.board.or(file.board);
    let report = gatevisor::board::probe(board_name.as_deref(), file.boards_dir.as_deref())
        .context("cannot choose a board profile")?;
    tracing::info!(
        "board profile {}, KVM {:?}, cgroups {:?}, liblxc {}",
        report.board.profile.name,
        report.board.kvm.kind,
        report.board.cgroup.version,
        report.lxc_version
    );
    let exe = std::env::current_exe().context("cannot find my own executable")?;
    let image_roots = gatevisor::supervisor::check_image_roots(
        file.image_roots.take().unwrap_or_default(),
        &state_dir,
    )
    .with_context(|| format!("invalid image_roots in {}", args.config.display()))?;
    let package_ca = file
        .package_ca
        .clone()
        .unwrap_or_else(|| gatevisor::usp::fetch::SYSTEM_CA_BUNDLE.into());
    let registries = gatevisor_images::oci::registry::Registries {
        default_ca: package_ca.clone(),
        hosts: file.registries.take().unwrap_or_default(),
    };
    registries
        .check()
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("invalid [registries] in {}", args.config.display()))?;
    let settings = gatevisor::supervisor::Settings {
        state_dir,
        stop_services_on_exit: args.stop_services_on_exit
            || file.stop_services_on_exit.unwrap_or(false),
        log_max_bytes: file.log_max_bytes.unwrap_or(1 << 20),
        log_keep: file.log_keep.unwrap_or(3),
        events_max_bytes: 1 << 20,
        start_timeout: std::time::Duration::from_secs(30),
        failed_retry: Some(file.failed_retry_s.unwrap_or(300))
            .filter(|s| *s > 0)
            .map(std::time::Duration::from_secs),
        monitor: gatevisor_lxc::MonitorCommand {
            program: exe,
            args: vec!["__lxc-monitor".into()],
        },
        busybox: gatevisor_board::ovs::find_sbin("busybox")
            .unwrap_or_else(|| PathBuf::from("/bin/busybox")),
        network: !args.no_network && file.network.unwrap_or(true),
        bridge: args.bridge.or(file.bridge),
        keys_dir: args
            .keys_dir
            .or(file.keys_dir)
            .unwrap_or_else(|| PathBuf::from(cli::DEFAULT_KEYS_DIR)),
        policy: gatevisor::policy::Policy::new(
            &file.policy.unwrap_or_default(),
            &report.board.profile.name,
        )
        .with_context(|| format!("invalid [policy] in {}", args.config.display()))?,
        image_roots,
        registries,
    };
    let usp_operation_deadline =
        std::time::Duration::from_secs(file.usp_operation_deadline_s.unwrap_or(3600));
    let max = gatevisor::usp::model::MAX_OPERATION_DEADLINE;
    if usp_operation_deadline.is_zero() || usp_operation_deadline > max {
        anyhow::bail!(
            "usp_operation_deadline_s must be 1 to {} (R-SMM.1), not {}",
            max.as_secs(),
            usp_operation_deadline.as_secs()
        );
    }
    daemon::run(daemon::DaemonOptions {
        socket,
        settings,
        board: report.board,
        usp: file.usp,
        usp_service: file.usp_service,
        package_ca,
        usp_operation_deadline,
    })
}
