//! gatevisor: runs third-party end-user services on a broadband gateway, each isolated in an
//! LXC container or a KVM microVM, supervised from one daemon.
//!
//! The library holds everything but the command line: the control API ([`api`]), its client,
//! the service manifest, each service's plan (what it runs as, resolved at install), the
//! lifecycle table, the crash-safe state store, the event log, the
//! runtime backends ([`runtime`]: LXC, microVM), the supervisor that reconciles desired and
//! actual state, and the systemd notify protocol. The
//! binary (`src/main.rs`) is a thin CLI and the daemon's wiring.

pub mod api;
pub mod board;
pub mod client;
pub mod events;
pub mod hostcall;
pub mod lifecycle;
pub mod manifest;
pub mod microvm;
pub mod network;
pub mod notify;
pub mod package;
pub mod plan;
pub mod policy;
pub mod proc;
pub mod runtime;
pub mod settings;
pub mod state;
pub mod supervisor;
pub mod usp;
pub mod verdict;
