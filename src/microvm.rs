//! The microVM runtime: each service is one `gatevisor vmm --config FILE` process (our VMM,
//! `vmm/`), in a session of its own so that it outlives a daemon restart, found again through
//! its pidfile. The guest's serial console is the service log; the VMM records how the VM ended
//! in the same exit file the LXC monitor writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kernel arguments every service guest gets: the console on the serial port, a reboot that
/// ends the VM, a panic that ends it too, no PCI (the VMM has none).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off";

/// The descriptor a VMM finds its tap on.
pub const TAP_FD: i32 = 3;

/// Creates service `name`'s tap (named like a container's host-side veth) and sets it up.
pub fn create_tap(ifname: &str) -> std::io::Result<std::fs::File> {
    let err = |e: gatevisor_vmm::Error| std::io::Error::other(e.to_string());
    let tap = gatevisor_vmm::tap::open(ifname).map_err(err)?;
    gatevisor_vmm::tap::set_up(ifname).map_err(err)?;
    Ok(tap)
}

/// A stable, locally administered MAC for service `name`'s guest: 02:47:56 ("GV") and three
/// bytes of a hash of the name.
pub fn guest_mac(name: &str) -> String {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!(
        "02:47:56:{:02x}:{:02x}:{:02x}",
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8
    )
}

/// Console bytes per second a guest may put in its log.
pub const CONSOLE_RATE: u64 = 8192;

pub struct MicrovmRuntime {
    dir: PathBuf,
    exe: PathBuf,
}

impl MicrovmRuntime {
    /// `dir`: where VM configurations and pidfiles live; `exe`: the gatevisor binary.
    pub fn new(dir: &Path, exe: &Path) -> std::io::Result<MicrovmRuntime> {
        std::fs::create_dir_all(dir)?;
        Ok(MicrovmRuntime {
            dir: dir.into(),
            exe: exe.into(),
        })
    }

    pub fn config_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }

    fn pid_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }

    /// The gateway's own kernel, the default guest kernel.
    pub fn default_kernel() -> PathBuf {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        PathBuf::from(format!("/boot/vmlinuz-{}", release.trim()))
    }

    /// Writes the VM's configuration.
    pub fn define(&self, name: &str, cfg: &gatevisor_vmm::VmConfig) -> std::io::Result<()> {
        cfg.validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let text = toml::to_string(cfg).map_err(std::io::Error::other)?;
        let path = self.config_path(name);
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)
    }

    pub fn undefine(&self, name: &str) {
        let _ = std::fs::remove_file(self.config_path(name));
        let _ = std::fs::remove_file(self.pid_path(name));
    }

    /// Starts the VMM; its stderr goes to `log` (the console log the guest writes as well).
    /// `tap`, when the service has an interface, becomes the VMM's descriptor [`TAP_FD`].
    pub fn start(
        &self,
        name: &str,
        log: &Path,
        tap: Option<std::fs::File>,
    ) -> std::io::Result<Child> {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("vmm")
            .arg("--config")
            .arg(self.config_path(name))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        // Its own session: a daemon restart (or its SIGTERM) leaves the VM running.
        gatevisor_lxc::detach(&mut cmd);
        if let Some(tap) = &tap {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = tap.as_raw_fd();
            // SAFETY: the closure runs in the forked child before exec and only calls dup2(2),
            // which is async-signal-safe; the new descriptor has no close-on-exec flag.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::dup2(fd, TAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn()?;
        // Only the VMM holds the tap now: it vanishes when the VMM ends.
        drop(tap);
        std::fs::write(self.pid_path(name), child.id().to_string())?;
        Ok(child)
    }

    /// The PID of `name`'s running VMM: the pidfile's process, if it still is that VMM.
    pub fn pid(&self, name: &str) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.pid_path(name))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let config = self.config_path(name);
        let ours = cmdline
            .split(|b| *b == 0)
            .any(|a| a == config.as_os_str().as_encoded_bytes());
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(") ").next().map(|r| r.starts_with('Z')))
            .unwrap_or(true);
        (ours && !zombie).then_some(pid)
    }

    /// Ends the VM: SIGTERM to the VMM, SIGKILL after `timeout`. (A guest-visible graceful
    /// power-off needs ACPI or vsock, which this VMM does not have yet.) Returns whether it
    /// was running.
    pub fn stop(&self, name: &str, timeout: Duration) -> bool {
        let Some(pid) = self.pid(name) else {
            return false;
        };
        let pidfd = crate::proc::pidfd_open(pid).ok();
        // SAFETY: kill(2) of the VMM this runtime started (checked through its command line).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout.max(Duration::from_millis(100));
        match &pidfd {
            Some(fd) => {
                if !crate::proc::wait_pidfd(fd, Some(deadline - Instant::now())) {
                    // SAFETY: as above.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    crate::proc::wait_pidfd(fd, Some(Duration::from_secs(5)));
                }
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
        true
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) the VMM, and with it the guest.
    pub fn signal(&self, name: &str, sig: i32) -> std::io::Result<()> {
        let pid = self.pid(name).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{name} is not running"),
            )
        })?;
        // SAFETY: kill(2) of the VMM this runtime started.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The VMM process's resident memory (guest pages it has touched included), bytes.
    pub fn rss_bytes(&self, name: &str) -> Option<u64> {
        let pid = self.pid(name)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
}
