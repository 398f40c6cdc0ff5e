//! flowbridge: plugs gatevisor services into the gateway's Open vSwitch bridge.
//!
//! What exists so far:
//! - [`ovsdb`]: a native OVSDB client (JSON-RPC, RFC 7047) over the database's Unix socket:
//!   ensure a bridge with a given datapath type, add and remove ports marked as gatevisor's
//!   through `external_ids`, list ports, and wait until `ovs-vswitchd` has applied a change;
//! - [`private`]: the embedded default, a private `ovsdb-server` + `ovs-vswitchd` under our own
//!   run directory, for boards without a system Open vSwitch.
//!
//! The OpenFlow client, the steering policies and the verdict API come next (see the
//! flowbridge issue); nothing here installs flows yet.

pub mod controller;
pub mod ofconn;
pub mod ofp;
pub mod ovsdb;
pub mod private;
pub mod steering;
