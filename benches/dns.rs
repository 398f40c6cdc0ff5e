//! `sudo cargo bench -p gatevisor --bench dns`: DNS lookups from a LAN host through the
//! dns-filter service (a signed package, LXC here) on the daemon's bridge, to a resolver on the
//! WAN side, for IPv4 and IPv6. Peer: the same lookups with the service stopped (no steering;
//! its class fails open to the bridge's normal switching). Last line, one JSON object:
//! - `lookups_per_s_ipv4`/`_ipv6`: the highest offered rate of a ladder at which every one of
//!   2 s of lookups (allowed names, forwarded to the resolver) was answered;
//! - `latency_p50_us_*` and `latency_ratio_p50_ipv4`/`_ipv6`: one lookup at a time, 400 each,
//!   steered ÷ not steered (the median round trip);
//! - `blocked_answered_ipv4`/`_ipv6` (of 200): a blocked name's lookups answered NXDOMAIN by
//!   the service (a check that the steered path was the filtering one), and
//!   `latency_p50_us_blocked_*`, their median round trip (the steered path without the
//!   resolver).
//!
//! The offered load comes from one thread, so the ladder's top is also the client's limit.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/home.rs"]
mod home;
#[path = "../flowbridge/tests/common/lab.rs"]
mod lab;

use common::*;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RATES: [u32; 11] = [
    1_000, 2_000, 3_500, 5_000, 7_500, 10_000, 15_000, 20_000, 30_000, 40_000, 50_000,
];
const LATENCY_ROUNDS: usize = 1000;
/// The resolver's port that no policy steers.
const PEER_PORT: u16 = 5353;

/// A query for `name` with id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = lab::dns_query(name);
    q[..2].copy_from_slice(&id.to_be_bytes());
    q
}

fn any_for(r: SocketAddr) -> SocketAddr {
    if r.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    }
}

/// Median round trips (µs) of one lookup at a time, alternating between `r` and `peer`, and
/// how many of each were answered.
fn latency(lan: &lab::Host, r: SocketAddr, peer: SocketAddr) -> [(f64, usize); 2] {
    lan.spawn(move || {
        let s = UdpSocket::bind(any_for(r)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut rtts = [Vec::new(), Vec::new()];
        let mut b = [0u8; 1500];
        for i in 0..LATENCY_ROUNDS * 2 {
            let id = i as u16;
            let to = if i % 2 == 0 { r } else { peer };
            let t = Instant::now();
            s.send_to(&query(id, "ok.test"), to).unwrap();
            while let Ok(n) = s.recv(&mut b) {
                if n >= 12 && b[..2] == id.to_be_bytes() {
                    rtts[i % 2].push(t.elapsed().as_secs_f64() * 1e6);
                    break;
                }
            }
        }
        rtts.map(|mut v| {
            let answered = v.len();
            if v.is_empty() {
                return (f64::NAN, 0);
            }
            (percentile(&mut v, 0.5), answered)
        })
    })
    .join()
    .unwrap()
}

/// Offers `rate` lookups a second for 1 s; returns how many were answered (of `rate`).
fn offered(lan: &lab::Host, r: SocketAddr, rate: u32) -> (u32, u32) {
    lan.spawn(move || {
        let s = UdpSocket::bind(any_for(r)).unwrap();
        let rx = s.try_clone().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let total = rate;
        let done = Arc::new(AtomicBool::new(false));
        let reader = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut seen = vec![false; 65536];
                let mut n = 0u32;
                let mut b = [0u8; 1500];
                let mut quiet_since: Option<Instant> = None;
                loop {
                    match rx.recv(&mut b) {
                        Ok(len) if len >= 12 => {
                            let id = u16::from_be_bytes([b[0], b[1]]) as usize;
                            if !seen[id] {
                                seen[id] = true;
                                n += 1;
                            }
                            quiet_since = None;
                        }
                        _ => {
                            if done.load(Ordering::Relaxed) {
                                let q = quiet_since.get_or_insert_with(Instant::now);
                                if q.elapsed() > Duration::from_millis(500) {
                                    return n;
                                }
                            }
                        }
                    }
                }
            })
        };
        let start = Instant::now();
        let gap = Duration::from_secs_f64(1.0 / rate as f64);
        for i in 0..total {
            let due = start + gap * i;
            while Instant::now() < due {
                std::hint::spin_loop();
            }
            let _ = s.send_to(&query(i as u16, "ok.test"), r);
        }
        done.store(true, Ordering::Relaxed);
        (reader.join().unwrap(), total)
    })
    .join()
    .unwrap()
}

/// The highest rate of the ladder with no lookup lost (a lost one is tried once more, so that
/// one stray drop does not end the ladder).
fn max_rate(lan: &lab::Host, r: SocketAddr) -> u32 {
    let mut best = 0;
    for rate in RATES {
        let ok = (0..2).any(|_| {
            let (answered, total) = offered(lan, r, rate);
            answered == total
        });
        if !ok {
            break;
        }
        best = rate;
    }
    best
}

fn main() {
    if !need_ovs("the dns benchmark") {
        println!(
            "{}",
            serde_json::json!({"error": "needs root and Open vSwitch"})
        );
        return;
    }
    let d = Daemon::start_with_keys();
    let name = "bench-dnsf";
    let pkg = home::dns_filter_package(&d, name);
    let home = home::Home::new(&d, "bd", "10.88.0");
    home.lan.add_ipv6("fd00:88::2/64");
    home.wan.add_ipv6("fd00:88::1/64");
    assert!(lab::wait_reachable(&home.lan.ns, "fd00:88::1"));
    // The home's resolver answers IPv4 on port 53; the same answers on IPv6 and, for the
    // peer, on port 5353 of both.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let resolver = {
        let stop = stop.clone();
        home.wan.spawn(move || {
            // One thread per socket, each blocked in its receive (threads inherit the
            // namespace of the thread that starts them).
            let threads: Vec<_> = [
                "[fd00:88::1]:53".to_string(),
                format!("10.88.0.1:{PEER_PORT}"),
                format!("[fd00:88::1]:{PEER_PORT}"),
            ]
            .into_iter()
            .map(|a| {
                let u = UdpSocket::bind(a.as_str()).unwrap();
                u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut b = [0u8; 1500];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = u.recv_from(&mut b) {
                            b[2] |= 0x80;
                            b[3] = 0x80;
                            let _ = u.send_to(&b[..n], from);
                        }
                    }
                })
            })
            .collect();
            tx.send(()).unwrap();
            for t in threads {
                t.join().unwrap();
            }
        })
    };
    rx.recv().unwrap();
    d.install_package_started(&pkg);
    assert!(
        d.wait_for(Duration::from_secs(20), || home.filtered().then_some(()))
            .is_some(),
        "dns-filter never filtered"
    );
    let v4: SocketAddr = "10.88.0.1:53".parse().unwrap();
    let v6: SocketAddr = "[fd00:88::1]:53".parse().unwrap();
    let mut out = serde_json::Map::new();
    for (fam, r) in [("ipv4", v4), ("ipv6", v6)] {
        let mut peer = r;
        peer.set_port(PEER_PORT);
        // Warm the caches (megaflows, neighbours) before measuring.
        latency(&home.lan, r, peer);
        let [(steered, a), (plain, b)] = latency(&home.lan, r, peer);
        assert_eq!(
            (a, b),
            (LATENCY_ROUNDS, LATENCY_ROUNDS),
            "{fam}: lookups lost one at a time"
        );
        let rate = max_rate(&home.lan, r);
        let peer_rate = max_rate(&home.lan, peer);
        // The blocked name is answered by the service itself (rcode 3): the steered path
        // without the resolver.
        let (blocked, blocked_p50) = home
            .lan
            .spawn(move || {
                let s = UdpSocket::bind(any_for(r)).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500)))
                    .unwrap();
                let mut rtts: Vec<f64> = (0..200u16)
                    .filter_map(|i| {
                        let t = Instant::now();
                        s.send_to(&query(i, "malware.test"), r).unwrap();
                        let mut b = [0u8; 512];
                        s.recv(&mut b)
                            .is_ok_and(|n| n >= 12 && b[3] & 0x0f == 3)
                            .then(|| t.elapsed().as_secs_f64() * 1e6)
                    })
                    .collect();
                let n = rtts.len();
                (
                    n,
                    if n > 0 {
                        percentile(&mut rtts, 0.5)
                    } else {
                        f64::NAN
                    },
                )
            })
            .join()
            .unwrap();
        eprintln!(
            "{fam}: p50 {steered:.0} µs steered, {plain:.0} µs not; no loss up to {rate}/s \
             steered, {peer_rate}/s not; blocked {blocked}/200 (p50 {blocked_p50:.0} µs)"
        );
        out.insert(format!("lookups_per_s_{fam}"), rate.into());
        out.insert(format!("lookups_per_s_unsteered_{fam}"), peer_rate.into());
        out.insert(
            format!("latency_p50_us_steered_{fam}"),
            steered.round().into(),
        );
        out.insert(
            format!("latency_p50_us_unsteered_{fam}"),
            plain.round().into(),
        );
        out.insert(
            format!("latency_ratio_p50_{fam}"),
            ((steered / plain * 100.0).round() / 100.0).into(),
        );
        out.insert(format!("blocked_answered_{fam}"), blocked.into());
        out.insert(
            format!("latency_p50_us_blocked_{fam}"),
            blocked_p50.round().into(),
        );
    }
    out.insert(
        "peer".into(),
        "the same lookups to the same resolver on a port no policy steers, interleaved".into(),
    );
    out.insert("rate_ladder_max".into(), RATES[RATES.len() - 1].into());
    stop.store(true, Ordering::Relaxed);
    resolver.join().unwrap();
    println!("{}", serde_json::Value::Object(out));
}
