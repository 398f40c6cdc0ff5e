//! After a daemon (re)start: what runs is adopted, what ended meanwhile is accounted for.

use super::*;

/// What the daemon does, at its start, with a service it has a record of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Adoption {
    /// Its process runs: watched and plugged again as it is; stopped when it is wanted
    /// stopped.
    Adopt {
        then_stop: bool,
    },
    /// It went down with the previous boot of the gateway: that is no failure; it is stopped,
    /// and started again when it is wanted running.
    Rebooted {
        start: bool,
    },
    /// It ended while the daemon was away, in this boot: its restart policy decides.
    EndedWhileAway,
    /// Its backoff was running: it retries now.
    RetryNow,
    /// It had given up: its slow retry goes on (when the daemon has one).
    RetryLater,
    /// Wanted running, and not running: installed, or stopped by a daemon shutdown.
    Start,
    Nothing,
}

/// The adoption decision, a pure function of what was recorded and what was found:
/// `running` (its main process exists), `previous_boot` (an active service's process
/// ended with the previous boot) and whether the daemon retries failed services.
pub(super) fn adoption(
    running: bool,
    state: State,
    desired: Desired,
    previous_boot: bool,
    slow_retry: bool,
) -> Adoption {
    let wanted = desired == Desired::Running;
    match state {
        _ if running => Adoption::Adopt { then_stop: !wanted },
        s if s.is_active() && previous_boot => Adoption::Rebooted { start: wanted },
        s if s.is_active() => Adoption::EndedWhileAway,
        State::Backoff if wanted => Adoption::RetryNow,
        State::Failed if wanted && slow_retry => Adoption::RetryLater,
        State::Installed | State::Stopped if wanted => Adoption::Start,
        _ => Adoption::Nothing,
    }
}

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
            let (desired, state) = (rec.desired, rec.state);
            let previous_boot =
                init.is_none() && state.is_active() && self.ended_with_previous_boot(&name);
            let slow_retry = self.settings.failed_retry.is_some();
            match adoption(init.is_some(), state, desired, previous_boot, slow_retry) {
                Adoption::Adopt { then_stop } => {
                    let init_pid = init.expect("found running");
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
                    let _ = self.transition(&name, Op::Adopted);
                    self.watch(&name, monitor_pid, init_pid, None);
                    // It was serving before the daemon went away.
                    self.live.entry(name.clone()).or_default().said_ready = true;
                    self.plug(&name);
                    self.event(
                        EventKind::Adopted,
                        Some(&name),
                        format!("re-adopted running container, init pid {init_pid}"),
                    );
                    if then_stop {
                        let _ = self.stop_service(&name, false);
                    }
                }
                Adoption::Rebooted { start } => {
                    // The gateway restarted: the service did not fail, the machine went down
                    // under it. It comes back as it was, whatever its restart policy says.
                    let exit = self.read_exit(&name);
                    let desc = exit.description.clone();
                    if let Ok(rec) = self.record_mut(&name) {
                        rec.running = None;
                        rec.last_exit = Some(exit.clone());
                    }
                    let _ = self.transition(&name, Op::Exited);
                    self.event_exit(
                        EventKind::Exited,
                        Some(&name),
                        Some(&exit),
                        format!("{desc} (ended with the previous boot of the gateway)"),
                    );
                    if start {
                        let _ = self.start_service(&name, Op::Start);
                    }
                }
                Adoption::EndedWhileAway => {
                    // Accounted for as an end seen now: its restart policy decides.
                    let exit = self.read_exit(&name);
                    let desc = exit.description.clone();
                    let _ = self.transition(&name, Op::Adopted);
                    self.after_end(
                        &name,
                        Some(exit),
                        format!("{desc} (while the daemon was down)"),
                        true,
                    );
                }
                Adoption::RetryNow => {
                    self.live.entry(name.clone()).or_default().retry_at = Some(Instant::now());
                }
                Adoption::RetryLater => {
                    if let Some(d) = self.settings.failed_retry {
                        self.live.entry(name.clone()).or_default().retry_at =
                            Some(Instant::now() + d);
                    }
                }
                Adoption::Start => {
                    let _ = self.start_service(&name, Op::Start);
                }
                Adoption::Nothing => {}
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

#[cfg(test)]
mod tests {
    use super::*;
    use Adoption::*;

    #[test]
    fn adoption_is_decided_by_what_was_recorded_and_what_was_found() {
        use State::*;
        let (run, stop) = (Desired::Running, Desired::Stopped);
        // (found running, state, desired, ended with the previous boot, slow retry) → what
        for (running, state, desired, prev_boot, slow, want) in [
            // A process runs: adopted whatever was recorded, stopped if unwanted.
            (true, Running, run, false, false, Adopt { then_stop: false }),
            (
                true,
                Starting,
                run,
                false,
                false,
                Adopt { then_stop: false },
            ),
            (true, Stopped, run, false, false, Adopt { then_stop: false }),
            (true, Running, stop, false, false, Adopt { then_stop: true }),
            // Active when the daemon went away, gone now: the reboot is no failure...
            (false, Running, run, true, false, Rebooted { start: true }),
            (
                false,
                Stopping,
                stop,
                true,
                false,
                Rebooted { start: false },
            ),
            // ...an end in this boot is one, for the restart policy.
            (false, Running, run, false, false, EndedWhileAway),
            (false, Starting, run, false, true, EndedWhileAway),
            (false, Stopping, stop, false, false, EndedWhileAway),
            // Waiting to retry: now; given up: later, if the daemon retries failed ones.
            (false, Backoff, run, false, false, RetryNow),
            (false, Backoff, stop, false, false, Nothing),
            (false, Failed, run, false, true, RetryLater),
            (false, Failed, run, false, false, Nothing),
            // Wanted and never started, or stopped by a daemon shutdown: started.
            (false, Installed, run, false, false, Start),
            (false, Stopped, run, false, false, Start),
            (false, Stopped, stop, false, false, Nothing),
            (false, Installed, stop, false, false, Nothing),
        ] {
            assert_eq!(
                adoption(running, state, desired, prev_boot, slow),
                want,
                "{running} {state:?} {desired:?} {prev_boot} {slow}"
            );
        }
    }
}
