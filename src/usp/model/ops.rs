//! The commands: InstallDU(), Update(), Uninstall() (asynchronous, journaled, reported with
//! `DUStateChange!` and OperationComplete), SetRequestedState() and Restart().

use super::*;

impl Model {
    /// The commands a command path names: itself, or with a search expression
    /// (`ExecutionUnit.[Name=="x"].Restart()`) one per instance that satisfies it (none is
    /// an empty answer).
    pub(super) fn expand_command(&self, command: &str) -> Result<Vec<String>, (u32, String)> {
        let (object, name) = match command.rsplit_once('.') {
            Some(split) if command.contains('[') || command.contains(".*.") => split,
            _ => return Ok(vec![command.to_string()]),
        };
        // Checked as the object it is (`….{i}.`); matched segment for segment, so an
        // instance nested below a matching one is not taken for it.
        Self::resolve_path(&format!("{object}."))?;
        let pattern = Pattern::parse(object).map_err(|e| (E_PATH_SYNTAX, e))?;
        let params = self.parameters();
        Ok(instance_objects(&params)
            .into_iter()
            .filter(|o| pattern.matches(o.trim_end_matches('.'), &params))
            .map(|o| format!("{o}{name}"))
            .collect())
    }

    /// The service behind `Device.SoftwareModules.{table}.{i}.`.
    fn unit_name(&self, table: &str, rest: &str) -> Option<(String, String)> {
        let rest = rest.strip_prefix(table)?.strip_prefix('.')?;
        let (num, tail) = rest.split_once('.')?;
        let n: u32 = num.parse().ok()?;
        self.sync_units();
        let st = self.st.lock().unwrap();
        let name = st
            .units
            .iter()
            .find(|(_, u)| u.instance == n)
            .map(|(n, _)| n.clone())?;
        Some((name, tail.to_string()))
    }

    pub(super) fn operate(
        self: &Arc<Self>,
        from: &str,
        command: &str,
        command_key: &str,
        args: &BTreeMap<String, String>,
    ) -> OperateOutcome {
        // 7008 for a malformed path, 7026 for one that names no command of the model.
        match Self::resolve_path(command) {
            Ok((_, Known::Command(_))) => {}
            Ok(_) => {
                return OperateOutcome::Failed(E_INVALID_PATH, format!("{command}: not a command"))
            }
            Err((c, m)) => return OperateOutcome::Failed(c, m),
        }
        let Some(rest) = command.strip_prefix(SM) else {
            return OperateOutcome::Failed(E_INVALID_PATH, format!("{command}: no such command"));
        };
        let call = |req| {
            self.backend
                .call(req)
                .map(|_| BTreeMap::new())
                .map_err(|e| (fault_of(&e), fault_text(&e.message, None)))
        };
        let done = |r: Result<BTreeMap<String, String>, (u32, String)>| match r {
            Ok(out) => OperateOutcome::Done(out),
            Err((c, m)) => OperateOutcome::Failed(c, m),
        };
        if rest == "InstallDU()" {
            let url = args.get("URL").cloned().unwrap_or_default();
            if url.is_empty() {
                return OperateOutcome::Failed(E_INVALID_ARGS, "InstallDU() needs a URL".into());
            }
            let uuid = args
                .get("UUID")
                .filter(|u| !u.is_empty())
                .cloned()
                .unwrap_or_else(random_uuid);
            // The unit goes to the execution environment asked for: its runtime.
            let mut runtime = None;
            if let Some(ee) = args.get("ExecutionEnvRef").filter(|e| !e.is_empty()) {
                runtime = (1..=self.runtimes.len())
                    .find(|i| ee.trim_end_matches('.') == format!("{SM}ExecEnv.{i}"))
                    .map(|i| self.runtimes[i - 1]);
                if runtime.is_none() {
                    // Reported like any other install failure: the operation ran, the DU
                    // was not created.
                    return self.start_op(
                        from,
                        command,
                        command_key,
                        OpKind::Install { url, uuid, runtime },
                        Some((F_UNKNOWN_EE, format!("{ee}: no such execution environment"))),
                    );
                }
            }
            return self.start_op(
                from,
                command,
                command_key,
                OpKind::Install { url, uuid, runtime },
                None,
            );
        }
        let absent = || OperateOutcome::Failed(E_NO_OBJECT, format!("{command}: no such instance"));
        if rest.starts_with("DeploymentUnit.") {
            let Some((name, tail)) = self.unit_name("DeploymentUnit", rest) else {
                return absent();
            };
            return match tail.as_str() {
                "Update()" => {
                    let url = match args.get("URL").filter(|u| !u.is_empty()) {
                        Some(u) => u.clone(),
                        None => {
                            let st = self.st.lock().unwrap();
                            st.units
                                .get(&name)
                                .map(|u| u.url.clone())
                                .unwrap_or_default()
                        }
                    };
                    if url.is_empty() {
                        return OperateOutcome::Failed(
                            E_INVALID_ARGS,
                            "Update() needs a URL (the DU has none on record)".into(),
                        );
                    }
                    self.start_op(
                        from,
                        command,
                        command_key,
                        OpKind::Update { name, url },
                        None,
                    )
                }
                "Uninstall()" => {
                    self.start_op(from, command, command_key, OpKind::Uninstall { name }, None)
                }
                _ => OperateOutcome::Failed(E_INVALID_PATH, format!("{command}: no such command")),
            };
        }
        if rest.starts_with("ExecutionUnit.") {
            let Some((name, tail)) = self.unit_name("ExecutionUnit", rest) else {
                return absent();
            };
            return match tail.as_str() {
                "SetRequestedState()" => match args.get("RequestedState").map(|s| s.as_str()) {
                    Some("Active") => done(call(Request::Start { name })),
                    Some("Idle") => done(call(Request::Stop { name })),
                    Some(other) => OperateOutcome::Failed(
                        E_INVALID_ARGS,
                        format!("RequestedState {other:?} is neither Idle nor Active"),
                    ),
                    None => OperateOutcome::Failed(
                        E_INVALID_ARGS,
                        "SetRequestedState() needs RequestedState (Idle or Active)".into(),
                    ),
                },
                "Restart()" => done(call(Request::Restart { name })),
                _ => OperateOutcome::Failed(E_INVALID_PATH, format!("{command}: no such command")),
            };
        }
        OperateOutcome::Failed(
            E_INVALID_PATH,
            format!("{command}: no such object or command"),
        )
    }

    /// What `DUStateChange!` says of the DU of service `name`, as the tree has it now.
    fn du_snapshot(&self, name: &str) -> Option<DuSnapshot> {
        let params = self.parameters();
        let instance = self.st.lock().unwrap().units.get(name)?.instance;
        let path = format!("{SM}DeploymentUnit.{instance}");
        let get = |k: &str| {
            params
                .get(&format!("{path}.{k}"))
                .cloned()
                .unwrap_or_default()
        };
        Some(DuSnapshot {
            uuid: get("UUID"),
            version: get("Version"),
            eu_list: get("ExecutionUnitList"),
            path,
        })
    }

    /// Journals an asynchronous operation (fsync'd before the OperateResp leaves), then runs
    /// it on its own thread. `fail_now` completes it at once with that fault.
    fn start_op(
        self: &Arc<Self>,
        from: &str,
        command: &str,
        command_key: &str,
        kind: OpKind,
        fail_now: Option<(u32, String)>,
    ) -> OperateOutcome {
        // The DU as it is now (Update, Uninstall), read before the state lock is taken.
        let du = match &kind {
            OpKind::Update { name, .. } | OpKind::Uninstall { name } => self.du_snapshot(name),
            OpKind::Install { .. } => None,
        };
        let op = {
            let mut st = self.st.lock().unwrap();
            st.next_request += 1;
            let op = PendingOp {
                instance: st.next_request,
                command: command.to_string(),
                command_key: command_key.to_string(),
                originator: from.to_string(),
                name: match &kind {
                    OpKind::Update { name, .. } | OpKind::Uninstall { name } => Some(name.clone()),
                    OpKind::Install { .. } => None,
                },
                du,
                kind,
                started: now_iso(),
                outcome: None,
            };
            st.requests.push(op.clone());
            if let Err(e) = self.persist(&st) {
                st.requests.retain(|r| r.instance != op.instance);
                return OperateOutcome::Failed(E_GENERAL, format!("cannot journal: {e}"));
            }
            op
        };
        let path = format!("{REQS}{}", op.instance);
        let deadline = std::time::Instant::now() + self.operation_deadline;
        let me = self.clone();
        let op2 = op.clone();
        let spawned = std::thread::Builder::new()
            .name("usp-op".into())
            .spawn(move || {
                let result = match fail_now {
                    Some(f) => Err(f),
                    None => me.run_op(&op2, deadline),
                };
                me.complete(&op2, result);
            });
        if let Err(e) = spawned {
            // No thread for it (the system is out of them): the operation fails, reported as
            // any other failure, and the daemon goes on.
            self.complete(
                &op,
                Err((E_GENERAL, format!("cannot start the operation: {e}"))),
            );
        }
        OperateOutcome::Started(path)
    }

    /// Fetches what `url` names for an install or update: a package (`file://`, `http://`,
    /// `https://`), an OCI image archive there (`oci-archive` or `docker save`), or an image
    /// in a registry (`docker://`). An image comes with the operator's deployment document:
    /// for an archive at `URL.sig`, for a registry's image where the registry's
    /// `signatures` place keeps it (by the image's digest). Gives up at `deadline`.
    fn fetch_unit(
        &self,
        url: &str,
        instance: u32,
        deadline: std::time::Instant,
    ) -> Result<Fetched, (u32, String)> {
        use gatevisor_images::oci::source::{self, Reference};
        let fail = |m: String| (E_COMMAND_FAILURE, m);
        let mut files = Vec::new();
        let (reference, document_url) = if url.starts_with("docker://") {
            let r = Reference::parse(url).map_err(|e| fail(format!("{url}: {e}")))?;
            let Reference::Registry(rr) = &r else {
                return Err(fail(format!("{url}: not a registry reference")));
            };
            let resolved = source::resolve(&r, &self.registries)
                .map_err(|e| fail(crate::api::error_chain(&e)))?;
            let at = self
                .registries
                .signature_url(rr, &resolved.digest)
                .map_err(|e| fail(crate::api::error_chain(&e)))?;
            (url.to_string(), at)
        } else {
            let dest = self.downloads.join(format!("request-{instance}.gvpkg"));
            self.fetch(url, &dest, deadline)?;
            match source::archive_kind(&dest) {
                None => return Ok(Fetched::Package(dest)),
                Some(kind) => {
                    let archive = dest.with_extension("tar");
                    std::fs::rename(&dest, &archive)
                        .map_err(|e| fail(format!("cannot keep the download: {e}")))?;
                    files.push(archive.clone());
                    (
                        format!("{kind}:{}", archive.display()),
                        format!("{url}.sig"),
                    )
                }
            }
        };
        let deployment = self.downloads.join(format!("request-{instance}.sig"));
        let manifest = self.downloads.join(format!("request-{instance}.toml"));
        files.extend([deployment.clone(), manifest.clone()]);
        let image = Fetched::Image {
            reference,
            deployment: deployment.clone(),
            manifest: manifest.clone(),
            files,
        };
        let got = self
            .fetch(&document_url, &deployment, deadline)
            .map_err(|(c, m)| (c, format!("the image's deployment document: {m}")))
            .and_then(|()| {
                // Read here for its manifest only; the daemon checks its signature.
                let text = std::fs::read(&deployment).map_err(|e| fail(e.to_string()))?;
                let doc = gatevisor_images::oci::signature::parse(&text)
                    .map_err(|e| fail(format!("{document_url}: {e}")))?;
                let service = doc.service.ok_or_else(|| {
                    fail(format!(
                        "{document_url}: a signature without a service manifest; an image \
                         installed by URL needs its deployment document (image sign --service)"
                    ))
                })?;
                std::fs::write(&manifest, service).map_err(|e| fail(e.to_string()))
            });
        match got {
            Ok(()) => Ok(image),
            Err(e) => {
                image.remove();
                Err(e)
            }
        }
    }

    /// Fetches `url` into `dest`, giving up at `deadline`.
    fn fetch(
        &self,
        url: &str,
        dest: &Path,
        deadline: std::time::Instant,
    ) -> Result<(), (u32, String)> {
        let tls = match (url.starts_with("https://"), &self.https) {
            (false, _) => None,
            (true, Ok(cfg)) => Some(cfg),
            (true, Err(e)) => return Err((E_COMMAND_FAILURE, format!("{url}: {e}"))),
        };
        crate::usp::fetch::fetch(url, dest, tls, deadline).map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                // R-SMM.1: the download is the step whose length the network decides.
                (
                    E_COMMAND_FAILURE,
                    format!(
                        "the operation's deadline of {} s passed while fetching {url}; nothing \
                         was changed",
                        self.operation_deadline.as_secs()
                    ),
                )
            } else {
                (E_COMMAND_FAILURE, format!("{url}: {e}"))
            }
        })
    }

    /// Pulls a fetched image with its deployment document, then installs it with the
    /// manifest the document signs.
    fn install_image(
        &self,
        image: &Fetched,
        runtime: Option<crate::runtime::Kind>,
    ) -> Result<ServiceStatus, ApiError> {
        let Fetched::Image {
            reference,
            deployment,
            manifest,
            ..
        } = image
        else {
            return Err(ApiError::new(ErrorKind::Internal, "not an image"));
        };
        let pulled = self.backend.call(Request::ImagePull {
            reference: reference.clone(),
            signature: deployment.clone(),
        })?;
        let info: crate::api::ImageInfo = crate::api::result_as(pulled)?;
        self.backend
            .call(Request::InstallImage {
                image: info.digest,
                manifest: manifest.clone(),
                start: false,
                runtime,
                deployment: Some(deployment.clone()),
            })
            .and_then(crate::api::result_as::<ServiceStatus>)
    }

    /// Journals a successful operation's result (`name`) before anyone is told of it.
    fn record_outcome(&self, st: &mut Persisted, instance: u32, name: &str) {
        if let Some(r) = st.requests.iter_mut().find(|r| r.instance == instance) {
            r.outcome = Some(name.to_string());
        }
        self.persist_or_warn(st);
    }

    /// Runs an operation; Ok(service name) or a fault. Past `deadline` nothing more is
    /// started: the fetch is the only step whose length the network decides; the install
    /// itself is bounded by the package's limits and its health-check deadline.
    fn run_op(
        &self,
        op: &PendingOp,
        deadline: std::time::Instant,
    ) -> Result<String, (u32, String)> {
        let fault = |pkg: Option<&Path>| {
            let pkg = pkg.map(Path::to_path_buf);
            move |e: ApiError| (fault_of(&e), fault_text(&e.message, pkg.as_deref()))
        };
        match &op.kind {
            OpKind::Install { url, uuid, runtime } => {
                let name = match self.fetch_unit(url, op.instance, deadline)? {
                    Fetched::Package(pkg) => {
                        let r = self.backend.call(Request::InstallPackage {
                            package: pkg.clone(),
                            start: false,
                            runtime: *runtime,
                        });
                        let _ = std::fs::remove_file(&pkg);
                        r.and_then(crate::api::result_as::<crate::api::ServiceStatus>)
                            .map_err(fault(Some(&pkg)))?
                            .name
                    }
                    image @ Fetched::Image { .. } => {
                        let r = self.install_image(&image, *runtime);
                        image.remove();
                        r.map_err(|e| image.fault(&e))?.name
                    }
                };
                self.sync_units();
                let mut st = self.st.lock().unwrap();
                if let Some(u) = st.units.get_mut(&name) {
                    u.uuid = uuid.clone();
                    u.url = url.clone();
                }
                self.record_outcome(&mut st, op.instance, &name);
                Ok(name)
            }
            OpKind::Update { name, url } => {
                let pkg = match self.fetch_unit(url, op.instance, deadline)? {
                    Fetched::Package(pkg) => pkg,
                    image @ Fetched::Image { .. } => {
                        image.remove();
                        return Err((
                            E_COMMAND_FAILURE,
                            "an update to an OCI image is not there yet: Uninstall() the unit \
                             and InstallDU() the image"
                                .into(),
                        ));
                    }
                };
                let r = self.backend.call(Request::Update {
                    name: name.clone(),
                    package: pkg.clone(),
                });
                let _ = std::fs::remove_file(&pkg);
                r.map_err(fault(Some(&pkg)))?;
                let mut st = self.st.lock().unwrap();
                if let Some(u) = st.units.get_mut(name) {
                    u.url = url.clone();
                }
                self.record_outcome(&mut st, op.instance, name);
                Ok(name.clone())
            }
            OpKind::Uninstall { name } => {
                // The OCI image it ran, freed with it unless another service runs it.
                let image = self
                    .backend
                    .call(Request::Status { name: name.clone() })
                    .and_then(crate::api::result_as::<ServiceStatus>)
                    .ok()
                    .and_then(|s| s.image);
                self.backend
                    .call(Request::Remove { name: name.clone() })
                    .map_err(fault(None))?;
                if let Some(image) = image {
                    if let Err(e) = self.backend.call(Request::ImageRemove { image }) {
                        tracing::info!("usp: the image of {name} stays: {}", e.message);
                    }
                }
                self.record_outcome(&mut self.st.lock().unwrap(), op.instance, name);
                Ok(name.clone())
            }
        }
    }

    /// Tells subscribers how an operation ended (`DUStateChange!`, `OperationComplete`) and
    /// drops it from the journal.
    fn complete(&self, op: &PendingOp, result: Result<String, (u32, String)>) {
        let name = result.as_ref().ok().cloned().or(op.name.clone());
        let params = self.parameters();
        let unit = {
            let st = self.st.lock().unwrap();
            name.as_ref().and_then(|n| st.units.get(n).cloned())
        };
        // The DU as the tree has it now; one that is gone (uninstalled) as it was when the
        // operation began.
        let now = unit.as_ref().map(|u| {
            let path = format!("{SM}DeploymentUnit.{}", u.instance);
            let get = |k: &str| {
                params
                    .get(&format!("{path}.{k}"))
                    .cloned()
                    .unwrap_or_default()
            };
            DuSnapshot {
                uuid: u.uuid.clone(),
                version: get("Version"),
                eu_list: get("ExecutionUnitList"),
                path,
            }
        });
        let du = match (&op.kind, now.or(op.du.clone())) {
            (_, Some(d)) => d,
            // An install that failed: no DU, the UUID the Controller asked for.
            (OpKind::Install { uuid, .. }, None) => DuSnapshot {
                uuid: uuid.clone(),
                ..Default::default()
            },
            (_, None) => DuSnapshot::default(),
        };
        let exists = unit.is_some();
        let (performed, ok_state) = match op.kind {
            OpKind::Install { .. } => ("Install", "Installed"),
            OpKind::Update { .. } => ("Update", "Installed"),
            OpKind::Uninstall { .. } => ("Uninstall", "Uninstalled"),
        };
        let (fault_code, fault_string) = match &result {
            Ok(_) => (0, String::new()),
            Err((c, m)) => (*c, m.clone()),
        };
        let uninstalled = matches!(op.kind, OpKind::Uninstall { .. }) && result.is_ok();
        let mut args = BTreeMap::new();
        args.insert("UUID".into(), du.uuid);
        args.insert("DeploymentUnitRef".into(), du.path);
        args.insert("Version".into(), du.version);
        args.insert(
            "CurrentState".into(),
            match (&result, exists) {
                (Ok(_), _) => ok_state,
                (Err(_), true) => "Installed",
                (Err(_), false) => "Failed",
            }
            .into(),
        );
        args.insert(
            "Resolved".into(),
            (result.is_ok() && !uninstalled).to_string(),
        );
        args.insert("ExecutionUnitRefList".into(), du.eu_list);
        args.insert("StartTime".into(), op.started.clone());
        args.insert("CompleteTime".into(), now_iso());
        args.insert("OperationPerformed".into(), performed.into());
        args.insert("Fault.FaultCode".into(), fault_code.to_string());
        args.insert("Fault.FaultString".into(), fault_string.clone());
        let event = NotifyKind::Event {
            obj_path: SM.into(),
            name: "DUStateChange!".into(),
            args,
        };
        let (obj, cmd) = match op.command.rfind('.') {
            Some(i) => (
                op.command[..=i].to_string(),
                op.command[i + 1..].to_string(),
            ),
            None => (String::new(), op.command.clone()),
        };
        let done = NotifyKind::OperationComplete {
            obj_path: obj.clone(),
            command: cmd.clone(),
            command_key: op.command_key.clone(),
            result: result.map(|_| BTreeMap::new()),
        };
        // The operation leaves the journal in the same write that keeps its notifications
        // for NotifRetry: a crash reports it either again or never twice.
        let out = {
            let mut st = self.st.lock().unwrap();
            let mut out = queue(&mut st, "Event", &format!("{SM}DUStateChange!"), &event);
            out.extend(queue(
                &mut st,
                "OperationComplete",
                &format!("{obj}{cmd}"),
                &done,
            ));
            st.requests.retain(|r| r.instance != op.instance);
            self.persist_or_warn(&st);
            out
        };
        self.dispatch(out);
    }

    /// Operations a previous daemon journaled but did not finish: an install or update whose
    /// result is visible (the service exists at the package's name) is reported done, anything
    /// else failed; either way the Controller hears of it.
    pub(super) fn settle_interrupted(&self) {
        let pending = self.st.lock().unwrap().requests.clone();
        if pending.is_empty() {
            return;
        }
        let services = self.sync_units();
        for op in pending {
            let result = match (&op.kind, &op.outcome) {
                (_, Some(name)) => Ok(name.clone()),
                (OpKind::Uninstall { name }, _) if !services.contains_key(name) => Ok(name.clone()),
                _ => Err((
                    E_COMMAND_FAILURE,
                    "interrupted: the daemon restarted before the operation finished; nothing \
                     was changed"
                        .to_string(),
                )),
            };
            tracing::info!("usp: settling {} left by a previous daemon", op.command);
            self.complete(&op, result);
        }
    }
}

/// What an install's URL gave.
enum Fetched {
    Package(PathBuf),
    /// An OCI image (`reference`: the registry's, or the downloaded archive's) with its
    /// deployment document and the manifest it carries, written out.
    Image {
        reference: String,
        deployment: PathBuf,
        manifest: PathBuf,
        /// What to remove once it is installed or refused.
        files: Vec<PathBuf>,
    },
}

impl Fetched {
    fn remove(&self) {
        if let Fetched::Image { files, .. } = self {
            for f in files {
                let _ = std::fs::remove_file(f);
            }
        }
    }

    /// The fault of a failed image install, the download folder's names replaced by what
    /// they hold.
    fn fault(&self, e: &ApiError) -> (u32, String) {
        let mut m = e.message.clone();
        if let Fetched::Image {
            deployment,
            manifest,
            files,
            ..
        } = self
        {
            let names = [
                (deployment, "the deployment document"),
                (manifest, "the service manifest"),
            ];
            for (p, what) in names {
                m = m.replace(&p.display().to_string(), what);
            }
            for f in files
                .iter()
                .filter(|f| f.extension().is_some_and(|x| x == "tar"))
            {
                m = m.replace(&f.display().to_string(), "the image archive");
            }
        }
        (fault_of(e), fault_text(&m, None))
    }
}
