//! `sudo cargo bench -p gatevisor --bench host_calls`: host calls from a real container on a
//! real daemon (LXC here). Last line, one JSON object:
//! - `link_stats_rtt_us_p50` / `_p99`: `link.stats` of the service's own port, timed inside
//!   the container by the SDK's `host-call --repeat` (1,000 calls, under the rate limit);
//! - `direct_us_p50`: the same counters read by the host itself (one route netlink dump, as
//!   the daemon does per call), and `overhead_ratio` = the container's p50 over it;
//! - `calls_per_s`: answered calls a second when one service calls as fast as it can for
//!   3 s (its rate limit, 200/s, caps it), and `refused_per_s` beyond the limit;
//! - `microvm_*`: null with the reason (a microVM needs the emulated gateway).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::time::{Duration, Instant};

fn main() {
    if !need_ovs("the host-call benchmark") {
        println!(
            "{}",
            serde_json::json!({"error": "needs root and Open vSwitch"})
        );
        return;
    }
    let d = Daemon::start_with_config("[policy]\nhost_calls = [\"link.stats:gv-*\"]\n");
    let pkg = d.host_call_package("b-hc", "\"link.stats:gv-*\"");
    let st = d.install_package_started(&pkg);
    let port = st["interface"].as_str().unwrap().to_string();

    // Inside the container: 5 rounds of 150 calls (under 200/s each, a second apart).
    let args = format!("{{\"link\":\"{port}\"}}");
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    for _ in 0..5 {
        let out = d.cli(&[
            "service",
            "exec",
            "b-hc",
            "--",
            "/bin/host-call",
            "--repeat",
            "150",
            "link.stats",
            &args,
        ]);
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        p50s.push(v["p50_us"].as_f64().unwrap());
        p99s.push(v["p99_us"].as_f64().unwrap());
        std::thread::sleep(Duration::from_millis(1100));
    }
    p50s.sort_by(f64::total_cmp);
    p99s.sort_by(f64::total_cmp);
    let (p50, p99) = (p50s[2], p99s[2]);

    // The host reading the same counters directly.
    let mut direct = Vec::new();
    for _ in 0..1000 {
        let t0 = Instant::now();
        let links = gatevisor_board::links::links().unwrap();
        assert!(links.iter().any(|l| l.name == port));
        direct.push(t0.elapsed().as_secs_f64() * 1e6);
    }
    direct.sort_by(f64::total_cmp);
    let direct_p50 = direct[direct.len() / 2];

    // As fast as one service can, for 3 s, on its control socket.
    let path = d.state_dir().join("run/b-hc/verdict.sock");
    let w = std::os::unix::net::UnixStream::connect(&path).unwrap();
    let mut r = BufReader::new(w.try_clone().unwrap());
    let mut w = w;
    let line = serde_json::json!({"op": "call", "call": "link.stats", "args": {"link": port}})
        .to_string()
        + "\n";
    let (mut ok, mut refused) = (0u64, 0u64);
    let t0 = Instant::now();
    let mut answer = String::new();
    while t0.elapsed() < Duration::from_secs(3) {
        w.write_all(line.as_bytes()).unwrap();
        answer.clear();
        r.read_line(&mut answer).unwrap();
        if answer.contains("\"ok\":true") {
            ok += 1;
        } else {
            assert!(answer.contains("rate-limited"), "{answer}");
            refused += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("inside p50s {p50s:?}, p99s {p99s:?}; direct p50 {direct_p50:.1} us");
    println!(
        "{}",
        serde_json::json!({
            "runtime": "lxc",
            "link_stats_rtt_us_p50": (p50 * 10.0).round() / 10.0,
            "link_stats_rtt_us_p99": (p99 * 10.0).round() / 10.0,
            "direct_us_p50": (direct_p50 * 10.0).round() / 10.0,
            "overhead_ratio": ((p50 / direct_p50) * 100.0).round() / 100.0,
            "calls_per_s": (ok as f64 / secs).round(),
            "refused_per_s": (refused as f64 / secs).round(),
            "microvm_link_stats_rtt_us_p50": null,
            "microvm_link_stats_rtt_us_p99": null,
            "microvm_reason": "a microVM needs the emulated gateway; this benchmark runs on the host",
        })
    );
}
