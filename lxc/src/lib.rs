//! Safe LXC containers for gatevisor services, over liblxc (`lxc-sys`).
//!
//! - [`sys`] holds all FFI behind [`sys::Container`], which owns one liblxc reference.
//! - [`config`] turns a [`ContainerSpec`] into liblxc configuration (limits for cgroup v1 or v2,
//!   kept capabilities, `no_new_privs`, seccomp, a veth pair named by the caller).
//! - [`monitor`] is the per-container monitor process: liblxc's foreground start, the exit
//!   record and the rotating service log.
//! - [`Runtime`] is what the supervisor uses: define, start, stop, freeze, exec, usage.
//!
//! The runtime never decides policy (restarts, names, where files live): the supervisor does.

pub mod config;
pub mod monitor;
pub mod rootfs;
pub mod sys;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use config::{Cgroups, ContainerSpec, IdMap, Limits};
pub use monitor::{ExitRecord, MonitorConfig};

#[derive(Debug, thiserror::Error)]
pub enum LxcError {
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error("cannot create {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("liblxc rejected config item {key} = {value:?}")]
    ConfigItem { key: String, value: String },
    #[error("liblxc could not save the configuration of {name}")]
    SaveConfig { name: String },
    #[error("container {name} is not defined")]
    NotDefined { name: String },
    #[error("container {name} is already running")]
    AlreadyRunning { name: String },
    #[error("cannot spawn the monitor process {program}")]
    SpawnMonitor {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container {name} did not start: {reason}")]
    StartFailed { name: String, reason: String },
    #[error("container {name} did not reach RUNNING within {timeout_ms} ms")]
    StartTimeout { name: String, timeout_ms: u128 },
    #[error("container {name} is not running")]
    NotRunning { name: String },
    #[error("liblxc could not {op} container {name}")]
    Op { op: &'static str, name: String },
}

/// How to run the monitor process: the program and the arguments before the JSON config.
#[derive(Debug, Clone)]
pub struct MonitorCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// Where a container's run files go and how big its log may grow.
#[derive(Debug, Clone)]
pub struct RunFiles {
    pub exit_file: PathBuf,
    pub log_file: PathBuf,
    pub log_max_bytes: u64,
    pub log_keep: u32,
}

/// A container that reached RUNNING.
#[derive(Debug)]
pub struct Started {
    /// The monitor process; the caller reaps it (it is the caller's child).
    pub monitor: Child,
    pub init_pid: i32,
}

/// Resource usage read from the container's cgroup.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: Option<u64>,
    pub cpu_usec: Option<u64>,
    pub pids: Option<u64>,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Gracefully,
    Killed,
    WasNotRunning,
}

#[derive(Clone)]
pub struct Runtime {
    lxcpath: PathBuf,
    cgroups: Cgroups,
    monitor: MonitorCommand,
}

impl Runtime {
    pub fn new(
        lxcpath: &Path,
        cgroups: Cgroups,
        monitor: MonitorCommand,
    ) -> Result<Runtime, LxcError> {
        std::fs::create_dir_all(lxcpath).map_err(|source| LxcError::Io {
            path: lxcpath.into(),
            source,
        })?;
        Ok(Runtime {
            lxcpath: lxcpath.into(),
            cgroups,
            monitor,
        })
    }

    pub fn lxcpath(&self) -> &Path {
        &self.lxcpath
    }

    /// liblxc's own log for a container (its warnings and errors).
    pub fn lxc_log(&self, name: &str) -> PathBuf {
        self.lxcpath.join(name).join("lxc.log")
    }

    /// The last lines of liblxc's log for `name`, to explain a failure.
    fn lxc_log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.lxc_log(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; liblxc said: {tail}")
        }
    }

    fn container(&self, name: &str) -> Result<sys::Container, LxcError> {
        Ok(sys::Container::new(name, &self.lxcpath)?)
    }

    fn defined(&self, name: &str) -> Result<sys::Container, LxcError> {
        let c = self.container(name)?;
        if !c.is_defined()? {
            return Err(LxcError::NotDefined { name: name.into() });
        }
        Ok(c)
    }

    /// Writes (or rewrites) the container's liblxc configuration.
    pub fn define(&self, spec: &ContainerSpec) -> Result<(), LxcError> {
        let c = self.container(&spec.name)?;
        if c.is_running()? {
            return Err(LxcError::AlreadyRunning {
                name: spec.name.clone(),
            });
        }
        let dir = self.lxcpath.join(&spec.name);
        std::fs::create_dir_all(&dir).map_err(|source| LxcError::Io {
            path: dir.clone(),
            source,
        })?;
        c.clear_config()?;
        for (key, value) in config::items(spec, self.cgroups, &self.lxc_log(&spec.name)) {
            if !c.set_config_item(&key, &value)? {
                return Err(LxcError::ConfigItem { key, value });
            }
        }
        if !c.save_config()? {
            return Err(LxcError::SaveConfig {
                name: spec.name.clone(),
            });
        }
        Ok(())
    }

    pub fn is_defined(&self, name: &str) -> Result<bool, LxcError> {
        Ok(self.container(name)?.is_defined()?)
    }

    /// Starts the container's `argv` under its own monitor process and returns once liblxc
    /// reports RUNNING and the init PID is known.
    pub fn start(
        &self,
        name: &str,
        argv: &[String],
        files: &RunFiles,
        timeout: Duration,
    ) -> Result<Started, LxcError> {
        let c = self.defined(name)?;
        if c.is_running()? {
            return Err(LxcError::AlreadyRunning { name: name.into() });
        }
        let _ = std::fs::remove_file(&files.exit_file);
        let cfg = MonitorConfig {
            lxcpath: self.lxcpath.clone(),
            name: name.into(),
            argv: argv.to_vec(),
            exit_file: files.exit_file.clone(),
            log_file: files.log_file.clone(),
            log_max_bytes: files.log_max_bytes,
            log_keep: files.log_keep,
        };
        let json = serde_json::to_string(&cfg).expect("monitor config serialises");
        let mut cmd = Command::new(&self.monitor.program);
        cmd.args(&self.monitor.args)
            .arg(json)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        detach(&mut cmd);
        let mut monitor = cmd.spawn().map_err(|source| LxcError::SpawnMonitor {
            program: self.monitor.program.clone(),
            source,
        })?;
        // liblxc has no "started" callback for a foreground start from another process, so we
        // ask its command socket; this is the same check `lxc-wait` makes.
        let deadline = Instant::now() + timeout;
        loop {
            if c.state()? == "RUNNING" {
                let pid = c.init_pid()?;
                if pid > 0 {
                    return Ok(Started {
                        monitor,
                        init_pid: pid,
                    });
                }
            }
            if let Ok(Some(status)) = monitor.try_wait() {
                let reason = monitor::read_exit_record(&files.exit_file)
                    .map(|r| r.describe())
                    .unwrap_or_else(|| format!("monitor exited with {status}"))
                    + &self.lxc_log_tail(name);
                return Err(LxcError::StartFailed {
                    name: name.into(),
                    reason,
                });
            }
            if Instant::now() >= deadline {
                let _ = c.stop();
                let _ = monitor.kill();
                let _ = monitor.wait();
                return Err(LxcError::StartTimeout {
                    name: name.into(),
                    timeout_ms: timeout.as_millis(),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Asks the program to stop (SIGTERM through init), then kills it after `timeout`.
    pub fn stop(&self, name: &str, timeout: Duration) -> Result<Stopped, LxcError> {
        let c = self.container(name)?;
        if !c.is_running()? {
            return Ok(Stopped::WasNotRunning);
        }
        // liblxc's shutdown has init.lxc pass SIGTERM on and SIGKILL everything a second
        // later, whatever the timeout: the program gets its whole grace period instead, as
        // SIGTERM to init's children (the program), then the wait for the container to end.
        if !timeout.is_zero() {
            let init = c.init_pid()?;
            let children = std::fs::read_to_string(format!("/proc/{init}/task/{init}/children"))
                .unwrap_or_default();
            let mut told = false;
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) of a process of this container (a child of its init, read
                // from /proc just now); it has no memory effects here.
                told |= unsafe { libc::kill(pid, libc::SIGTERM) } == 0;
            }
            if told {
                let deadline = Instant::now() + timeout;
                while Instant::now() < deadline {
                    if !c.is_running()? {
                        return Ok(Stopped::Gracefully);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            } else {
                let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
                if c.shutdown(secs)? {
                    return Ok(Stopped::Gracefully);
                }
            }
        }
        if c.stop()? || !c.is_running()? {
            Ok(Stopped::Killed)
        } else {
            Err(LxcError::Op {
                op: "stop",
                name: name.into(),
            })
        }
    }

    pub fn freeze(&self, name: &str) -> Result<(), LxcError> {
        let c = self.running(name)?;
        c.freeze()?.then_some(()).ok_or(LxcError::Op {
            op: "freeze",
            name: name.into(),
        })
    }

    pub fn thaw(&self, name: &str) -> Result<(), LxcError> {
        let c = self.running(name)?;
        c.unfreeze()?.then_some(()).ok_or(LxcError::Op {
            op: "thaw",
            name: name.into(),
        })
    }

    fn running(&self, name: &str) -> Result<sys::Container, LxcError> {
        let c = self.container(name)?;
        if !c.is_running()? {
            return Err(LxcError::NotRunning { name: name.into() });
        }
        Ok(c)
    }

    /// liblxc's state name (`RUNNING`, `STOPPED`, `FROZEN`, ...).
    pub fn state(&self, name: &str) -> Result<String, LxcError> {
        Ok(self.container(name)?.state()?)
    }

    /// The init PID when the container runs.
    pub fn init_pid(&self, name: &str) -> Result<Option<i32>, LxcError> {
        let c = self.container(name)?;
        if !c.is_running()? {
            return Ok(None);
        }
        Ok(Some(c.init_pid()?).filter(|p| *p > 0))
    }

    /// Memory, CPU time and task count from the container's cgroup.
    pub fn usage(&self, name: &str) -> Result<Usage, LxcError> {
        let c = self.running(name)?;
        Ok(usage_from(self.cgroups, |key| {
            c.cgroup_item(key).ok().flatten()
        }))
    }
}

/// Memory, CPU time and task count of a cgroup on `cgroups`, its files read with `read`
/// (`controller.key` → contents): a container's through liblxc, a VMM's from its directory.
pub fn usage_from(cgroups: Cgroups, read: impl Fn(&str) -> Option<String>) -> Usage {
    let num = |key: &str| read(key).and_then(|s| s.trim().parse::<u64>().ok());
    match cgroups {
        Cgroups::V1 => Usage {
            memory_bytes: num("memory.usage_in_bytes"),
            cpu_usec: num("cpuacct.usage").map(|ns| ns / 1000),
            pids: num("pids.current"),
        },
        Cgroups::V2 => Usage {
            memory_bytes: num("memory.current"),
            cpu_usec: read("cpu.stat").and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())
            }),
            pids: num("pids.current"),
        },
    }
}

impl Runtime {
    /// Runs `argv` inside the running container with this process's stdio; returns the exit
    /// code (128 + signal when killed by a signal).
    pub fn exec(&self, name: &str, argv: &[String]) -> Result<i32, LxcError> {
        let c = self.running(name)?;
        let env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
        let status = c.attach_run_wait(argv, &env)?;
        if status < 0 {
            return Err(LxcError::Op {
                op: "attach to",
                name: name.into(),
            });
        }
        Ok(if libc::WIFSIGNALED(status) {
            128 + libc::WTERMSIG(status)
        } else {
            libc::WEXITSTATUS(status)
        })
    }

    /// Removes the container's liblxc directory (config and liblxc log). The rootfs belongs
    /// to the caller and is not touched. The container must be stopped.
    pub fn undefine(&self, name: &str) -> Result<(), LxcError> {
        let c = self.container(name)?;
        if c.is_running()? {
            return Err(LxcError::AlreadyRunning { name: name.into() });
        }
        drop(c);
        let dir = self.lxcpath.join(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(LxcError::Io { path: dir, source }),
        }
    }
}

/// Makes `cmd` start in a session of its own with no signals blocked: a service's monitor
/// (or VMM) outlives the daemon, and does not inherit the mask of the signals the daemon
/// takes with sigwait (its program would never see SIGTERM).
pub fn detach(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2) and
    // sigprocmask(2), both async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::sys::signal::sigprocmask(
                nix::sys::signal::SigmaskHow::SIG_SETMASK,
                Some(&nix::sys::signal::SigSet::empty()),
                None,
            )
            .map_err(std::io::Error::from)?;
            Ok(())
        });
    }
}

/// liblxc's version.
pub fn version() -> String {
    sys::version()
}

/// The AppArmor profile to ask for, or `None` for liblxc's default
/// (`lxc-container-default-cgns`). When the kernel enforces AppArmor but that profile is not
/// loaded (the `apparmor` package is missing, as on a minimal gateway root), liblxc's default
/// makes every start fail; the containers then run unconfined by AppArmor, still confined by
/// namespaces, dropped capabilities, seccomp and cgroups, and a warning says so.
pub fn apparmor_profile() -> Option<String> {
    let enabled = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|v| v.trim() == "Y");
    if !enabled {
        return None;
    }
    let loaded = std::fs::read_to_string("/sys/kernel/security/apparmor/profiles").is_ok_and(|p| {
        p.lines()
            .any(|l| l.starts_with("lxc-container-default-cgns "))
    });
    if loaded {
        return None;
    }
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "AppArmor is enforced but liblxc's profile lxc-container-default-cgns is not loaded \
             (install the apparmor package): containers start without an AppArmor profile"
        )
    });
    Some("unconfined".into())
}

/// liblxc's default seccomp policy, where the distribution ships it.
pub fn default_seccomp_profile() -> Option<PathBuf> {
    ["/usr/share/lxc/config/common.seccomp"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}
