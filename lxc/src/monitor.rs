//! The per-container monitor process.
//!
//! The supervisor does not run liblxc's start in its own process: it starts one small monitor
//! process per container (the same `gatevisor` binary, re-executed), in its own session, which
//! calls liblxc's `start` in the foreground and so *is* liblxc's monitor for that container.
//! This gives three things:
//! - the container outlives the supervisor (a crash or restart of the daemon does not touch it);
//! - the program's exit status is known (liblxc hands it to the foreground caller) and written
//!   to an exit file that a restarted supervisor can still read;
//! - the program's stdout and stderr are a pipe into this process, which writes the service log
//!   with size-bounded rotation, so logging too survives the daemon.
//!
//! liblxc refuses a foreground start in a threaded process, so the log pump is not a thread but
//! a child process forked before liblxc runs, while this process is still single-threaded.

use serde::{Deserialize, Serialize};
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::sys;

/// What the monitor is told, as one JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub lxcpath: PathBuf,
    pub name: String,
    pub argv: Vec<String>,
    pub exit_file: PathBuf,
    pub log_file: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: u32,
}

/// How the container's program ended, as the monitor saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code, when the program exited by itself.
    pub code: Option<i32>,
    /// Signal that ended it (the program's or the container init's).
    pub signal: Option<i32>,
    /// liblxc failed to start the container at all.
    pub start_failed: bool,
}

impl ExitRecord {
    /// Decodes liblxc's `error_num` after a foreground execute-mode start: the wait status of
    /// the container's init (`init.lxc`). Observed with liblxc 5.0:
    /// - `code << 8`: init exited with `code`; init.lxc exits with 128 + N when the program
    ///   was killed by signal N, which is reported as that signal;
    /// - `sig << 8 | 0x7f`: init itself was killed by `sig` (e.g. `kill -9` from the host);
    /// - a plain signal number in the low 7 bits: killed by that signal.
    pub fn from_error_num(status: i32, started: bool) -> ExitRecord {
        let low = status & 0x7f;
        let high = (status >> 8) & 0xff;
        let (code, signal) = if !started && status < 0 {
            (None, None)
        } else if low == 0 {
            if high > 128 && high < 128 + 65 {
                (None, Some(high - 128))
            } else {
                (Some(high), None)
            }
        } else if low == 0x7f {
            (None, Some(high))
        } else {
            (None, Some(low))
        };
        ExitRecord {
            code,
            signal,
            start_failed: !started,
        }
    }

    pub fn describe(&self) -> String {
        if self.start_failed {
            return "liblxc could not start the container (see its lxc log)".into();
        }
        match (self.code, self.signal) {
            (_, Some(s)) => format!("killed by signal {s}"),
            (Some(c), None) => format!("exited with code {c}"),
            (None, None) => "ended".into(),
        }
    }
}

/// Entry point of the monitor process. Returns the process exit code.
pub fn monitor_main(config_json: &str) -> i32 {
    let cfg: MonitorConfig = match serde_json::from_str(config_json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gatevisor lxc monitor: bad configuration: {e}");
            return 2;
        }
    };
    let pump = match redirect_stdio_to_log(&cfg) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("gatevisor lxc monitor: cannot set up the log: {e}");
            return 2;
        }
    };
    let record = run_container(&cfg);
    if let Err(e) = write_exit_record(&cfg.exit_file, &record) {
        eprintln!(
            "gatevisor lxc monitor: cannot write {}: {e}",
            cfg.exit_file.display()
        );
    }
    // A start that fails half-way (an AppArmor or cgroup error) leaves liblxc's descriptors
    // open in this process: its command socket, on which `lxc-info` and the supervisor would
    // wait forever, and copies of the log pipe, which would keep the pump from ever seeing
    // end-of-file. The container is gone: close everything but stdio.
    // SAFETY: close_range on descriptors this process no longer uses (the pump's pidfd is
    // kept: it is moved below the range first); nothing runs after this but the lines
    // below, which open what they need.
    let pump = pump.keep_below_close_range();
    let first = if pump.pidfd.is_some() { 4u32 } else { 3u32 };
    // SAFETY: see above.
    unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) };
    // Let the log pump see end-of-file: the container's processes are gone, drop our copies.
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
    // A container process that escaped into the background may still hold the pipe: give
    // the pump a few seconds to drain, then end it rather than hang the monitor.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pump.alive() {
        if std::time::Instant::now() >= deadline {
            pump.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    0
}

impl Pump {
    /// The same pump with its pidfd at descriptor 3, the one close_range(4..) keeps.
    fn keep_below_close_range(self) -> Pump {
        use std::os::fd::{AsRawFd, FromRawFd};
        let pidfd = self.pidfd.and_then(|fd| {
            if fd.as_raw_fd() == 3 {
                return Some(fd);
            }
            // SAFETY: dup2 onto descriptor 3, which this process is about to close anyway;
            // `fd` (the old descriptor) is closed right after.
            let r = unsafe { libc::dup2(fd.as_raw_fd(), 3) };
            drop(fd);
            // SAFETY: on success descriptor 3 is now a pidfd this process owns.
            (r == 3).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(3) })
        });
        Pump {
            pid: self.pid,
            pidfd,
        }
    }
}

fn run_container(cfg: &MonitorConfig) -> ExitRecord {
    let c = match sys::Container::new(&cfg.name, &cfg.lxcpath) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("gatevisor lxc monitor: {e}");
            return ExitRecord::from_error_num(-1, false);
        }
    };
    let _ = c.want_daemonize(false);
    let started = c.start(true, &cfg.argv).unwrap_or(false);
    ExitRecord::from_error_num(c.error_num(), started)
}

/// `gatevisor __log-pump FILE MAX_BYTES KEEP`: copies its stdin into the rotated log `FILE`
/// until the writer (a microVM's VMM) closes it. The pump is its own process, in its own
/// session, so the log goes on across daemon restarts, as a container's monitor's does.
pub fn log_pump_main(file: &Path, max_bytes: u64, keep: u32) -> i32 {
    use std::os::fd::AsFd;
    let stdin = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => fd,
        Err(_) => return 1,
    };
    match RotatingLog::open(file, max_bytes, keep) {
        Ok(mut log) => {
            log.pump(stdin);
            0
        }
        Err(_) => 1,
    }
}

/// Writes the record atomically (temp file, fsync, rename).
pub fn write_exit_record(path: &Path, record: &ExitRecord) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(record).unwrap_or_default())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn read_exit_record(path: &Path) -> Option<ExitRecord> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The log pump, which is not a child of the monitor: liblxc reaps *every* child of the
/// process that starts a container when a start fails (`lxc_abort` waits for pid -1), and a
/// pump child, which lives as long as the monitor holds the pipe, would keep that wait, and
/// with it the container's command socket, blocked forever.
struct Pump {
    pid: nix::unistd::Pid,
    /// A pidfd of it (None on kernels without pidfd_open: then its pid is polled).
    pidfd: Option<std::os::fd::OwnedFd>,
}

impl Pump {
    fn alive(&self) -> bool {
        match &self.pidfd {
            Some(fd) => {
                use std::os::fd::AsFd;
                let mut fds = [nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).is_ok_and(|n| n == 0)
            }
            None => nix::sys::signal::kill(self.pid, None).is_ok(),
        }
    }

    fn kill(&self) {
        match &self.pidfd {
            Some(fd) => {
                use std::os::fd::AsRawFd;
                // SAFETY: pidfd_send_signal on a pidfd this process owns; no pointers but a
                // null siginfo, which the call allows.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0u32,
                    )
                };
            }
            None => {
                let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

/// Points fds 0-2 at /dev/null and a pipe, and starts the process that drains the pipe into
/// the rotating log, as a grandchild (see [`Pump`]). Must be called while the process is
/// single-threaded.
fn redirect_stdio_to_log(cfg: &MonitorConfig) -> std::io::Result<Pump> {
    use std::io::Read;
    let null = std::fs::File::open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let (pid_r, pid_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut log = RotatingLog::open(&cfg.log_file, cfg.log_max_bytes, cfg.log_keep)?;
    // SAFETY: this process has a single thread here (the monitor spawns none), so the child
    // starts with consistent allocator and stdio state; it forks the pump and exits.
    match unsafe { nix::unistd::fork() }? {
        nix::unistd::ForkResult::Child => {
            // SAFETY: as above, still one thread; the grandchild only pumps the pipe.
            match unsafe { nix::unistd::fork() } {
                Ok(nix::unistd::ForkResult::Child) => {
                    drop(w);
                    drop(pid_w);
                    log.pump(r);
                    drop(log);
                    // SAFETY: _exit ends the pump without running atexit handlers.
                    unsafe { libc::_exit(0) }
                }
                Ok(nix::unistd::ForkResult::Parent { child }) => {
                    let _ = nix::unistd::write(&pid_w, &child.as_raw().to_ne_bytes());
                    // SAFETY: _exit ends the intermediate child at once.
                    unsafe { libc::_exit(0) }
                }
                // SAFETY: as above.
                Err(_) => unsafe { libc::_exit(1) },
            }
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(r);
            drop(log);
            drop(pid_w);
            let _ = nix::sys::wait::waitpid(child, None);
            let mut b = [0u8; 4];
            std::fs::File::from(pid_r).read_exact(&mut b)?;
            let pid = nix::unistd::Pid::from_raw(i32::from_ne_bytes(b));
            // The pump cannot have ended: it reads the pipe this process still holds.
            // SAFETY: pidfd_open takes a pid and flags; it returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0u32) };
            let pidfd = (fd >= 0).then(|| {
                // SAFETY: `fd` is a descriptor pidfd_open just returned to this process.
                unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
            });
            nix::unistd::dup2_stdout(&w)?;
            nix::unistd::dup2_stderr(&w)?;
            Ok(Pump { pid, pidfd })
        }
    }
}

/// A log file that is rotated (`log` → `log.1` → … → `log.N`) before it would grow past its
/// limit. All paths are prepared up front so that writing and rotating never allocate.
pub struct RotatingLog {
    paths: Vec<CString>,
    max_bytes: u64,
    fd: i32,
    size: u64,
}

impl RotatingLog {
    pub fn open(path: &Path, max_bytes: u64, keep: u32) -> std::io::Result<RotatingLog> {
        let mut paths = vec![CString::new(path.as_os_str().as_encoded_bytes())?];
        for i in 1..=keep.max(1) {
            let p = format!("{}.{i}", path.display());
            paths.push(CString::new(p)?);
        }
        let mut log = RotatingLog {
            paths,
            max_bytes: max_bytes.max(1024),
            fd: -1,
            size: 0,
        };
        log.reopen()?;
        Ok(log)
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        // SAFETY: `paths[0]` is a NUL-terminated string owned by `self`; open returns a new fd
        // or -1.
        let fd = unsafe {
            libc::open(
                self.paths[0].as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC,
                0o640,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `st` is written by fstat on the fd we just opened and own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `fd` is open and `st` is a valid out-pointer.
        if unsafe { libc::fstat(fd, &mut st) } == 0 {
            self.size = st.st_size as u64;
        }
        if self.fd >= 0 {
            // SAFETY: the previous fd is owned by `self` and not used after this.
            unsafe { libc::close(self.fd) };
        }
        self.fd = fd;
        Ok(())
    }

    fn rotate(&mut self) {
        for i in (1..self.paths.len()).rev() {
            // SAFETY: both paths are NUL-terminated strings owned by `self`; a failed rename
            // (the older file does not exist yet) is harmless.
            unsafe { libc::rename(self.paths[i - 1].as_ptr(), self.paths[i].as_ptr()) };
        }
        let _ = self.reopen();
    }

    /// Appends `data`, rotating first if the file would pass its limit.
    pub fn write(&mut self, data: &[u8]) {
        if self.size > 0 && self.size + data.len() as u64 > self.max_bytes {
            self.rotate();
        }
        let mut off = 0;
        while off < data.len() {
            let rest = &data[off..];
            // SAFETY: `rest` is a valid slice for its length; `fd` is our open log file.
            let n = unsafe { libc::write(self.fd, rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                break;
            }
            off += n as usize;
        }
        self.size += off as u64;
    }

    /// Copies everything from `r` into the log until end-of-file.
    pub fn pump(&mut self, r: OwnedFd) {
        let mut buf = [0u8; 8192];
        loop {
            // SAFETY: `buf` is a stack buffer of the given length; `r` is an open pipe end.
            let n = unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0 {
                break;
            }
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            self.write(&buf[..n as usize]);
        }
    }
}

impl Drop for RotatingLog {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: the fd is owned by `self` and closed once.
            unsafe { libc::close(self.fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_rotates_and_keeps_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("svc.log");
        let mut log = RotatingLog::open(&p, 1024, 2).unwrap();
        for i in 0..100 {
            log.write(format!("line {i:04} ............................\n").as_bytes());
        }
        drop(log);
        let total: u64 = ["svc.log", "svc.log.1", "svc.log.2"]
            .iter()
            .map(|f| std::fs::metadata(dir.path().join(f)).unwrap().len())
            .inspect(|len| assert!(*len <= 1024))
            .sum();
        assert!(total <= 3 * 1024);
        assert!(!dir.path().join("svc.log.3").exists());
        let newest = std::fs::read_to_string(&p).unwrap();
        assert!(newest.contains("line 0099"), "{newest}");
    }

    #[test]
    fn pump_copies_until_eof() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.log");
        let mut log = RotatingLog::open(&p, 1 << 20, 1).unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, b"hello\n").unwrap();
        drop(w);
        log.pump(r);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "hello\n");
    }

    #[test]
    fn exit_record_decodes_signal_and_code() {
        // Values liblxc 5.0.2 produced on this machine.
        let r = ExitRecord::from_error_num(35072, true);
        assert_eq!(
            (r.code, r.signal),
            (None, Some(9)),
            "program killed by SIGKILL"
        );
        let r = ExitRecord::from_error_num(2431, true);
        assert_eq!(
            (r.code, r.signal),
            (None, Some(9)),
            "init killed by SIGKILL"
        );
        let r = ExitRecord::from_error_num(0, true);
        assert_eq!((r.code, r.signal), (Some(0), None));
        let r = ExitRecord::from_error_num(1792, true);
        assert_eq!((r.code, r.signal), (Some(7), None));
        assert!(r.describe().contains("code 7"));
    }
}
