//! Scenarios on the emulated gateway: each boots a fresh gateway (a qcow2 overlay of the same
//! image) and drives it the way a field engineer would, through gatevisor's CLI inside it.
//! Off unless GATEVISOR_QEMU_TESTS=1 (scripts/test.sh sets it); see the README's qemu-tests
//! section.

use qemu_tests::gateway::addr;
use qemu_tests::Gateway;

/// Boots a gateway, or prints why the scenario is skipped and returns None.
fn gateway() -> Option<Gateway> {
    if let Some(why) = qemu_tests::skip_reason() {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(Gateway::boot().expect("the emulated gateway boots"))
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn gatevisor_starts_from_systemd_and_sees_hardware_kvm() {
    let Some(gw) = gateway() else { return };
    assert_eq!(
        gw.ok("systemctl is-active gatevisor").unwrap().trim(),
        "active"
    );
    let board = json(&gw.ok("gatevisor board --json").unwrap());
    assert_eq!(board["kvm"]["kind"], "hardware-amd", "{board:#}");
    assert_eq!(board["auto_runtime"], "microvm", "{board:#}");
    assert_eq!(board["profile"]["name"], "emulated-gateway");
    assert_eq!(board["cgroup"]["version"], "v2", "{board:#}");
    // The gateway's own network is up: the LAN client reaches the WAN host through it.
    gw.lan
        .sh(&format!("ping -c1 -W5 {}", addr::WAN_HOST))
        .expect("LAN → WAN through the gateway");
}
