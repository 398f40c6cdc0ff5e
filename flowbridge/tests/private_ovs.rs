//! Against a real, private Open vSwitch: bridge and port management through our OVSDB client,
//! checked with `ovs-vsctl` as an independent reader. Needs root (veth) and OVS installed.

mod common;
use common::need;
use flowbridge::controller::Controller;
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
    assert_eq!(
        vsctl(&ovs, &["get", "Bridge", "gvt-br0", "fail_mode"]),
        "secure"
    );
    // A bridge an earlier version made standalone is made secure.
    vsctl(&ovs, &["set", "Bridge", "gvt-br0", "fail_mode=standalone"]);
    assert!(!db.ensure_bridge("gvt-br0", "netdev").unwrap());
    assert_eq!(
        vsctl(&ovs, &["get", "Bridge", "gvt-br0", "fail_mode"]),
        "secure"
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
    // The gateway's own bridge keeps its fail mode.
    vsctl(
        &ovs,
        &[
            "add-br",
            "gvt-br2",
            "--",
            "set",
            "Bridge",
            "gvt-br2",
            "datapath_type=netdev",
        ],
    );
    assert!(!db.ensure_bridge("gvt-br2", "netdev").unwrap());
    assert_eq!(
        vsctl(&ovs, &["get", "Bridge", "gvt-br2", "fail_mode"]),
        "[]"
    );
    let _veth = Veth::new("gvt-own1");
    vsctl(&ovs, &["add-port", "gvt-br1", "gvt-own1"]);
    let e = db.del_port("gvt-br1", "gvt-own1").unwrap_err().to_string();
    assert!(e.contains("not owned by gatevisor"), "{e}");
    assert_eq!(vsctl(&ovs, &["list-ports", "gvt-br1"]), "gvt-own1");
    assert!(db.add_port("no-such-br", "x", "s").is_err());
}

#[test]
fn a_restarted_switch_forwards_nothing_until_its_flows_are_back() {
    if !need("a_restarted_switch_forwards_nothing_until_its_flows_are_back") {
        return;
    }
    let mut sw = common::Switch::new("gvt-br3");
    let a = common::lab::Host::new("pa", Some("10.86.0.1/24"));
    let b = common::lab::Host::new("pb", Some("10.86.0.2/24"));
    let mut db = Ovsdb::connect(&sw.ovs.db_socket()).unwrap();
    for (h, name) in [(&a, "a"), (&b, "b")] {
        db.add_port("gvt-br3", &h.host_if, name).unwrap();
    }
    db.wait_applied(Duration::from_secs(10)).unwrap();
    let mut ctl = Controller::connect(&sw.mgmt(), Duration::from_secs(10)).unwrap();
    assert!(
        common::lab::wait_reachable(&a.ns, "10.86.0.2"),
        "the base pipeline forwards"
    );
    let ping = || {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &a.ns,
                "ping",
                "-c2",
                "-i0.2",
                "-W1",
                "10.86.0.2",
            ])
            .output()
            .unwrap()
            .status
            .success()
    };

    // ovs-vswitchd dies and comes back the way a system switch restarted without ovs-ctl's
    // save and restore would: without flow-restore-wait, nobody restoring flows yet.
    let pid: i32 = std::fs::read_to_string(sw.ovs.run_dir().join("ovs-vswitchd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    // As the daemon's check does: until the dead daemon (all its threads gone) is restarted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sw.ovs.restart_dead(false, false).unwrap().vswitchd {
        assert!(
            std::time::Instant::now() < deadline,
            "ovs-vswitchd never ended"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Up again, its ports back, no flow of ours: a secure bridge forwards nothing (a
    // standalone one would switch everything with its default NORMAL flow).
    let flows = |sw: &common::Switch| {
        let out = Command::new("ovs-ofctl")
            .args(["-O", "OpenFlow13", "dump-flows", "--no-stats"])
            .arg(format!("unix:{}", sw.mgmt().display()))
            .output()
            .unwrap();
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains("actions="))
                .map(String::from)
                .collect::<Vec<_>>()
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while flows(&sw).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the switch did not come back"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        flows(&sw),
        Some(vec![]),
        "no flow of ours, none added by the switch"
    );
    assert!(!ping(), "forwarded with no flows");
    // The daemon's controller puts its flows back: forwarding resumes.
    ctl.resync(Duration::from_secs(10)).unwrap();
    assert!(common::lab::wait_reachable(&a.ns, "10.86.0.2"));
}
