//! iot-guard: IoT protection as a gatevisor service.
//!
//! The first packets of new sessions (policy `new-sessions`) arrive on `eth0`. For a listed
//! IoT device (by LAN MAC) each session gets a verdict on its first packet: blocked when its
//! destination port is denied, when it is not on the device's allow list (if the device's
//! default is `block`), or when the device opens new sessions faster than its limit (a simple
//! rate anomaly); allowed otherwise. Devices not listed follow `[unknown_devices]`.
//! Configuration: the operator's settings when the manifest declares them (`IotDevices`,
//! `IotAllow`, `IotDenyPorts`, `IotDefault`, `IotMaxNewSessionsPerMinute`, `UnknownDevices`;
//! changed live), else `/etc/iot-guard.toml` (or `$IOT_GUARD_CONFIG`).

mod rules;

use gatevisor_service_sdk::Verdict;
use std::time::{Duration, Instant};

fn main() {
    let (live, mut port) = gatevisor_service_sdk::start_with_settings(
        "iot-guard",
        "IOT_GUARD_CONFIG",
        "/etc/iot-guard.toml",
        rules::Config::parse,
        rules::Config::from_settings,
    );
    let mut guard = rules::Guard::new_shared(live.read().unwrap().clone());
    println!(
        "iot-guard: {} devices, serving on eth0",
        guard.config().devices.len()
    );
    let mut logged = (Instant::now(), 0u32);
    loop {
        let frame = match port.recv() {
            Ok(f) => f,
            Err(e) => {
                eprintln!("iot-guard: receive failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !frame.is_tagged_ip() {
            continue;
        }
        let (Some(mac), Some(ip), Some(proto), Some(dport)) = (
            frame.src_mac(),
            frame.dst_addr(),
            frame.proto(),
            frame.dst_port(),
        ) else {
            continue;
        };
        // The operator's last change counts from the next session on.
        let config = live.read().unwrap().clone();
        if !std::sync::Arc::ptr_eq(&config, guard.config()) {
            guard.set_config(config);
        }
        let (allow, why) = guard.decide(mac, ip, proto, dport, Instant::now());
        if logged.0.elapsed() > Duration::from_secs(1) {
            logged = (Instant::now(), 0);
        }
        logged.1 += 1;
        if logged.1 <= 20 {
            let ip = std::net::SocketAddr::new(ip, dport);
            println!(
                "iot-guard: {} {ip}/{} from {}: {why}",
                if allow { "allow" } else { "block" },
                if proto == 6 { "tcp" } else { "udp" },
                rules::mac_text(&mac)
            );
        }
        let mut out = frame.bytes.to_vec();
        let verdict = if allow {
            Verdict::Allow
        } else {
            Verdict::Block
        };
        if let Err(e) = port.send(&mut out, verdict) {
            eprintln!("iot-guard: send failed: {e}");
        }
    }
}
