//! Updates and rollbacks of packaged services, and the health check that judges them.

use super::*;

impl Supervisor {
    /// Replaces a packaged service with a new version from `pkg`; if the new version does not
    /// pass its health check, the previous one is restored by itself.
    pub(super) fn update(&mut self, name: &str, pkg: &Path) -> Result<serde_json::Value> {
        let invalid =
            |e: &dyn std::fmt::Display| err(ErrorKind::Invalid, format!("{}: {e}", pkg.display()));
        if self.installing.contains(name) {
            return Err(err(
                ErrorKind::Conflict,
                format!("{name} is being installed; update it once that is done"),
            ));
        }
        let rec = self.record(name)?;
        let old_version = rec.package_version.clone().ok_or_else(|| {
            err(ErrorKind::Conflict, format!("service {name} was not installed from a package; remove and install the package instead"))
        })?;
        let peeked = gatevisor_images::package::open_regular(pkg)
            .map_err(|e| invalid(&e))
            .and_then(|f| {
                gatevisor_images::package::peek(std::io::BufReader::new(f)).map_err(|e| invalid(&e))
            })?;
        if peeked.name != name {
            return Err(invalid(&format!(
                "the package is for service {:?}, not {name:?}",
                peeked.name
            )));
        }
        let inst = {
            let mut check = package_check(&self.settings.policy);
            self.images
                .install_checked(pkg, &mut check, &mut |_| {})
                .map_err(|e| store_refusal(pkg, &e))?
        };
        if inst.version == old_version {
            return Err(err(
                ErrorKind::Conflict,
                format!("{name} already runs version {old_version}"),
            ));
        }
        match self.switch_version(name, &inst) {
            Ok(()) => {
                self.record_mut(name)?.source = pkg.to_path_buf();
                self.persist()?;
                self.event(
                    EventKind::Updated,
                    Some(name),
                    format!("updated from {old_version} to {}", inst.version),
                );
                self.status(name)
            }
            Err(why) => {
                // Back to the version that worked.
                let restored = self
                    .images
                    .rollback(name)
                    .map_err(runtime_err)
                    .and_then(|prev| {
                        self.switch_version(name, &prev)
                            .map_err(|e| err(ErrorKind::Runtime, e))
                    });
                let detail = format!(
                    "update to {} failed: {why}; rolled back to {old_version}",
                    inst.version
                );
                self.event(EventKind::RolledBack, Some(name), detail.clone());
                let _ = self.persist();
                match restored {
                    Ok(()) => Err(err(ErrorKind::Runtime, detail)),
                    Err(e) => Err(err(
                        ErrorKind::Runtime,
                        format!("{detail}, but the rollback failed too: {e}"),
                    )),
                }
            }
        }
    }

    /// Goes back to the previous packaged version by hand.
    pub(super) fn rollback(&mut self, name: &str) -> Result<serde_json::Value> {
        self.record(name)?;
        let prev = self
            .images
            .rollback(name)
            .map_err(|e| err(ErrorKind::Conflict, e.to_string()))?;
        let version = prev.version.clone();
        self.switch_version(name, &prev)
            .map_err(|e| err(ErrorKind::Runtime, e))?;
        self.event(
            EventKind::RolledBack,
            Some(name),
            format!("rolled back by hand to {version}"),
        );
        self.persist()?;
        self.status(name)
    }

    /// Stops the service, rebuilds it from `inst` (its manifest and rootfs) and starts it; Ok
    /// once it passes its health check.
    pub(super) fn switch_version(
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
        let runtime = self.record(name).map_err(|e| e.message)?.runtime;
        let image = m
            .image_ref_as(&file, runtime == Kind::Microvm)
            .map_err(|e| e.to_string())?;
        let caps = m.capability_set(&file).map_err(|e| e.to_string())?;
        self.stop_service(name, false).map_err(|e| e.message)?;
        let dir = self.service_dir(name);
        let idmap = (runtime == Kind::Lxc && !m.privileged)
            .then(|| idmap_for(self.record(name).map(|r| r.id).unwrap_or(0)));
        let source = Source {
            from_store: true,
            prepared: None,
            idmap,
        };
        self.materialise(&m, &image, caps, &dir, source)
            .map_err(|e| e.message)?;
        {
            let rec = self.record_mut(name).map_err(|e| e.message)?;
            rec.manifest = m;
            rec.idmap_base = idmap.map(|m| m.host_base);
            rec.package_version = Some(inst.version.clone());
            rec.desired = Desired::Running;
            rec.consecutive_failures = 0;
            rec.failure_reason = None;
        }
        let since_ms = now_ms();
        self.start_service(name, Op::Start).map_err(|e| e.message)?;
        let _ = self.persist();
        self.health_check(name, since_ms)
    }

    /// Waits (up to the manifest's deadline) until the service runs and its check passes.
    /// `since_ms`: just before the start (a service may say hello at once).
    pub(super) fn health_check(
        &mut self,
        name: &str,
        since_ms: u64,
    ) -> std::result::Result<(), String> {
        let rec = self.record(name).map_err(|e| e.message)?;
        let health = rec.manifest.health.clone();
        let deadline = Instant::now() + Duration::from_secs(health.deadline_s as u64);
        // Without a check, "healthy" means: still running a second after the start.
        let settle = Instant::now() + Duration::from_secs(1);
        let mut last = String::from("it did not start");
        while Instant::now() < deadline {
            if self.service_pid(name).is_none() {
                last = "it is not running".into();
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            let Ok(backend) = self.backend(name) else {
                return Err("it was removed".into());
            };
            let passed = if let Some(cmd) = &health.exec {
                // Inside the service (a container's namespaces; a guest's init runs it).
                match backend.exec(name, cmd) {
                    Ok(0) => true,
                    Ok(code) => {
                        last = format!("health command exited with {code}");
                        false
                    }
                    Err(e) => {
                        last = error_chain(&e);
                        false
                    }
                }
            } else if health.verdict_ping {
                let spoke = self
                    .verdict_servers
                    .get(name)
                    .is_some_and(|v| v.last_seen_ms() >= since_ms);
                if !spoke {
                    last = "it did not speak on its verdict socket".into();
                }
                spoke
            } else if let Some(port) = health.tcp_port {
                let ok = backend.tcp_listening(name, port);
                if !ok {
                    last = format!("nothing accepts on TCP port {port} inside it");
                }
                ok
            } else {
                Instant::now() >= settle
            };
            if passed {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "no healthy start within {} s ({last})",
            health.deadline_s
        ))
    }
}
