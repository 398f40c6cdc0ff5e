//! The steering controller: owns the OpenFlow connection to one bridge and the flows each
//! service should have, and applies every change as one atomic bundle.
//!
//! The controller keeps what it believes the switch holds under gatevisor's cookies, read
//! from the switch when it connects. Every change is computed as a difference against that:
//! flows that are already there stay untouched (their counters keep counting, no packet sees a
//! gap), only what differs is deleted (strictly, by match and priority) or added, and nothing
//! is sent when nothing differs. A restarted daemon therefore leaves a running service's flows
//! exactly as they were.
//!
//! - `set_service`: the service's port and whether it serves now. Serving: its steering flows.
//!   Not serving: its class fails open (no flows: the base pipeline forwards it) or closed
//!   (drops), and tagged frames from its port are dropped (a late verdict must not reach the
//!   bridge's MAC learning).
//! - `prune`: after a daemon restart, the flows of services that no longer exist go.
//! - `resync`: after the switch restarted (flows lost), reconnect and reinstall everything in
//!   one bundle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ofconn::{OfConn, OfError};
use crate::ofp::{Action, Flow, FlowModCommand, Instruction};
use crate::steering::{self, Policy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    Open,
    Closed,
}

#[derive(Debug, Clone)]
struct ServiceSteering {
    port: u32,
    /// The service's own address on its port, when known (its frames must carry it).
    mac: Option<[u8; 6]>,
    policies: Vec<Policy>,
    failure_mode: FailureMode,
    active: bool,
}

/// Packets and bytes steered to a service, from its flows' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub steered_packets: u64,
    pub steered_bytes: u64,
    /// Packets the service sent back with a verdict or as an answer.
    pub returned_packets: u64,
    /// Of those, by verdict.
    pub verdicts: VerdictCounts,
}

/// Packets a service returned, by the verdict they carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerdictCounts {
    pub forward: u64,
    pub allow: u64,
    pub block: u64,
    pub reply: u64,
}

/// A flow's identity on the switch: table, priority and match (fields in a canonical order).
type FlowKey = (u8, u16, Vec<Vec<u8>>);

fn key_of(f: &Flow) -> FlowKey {
    let mut fields: Vec<Vec<u8>> = f
        .matches
        .iter()
        .map(|m| {
            let mut b = Vec::new();
            m.encode(&mut b);
            b
        })
        .collect();
    fields.sort();
    (f.table, f.priority, fields)
}

/// Everything about a flow the switch acts on, beyond its identity.
fn same_content(a: &Flow, b: &Flow) -> bool {
    let enc = |f: &Flow| {
        let mut v = Vec::new();
        for i in &f.instructions {
            i.encode(&mut v);
        }
        v
    };
    a.cookie == b.cookie
        && a.idle_timeout == b.idle_timeout
        && a.hard_timeout == b.hard_timeout
        && enc(a) == enc(b)
}

/// What the switch holds under gatevisor's cookies: static flows only (session verdicts have
/// idle timeouts and are the switch's to expire).
#[derive(Debug, Default)]
struct Installed(BTreeMap<FlowKey, Flow>);

impl Installed {
    fn read(conn: &mut OfConn) -> Result<Installed, OfError> {
        let flows = conn.flow_stats(0, 0)?;
        Ok(Installed(
            flows
                .into_iter()
                .map(|s| s.flow)
                .filter(|f| steering::is_ours(f.cookie) && f.idle_timeout == 0)
                .map(|f| (key_of(&f), f))
                .collect(),
        ))
    }

    /// The flow mods that make the flows under `cookies` exactly `desired`: strict deletes of
    /// what is there and not wanted, adds of what is missing or different. Empty when the
    /// switch already holds them.
    fn diff(&self, cookies: &[u64], desired: &[Flow]) -> Vec<(Flow, FlowModCommand, u64)> {
        let want: BTreeMap<FlowKey, &Flow> = desired.iter().map(|f| (key_of(f), f)).collect();
        let mut mods = Vec::new();
        for (k, f) in &self.0 {
            if cookies.contains(&f.cookie) && !want.contains_key(k) {
                mods.push((f.clone(), FlowModCommand::DeleteStrict, u64::MAX));
            }
        }
        for (k, f) in &want {
            match self.0.get(k) {
                Some(have) if same_content(have, f) => {}
                _ => mods.push(((*f).clone(), FlowModCommand::Add, 0)),
            }
        }
        mods
    }

    /// Records mods the switch accepted.
    fn applied(&mut self, mods: &[(Flow, FlowModCommand, u64)]) {
        for (f, cmd, _) in mods {
            match cmd {
                FlowModCommand::DeleteStrict => {
                    self.0.remove(&key_of(f));
                }
                FlowModCommand::Add => {
                    self.0.insert(key_of(f), f.clone());
                }
                _ => {}
            }
        }
    }

    fn cookies(&self) -> BTreeSet<u64> {
        self.0.values().map(|f| f.cookie).collect()
    }
}

pub struct Controller {
    conn: OfConn,
    services: BTreeMap<u32, ServiceSteering>,
    installed: Installed,
    /// `ovs-vswitchd`'s unixctl socket, to purge cached datapath flows after a change.
    vswitchd_ctl: Option<std::path::PathBuf>,
    /// Bundles sent (changes made) since connecting: a restart that changed nothing sent none.
    bundles: u64,
}

fn delete_cookie(cookie: u64) -> (Flow, FlowModCommand, u64) {
    let f = Flow {
        table: 0xff,
        cookie,
        ..Flow::default()
    };
    (f, FlowModCommand::Delete, u64::MAX)
}

impl Controller {
    /// Connects to the bridge's management socket, reads what the switch holds and makes the
    /// base pipeline right (without touching it when it already is).
    pub fn connect(mgmt: &Path, timeout: Duration) -> Result<Controller, OfError> {
        let mut conn = OfConn::connect(mgmt, timeout)?;
        let installed = Installed::read(&mut conn)?;
        let mut c = Controller {
            conn,
            services: BTreeMap::new(),
            installed,
            vswitchd_ctl: None,
            bundles: 0,
        };
        c.sync(&[steering::BASE_COOKIE], steering::base_flows(), &[])?;
        Ok(c)
    }

    /// With `ovs-vswitchd`'s control socket, every change also purges the datapath's cached
    /// flows, so the switch acts on new rules at once: measured here, the first packet after
    /// a fail-open was otherwise lost to a megaflow still pointing at the dead service.
    pub fn with_vswitchd_ctl(mut self, ctl: std::path::PathBuf) -> Controller {
        self.vswitchd_ctl = Some(ctl);
        self
    }

    fn purge_datapath(&self) {
        if let Some(ctl) = &self.vswitchd_ctl {
            if let Err(e) = crate::private::unixctl(ctl, "revalidator/purge", &[]) {
                tracing::warn!("cannot purge datapath flows through {}: {e}", ctl.display());
            }
        }
    }

    /// Makes the flows under `cookies` exactly `desired` in one bundle, with `extra` mods
    /// (deletes of untracked flows) in the same bundle. Sends nothing when nothing differs.
    fn sync(
        &mut self,
        cookies: &[u64],
        desired: Vec<Flow>,
        extra: &[(Flow, FlowModCommand, u64)],
    ) -> Result<(), OfError> {
        let mut mods = self.installed.diff(cookies, &desired);
        if mods.is_empty() && extra.is_empty() {
            return Ok(());
        }
        mods.extend_from_slice(extra);
        self.conn.bundle(&mods)?;
        self.bundles += 1;
        self.installed.applied(&mods);
        self.purge_datapath();
        Ok(())
    }

    /// Bundles sent since connecting (a change the switch saw).
    pub fn changes(&self) -> u64 {
        self.bundles
    }

    /// Records the service's policies; nothing is steered until `activate`. A `closed`
    /// service's class is dropped from now on, since it is not running yet.
    pub fn add_service(
        &mut self,
        id: u32,
        port: u32,
        policies: Vec<Policy>,
        failure_mode: FailureMode,
    ) -> Result<(), OfError> {
        self.set_service(id, port, policies, failure_mode, false, None)
    }

    /// Records the service's port (0: not plugged), policies, failure mode, whether it
    /// serves now and its own address (when known: the only source its frames may carry),
    /// and makes the switch hold exactly its flows for that.
    pub fn set_service(
        &mut self,
        id: u32,
        port: u32,
        policies: Vec<Policy>,
        failure_mode: FailureMode,
        active: bool,
        mac: Option<[u8; 6]>,
    ) -> Result<(), OfError> {
        self.services.insert(
            id,
            ServiceSteering {
                port,
                mac,
                policies,
                failure_mode,
                active,
            },
        );
        self.apply(id)
    }

    pub fn activate(&mut self, id: u32) -> Result<(), OfError> {
        if let Some(s) = self.services.get_mut(&id) {
            s.active = true;
        }
        self.apply(id)
    }

    pub fn deactivate(&mut self, id: u32) -> Result<(), OfError> {
        if let Some(s) = self.services.get_mut(&id) {
            s.active = false;
        }
        self.apply(id)
    }

    /// The service's port left the bridge: nothing may refer to its number any more (another
    /// port may get it).
    pub fn port_gone(&mut self, id: u32) -> Result<(), OfError> {
        if let Some(s) = self.services.get_mut(&id) {
            s.port = 0;
            s.active = false;
        }
        self.apply(id)
    }

    /// Service `id`'s OpenFlow port (0: not plugged), if the controller knows the service.
    pub fn port_of(&self, id: u32) -> Option<u32> {
        self.services.get(&id).map(|s| s.port)
    }

    /// Whether service `id` is steered to now.
    pub fn is_active(&self, id: u32) -> bool {
        self.services.get(&id).is_some_and(|s| s.active)
    }

    /// Forgets the service and removes all its flows.
    pub fn remove_service(&mut self, id: u32) -> Result<(), OfError> {
        self.services.remove(&id);
        self.apply(id)
    }

    /// After a daemon restart, once every known service is registered: the flows of services
    /// the controller does not know (removed while no daemon ran) are removed.
    pub fn prune(&mut self) -> Result<(), OfError> {
        let stale: BTreeSet<u32> = self
            .installed
            .cookies()
            .into_iter()
            .filter_map(steering::service_of)
            .filter(|id| !self.services.contains_key(id))
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        // Their static flows go by the difference; their session verdicts (not tracked) by
        // cookie, in the same bundle.
        let cookies: Vec<u64> = stale
            .iter()
            .flat_map(|id| {
                [
                    steering::service_cookie(*id, false),
                    steering::service_cookie(*id, true),
                ]
            })
            .collect();
        let verdicts: Vec<_> = stale
            .iter()
            .map(|id| delete_cookie(steering::verdict_cookie(*id)))
            .collect();
        self.sync(&cookies, Vec::new(), &verdicts)
    }

    /// The flows service `id` should have now.
    fn desired(&self, id: u32) -> Vec<Flow> {
        let Some(s) = self.services.get(&id) else {
            return Vec::new();
        };
        if s.active && s.port != 0 {
            let fail_open = s.failure_mode == FailureMode::Open;
            return steering::service_flows(id, s.port, &s.policies, fail_open, s.mac);
        }
        let mut v = Vec::new();
        if s.port != 0 {
            v.extend(steering::port_guard_flows(id, s.port, s.mac));
        }
        if s.failure_mode == FailureMode::Closed {
            v.extend(steering::failed_closed_flows(id, &s.policies));
        }
        v
    }

    /// Makes the switch hold exactly the flows service `id` should have now. A service that
    /// stops serving also loses the session verdicts it gave.
    fn apply(&mut self, id: u32) -> Result<(), OfError> {
        let cookies = [
            steering::service_cookie(id, false),
            steering::service_cookie(id, true),
        ];
        let desired = self.desired(id);
        let was_serving = self
            .installed
            .0
            .values()
            .any(|f| f.cookie == steering::service_cookie(id, false));
        let extra = if was_serving && !self.is_active(id) {
            vec![delete_cookie(steering::verdict_cookie(id))]
        } else {
            Vec::new()
        };
        self.sync(&cookies, desired, &extra)
    }

    /// A verdict from the verdict API for one session of service `id`. Refused when the
    /// service is not active (its flows are gone; the verdict would outlive it).
    pub fn session_verdict(
        &mut self,
        id: u32,
        session: &steering::Session,
        allow: bool,
    ) -> Result<bool, OfError> {
        if !self.services.get(&id).is_some_and(|s| s.active) {
            return Ok(false);
        }
        let Some(f) = steering::session_verdict_flow(id, session, allow) else {
            return Ok(false);
        };
        self.conn.flow_mods(&[(f, FlowModCommand::Add)])?;

        Ok(true)
    }

    /// Reconnects after the switch restarted and makes it hold every flow again, in one bundle
    /// (a switch started with `flow-restore-wait` forwards nothing until then).
    pub fn resync(&mut self, timeout: Duration) -> Result<(), OfError> {
        self.conn = self.conn.reconnect(timeout)?;
        self.installed = Installed::read(&mut self.conn)?;
        let mut cookies = vec![steering::BASE_COOKIE];
        let mut desired = steering::base_flows();
        let ids: Vec<u32> = self.services.keys().copied().collect();
        for id in ids {
            cookies.push(steering::service_cookie(id, false));
            cookies.push(steering::service_cookie(id, true));
            desired.extend(self.desired(id));
        }
        // Whatever else carries our cookies (services that are gone) goes too.
        cookies.extend(self.installed.cookies());
        cookies.sort_unstable();
        cookies.dedup();
        self.sync(&cookies, desired, &[])
    }

    /// Is the switch still answering on our connection?
    pub fn alive(&mut self) -> bool {
        self.conn.echo().is_ok()
    }

    /// Steering counters of service `id`.
    pub fn counters(&mut self, id: u32) -> Result<Counters, OfError> {
        let Some(port) = self.services.get(&id).map(|s| s.port) else {
            return Ok(Counters::default());
        };
        let mut c = Counters::default();
        for s in self
            .conn
            .flow_stats(steering::service_cookie(id, false), u64::MAX)?
        {
            let outputs_to_service =
                s.flow.instructions.iter().any(
                    |i| matches!(i, Instruction::Apply(a) if a.contains(&Action::Output(port))),
                );
            if outputs_to_service {
                c.steered_packets += s.packet_count;
                c.steered_bytes += s.byte_count;
            } else if s.flow.table == steering::TABLE_VERDICT {
                c.returned_packets += s.packet_count;
                let pcp = s.flow.matches.iter().find_map(|m| match m {
                    crate::ofp::Field::VlanPcp(p) => Some(*p),
                    _ => None,
                });
                let slot = match pcp {
                    Some(0) => &mut c.verdicts.forward,
                    Some(1) => &mut c.verdicts.allow,
                    Some(2) => &mut c.verdicts.block,
                    Some(3) => &mut c.verdicts.reply,
                    _ => continue,
                };
                *slot += s.packet_count;
            }
        }
        Ok(c)
    }

    /// Bytes forwarded by the base pipeline (the fast path), from its flows' counters.
    pub fn fast_path_bytes(&mut self) -> Result<u64, OfError> {
        Ok(self
            .conn
            .flow_stats(steering::BASE_COOKIE, u64::MAX)?
            .iter()
            .filter(|s| {
                s.flow.table == steering::TABLE_POST_CT || s.flow.table == steering::TABLE_PRE_CT
            })
            .filter(|s| {
                s.flow
                    .matches
                    .iter()
                    .all(|m| !matches!(m, crate::ofp::Field::CtState(0, _)))
            })
            .map(|s| s.byte_count)
            .sum())
    }

    /// All flows on the bridge with counters (for `gatevisor flows`).
    pub fn dump(&mut self) -> Result<Vec<crate::ofp::FlowStats>, OfError> {
        self.conn.flow_stats(0, 0)
    }
}
