//! The controller's restart protocol against a real switch: a new controller (a restarted
//! daemon) that is told the same services changes nothing on the switch (no bundle, the same
//! flows keep their counters and age), removes only what differs, prunes services that are
//! gone, and guards a service port while the service does not serve. `ovs-ofctl` reads back
//! independently. Needs root and Open vSwitch.

mod common;
use common::*;
use flowbridge::controller::{Controller, FailureMode};
use flowbridge::steering::{self, MatchAction, Policy, Proto, Selector};
use std::collections::BTreeMap;
use std::time::Duration;

fn policies() -> Vec<Policy> {
    vec![
        Policy::Dns,
        Policy::NewSessions {
            packets: 4,
            selector: Selector {
                protocol: None,
                ports: vec![80, 443],
                macs: vec!["02:00:00:00:00:0a".into()],
            },
        },
    ]
}

/// A class of its own for each service (two services steering one class share its flows).
fn class(port: u16) -> Vec<Policy> {
    vec![Policy::Match {
        protocol: Some(Proto::Udp),
        dst_port: Some(port),
        dst_ip: None,
        src_mac: None,
        action: MatchAction::Inline,
    }]
}

/// `ovs-ofctl dump-flows` with stats: flow text (without counters) → duration in seconds.
fn ages(sw: &Switch) -> BTreeMap<String, f64> {
    let mgmt = format!("unix:{}", sw.mgmt().display());
    sw.ofctl(&["dump-flows", &mgmt])
        .lines()
        .filter(|l| l.contains("cookie="))
        .map(|l| {
            let mut age = 0.0;
            let text: Vec<&str> = l
                .trim()
                .split([',', ' '])
                .filter(|p| {
                    if let Some(d) = p.strip_prefix("duration=") {
                        age = d.trim_end_matches('s').parse().unwrap_or(0.0);
                        return false;
                    }
                    !(p.is_empty()
                        || p.starts_with("n_packets=")
                        || p.starts_with("n_bytes=")
                        || p.starts_with("idle_age=")
                        || p.starts_with("hard_age="))
                })
                .collect();
            (text.join(","), age)
        })
        .collect()
}

#[test]
fn a_restarted_controller_changes_nothing_that_is_right() {
    if !need("a_restarted_controller_changes_nothing_that_is_right") {
        return;
    }
    let sw = Switch::new("gvt-rs0");
    let mut a = Controller::connect(&sw.mgmt(), Duration::from_secs(10)).unwrap();
    a.set_service(
        1,
        7,
        policies(),
        FailureMode::Open,
        true,
        Some([2, 0x47, 0x56, 0, 0, 1]),
    )
    .unwrap();
    a.set_service(2, 8, class(5002), FailureMode::Closed, false, None)
        .unwrap();
    a.set_service(3, 0, class(5003), FailureMode::Closed, false, None)
        .unwrap();
    // A service the next daemon will not know (removed while no daemon ran).
    a.set_service(4, 9, class(5004), FailureMode::Closed, true, None)
        .unwrap();
    let before = ages(&sw);
    assert!(before.len() > 20, "{before:?}");
    drop(a);
    std::thread::sleep(Duration::from_millis(1100));

    // The restarted daemon: connect, re-register the same services.
    let mut b = Controller::connect(&sw.mgmt(), Duration::from_secs(10)).unwrap();
    b.set_service(
        1,
        7,
        policies(),
        FailureMode::Open,
        true,
        Some([2, 0x47, 0x56, 0, 0, 1]),
    )
    .unwrap();
    b.set_service(2, 8, class(5002), FailureMode::Closed, false, None)
        .unwrap();
    b.set_service(3, 0, class(5003), FailureMode::Closed, false, None)
        .unwrap();
    assert_eq!(b.changes(), 0, "nothing differed, nothing was sent");
    let after = ages(&sw);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    for (flow, age) in &after {
        assert!(
            *age >= 1.0,
            "{flow} was replaced (age {age} s): a restart must leave it as it is"
        );
    }

    // Pruning takes service 4's flows, and only them.
    b.prune().unwrap();
    assert_eq!(b.changes(), 1);
    let pruned = ages(&sw);
    let c4 = format!("{:#x}", steering::service_cookie(4, false));
    assert!(pruned.keys().all(|f| !f.contains(&c4)));
    assert_eq!(
        pruned.len(),
        before.len() - steering::service_flows(4, 9, &class(5004), false, None).len()
    );

    // A change touches only what differs: service 1 gets one more port in its selector.
    let mut more = policies();
    if let Policy::NewSessions { selector, .. } = &mut more[1] {
        selector.ports.push(8080);
    }
    b.set_service(
        1,
        7,
        more,
        FailureMode::Open,
        true,
        Some([2, 0x47, 0x56, 0, 0, 1]),
    )
    .unwrap();
    let changed = ages(&sw);
    let old: Vec<_> = changed.iter().filter(|(_, a)| **a >= 1.0).collect();
    let new: Vec<_> = changed.iter().filter(|(_, a)| **a < 1.0).collect();
    assert_eq!(
        new.len(),
        2 * 2 * (1 + 3 + 1),
        "IPv4 and IPv6 x tcp and udp x (new, 3 counts, budget spent): {new:?}"
    );
    assert!(
        new.iter().all(|(f, _)| f.contains("tp_dst=8080")),
        "{new:?}"
    );
    assert_eq!(old.len(), pruned.len());
}

#[test]
fn a_port_of_a_service_that_does_not_serve_drops_tagged_frames() {
    if !need("a_port_of_a_service_that_does_not_serve_drops_tagged_frames") {
        return;
    }
    let sw = Switch::new("gvt-rs1");
    let mut c = Controller::connect(&sw.mgmt(), Duration::from_secs(10)).unwrap();
    let guard = |sw: &Switch| {
        sw.dump_flows()
            .iter()
            .filter(|l| l.contains("in_port=5") && l.contains("vlan_tci=0x1000/0x1000"))
            .map(|l| l.split_once("actions=").unwrap().1.to_string())
            .collect::<Vec<_>>()
    };
    c.set_service(1, 5, vec![Policy::Dns], FailureMode::Open, false, None)
        .unwrap();
    assert_eq!(guard(&sw), ["drop"], "plugged, not ready: guarded");
    c.activate(1).unwrap();
    assert_eq!(guard(&sw), ["goto_table:5"], "serving: verdicts are read");
    c.deactivate(1).unwrap();
    assert_eq!(guard(&sw), ["drop"], "ended: guarded again");
    c.port_gone(1).unwrap();
    assert!(guard(&sw).is_empty(), "the port number is free again");
}
