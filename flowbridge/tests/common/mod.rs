//! A private Open vSwitch with one bridge, for tests. Needs root and OVS installed.
#![allow(dead_code)]

pub mod lab;

use flowbridge::ovsdb::Ovsdb;
use flowbridge::private::PrivateOvs;
use std::process::Command;
use std::time::Duration;

pub fn need(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped {test}: needs root");
        return false;
    }
    if gatevisor_board::ovs::find_sbin("ovs-vswitchd").is_none() {
        eprintln!("skipped {test}: Open vSwitch is not installed");
        return false;
    }
    true
}

/// Fields drop in order: the switch must stop (and clean up its datapath) before its run
/// directory is removed.
pub struct Switch {
    pub ovs: PrivateOvs,
    pub bridge: String,
    pub dir: tempfile::TempDir,
}

impl Switch {
    pub fn new(bridge: &str) -> Switch {
        let dir = tempfile::Builder::new().prefix("gv-ovs").tempdir().unwrap();
        let ovs = PrivateOvs::start(&dir.path().join("ovs")).unwrap();
        let mut db = Ovsdb::connect(&ovs.db_socket()).unwrap();
        db.ensure_bridge(bridge, "netdev").unwrap();
        db.wait_applied(Duration::from_secs(10)).unwrap();
        Switch {
            ovs,
            bridge: bridge.into(),
            dir,
        }
    }

    pub fn mgmt(&self) -> std::path::PathBuf {
        self.ovs.mgmt_socket(&self.bridge)
    }

    pub fn ofctl(&self, args: &[&str]) -> String {
        let out = Command::new("ovs-ofctl")
            .arg("-O")
            .arg("OpenFlow13")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ovs-ofctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn dump_flows(&self) -> Vec<String> {
        let mgmt = format!("unix:{}", self.mgmt().display());
        self.ofctl(&["dump-flows", "--no-stats", &mgmt])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty() && !l.starts_with("OFPST_FLOW"))
            .collect()
    }
}
