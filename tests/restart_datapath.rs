//! The data path through restarts, under load: a LAN host looks up a name dns-filter blocks
//! ~100 times a second and downloads from a WAN server in a loop while
//! - the daemon is killed (-9) and restarted 20 times: no lookup is answered unfiltered, no
//!   download fails, the service keeps its PID, the flows stay exactly as they were (same
//!   cookies, counters that keep counting), the switch connection is never lost, and no LAN or
//!   WAN address is ever learned on the service's port;
//! - the private `ovs-vswitchd` is killed: the daemon restarts it alone, with
//!   `flow-restore-wait`, so forwarding and filtering come back with the same flows, neither a
//!   fail-closed nor a fail-open service's class leaks during the gap, and nothing is left a
//!   zombie;
//! - the service itself is killed: it is steered to again only once it said it is ready, so
//!   no lookup is sent to a service that cannot answer yet.
//!
//! Needs root, liblxc and Open vSwitch; builds dns-filter statically. One test at a time: two
//! private userspace switches cannot share a network namespace.

mod common;
#[path = "common/home.rs"]
mod home;
#[path = "../flowbridge/tests/common/lab.rs"]
mod lab;
#[path = "common/traffic.rs"]
mod traffic;

use common::*;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use traffic::*;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Children of `pid` that are zombies.
fn zombie_children(pid: i32) -> Vec<String> {
    let mut z = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() == Some(&"Z") && f.get(1) == Some(&pid.to_string().as_str()) {
            z.push(head.to_string());
        }
    }
    z
}

fn init_pid(d: &Daemon, name: &str) -> i64 {
    d.status(name)["init_pid"].as_i64().unwrap_or(0)
}

/// The inodes of the packet sockets open in a network namespace (`/proc/net/packet` read from
/// a thread inside it).
fn packet_sockets_in(ns: &std::fs::File) -> Vec<String> {
    let ns = ns.try_clone().unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let table = std::fs::read_to_string("/proc/thread-self/net/packet").unwrap();
        table
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().last().map(String::from))
            .collect()
    })
    .join()
    .unwrap()
}

/// The inodes of the sockets process `pid` holds.
fn sockets_of(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect()
}

/// The daemon with dns-filter (`failure_mode`) running and filtering for a LAN host.
fn setup(failure_mode: &str, tag: &str, net: &str) -> (Daemon, home::Home, String) {
    let d = Daemon::start_with_keys();
    let name = format!("rd-{tag}");
    let pkg = home::dns_filter_package_with(&d, &name, failure_mode);
    let home = home::Home::new(&d, tag, net);
    d.install_package_started(&pkg);
    let filtering = d.wait_for(Duration::from_secs(20), || home.filtered().then_some(()));
    assert!(
        filtering.is_some(),
        "dns-filter never filtered; log:\n{}",
        String::from_utf8_lossy(&d.cli(&["service", "logs", &name]).stdout)
    );
    (d, home, name)
}

#[test]
fn twenty_daemon_kills_leave_the_data_path_alone() {
    if !need_ovs("twenty_daemon_kills_leave_the_data_path_alone") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (mut d, home, name) = setup("open", "rk", "10.93.0");
    // iot-guard as shipped: every new TCP session (the downloads) crosses it until its
    // verdict, so it sends frames of LAN and WAN hosts back through its port all the time.
    d.install_package_started(&d.example_package("iot-guard"));
    let pid = init_pid(&d, &name);
    let iot_pid = init_pid(&d, "iot-guard");
    assert!(pid > 0 && iot_pid > 0);
    let svc_ports = [
        ofport(&d, &format!("gv-{name}")),
        ofport(&d, "gv-iot-guard"),
    ];
    let load = Load::start(&home);
    std::thread::sleep(Duration::from_secs(1));
    let mut before = flows(&d);
    let mut ready_ms = Vec::new();
    for i in 0..20 {
        d.kill9();
        let t = Instant::now();
        d.spawn();
        let up = d.wait_for(Duration::from_secs(20), || {
            (d.status(&name)["state"] == "running").then_some(())
        });
        assert!(up.is_some(), "restart {i}: {} not running", name);
        ready_ms.push(t.elapsed().as_millis());
        assert_eq!(
            init_pid(&d, &name),
            pid,
            "restart {i}: the service kept its PID"
        );
        std::thread::sleep(Duration::from_millis(300));
        let after = flows(&d);
        assert_eq!(
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>(),
            "restart {i}: the same flows with the same cookies"
        );
        for (k, n) in &before {
            assert!(
                after[k] >= *n,
                "restart {i}: {k:?} was replaced (its counter went from {n} to {})",
                after[k]
            );
        }
        before = after;
        // The next kill lands at another point of the lookups' and downloads' cycles.
        std::thread::sleep(Duration::from_millis(200 + 37 * (i % 7)));
    }
    std::thread::sleep(Duration::from_secs(1));
    let seen = load.stop();
    let line = seen.line();
    eprintln!("{line}; daemon ready after restart, ms: {ready_ms:?}");
    assert_eq!(seen.unfiltered.load(Ordering::SeqCst), 0, "{line}");
    assert_eq!(seen.failed_downloads.load(Ordering::SeqCst), 0, "{line}");
    assert_eq!(seen.lost.load(Ordering::SeqCst), 0, "{line}");
    assert!(seen.filtered.load(Ordering::SeqCst) > 1500, "{line}");
    assert!(seen.downloads.load(Ordering::SeqCst) > 20, "{line}");
    // Nothing but the services' own addresses was learned on their ports.
    let (lan_mac, wan_mac) = (mac_in(&home.lan.ns), mac_in(&home.wan.ns));
    let steered = d.status("iot-guard")["steering"].to_string();
    eprintln!("iot-guard: {steered}");
    for (p, mac) in fdb(&d) {
        if svc_ports.contains(&p) {
            assert!(
                mac != lan_mac && mac != wan_mac,
                "{mac} learned on the service port {p}: {:?}",
                fdb(&d)
            );
        }
    }
    assert!(
        !d.log().contains("connection lost"),
        "the switch connection was lost:\n{}",
        d.log()
    );
}

#[test]
fn a_killed_switch_comes_back_with_the_same_flows_and_no_leak() {
    if !need_ovs("a_killed_switch_comes_back_with_the_same_flows_and_no_leak") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (mut d, home, name) = setup("closed", "rv", "10.94.0");
    let load = Load::start(&home);
    std::thread::sleep(Duration::from_secs(1));
    let before = flows(&d);
    // Round 0: the switch is the daemon's child; round 1: a restarted daemon attached to it.
    for round in 0..2 {
        if round == 1 {
            d.kill9();
            d.spawn();
        }
        // The daemon notices within its 1 s check and restarts ovs-vswitchd alone, on a
        // worker: `service list` keeps being answered meanwhile (when each answer came, in
        // wall-clock ms, is set against the events that bracket the restoring).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let lister = {
            let (socket, stop) = (d.socket(), stop.clone());
            std::thread::spawn(move || {
                let client = gatevisor::client::Client::new(&socket);
                let mut answered = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    if client.call(&gatevisor::api::Request::List).is_ok() {
                        answered.push(gatevisor::state::now_ms());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                answered
            })
        };
        let back = kill_switch_until_filtering(&d, &home);
        assert!(
            back.is_some(),
            "round {round}: filtering never came back:\n{}",
            d.log()
        );
        stop.store(true, Ordering::SeqCst);
        let answered = lister.join().unwrap();
        let out = d.cli(&["events", "--json", "-n", "200"]);
        let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let at = |kind: &str| {
            events
                .iter()
                .filter(|e| e["kind"] == kind)
                .filter_map(|e| e["at_ms"].as_u64())
                .next_back()
        };
        let (lost, restored) = (at("network-lost"), at("network-restored"));
        let (Some(lost), Some(restored)) = (lost, restored) else {
            panic!("round {round}: no network-lost and network-restored events: {events:?}");
        };
        assert!(
            answered.iter().any(|t| (lost + 1..restored).contains(t)),
            "round {round}: no list answered while the switch was restored ({lost}..{restored} ms): {answered:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            zombie_children(d.pid()).is_empty(),
            "round {round}: zombies left: {:?}",
            zombie_children(d.pid())
        );
    }
    let seen = load.stop();
    let line = seen.line();
    eprintln!("{line}");
    assert_eq!(
        seen.unfiltered.load(Ordering::SeqCst),
        0,
        "a fail-closed class leaked during the gap: {line}"
    );
    assert!(seen.downloads.load(Ordering::SeqCst) > 0, "{line}");
    let after = flows(&d);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the flows came back as they were"
    );
    assert!(
        !ovs_appctl(&d, &["dpif/show"]).is_empty(),
        "the new ovs-vswitchd answers"
    );
    let config = d.vsctl(&["get", "Open_vSwitch", ".", "other_config"]);
    let config = String::from_utf8_lossy(&config.stdout).into_owned();
    assert!(
        !config.contains("flow-restore-wait"),
        "the flag is cleared once the flows are back: {config}"
    );
    // Once restored, the connection stays: no reconnect loop in the steady state.
    std::thread::sleep(Duration::from_secs(15));
    let log = d.log();
    assert_eq!(
        log.matches("connection lost").count(),
        2,
        "one reconnect for each switch restart:\n{log}"
    );

    // The same service fail-open: the switch's gap does not open its class either (the
    // userspace datapath forwards nothing until every flow is back; fail-open is about the
    // service being down, not the switch).
    assert!(d.cli(&["service", "remove", &name]).status.success());
    let open = home::dns_filter_package_with(&d, "rv-open", "open");
    d.install_package_started(&open);
    let filtering = d.wait_for(Duration::from_secs(20), || home.filtered().then_some(()));
    assert!(filtering.is_some(), "the fail-open variant never filtered");
    let load = Load::start(&home);
    std::thread::sleep(Duration::from_millis(500));
    let back = kill_switch_until_filtering(&d, &home);
    assert!(back.is_some(), "fail-open: filtering never came back");
    std::thread::sleep(Duration::from_millis(500));
    let seen = load.stop();
    let line = seen.line();
    eprintln!("fail-open: {line}");
    assert_eq!(
        seen.unfiltered.load(Ordering::SeqCst),
        0,
        "fail-open: {line}"
    );
}

#[test]
fn a_restarted_service_is_steered_to_only_once_it_is_ready() {
    if !need_ovs("a_restarted_service_is_steered_to_only_once_it_is_ready") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (d, home, name) = setup("open", "rr", "10.95.0");
    let load = Load::start(&home);
    let t0 = load.seen.t0.lock().unwrap().unwrap();
    // (killed at, new process seen at), ms since the load started.
    let mut restarts = Vec::new();
    for i in 0..5 {
        std::thread::sleep(Duration::from_millis(700));
        let pid = init_pid(&d, &name);
        // The daemon holds the service's packet socket (handed over with its `ready`), so its
        // death is seen at once ...
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        let held = d.wait_for(Duration::from_secs(5), || {
            let daemons = sockets_of(d.pid());
            packet_sockets_in(&ns)
                .iter()
                .any(|s| daemons.contains(s))
                .then_some(())
        });
        assert!(
            held.is_some(),
            "restart {i}: the daemon does not hold the service's packet socket"
        );
        let killed = t0.elapsed().as_millis();
        kill9(pid);
        let mut new_seen = None;
        let again = d.wait_for(Duration::from_secs(20), || {
            let now = init_pid(&d, &name);
            if now != pid && now > 0 && new_seen.is_none() {
                new_seen = Some(t0.elapsed().as_millis());
            }
            (new_seen.is_some() && home.filtered()).then_some(())
        });
        assert!(again.is_some(), "restart {i}: never filtered again");
        // ... and lets it go once the class failed over: nothing is left open in the dead
        // service's network namespace (which only this test's reference keeps).
        let released = d.wait_for(Duration::from_secs(5), || {
            packet_sockets_in(&ns).is_empty().then_some(())
        });
        assert!(
            released.is_some(),
            "restart {i}: packet sockets left in the dead service's namespace: {:?}",
            packet_sockets_in(&ns)
        );
        restarts.push((killed, new_seen.unwrap_or(0)));
    }
    std::thread::sleep(Duration::from_millis(500));
    let seen = load.stop();
    let line = seen.line();
    let lost_at = seen.lost_at.lock().unwrap().clone();
    eprintln!(
        "{line}; restarts (killed, new process) at {restarts:?}; lookups lost at {lost_at:?}"
    );
    // While it is down, fail-open forwards its lookups unfiltered (its policy). A lookup that
    // was on its way to it when it was killed is lost with it; none may be lost once its next
    // process runs: it is steered to only once it said it is ready.
    // A lookup waits 300 ms for its answer: one sent that long before a kill was in flight.
    for at in &lost_at {
        assert!(
            restarts
                .iter()
                .any(|(killed, started)| killed.saturating_sub(300) <= *at && at < started),
            "a lookup sent at {at} ms was lost outside every kill-to-restart window \
             {restarts:?}: steered to a service that could not answer yet"
        );
    }
    // (While it is down, a lookup can also be lost during the fail-over itself: seen once in
    // ~25 restarts, 380 ms after the kill, not explained yet. That is not the steering back.)
    let events =
        String::from_utf8_lossy(&d.cli(&["events", "--json", "-n", "1000"]).stdout).into_owned();
    assert!(
        events.matches("\"ready\"").count() >= 5,
        "a ready event per restart:\n{events}"
    );
}
