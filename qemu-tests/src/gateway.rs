//! One booted emulated gateway.

use crate::image::{self, Image};
use crate::netns::{self, Netns};
use crate::proto::{FromAgent, Op, Reply, Request};
use crate::{io, Error, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Addresses of the emulated board (see `image/overlay/usr/local/sbin/gateway-net`).
pub mod addr {
    /// The gateway on its LAN bridge br-lan.
    pub const GATEWAY_LAN: &str = "10.77.0.1";
    /// The LAN client host.
    pub const LAN_CLIENT: &str = "10.77.0.10";
    /// The LAN client's MAC: the dns-filter example treats it as the kids' laptop.
    pub const LAN_CLIENT_MAC: &str = "02:00:00:00:00:0a";
    /// The gateway's WAN address.
    pub const GATEWAY_WAN: &str = "10.78.0.2";
    /// The WAN host: a DNS resolver and web servers (ports 443 and 8080).
    pub const WAN_HOST: &str = "10.78.0.1";
}

/// How long a boot may take to reach a running system (TCG: minutes, not seconds).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a fresh gateway's first boot may take to greet before it is taken for hung and
/// booted once more (it greets in ~30 s here; under nested TCG an occasional boot never does).
pub const FIRST_HELLO_TIMEOUT: Duration = Duration::from_secs(240);
/// The default limit for one command inside the gateway.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// One gateway at a time: two TCG machines on two cores would only slow each other down.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A command's outcome inside the gateway.
#[derive(Debug, Clone)]
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Output {
    fn from(o: std::process::Output) -> Output {
        Output {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// What the reader thread learned from the agent.
#[derive(Default)]
struct AgentState {
    /// Boot ids greeted so far, newest last.
    hellos: Vec<String>,
    /// The channel closed (QEMU exited).
    closed: bool,
}

/// The agent's state, shared with the reader thread.
type Shared = Arc<(Mutex<AgentState>, Condvar)>;

struct Channel {
    writer: UnixStream,
    replies: Receiver<Reply>,
    next_id: u64,
}

pub struct Gateway {
    pub image: Image,
    pub dir: PathBuf,
    qemu: Child,
    chan: Mutex<Channel>,
    /// What the agent has said besides replies (its greetings), shared with the reader thread.
    agent: Shared,
    boot_id: String,
    pub lan: Netns,
    pub wan: Netns,
    wan_server: Option<Child>,
    booted_at: Instant,
    /// Seconds from QEMU's start to a running system, for the benchmark.
    pub boot_secs: f64,
    /// Keep the folder when dropped (see [`Gateway::keep_logs`]).
    keep: bool,
    _turn: MutexGuard<'static, ()>,
}

impl Gateway {
    /// Builds (or reuses) the image, creates the LAN and WAN hosts, boots the gateway and waits
    /// until systemd reports the system running. Only one gateway runs at a time per process.
    /// A boot whose agent never greets (a hung emulated boot) is tried once more, from a fresh
    /// overlay, after its console's last lines are printed.
    pub fn boot() -> Result<Gateway> {
        match Gateway::boot_once() {
            Err(Error::Timeout { what, secs }) if what.contains("agent to start") => {
                eprintln!(
                    "qemu-tests: the gateway's agent did not greet within {secs} s; booting once more"
                );
                Gateway::boot_once()
            }
            r => r,
        }
    }

    fn boot_once() -> Result<Gateway> {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        netns::remove_stale();
        remove_stale_runs();
        let gatevisor = image::gatevisor_binary()?;
        let agent = agent_binary()?;
        let image = image::gateway(&gatevisor, &agent)?;

        let dir = crate::target_dir().join(format!(
            "qemu-tests/run-{}-{}",
            std::process::id(),
            RUN_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let overlay = dir.join("disk.qcow2");
        crate::host(
            Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                .arg(&image.disk)
                .arg(&overlay),
        )?;

        let wan = Netns::create("wan")?;
        let lan = Netns::create("lan")?;
        let wan_tap = wan.tap("wan0")?;
        let lan_tap = lan.tap("lan0")?;
        wan.sh(&format!(
            "ip link set wan0 up && ip addr add {}/24 dev wan0 && ip route add 10.77.0.0/24 via {}",
            addr::WAN_HOST,
            addr::GATEWAY_WAN
        ))?;
        lan.sh(&format!(
            "ip link set lan0 address {} && ip link set lan0 up && ip addr add {}/24 dev lan0 && ip route add default via {}",
            addr::LAN_CLIENT_MAC,
            addr::LAN_CLIENT,
            addr::GATEWAY_LAN
        ))?;
        let server = crate::workspace().join("scripts/demo-wan.py");
        let wan_server = wan.spawn(
            &["python3", server.to_str().unwrap(), addr::WAN_HOST],
            &dir.join("wan.log"),
        )?;

        let ctl = dir.join("ctl.sock");
        let console = dir.join("console.log");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm,+npt"])
            .args(["-M", "pc", "-m", "2048", "-smp", "2"])
            .args(["-nodefaults", "-display", "none", "-monitor", "none"])
            .args(["-smbios", "type=2,product=gatevisor-emulated-gateway"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initrd)
            .args([
                "-append",
                "console=ttyS0 root=/dev/vda rw quiet panic=-1 systemd.show_status=false",
            ])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=qcow2,cache=unsafe",
                overlay.display()
            ))
            .args(["-netdev", "tap,id=wan,fd=3"])
            .args(["-device", "virtio-net-pci,netdev=wan,mac=52:54:00:67:00:01"])
            .args(["-netdev", "tap,id=lan,fd=4"])
            .args(["-device", "virtio-net-pci,netdev=lan,mac=52:54:00:67:00:02"])
            .args(["-device", "virtio-rng-pci", "-device", "virtio-serial-pci"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ctl,path={},server=on,wait=off",
                ctl.display()
            ))
            .args(["-device", "virtserialport,chardev=ctl,name=gv.ctl"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("qemu.log")).map_err(io("create qemu.log"))?);
        let fds = [wan_tap.as_raw_fd(), lan_tap.as_raw_fd()];
        // SAFETY: between fork and exec only prctl, dup2 and fcntl run, which are
        // async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                // QEMU dies with the harness thread that started it, even on SIGKILL of the
                // test process.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for (i, fd) in fds.iter().enumerate() {
                    let target = 3 + i as i32;
                    // Move each above the targets first, so a source never sits on a target.
                    let high = libc::fcntl(*fd, libc::F_DUPFD, 100);
                    if high < 0 || libc::dup2(high, target) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
        let started = Instant::now();
        let qemu = cmd.spawn().map_err(io("start qemu-system-x86_64"))?;
        drop::<[OwnedFd; 2]>([wan_tap, lan_tap]);
        std::fs::write(dir.join("qemu.pid"), qemu.id().to_string())
            .map_err(io("write qemu.pid"))?;

        let stream = connect(&ctl, Duration::from_secs(30))?;
        let (chan, agent) = Channel::start(stream)?;
        let mut gw = Gateway {
            image,
            dir,
            qemu,
            chan: Mutex::new(chan),
            agent,
            boot_id: String::new(),
            lan,
            wan,
            wan_server: Some(wan_server),
            booted_at: started,
            boot_secs: 0.0,
            keep: false,
            _turn: turn,
        };
        gw.boot_id = match gw.wait_hello_within(None, FIRST_HELLO_TIMEOUT) {
            Ok(id) => id,
            Err(e) => {
                eprintln!(
                    "qemu-tests: no greeting; the console's last lines:\n{}",
                    gw.console_tail(30)
                );
                return Err(e);
            }
        };
        gw.wait_running()?;
        gw.boot_secs = gw.booted_at.elapsed().as_secs_f64();
        eprintln!(
            "qemu-tests: gateway up in {:.0} s (boot {}, {})",
            gw.boot_secs,
            &gw.boot_id[..8.min(gw.boot_id.len())],
            gw.dir.display()
        );
        Ok(gw)
    }

    /// Waits for the agent to greet from a boot other than `not`.
    fn wait_hello(&self, not: Option<&str>) -> Result<String> {
        self.wait_hello_within(not, BOOT_TIMEOUT)
    }

    fn wait_hello_within(&self, not: Option<&str>, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.agent;
        let mut s = lock.lock().unwrap();
        loop {
            if let Some(id) = s.hellos.last().filter(|id| Some(id.as_str()) != not) {
                return Ok(id.clone());
            }
            if s.closed {
                drop(s);
                return Err(Error::Channel(format!(
                    "QEMU exited before the agent greeted: {}",
                    self.qemu_log_tail()
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    what: "the gateway's agent to start".into(),
                    secs: timeout.as_secs(),
                });
            }
            s = cv.wait_timeout(s, deadline - now).unwrap().0;
        }
    }

    /// Waits until systemd has finished starting the system.
    fn wait_running(&self) -> Result<()> {
        let out = self.run_for(
            "systemctl is-system-running --wait; systemctl --failed --no-legend",
            BOOT_TIMEOUT,
        )?;
        let state = out.stdout.lines().next().unwrap_or("").trim().to_string();
        if state != "running" {
            eprintln!(
                "qemu-tests: the gateway booted {state:?}; failed units:\n{}",
                out.stdout
            );
        }
        Ok(())
    }

    /// Runs `sh -c cmd` inside the gateway, with [`RUN_TIMEOUT`].
    pub fn run(&self, cmd: &str) -> Result<Output> {
        self.run_for(cmd, RUN_TIMEOUT)
    }

    /// Runs `sh -c cmd` inside the gateway; its process group is killed after `timeout`.
    pub fn run_for(&self, cmd: &str, timeout: Duration) -> Result<Output> {
        let r = self.request(
            Op::Run {
                cmd: cmd.to_string(),
                timeout_ms: timeout.as_millis() as u64,
            },
            timeout + Duration::from_secs(30),
        )?;
        if r.timed_out {
            return Err(Error::Timeout {
                what: format!("`{cmd}` in the gateway (stdout: {})", r.stdout.trim()),
                secs: timeout.as_secs(),
            });
        }
        Ok(Output {
            code: r.code,
            stdout: r.stdout,
            stderr: r.stderr,
        })
    }

    /// Runs `cmd` and fails unless it exits 0; returns its stdout.
    pub fn ok(&self, cmd: &str) -> Result<String> {
        self.ok_for(cmd, RUN_TIMEOUT)
    }

    /// Like [`Gateway::ok`] with a time limit of its own.
    pub fn ok_for(&self, cmd: &str, timeout: Duration) -> Result<String> {
        let out = self.run_for(cmd, timeout)?;
        if !out.success() {
            return Err(Error::Command {
                what: format!("`{cmd}` in the gateway"),
                detail: format!(
                    "exit {:?}\nstdout: {}\nstderr: {}",
                    out.code,
                    out.stdout.trim(),
                    out.stderr.trim()
                ),
            });
        }
        Ok(out.stdout)
    }

    /// Copies a host file into the gateway.
    pub fn put(&self, local: &Path, remote: &str, mode: u32) -> Result<()> {
        let bytes = std::fs::read(local).map_err(io(format!("read {}", local.display())))?;
        self.put_bytes(&bytes, remote, mode)
    }

    pub fn put_bytes(&self, bytes: &[u8], remote: &str, mode: u32) -> Result<()> {
        self.request(
            Op::Put {
                path: remote.to_string(),
                mode,
                data: hex::encode(bytes),
            },
            Duration::from_secs(120),
        )
        .map(|_| ())
    }

    /// Polls `check` (every second) until it returns `Some`, or fails after `timeout`.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Gateway) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = check(self)? {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// Reboots the gateway through systemd and waits until the new boot is running.
    pub fn reboot(&mut self) -> Result<()> {
        let old = self.boot_id.clone();
        // Detached: the agent is stopped by the reboot, the reply may never come.
        self.run("systemd-run --no-block systemctl reboot")?;
        self.boot_id = self.wait_hello(Some(&old))?;
        self.wait_running()
    }

    /// Seconds from QEMU's start until systemd saw gatevisor ready (`READY=1`): the guest's
    /// uptime and the unit's activation time (both on the guest's monotonic clock) place that
    /// moment on the host's clock.
    pub fn gatevisor_ready_secs(&self) -> Result<f64> {
        let out = self.ok(
            "cat /proc/uptime; systemctl show -p ActiveEnterTimestampMonotonic --value gatevisor",
        )?;
        let now = self.booted_at.elapsed().as_secs_f64();
        let mut lines = out.lines();
        let parse =
            |s: Option<&str>| -> Option<f64> { s?.split_whitespace().next()?.parse::<f64>().ok() };
        let (Some(uptime), Some(active_us)) = (parse(lines.next()), parse(lines.next())) else {
            return Err(Error::Channel(format!(
                "unexpected uptime/activation: {out}"
            )));
        };
        if active_us <= 0.0 {
            return Err(Error::Channel("gatevisor is not active".into()));
        }
        Ok(now - uptime + active_us / 1e6)
    }

    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    fn request(&self, op: Op, timeout: Duration) -> Result<Reply> {
        let mut chan = self.chan.lock().unwrap();
        chan.next_id += 1;
        let id = chan.next_id;
        let mut line = serde_json::to_string(&Request { id, op })
            .map_err(|e| Error::Channel(e.to_string()))?;
        line.push('\n');
        chan.writer
            .write_all(line.as_bytes())
            .map_err(io("write to the gateway's control channel"))?;
        let deadline = Instant::now() + timeout;
        loop {
            // A gateway that restarted under the request (its kernel panicked: it reboots at
            // once) never answers it: that is said as soon as its agent greets again.
            if let Some(id) = self.greeted_since_boot() {
                return Err(Error::Channel(format!(
                    "the gateway restarted (boot {id}) while a request waited{}",
                    self.kernel_panic()
                        .map(|p| format!("; its kernel panicked:\n{p}"))
                        .unwrap_or_default()
                )));
            }
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1));
            if left.is_zero() {
                return Err(Error::Timeout {
                    what: "a reply from the gateway's agent".into(),
                    secs: timeout.as_secs(),
                });
            }
            match chan.replies.recv_timeout(left) {
                Ok(r) if r.id == id => {
                    return match r.error {
                        Some(e) => Err(Error::Channel(e)),
                        None => Ok(r),
                    }
                }
                Ok(_) => continue, // a reply to an abandoned request
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Channel(format!(
                        "closed (QEMU exited?): {}",
                        self.qemu_log_tail()
                    )))
                }
            }
        }
    }

    /// The boot id of a greeting from another boot than the one this gateway is in.
    fn greeted_since_boot(&self) -> Option<String> {
        let s = self.agent.0.lock().unwrap();
        s.hellos.last().filter(|id| **id != self.boot_id).cloned()
    }

    /// When the gateway's own kernel panicked (it then reboots at once): the console from the
    /// start of the report (its `BUG:`, `Oops` or `cut here` line; at most 40 lines before the
    /// panic) to the panic line. Under TCG that is the emulation's fault, not the product's:
    /// a process cannot panic the kernel it runs on.
    pub fn kernel_panic(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join("console.log")).ok()?;
        let lines: Vec<&str> = text.lines().collect();
        let end = lines
            .iter()
            .position(|l| l.contains("Kernel panic - not syncing"))?;
        let from = end.saturating_sub(40);
        let start = (from..end)
            .find(|&i| {
                let l = lines[i];
                l.contains("BUG:") || l.contains("Oops") || l.contains("cut here")
            })
            .unwrap_or(from);
        Some(lines[start..=end].join("\n"))
    }

    /// Keeps this gateway's folder (console, disk, logs) when it is dropped.
    pub fn keep_logs(&mut self) {
        self.keep = true;
    }

    fn qemu_log_tail(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.log"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// The last `n` lines of the serial console.
    pub fn console_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// What helps to understand a failure: console, gatevisor's journal, its services and
    /// their logs.
    pub fn dump(&self) {
        eprintln!(
            "---- gateway console (last 60 lines) ----\n{}",
            self.console_tail(60)
        );
        let diag =
            "journalctl -b --no-pager -n 80 -u gatevisor -u gateway-net -u openvswitch-switch; \
                    gatevisor service list; gatevisor events -n 20; \
                    for s in $(gatevisor service list | awk 'NR>1 {print $1}'); do \
                    echo \"---- service log of $s (last 40 lines) ----\"; \
                    gatevisor service logs $s | tail -n 40; done";
        match self.run_for(diag, Duration::from_secs(60)) {
            Ok(o) => eprintln!(
                "---- gateway journal and services ----\n{}{}",
                o.stdout, o.stderr
            ),
            Err(e) => eprintln!("---- gateway journal unavailable: {e}"),
        }
    }
}

/// `gateway-agent`, which cargo builds next to the test or bench binaries that use this crate
/// (they run from `target/PROFILE/deps/`). An example (`target/PROFILE/examples/`) run on a
/// fresh checkout has none yet: it is built there, in the example's profile.
pub fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(io("find the running executable"))?;
    let profile_dir = exe.parent().and_then(Path::parent);
    let agent = profile_dir.map(|d| d.join("gateway-agent"));
    if let Some(agent) = agent.as_ref().filter(|a| a.is_file()) {
        return Ok(agent.clone());
    }
    let from_example = exe
        .parent()
        .is_some_and(|d| d.file_name() == Some("examples".as_ref()));
    if let (true, Some(dir)) = (from_example, profile_dir) {
        let release = dir.file_name() == Some("release".as_ref());
        let mut args = vec!["-p", "qemu-tests", "--bin", "gateway-agent"];
        if release {
            args.push("--release");
        }
        crate::cargo_build(&args, None)?;
        return Ok(dir.join("gateway-agent"));
    }
    Err(Error::Channel(format!(
        "gateway-agent is not built next to {} (run through cargo test/bench -p qemu-tests)",
        exe.display()
    )))
}

static RUN_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Channel {
    fn start(stream: UnixStream) -> Result<(Channel, Shared)> {
        let reader = stream.try_clone().map_err(io("dup the control socket"))?;
        let state = Arc::new((Mutex::new(AgentState::default()), Condvar::new()));
        let (tx, rx) = mpsc::channel();
        let st = state.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<FromAgent>(line.trim()) {
                    Ok(FromAgent::Hello { hello }) => {
                        st.0.lock().unwrap().hellos.push(hello.boot_id);
                        st.1.notify_all();
                    }
                    Ok(FromAgent::Reply(r)) => {
                        let _ = tx.send(r);
                    }
                    // Bytes of a half-written line from before a reboot: not a message.
                    Err(_) => {}
                }
            }
            st.0.lock().unwrap().closed = true;
            st.1.notify_all();
        });
        Ok((
            Channel {
                writer: stream,
                replies: rx,
                next_id: 0,
            },
            state,
        ))
    }
}

fn connect(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(io(format!("connect to {}", path.display()))(e))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump();
        }
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        if let Some(mut s) = self.wan_server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        if !std::thread::panicking() && !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("qemu-tests: logs kept in {}", self.dir.display());
        }
    }
}

/// Kills QEMUs of earlier harness processes that were killed themselves, and removes their run
/// folders. A run folder records its QEMU's PID; the QEMU is killed only when its command line
/// names that folder.
fn remove_stale_runs() {
    let base = crate::target_dir().join("qemu-tests");
    let Ok(entries) = std::fs::read_dir(&base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("run-") else {
            continue;
        };
        let Some(owner) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if owner == std::process::id() || Path::new(&format!("/proc/{owner}")).exists() {
            continue;
        }
        let dir = e.path();
        if let Some(pid) = std::fs::read_to_string(dir.join("qemu.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(dir.to_str().unwrap_or("\0")) {
                // SAFETY: kill(2) of a QEMU whose command line names this harness's folder.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
