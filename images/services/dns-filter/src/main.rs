//! dns-filter: parental control as a gatevisor service.
//!
//! Steered DNS queries (policy `dns`) arrive on `eth0`. For the device that asked (its LAN
//! MAC picks a profile), a blocked name is answered here: NXDOMAIN, or with `block_address`
//! for A queries (NODATA for other types); every other query is forwarded to the resolver it
//! was sent to. Answers are built from the query itself, so an EDNS OPT record in the query is
//! kept (without its options). Blocked lookups over TCP get their session blocked; TCP is read
//! as a stream, so split and pipelined queries are judged too. Both IP families are served,
//! and a query sent in IP fragments is put together and judged whole. Configuration: the
//! operator's settings when the manifest declares them (`DefaultBlock`, `KidsDevices`, `KidsBlock`,
//! `KidsBlockAddress`; changed live), else `/etc/dns-filter.toml` (or the path in
//! `$DNS_FILTER_CONFIG`).

mod dns;

use gatevisor_service_sdk::{Defrag, Defragged, TcpMessages, Verdict};
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
    let mut log = |what: &str| {
        // Logs a guest's traffic can trigger are rate-limited.
        if logged.0.elapsed() > Duration::from_secs(1) {
            logged = (Instant::now(), 0);
        }
        logged.1 += 1;
        if logged.1 <= 10 {
            println!("dns-filter: {what}");
        }
    };
    let mut defrag = Defrag::new();
    let mut tcp = TcpMessages::new();
    // Held fragments are looked at even when nothing arrives.
    if let Err(e) = port.set_read_timeout(Duration::from_millis(250)) {
        eprintln!("dns-filter: cannot set a read timeout: {e}");
    }
    loop {
        for gone in defrag.expire(Instant::now()) {
            if gone.dst_port == Some(53) {
                // Never completed: the query is not let through in pieces.
                log("dropped a fragmented query that never completed");
            } else {
                for mut p in gone.pieces {
                    send(&port, &mut p, Verdict::Forward);
                }
            }
        }
        let frame = match port.recv() {
            Ok(f) => f,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                eprintln!("dns-filter: receive failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if !frame.is_tagged_ip() {
            continue; // not steered to us
        }
        let mac = frame.src_mac().unwrap_or_default();
        // The operator's last change counts from the next frame on.
        let config = live.read().unwrap().clone();
        let now = Instant::now();
        // A fragment is held until its datagram is whole; the whole is judged, and when it
        // is forwarded its pieces go back as they came.
        let (mut whole, pieces) = if frame.fragment().is_some() {
            match defrag.push(frame.bytes, now) {
                Defragged::Held => continue,
                Defragged::Refused(why) => {
                    log(&format!("dropped fragments: {why}"));
                    continue;
                }
                Defragged::Whole { whole, pieces } => (whole, Some(pieces)),
            }
        } else {
            (frame.bytes.to_vec(), None)
        };
        let mut f = gatevisor_service_sdk::Frame { bytes: &mut whole };
        let decision = dns::decide(&config, &mut tcp, &mut f, mac, now);
        match (decision, pieces) {
            (dns::Decision::Forward, Some(pieces)) => {
                for mut p in pieces {
                    send(&port, &mut p, Verdict::Forward);
                }
            }
            (dns::Decision::Forward, None) => send(&port, &mut whole, Verdict::Forward),
            (dns::Decision::Answer(mut out, name), _) => {
                log(&format!("blocked {name} for {}", dns::mac_text(&mac)));
                send(&port, &mut out, Verdict::Reply);
            }
            (dns::Decision::BlockSession(name), pieces) => {
                if let Some(name) = name {
                    log(&format!("blocked {name} for {}", dns::mac_text(&mac)));
                }
                // A datagram in pieces is simply not returned.
                if pieces.is_none() {
                    send(&port, &mut whole, Verdict::Block);
                }
            }
            (dns::Decision::Drop, _) => {}
        }
    }
}

fn send(port: &gatevisor_service_sdk::PacketPort, frame: &mut [u8], verdict: Verdict) {
    if let Err(e) = port.send(frame, verdict) {
        eprintln!("dns-filter: send failed: {e}");
    }
}
