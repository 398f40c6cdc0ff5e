//! Hosts on the gateway's WAN and LAN: network namespaces on the test machine, each holding the
//! tap that is the other end of one of the gateway's NICs. Nothing leaves these namespaces.

use crate::{host, io, Error, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};

/// A network namespace this harness created; deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

/// The prefix of every namespace the harness creates, followed by the creating process's PID.
pub const PREFIX: &str = "gvq-";

impl Netns {
    pub fn create(role: &str) -> Result<Netns> {
        let name = format!("{PREFIX}{}-{role}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        host(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs `sh -c cmd` in the namespace and returns its stdout; fails with its stderr.
    pub fn sh(&self, cmd: &str) -> Result<String> {
        host(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", cmd]))
    }

    /// Runs `sh -c cmd` in the namespace, whatever its outcome.
    pub fn try_sh(&self, cmd: &str) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .expect("ip netns exec runs")
    }

    /// Starts a long-running program in the namespace, its output to `log`.
    pub fn spawn(&self, args: &[&str], log: &std::path::Path) -> Result<Child> {
        let out = std::fs::File::create(log).map_err(io(format!("create {}", log.display())))?;
        let err = out.try_clone().map_err(io("dup a log file"))?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: only prctl runs between fork and exec; it is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                // The server ends with the harness thread that started it.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        cmd.spawn()
            .map_err(io(format!("start {args:?} in {}", self.name)))
    }

    /// Creates tap `ifname` inside the namespace and returns its descriptor, for QEMU's
    /// `-netdev tap,fd=N`. The tap lives as long as a descriptor to it is open.
    pub fn tap(&self, ifname: &str) -> Result<OwnedFd> {
        let path = format!("/run/netns/{}", self.name);
        let ifname = ifname.to_string();
        // setns changes only the calling thread's namespace: do it on a thread of its own.
        std::thread::spawn(move || -> Result<OwnedFd> {
            let ns = std::fs::File::open(&path).map_err(io(format!("open {path}")))?;
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::Io {
                    what: format!("setns {path}"),
                    source: e.into(),
                }
            })?;
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .map_err(io("open /dev/net/tun"))?;
            // SAFETY: a zeroed ifreq is a valid value of this plain C struct.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in req.ifr_name.iter_mut().zip(ifname.bytes().take(15)) {
                *d = s as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the ifreq it is given, which lives on this stack.
            if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
                return Err(io(format!("TUNSETIFF {ifname}"))(
                    std::io::Error::last_os_error(),
                ));
            }
            let fd = std::os::fd::IntoRawFd::into_raw_fd(tun);
            // SAFETY: fd was just released from the File that owned it.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        })
        .join()
        .expect("the tap thread does not panic")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Deletes namespaces left by harness processes that no longer run (a killed test run).
pub fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", &name]).output();
        }
    }
}
