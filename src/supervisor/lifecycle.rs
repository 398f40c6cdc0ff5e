//! Starting, stopping and watching services on workers, and applying the restart policy.

use super::*;

impl Supervisor {
    pub(super) fn fire_timers(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .live
            .iter()
            .filter(|(_, l)| l.retry_at.is_some_and(|t| t <= now))
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let Some(l) = self.live.get_mut(&name) else {
                continue;
            };
            l.retry_at = None;
            if l.busy.is_some() {
                // It ended during an update's health check: the check's verdict decides.
                continue;
            }
            // A restart after a backoff, or the slow retry of a service that gave up.
            let still_wanted = self.doc.services.get(&name).is_some_and(|r| {
                r.desired == Desired::Running && matches!(r.state, State::Backoff | State::Failed)
            });
            if still_wanted {
                if let Ok(rec) = self.record_mut(&name) {
                    rec.restarts += 1;
                }
                let _ = self.start_service(&name, Op::Retry);
            }
        }
    }

    // ---------------------------------------------------------------- requests

    /// The process that is the running service: a container's init, or a VM's VMM.
    pub(super) fn service_pid(&self, name: &str) -> Option<i32> {
        self.backend(name).ok()?.main_pid(name)
    }

    pub(super) fn remove(&mut self, name: &str) -> Result<api::Removed> {
        if self.record(name)?.state.is_active() {
            return Err(err(
                ErrorKind::Conflict,
                format!("service {name} runs; it is stopped before it is removed"),
            ));
        }
        if let (Some(net), Some(rec)) = (self.net.as_mut(), self.doc.services.get(name)) {
            if let Err(e) = net.forget(rec.id, &veth_name(name)) {
                tracing::warn!("{name}: {e}");
            }
        }
        self.backend(name)?.undefine(name).map_err(runtime_err)?;
        let rec = self.doc.services.remove(name);
        if let Err(e) = self.persist() {
            if let Some(rec) = rec {
                self.doc.services.insert(name.to_string(), rec);
            }
            return Err(e);
        }
        self.live.remove(name);
        self.verdict_servers.remove(name);
        let _ = std::fs::remove_dir_all(self.service_run_dir(name));
        if let Err(e) = remove_service_dir(&self.service_dir(name)) {
            tracing::warn!("{name}: {}", e.message);
        }
        let _ = std::fs::remove_file(self.run_files(name).exit_file);
        // Everything the service owned goes: its versions in the image store (so the same
        // name and version installed again is that package's content, not the old one),
        // their blobs, and its logs.
        if let Err(e) = self.images.remove(name) {
            tracing::warn!("{name}: image store: {}", error_chain(&e));
        }
        self.gc_images();
        let log = self.log_file(name);
        let _ = std::fs::remove_file(&log);
        for n in 1..=self.settings.log_keep.max(1) {
            let _ = std::fs::remove_file(log.with_extension(format!("log.{n}")));
        }
        self.event(EventKind::Removed, Some(name), "removed");
        Ok(api::Removed {
            removed: name.to_string(),
        })
    }

    // ---------------------------------------------------------------- lifecycle

    /// Starts (or retries) a service on a worker; [`Msg::StartDone`] tells how it went.
    pub(super) fn start_service(&mut self, name: &str, op: Op) -> Result<()> {
        let tx = self.tx.clone();
        let backend = self.backend(name)?;
        self.mount_checkout(name)?;
        self.transition(name, op)?;
        let rec = self.record(name)?;
        let spec = StartSpec {
            argv: rec.manifest.command.clone(),
            files: self.run_files(name),
            timeout: self.settings.start_timeout,
            interface: rec.plan.port.as_ref().map(|p| p.name.clone()),
            limits: rec.plan.limits(),
            full_checksums: rec.plan.port.is_some() && self.board.profile.datapath_type == "netdev",
        };
        self.generation += 1;
        let generation = self.generation;
        let live = self.live.entry(name.to_string()).or_default();
        live.busy = Some(Busy::Starting {
            generation,
            retry: op == Op::Retry,
        });
        live.retry_at = None;
        // This run says `ready` afresh.
        live.said_ready = false;
        let n = name.to_string();
        let spawned = spawn_worker(&format!("start-{name}"), move || {
            let result = backend.start(&n, &spec);
            let _ = tx.send(Msg::StartDone {
                name: n,
                generation,
                result,
            });
        });
        if let Err(e) = spawned {
            self.live.entry(name.to_string()).or_default().busy = None;
            let reason = format!("start failed: no worker thread: {e}");
            self.after_end(name, None, reason.clone(), false);
            return Err(err(ErrorKind::Runtime, reason));
        }
        Ok(())
    }

    /// The worker `name` is busy with, if the report of `generation` is the one awaited;
    /// the service is no longer busy then.
    pub(super) fn take_busy(&mut self, name: &str, generation: u64) -> Option<Busy> {
        let live = self.live.get_mut(name)?;
        let busy = live.busy.filter(|b| b.generation() == generation)?;
        live.busy = None;
        Some(busy)
    }

    /// A start's worker is done.
    pub(super) fn on_start_done(
        &mut self,
        name: &str,
        generation: u64,
        result: std::result::Result<crate::runtime::Started, crate::runtime::RuntimeError>,
    ) {
        let Some(Busy::Starting {
            retry: restarted, ..
        }) = self.take_busy(name, generation)
        else {
            // Nobody waits for it (cannot happen while starts are queued); do not leave a
            // service running that no record watches.
            if let (Ok(started), Ok(b)) = (result, self.backend(name)) {
                tracing::warn!("{name}: a start nobody waited for ended; stopping it");
                let _ = b.kill(name);
                if let Some(mut c) = started.monitor {
                    let _ = c.wait();
                }
            }
            return;
        };
        let restarts = self.record(name).map(|r| r.restarts).unwrap_or(0);
        match result {
            Ok(started) => {
                let running = Running {
                    monitor_pid: started.monitor_pid,
                    init_pid: started.main_pid,
                    started_at_ms: now_ms(),
                    boot_id: proc::boot_id(),
                };
                if self.transition(name, Op::Started).is_ok() {
                    if let Ok(rec) = self.record_mut(name) {
                        rec.running = Some(running);
                    }
                    self.watch(name, started.monitor_pid, started.main_pid, started.monitor);
                    self.plug(name);
                    let _ = self.persist();
                    self.event(
                        if restarted {
                            EventKind::Restarted
                        } else {
                            EventKind::Started
                        },
                        Some(name),
                        format!("init pid {}, restarts {restarts}", started.main_pid),
                    );
                }
            }
            Err(e) => {
                let reason = format!("start failed: {}", error_chain(&e));
                self.after_end(name, None, reason.clone(), false);
                let _ = self.persist();
                self.live.entry(name.to_string()).or_default().error =
                    Some(err(ErrorKind::Runtime, reason));
            }
        }
        self.settle(name);
    }

    /// Starts a watcher thread for the monitor `pid`.
    /// Watches the monitor `pid` (the service's lifecycle) and the container's `init_pid` (the
    /// earliest sign of its death, for failing its traffic over).
    pub(super) fn watch(&mut self, name: &str, pid: i32, init_pid: i32, child: Option<Child>) {
        self.generation += 1;
        let generation = self.generation;
        let live = self.live.entry(name.to_string()).or_default();
        live.generation = generation;
        live.child = child;
        live.retry_at = None;
        live.heartbeat_since = Some(Instant::now());
        let pidfd = match proc::pidfd_open(pid) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!("cannot watch monitor {pid} of {name}: {e}");
                let _ = self.tx.send(Msg::MonitorExited {
                    name: name.into(),
                    generation,
                });
                return;
            }
        };
        let watcher_fd = pidfd.try_clone();
        live.pidfd = Some(pidfd);
        let init_fd = proc::pidfd_open(init_pid).ok();
        let tx = self.tx.clone();
        let name = name.to_string();
        let spawned = watcher_fd.map(|fd| {
            std::thread::Builder::new()
                .name(format!("watch-{name}"))
                .stack_size(64 * 1024)
                .spawn(move || {
                    if let Some(init_fd) = init_fd {
                        if proc::wait_either(&init_fd, &fd) {
                            let _ = tx.send(Msg::InitExited {
                                name: name.clone(),
                                generation,
                            });
                        }
                    }
                    proc::wait_pidfd(&fd, None);
                    let _ = tx.send(Msg::MonitorExited { name, generation });
                })
        });
        if !matches!(spawned, Ok(Ok(_))) {
            tracing::error!("cannot start a watcher thread; exits of this service will be missed");
        }
    }

    /// The monitor of `name` exited without being asked to.
    pub(super) fn on_exit(&mut self, name: &str, generation: u64) {
        let Some(live) = self.live.get_mut(name) else {
            return;
        };
        if live.generation != generation {
            return;
        }
        live.generation = 0;
        live.pidfd = None;
        let status = live.child.take().and_then(|mut c| c.wait().ok());
        let Ok(rec) = self.record(name) else { return };
        if !rec.state.is_active() {
            return;
        }
        // Its traffic first: fail open (or closed) before anything else.
        self.unplug(name);
        self.release_port(name);
        let mut exit = self.read_exit(name);
        if let (None, None, Some(sig)) = (
            exit.code,
            exit.signal,
            status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s)),
        ) {
            // A VMM killed by a signal had no chance to write its record.
            exit.signal = Some(sig);
            exit.description = format!("killed by signal {sig}");
        }
        let desc = exit.description.clone();
        self.after_end(name, Some(exit), desc, true);
        let _ = self.persist();
    }

    pub(super) fn read_exit(&self, name: &str) -> LastExit {
        match lxc::monitor::read_exit_record(&self.run_files(name).exit_file) {
            Some(r) => LastExit {
                code: r.code,
                signal: r.signal,
                at_ms: now_ms(),
                description: r.describe(),
            },
            // A monitor records the end as the service ends; no record means the monitor
            // itself was killed (a VMM: by a signal a restarted daemon, not being its parent,
            // cannot learn). The backend says how to tell it.
            None => LastExit {
                code: None,
                signal: None,
                at_ms: now_ms(),
                description: self
                    .backend(name)
                    .map(|b| b.unrecorded_end())
                    .unwrap_or("its monitor process ended without an exit record")
                    .into(),
            },
        }
    }

    /// Applies the restart policy ([`crate::lifecycle::decide`]) after the program ended
    /// (`exit`) or failed to start.
    pub(super) fn after_end(
        &mut self,
        name: &str,
        exit: Option<LastExit>,
        reason: String,
        was_running: bool,
    ) {
        use crate::lifecycle::{decide, Decision, Ended};
        let Ok(rec) = self.record_mut(name) else {
            return;
        };
        let ran_ms = rec
            .running
            .as_ref()
            .map(|r| now_ms().saturating_sub(r.started_at_ms))
            .unwrap_or(0);
        rec.running = None;
        if exit.is_some() {
            rec.last_exit = exit.clone();
        }
        let policy = rec.manifest.restart.clone();
        let decision = decide(
            &policy,
            Ended {
                wanted: rec.desired == Desired::Running,
                clean: exit.as_ref().is_some_and(|e| e.code == Some(0)),
                ran: Duration::from_millis(ran_ms),
                failures_before: rec.consecutive_failures,
            },
        );
        if was_running {
            self.event_exit(EventKind::Exited, Some(name), exit.as_ref(), reason.clone());
        }
        // A service that gives up is tried again later, on a slow schedule.
        let slow_retry = self
            .settings
            .failed_retry
            .filter(|_| decision == Decision::GiveUp);
        if let Some(d) = slow_retry {
            self.live.entry(name.to_string()).or_default().retry_at = Some(Instant::now() + d);
        }
        let Ok(rec) = self.record_mut(name) else {
            return;
        };
        match decision {
            Decision::StayStopped => {
                rec.desired = Desired::Stopped;
                let _ = rec.state.apply(Op::Exited).map(|s| rec.state = s);
                self.event(
                    EventKind::Stopped,
                    Some(name),
                    "ended; restart policy does not restart it",
                );
            }
            Decision::Fail | Decision::GiveUp => {
                let why = if decision == Decision::Fail {
                    format!("{reason}; restart policy is {:?}", policy.policy)
                } else {
                    let again = slow_retry
                        .map(|d| format!("; trying again in {} s", d.as_secs()))
                        .unwrap_or_default();
                    format!(
                        "{reason}; gave up after {} restarts in a row{again}",
                        policy.max_retries
                    )
                };
                if decision == Decision::GiveUp {
                    rec.consecutive_failures += 1;
                }
                rec.failure_reason = Some(why.clone());
                let _ = rec.state.apply(Op::GiveUp).map(|s| rec.state = s);
                self.event(EventKind::Failed, Some(name), why);
            }
            Decision::Retry { failures, delay } => {
                rec.consecutive_failures = failures;
                let _ = rec.state.apply(Op::Crashed).map(|s| rec.state = s);
                self.live.entry(name.to_string()).or_default().retry_at =
                    Some(Instant::now() + delay);
                tracing::info!(
                    "{name}: restart {failures} of {} in {delay:?}",
                    policy.max_retries
                );
            }
        }
    }

    /// Stops a service (if it runs) on a worker; [`Msg::StopDone`] tells when it ended.
    /// `by_request` records that the user wants it stopped.
    pub(super) fn stop_service(&mut self, name: &str, by_request: bool) -> Result<()> {
        let tx = self.tx.clone();
        let backend = self.backend(name)?;
        let rec = self.record_mut(name)?;
        if by_request {
            rec.desired = Desired::Stopped;
        }
        let timeout = Duration::from_secs(rec.manifest.stop_timeout_s as u64);
        let state = rec.state;
        match state {
            State::Backoff => {
                self.transition(name, Op::Stop)?;
                if let Some(l) = self.live.get_mut(name) {
                    l.retry_at = None;
                }
            }
            State::Starting | State::Stopping
                if self.live.get(name).is_some_and(|l| l.busy.is_some()) =>
            {
                return Err(err(
                    ErrorKind::Conflict,
                    format!("service {name} is {:?}", self.record(name)?.state),
                ));
            }
            State::Starting | State::Running | State::Updating | State::Stopping => {
                if state != State::Stopping {
                    self.transition(name, Op::Stop)?;
                }
                // Its traffic fails over before the service goes away.
                self.unplug(name);
                // The exit that follows is ours: the watcher's report is ignored.
                self.generation += 1;
                let generation = self.generation;
                let live = self.live.entry(name.to_string()).or_default();
                live.generation = generation;
                live.busy = Some(Busy::Stopping(generation));
                let pidfd = live.pidfd.take();
                let child = live.child.take();
                let n = name.to_string();
                let spawned = spawn_worker(&format!("stop-{name}"), move || {
                    let result = backend.stop(&n, timeout);
                    if let Some(fd) = &pidfd {
                        proc::wait_pidfd(fd, Some(Duration::from_secs(10)));
                    }
                    if let Some(mut child) = child {
                        let _ = child.wait();
                    }
                    let _ = tx.send(Msg::StopDone {
                        name: n,
                        generation,
                        result,
                    });
                });
                if let Err(e) = spawned {
                    self.live.entry(name.to_string()).or_default().busy = None;
                    return Err(err(
                        ErrorKind::Runtime,
                        format!("cannot stop {name}: no worker thread: {e}"),
                    ));
                }
            }
            _ => {}
        }
        self.persist()
    }

    /// A stop's worker is done.
    pub(super) fn on_stop_done(
        &mut self,
        name: &str,
        generation: u64,
        result: std::result::Result<crate::runtime::Stopped, crate::runtime::RuntimeError>,
    ) {
        if self.take_busy(name, generation).is_none() {
            return;
        }
        match result {
            Ok(how) => {
                self.release_port(name);
                let exit = self.read_exit(name);
                if let Ok(rec) = self.record_mut(name) {
                    rec.running = None;
                    rec.last_exit = Some(exit.clone());
                }
                let _ = self.transition(name, Op::Exited);
                self.event_exit(
                    EventKind::Stopped,
                    Some(name),
                    Some(&exit),
                    format!("stopped ({how:?}): {}", exit.description),
                );
            }
            Err(e) => {
                // It still runs: watch it again as it is.
                let why = format!("cannot stop {name}: {}", error_chain(&e));
                tracing::warn!("{why}");
                let main = self.service_pid(name);
                let _ = self.transition(
                    name,
                    if main.is_some() {
                        Op::Adopted
                    } else {
                        Op::Exited
                    },
                );
                if let Some(main) = main {
                    let monitor = self
                        .backend(name)
                        .ok()
                        .and_then(|b| b.monitor_pid(name, main))
                        .unwrap_or(main);
                    self.watch(name, monitor, main, None);
                    self.plug(name);
                }
                self.live.entry(name.to_string()).or_default().error =
                    Some(err(ErrorKind::Runtime, why));
            }
        }
        let _ = self.persist();
        self.settle(name);
    }
}

/// The start or stop a worker runs for a service; the number tells the worker's report from
/// an older one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Busy {
    /// `retry`: a restart under the restart policy (its event says so).
    Starting {
        generation: u64,
        retry: bool,
    },
    Stopping(u64),
    /// An update's health check.
    Checking(u64),
}

/// Runs `f` on a thread of its own (a start, stop or check that may block for its timeout).
pub(super) fn spawn_worker(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.chars().take(15).collect())
        .stack_size(256 * 1024)
        .spawn(f)
}

impl Busy {
    /// The number of the worker's report (unique across all workers).
    fn generation(self) -> u64 {
        match self {
            Busy::Starting { generation, .. }
            | Busy::Stopping(generation)
            | Busy::Checking(generation) => generation,
        }
    }
}

/// `initial * 2^(n-1)`, capped at `max`.
pub fn backoff(initial_ms: u64, max_ms: u64, n: u32) -> Duration {
    let factor = 1u64.checked_shl(n.saturating_sub(1)).unwrap_or(u64::MAX);
    Duration::from_millis(initial_ms.saturating_mul(factor).min(max_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_caps() {
        let b: Vec<u64> = (1..=6)
            .map(|n| backoff(200, 3000, n).as_millis() as u64)
            .collect();
        assert_eq!(b, [200, 400, 800, 1600, 3000, 3000]);
        assert_eq!(backoff(200, 3000, 200).as_millis(), 3000);
    }
}
