//! What requests read: a service's status and its log.

use super::*;

impl Supervisor {
    pub(super) fn status(&mut self, name: &str) -> Result<api::ServiceStatus> {
        let (id, has_steering) = {
            let rec = self.record(name)?;
            (rec.id, !rec.manifest.network.steering.is_empty())
        };
        let (counters, fast_path_bytes) = match self.net.as_mut() {
            Some(net) if has_steering => (net.counters(id).ok(), net.fast_path_bytes().ok()),
            _ => (None, None),
        };
        let rec = self.record(name)?;
        let vm = rec.plan.runtime == Kind::Microvm;
        let backend = self.backends.get(rec.plan.runtime);
        let usage = if rec.state.runs() {
            backend.usage(name)
        } else {
            None
        };
        let running = rec.running.as_ref();
        let m = &rec.manifest;
        let live = self.live.get(name);
        Ok(api::ServiceStatus {
            id,
            name: name.to_string(),
            version: m.version.clone(),
            package_version: rec.package_version.clone(),
            publisher: rec
                .package_version
                .as_ref()
                .and_then(|v| self.images.version(name, v).ok())
                .and_then(|i| i.publisher())
                .or_else(|| rec.image_meta.as_ref().map(|i| i.publisher.clone())),
            image_vendor: rec.image_meta.as_ref().and_then(|i| i.vendor.clone()),
            image_version: rec.image_meta.as_ref().and_then(|i| i.version.clone()),
            runtime: rec.plan.runtime,
            state: rec.state,
            desired: rec.desired,
            init_pid: running.map(|r| r.init_pid),
            monitor_pid: running.map(|r| r.monitor_pid),
            started_at_ms: running.map(|r| r.started_at_ms),
            uptime_s: running.map(|r| now_ms().saturating_sub(r.started_at_ms) / 1000),
            restarts: rec.restarts,
            consecutive_failures: rec.consecutive_failures,
            last_exit: rec.last_exit.clone(),
            failure_reason: rec.failure_reason.clone(),
            memory: api::Memory {
                usage_bytes: usage.as_ref().and_then(|u| u.memory_bytes),
                limit_bytes: backend.enforced_limits(&rec.plan).memory_bytes,
            },
            cpu_usec: usage.as_ref().and_then(|u| u.cpu_usec),
            pids: usage.as_ref().and_then(|u| u.pids),
            failure_mode: m.failure_mode,
            last_heard_at_ms: self
                .verdict_servers
                .get(name)
                .map(|v| v.last_seen_ms())
                .filter(|t| *t > 0),
            host_calls: m
                .host_calls
                .grants()
                .0
                .iter()
                .map(|g| g.to_string())
                .collect(),
            interface: rec.plan.port_name().map(String::from),
            container: (!vm).then(|| api::ContainerInfo {
                lxcpath: self.rt.lxcpath().to_path_buf(),
                name: name.to_string(),
            }),
            microvm: vm.then(|| api::MicrovmInfo {
                config: self.vms.config_path(name),
                guest_memory_bytes: rec.plan.resources.receives_mib * 1024 * 1024,
                console: backend.console(name).unwrap_or_default(),
                vmm_rss_bytes: usage.as_ref().and_then(|u| u.memory_bytes),
                cgroup: crate::runtime::cgroup::VmCgroup::of(name, self.vms.cgroups)
                    .dir()
                    .map(Path::to_path_buf),
            }),
            log_file: self.log_file(name),
            source: rec.source.clone(),
            image: match &rec.plan.root {
                Root::Layers { image } => Some(image.clone()),
                _ => None,
            },
            user: rec.plan.user.map(|u| format!("{}:{}", u.uid, u.gid)),
            settings: config::settings_view(rec),
            steering: has_steering.then(|| api::Steering {
                policies: m.network.steering.clone(),
                counters,
                api_verdicts: live.map(|l| l.api_verdicts).unwrap_or_default(),
                bridge_fast_path_bytes: fast_path_bytes,
            }),
            network_error: live.and_then(|l| l.net_error.clone()),
            updating: self.updating(name),
        })
    }

    /// [`Self::status`] as a reply's result.
    pub(super) fn status_result(&mut self, name: &str) -> Result<serde_json::Value> {
        self.status(name).and_then(|s| api::to_result(&s))
    }

    /// The update or rollback under way for `name`: its package being verified (an update's
    /// worker), or a switch of versions in its queue (rebuild and start, health check,
    /// judgement, or the way back).
    fn updating(&self, name: &str) -> Option<api::Updating> {
        let switching = self.live.get(name).and_then(|l| {
            l.queue.iter().find_map(|s| match s {
                queue::Step::Switch(sw) | queue::Step::Check(sw, _) | queue::Step::Judge(sw) => {
                    Some(sw.inst.version.clone())
                }
                _ => None,
            })
        });
        match switching {
            Some(v) => Some(api::Updating {
                to_version: Some(v),
            }),
            None => self
                .installing
                .contains(name)
                .then_some(api::Updating { to_version: None }),
        }
    }

    pub(super) fn logs(
        &self,
        name: &str,
        offset: Option<u64>,
        tail_bytes: u64,
    ) -> Result<api::Logs> {
        use std::io::{Read, Seek, SeekFrom};
        self.record(name)?;
        let path = self.log_file(name);
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(_) => {
                return Ok(api::Logs {
                    data: String::new(),
                    next_offset: 0,
                })
            }
        };
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = match offset {
            // A smaller file than the offset means it was rotated: start over.
            Some(o) if o <= size => o,
            Some(_) => 0,
            None => size.saturating_sub(tail_bytes),
        };
        let want = (size - from).min(1 << 20);
        let mut buf = vec![0u8; want as usize];
        f.seek(SeekFrom::Start(from)).map_err(runtime_err)?;
        f.read_exact(&mut buf).map_err(runtime_err)?;
        Ok(api::Logs {
            data: String::from_utf8_lossy(&buf).into_owned(),
            next_offset: from + want,
        })
    }
}
