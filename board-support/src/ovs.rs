//! Is a system Open vSwitch running? Its database socket answers a connect.

use serde::{Deserialize, Serialize};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Where Debian's and upstream's `ovsdb-server` put their socket.
pub const SYSTEM_DB_SOCKETS: &[&str] =
    &["/run/openvswitch/db.sock", "/var/run/openvswitch/db.sock"];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OvsReport {
    /// The socket of a running system `ovsdb-server`, if one answers.
    pub system_db_socket: Option<String>,
    /// `ovsdb-server` and `ovs-vswitchd` are installed, so a private instance can be started.
    pub binaries_installed: bool,
}

pub fn probe() -> OvsReport {
    OvsReport {
        system_db_socket: SYSTEM_DB_SOCKETS
            .iter()
            .find(|p| UnixStream::connect(p).is_ok())
            .map(|p| p.to_string()),
        binaries_installed: ["ovsdb-server", "ovs-vswitchd"]
            .iter()
            .all(|b| find_sbin(b).is_some()),
    }
}

/// Finds an executable in the usual system directories, PATH first.
pub fn find_sbin(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}
