//! The embedded default: a private Open vSwitch (Debian's `ovsdb-server` and `ovs-vswitchd`)
//! under our own run directory, for boards with no system instance. The processes are our
//! children, run in the foreground and are stopped (SIGTERM, then SIGKILL) on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ovsdb::{Ovsdb, OvsdbError};

#[derive(Debug, thiserror::Error)]
pub enum PrivateError {
    #[error("{program} is not installed (apt-get install openvswitch-switch)")]
    Missing { program: &'static str },
    #[error("cannot create the database schema file {path}: no vswitch.ovsschema found")]
    NoSchema { path: PathBuf },
    #[error("cannot run {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {message}")]
    Failed { program: String, message: String },
    #[error("{what} did not come up within {ms} ms; see {log}")]
    Timeout {
        what: &'static str,
        ms: u128,
        log: PathBuf,
    },
    #[error(transparent)]
    Ovsdb(#[from] OvsdbError),
}

const SCHEMAS: &[&str] = &[
    "/usr/share/openvswitch/vswitch.ovsschema",
    "/usr/local/share/openvswitch/vswitch.ovsschema",
];

/// Which daemons [`PrivateOvs::restart_dead`] restarted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Restarted {
    pub ovsdb_server: bool,
    pub vswitchd: bool,
}

pub struct PrivateOvs {
    run_dir: PathBuf,
    ovsdb_server: Option<Child>,
    vswitchd: Option<Child>,
    /// Stop the processes on drop (false after `leave_running`).
    stop_on_drop: bool,
}

fn program(name: &'static str) -> Result<PathBuf, PrivateError> {
    gatevisor_board::ovs::find_sbin(name).ok_or(PrivateError::Missing { program: name })
}

impl PrivateOvs {
    /// Starts `ovsdb-server` and `ovs-vswitchd` with their sockets, database and logs in
    /// `run_dir`, and waits until both answer.
    pub fn start(run_dir: &Path) -> Result<PrivateOvs, PrivateError> {
        PrivateOvs::start_with(run_dir, false)
    }

    /// As [`PrivateOvs::start`], but `ovs-vswitchd` starts with `flow-restore-wait`: it forwards
    /// nothing until the caller installed its flows and cleared the flag, so no packet is
    /// switched by a table without them.
    pub fn start_holding(run_dir: &Path) -> Result<PrivateOvs, PrivateError> {
        PrivateOvs::start_with(run_dir, true)
    }

    fn start_with(run_dir: &Path, hold: bool) -> Result<PrivateOvs, PrivateError> {
        let tool = program("ovsdb-tool")?;
        std::fs::create_dir_all(run_dir).map_err(|source| PrivateError::Spawn {
            program: format!("mkdir {}", run_dir.display()),
            source,
        })?;
        let db = run_dir.join("conf.db");
        if !db.exists() {
            let schema = SCHEMAS
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .ok_or_else(|| PrivateError::NoSchema { path: db.clone() })?;
            let out = Command::new(&tool)
                .arg("create")
                .arg(&db)
                .arg(schema)
                .output()
                .map_err(|source| PrivateError::Spawn {
                    program: tool.display().to_string(),
                    source,
                })?;
            if !out.status.success() {
                return Err(PrivateError::Failed {
                    program: "ovsdb-tool create".into(),
                    message: String::from_utf8_lossy(&out.stderr).trim().into(),
                });
            }
        }
        let mut me = PrivateOvs {
            run_dir: run_dir.into(),
            ovsdb_server: None,
            vswitchd: None,
            stop_on_drop: true,
        };
        me.spawn_ovsdb_server()?;
        me.spawn_vswitchd(hold)?;
        Ok(me)
    }

    fn log(&self, n: &str) -> PathBuf {
        self.run_dir.join(format!("{n}.log"))
    }

    /// Starts `ovsdb-server` on the existing database and waits until it answers.
    fn spawn_ovsdb_server(&mut self) -> Result<(), PrivateError> {
        let server = program("ovsdb-server")?;
        let run_dir = self.run_dir.clone();
        let db = run_dir.join("conf.db");
        self.ovsdb_server = Some(spawn(
            &server,
            &[
                db.to_str().unwrap_or_default(),
                &format!("--remote=punix:{}", self.db_socket().display()),
                &format!("--unixctl={}", run_dir.join("ovsdb-server.ctl").display()),
                &format!("--pidfile={}", run_dir.join("ovsdb-server.pid").display()),
                &format!("--log-file={}", self.log("ovsdb-server").display()),
                "-vconsole:off",
            ],
            &run_dir,
        )?);
        let start = Instant::now();
        let mut db_client = loop {
            match Ovsdb::connect(&self.db_socket()) {
                Ok(c) => break c,
                Err(_) if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(_) => {
                    return Err(PrivateError::Timeout {
                        what: "ovsdb-server",
                        ms: start.elapsed().as_millis(),
                        log: self.log("ovsdb-server"),
                    })
                }
            }
        };
        db_client.init()?;
        Ok(())
    }

    /// Starts `ovs-vswitchd` and waits until it applied the database. With `hold`, it starts
    /// with `flow-restore-wait`: it forwards nothing until the caller restored the flows and
    /// cleared the flag ([`Ovsdb::set_flow_restore_wait`]).
    fn spawn_vswitchd(&mut self, hold: bool) -> Result<(), PrivateError> {
        let vswitchd = program("ovs-vswitchd")?;
        let run_dir = self.run_dir.clone();
        let mut db_client = Ovsdb::connect(&self.db_socket())?;
        db_client.set_flow_restore_wait(hold)?;
        let start = Instant::now();
        self.vswitchd = Some(spawn(
            &vswitchd,
            &[
                &format!("unix:{}", self.db_socket().display()),
                &format!("--unixctl={}", run_dir.join("ovs-vswitchd.ctl").display()),
                &format!("--pidfile={}", run_dir.join("ovs-vswitchd.pid").display()),
                &format!("--log-file={}", self.log("ovs-vswitchd").display()),
                "-vconsole:off",
            ],
            &run_dir,
        )?);
        db_client
            .wait_applied(Duration::from_secs(20))
            .map_err(|_| PrivateError::Timeout {
                what: "ovs-vswitchd",
                ms: start.elapsed().as_millis(),
                log: self.log("ovs-vswitchd"),
            })?;
        Ok(())
    }

    /// Whether both daemons still run (a child of ours that ended is reaped, and left for
    /// [`Self::restart_dead`] to start again). Starts nothing.
    /// The two daemons' process ids (`ovsdb-server`, `ovs-vswitchd`), as far as they are
    /// known: the children started here, or the pid files of a switch re-attached to.
    pub fn pids(&self) -> Vec<i32> {
        [
            (&self.ovsdb_server, DAEMONS[0]),
            (&self.vswitchd, DAEMONS[1]),
        ]
        .into_iter()
        .filter_map(|(child, (_, pidfile))| match child {
            Some(c) => Some(c.id() as i32),
            None => read_pid(&self.run_dir.join(pidfile)),
        })
        .collect()
    }

    pub fn all_running(&mut self) -> bool {
        !ended(&mut self.ovsdb_server, &self.run_dir, DAEMONS[0])
            && !ended(&mut self.vswitchd, &self.run_dir, DAEMONS[1])
    }

    /// Restarts whichever of the two daemons died, leaving the other running: `ovs-vswitchd`
    /// keeps forwarding while `ovsdb-server` restarts, and a restarted `ovs-vswitchd` finds its
    /// configuration in the running database. Dead children are reaped. Whether a daemon runs
    /// is read from the process table (cheap enough for every second); with `probe`, a daemon
    /// that runs must also answer on its control socket, or it is killed as hung (that call
    /// can wait up to 5 s: for when the switch already stopped answering on OpenFlow).
    /// `hold`: as in [`PrivateOvs::start_holding`]. Returns which daemons were restarted.
    pub fn restart_dead(&mut self, hold: bool, probe: bool) -> Result<Restarted, PrivateError> {
        let mut done = Restarted::default();
        for (ctl, pidfile) in DAEMONS {
            let is_db = ctl.starts_with("ovsdb");
            let child = if is_db {
                &mut self.ovsdb_server
            } else {
                &mut self.vswitchd
            };
            let exited = ended(child, &self.run_dir, (ctl, pidfile));
            if !exited && (!probe || unixctl(&self.run_dir.join(ctl), "version", &[]).is_ok()) {
                continue;
            }
            if let Some(mut c) = child.take() {
                if !exited {
                    let _ = c.kill();
                }
                let _ = c.wait();
            } else if let Some(pid) =
                read_pid(&self.run_dir.join(pidfile)).filter(|p| pid_alive(*p))
            {
                // Not ours (an earlier daemon started it) and not answering: hung.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let deadline = Instant::now() + Duration::from_secs(5);
                while pid_alive(pid) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = std::fs::remove_file(self.run_dir.join(pidfile));
            if is_db {
                self.spawn_ovsdb_server()?;
                done.ovsdb_server = true;
            } else {
                self.spawn_vswitchd(hold)?;
                done.vswitchd = true;
            }
        }
        Ok(done)
    }

    /// Re-attaches to a private switch a previous daemon left running in `run_dir` (both
    /// daemons answer), or starts a new one (`hold`: as in [`PrivateOvs::start_holding`]).
    pub fn attach_or_start(run_dir: &Path, hold: bool) -> Result<PrivateOvs, PrivateError> {
        let answers = |f: &str| unixctl(&run_dir.join(f), "version", &[]).is_ok();
        if answers("ovsdb-server.ctl") && answers("ovs-vswitchd.ctl") {
            return Ok(PrivateOvs {
                run_dir: run_dir.into(),
                ovsdb_server: None,
                vswitchd: None,
                stop_on_drop: true,
            });
        }
        // Whatever half is left over is stopped before a clean start.
        stop_in(run_dir);
        PrivateOvs::start_with(run_dir, hold)
    }

    /// Keeps the switch running after this handle is dropped, so traffic keeps flowing and the
    /// next daemon re-attaches to it.
    pub fn leave_running(mut self) {
        self.stop_on_drop = false;
    }

    /// The `ovs-vswitchd` control socket (for `revalidator/purge`, `exit`).
    pub fn vswitchd_ctl(&self) -> PathBuf {
        self.run_dir.join("ovs-vswitchd.ctl")
    }

    pub fn db_socket(&self) -> PathBuf {
        self.run_dir.join("db.sock")
    }

    /// Where `ovs-vswitchd` puts a bridge's OpenFlow management socket.
    pub fn mgmt_socket(&self, bridge: &str) -> PathBuf {
        self.run_dir.join(format!("{bridge}.mgmt"))
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }
}

fn spawn(program: &Path, args: &[&str], run_dir: &Path) -> Result<Child, PrivateError> {
    Command::new(program)
        .args(args)
        // OVS puts its pid files, and the bridges' management sockets, in OVS_RUNDIR.
        .env("OVS_RUNDIR", run_dir)
        .env("OVS_DBDIR", run_dir)
        .env("OVS_LOGDIR", run_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| PrivateError::Spawn {
            program: program.display().to_string(),
            source,
        })
}

/// Waits up to `timeout` for `child` to exit by itself.
fn exited_within(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn stop(child: &mut Child) {
    use nix::sys::signal::{kill, Signal};
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    if !exited_within(child, Duration::from_secs(5)) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Calls one `ovs-appctl`-style command on a daemon's unixctl socket (JSON-RPC).
pub fn unixctl(socket: &Path, method: &str, params: &[&str]) -> std::io::Result<String> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let req = serde_json::json!({"method": method, "params": params, "id": 0});
    s.write_all(&serde_json::to_vec(&req).expect("json"))?;
    let mut de = serde_json::Deserializer::from_reader(s).into_iter::<serde_json::Value>();
    match de.next() {
        Some(Ok(v)) if v["error"].is_null() => {
            Ok(v["result"].as_str().unwrap_or_default().to_string())
        }
        Some(Ok(v)) => Err(std::io::Error::other(v["error"].to_string())),
        Some(Err(e)) => Err(std::io::Error::other(e)),
        // `exit` closes the connection without a reply.
        None => Ok(String::new()),
    }
}

/// The two daemons: (control socket, pid file) in the run directory.
const DAEMONS: [(&str, &str); 2] = [
    ("ovsdb-server.ctl", "ovsdb-server.pid"),
    ("ovs-vswitchd.ctl", "ovs-vswitchd.pid"),
];

/// Whether the daemon `(ctl, pidfile)` ended. A child of ours that ended is reaped here, not
/// left a zombie; one started by an earlier daemon is found by its pid file (no pid file:
/// it is asked on its control socket).
fn ended(child: &mut Option<std::process::Child>, run_dir: &Path, daemon: (&str, &str)) -> bool {
    let (ctl, pidfile) = daemon;
    match child.as_mut() {
        Some(c) => matches!(c.try_wait(), Ok(Some(_))),
        None => match read_pid(&run_dir.join(pidfile)) {
            Some(pid) => !pid_alive(pid),
            None => unixctl(&run_dir.join(ctl), "version", &[]).is_err(),
        },
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Running (not gone, and not a zombie waiting for whoever inherited it to reap it).
fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Stops a private switch found in `run_dir` by its pidfiles (whether or not we started it):
/// vswitchd first, with `exit --cleanup` so it deletes its datapath and the bridges' internal
/// interfaces, then ovsdb-server.
pub fn stop_in(run_dir: &Path) {
    use nix::sys::signal::{kill, Signal};
    for (ctl, pidfile) in [
        ("ovs-vswitchd.ctl", "ovs-vswitchd.pid"),
        ("ovsdb-server.ctl", "ovsdb-server.pid"),
    ] {
        let Some(pid) = read_pid(&run_dir.join(pidfile)).filter(|p| pid_alive(*p)) else {
            continue;
        };
        let args: &[&str] = if ctl.starts_with("ovs-vswitchd") {
            &["--cleanup"]
        } else {
            &[]
        };
        if unixctl(&run_dir.join(ctl), "exit", args).is_err() {
            let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if pid_alive(pid) {
            let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for PrivateOvs {
    fn drop(&mut self) {
        if !self.stop_on_drop {
            return;
        }
        // vswitchd first, with --cleanup: it deletes its datapath and the bridges' internal
        // interfaces, leaving nothing behind in the kernel.
        if let Some(c) = self.vswitchd.as_mut() {
            let asked = unixctl(
                &self.run_dir.join("ovs-vswitchd.ctl"),
                "exit",
                &["--cleanup"],
            );
            if asked.is_err() || !exited_within(c, Duration::from_secs(5)) {
                stop(c);
            }
        }
        if let Some(c) = self.ovsdb_server.as_mut() {
            stop(c);
        }
        if self.vswitchd.is_none() && self.ovsdb_server.is_none() {
            // Attached to a switch an earlier daemon started: stop it by its pidfiles.
            stop_in(&self.run_dir);
        }
    }
}
