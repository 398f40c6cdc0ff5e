//! A backend for tests of the supervisor: each "service" is a real child process (`sh`, then
//! `sleep`), so the supervisor's watchers, pidfds and exit handling run as they do for real
//! services, while the test decides how each service behaves (slow or failed starts, crashes
//! with a code, stops that need the kill) and reads back what the supervisor asked for.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::{Backend, Definition, Kind, RuntimeError, StartSpec, Started, Stopped, Usage};

/// An argument in a service's command that makes its fake end by itself with code 3 after
/// 200 ms, whatever its behaviour says (a version that crashes at once).
pub const CRASHES: &str = "--fake-crashes";

/// How one fake service behaves.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// A start blocks this long before it reports (a slow liblxc start, a kernel boot).
    pub start_takes: Duration,
    /// A start fails with this reason.
    pub start_error: Option<String>,
    /// The service ends by itself after this long with this exit code (recorded as a
    /// monitor records it).
    pub exits_after: Option<(Duration, i32)>,
    /// It ignores the polite stop: a stop takes its whole grace period, then kills it.
    pub ignores_term: bool,
}

#[derive(Default)]
struct State {
    behaviour: HashMap<String, Behaviour>,
    running: HashMap<String, i32>,
    calls: Vec<String>,
}

pub struct Fake {
    kind: Kind,
    state: Mutex<State>,
}

impl Fake {
    pub fn new(kind: Kind) -> Fake {
        Fake {
            kind,
            state: Mutex::default(),
        }
    }

    pub fn set(&self, name: &str, b: Behaviour) {
        self.lock().behaviour.insert(name.into(), b);
    }

    /// What the supervisor asked for, in order (`start NAME`, `stop NAME`, `kill NAME`, ...).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Forgets the calls recorded for `name` (a test watches what follows).
    pub fn forget_calls(&self, name: &str) {
        let suffix = format!(" {name}");
        self.lock().calls.retain(|c| !c.ends_with(&suffix));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn call(&self, what: &str, name: &str) {
        self.lock().calls.push(format!("{what} {name}"));
    }

    fn pid(&self, name: &str) -> Option<i32> {
        let pid = *self.lock().running.get(name)?;
        alive(pid).then_some(pid)
    }

    fn signal(&self, name: &str, sig: i32) -> Result<i32, RuntimeError> {
        let pid = self
            .pid(name)
            .ok_or_else(|| RuntimeError::NotRunning { name: name.into() })?;
        // SAFETY: kill(2) of a child process this fake started and that has not been reaped
        // (alive() saw it in /proc, not as a zombie).
        unsafe { libc::kill(pid, sig) };
        Ok(pid)
    }
}

impl Drop for Fake {
    /// A failed test leaves no stand-in services behind.
    fn drop(&mut self) {
        for pid in self.lock().running.values() {
            if alive(*pid) {
                // SAFETY: kill(2) of a child this fake started, seen alive just now.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
        }
    }
}

/// Whether `pid` runs (exists and is not a zombie).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
        .unwrap_or(false)
}

impl Backend for Fake {
    fn kind(&self) -> Kind {
        self.kind
    }

    fn prepare(&self, def: &Definition) -> Result<(), RuntimeError> {
        self.call("prepare", &def.manifest.name);
        Ok(())
    }

    fn start(&self, name: &str, spec: &StartSpec) -> Result<Started, RuntimeError> {
        self.call("start", name);
        let b = self.lock().behaviour.get(name).cloned().unwrap_or_default();
        std::thread::sleep(b.start_takes);
        if let Some(reason) = b.start_error {
            return Err(RuntimeError::Failed {
                name: name.into(),
                reason,
            });
        }
        let _ = std::fs::remove_file(&spec.files.exit_file);
        let mut script = String::new();
        let exits_after = if spec.argv.iter().any(|a| a == CRASHES) {
            Some((Duration::from_millis(200), 3))
        } else {
            b.exits_after
        };
        match exits_after {
            Some((after, code)) => script.push_str(&format!(
                "sleep {}; printf '{{\"code\":{code},\"signal\":null,\"start_failed\":false}}' > '{}'; exit {code}",
                after.as_secs_f64(),
                spec.files.exit_file.display()
            )),
            None => script.push_str("exec sleep 100000"),
        }
        let mut command = Command::new("sh");
        command
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if b.ignores_term {
            // Ignored before exec, not by the script's own `trap`: a stop that comes
            // right after the start must find TERM already ignored.
            // SAFETY: between fork and exec only async-signal-safe signal() is called.
            unsafe {
                command.pre_exec(|| {
                    libc::signal(libc::SIGTERM, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        let child = command.spawn().map_err(|source| RuntimeError::Vm {
            name: name.into(),
            what: "cannot spawn the fake",
            source,
        })?;
        let pid = child.id() as i32;
        self.lock().running.insert(name.into(), pid);
        Ok(Started {
            main_pid: pid,
            monitor_pid: pid,
            monitor: Some(child),
        })
    }

    fn stop(&self, name: &str, grace: Duration) -> Result<Stopped, RuntimeError> {
        self.call("stop", name);
        let Ok(pid) = self.signal(name, libc::SIGTERM) else {
            return Ok(Stopped::WasNotRunning);
        };
        let fd = crate::proc::pidfd_open(pid).map_err(|source| RuntimeError::Vm {
            name: name.into(),
            what: "pidfd",
            source,
        })?;
        if crate::proc::wait_pidfd(&fd, Some(grace)) {
            return Ok(Stopped::Gracefully);
        }
        // SAFETY: as in signal(): our child, not reaped (its pidfd has not reported an exit).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        crate::proc::wait_pidfd(&fd, Some(Duration::from_secs(5)));
        Ok(Stopped::Killed)
    }

    fn kill(&self, name: &str) -> Result<(), RuntimeError> {
        self.call("kill", name);
        self.signal(name, libc::SIGKILL).map(|_| ())
    }

    fn pause(&self, name: &str) -> Result<(), RuntimeError> {
        self.call("pause", name);
        self.signal(name, libc::SIGSTOP).map(|_| ())
    }

    fn resume(&self, name: &str) -> Result<(), RuntimeError> {
        self.call("resume", name);
        self.signal(name, libc::SIGCONT).map(|_| ())
    }

    fn main_pid(&self, name: &str) -> Option<i32> {
        self.pid(name)
    }

    fn usage(&self, name: &str) -> Option<Usage> {
        let pid = self.pid(name)?;
        Some(Usage {
            memory_bytes: None,
            cpu_usec: crate::proc::cpu_usec(pid),
            pids: Some(1),
        })
    }

    fn exec(&self, name: &str, argv: &[String]) -> Result<i32, RuntimeError> {
        self.call("exec", name);
        self.pid(name)
            .ok_or_else(|| RuntimeError::NotRunning { name: name.into() })?;
        // Run on the host: what a health command does inside is not the fake's business.
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .status()
            .map_err(|source| RuntimeError::Vm {
                name: name.into(),
                what: "exec",
                source,
            })?;
        Ok(status.code().unwrap_or(128))
    }

    fn tcp_listening(&self, name: &str, _port: u16) -> bool {
        self.pid(name).is_some()
    }

    fn undefine(&self, name: &str) -> Result<(), RuntimeError> {
        self.call("undefine", name);
        if self.pid(name).is_some() {
            return Err(RuntimeError::Failed {
                name: name.into(),
                reason: "still running".into(),
            });
        }
        self.lock().running.remove(name);
        Ok(())
    }

    fn unrecorded_end(&self) -> &'static str {
        "the fake ended without an exit record"
    }
}
