//! The microVM runtime: each service is one `gatevisor vmm --config FILE` process (our VMM,
//! `vmm/`), in a session of its own so that it outlives a daemon restart, found again through
//! its pidfile. The guest's serial console is the service log; the VMM records how the VM ended
//! in the same exit file the LXC monitor writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kernel arguments every service guest gets: the console on the serial port, a reboot that
/// ends the VM, a panic that ends it too, no PCI (the VMM has none), one legacy serial port
/// to probe (the VMM has no other), and a quiet console: errors still reach the service log,
/// the rest stays in the guest's `dmesg` (each console byte is a VM exit; with the whole log
/// on the console the stock kernel reached `/init` in ~4 s of guest time instead of ~1.7 s
/// in the emulated gateway). A manifest's `microvm.cmdline` comes after these and can
/// override them (`loglevel=7`).
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet 8250.nr_uarts=1";

/// How long a microVM's service may take to say its first word on the verdict socket (the
/// guest boots a kernel first) before its heartbeat timeout applies.
pub const BOOT_GRACE: Duration = Duration::from_secs(120);

/// The least guest memory a microVM gets, whatever the service's `memory_mib`: room for the
/// stock kernel, its modules and the initramfs.
pub const MIN_GUEST_MIB: u64 = 128;

/// The guest memory of a microVM whose service asks for `memory_mib`.
pub fn guest_memory_mib(memory_mib: u32) -> u64 {
    (memory_mib as u64).max(MIN_GUEST_MIB)
}

/// Where gatevisor's guest init sits in a service guest, and the vsock port it serves.
pub const GUEST_INIT_PATH: &str = "/gatevisor/init";
pub const CONTROL_PORT: u32 = 1024;
/// Each VMM has its own vsock device, so every guest can have the same context id.
pub const GUEST_CID: u64 = 3;

/// gatevisor's guest init binary (`gatevisor-guest-init`, static): `$GATEVISOR_GUEST_INIT`,
/// or next to this executable, or `/usr/lib/gatevisor/`. None: services' guests run their
/// command as init (no graceful stop, no address set by gatevisor).
pub fn guest_init() -> Option<PathBuf> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    std::env::var_os("GATEVISOR_GUEST_INIT")
        .map(PathBuf::from)
        .into_iter()
        .chain(exe_dir.map(|d| d.join("gatevisor-guest-init")))
        .chain([PathBuf::from("/usr/lib/gatevisor/gatevisor-guest-init")])
        .find(|p| is_static_elf(p))
}

/// Whether `path` is an ELF executable without a program interpreter: a guest initramfs has
/// no dynamic loader or libraries, so only a static init can run there.
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let (Some(phentsize), Some(phnum)) = (u16_at(0x36), u16_at(0x38)) else {
        return false;
    };
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    (0..phnum as usize).all(|i| {
        let at = phoff + i * phentsize as usize;
        // PT_INTERP = 3.
        b.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().unwrap()) != 3)
    })
}

/// The module tree of the running kernel: the default guest kernel is the gateway's own.
pub fn running_kernel_modules() -> PathBuf {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    PathBuf::from(format!("/lib/modules/{}", release.trim()))
}

/// Writes `out`: the service's initramfs `service`, padded to 4 bytes, followed by a second
/// archive with the guest init at [`GUEST_INIT_PATH`] and, from module tree `modules`, the
/// virtio modules with their load order in `/gatevisor/modules`. The kernel unpacks both.
pub fn initramfs_with_init(
    service: &Path,
    init: &Path,
    modules: Option<&Path>,
    env: &[(String, String)],
    out: &Path,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut bytes = std::fs::read(service)?;
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let init_bytes = std::fs::read(init)?;
    let mods = match modules {
        Some(tree) => gatevisor_vmm::guest::find_modules(tree).unwrap_or_default(),
        None => Vec::new(),
    };
    let mut c = gatevisor_images::cpio::Cpio::new(Vec::new());
    c.dir("gatevisor")?;
    c.file("gatevisor/init", 0o755, &init_bytes)?;
    let mut list = String::new();
    for (name, path) in &mods {
        let ko = std::fs::read(path)?;
        c.file(&format!("gatevisor/{name}.ko"), 0o644, &ko)?;
        list.push_str(&format!("/gatevisor/{name}.ko\n"));
    }
    c.file("gatevisor/modules", 0o644, list.as_bytes())?;
    let env: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    c.file("gatevisor/env", 0o644, env.as_bytes())?;
    bytes.extend_from_slice(&c.finish()?);
    let tmp = out.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, out)
}

/// The vsock port a guest's service reaches its verdict socket on (`vsock:2:1025`).
pub const VERDICT_PORT: u32 = 1025;

/// One request line to the guest init's control port over the VM's vsock; returns the
/// answer line.
pub fn control(vsock: &Path, request: &str, timeout: Duration) -> std::io::Result<String> {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(vsock)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut w = &s;
    writeln!(w, "CONNECT {CONTROL_PORT}")?;
    let mut r = BufReader::new(&s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.starts_with("OK ") {
        return Err(std::io::Error::other(format!(
            "the guest's control port did not answer ({})",
            line.trim()
        )));
    }
    writeln!(w, "{request}")?;
    line.clear();
    r.read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// Asks the guest init to stop the service and power off; returns once it accepted.
pub fn request_poweroff(vsock: &Path, timeout: Duration) -> std::io::Result<()> {
    match control(vsock, "poweroff", timeout)?.as_str() {
        "ok" => Ok(()),
        other => Err(std::io::Error::other(format!(
            "the guest init refused: {other}"
        ))),
    }
}

/// A health command run by the guest init; its exit code.
pub fn health_exec(vsock: &Path, argv: &[String]) -> std::io::Result<i32> {
    if argv.iter().any(|a| a.contains(['\t', '\n'])) {
        return Err(std::io::Error::other(
            "health command arguments contain a tab or newline",
        ));
    }
    let answer = control(
        vsock,
        &format!("exec\t{}", argv.join("\t")),
        Duration::from_secs(35),
    )?;
    answer
        .strip_prefix("exit ")
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(answer.clone()))
}

/// Whether something accepts on TCP `port` inside the guest.
pub fn health_tcp(vsock: &Path, port: u16) -> std::io::Result<bool> {
    Ok(control(vsock, &format!("tcp {port}"), Duration::from_secs(5))? == "ok")
}

/// The descriptor a VMM finds its tap on.
pub const TAP_FD: i32 = 3;

/// Creates service `name`'s tap (named like a container's host-side veth) and sets it up.
pub fn create_tap(ifname: &str) -> std::io::Result<std::fs::File> {
    let err = |e: gatevisor_vmm::Error| std::io::Error::other(e.to_string());
    let tap = gatevisor_vmm::tap::open(ifname).map_err(err)?;
    gatevisor_vmm::tap::set_up(ifname).map_err(err)?;
    Ok(tap)
}

/// Console bytes per second a guest may put in its log.
pub const CONSOLE_RATE: u64 = 8192;

#[derive(Clone)]
pub struct MicrovmRuntime {
    dir: PathBuf,
    exe: PathBuf,
    /// The hierarchy VMMs' cgroups are made in.
    pub(crate) cgroups: gatevisor_lxc::Cgroups,
}

/// What a VMM process needs beyond its guest's memory (its code, page tables, device
/// buffers), MiB: its cgroup's memory limit is guest + this.
pub const VMM_OVERHEAD_MIB: u64 = 32;

impl MicrovmRuntime {
    /// `dir`: where VM configurations and pidfiles live; `exe`: the gatevisor binary.
    pub fn new(
        dir: &Path,
        exe: &Path,
        cgroups: gatevisor_lxc::Cgroups,
    ) -> std::io::Result<MicrovmRuntime> {
        std::fs::create_dir_all(dir)?;
        Ok(MicrovmRuntime {
            dir: dir.into(),
            exe: exe.into(),
            cgroups,
        })
    }

    pub fn config_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.toml"))
    }

    fn pid_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }

    /// Where the VMM sends the guest's connections to host vsock port `port`.
    pub fn vsock_port_path(&self, name: &str, port: u32) -> PathBuf {
        self.dir.join(format!("{name}.vsock_{port}"))
    }

    /// The Unix socket `gatevisor service console` attaches to.
    pub fn console_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.console"))
    }

    /// The Unix socket the VM's VMM takes snapshot requests on (mode 0600).
    pub fn control_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.control"))
    }

    /// The Unix socket of the VM's vsock device (host side).
    pub fn vsock_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.vsock"))
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
        let _ = std::fs::remove_file(self.vsock_path(name));
        let _ = std::fs::remove_file(self.console_path(name));
        let _ = std::fs::remove_file(self.vsock_port_path(name, VERDICT_PORT));
        let _ = std::fs::remove_file(self.config_path(name));
        let _ = std::fs::remove_file(self.pid_path(name));
    }

    /// Starts the VMM; its stderr goes to `log` (the console log the guest writes as well).
    /// `tap`, when the service has an interface, becomes the VMM's descriptor [`TAP_FD`].
    /// `cgroup`: the `cgroup.procs` files the VMM enters before it executes. Its console
    /// and its own messages go to `log` through a log pump (`gatevisor __log-pump`), which
    /// rotates it as a container's monitor does.
    pub fn start(
        &self,
        name: &str,
        log: &gatevisor_lxc::RunFiles,
        tap: Option<std::fs::File>,
        cgroup: Vec<std::ffi::CString>,
    ) -> std::io::Result<Child> {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let mut pump = Command::new(&self.exe);
        pump.arg("__log-pump")
            .arg(&log.log_file)
            .arg(log.log_max_bytes.to_string())
            .arg(log.log_keep.to_string())
            .stdin(std::fs::File::from(r))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        gatevisor_lxc::detach(&mut pump);
        let mut pump = pump.spawn()?;
        // The pump ends when the VMM closes its end; it is reaped then.
        let _ = std::thread::Builder::new()
            .name(format!("pump-{name}"))
            .stack_size(32 * 1024)
            .spawn(move || pump.wait());
        let w = std::fs::File::from(w);
        let mut cmd = Command::new(&self.exe);
        cmd.arg("vmm")
            .arg("--config")
            .arg(self.config_path(name))
            .stdin(Stdio::null())
            .stdout(w.try_clone()?)
            .stderr(w);
        // Its own session: a daemon restart (or its SIGTERM) leaves the VM running.
        gatevisor_lxc::detach(&mut cmd);
        {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = tap.as_ref().map(|t| t.as_raw_fd());
            // SAFETY: the closure runs in the forked child before exec and only calls dup2(2)
            // and the open/write/close of cgroup::enter, all async-signal-safe, on data made
            // before the fork; the new descriptor has no close-on-exec flag.
            unsafe {
                cmd.pre_exec(move || {
                    crate::runtime::cgroup::enter(&cgroup)?;
                    if let Some(fd) = fd {
                        if libc::dup2(fd, TAP_FD) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
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

    /// Ends the VM: first gracefully (the guest init stops the service and powers off, asked
    /// over vsock) when the guest has gatevisor's init, then SIGTERM to the VMM, then SIGKILL,
    /// each within `timeout`.
    pub fn stop(&self, name: &str, timeout: Duration) -> gatevisor_lxc::Stopped {
        use gatevisor_lxc::Stopped;
        let Some(pid) = self.pid(name) else {
            return Stopped::WasNotRunning;
        };
        let pidfd = crate::proc::pidfd_open(pid).ok();
        let vsock = self.vsock_path(name);
        if let Some(fd) = &pidfd {
            if vsock.exists() {
                // The guest's grace period (gatevisor.grace_s) is `timeout` too: allow both.
                match request_poweroff(&vsock, Duration::from_secs(5)) {
                    Ok(()) => {
                        if crate::proc::wait_pidfd(fd, Some(timeout + Duration::from_secs(5))) {
                            return Stopped::Gracefully;
                        }
                        tracing::warn!("{name}: the guest did not power off in time");
                    }
                    Err(e) => tracing::warn!("{name}: graceful power-off: {e}"),
                }
            }
        }
        // SAFETY: kill(2) of the VMM this runtime started (checked through its command line).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + timeout.max(Duration::from_millis(100));
        match &pidfd {
            Some(fd) => {
                if crate::proc::wait_pidfd(fd, Some(deadline - Instant::now())) {
                    return Stopped::Gracefully;
                }
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                crate::proc::wait_pidfd(fd, Some(Duration::from_secs(5)));
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
        Stopped::Killed
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_static_elf_can_be_the_guest_init() {
        // This test binary is dynamically linked (it has a program interpreter).
        let me = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&me));
        let d = tempfile::tempdir().unwrap();
        let text = d.path().join("script");
        std::fs::write(&text, "#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&text));
        // A minimal ELF64 header with one PT_LOAD program header and no PT_INTERP.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        let f = d.path().join("static");
        std::fs::write(&f, &elf).unwrap();
        assert!(is_static_elf(&f));
        elf[64..68].copy_from_slice(&3u32.to_le_bytes());
        std::fs::write(&f, &elf).unwrap();
        assert!(!is_static_elf(&f));
    }

    #[test]
    fn the_init_archive_follows_the_services_aligned_with_its_module_list() {
        let d = tempfile::tempdir().unwrap();
        let service = d.path().join("svc.cpio");
        std::fs::write(&service, b"SERVICE-ARCHIVE").unwrap(); // 15 bytes: padded to 16
        let init = d.path().join("init");
        std::fs::write(&init, b"INIT-BINARY").unwrap();
        let tree = d.path().join("modules");
        std::fs::create_dir_all(tree.join("kernel")).unwrap();
        std::fs::write(
            tree.join("modules.dep"),
            "kernel/virtio.ko:\nkernel/virtio_net.ko: kernel/virtio.ko\n",
        )
        .unwrap();
        std::fs::write(tree.join("kernel/virtio.ko"), b"KO1").unwrap();
        std::fs::write(tree.join("kernel/virtio_net.ko"), b"KO2").unwrap();
        let out = d.path().join("out.cpio");
        let env = [("MODE".to_string(), "strict".to_string())];
        initramfs_with_init(&service, &init, Some(&tree), &env, &out).unwrap();
        let b = std::fs::read(&out).unwrap();
        assert_eq!(&b[..15], b"SERVICE-ARCHIVE");
        assert_eq!(b[15], 0);
        assert_eq!(
            &b[16..22],
            b"070701",
            "a newc archive starts aligned after it"
        );
        let text = String::from_utf8_lossy(&b);
        assert!(text.contains("gatevisor/init") && text.contains("INIT-BINARY"));
        assert!(text.contains("/gatevisor/virtio.ko\n/gatevisor/virtio_net.ko\n"));
        assert!(text.contains("gatevisor/env") && text.contains("MODE=strict\n"));
    }
}
