//! The service's side of the bridge: its port, its flows, its verdicts and heartbeat.

use super::*;

impl Supervisor {
    /// Running services with a heartbeat that went silent are hung: their traffic fails over
    /// and they are killed, so their restart policy brings them back.
    pub(super) fn check_heartbeats(&mut self) {
        let (start_timeout, now) = (self.settings.start_timeout, now_ms());
        let mut due_ms: Option<u64> = None;
        let hung: Vec<(String, String)> = self
            .doc
            .services
            .values()
            .filter(|r| r.state.runs())
            .filter_map(|r| {
                let name = &r.manifest.name;
                let live = self.live.get(name)?;
                let last_seen_ms = self
                    .verdict_servers
                    .get(name)
                    .map_or(0, |v| v.last_seen_ms());
                let started_at_ms = r.running.as_ref().map_or(now, |run| run.started_at_ms);
                let expected_for_ms = live.heartbeat_since.map(|t| t.elapsed().as_millis() as u64);
                let facts = decide::Liveness {
                    heartbeat_timeout_ms: r.manifest.network.heartbeat_timeout_ms,
                    expected_for_ms,
                    silent_ms: now.saturating_sub(last_seen_ms),
                    spoke_since_start: last_seen_ms >= started_at_ms,
                    microvm: r.plan.runtime == Kind::Microvm,
                    running_for_ms: now.saturating_sub(started_at_ms),
                    awaits_ready: r.manifest.network.ready == crate::manifest::Readiness::Notify
                        && !live.said_ready,
                };
                let grace = crate::microvm::BOOT_GRACE;
                let why = decide::hung(&facts, start_timeout, grace);
                if why.is_none() {
                    if let Some(d) = decide::heartbeat_due_ms(&facts, grace) {
                        due_ms = Some(due_ms.map_or(d, |m| m.min(d)));
                    }
                }
                Some((name.clone(), why?))
            })
            .collect();
        self.heartbeat_due = due_ms.map(|d| Instant::now() + Duration::from_millis(d));
        for (name, why) in hung {
            // The class fails over before anything is written.
            self.unplug(&name);
            self.event(
                EventKind::Hung,
                Some(&name),
                format!("{why}; failed over, restarting it"),
            );
            if let Some(l) = self.live.get_mut(&name) {
                l.heartbeat_since = None;
            }
            // Killing it ends in its monitor's exit, which applies the restart policy.
            let killed = self
                .backend(&name)
                .and_then(|b| b.kill(&name).map_err(runtime_err));
            if let Err(e) = killed {
                tracing::warn!("{name}: cannot kill the hung service: {e}");
            }
        }
    }

    /// A port vanished from the bridge (or broke): a running service gets it back.
    pub(super) fn on_port_lost(&mut self, port: &str) {
        let Some(name) = self
            .doc
            .services
            .values()
            .find(|r| r.plan.port_name() == Some(port))
            .map(|r| r.manifest.name.clone())
        else {
            return;
        };
        let state = self.doc.services.get(&name).map(|r| r.state);
        let runs = state.is_some_and(State::runs) && self.service_pid(&name).is_some();
        let replugged_ago = self
            .live
            .get(&name)
            .and_then(|l| l.replugged_at)
            .map(|t| t.elapsed());
        if let decide::PortLost::Leave(why) = decide::port_lost(state, runs, replugged_ago) {
            tracing::debug!("{name}: port {port} left the bridge; left alone: {why}");
            return;
        }
        let live = self.live.entry(name.clone()).or_default();
        live.replugged_at = Some(Instant::now());
        self.unplug(&name);
        self.plug(&name);
        let restored = self.live.get(&name).is_some_and(|l| l.net_error.is_none());
        self.event(
            EventKind::NetworkRestored,
            Some(&name),
            if restored {
                format!("port {port} was removed from the bridge; plugged again")
            } else {
                format!("port {port} was removed from the bridge and could not be plugged again")
            },
        );
    }

    /// Checks the switch (on the loop: cheap); one that is not as it should be is restored
    /// on a worker, which takes the network along ([`Msg::NetworkChecked`] brings it back):
    /// restarting a daemon and resyncing every flow takes up to seconds, and the loop keeps
    /// answering meanwhile. Until it is back, services are not plugged or unplugged (that is
    /// caught up afterwards), verdicts over the API are refused, and installs that steer
    /// are asked to wait.
    pub(super) fn check_network(&mut self) {
        let Some(net) = self.net.as_mut() else { return };
        if net.healthy() {
            return;
        }
        let mut net = self.net.take().expect("checked above");
        self.net_restoring = true;
        self.event(
            EventKind::NetworkLost,
            None,
            "Open vSwitch stopped answering or one of its daemons ended; restoring it",
        );
        let tx = self.tx.clone();
        let spawned = spawn_worker("switch-restore", move || {
            let result = net.check().map_err(|e| e.to_string());
            let _ = tx.send(Msg::NetworkChecked {
                net: Box::new(net),
                result,
            });
        });
        if let Err(e) = spawned {
            // The network went with the closure: steering is gone until the daemon restarts.
            self.net_restoring = false;
            self.net_problem = Some(format!("no worker thread to restore Open vSwitch: {e}"));
            tracing::error!("{}", self.net_problem.as_deref().unwrap_or_default());
        }
    }

    /// Watches the private switch's daemons on a thread blocked on their pidfds: one that
    /// ends is restored at once ([`Msg::SwitchEnded`]), not at the next once-a-second check
    /// (which stays, for a switch that hangs without ending). Armed again for new pids only.
    pub(super) fn watch_switch(&mut self) {
        let Some(net) = self.net.as_ref() else { return };
        let pids = net.switch_pids();
        if pids.is_empty() || pids == self.switch_watched {
            return;
        }
        let fds: Vec<std::os::fd::OwnedFd> = pids
            .iter()
            .filter_map(|p| proc::pidfd_open(*p).ok())
            .collect();
        if fds.len() != pids.len() {
            // One already ended: the next check restores it.
            return;
        }
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("switch-watch".into())
            .stack_size(64 * 1024)
            .spawn(move || {
                use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
                use std::os::fd::AsFd;
                loop {
                    let mut polled: Vec<PollFd> = fds
                        .iter()
                        .map(|f| PollFd::new(f.as_fd(), PollFlags::POLLIN))
                        .collect();
                    match poll(&mut polled, PollTimeout::NONE) {
                        Err(nix::errno::Errno::EINTR) => continue,
                        _ => break,
                    }
                }
                let _ = tx.send(Msg::SwitchEnded);
            });
        if spawned.is_ok() {
            self.switch_watched = pids;
        }
    }

    /// The switch's worker is done: the network is back; what changed meanwhile is caught up
    /// (a service that started is plugged, one that ended is put into its failure mode).
    pub(super) fn on_network_checked(
        &mut self,
        net: Network,
        result: std::result::Result<bool, String>,
    ) {
        self.net = Some(net);
        self.net_restoring = false;
        self.watch_switch();
        match result {
            Ok(true) => self.event(
                EventKind::NetworkRestored,
                None,
                "Open vSwitch came back; flows restored",
            ),
            Ok(false) => self.event(
                EventKind::NetworkRestored,
                None,
                "Open vSwitch answers again; its flows were kept",
            ),
            // Tried again at the next check.
            Err(e) => tracing::warn!("Open vSwitch check failed: {e}"),
        }
        let names: Vec<String> = self.doc.services.keys().cloned().collect();
        for name in names {
            match self.doc.services.get(&name).map(|r| r.state) {
                Some(s) if s.runs() => self.plug(&name),
                Some(_) => self.unplug(&name),
                None => {}
            }
        }
    }

    /// Plugs a running service into the bridge and steers to it once it is ready: at once
    /// for `ready = "started"`, a re-adopted service and one that said `ready` already; else
    /// when it does ([`Supervisor::on_ready`]).
    pub(super) fn plug(&mut self, name: &str) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(rec) = self.doc.services.get(name) else {
            return;
        };
        let Some(port) = &rec.plan.port else {
            return;
        };
        let m = &rec.manifest;
        let ready = m.network.ready == crate::manifest::Readiness::Started
            || self.live.get(name).is_some_and(|l| l.said_ready);
        // The service's own frames must carry its address: a microVM's is always set; a
        // container started by an earlier gatevisor (re-adopted) may have another, and is
        // not pinned until it restarts.
        let mac = crate::network::service_mac(name);
        let pinned = match rec.plan.runtime {
            crate::runtime::Kind::Microvm => true,
            crate::runtime::Kind::Lxc => std::fs::read_to_string(
                self.rt.lxcpath().join(name).join("config"),
            )
            .is_ok_and(|c| {
                c.lines().any(|l| {
                    l.split_once('=').is_some_and(|(k, v)| {
                        k.trim() == "lxc.net.0.hwaddr" && v.trim() == port.mac
                    })
                })
            }),
        };
        let res = net.plug(
            rec.id,
            &port.name,
            name,
            &m.network.steering,
            m.failure_mode.to_flowbridge(),
            ready,
            pinned.then_some(mac),
        );
        let live = self.live.entry(name.to_string()).or_default();
        live.net_error = res.err().map(|e| {
            tracing::warn!("{name}: {e}");
            e.to_string()
        });
    }

    /// A service said it can take its traffic: a plugged, running one is steered to now.
    pub(super) fn on_ready(&mut self, name: &str) {
        let Some(rec) = self.doc.services.get(name) else {
            return;
        };
        let (id, running) = (rec.id, rec.state.runs());
        if let Some(v) = self.verdict_servers.get(name) {
            v.ready_handled();
        }
        self.live.entry(name.to_string()).or_default().said_ready = true;
        let Some(net) = self.net.as_mut() else { return };
        if !running || net.is_active(id) || !net.is_plugged(id) {
            return;
        }
        match net.activate(id) {
            Ok(()) => self.event(
                EventKind::Ready,
                Some(name),
                "the service said it is ready; its traffic is steered to it",
            ),
            Err(e) => tracing::warn!("{name}: cannot steer to it: {e}"),
        }
    }

    /// The service ended or is stopping: its traffic class fails open or closed now.
    pub(super) fn unplug(&mut self, name: &str) {
        let Some(net) = self.net.as_mut() else { return };
        let Some(rec) = self.doc.services.get(name) else {
            return;
        };
        if let Some(port) = &rec.plan.port {
            if let Err(e) = net.unplug(rec.id, &port.name) {
                tracing::warn!("{name}: {e}");
            }
        }
    }

    /// The service ended: the packet socket it handed over ([`crate::verdict::PortHold`]) is
    /// let go, after its class failed over.
    pub(super) fn release_port(&mut self, name: &str) {
        if let Some(v) = self.verdict_servers.get(name) {
            v.release_port();
        }
    }

    /// Logs a host call in the event log: at most AUDIT_PER_WINDOW per service every
    /// AUDIT_WINDOW; the calls left out are counted and said in the next window's first.
    pub(super) fn audit_host_call(
        &mut self,
        name: &str,
        call: &str,
        refused: Option<&'static str>,
        micros: u64,
    ) {
        const AUDIT_WINDOW: Duration = Duration::from_secs(10);
        const AUDIT_PER_WINDOW: u32 = 20;
        let Some(live) = self.live.get_mut(name) else {
            return;
        };
        let now = Instant::now();
        let (start, logged, left_out) = live.audit.get_or_insert((now, 0, 0));
        let mut earlier = 0;
        if now.duration_since(*start) >= AUDIT_WINDOW {
            earlier = *left_out;
            (*start, *logged, *left_out) = (now, 0, 0);
        }
        if *logged >= AUDIT_PER_WINDOW {
            *left_out += 1;
            return;
        }
        *logged += 1;
        let mut detail = match refused {
            None => format!("{call}: ok in {micros} us"),
            Some(kind) => format!("{call}: refused ({kind}) in {micros} us"),
        };
        if earlier > 0 {
            detail.push_str(&format!(
                "; {earlier} more calls in the previous {} s were not logged",
                AUDIT_WINDOW.as_secs()
            ));
        }
        self.event(EventKind::HostCall, Some(name), detail);
    }

    /// What host calls of a service with manifest `m` may reach: its grants, the board's
    /// sources.
    pub(super) fn host_access(&self, m: &Manifest) -> crate::verdict::HostAccess {
        crate::verdict::HostAccess {
            grants: m.host_calls.grants(),
            sources: self.host_sources.clone(),
        }
    }

    /// Host directory bind-mounted into the service at `/run/gatevisor` (its verdict socket).
    pub(super) fn service_run_dir(&self, name: &str) -> PathBuf {
        self.settings.state_dir.join("run").join(name)
    }

    pub(super) fn verdict(
        &mut self,
        name: &str,
        session: &flowbridge::steering::Session,
        allow: bool,
    ) -> std::result::Result<(), String> {
        let id = self
            .doc
            .services
            .get(name)
            .map(|r| r.id)
            .ok_or("no such service")?;
        let net = self.net.as_mut().ok_or("no Open vSwitch")?;
        match net.session_verdict(id, session, allow) {
            Ok(true) => {
                self.live.entry(name.to_string()).or_default().api_verdicts += 1;
                Ok(())
            }
            Ok(false) => Err("the service is not active on the bridge".into()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Puts a service that is not running into its failure mode on the bridge, and opens its
    /// verdict socket.
    pub(super) fn register_network(&mut self, name: &str) {
        if !self.open_verdict_socket(name) {
            return;
        }
        let Some(net) = self.net.as_mut() else { return };
        let Some(rec) = self.doc.services.get(name) else {
            return;
        };
        let m = &rec.manifest;
        if let Err(e) = net.register(rec.id, &m.network.steering, m.failure_mode.to_flowbridge()) {
            tracing::warn!("{name}: {e}");
        }
    }

    /// Opens the verdict socket (the control channel) of a service that steers traffic or
    /// takes settings (unless open), with its settings published; true for a service that
    /// steers.
    pub(super) fn open_verdict_socket(&mut self, name: &str) -> bool {
        let Some(rec) = self.doc.services.get(name) else {
            return false;
        };
        let steers = !rec.manifest.network.steering.is_empty();
        if !rec.plan.control_channel {
            return false;
        }
        if !self.verdict_servers.contains_key(name) {
            let owner = rec.plan.idmap_base;
            let host = self.host_access(&rec.manifest);
            match crate::verdict::serve(
                &self.service_run_dir(name),
                name,
                owner,
                host,
                self.tx.clone(),
            ) {
                Ok(v) => {
                    self.verdict_servers.insert(name.to_string(), v);
                }
                Err(e) => tracing::warn!("{name}: cannot open its verdict socket: {e}"),
            }
            self.deliver_settings(name);
        }
        steers
    }

    pub(super) fn flows(&mut self) -> Result<api::Flows> {
        let Some(net) = self.net.as_mut() else {
            let why = if self.net_restoring {
                "it is being restored".to_string()
            } else {
                self.net_problem.clone().unwrap_or_default()
            };
            return Err(err(ErrorKind::Conflict, format!("no Open vSwitch: {why}")));
        };
        let bridge = net.bridge.clone();
        let flows = net.flows().map_err(runtime_err)?;
        let owner = |cookie: u64| -> String {
            if cookie == flowbridge::steering::BASE_COOKIE {
                return "base".into();
            }
            self.doc
                .services
                .values()
                .find(|r| flowbridge::steering::service_of(cookie) == Some(r.id))
                .map(|r| r.manifest.name.clone())
                .unwrap_or_else(|| "other".into())
        };
        let flows = flows
            .iter()
            .map(|f| api::FlowEntry {
                owner: owner(f.flow.cookie),
                cookie: format!("{:#x}", f.flow.cookie),
                table: f.flow.table,
                priority: f.flow.priority,
                packets: f.packet_count,
                bytes: f.byte_count,
                flow: f.flow.to_string(),
            })
            .collect();
        Ok(api::Flows { bridge, flows })
    }
}
