//! The emulated gateway (issue: qemu-tests): a Debian gateway image with gatevisor started by
//! systemd, booted in QEMU (TCG, emulated AMD-V, so real KVM runs inside it), with a WAN and a
//! LAN NIC whose other ends are taps in network namespaces on the host, and a control channel
//! (virtio-serial, `gateway-agent`) through which the harness runs commands.
//!
//! - [`image`] builds the gateway image: a cached Debian base plus this build's gatevisor.
//! - [`netns`] makes the LAN and WAN hosts.
//! - [`gateway`] boots the gateway and talks to it: [`Gateway::boot`], [`Gateway::run`],
//!   [`Gateway::wait_until`], [`Gateway::reboot`]; everything it started goes away on drop,
//!   console and journal are printed when a test panics.

pub mod bootcmp;
pub mod gateway;
pub mod guest;
pub mod image;
pub mod netns;
pub mod packages;
pub mod proto;

pub use gateway::{Gateway, Output};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    #[error("the gateway's control channel: {0}")]
    Channel(String),
}

pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// Runs a host command, failing with its stderr.
pub(crate) fn host(cmd: &mut std::process::Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(io(what.clone()))?;
    if !out.status.success() {
        return Err(Error::Command {
            what,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo build -q ARGS` in the workspace (the cargo running these tests, when there is one),
/// with `RUSTFLAGS` when given; fails with cargo's errors.
pub fn cargo_build(args: &[&str], rustflags: Option<&str>) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace())
        .args(["build", "-q"])
        .args(args);
    if let Some(flags) = rustflags {
        cmd.env("RUSTFLAGS", flags);
    }
    host(&mut cmd).map(|_| ())
}

/// Builds `packages` as static release binaries (they run where there is no C library: a
/// service's rootfs or a guest's initramfs) and returns the folder they are in.
pub fn build_static(packages: &[&str]) -> Result<PathBuf> {
    let dir = target_dir().join("static");
    let mut args = vec![
        "--release",
        "--target",
        "x86_64-unknown-linux-gnu",
        "--target-dir",
        dir.to_str().expect("a UTF-8 target folder"),
    ];
    for p in packages {
        args.extend(["-p", p]);
    }
    cargo_build(&args, Some("-C target-feature=+crt-static"))?;
    Ok(dir.join("x86_64-unknown-linux-gnu/release"))
}

/// The workspace root (this crate's parent folder).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("qemu-tests lives in the workspace")
        .to_path_buf()
}

/// The cargo target folder of the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// Slow builds kept across checkouts (CI clones afresh): the gateway base image.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("GATEVISOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/gatevisor"))
}

/// The environment variable that turns the scenarios on (`scripts/test.sh` sets it).
pub const ENABLE_VAR: &str = "GATEVISOR_QEMU_TESTS";

/// Why the scenarios cannot run here, or `None` when they should. With [`ENABLE_VAR`] set, a
/// missing prerequisite is a failure, not a skip: CI must not pass without the scenarios.
pub fn skip_reason() -> Option<String> {
    if std::env::var_os(ENABLE_VAR).is_none_or(|v| v.is_empty() || v == "0") {
        return Some(format!(
            "emulated-gateway scenarios are off (each boots a QEMU gateway for ~2 min); \
             set {ENABLE_VAR}=1 to run them (scripts/test.sh does)"
        ));
    }
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (debootstrap, loop mounts, network namespaces, taps)".to_string());
    }
    for tool in ["qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4"] {
        if !on_path(tool) {
            missing.push(format!("{tool} (scripts/setup.sh installs it)"));
        }
    }
    if !missing.is_empty() {
        panic!(
            "{ENABLE_VAR} is set but the emulated gateway cannot run: missing {}",
            missing.join(", ")
        );
    }
    None
}

/// Why a measurement example (a benchmark's part inside the emulated gateway) cannot run
/// here, or `None` when it can: it needs root and QEMU.
pub fn measurement_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (the emulated gateway)".into());
    }
    if !on_path("qemu-system-x86_64") {
        return Some("qemu-system-x86_64 is not installed (scripts/setup.sh)".into());
    }
    None
}

/// Whether `tool` is on the PATH (or in /usr/sbin, /sbin).
pub fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .any(|d| d.join(tool).is_file())
    })
}
