//! The data model as a tree of parameters: every installed service's DeploymentUnit and
//! ExecutionUnit, the execution environments, subscriptions and pending requests, built from
//! the supervisor's typed statuses.

use super::*;

impl Model {
    /// Every parameter of the agent's data model, by full path.
    pub fn parameters(&self) -> BTreeMap<String, String> {
        let services = self.sync_units();
        let st = self.st.lock().unwrap();
        let mut p = BTreeMap::new();
        let mut put = |k: String, v: String| {
            p.insert(k, v);
        };
        put(
            format!("{SM}ExecEnvNumberOfEntries"),
            self.runtimes.len().to_string(),
        );
        let mem_avail = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemAvailable:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        // Packages and container roots live in the state directory: its free space (KiB).
        let disk_avail = self
            .state_file
            .parent()
            .and_then(|d| nix::sys::statvfs::statvfs(d).ok())
            .map(|s| s.blocks_available() * s.fragment_size() / 1024)
            .unwrap_or(0);
        for (i, rt) in self.runtimes.iter().enumerate() {
            let ee = format!("{SM}ExecEnv.{}.", i + 1);
            put(format!("{ee}Enable"), "true".into());
            put(format!("{ee}Status"), "Up".into());
            put(format!("{ee}Name"), rt.to_string());
            put(format!("{ee}Type"), rt.description().into());
            put(format!("{ee}Vendor"), "gatevisor".into());
            put(format!("{ee}Version"), env!("CARGO_PKG_VERSION").into());
            put(format!("{ee}AvailableMemory"), mem_avail.to_string());
            put(format!("{ee}AvailableDiskSpace"), disk_avail.to_string());
            // Only the units that run (TR-181: "currently running").
            let eus: Vec<String> = services
                .iter()
                .filter(|(_, s)| s.runtime == *rt && s.state.runs())
                .filter_map(|(n, _)| st.units.get(n))
                .map(|u| format!("{SM}ExecutionUnit.{}", u.instance))
                .collect();
            put(format!("{ee}ActiveExecutionUnits"), eus.join(","));
        }
        put(
            format!("{SM}DeploymentUnitNumberOfEntries"),
            services.len().to_string(),
        );
        put(
            format!("{SM}ExecutionUnitNumberOfEntries"),
            services.len().to_string(),
        );
        let mut cpu = self.cpu.lock().unwrap();
        for (name, s) in &services {
            let Some(u) = st.units.get(name) else {
                continue;
            };
            let ee_ref = self
                .runtimes
                .iter()
                .position(|r| *r == s.runtime)
                .map(|i| format!("{SM}ExecEnv.{}", i + 1))
                .unwrap_or_default();
            // An image's own version and vendor (its labels) before the manifest's and the
            // signer's.
            let version = s
                .image_version
                .clone()
                .or(s.package_version.clone())
                .unwrap_or_else(|| s.version.clone());
            let publisher = s
                .image_vendor
                .clone()
                .or(s.publisher.clone())
                .unwrap_or_default();
            let du = format!("{SM}DeploymentUnit.{}.", u.instance);
            let eu = format!("{SM}ExecutionUnit.{}.", u.instance);
            put(format!("{du}UUID"), u.uuid.clone());
            put(format!("{du}DUID"), name.clone());
            put(format!("{du}Name"), name.clone());
            // TR-181: a unit whose update (or rollback) is under way is Updating.
            let du_status = if s.updating.is_some() {
                "Updating"
            } else {
                "Installed"
            };
            put(format!("{du}Status"), du_status.into());
            put(format!("{du}Resolved"), "true".into());
            put(format!("{du}URL"), u.url.clone());
            // The publisher key that signed the package (its name on this gateway).
            put(format!("{du}Vendor"), publisher.clone());
            put(format!("{du}Version"), version.clone());
            put(
                format!("{du}ExecutionUnitList"),
                eu.trim_end_matches('.').into(),
            );
            put(format!("{du}ExecutionEnvRef"), ee_ref.clone());

            let running = s.state.runs();
            let wanted = s.desired == Desired::Running;
            let status = match s.state {
                State::Running | State::Updating => "Active",
                State::Starting => "Starting",
                State::Stopping => "Stopping",
                _ => "Idle",
            };
            let (fault_code, fault_msg) = match s.state {
                State::Failed | State::Backoff => (
                    "FailureOnStart",
                    s.failure_reason.clone().unwrap_or_default(),
                ),
                _ => ("NoFault", String::new()),
            };
            put(format!("{eu}EUID"), name.clone());
            put(format!("{eu}Name"), name.clone());
            put(format!("{eu}ExecEnvLabel"), name.clone());
            put(format!("{eu}Status"), status.into());
            put(
                format!("{eu}RequestedState"),
                if wanted { "Active" } else { "Idle" }.into(),
            );
            put(format!("{eu}ExecutionFaultCode"), fault_code.into());
            put(format!("{eu}ExecutionFaultMessage"), fault_msg);
            put(format!("{eu}AutoStart"), wanted.to_string());
            put(format!("{eu}Vendor"), publisher);
            put(format!("{eu}Version"), version);
            put(format!("{eu}References"), du.trim_end_matches('.').into());
            put(format!("{eu}ExecutionEnvRef"), ee_ref);
            // TR-181: -1 for a unit that is not running.
            let mem = match s.memory.usage_bytes {
                Some(b) if running => (b / 1024).to_string(),
                _ => "-1".into(),
            };
            put(format!("{eu}MemoryInUse"), mem);
            // CPU: the share of one core used since the previous reading; 0 for a unit
            // that does not run, and at the first reading of one that does.
            let mut pct = 0;
            match s.cpu_usec {
                Some(usec) if running => {
                    let now = std::time::Instant::now();
                    if let Some((prev, at)) = cpu.get(name) {
                        let wall = now.duration_since(*at).as_micros() as u64;
                        pct = (usec.saturating_sub(*prev) * 100)
                            .checked_div(wall)
                            .unwrap_or(0)
                            .min(100);
                    }
                    cpu.insert(name.clone(), (usec, now));
                }
                _ => {
                    cpu.remove(name);
                }
            }
            put(format!("{eu}CPUPercentInUse"), pct.to_string());
            put(format!("{eu}AutoRestart.Enable"), wanted.to_string());
            put(
                format!("{eu}AutoRestart.RetryCount"),
                s.consecutive_failures.to_string(),
            );
            put(format!("{eu}{VENDOR}Restarts"), s.restarts.to_string());
            put(format!("{eu}{VENDOR}Runtime"), s.runtime.to_string());
            put(format!("{eu}{VENDOR}HostCalls"), s.host_calls.join(","));
            // The declared settings (Name is the unique key), each with the instance number
            // it got when first declared.
            put(
                format!("{eu}{VENDOR}SettingNumberOfEntries"),
                s.settings.len().to_string(),
            );
            for e in &s.settings {
                let Some(i) = u.settings.get(&e.name) else {
                    continue;
                };
                let o = format!("{eu}{VENDOR}Setting.{i}.");
                for (param, value) in [
                    ("Name", &e.name),
                    ("Type", &e.ty),
                    ("Value", &e.value),
                    ("Default", &e.default),
                    ("Description", &e.description),
                ] {
                    put(format!("{o}{param}"), value.clone());
                }
            }
            // Every unit has the steering counters the schema declares: 0 while it has
            // none (no steering, not plugged).
            let c = s
                .steering
                .as_ref()
                .and_then(|st| st.counters)
                .unwrap_or_default();
            let steered = [c.steered_packets, c.steered_bytes, c.returned_packets];
            for (name, n) in schema::STEERING_COUNTERS.iter().zip(steered) {
                put(format!("{eu}{VENDOR}Steering.{name}"), n.to_string());
            }
            let v = c.verdicts;
            for (name, n) in schema::VERDICT_COUNTERS
                .iter()
                .zip([v.forward, v.allow, v.block, v.reply])
            {
                put(
                    format!("{eu}{VENDOR}Steering.Verdicts.{name}"),
                    n.to_string(),
                );
            }
        }
        drop(cpu);
        put(
            "Device.LocalAgent.SubscriptionNumberOfEntries".into(),
            st.subscriptions.len().to_string(),
        );
        for s in &st.subscriptions {
            let o = format!("{SUBS}{}.", s.instance);
            put(format!("{o}Enable"), s.enable.to_string());
            put(format!("{o}ID"), s.id.clone());
            put(format!("{o}Recipient"), self.controller_ref(&s.recipient));
            put(format!("{o}NotifType"), s.notif_type.clone());
            put(format!("{o}ReferenceList"), s.reference_list.join(","));
            put(format!("{o}NotifRetry"), s.notif_retry.to_string());
            put(format!("{o}Persistent"), s.persistent.to_string());
        }
        {
            let controllers = self.controllers.lock().unwrap();
            put(
                "Device.LocalAgent.ControllerNumberOfEntries".into(),
                controllers.len().to_string(),
            );
            for (i, c) in controllers.iter().enumerate() {
                put(format!("{CONTROLLERS}{}.EndpointID", i + 1), c.clone());
            }
        }
        put(
            "Device.LocalAgent.RequestNumberOfEntries".into(),
            st.requests.len().to_string(),
        );
        for r in &st.requests {
            let o = format!("{REQS}{}.", r.instance);
            put(format!("{o}Originator"), r.originator.clone());
            put(format!("{o}Command"), r.command.clone());
            put(format!("{o}CommandKey"), r.command_key.clone());
            put(format!("{o}Status"), "Active".into());
        }
        p
    }
}
