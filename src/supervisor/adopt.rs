//! After a daemon (re)start: what runs is adopted, what ended meanwhile is accounted for.

use super::*;

impl Supervisor {
    /// After a daemon (re)start: adopt running containers, account for exits that happened
    /// while the daemon was away, and start what should run.
    pub(super) fn adopt_all(&mut self) {
        let names: Vec<String> = self.doc.services.keys().cloned().collect();
        // Services from before ids existed get one.
        let mut next_id = self.doc.services.values().map(|r| r.id).max().unwrap_or(0);
        for rec in self.doc.services.values_mut().filter(|r| r.id == 0) {
            next_id += 1;
            rec.id = next_id;
        }
        // Services that still run keep their flows exactly as they are (they are plugged
        // below, which finds them right and changes nothing); only the others are put into
        // their failure mode. Nothing is ever deleted and re-added.
        // Each service's main process is looked up once (a liblxc call for a container).
        let found: Vec<(String, Option<i32>)> = names
            .into_iter()
            .map(|n| {
                let pid = self.service_pid(&n);
                (n, pid)
            })
            .collect();
        for (name, init) in &found {
            if init.is_some() {
                self.open_verdict_socket(name);
            } else {
                self.register_network(name);
            }
        }
        for (name, init) in found {
            let Ok(rec) = self.record(&name) else {
                continue;
            };
            let desired = rec.desired;
            let state = rec.state;
            match init {
                Some(init_pid) => {
                    // A container's init is a child of its monitor; a VMM is its own.
                    let monitor_pid = self
                        .backend(&name)
                        .ok()
                        .and_then(|b| b.monitor_pid(&name, init_pid))
                        .unwrap_or(0);
                    let rec = self.record_mut(&name).expect("listed");
                    let started_at_ms = rec
                        .running
                        .as_ref()
                        .map(|r| r.started_at_ms)
                        .unwrap_or_else(now_ms);
                    rec.running = Some(Running {
                        monitor_pid,
                        init_pid,
                        started_at_ms,
                        boot_id: proc::boot_id(),
                    });
                    rec.state = State::Running;
                    self.watch(&name, monitor_pid, init_pid, None);
                    // It was serving before the daemon went away.
                    self.live.entry(name.clone()).or_default().said_ready = true;
                    self.plug(&name);
                    self.event(
                        EventKind::Adopted,
                        Some(&name),
                        format!("re-adopted running container, init pid {init_pid}"),
                    );
                    if desired == Desired::Stopped {
                        let _ = self.stop_service(&name, false);
                    }
                }
                None if state.is_active() && self.ended_with_previous_boot(&name) => {
                    // The gateway restarted: the service did not fail, the machine went down
                    // under it. It comes back as it was, whatever its restart policy says.
                    let exit = self.read_exit(&name);
                    let desc = exit.description.clone();
                    if let Ok(rec) = self.record_mut(&name) {
                        rec.running = None;
                        rec.last_exit = Some(exit.clone());
                        rec.state = State::Stopped;
                    }
                    self.event_exit(
                        EventKind::Exited,
                        Some(&name),
                        Some(&exit),
                        format!("{desc} (ended with the previous boot of the gateway)"),
                    );
                    if desired == Desired::Running {
                        let _ = self.start_service(&name, Op::Start);
                    }
                }
                None if state.is_active() => {
                    // It ended while we were away.
                    let exit = self.read_exit(&name);
                    let desc = exit.description.clone();
                    if let Ok(rec) = self.record_mut(&name) {
                        rec.state = State::Running;
                    }
                    self.after_end(
                        &name,
                        Some(exit),
                        format!("{desc} (while the daemon was down)"),
                        true,
                    );
                }
                None if desired == Desired::Running && state == State::Backoff => {
                    self.live.entry(name.clone()).or_default().retry_at = Some(Instant::now());
                }
                // It gave up before the restart: its slow retry goes on.
                None if desired == Desired::Running && state == State::Failed => {
                    if let Some(d) = self.settings.failed_retry {
                        self.live.entry(name.clone()).or_default().retry_at =
                            Some(Instant::now() + d);
                    }
                }
                // Installed, or stopped by a daemon shutdown with stop_services_on_exit.
                None if desired == Desired::Running
                    && matches!(state, State::Installed | State::Stopped) =>
                {
                    let _ = self.start_service(&name, Op::Start);
                }
                None => {}
            }
        }
        if let Some(net) = self.net.as_mut() {
            if let Err(e) = net.prune() {
                tracing::warn!("cannot remove the flows of services that are gone: {e}");
            }
            // A switch that had to start waited for these flows; it forwards from now on.
            if let Err(e) = net.release() {
                tracing::warn!("cannot let the switch forward: {e}");
            }
        }
        let _ = self.persist();
    }

    /// Whether `name` was last started in another boot of this machine.
    pub(super) fn ended_with_previous_boot(&self, name: &str) -> bool {
        let recorded = self
            .record(name)
            .ok()
            .and_then(|r| r.running.as_ref())
            .and_then(|r| r.boot_id.clone());
        matches!((recorded, proc::boot_id()), (Some(then), Some(now)) if then != now)
    }
}
