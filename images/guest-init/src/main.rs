//! `gatevisor-guest-init`: PID 1 of a microVM service guest, a static binary the supervisor
//! adds to the service's initramfs (as `/gatevisor/init`, in a second cpio archive).
//!
//! 1. mounts /proc, /sys, /dev; loads the kernel modules listed in `/gatevisor/modules`
//!    (one `.ko` path per line, in load order: the virtio drivers of the stock kernel);
//! 2. brings up `lo` and `eth0` (with the address of `gatevisor.ip=ADDR/PREFIX` on the
//!    kernel command line, when given);
//! 3. runs the service: its argv is this program's arguments (what follows `--` on the
//!    kernel command line);
//!    with the environment in `/gatevisor/env` (`KEY=VALUE` lines);
//! 4. serves the **control port** (vsock port [`CONTROL_PORT`]): one line per connection,
//!    - `ping` → `pong`;
//!    - `exec\tARG0\tARG1…` → `exit N` (a health command, run with the service's
//!      environment, at most 30 s);
//!    - `tcp PORT` → `ok` when something accepts on 127.0.0.1:PORT;
//!    - `poweroff` → `ok`, the service gets SIGTERM, then SIGKILL after the grace period in
//!      `gatevisor.grace_s=N` (default 5), then the VM powers off;
//! 5. keeps `/run/gatevisor/settings.json` (the operator's settings, as a container finds
//!    them) up to date: it watches them on the service's control channel
//!    (`GATEVISOR_VERDICT_SOCKET=vsock:2:PORT` in its environment) and replaces the file
//!    on every change;
//! 6. when the service ends, prints its status on the console and powers the VM off.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The vsock port the supervisor's control requests go to.
pub const CONTROL_PORT: u32 = 1024;

static SERVICE_PID: AtomicI32 = AtomicI32::new(0);
/// Set once a poweroff was requested: the service's exit that follows is part of it.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
/// Health commands running, and their exit codes once PID 1's reaper collected them (it
/// reaps every child, so it is the one that sees them end).
static HEALTH: Mutex<BTreeMap<i32, Option<i32>>> = Mutex::new(BTreeMap::new());

fn log(msg: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "gatevisor-guest-init: {msg}");
    let _ = out.flush();
}

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (
        CString::new(source).unwrap(),
        CString::new(target).unwrap(),
        CString::new(fstype).unwrap(),
    );
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call and no data.
    let r = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) {
            log(&format!("mount {fstype} on {target}: {e}"));
        }
    }
}

fn load_modules() {
    let Ok(list) = std::fs::read_to_string("/gatevisor/modules") else {
        return;
    };
    for path in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) => {
                log(&format!("module {path}: {e}"));
                continue;
            }
        };
        let params = CString::new("").unwrap();
        // SAFETY: finit_module(2) on an open file with empty parameters.
        let r = unsafe { libc::syscall(libc::SYS_finit_module, f.as_raw_fd(), params.as_ptr(), 0) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EEXIST) {
                log(&format!("module {path}: {e}"));
            }
        }
    }
}

/// One `key=value` of the kernel command line.
fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('=').map(str::to_string))
}

fn ifreq(name: &str) -> [u8; 40] {
    let mut r = [0u8; 40];
    r[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    r
}

fn sockaddr_in(addr: [u8; 4]) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    s[4..8].copy_from_slice(&addr);
    s
}

/// Sets `name` up, with IPv4 `addr`/`prefix` when given.
fn configure(name: &str, addr: Option<([u8; 4], u8)>) -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ioctl = |req: libc::c_ulong, r: &mut [u8; 40]| -> std::io::Result<()> {
        // SAFETY: the interface ioctls read and write one 40-byte struct ifreq, which `r` is.
        if unsafe { libc::ioctl(sock.as_raw_fd(), req, r.as_mut_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    if let Some((ip, prefix)) = addr {
        let mut r = ifreq(name);
        r[16..32].copy_from_slice(&sockaddr_in(ip));
        ioctl(libc::SIOCSIFADDR, &mut r)?;
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix as u32)
        };
        let mut r = ifreq(name);
        r[16..32].copy_from_slice(&sockaddr_in(mask.to_be_bytes()));
        ioctl(libc::SIOCSIFNETMASK, &mut r)?;
    }
    let mut r = ifreq(name);
    ioctl(libc::SIOCGIFFLAGS, &mut r)?;
    let flags = i16::from_ne_bytes([r[16], r[17]]) | libc::IFF_UP as i16;
    r[16..18].copy_from_slice(&flags.to_ne_bytes());
    ioctl(libc::SIOCSIFFLAGS, &mut r)
}

fn parse_cidr(s: &str) -> Option<([u8; 4], u8)> {
    let (ip, prefix) = s.split_once('/')?;
    let ip: std::net::Ipv4Addr = ip.parse().ok()?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some((ip.octets(), prefix))
}

fn power_off() -> ! {
    // SAFETY: sync(2) and reboot(2) take no pointers; as PID 1 this ends the VM (ACPI S5).
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    std::process::exit(0)
}

/// Stops the service (SIGTERM to its process group, SIGKILL after `grace`), powers off.
fn stop_and_power_off(grace: Duration) -> ! {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
    let pid = SERVICE_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) of the service's process group, which this init created.
        unsafe { libc::kill(-pid, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            // SAFETY: kill with signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid, 0) } != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
    }
    log("powering off on request");
    power_off()
}

/// The control port: a vsock listener, one request line per connection.
fn control(grace: Duration) {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        log(&format!("no vsock: {}", std::io::Error::last_os_error()));
        return;
    }
    // SAFETY: a new descriptor nothing else owns.
    let listener = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = CONTROL_PORT;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: bind/listen with a pointer to `addr` and its exact size.
    let ok = unsafe {
        libc::bind(
            listener.as_raw_fd(),
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        ) == 0
            && libc::listen(listener.as_raw_fd(), 4) == 0
    };
    if !ok {
        log(&format!(
            "control port: {}",
            std::io::Error::last_os_error()
        ));
        return;
    }
    loop {
        // SAFETY: accept(2) without an address buffer.
        let c = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: a new descriptor nothing else owns.
        let stream = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(c) });
        let mut line = String::new();
        let mut reader = BufReader::new(stream.try_clone().expect("dup"));
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let mut out = &stream;
        match line.trim() {
            "ping" => {
                let _ = writeln!(out, "pong");
            }
            req if req.starts_with("exec\t") => {
                let argv: Vec<&str> = req.split('\t').skip(1).collect();
                let _ = writeln!(out, "{}", health_exec(&argv));
            }
            req if req.starts_with("tcp ") => {
                let ok = req[4..]
                    .parse::<u16>()
                    .ok()
                    .and_then(|p| {
                        std::net::TcpStream::connect_timeout(
                            &std::net::SocketAddr::from(([127, 0, 0, 1], p)),
                            Duration::from_secs(2),
                        )
                        .ok()
                    })
                    .is_some();
                let _ = writeln!(out, "{}", if ok { "ok" } else { "error: nothing accepts" });
            }
            "poweroff" => {
                let _ = writeln!(out, "ok");
                stop_and_power_off(grace);
            }
            other => {
                let _ = writeln!(out, "error: unknown request {other:?}");
            }
        }
    }
}

/// Where the settings file is, as in a container.
const SETTINGS_FILE: &str = "/run/gatevisor/settings.json";

/// A vsock stream to the host's `port` (CID 2).
fn connect_host(port: u32) -> Option<std::fs::File> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_HOST;
    addr.svm_port = port;
    // SAFETY: connect(2) with a pointer to `addr` and its exact size.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    (r == 0).then(|| std::fs::File::from(owned))
}

/// The `settings` object of a line of the control channel's watch. The supervisor's lines
/// are `{"event":"settings","generation":G,"settings":{…}}` (or `"ok":true` for the first):
/// `settings` is their last member, and the only `"settings":` outside a string before it
/// (inside a JSON string a quote is always escaped).
fn settings_of(line: &str) -> Option<&str> {
    let line = line.trim();
    let at = line.find("\"settings\":")? + "\"settings\":".len();
    let obj = line.get(at..line.len().checked_sub(1)?)?;
    (obj.starts_with('{') && obj.ends_with('}') && line.ends_with('}')).then_some(obj)
}

/// Watches the settings on the control channel at host port `port` and keeps the file up to
/// date, reconnecting when the supervisor goes away (a restart).
fn keep_settings_file(port: u32) {
    let _ = std::fs::create_dir_all("/run/gatevisor");
    loop {
        if let Some(mut conn) = connect_host(port) {
            if conn.write_all(b"{\"op\":\"watch\"}\n").is_ok() {
                let reader = BufReader::new(&conn);
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    if let Some(obj) = settings_of(&line) {
                        let tmp = format!("{SETTINGS_FILE}.tmp");
                        let written = std::fs::write(&tmp, format!("{obj}\n"))
                            .and_then(|_| std::fs::rename(&tmp, SETTINGS_FILE));
                        if let Err(e) = written {
                            log(&format!("{SETTINGS_FILE}: {e}"));
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The service's environment, from `/gatevisor/env`.
fn service_env() -> Vec<(String, String)> {
    std::fs::read_to_string("/gatevisor/env")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Runs a health command; `exit N`, or `error: …`.
fn health_exec(argv: &[&str]) -> String {
    let Some((prog, args)) = argv.split_first() else {
        return "error: empty command".into();
    };
    let pid = {
        // Held across the spawn: the reaper records the child's end only once it is listed.
        let mut running = HEALTH.lock().unwrap_or_else(|p| p.into_inner());
        let child = std::process::Command::new(prog)
            .args(args)
            .envs(service_env())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        match child {
            Ok(c) => {
                let pid = c.id() as i32;
                running.insert(pid, None);
                pid
            }
            Err(e) => return format!("error: {prog}: {e}"),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        {
            let mut running = HEALTH.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(Some(code)) = running.get(&pid).copied() {
                running.remove(&pid);
                return format!("exit {code}");
            }
            if Instant::now() >= deadline {
                running.remove(&pid);
                // SAFETY: kill(2) of the health command this init started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                return "error: timed out".into();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    load_modules();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let grace = Duration::from_secs(
        cmdline_value(&cmdline, "gatevisor.grace_s")
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
    );
    if let Err(e) = configure("lo", None) {
        log(&format!("lo: {e}"));
    }
    // eth0 is up, like a container's (a service on raw packets needs no address).
    let ip = cmdline_value(&cmdline, "gatevisor.ip");
    let addr = ip.as_deref().and_then(|ip| {
        let a = parse_cidr(ip);
        if a.is_none() {
            log(&format!("gatevisor.ip={ip}: expected ADDR/PREFIX"));
        }
        a
    });
    if std::path::Path::new("/sys/class/net/eth0").exists() {
        if let Err(e) = configure("eth0", addr) {
            log(&format!("eth0: {e}"));
        }
    }
    std::thread::spawn(move || control(grace));
    let channel = service_env()
        .into_iter()
        .find(|(k, _)| k == "GATEVISOR_VERDICT_SOCKET")
        .and_then(|(_, v)| v.strip_prefix("vsock:2:")?.parse::<u32>().ok());
    if let Some(port) = channel {
        std::thread::spawn(move || keep_settings_file(port));
    }

    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        log("no service command (expected after -- on the kernel command line)");
        power_off();
    }
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).envs(service_env());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            log(&format!("cannot start {}: {e}", argv[0]));
            power_off();
        }
    };
    let pid = child.id() as i32;
    SERVICE_PID.store(pid, Ordering::SeqCst);
    log(&format!("service {} started, pid {pid}", argv[0]));
    // PID 1 reaps every orphan; the service's own end powers the VM off.
    loop {
        let mut status = 0;
        // SAFETY: wait(2) for any child, with a pointer to a live int.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r > 0 && r != pid {
            let mut running = HEALTH.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slot) = running.get_mut(&r) {
                *slot = Some(if libc::WIFEXITED(status) {
                    libc::WEXITSTATUS(status)
                } else {
                    128 + libc::WTERMSIG(status)
                });
            }
        }
        if r == pid {
            let how = if libc::WIFEXITED(status) {
                format!("exited with status {}", libc::WEXITSTATUS(status))
            } else {
                format!("killed by signal {}", libc::WTERMSIG(status))
            };
            // The reaper may see the service end before the stop request logs: either way a
            // requested stop says so.
            if STOP_REQUESTED.load(Ordering::SeqCst) {
                log(&format!("service {how}; powering off on request"));
            } else {
                log(&format!("service {how}; powering off"));
            }
            power_off();
        }
        if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_cut_from_the_watch_lines() {
        let first =
            r#"{"generation":1,"ok":true,"settings":{"A":["x"],"settings":"y\"settings\":{}"}}"#;
        assert_eq!(
            settings_of(first),
            Some(r#"{"A":["x"],"settings":"y\"settings\":{}"}"#)
        );
        let ev = r#"{"event":"settings","generation":2,"settings":{}}"#;
        assert_eq!(settings_of(ev), Some("{}"));
        assert_eq!(settings_of(r#"{"ok":false,"error":"x"}"#), None);
        assert_eq!(settings_of(r#"{"settings":"#), None);
    }

    #[test]
    fn cmdline_values_stop_at_the_service_arguments() {
        let c = "console=ttyS0 gatevisor.ip=10.0.0.2/24 quiet -- /svc gatevisor.ip=x";
        assert_eq!(
            cmdline_value(c, "gatevisor.ip").as_deref(),
            Some("10.0.0.2/24")
        );
        assert_eq!(cmdline_value(c, "gatevisor.grace_s"), None);
    }

    #[test]
    fn cidr_parses_and_rejects_bad_prefixes() {
        assert_eq!(parse_cidr("10.77.0.60/24"), Some(([10, 77, 0, 60], 24)));
        assert_eq!(parse_cidr("10.77.0.60/33"), None);
        assert_eq!(parse_cidr("10.77.0.60"), None);
    }
}
