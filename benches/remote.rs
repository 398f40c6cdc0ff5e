//! `sudo cargo bench -p gatevisor --bench remote`: the launcher's view of remote control, with
//! a real daemon (LXC runtime here), its private Open vSwitch, a real mosquitto and the USP
//! Controller test peer. Last line, one JSON object:
//! - `install_to_forwarding_ms_p50`/`_p95`: the Controller sends `InstallDU()` of a cached
//!   signed dns-filter package (file URL), then `SetRequestedState(Active)` when the
//!   `DUStateChange!` says Installed, until the first steered DNS query from a LAN host is
//!   answered by the new service (NXDOMAIN for a blocked name); then Uninstall, 10 rounds;
//! - `notify_latency_ms_p50`: the supervisor's Installed/Removed event (its timestamp) until the
//!   Controller holds the `DUStateChange!`;
//! - `agent_idle_rss_kib`: the daemon's resident set with the agent connected and idle.

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
            "rounds": ROUNDS,
            "runtime": "lxc",
        })
    );
}
