//! dns-filter: parental control as a gatevisor service.
//!
//! Steered DNS queries (policy `dns`) arrive on `eth0`. For the device that asked (its LAN
//! MAC picks a profile), a blocked name is answered here: NXDOMAIN, or with `block_address`
//! for A queries (NODATA for other types); every other query is forwarded to the resolver it
//! was sent to. Answers are built from the query itself, so an EDNS OPT record in the query is
//! kept. Blocked lookups over TCP get their session blocked. Configuration: the operator's
//! settings when the manifest declares them (`DefaultBlock`, `KidsDevices`, `KidsBlock`,
//! `KidsBlockAddress`; changed live), else `/etc/dns-filter.toml` (or the path in
//! `$DNS_FILTER_CONFIG`).

mod dns;

use gatevisor_service_sdk::Verdict;
use std::time::{Duration, Instant};

fn main() {
    let (live, mut port) = gatevisor_service_sdk::start_with_settings(
        "dns-filter",
        "DNS_FILTER_CONFIG",
        "/etc/dns-filter.toml",
        dns::Config::parse,
        dns::Config::from_settings,
    );
    println!(
        "dns-filter: {} profiles, serving on eth0",
        live.read().unwrap().profiles.len() + 1
    );
    let mut logged = (Instant::now(), 0u32);
    loop {
        let mut frame = match port.recv() {
            Ok(f) => f,
            Err(e) => {
                eprintln!("dns-filter: receive failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !frame.is_tagged_ipv4() {
            continue; // not steered to us
        }
        let mac = frame.src_mac().unwrap_or_default();
        // The operator's last change counts from the next frame on.
        let config = live.read().unwrap().clone();
        let decision = dns::decide(&config, &mut frame, mac);
        let (mut out, verdict) = match decision {
            dns::Decision::Forward => (frame.bytes.to_vec(), Verdict::Forward),
            dns::Decision::BlockSession(_) => (frame.bytes.to_vec(), Verdict::Block),
            dns::Decision::Answer(ref bytes, _) => (bytes.clone(), Verdict::Reply),
        };
        if let dns::Decision::Answer(_, name) | dns::Decision::BlockSession(name) = &decision {
            // Logs a guest's traffic can trigger are rate-limited.
            if logged.0.elapsed() > Duration::from_secs(1) {
                logged = (Instant::now(), 0);
            }
            logged.1 += 1;
            if logged.1 <= 10 {
                println!("dns-filter: blocked {name} for {}", dns::mac_text(&mac));
            }
        }
        if let Err(e) = port.send(&mut out, verdict) {
            eprintln!("dns-filter: send failed: {e}");
        }
    }
}
