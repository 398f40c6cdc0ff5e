//! A real gatevisor daemon in a temporary state directory, driven through the real CLI.
//! Cleans up the containers it started (through liblxc) and the daemon (by PID) on drop,
//! even when the test panics.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_gatevisor");

/// Tests that need root (liblxc containers, veth) call this first.
pub fn need_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("skipped {test}: needs root for liblxc containers (CI runs as root)");
    false
}

/// Tests that need root and Open vSwitch (the daemon starts its private switch).
pub fn need_ovs(test: &str) -> bool {
    if !need_root(test) {
        return false;
    }
    if gatevisor_board::ovs::find_sbin("ovs-vswitchd").is_none() {
        eprintln!("skipped {test}: Open vSwitch is not installed");
        return false;
    }
    true
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with_env(&[])
    }

    pub fn start_with_env(env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with(env, &[])
    }

    /// A daemon whose trusted keys live in its own `DIR/keys`.
    pub fn start_with_keys() -> Daemon {
        Daemon::start_with_config("")
    }

    /// A daemon with its own key store (`DIR/keys`) and `config` as its configuration file.
    pub fn start_with_config(config: &str) -> Daemon {
        Daemon::start_with_config_args(config, &[])
    }

    /// [`Daemon::start_with_config`] with extra command-line arguments.
    pub fn start_with_config_args(config: &str, args: &[&str]) -> Daemon {
        Daemon::start_with_config_args_env(config, args, &[])
    }

    /// A daemon with its own key store, `args` and `env` in its environment (systemd's, say).
    pub fn start_with_keys_args_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::start_with_config_args_env("", args, env)
    }

    fn start_with_config_args_env(config: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("gv-test")
            .tempdir()
            .unwrap();
        std::fs::write(dir.path().join("none.toml"), config).unwrap();
        let keys = dir.path().join("keys").display().to_string();
        let mut d = Daemon {
            dir,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: ["--keys-dir", &keys]
                .iter()
                .chain(args)
                .map(|a| a.to_string())
                .collect(),
        };
        d.spawn();
        d
    }

    /// A daemon with extra command-line arguments.
    pub fn start_with_args(args: &[&str]) -> Daemon {
        Daemon::start_with(&[], args)
    }

    pub fn start_with(env: &[(&str, &str)], args: &[&str]) -> Daemon {
        let dir = tempfile::Builder::new()
            .prefix("gv-test")
            .tempdir()
            .unwrap();
        let mut d = Daemon {
            dir,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        d.spawn();
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// A bridge name of its own, so that tests running in parallel do not share one.
    pub fn bridge(&self) -> String {
        let tail: String = self
            .dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .chars()
            .rev()
            .take(6)
            .collect();
        format!(
            "gvb{}",
            tail.to_ascii_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "x")
        )
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("gv.sock")
    }

    /// Starts the daemon process and waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("daemon")
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(self.socket())
            .arg("--config")
            .arg(self.dir.path().join("none.toml"))
            .arg("--bridge")
            .arg(self.bridge())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.cli(&["service", "list", "--json"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("daemon did not come up; log:\n{}", self.log());
    }

    pub fn set_env(&mut self, env: &[(&str, &str)]) {
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGKILL the daemon (services must survive).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the daemon and wait for it.
    pub fn term(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        c.wait().unwrap()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("GATEVISOR_SOCKET", self.socket())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Runs the CLI and parses its `--json` output; panics with stderr on failure.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "gatevisor {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn status(&self, name: &str) -> serde_json::Value {
        self.json(&["service", "status", name, "--json"])
    }

    /// Polls `f` every 20 ms until it returns Some or `timeout` passes.
    pub fn wait_for<T>(&self, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes the manifest `text` to `file`, installs and starts it; returns its status.
    pub fn install_started(&self, file: &str, text: &str) -> serde_json::Value {
        let m = self.manifest(file, text);
        self.json(&[
            "service",
            "install",
            m.to_str().unwrap(),
            "--start",
            "--json",
        ])
    }

    /// The folder of a packaged busybox service `name` at `version` that loops until it is
    /// stopped ([`service_toml`]).
    pub fn looping_service(&self, name: &str, version: &str, extra: &str) -> PathBuf {
        let dir = self.dir.path().join(format!("src-{name}-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("service.toml"), service_toml(name, version, extra)).unwrap();
        dir
    }

    /// A signed package of a looping busybox service `name` granted the host calls `grants`
    /// (TOML list items), carrying the SDK's `host-call` binary at `/bin/host-call`.
    pub fn host_call_package(&self, name: &str, grants: &str) -> PathBuf {
        let tool = build_static("gatevisor-service-sdk", false).with_file_name("host-call");
        let src = self.looping_service(name, "1.0.0", &format!("[host_calls]\nallow = [{grants}]"));
        std::fs::create_dir_all(src.join("files/bin")).unwrap();
        std::fs::copy(&tool, src.join("files/bin/host-call")).unwrap();
        self.signed_package(&src, &format!("{name}.gvpkg"))
    }

    /// Installs and starts the package `pkg`; panics unless it answers with it running.
    pub fn install_package_started(&self, pkg: &Path) -> serde_json::Value {
        let st = self.json(&[
            "service",
            "install",
            pkg.to_str().unwrap(),
            "--start",
            "--json",
        ]);
        assert_eq!(st["state"], "running", "{st}");
        st
    }

    /// Writes a manifest file into the test directory and returns its path.
    pub fn manifest(&self, file: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(file);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        // Stop every container this test's daemon defined, through liblxc.
        let lxcpath = self.state_dir().join("lxc");
        if let Ok(rt) = gatevisor_lxc::Runtime::new(
            &lxcpath,
            gatevisor_lxc::Cgroups::V1,
            gatevisor_lxc::MonitorCommand {
                program: PathBuf::new(),
                args: vec![],
            },
        ) {
            for e in std::fs::read_dir(&lxcpath).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let _ = rt.stop(&name, Duration::ZERO);
            }
        }
        // Packaged containers' roots are overlays of the image store: off before the
        // temporary directory goes.
        for e in std::fs::read_dir(self.state_dir().join("services"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = gatevisor_images::checkout::Checkout::at(&e.path()).unmount();
        }
        // The private Open vSwitch outlives a killed daemon by design; stop it here.
        flowbridge::private::stop_in(&self.state_dir().join("ovs"));
        if std::thread::panicking() {
            eprintln!("daemon log:\n{}", self.log());
        }
    }
}

/// A service manifest with the given name and command, the rest sensible defaults.
pub fn manifest_text(name: &str, command: &str, restart: &str) -> String {
    format!(
        r#"name = "{name}"
version = "1.0.0"
runtime = "lxc"
image = "builtin:busybox"
command = ["/bin/sh", "-c", {command:?}]
stop_timeout_s = 3
[resources]
memory_mib = 32
pids = 32
{restart}
"#
    )
}

/// SIGKILL to `pid` (a service's init, in these tests).
pub fn kill9(pid: i64) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

pub fn is_alive(pid: i64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Builds a workspace binary statically (services run in rootfs trees with no libc).
pub fn build_static(package: &str, example: bool) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "-q",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
            "target/static",
        ]);
    if example {
        cmd.args(["-p", "flowbridge", "--example", package]);
    } else {
        cmd.args(["-p", package]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "static build failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = root.join("target/static/x86_64-unknown-linux-gnu/debug");
    if example {
        dir.join("examples").join(package)
    } else {
        dir.join(package)
    }
}

impl Daemon {
    /// Generates a publisher key, trusts it in the daemon's `DIR/keys`, and builds the service
    /// folder `src` into a signed package with the CLI.
    pub fn signed_package(&self, src: &Path, out_name: &str) -> PathBuf {
        let key = self.dir.path().join("op.key");
        if !key.exists() {
            assert!(self
                .cli(&[
                    "key",
                    "gen",
                    "--out",
                    key.to_str().unwrap(),
                    "--name",
                    "operator"
                ])
                .status
                .success());
            let keys = self.dir.path().join("keys");
            let out = self.cli(&[
                "key",
                "trust",
                key.with_extension("pub").to_str().unwrap(),
                "--keys-dir",
                keys.to_str().unwrap(),
            ]);
            assert!(out.status.success());
        }
        self.build_package(src, &key, out_name)
    }

    /// Builds the service folder `src` into `DIR/out_name`, signed with `key`, with the CLI.
    pub fn build_package(&self, src: &Path, key: &Path, out_name: &str) -> PathBuf {
        let pkg = self.dir.path().join(out_name);
        let out = self.cli(&[
            "image",
            "build",
            src.to_str().unwrap(),
            "-o",
            pkg.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        pkg
    }

    /// One of the example services (`images/services/NAME/package`, as shipped) as a signed
    /// package.
    pub fn example_package(&self, svc: &str) -> PathBuf {
        let binary = build_static(svc, false);
        let src = self.dir.path().join(format!("src-{svc}"));
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        gatevisor_images::builder::copy_tree(
            &here.join(format!("images/services/{svc}/package")),
            &src,
        )
        .unwrap();
        std::fs::create_dir_all(src.join("files/bin")).unwrap();
        std::fs::copy(&binary, src.join(format!("files/bin/{svc}"))).unwrap();
        self.signed_package(&src, &format!("{svc}.gvpkg"))
    }

    /// `ovs-vsctl ARGS` against the daemon's private switch.
    pub fn vsctl(&self, args: &[&str]) -> Output {
        Command::new("ovs-vsctl")
            .arg(format!(
                "--db=unix:{}",
                self.state_dir().join("ovs/db.sock").display()
            ))
            .args(args)
            .output()
            .unwrap()
    }

    /// `ovs-ofctl`'s name for the daemon's bridge (its management socket).
    pub fn ofctl_target(&self) -> String {
        format!(
            "unix:{}",
            self.state_dir()
                .join(format!("ovs/{}.mgmt", self.bridge()))
                .display()
        )
    }

    /// Plugs a test host's interface into the daemon's bridge.
    pub fn plug_host(&self, host_if: &str) {
        let st = self.vsctl(&["add-port", &self.bridge(), host_if]).status;
        assert!(st.success(), "cannot plug {host_if}");
    }
}

/// The `p` percentile (0.5: the median) of `v`, to 0.1.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    (v[i] * 10.0).round() / 10.0
}

/// Is `prog` an executable on PATH?
pub fn on_path(prog: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// A rootfs tar of `n` empty files in directories of 1,000.
pub fn many_files(n: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::with_capacity(n * 1024 + (1 << 20)));
    for d in 0..n.div_ceil(1000) {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        b.append_data(&mut h, format!("d{d}"), std::io::empty())
            .unwrap();
    }
    for i in 0..n {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(0);
        b.append_data(&mut h, format!("d{}/f{i}", i / 1000), std::io::empty())
            .unwrap();
    }
    b.into_inner().unwrap()
}

/// A signed package of service `name` (never started: `/bin/sh` of an empty rootfs) whose
/// rootfs holds `files` empty files: a large install.
pub fn big_package(
    name: &str,
    files: usize,
    key: &gatevisor_images::keys::SecretKey,
    out: &Path,
) -> PathBuf {
    use gatevisor_images::package::{self, ArtifactKind};
    let service = format!(
        "name = \"{name}\"\nversion = \"1.0.0\"\nruntime = \"lxc\"\nimage = \"package\"\ncommand = [\"/bin/sh\"]\n[resources]\nmemory_mib = 32\n"
    );
    package::build(
        name,
        "1.0.0",
        &[
            ("service.toml", ArtifactKind::Service, service.as_bytes()),
            ("rootfs.tar", ArtifactKind::Rootfs, &many_files(files)),
        ],
        key,
        std::fs::File::create(out).unwrap(),
    )
    .unwrap();
    out.to_path_buf()
}

/// Sends `req` to the daemon at `socket` from a thread of its own; its answer when joined.
pub fn call_async(
    socket: &Path,
    req: gatevisor::api::Request,
) -> std::thread::JoinHandle<Result<serde_json::Value, gatevisor::client::ClientError>> {
    let socket = socket.to_path_buf();
    std::thread::spawn(move || gatevisor::client::Client::new(&socket).call(&req))
}

/// The manifest of a packaged busybox service `name` at `version` that loops until it is
/// stopped, with `extra` lines before its `[resources]` (keys, or tables such as `[health]`).
pub fn service_toml(name: &str, version: &str, extra: &str) -> String {
    format!(
        r#"name = "{name}"
version = "{version}"
runtime = "lxc"
image = "package"
command = ["/bin/sh", "-c", "while :; do sleep 1; done"]
stop_timeout_s = 1
{extra}
[resources]
memory_mib = 32
"#
    )
}
