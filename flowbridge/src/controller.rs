//! The steering controller: owns the OpenFlow connection to one bridge and the flows each
//! service should have, and applies every change as one atomic bundle.
//!
//! - `activate`: the service is ready: its fail-closed drops (if any) are replaced by its
//!   steering flows in one bundle.
//! - `deactivate`: the service stopped, crashed or was removed: its steering flows go, and for
//!   `closed` its class is dropped, again in one bundle. With `open` the base pipeline forwards
//!   its class at once.
//! - `resync`: after the switch restarted (flows lost), reconnect and reinstall everything.

use std::collections::BTreeMap;
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
    policies: Vec<Policy>,
    failure_mode: FailureMode,
    active: bool,
}

/// Packets and bytes steered to a service, from its flows' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub steered_packets: u64,
    pub steered_bytes: u64,
    /// Packets the service sent back with a verdict or as an answer.
    pub returned_packets: u64,
    /// Of those, by verdict.
    pub verdicts: VerdictCounts,
}

/// Packets a service returned, by the verdict they carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct VerdictCounts {
    pub forward: u64,
    pub allow: u64,
    pub block: u64,
    pub reply: u64,
}

pub struct Controller {
    conn: OfConn,
    services: BTreeMap<u32, ServiceSteering>,
    /// `ovs-vswitchd`'s unixctl socket, to purge cached datapath flows after a change.
    vswitchd_ctl: Option<std::path::PathBuf>,
}

fn adds(flows: Vec<Flow>) -> impl Iterator<Item = (Flow, FlowModCommand, u64)> {
    flows.into_iter().map(|f| (f, FlowModCommand::Add, 0))
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
    /// Connects to the bridge's management socket and installs the base pipeline.
    pub fn connect(mgmt: &Path, timeout: Duration) -> Result<Controller, OfError> {
        let conn = OfConn::connect(mgmt, timeout)?;
        let mut c = Controller {
            conn,
            services: BTreeMap::new(),
            vswitchd_ctl: None,
        };
        c.install_base()?;
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

    fn install_base(&mut self) -> Result<(), OfError> {
        let mut mods = vec![delete_cookie(steering::BASE_COOKIE)];
        mods.extend(adds(steering::base_flows()));
        self.conn.bundle(&mods)
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
        self.services.insert(
            id,
            ServiceSteering {
                port,
                policies,
                failure_mode,
                active: false,
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

    /// Forgets the service and removes all its flows.
    pub fn remove_service(&mut self, id: u32) -> Result<(), OfError> {
        self.services.remove(&id);
        self.conn.bundle(&[
            delete_cookie(steering::service_cookie(id, false)),
            delete_cookie(steering::service_cookie(id, true)),
        ])?;
        self.purge_datapath();
        Ok(())
    }

    /// Makes the switch hold exactly the flows service `id` should have now.
    fn apply(&mut self, id: u32) -> Result<(), OfError> {
        let mut mods = vec![
            delete_cookie(steering::service_cookie(id, false)),
            delete_cookie(steering::service_cookie(id, true)),
        ];
        if let Some(s) = self.services.get(&id) {
            if s.active {
                let fail_open = s.failure_mode == FailureMode::Open;
                mods.extend(adds(steering::service_flows(
                    id,
                    s.port,
                    &s.policies,
                    fail_open,
                )));
            } else if s.failure_mode == FailureMode::Closed {
                mods.extend(adds(steering::failed_closed_flows(id, &s.policies)));
            }
        }
        self.conn.bundle(&mods)?;
        self.purge_datapath();
        Ok(())
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
        let f = steering::session_verdict_flow(id, session, allow);
        self.conn.flow_mods(&[(f, FlowModCommand::Add)])?;
        Ok(true)
    }

    /// Reconnects and reinstalls the base pipeline and every service's flows.
    pub fn resync(&mut self, timeout: Duration) -> Result<(), OfError> {
        self.conn = self.conn.reconnect(timeout)?;
        self.install_base()?;
        let ids: Vec<u32> = self.services.keys().copied().collect();
        for id in ids {
            self.apply(id)?;
        }
        Ok(())
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
