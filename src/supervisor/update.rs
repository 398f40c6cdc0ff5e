//! Updates and rollbacks of packaged services, and the health check that judges them.
//!
//! A switch of versions is a chain of the service's steps ([`Step`]): stop, switch (rebuild
//! from the new version, start), check (its health check on a worker), judge (keep it, or
//! go back to the version that worked, which is the same chain again). The stop, the start
//! and the check run on workers: the loop serves everything else meanwhile, and requests for
//! the same service queue behind the chain.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::*;

/// Why a service switches versions: what is recorded and answered at the end.
pub(super) enum Why {
    Update {
        old_version: String,
        pkg: PathBuf,
    },
    Rollback,
    /// Back to the version that worked, after an update failed (`detail` says how).
    Restore {
        detail: String,
    },
}

/// A switch to `inst`, and who waits for its outcome.
pub(super) struct Switch {
    pub(super) inst: gatevisor_images::store::Installed,
    pub(super) why: Why,
    pub(super) reply: Sender<Reply>,
}

impl Supervisor {
    /// Replaces a packaged service with a new version from `pkg`; if the new version does not
    /// pass its health check, the previous one is restored by itself. The package is verified
    /// and its tree given to the container on a worker ([`Msg::UpdateReady`]); the switch then runs as the
    /// service's steps. Answers on `reply` once the chain ends.
    pub(super) fn begin_update(&mut self, name: &str, pkg: &Path, reply: Sender<Reply>) {
        let old_version = match self.check_update(name, pkg) {
            Ok(v) => v,
            Err(e) => return self.refuse_update(name, pkg, e, reply),
        };
        let Ok((runtime, id)) = self.record(name).map(|r| (r.plan.runtime, r.id)) else {
            return;
        };
        let owner = (runtime == Kind::Lxc).then(|| idmap_for(id).host_base);
        self.installing.insert(name.to_string());
        let images = self.images.clone();
        let policy = self.settings.policy.clone();
        let board = self.board.clone();
        let tx = self.tx.clone();
        let (n, p) = (name.to_string(), pkg.to_path_buf());
        let spawned = spawn_worker(&format!("update-{name}"), move || {
            let target = Target {
                runtime: Some(runtime),
                owner,
            };
            let result = prepare_package(&images, &policy, &board, &p, &n, target);
            let _ = tx.send(Msg::UpdateReady {
                name: n,
                pkg: p,
                old_version,
                result,
                reply,
            });
        });
        if let Err(e) = spawned {
            self.installing.remove(name);
            tracing::error!("cannot start an update worker: {e}");
        }
    }

    /// An update's worker is done: switch to the verified version, or answer why not.
    pub(super) fn on_update_ready(
        &mut self,
        name: &str,
        pkg: &Path,
        old_version: String,
        result: Result<Prepared>,
        reply: Sender<Reply>,
    ) {
        self.installing.remove(name);
        let prepared = match result {
            Ok(p) => p,
            Err(e) => return self.refuse_update(name, pkg, e, reply),
        };
        let sw = Switch {
            inst: prepared.installed,
            why: Why::Update {
                old_version: old_version.clone(),
                pkg: pkg.to_path_buf(),
            },
            reply,
        };
        if sw.inst.version == old_version {
            let e = err(
                ErrorKind::Conflict,
                format!("{name} already runs version {old_version}"),
            );
            return self.refuse_update(name, pkg, e, sw.reply);
        }
        self.enqueue(
            name,
            vec![Step::Stop { by_request: false }, Step::Switch(Box::new(sw))],
            None,
        );
    }

    fn refuse_update(&mut self, name: &str, pkg: &Path, e: ApiError, reply: Sender<Reply>) {
        self.refused(&format!("{name} from {}", pkg.display()), &e);
        let _ = reply.send(Reply::Error { error: e });
    }

    /// The checks of an update that need no unpacking; the version it replaces.
    fn check_update(&self, name: &str, pkg: &Path) -> Result<String> {
        let invalid =
            |e: &dyn std::fmt::Display| err(ErrorKind::Invalid, format!("{}: {e}", pkg.display()));
        if self.installing.contains(name) {
            return Err(err(
                ErrorKind::Conflict,
                format!("{name} is being installed or updated; update it once that is done"),
            ));
        }
        let rec = self.record(name)?;
        let old_version = rec.package_version.clone().ok_or_else(|| {
            err(ErrorKind::Conflict, format!("service {name} was not installed from a package; remove and install the package instead"))
        })?;
        let peeked = gatevisor_images::package::open_regular(pkg)
            .map_err(|e| invalid(&e))
            .and_then(|f| {
                gatevisor_images::package::peek(std::io::BufReader::new(f)).map_err(|e| {
                    err(
                        super::install::package_error_kind(&e),
                        format!("{}: {}", pkg.display(), error_chain(&e)),
                    )
                })
            })?;
        if peeked.name != name {
            return Err(invalid(&format!(
                "the package is for service {:?}, not {name:?}",
                peeked.name
            )));
        }
        Ok(old_version)
    }

    /// Goes back to the previous packaged version by hand.
    pub(super) fn begin_rollback(&mut self, name: &str, reply: Sender<Reply>) {
        let prev = self.record(name).and_then(|_| {
            self.images
                .rollback(name)
                .map_err(|e| err(ErrorKind::Conflict, e.to_string()))
        });
        match prev {
            Ok(inst) => {
                let sw = Switch {
                    inst,
                    why: Why::Rollback,
                    reply,
                };
                self.enqueue(
                    name,
                    vec![Step::Stop { by_request: false }, Step::Switch(Box::new(sw))],
                    None,
                );
            }
            Err(error) => {
                let _ = reply.send(Reply::Error { error });
            }
        }
    }

    /// The service is stopped: rebuild it from the version to switch to and start it; its
    /// health check follows once it runs.
    pub(super) fn switch_step(&mut self, name: &str, sw: Switch) {
        let rebuilt = self.rebuild(name, &sw.inst);
        if let Err(why) = rebuilt {
            return self.judge(name, sw, Err(why));
        }
        let since_ms = now_ms();
        if let Err(e) = self.start_service(name, Op::Start) {
            return self.judge(name, sw, Err(e.message));
        }
        let _ = self.persist();
        self.live
            .entry(name.to_string())
            .or_default()
            .queue
            .push_front(Step::Check(Box::new(sw), since_ms));
    }

    /// The start ended: check the service's health on a worker (or judge a failed start).
    pub(super) fn check_step(&mut self, name: &str, sw: Switch, since_ms: u64) {
        if let Some(e) = self.live.get_mut(name).and_then(|l| l.error.take()) {
            return self.judge(name, sw, Err(e.message));
        }
        let (Ok(backend), Ok(rec)) = (self.backend(name), self.record(name)) else {
            return self.judge(name, sw, Err("it was removed".into()));
        };
        let health = rec.manifest.health.clone();
        // The version runs and is being judged (one that already ended is judged too: its
        // check finds it not running).
        if rec.state == State::Running {
            let _ = self.transition(name, Op::Check);
            let _ = self.persist();
        }
        let seen = self.verdict_servers.get(name).map(|v| v.seen());
        self.generation += 1;
        let generation = self.generation;
        let tx = self.tx.clone();
        let n = name.to_string();
        let spawned = spawn_worker(&format!("check-{name}"), move || {
            let result = health_check(&*backend, &n, &health, seen, since_ms);
            let _ = tx.send(Msg::Checked {
                name: n,
                generation,
                result,
            });
        });
        match spawned {
            Ok(_) => {
                let live = self.live.entry(name.to_string()).or_default();
                live.busy = Some(Busy::Checking(generation));
                live.queue.push_front(Step::Judge(Box::new(sw)));
            }
            Err(e) => self.judge(
                name,
                sw,
                Err(format!("no worker thread for its check: {e}")),
            ),
        }
    }

    /// A health check's worker is done.
    pub(super) fn on_checked(
        &mut self,
        name: &str,
        generation: u64,
        result: std::result::Result<(), String>,
    ) {
        if self.take_busy(name, generation).is_none() {
            return;
        }
        self.live.entry(name.to_string()).or_default().checked = Some(result);
        self.settle(name);
    }

    /// Keeps the version switched to, or goes back; answers whoever asked for the switch.
    pub(super) fn judge(
        &mut self,
        name: &str,
        sw: Switch,
        result: std::result::Result<(), String>,
    ) {
        let Switch {
            inst, why, reply, ..
        } = sw;
        // Judged: it is kept running, or stopped to go back (below).
        if self.record(name).is_ok_and(|r| r.state == State::Updating) {
            let _ = self.transition(name, Op::Judged);
        }
        let answer = |me: &mut Supervisor, r: Result<()>| {
            let _ = reply.send(match r.and_then(|()| me.status_result(name)) {
                Ok(result) => Reply::Ok { result },
                Err(error) => Reply::Error { error },
            });
        };
        let kind = match &why {
            Why::Update { .. } => decide::SwitchKind::Update,
            Why::Rollback => decide::SwitchKind::Rollback,
            Why::Restore { .. } => decide::SwitchKind::Restore,
        };
        match (decide::after_check(kind, result.is_ok()), why) {
            (decide::AfterCheck::Keep, Why::Update { old_version, pkg }) => {
                if let Ok(rec) = self.record_mut(name) {
                    rec.source = pkg;
                }
                let saved = self.persist();
                self.event(
                    EventKind::Updated,
                    Some(name),
                    format!("updated from {old_version} to {}", inst.version),
                );
                answer(self, saved);
            }
            (decide::AfterCheck::Keep, _) => {
                self.event(
                    EventKind::RolledBack,
                    Some(name),
                    format!("rolled back by hand to {}", inst.version),
                );
                let saved = self.persist();
                answer(self, saved);
            }
            (decide::AfterCheck::GoBack, Why::Update { old_version, .. }) => {
                let why = result.err().unwrap_or_default();
                // Back to the version that worked.
                let detail = format!(
                    "update to {} failed: {why}; rolled back to {old_version}",
                    inst.version
                );
                match self.images.rollback(name) {
                    Ok(prev) => {
                        let sw = Switch {
                            inst: prev,
                            why: Why::Restore { detail },
                            reply,
                        };
                        let q = &mut self.live.entry(name.to_string()).or_default().queue;
                        q.push_front(Step::Switch(Box::new(sw)));
                        q.push_front(Step::Stop { by_request: false });
                    }
                    Err(e) => {
                        self.event(EventKind::RolledBack, Some(name), detail.clone());
                        answer(
                            self,
                            Err(err(
                                ErrorKind::Runtime,
                                format!("{detail}, but the rollback failed too: {e}"),
                            )),
                        );
                    }
                }
            }
            (_, Why::Restore { detail }) => {
                self.event(EventKind::RolledBack, Some(name), detail.clone());
                let _ = self.persist();
                let message = match result {
                    Ok(()) => detail,
                    Err(e) => format!("{detail}, but the rollback failed too: {e}"),
                };
                answer(self, Err(err(ErrorKind::Runtime, message)));
            }
            // A failed rollback by hand (going back is only ever decided for an update).
            (_, _) => {
                let _ = self.persist();
                let why = result.err().unwrap_or_default();
                answer(self, Err(err(ErrorKind::Runtime, why)));
            }
        }
    }

    /// Rebuilds the (stopped) service from `inst`: its manifest and rootfs or initramfs.
    fn rebuild(
        &mut self,
        name: &str,
        inst: &gatevisor_images::store::Installed,
    ) -> std::result::Result<(), String> {
        let file = inst.service_manifest();
        let m = Manifest::load(&file).map_err(|e| e.to_string())?;
        if m.name != name {
            return Err(format!(
                "{}: the manifest is for {:?}",
                file.display(),
                m.name
            ));
        }
        let (runtime, id) = self
            .record(name)
            .map(|r| (r.plan.runtime, r.id))
            .map_err(|e| e.message)?;
        let image = m
            .image_ref_as(&file, runtime == Kind::Microvm)
            .map_err(|e| e.to_string())?;
        let caps = m.capability_set(&file).map_err(|e| e.to_string())?;
        let dir = self.service_dir(name);
        // The version switched to gets its own plan (the runtime stays the service's).
        let plan = plan_for(&m, runtime, id, &image, Some(&inst.version));
        self.materialise(&m, &plan, &image, true, caps, &dir)
            .map_err(|e| e.message)?;
        // The version switched to brings its own host-call grants.
        if let Some(v) = self.verdict_servers.get(name) {
            v.set_host_access(self.host_access(&m));
        }
        let rec = self.record_mut(name).map_err(|e| e.message)?;
        rec.manifest = m;
        rec.plan = plan;
        rec.package_version = Some(inst.version.clone());
        rec.desired = Desired::Running;
        rec.consecutive_failures = 0;
        rec.failure_reason = None;
        // The new version's declarations decide what it gets (values that no longer fit
        // fall back to its defaults).
        self.deliver_settings(name);
        Ok(())
    }
}

/// Waits (up to the manifest's deadline) until the service runs and its check passes; runs
/// on a worker. `since_ms`: just before the start (a service may say hello at once);
/// `seen`: when the service last spoke on its verdict socket.
fn health_check(
    backend: &dyn crate::runtime::Backend,
    name: &str,
    health: &crate::manifest::Health,
    seen: Option<Arc<AtomicU64>>,
    since_ms: u64,
) -> std::result::Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(health.deadline_s as u64);
    // Without a check, "healthy" means: still running a second after the start.
    let settle = Instant::now() + Duration::from_secs(1);
    let probe = decide::probe_of(health);
    let mut last = String::from("it did not start");
    while Instant::now() < deadline {
        let seen = if backend.main_pid(name).is_none() {
            decide::Seen::NotRunning
        } else {
            match &probe {
                // Inside the service (a container's namespaces; a guest's init runs it).
                decide::Probe::Exec(cmd) => {
                    decide::Seen::Exited(backend.exec(name, cmd).map_err(|e| error_chain(&e)))
                }
                decide::Probe::VerdictPing => decide::Seen::Answered(
                    seen.as_ref()
                        .is_some_and(|s| s.load(Ordering::Relaxed) >= since_ms),
                ),
                decide::Probe::Tcp(port) => {
                    decide::Seen::Answered(backend.tcp_listening(name, *port))
                }
                decide::Probe::Settled => decide::Seen::Answered(Instant::now() >= settle),
            }
        };
        match decide::probe_passed(&probe, seen) {
            Ok(()) => return Ok(()),
            Err(why) => last = why,
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!(
        "no healthy start within {} s ({last})",
        health.deadline_s
    ))
}
