//! Against a real, private Open vSwitch: bridge and port management through our OVSDB client,
//! checked with `ovs-vsctl` as an independent reader. Needs root (veth) and OVS installed.

mod common;
use common::need;
use flowbridge::ovsdb::{Ovsdb, OWNER_KEY, SERVICE_KEY};
use flowbridge::private::PrivateOvs;
use std::process::Command;
use std::time::Duration;

fn vsctl(ovs: &PrivateOvs, args: &[&str]) -> String {
    let out = Command::new("ovs-vsctl")
        .arg(format!("--db=unix:{}", ovs.db_socket().display()))
        .arg("--no-wait")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ovs-vsctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

struct Veth(String);
impl Veth {
    fn new(name: &str) -> Veth {
        let _ = Command::new("ip")
            .args(["link", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
        let st = Command::new("ip")
            .args([
                "link",
                "add",
                name,
                "type",
                "veth",
                "peer",
                "name",
                &format!("{name}p"),
            ])
            .status()
            .unwrap();
        assert!(st.success());
        Command::new("ip")
            .args(["link", "set", name, "up"])
            .status()
            .unwrap();
        Veth(name.into())
    }
}
impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

#[test]
fn private_switch_starts_creates_bridge_and_plugs_owned_ports() {
    if !need("private_switch_starts_creates_bridge_and_plugs_owned_ports") {
        return;
    }
    let dir = tempfile::Builder::new().prefix("gv-ovs").tempdir().unwrap();
    let ovs = PrivateOvs::start(&dir.path().join("ovs")).unwrap();
    let mut db = Ovsdb::connect(&ovs.db_socket()).unwrap();

    assert!(db.ensure_bridge("gvt-br0", "netdev").unwrap());
    assert!(
        !db.ensure_bridge("gvt-br0", "netdev").unwrap(),
        "second call keeps it"
    );
    db.wait_applied(Duration::from_secs(10)).unwrap();
    assert_eq!(
        vsctl(&ovs, &["get", "Bridge", "gvt-br0", "datapath_type"]),
        "netdev"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ovs.mgmt_socket("gvt-br0").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        ovs.mgmt_socket("gvt-br0").exists(),
        "OpenFlow management socket"
    );

    let _veth = Veth::new("gvt-svc0");
    db.add_port("gvt-br0", "gvt-svc0", "svc0").unwrap();
    db.wait_applied(Duration::from_secs(10)).unwrap();
    assert_eq!(vsctl(&ovs, &["list-ports", "gvt-br0"]), "gvt-svc0");
    let ids = vsctl(&ovs, &["get", "Port", "gvt-svc0", "external_ids"]);
    assert!(
        ids.contains(OWNER_KEY) && ids.contains(&format!("{SERVICE_KEY}=svc0")),
        "{ids}"
    );
    let ports = db.ports("gvt-br0").unwrap();
    let svc = ports.iter().find(|p| p.name == "gvt-svc0").unwrap();
    assert!(
        svc.ofport.is_some(),
        "vswitchd assigned an OpenFlow port: {ports:?}"
    );

    assert!(db.del_port("gvt-br0", "gvt-svc0").unwrap());
    assert!(!db.del_port("gvt-br0", "gvt-svc0").unwrap());
    assert_eq!(vsctl(&ovs, &["list-ports", "gvt-br0"]), "");
}

#[test]
fn ports_not_owned_by_gatevisor_are_never_removed() {
    if !need("ports_not_owned_by_gatevisor_are_never_removed") {
        return;
    }
    let dir = tempfile::Builder::new().prefix("gv-ovs").tempdir().unwrap();
    let ovs = PrivateOvs::start(&dir.path().join("ovs")).unwrap();
    let mut db = Ovsdb::connect(&ovs.db_socket()).unwrap();
    db.ensure_bridge("gvt-br1", "netdev").unwrap();
    let _veth = Veth::new("gvt-own1");
    vsctl(&ovs, &["add-port", "gvt-br1", "gvt-own1"]);
    let e = db.del_port("gvt-br1", "gvt-own1").unwrap_err().to_string();
    assert!(e.contains("not owned by gatevisor"), "{e}");
    assert_eq!(vsctl(&ovs, &["list-ports", "gvt-br1"]), "gvt-own1");
    assert!(db.add_port("no-such-br", "x", "s").is_err());
}
