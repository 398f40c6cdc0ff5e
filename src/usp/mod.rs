//! Remote control by the operator's launcher over USP (TR-369) with the TR-181
//! `Device.SoftwareModules.` data model: the transport-independent [`model`], the
//! [`codec`] (rusp-lib behind a trait) and the MQTT 5 agent transport ([`mqtt`]).

pub mod codec;
pub mod fetch;
pub mod model;
pub mod mqtt;
pub mod path;
pub mod schema;
pub mod uds;
