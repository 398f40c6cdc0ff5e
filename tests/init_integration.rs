//! The daemon under an init system: sd_notify READY/WATCHDOG/STOPPING to a real datagram
//! socket, and the shipped unit and procd script are well-formed.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

#[test]
fn daemon_notifies_ready_pings_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut d = Daemon::start_with_env(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
    ]);
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while got
        .iter()
        .filter(|m: &&String| m.as_str() == "WATCHDOG=1")
        .count()
        < 2
    {
        let n = sock.recv(&mut buf).expect("notify message");
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(got[0].starts_with("READY=1\n"), "{got:?}");
    assert!(got[0].contains(&format!("MAINPID={}", d.pid())), "{got:?}");
    assert!(d.term().success());
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING=1 before exit");
        if &buf[..n] == b"STOPPING=1" {
            break;
        }
    }
}

#[test]
fn systemd_unit_is_notify_type_with_watchdog_and_keeps_services_on_restart() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/dist/systemd/gatevisor.service"
    ))
    .unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "KillMode=process",
        "ExecStart=/usr/sbin/gatevisor daemon",
    ] {
        assert!(unit.lines().any(|l| l.starts_with(line)), "missing {line}");
    }
}

#[test]
fn openwrt_init_script_parses_and_uses_procd_respawn() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/openwrt/gatevisor.init");
    let status = std::process::Command::new("sh")
        .arg("-n")
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success(), "sh -n {path}");
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains("USE_PROCD=1") && text.contains("procd_set_param respawn"));
}
