//! `sudo cargo bench -p gatevisor --bench core`: the supervisor core, with a real daemon (LXC
//! runtime here), its private Open vSwitch and the two example services. Last line, one JSON
//! object:
//! - `list_p99_ms_during_long_ops`: `service list` (p99 of its answers) while one service is in
//!   a 20 s stop grace period, another in a 20 s failing update health check, and a
//!   100,000-file package installs (target ≤ 20 ms);
//! - `install_to_running_ms_median`: `service install dns-filter.gvpkg --start` until it
//!   answers with the service running (the install answers then), 10 rounds;
//! - `daemon_idle_rss_kib`: the daemon's resident set with dns-filter and iot-guard running
//!   and USP off (target ≤ 8192), with its parts: `_anon_kib` (the daemon's own memory) and
//!   `_file_kib` (code mapped from the page cache: the binary, libc, liblxc).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use gatevisor::api::Request;
use gatevisor::client::Client;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const ROUNDS: usize = 10;

/// A packaged busybox service `name` at `version` whose health check is `health`.
fn health_package(d: &Daemon, name: &str, version: &str, health: &str) -> PathBuf {
    let src = d.looping_service(name, version, &format!("[health]\n{health}"));
    d.signed_package(&src, &format!("{name}-{version}.gvpkg"))
}

/// A `/proc/PID/status` figure in KiB (`VmRSS`, `RssAnon`, `RssFile`).
fn status_kib(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn main() {
    if !need_ovs("the core benchmark") {
        println!(
            "{}",
            serde_json::json!({"error": "needs root and Open vSwitch"})
        );
        return;
    }
    let d = Daemon::start_with_keys();
    let dns = d.example_package("dns-filter");
    let iot = d.example_package("iot-guard");

    // Install to running.
    let mut install = Vec::new();
    for round in 0..ROUNDS {
        let t0 = Instant::now();
        d.install_package_started(&dns);
        install.push(t0.elapsed().as_secs_f64() * 1000.0);
        assert!(d.cli(&["service", "remove", "dns-filter"]).status.success());
        eprintln!("round {round}: install to running {:.0} ms", install[round]);
    }

    // The daemon's own memory with both example services running, idle.
    for p in [&dns, &iot] {
        d.install_package_started(p);
    }
    std::thread::sleep(Duration::from_secs(5));
    let rss = status_kib(d.pid(), "VmRSS");
    // The daemon's own memory, and the code pages (its binary, libc, liblxc) mapped from
    // the page cache, which other processes share.
    let (anon, file) = (
        status_kib(d.pid(), "RssAnon"),
        status_kib(d.pid(), "RssFile"),
    );

    // Long operations in flight while `service list` is asked.
    d.install_started(
        "stub.toml",
        "name = \"b-stub\"\nversion = \"1.0.0\"\nruntime = \"lxc\"\nimage = \"builtin:busybox\"\n\
         command = [\"/bin/sh\", \"-c\", \"trap '' TERM; while :; do sleep 1; done\"]\n\
         stop_timeout_s = 20\n[resources]\nmemory_mib = 16\n",
    );
    let v1 = health_package(&d, "b-upd", "1.0.0", "exec = [\"true\"]\ndeadline_s = 10");
    let v2 = health_package(&d, "b-upd", "2.0.0", "exec = [\"false\"]\ndeadline_s = 20");
    d.install_package_started(&v1);
    let secret = gatevisor_images::keys::SecretKey::load(&d.dir.path().join("op.key")).unwrap();
    let big = big_package("b-big", 100_000, &secret, &d.dir.path().join("big.gvpkg"));
    let call = |req: Request| call_async(&d.socket(), req);
    let stop = call(Request::Stop {
        name: "b-stub".into(),
    });
    let update = call(Request::Update {
        name: "b-upd".into(),
        package: v2,
    });
    let install_big = call(Request::InstallPackage {
        package: big,
        start: false,
        runtime: None,
    });
    let client = Client::new(&d.socket());
    let mut list = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        let t = Instant::now();
        client.call(&Request::List).expect("list answers");
        list.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(50));
    }
    let in_flight = !stop.is_finished() && !update.is_finished();
    let _ = stop.join();
    let _ = update.join();
    let _ = install_big.join();
    println!(
        "{}",
        serde_json::json!({
            "list_p99_ms_during_long_ops": percentile(&mut list, 0.99),
            "list_samples": list.len(),
            "long_ops_in_flight_throughout": in_flight,
            "install_to_running_ms_median": percentile(&mut install, 0.5),
            "install_rounds": ROUNDS,
            "daemon_idle_rss_kib": rss,
            "daemon_idle_rss_anon_kib": anon,
            "daemon_idle_rss_file_kib": file,
            "runtime": "lxc",
        })
    );
}
