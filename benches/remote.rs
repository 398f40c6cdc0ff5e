//! `sudo cargo bench -p gatevisor --bench remote`: the launcher's view of remote control, with
//! a real daemon (LXC runtime here), its private Open vSwitch, a real mosquitto and the USP
//! Controller test peer. Last line, one JSON object:
//! - `install_to_forwarding_ms_p50`/`_p95`: the Controller sends `InstallDU()` of a cached
//!   signed dns-filter package (file URL), then `SetRequestedState(Active)` when the
//!   `DUStateChange!` says Installed, until the first steered DNS query from a LAN host is
//!   answered by the new service (NXDOMAIN for a blocked name); then Uninstall, 10 rounds;
//! - `notify_latency_ms_p50`: the supervisor's Installed/Removed event (its timestamp) until the
//!   Controller holds the `DUStateChange!`;
//! - `agent_idle_rss_kib`: the daemon's resident set with the agent connected and idle;
//! - `set_to_effect_ms_p50`/`_p95`: the shipped dns-filter package (its profiles are the
//!   operator's settings) runs; the Controller sends a Set of its `DefaultBlock` setting that
//!   adds a new name, until a LAN lookup of that name is answered NXDOMAIN, 10 rounds.
//!   Peer: `ovs_ofctl_add_flow_ms_p50`, one `ovs-ofctl add-flow` on the same bridge (the
//!   cost of the smallest change an operator could make to the data path by hand).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/home.rs"]
mod home;
#[path = "../flowbridge/tests/common/lab.rs"]
mod lab;
#[path = "../tests/common/usp_peer.rs"]
mod usp_peer;

use common::*;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use usp_peer::*;

const ROUNDS: usize = 10;

fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0
}

/// The `at_ms` of the latest supervisor event of `kind` for `service`.
fn event_ms(d: &Daemon, kind: &str, service: &str) -> Option<f64> {
    let out = d.cli(&["events", "--last", "50", "--json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["kind"] == kind && e["service"] == service)
        .and_then(|e| e["at_ms"].as_f64())
}

fn main() {
    if !need_ovs("the remote benchmark") || !on_path("mosquitto") {
        println!(
            "{}",
            serde_json::json!({"error": "needs root, Open vSwitch and mosquitto"})
        );
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (_broker, port) = mosquitto(work.path());
    let d = Daemon::start_with_config(&agent_config(port));

    let pkg = home::dns_filter_package(&d, "remote-dnsf");
    let url = format!("file://{}", pkg.display());
    let home = home::Home::new(&d, "r", "10.97.0");

    let mut c = Controller::connect(port, LAUNCHER, LAUNCHER_TOPIC);
    wait_for_agent(&mut c);
    subscribe(&mut c, "du", "Event", &format!("{SM}DUStateChange!"));
    subscribe(&mut c, "oc", "OperationComplete", SM);
    // The agent idles for a while before its resident set is read.
    std::thread::sleep(Duration::from_secs(3));
    let rss = std::fs::read_to_string(format!("/proc/{}/status", d.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap();

    let mut install = Vec::new();
    let mut notify = Vec::new();
    for round in 0..ROUNDS {
        assert!(!home.filtered(), "no service filters before the install");
        let t0 = Instant::now();
        let key = format!("i{round}");
        operate(&mut c, &format!("{SM}InstallDU()"), &key, &[("URL", &url)]);
        let ev = du_state_change(&c);
        let got = now_ms();
        assert_eq!(ev["CurrentState"], "Installed", "{ev}");
        let eu = ev["ExecutionUnitRefList"].as_str().unwrap().to_string();
        operate(
            &mut c,
            &format!("{eu}.SetRequestedState()"),
            "s",
            &[("RequestedState", "Active")],
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !home.filtered() {
            assert!(Instant::now() < deadline, "the service never filtered");
        }
        install.push(t0.elapsed().as_secs_f64() * 1000.0);
        if let Some(at) = event_ms(&d, "installed", "remote-dnsf") {
            notify.push(got - at);
        }
        let du = ev["DeploymentUnitRef"].as_str().unwrap().to_string();
        operate(&mut c, &format!("{du}.Uninstall()"), "u", &[]);
        let ev = du_state_change(&c);
        let got = now_ms();
        assert_eq!(ev["CurrentState"], "Uninstalled", "{ev}");
        if let Some(at) = event_ms(&d, "removed", "remote-dnsf") {
            notify.push(got - at);
        }
        eprintln!(
            "round {round}: install to forwarding {:.0} ms",
            install[round]
        );
    }
    // The operator's settings: a Set of dns-filter's DefaultBlock until the new name is
    // blocked for the LAN host.
    let shipped = d.example_package("dns-filter");
    d.install_package_started(&shipped);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !home.filtered() {
        assert!(
            Instant::now() < deadline,
            "the shipped dns-filter never filtered"
        );
    }
    let eu = unit_path(&mut c, "ExecutionUnit", "dns-filter");
    let setting = format!("{eu}X_GATEVISOR-ORG_Setting.[Name==\"DefaultBlock\"].");
    let mut set_to_effect = Vec::new();
    for round in 0..ROUNDS {
        let name = format!("set{round}.test");
        assert!(!home.blocked(&name), "{name} is not blocked yet");
        let t0 = Instant::now();
        let r = set(
            &mut c,
            &setting,
            &[("Value", &format!("malware.test,{name}"))],
        );
        assert!(r["Response"]["SetResp"].is_object(), "{r}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !home.blocked(&name) {
            assert!(Instant::now() < deadline, "the Set never took effect");
        }
        set_to_effect.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    // The peer: one flow added by hand with ovs-ofctl on the same bridge (a table the
    // pipeline does not use; removed again).
    let mgmt = d.ofctl_target();
    let mut add_flow = Vec::new();
    for i in 0..ROUNDS {
        let t0 = Instant::now();
        let st = std::process::Command::new("ovs-ofctl")
            .args([
                "-O",
                "OpenFlow13",
                "add-flow",
                &mgmt,
                &format!(
                    "cookie=0x7e57,table=250,priority=1,udp,tp_dst={},actions=drop",
                    40000 + i
                ),
            ])
            .status()
            .unwrap();
        assert!(st.success());
        add_flow.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    let _ = std::process::Command::new("ovs-ofctl")
        .args(["-O", "OpenFlow13", "del-flows", &mgmt, "cookie=0x7e57/-1"])
        .status();
    drop(home);
    let notify_p50 = (!notify.is_empty()).then(|| percentile(&mut notify, 0.5));
    println!(
        "{}",
        serde_json::json!({
            "install_to_forwarding_ms_p50": percentile(&mut install, 0.5),
            "install_to_forwarding_ms_p95": percentile(&mut install, 0.95),
            "notify_latency_ms_p50": notify_p50,
            "notify_samples": notify.len(),
            "agent_idle_rss_kib": rss,
            "set_to_effect_ms_p50": percentile(&mut set_to_effect, 0.5),
            "set_to_effect_ms_p95": percentile(&mut set_to_effect, 0.95),
            "ovs_ofctl_add_flow_ms_p50": percentile(&mut add_flow, 0.5),
            "rounds": ROUNDS,
            "runtime": "lxc",
        })
    );
}
