//! flowbridge: plugs gatevisor services into the gateway's Open vSwitch bridge.
//!
//! - [`ovsdb`]: a native OVSDB client (JSON-RPC, RFC 7047) over the database's Unix socket:
//!   ensure a bridge with a given datapath type, add and remove ports marked as gatevisor's
//!   through `external_ids`, list and monitor ports, and wait until `ovs-vswitchd` has applied
//!   a change;
//! - [`private`]: the embedded default, a private `ovsdb-server` + `ovs-vswitchd` under our own
//!   run directory, for boards without a system Open vSwitch;
//! - [`ofp`] and [`ofconn`]: the OpenFlow 1.3 codec (with the Nicira conntrack extensions and
//!   ONF bundles) and one persistent connection to a bridge's management socket;
//! - [`steering`]: steering policies compiled to flows (a base pipeline that forwards
//!   everything, per-service steering, conntrack verdicts kept on one fast-path rule);
//! - [`controller`]: owns a bridge's flows, applies each service's change as one atomic
//!   bundle (activate, fail open or closed, session verdicts) and resyncs after a switch
//!   restart.

pub mod controller;
pub mod ofconn;
pub mod ofp;
pub mod ovsdb;
pub mod private;
pub mod steering;
