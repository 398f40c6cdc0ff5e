//! The whole steering path through the daemon: a DNS service in a real LXC container, on the
//! daemon's own Open vSwitch bridge, between a LAN host and a WAN resolver in network
//! namespaces. Blocked names are answered by the service; `kill -9` of the service fails its
//! class open (lookups reach the resolver again); its restart restores steering.
//! Needs root, liblxc, Open vSwitch and a static build of `flowbridge/examples/steer-dns.rs`
//! (the test builds it).

mod common;
#[path = "../flowbridge/tests/common/lab.rs"]
mod lab;

use common::*;
use std::net::UdpSocket;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn vsctl(d: &Daemon, args: &[&str]) {
    let out = Command::new("ovs-vsctl")
        .arg(format!(
            "--db=unix:{}",
            d.state_dir().join("ovs/db.sock").display()
        ))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ovs-vsctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn lookup_from(lan: &lab::Host, name: &'static str) -> Option<u8> {
    lan.spawn(move || lab::lookup_within("10.97.0.1:53", name, Duration::from_millis(200)))
        .join()
        .unwrap()
}

#[test]
fn containerized_dns_service_steers_fails_open_on_kill9_and_steers_again_after_restart() {
    if !need_root(
        "containerized_dns_service_steers_fails_open_on_kill9_and_steers_again_after_restart",
    ) {
        return;
    }
    if gatevisor_board::ovs::find_sbin("ovs-vswitchd").is_none() {
        eprintln!("skipped: Open vSwitch is not installed");
        return;
    }
    let binary = build_static("steer-dns", true);
    // A local image comes only from a directory the configuration allows.
    let images = tempfile::tempdir().unwrap();
    let rootfs = images.path().join("rootfs");
    gatevisor_lxc::rootfs::build_busybox(Path::new("/bin/busybox"), &rootfs).unwrap();
    std::fs::copy(&binary, rootfs.join("bin/steer-dns")).unwrap();
    let d = Daemon::start_with_config(&format!(
        "image_roots = [{:?}]\n",
        images.path().display().to_string()
    ));
    let manifest = r#"name = "t-e2e"
version = "1.0.0"
runtime = "lxc"
image = "rootfs:ROOTFS"
command = ["/bin/steer-dns"]
capabilities = ["NET_RAW"]
failure_mode = "open"
stop_timeout_s = 2
[resources]
memory_mib = 64
[restart]
policy = "always"
max_retries = 5
backoff_initial_ms = 3000
backoff_max_ms = 3000
stable_after_s = 60
[network]
steering = [{ kind = "dns" }]
"#;
    let m = d.manifest(
        "e2e.toml",
        &manifest.replace("ROOTFS", &rootfs.display().to_string()),
    );

    // LAN and WAN hosts on the daemon's bridge.
    let lan = lab::Host::new("el", Some("10.97.0.2/24"));
    let wan = lab::Host::new("ew", Some("10.97.0.1/24"));
    let bridge = d.bridge();
    vsctl(&d, &["add-port", &bridge, &lan.host_if]);
    vsctl(&d, &["add-port", &bridge, &wan.host_if]);
    let reachable = lab::wait_reachable(&lan.ns, "10.97.0.1");
    assert!(reachable, "LAN cannot reach WAN over the daemon's bridge");
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let resolver = {
        let stop = stop.clone();
        wan.spawn(move || {
            let s = UdpSocket::bind("10.97.0.1:53").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    buf[2] |= 0x80;
                    buf[3] = 0x80;
                    let _ = s.send_to(&buf[..n], from);
                }
            }
        })
    };
    ready_rx.recv().unwrap();
    assert_eq!(
        lookup_from(&lan, "blocked.test"),
        Some(0),
        "no service yet: the resolver answers"
    );

    d.json(&[
        "service",
        "install",
        m.to_str().unwrap(),
        "--start",
        "--json",
    ]);
    let steered = d.wait_for(Duration::from_secs(10), || {
        (lookup_from(&lan, "blocked.test") == Some(3)).then_some(())
    });
    assert!(
        steered.is_some(),
        "the service never answered; log:\n{}",
        d.log()
    );
    assert_eq!(
        lookup_from(&lan, "ok.test"),
        Some(0),
        "other names are forwarded to the resolver"
    );
    let logs = String::from_utf8_lossy(&d.cli(&["service", "logs", "t-e2e"]).stdout).into_owned();
    assert!(
        logs.contains("\"service\":\"t-e2e\""),
        "the service reached its verdict socket: {logs}"
    );

    // kill -9: fail-open, then the restart brings steering back.
    let pid = d.status("t-e2e")["init_pid"].as_i64().unwrap();
    let t = Instant::now();
    kill9(pid);
    // The restart waits 3 s (backoff): before it, lookups must reach the resolver.
    let opened = d.wait_for(Duration::from_millis(2500), || {
        (lookup_from(&lan, "blocked.test") == Some(0)).then_some(t.elapsed())
    });
    let opened = opened.expect("the class did not fail open");
    eprintln!("failed open within {opened:?} of kill -9 (lookups time out after 200 ms)");
    let restored = d.wait_for(Duration::from_secs(10), || {
        let st = d.status("t-e2e");
        (st["state"] == "running"
            && st["init_pid"].as_i64() != Some(pid)
            && lookup_from(&lan, "blocked.test") == Some(3))
        .then_some(())
    });
    assert!(
        restored.is_some(),
        "steering not restored after the restart: {}",
        d.status("t-e2e")
    );

    stop.store(true, Ordering::Relaxed);
    resolver.join().unwrap();
    d.json(&["service", "remove", "t-e2e", "--json"]);
}
