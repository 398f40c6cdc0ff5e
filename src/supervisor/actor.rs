//! The actor loop: messages in (requests, workers' reports, exits, timers), replies out; and
//! the requests the loop answers itself.

use super::*;

/// How long the loop is quiet before freed memory goes back to the system.
const IDLE_TRIM: Duration = Duration::from_secs(2);

/// Returns the allocator's free pages (in every arena, not only at the heap's top) to the
/// system: a gateway daemon that idles for days should not hold the peak of its last install.
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists (under its locks) and
    // advises the kernel about pages no allocation uses; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl Supervisor {
    /// Re-adopts what survived a daemon restart, then serves messages until shutdown.
    pub fn run(mut self, rx: Receiver<Msg>, notifier: Option<Notifier>) {
        self.adopt_all();
        if let Some(net) = &self.net {
            let tx = self.tx.clone();
            let watched = net.spawn_port_monitor(move |change| {
                let port = match change {
                    flowbridge::ovsdb::PortChange::Gone(p)
                    | flowbridge::ovsdb::PortChange::Broken(p) => p,
                };
                !port.starts_with("gv-") || tx.send(Msg::PortLost { port }).is_ok()
            });
            if let Err(e) = watched {
                tracing::warn!("cannot monitor the bridge's ports: {e}");
            }
        }
        self.watch_switch();
        self.event(
            EventKind::DaemonStarted,
            None,
            format!("gatevisor {} ready", env!("CARGO_PKG_VERSION")),
        );
        if let Some(n) = &notifier {
            n.ready(&format!("{} services", self.doc.services.len()));
        }
        let ping_every = notifier
            .as_ref()
            .and_then(|n| n.watchdog)
            .map(|w| w / 2)
            .unwrap_or(Duration::from_secs(3600));
        let mut last_ping = Instant::now();
        let mut last_net_check = Instant::now();
        const NET_CHECK: Duration = Duration::from_secs(1);
        // Memory freed after a burst of work (an install's buffers, a worker's stack) is
        // handed back to the system once the loop has been quiet for IDLE_TRIM.
        let mut last_msg = Instant::now();
        let mut trimmed = false;
        loop {
            let now = Instant::now();
            let next_timer = self.live.values().filter_map(|l| l.retry_at).min();
            let mut wait = next_timer
                .map(|t| t.saturating_duration_since(now))
                .unwrap_or(ping_every)
                .min(ping_every.saturating_sub(now - last_ping));
            if self.net.is_some() {
                wait = wait.min(NET_CHECK.saturating_sub(now - last_net_check));
            }
            if let Some(due) = self.heartbeat_due {
                wait = wait.min(due.saturating_duration_since(now));
            }
            if !trimmed {
                wait = wait.min(IDLE_TRIM.saturating_sub(now - last_msg));
            }
            let msg = rx.recv_timeout(wait);
            if let Some(n) = &notifier {
                if last_ping.elapsed() >= ping_every {
                    n.watchdog_ping();
                    last_ping = Instant::now();
                }
            }
            match msg {
                Ok(msg) => {
                    last_msg = Instant::now();
                    trimmed = false;
                    if !self.dispatch(msg) {
                        break;
                    }
                }
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            if !trimmed && last_msg.elapsed() >= IDLE_TRIM {
                release_free_memory();
                trimmed = true;
            }
            self.fire_timers();
            if last_net_check.elapsed() >= NET_CHECK {
                last_net_check = Instant::now();
                self.check_network();
                self.check_heartbeats();
            } else if self.heartbeat_due.is_some_and(|d| Instant::now() >= d) {
                self.check_heartbeats();
            }
        }
        if let Some(n) = &notifier {
            n.stopping();
        }
        self.shutdown(&rx);
    }

    /// Handles one message; `false` once the daemon must stop.
    pub(crate) fn dispatch(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Request(
                Request::Install {
                    manifest,
                    start,
                    runtime,
                },
                reply,
            ) => {
                let res = if is_package(&manifest) {
                    Err(err(
                        ErrorKind::Invalid,
                        format!(
                            "{} is a signed package, not a service manifest: install it as a package",
                            manifest.display()
                        ),
                    ))
                } else {
                    self.install(&manifest, start, None, runtime, None)
                };
                if let Err(e) = &res {
                    self.refused(&manifest.display().to_string(), e);
                }
                self.answer_install(res, start, reply);
            }
            Msg::Request(
                Request::InstallImage {
                    image,
                    manifest,
                    start,
                    runtime,
                    deployment,
                },
                reply,
            ) => {
                let res = self.image_for_install(&image).and_then(|rec| {
                    let who = match &deployment {
                        Some(d) => Some(self.deployment_requester(&rec, &manifest, d)?),
                        None => None,
                    };
                    self.install(&manifest, start, None, runtime, Some((&rec, who)))
                });
                if let Err(e) = &res {
                    self.refused(&format!("{} with image {image}", manifest.display()), e);
                }
                self.answer_install(res, start, reply);
            }
            Msg::Request(
                Request::ImagePull {
                    reference,
                    signature,
                },
                reply,
            ) => self.begin_image_pull(reference, signature, reply),
            Msg::ImagePulled {
                reference,
                result,
                reply,
            } => self.on_image_pulled(&reference, result, reply),
            Msg::Request(
                Request::InstallPackage {
                    package,
                    start,
                    runtime,
                },
                reply,
            ) => self.begin_install_package(package, start, runtime, reply),
            Msg::PackageReady {
                name,
                start,
                runtime,
                pkg,
                result,
                reply,
            } => {
                self.installing.remove(&name);
                let res = result.and_then(|p| self.finish_install_package(&pkg, start, runtime, p));
                self.reserved_ids.remove(&name);
                if let Err(e) = &res {
                    self.refused(&pkg.display().to_string(), e);
                }
                self.answer_install(res, start, reply);
            }
            Msg::Request(Request::Start { name }, reply) => {
                self.enqueue(&name, vec![Step::Start], Some(reply))
            }
            Msg::Request(Request::Exec { name, argv }, reply) => self.exec(name, argv, reply),
            Msg::Request(Request::Stop { name }, reply) => {
                // Wanted stopped from now on: a start in flight that fails is not retried.
                if let Ok(rec) = self.record_mut(&name) {
                    rec.desired = Desired::Stopped;
                }
                self.enqueue(&name, vec![Step::Stop { by_request: true }], Some(reply))
            }
            Msg::Request(Request::Restart { name }, reply) => self.enqueue(
                &name,
                vec![Step::Stop { by_request: true }, Step::Start],
                Some(reply),
            ),
            Msg::Request(Request::Remove { name }, reply) => self.enqueue(
                &name,
                vec![Step::Stop { by_request: false }, Step::Remove(reply)],
                None,
            ),
            Msg::Request(Request::Update { name, package }, reply) => {
                self.begin_update(&name, &package, reply)
            }
            Msg::Request(Request::Rollback { name }, reply) => self.begin_rollback(&name, reply),
            Msg::Request(req, reply) => {
                let _ = reply.send(match self.handle(req) {
                    Ok(result) => Reply::Ok { result },
                    Err(error) => Reply::Error { error },
                });
            }
            Msg::StartDone {
                name,
                generation,
                result,
            } => self.on_start_done(&name, generation, result),
            Msg::StopDone {
                name,
                generation,
                result,
            } => self.on_stop_done(&name, generation, result),
            Msg::Checked {
                name,
                generation,
                result,
            } => self.on_checked(&name, generation, result),
            Msg::UpdateReady {
                name,
                pkg,
                old_version,
                result,
                reply,
            } => self.on_update_ready(&name, &pkg, old_version, result, reply),
            Msg::Follow(tx) => self.events.follow(tx),
            Msg::MonitorExited { name, generation } => self.on_exit(&name, generation),
            Msg::InitExited { name, generation } => {
                let current = self
                    .live
                    .get(&name)
                    .is_some_and(|l| l.generation == generation);
                if current && self.record(&name).is_ok_and(|r| r.state.runs()) {
                    self.unplug(&name);
                    self.release_port(&name);
                }
            }
            Msg::PortLost { port } => self.on_port_lost(&port),
            Msg::HostCalled {
                name,
                call,
                refused,
                micros,
            } => self.audit_host_call(&name, &call, refused, micros),
            Msg::Ready { name } => self.on_ready(&name),
            Msg::Verdict {
                name,
                session,
                allow,
                reply,
            } => {
                let _ = reply.send(self.verdict(&name, &session, allow));
            }
            Msg::NetworkChecked { net, result } => self.on_network_checked(*net, result),
            Msg::SwitchEnded => {
                self.switch_watched.clear();
                self.check_network();
            }
            Msg::Shutdown => return false,
        }
        true
    }

    /// Every refused install or update is an event: what it was, and why (the reason names
    /// it already, or is prefixed with it).
    pub(super) fn refused(&mut self, what: &str, e: &ApiError) {
        let detail = if e.message.starts_with(what) {
            e.message.clone()
        } else {
            format!("{what}: {}", e.message)
        };
        self.event(EventKind::Refused, None, detail);
    }

    /// Answers a request; an install that asked for a start answers once the start ended.
    fn answer_install(
        &mut self,
        res: Result<api::ServiceStatus>,
        start: bool,
        reply: Sender<Reply>,
    ) {
        match res {
            Ok(st) if start => self.enqueue(&st.name, vec![Step::Start], Some(reply)),
            res => {
                let _ = reply.send(match res.and_then(|st| api::to_result(&st)) {
                    Ok(result) => Reply::Ok { result },
                    Err(error) => Reply::Error { error },
                });
            }
        }
    }

    /// Serves the workers' reports until no start or stop is in flight (or `within` passed);
    /// requests meanwhile are refused.
    fn drain(&mut self, rx: &Receiver<Msg>, within: Duration) {
        let deadline = Instant::now() + within;
        while self.live.values().any(|l| l.busy.is_some()) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("stopping with starts or stops still in flight");
                return;
            }
            match rx.recv_timeout(left) {
                Ok(Msg::Request(_, reply)) => {
                    let _ = reply.send(Reply::Error {
                        error: err(ErrorKind::Conflict, "the daemon is stopping"),
                    });
                }
                Ok(
                    m @ (Msg::StartDone { .. }
                    | Msg::StopDone { .. }
                    | Msg::Checked { .. }
                    | Msg::UpdateReady { .. }
                    | Msg::MonitorExited { .. }
                    | Msg::PackageReady { .. }),
                ) => {
                    self.dispatch(m);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }

    fn shutdown(&mut self, rx: &Receiver<Msg>) {
        // Starts in flight end first: what they start is then recorded (and stopped, or
        // left running, with the rest).
        let longest_stop = self
            .doc
            .services
            .values()
            .map(|r| Duration::from_secs(r.manifest.stop_timeout_s as u64))
            .max()
            .unwrap_or_default();
        self.drain(
            rx,
            self.settings.start_timeout + longest_stop + Duration::from_secs(20),
        );
        let names: Vec<String> = self.doc.services.keys().cloned().collect();
        if self.settings.stop_services_on_exit {
            for name in &names {
                if let Some(l) = self.live.get_mut(name) {
                    l.queue.clear();
                }
                let _ = self.stop_service(name, false);
            }
            self.drain(rx, longest_stop + Duration::from_secs(20));
            self.event(
                EventKind::DaemonStopping,
                None,
                "stopping; services stopped",
            );
        } else {
            self.event(
                EventKind::DaemonStopping,
                None,
                "stopping; services left running",
            );
        }
        // Reap our monitor children's zombies later: they keep running in their own sessions
        // and are re-parented when we exit.
        let _ = self.persist();
        // The private switch stays up only while services it carries stay up.
        let services_left_running = !self.settings.stop_services_on_exit
            && self.doc.services.values().any(|r| r.state.is_active());
        if let Some(net) = self.net.take() {
            net.shutdown(services_left_running);
        }
    }

    /// Runs a command in a running service on a worker, which answers with its exit code
    /// (a command may take its time; the loop does not wait for it).
    fn exec(&mut self, name: String, argv: Vec<String>, reply: Sender<Reply>) {
        let ready = self
            .require_running(&name)
            .and_then(|()| self.backend(&name))
            .and_then(|b| {
                if argv.first().is_none_or(|a| a.is_empty()) {
                    return Err(err(ErrorKind::Invalid, "exec needs a command to run"));
                }
                Ok(b)
            });
        let backend = match ready {
            Ok(b) => b,
            Err(error) => {
                let _ = reply.send(Reply::Error { error });
                return;
            }
        };
        let answer = reply.clone();
        let spawned = spawn_worker(&format!("exec-{name}"), move || {
            let result = backend
                .exec(&name, &argv)
                .map_err(|e| err(ErrorKind::Runtime, error_chain(&e)))
                .and_then(|exit_code| {
                    api::to_result(&api::Executed {
                        service: name,
                        exit_code,
                    })
                });
            let _ = answer.send(match result {
                Ok(result) => Reply::Ok { result },
                Err(error) => Reply::Error { error },
            });
        });
        if let Err(e) = spawned {
            let _ = reply.send(Reply::Error {
                error: err(ErrorKind::Runtime, format!("no worker thread: {e}")),
            });
        }
    }

    pub fn handle(&mut self, req: Request) -> Result<serde_json::Value> {
        match req {
            Request::Ping => Ok(json!({"pong": true, "version": env!("CARGO_PKG_VERSION")})),
            // The loop answers installs itself (a package's on a worker).
            Request::ImageList => self.image_list(),
            Request::ImageRemove { image } => self.image_remove(&image),
            Request::Install { .. }
            | Request::InstallPackage { .. }
            | Request::InstallImage { .. }
            | Request::ImagePull { .. } => Err(err(
                ErrorKind::Internal,
                "installs are answered by the loop, not in handle()",
            )),
            // Starts and stops run on workers, their answers queued behind them (dispatch).
            Request::Start { .. }
            | Request::Stop { .. }
            | Request::Restart { .. }
            | Request::Remove { .. }
            | Request::Update { .. }
            | Request::Rollback { .. } => Err(err(
                ErrorKind::Internal,
                "starts and stops are queued by the loop, not run in handle()",
            )),
            Request::Exec { .. } => Err(err(
                ErrorKind::Internal,
                "an exec runs on a worker, not in handle()",
            )),
            Request::Freeze { name } => {
                self.require_running(&name)?;
                self.backend(&name)?.pause(&name).map_err(runtime_err)?;
                self.status_result(&name)
            }
            Request::Thaw { name } => {
                self.require_running(&name)?;
                self.backend(&name)?.resume(&name).map_err(runtime_err)?;
                self.status_result(&name)
            }
            Request::List => {
                let names: Vec<String> = self.doc.services.keys().cloned().collect();
                let mut services = Vec::new();
                for n in &names {
                    services.extend(self.status(n).ok());
                }
                api::to_result(&api::ServiceList { services })
            }
            Request::Status { name } => self.status_result(&name),
            Request::Logs {
                name,
                offset,
                tail_bytes,
            } => self
                .logs(&name, offset, tail_bytes)
                .and_then(|l| api::to_result(&l)),
            Request::Events { last, .. } => api::to_result(&api::Events {
                events: self.events.last(last),
            }),
            Request::Flows => self.flows().and_then(|f| api::to_result(&f)),
            Request::ConfigGet { name } => self.config_get(&name).and_then(|c| api::to_result(&c)),
            Request::ConfigSet {
                name,
                values,
                dry_run,
            } => self
                .config_set(&name, &values, dry_run)
                .and_then(|c| api::to_result(&c)),
        }
    }

    fn require_running(&self, name: &str) -> Result<()> {
        let rec = self.record(name)?;
        if !rec.state.runs() {
            return Err(err(
                ErrorKind::Conflict,
                format!("service {name} is {:?}, not running", rec.state),
            ));
        }
        Ok(())
    }
}
