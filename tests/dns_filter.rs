//! dns-filter, the parental-control service, as a signed package in a real container on the
//! daemon's bridge: per-device profiles, NXDOMAIN or a block address, EDNS kept, forwarding,
//! and a blocked lookup over TCP. Needs root, liblxc, Open vSwitch; builds dns-filter
//! statically.

mod common;
#[path = "common/home.rs"]
mod home;
#[path = "../flowbridge/tests/common/lab.rs"]
mod lab;
#[path = "common/traffic.rs"]
mod traffic;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WAN: &str = "10.96.0.1";
const KIDS_MAC: &str = "02:00:00:00:00:0a";

/// A query for `name` of `qtype`, with an EDNS OPT record when `edns`.
fn query(name: &str, qtype: u16, edns: bool) -> Vec<u8> {
    let mut q = vec![0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, edns as u8];
    for l in name.split('.') {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.extend_from_slice(&[0, (qtype >> 8) as u8, qtype as u8, 0, 1]);
    if edns {
        q.extend_from_slice(&[0, 0, 41, 0x10, 0, 0, 0, 0, 0, 0, 0]);
    }
    q
}

/// (rcode, answers, additional records, last 4 bytes) of the reply, or None.
fn ask(
    lan: &lab::Host,
    name: &'static str,
    qtype: u16,
    edns: bool,
) -> Option<(u8, u16, u16, [u8; 4])> {
    ask_at(lan, WAN, name, qtype, edns)
}

/// The same, asking the resolver at `resolver`.
fn ask_at(
    lan: &lab::Host,
    resolver: &str,
    name: &'static str,
    qtype: u16,
    edns: bool,
) -> Option<(u8, u16, u16, [u8; 4])> {
    let resolver = resolver.to_string();
    lan.spawn(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        s.send_to(&query(name, qtype, edns), (resolver.as_str(), 53))
            .unwrap();
        let mut b = [0u8; 512];
        let (n, _) = s.recv_from(&mut b).ok()?;
        let r = &b[..n];
        Some((
            r[3] & 0x0f,
            u16::from_be_bytes([r[6], r[7]]),
            u16::from_be_bytes([r[10], r[11]]),
            r[n - 4..].try_into().ok()?,
        ))
    })
    .join()
    .unwrap()
}

#[test]
fn dns_filter_blocks_per_device_keeps_edns_and_forwards_the_rest() {
    if !need_ovs("dns_filter_blocks_per_device_keeps_edns_and_forwards_the_rest") {
        return;
    }
    let binary = build_static("dns-filter", false);
    let mut d = Daemon::start_with_keys();
    // The service folder, built into a signed package with the CLI.
    let src = d.dir.path().join("dns-filter");
    std::fs::create_dir_all(src.join("files/bin")).unwrap();
    std::fs::create_dir_all(src.join("files/etc")).unwrap();
    std::fs::copy(&binary, src.join("files/bin/dns-filter")).unwrap();
    std::fs::write(
        src.join("files/etc/dns-filter.toml"),
        format!("[default]\nname = \"everyone\"\nblock = [\"malware.test\"]\n[[profile]]\nname = \"kids\"\nmacs = [\"{KIDS_MAC}\"]\nblock = [\"blocked.test\", \"*.ads.test\"]\nblock_address = \"0.0.0.0\"\n"),
    )
    .unwrap();
    std::fs::write(
        src.join("service.toml"),
        "name = \"t-dnsf\"\nversion = \"1.0.0\"\nruntime = \"auto\"\nimage = \"package\"\ncommand = [\"/bin/dns-filter\"]\ncapabilities = [\"NET_RAW\"]\nfailure_mode = \"open\"\n[resources]\nmemory_mib = 32\n[network]\nsteering = [{ kind = \"dns\" }]\nheartbeat_timeout_ms = 5000\n",
    )
    .unwrap();
    let pkg = d.signed_package(&src, "dns-filter.gvpkg");

    // LAN and WAN on the daemon's bridge; a resolver (UDP and TCP) on the WAN.
    let lan = lab::Host::new("fl", Some("10.96.0.2/24"));
    let wan = lab::Host::new("fw", Some("10.96.0.1/24"));
    for h in [&lan, &wan] {
        d.plug_host(&h.host_if);
    }
    assert!(lab::wait_reachable(&lan.ns, WAN));
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let resolver = {
        let stop = stop.clone();
        wan.spawn(move || {
            let u = UdpSocket::bind((WAN, 53)).unwrap();
            u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            let t = TcpListener::bind((WAN, 53)).unwrap();
            t.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let mut b = [0u8; 1024];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = u.recv_from(&mut b) {
                    b[2] |= 0x80;
                    b[3] = 0x80;
                    let _ = u.send_to(&b[..n], from);
                }
                if let Ok((mut c, _)) = t.accept() {
                    c.set_nonblocking(false).unwrap();
                    c.set_read_timeout(Some(Duration::from_millis(500)))
                        .unwrap();
                    if let Ok(n) = c.read(&mut b) {
                        if n > 4 {
                            b[4] |= 0x80;
                            b[5] = 0x80;
                            let _ = c.write_all(&b[..n]);
                        }
                    }
                }
            }
        })
    };
    rx.recv().unwrap();

    let st = d.install_package_started(&pkg);
    assert_eq!(st["runtime"], "lxc", "auto picks LXC on this board");
    let ready = d.wait_for(Duration::from_secs(10), || {
        (ask(&lan, "malware.test", 1, false).map(|r| r.0) == Some(3)).then_some(())
    });
    assert!(
        ready.is_some(),
        "dns-filter never answered; log:\n{}",
        String::from_utf8_lossy(&d.cli(&["service", "logs", "t-dnsf"]).stdout)
    );
    // Default profile: malware.test blocked (NXDOMAIN), the kids' names are not.
    assert_eq!(
        ask(&lan, "blocked.test", 1, false).map(|r| (r.0, r.1)),
        Some((0, 0)),
        "forwarded: the resolver's empty answer"
    );

    // The same host as the kids' device: their profile applies.
    assert!(Command::new("ip")
        .args(["netns", "exec", &lan.ns, "ip", "link", "set", "eth0", "address", KIDS_MAC])
        .status()
        .unwrap()
        .success());
    // The resolver must not answer the old MAC.
    let _ = Command::new("ip")
        .args(["netns", "exec", &wan.ns, "ip", "neigh", "flush", "all"])
        .status();
    let a = ask(&lan, "blocked.test", 1, false).expect("an answer");
    assert_eq!(
        (a.0, a.1, a.3),
        (0, 1, [0, 0, 0, 0]),
        "A record with the block address"
    );
    assert_eq!(
        ask(&lan, "x.ads.test", 1, false).map(|r| (r.1, r.3)),
        Some((1, [0, 0, 0, 0])),
        "wildcard"
    );
    assert_eq!(
        ask(&lan, "www.blocked.test", 1, false).map(|r| (r.1, r.3)),
        Some((1, [0, 0, 0, 0])),
        "a subdomain of a blocked name"
    );
    assert_eq!(
        ask(&lan, "blocked.test", 28, false).map(|r| (r.0, r.1)),
        Some((0, 0)),
        "AAAA: NODATA"
    );
    let e = ask(&lan, "blocked.test", 1, true).expect("an EDNS answer");
    assert_eq!((e.1, e.2), (1, 1), "the OPT record survives");
    assert_eq!(
        ask(&lan, "ok.test", 1, false).map(|r| (r.0, r.1)),
        Some((0, 0)),
        "others are forwarded"
    );

    // Over TCP: an allowed lookup is answered by the resolver, a blocked one never is.
    let tcp = |name: &'static str| {
        lan.spawn(move || {
            let mut c = TcpStream::connect_timeout(
                &format!("{WAN}:53").parse().unwrap(),
                Duration::from_secs(2),
            )
            .ok()?;
            c.set_read_timeout(Some(Duration::from_millis(1000)))
                .unwrap();
            let q = query(name, 1, false);
            let mut msg = (q.len() as u16).to_be_bytes().to_vec();
            msg.extend_from_slice(&q);
            c.write_all(&msg).ok()?;
            let mut b = [0u8; 512];
            c.read(&mut b).ok().filter(|n| *n > 0)
        })
        .join()
        .unwrap()
    };
    assert!(tcp("ok.test").is_some(), "allowed lookup over TCP");
    assert!(
        tcp("blocked.test").is_none(),
        "blocked lookup over TCP got an answer"
    );

    // Updates: one that speaks on its verdict socket passes `verdict_ping`; one that stays
    // silent is rolled back.
    let manifest = std::fs::read_to_string(src.join("service.toml")).unwrap();
    let with_health = |version: &str, command: &str| {
        std::fs::write(
            src.join("service.toml"),
            manifest
                .replace("version = \"1.0.0\"", &format!("version = \"{version}\""))
                .replace("command = [\"/bin/dns-filter\"]", command)
                + "[health]\nverdict_ping = true\ndeadline_s = 3\n",
        )
        .unwrap();
        d.signed_package(&src, &format!("dns-filter-{version}.gvpkg"))
    };
    let good = with_health("1.1.0", "command = [\"/bin/dns-filter\"]");
    let st = d.json(&[
        "service",
        "update",
        "t-dnsf",
        good.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(st["package_version"], "1.1.0", "{st}");
    let silent = with_health("1.2.0", "command = [\"/bin/sh\", \"-c\", \"sleep 1000\"]");
    let out = d.cli(&["service", "update", "t-dnsf", silent.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("did not speak on its verdict socket") && err.contains("rolled back to 1.1.0"),
        "{err}"
    );
    assert_eq!(d.status("t-dnsf")["package_version"], "1.1.0");

    // The daemon restarts: the service keeps its heartbeat going to the new daemon, which
    // re-adopts it and does not take it for hung (heartbeat_timeout_ms = 5000).
    let pid = d.status("t-dnsf")["init_pid"].as_i64();
    let restarts = d.status("t-dnsf")["restarts"].as_u64();
    d.kill9();
    d.spawn();
    std::thread::sleep(Duration::from_secs(7));
    let st = d.status("t-dnsf");
    assert_eq!(
        (st["init_pid"].as_i64(), st["restarts"].as_u64()),
        (pid, restarts),
        "{st}"
    );

    let logs = String::from_utf8_lossy(&d.cli(&["service", "logs", "t-dnsf"]).stdout).into_owned();
    assert!(
        logs.contains(&format!("blocked blocked.test for {KIDS_MAC}")),
        "{logs}"
    );
    stop.store(true, Ordering::Relaxed);
    resolver.join().unwrap();
}

#[test]
fn operator_settings_move_a_device_to_the_kids_profile_live_and_survive_a_daemon_restart() {
    if !need_ovs(
        "operator_settings_move_a_device_to_the_kids_profile_live_and_survive_a_daemon_restart",
    ) {
        return;
    }
    // The shipped package: its profiles are settings the manifest declares.
    let mut d = Daemon::start_with_keys();
    let pkg = d.example_package("dns-filter");
    let h = home::Home::new(&d, "cs", "10.91.0");
    d.install_package_started(&pkg);
    assert!(
        d.wait_for(Duration::from_secs(15), || h.filtered().then_some(()))
            .is_some(),
        "dns-filter never filtered; log:\n{}",
        String::from_utf8_lossy(&d.cli(&["service", "logs", "dns-filter"]).stdout)
    );
    let pid = d.status("dns-filter")["init_pid"].clone();
    let lan_mac = traffic::mac_in(&h.lan.ns);
    let blocked = |h: &home::Home| {
        h.ask("games.test", Duration::from_millis(700)) == Some((0, 1, [0, 0, 0, 0]))
    };
    assert_eq!(
        h.ask("games.test", Duration::from_millis(700))
            .map(|r| (r.0, r.1)),
        Some((0, 0)),
        "not a kids' device yet: forwarded"
    );
    let cfg = d.json(&["service", "config", "dns-filter", "--json"]);
    let kids = |cfg: &serde_json::Value| {
        cfg["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "KidsDevices")
            .cloned()
            .unwrap()
    };
    assert_eq!(kids(&cfg)["value"], "02:00:00:00:00:0a", "{cfg}");
    assert_eq!(kids(&cfg)["type"], "string-list");

    // Wrong values are refused and change nothing.
    for (kv, code) in [
        ("KidsDevices=02:00:00:00:00:0a,not-a-mac", 5),
        ("KidsBlockAddress=1.2.3", 5),
        ("NoSuchSetting=1", 4),
    ] {
        let out = d.cli(&["service", "config", "dns-filter", "set", kv]);
        assert_eq!(out.status.code(), Some(code), "{kv}: {out:?}");
        assert!(
            !String::from_utf8_lossy(&out.stderr).is_empty(),
            "{kv}: says why"
        );
    }
    assert_eq!(
        kids(&d.json(&["service", "config", "dns-filter", "--json"]))["set"],
        false
    );

    // The LAN host joins the kids' profile: the next lookup is answered with the block
    // address, by the same process.
    let t = std::time::Instant::now();
    let out = d.cli(&[
        "service",
        "config",
        "dns-filter",
        "set",
        &format!("KidsDevices=02:00:00:00:00:0a,{lan_mac}"),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        d.wait_for(Duration::from_secs(5), || blocked(&h).then_some(()))
            .is_some(),
        "the new profile never took effect"
    );
    println!("settings change to effect: {:?}", t.elapsed());
    assert_eq!(d.status("dns-filter")["init_pid"], pid, "not restarted");
    let get = d.cli(&["service", "config", "dns-filter", "get", "KidsDevices"]);
    assert_eq!(
        String::from_utf8_lossy(&get.stdout).trim(),
        format!("02:00:00:00:00:0a,{lan_mac}")
    );
    // The container finds them in its root too.
    let file = d.cli(&[
        "service",
        "exec",
        "dns-filter",
        "--",
        "cat",
        "/run/gatevisor/settings.json",
    ]);
    assert!(
        String::from_utf8_lossy(&file.stdout).contains(&lan_mac),
        "{file:?}"
    );
    let events = d.cli(&["events", "--json"]);
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("settings changed: KidsDevices"),
        "{events:?}"
    );

    // A daemon restart keeps them (stored, and handed to the re-adopted service again).
    d.kill9();
    d.spawn();
    assert!(d
        .wait_for(Duration::from_secs(15), || {
            (d.status("dns-filter")["state"] == "running").then_some(())
        })
        .is_some());
    assert_eq!(
        d.status("dns-filter")["init_pid"],
        pid,
        "re-adopted, not restarted"
    );
    assert!(blocked(&h), "the kids' profile survives the restart");
    // Back to the default: forwarded again.
    let out = d.cli(&[
        "service",
        "config",
        "dns-filter",
        "set",
        "KidsDevices=02:00:00:00:00:0a",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        d.wait_for(Duration::from_secs(5), || {
            (h.ask("games.test", Duration::from_millis(700)).map(|r| r.1) == Some(0)).then_some(())
        })
        .is_some(),
        "the old profile never came back"
    );
}

/// A resolver on `addrs` (UDP and TCP port 53) that answers every query NOERROR, echoing it;
/// over TCP it answers each message of a connection, however the client cut them.
fn echo_resolver(
    host: &lab::Host,
    addrs: Vec<std::net::SocketAddr>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = host.spawn(move || {
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        for a in &addrs {
            let u = UdpSocket::bind(a).unwrap();
            u.set_nonblocking(true).unwrap();
            udp.push(u);
            let t = TcpListener::bind(a).unwrap();
            t.set_nonblocking(true).unwrap();
            tcp.push(t);
        }
        tx.send(()).unwrap();
        let mut b = vec![0u8; 8192];
        while !stop.load(Ordering::Relaxed) {
            for u in &udp {
                while let Ok((n, from)) = u.recv_from(&mut b) {
                    if n >= 12 {
                        b[2] |= 0x80;
                        b[3] = 0x80;
                        let _ = u.send_to(&b[..n], from);
                    }
                }
            }
            for t in &tcp {
                while let Ok((mut c, _)) = t.accept() {
                    std::thread::spawn(move || {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                        loop {
                            let mut len = [0u8; 2];
                            if c.read_exact(&mut len).is_err() {
                                return;
                            }
                            let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
                            if c.read_exact(&mut m).is_err() || m.len() < 12 {
                                return;
                            }
                            m[2] |= 0x80;
                            m[3] = 0x80;
                            let _ = c.write_all(&[&len[..], &m].concat());
                        }
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    rx.recv().unwrap();
    h
}

/// A query for `name` whose EDNS OPT record carries `padding` bytes of the padding option
/// (RFC 7830): past ~1,450 bytes it no longer fits one packet and is sent in IP fragments.
fn padded_query(name: &str, padding: usize) -> Vec<u8> {
    let mut q = query(name, 1, true);
    let n = q.len();
    q[n - 2..].copy_from_slice(&((padding + 4) as u16).to_be_bytes()); // RDLEN
    q.extend_from_slice(&12u16.to_be_bytes());
    q.extend_from_slice(&(padding as u16).to_be_bytes());
    q.extend(std::iter::repeat_n(0u8, padding));
    q
}

/// The rcode of the answer to `q` sent over UDP from `lan` to `resolver`, if one comes.
fn udp_rcode(lan: &lab::Host, resolver: std::net::SocketAddr, q: Vec<u8>) -> Option<u8> {
    lan.spawn(move || {
        let any: std::net::SocketAddr = if resolver.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let s = UdpSocket::bind(any).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        s.send_to(&q, resolver).unwrap();
        let mut b = vec![0u8; 8192];
        let (n, _) = s.recv_from(&mut b).ok()?;
        (n >= 12).then(|| b[3] & 0x0f)
    })
    .join()
    .unwrap()
}

/// Sends `queries` over one TCP connection from `lan` to `resolver`: all in one write (one
/// segment: pipelined), or, when `split`, each length prefix and each message in writes of
/// their own (segments of their own). Returns the rcodes of the answers that came.
fn tcp_rcodes(
    lan: &lab::Host,
    resolver: std::net::SocketAddr,
    queries: Vec<Vec<u8>>,
    split: bool,
) -> Vec<u8> {
    lan.spawn(move || {
        let Ok(mut c) = TcpStream::connect_timeout(&resolver, Duration::from_secs(2)) else {
            return vec![];
        };
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(1000)))
            .unwrap();
        let mut all = Vec::new();
        for q in &queries {
            let prefix = (q.len() as u16).to_be_bytes();
            if split {
                for part in [&prefix[..], &q[..]] {
                    if c.write_all(part).is_err() {
                        return vec![];
                    }
                    std::thread::sleep(Duration::from_millis(60));
                }
            } else {
                all.extend_from_slice(&prefix);
                all.extend_from_slice(q);
            }
        }
        if !split && c.write_all(&all).is_err() {
            return vec![];
        }
        let mut rcodes = Vec::new();
        for _ in &queries {
            let mut len = [0u8; 2];
            if c.read_exact(&mut len).is_err() {
                break;
            }
            let mut m = vec![0u8; u16::from_be_bytes(len) as usize];
            if c.read_exact(&mut m).is_err() || m.len() < 12 {
                break;
            }
            rcodes.push(m[3] & 0x0f);
        }
        rcodes
    })
    .join()
    .unwrap()
}

#[test]
fn blocked_names_get_the_blocked_answer_over_ipv6_split_or_pipelined_tcp_and_in_fragments() {
    if !need_ovs(
        "blocked_names_get_the_blocked_answer_over_ipv6_split_or_pipelined_tcp_and_in_fragments",
    ) {
        return;
    }
    let d = Daemon::start_with_keys();
    let pkg = home::dns_filter_package(&d, "t-bypass");
    let lan = lab::Host::new("bl", Some("10.89.0.2/24"));
    let wan = lab::Host::new("bw", Some("10.89.0.1/24"));
    lan.add_ipv6("fd00:89::2/64");
    wan.add_ipv6("fd00:89::1/64");
    for h in [&lan, &wan] {
        d.plug_host(&h.host_if);
    }
    assert!(lab::wait_reachable(&lan.ns, "10.89.0.1"));
    assert!(lab::wait_reachable(&lan.ns, "fd00:89::1"));
    let v4: std::net::SocketAddr = "10.89.0.1:53".parse().unwrap();
    let v6: std::net::SocketAddr = "[fd00:89::1]:53".parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let resolver = echo_resolver(&wan, vec![v4, v6], stop.clone());
    d.install_package_started(&pkg);
    let q = |name: &str| query(name, 1, false);
    assert!(
        d.wait_for(Duration::from_secs(15), || {
            (udp_rcode(&lan, v4, q("malware.test")) == Some(3)).then_some(())
        })
        .is_some(),
        "dns-filter never filtered"
    );

    for r in [v4, v6] {
        // Over UDP, of either family; with subdomains.
        assert_eq!(udp_rcode(&lan, r, q("ok.test")), Some(0), "{r}: forwarded");
        assert_eq!(
            udp_rcode(&lan, r, q("malware.test")),
            Some(3),
            "{r}: blocked"
        );
        assert_eq!(
            udp_rcode(&lan, r, q("www.malware.test")),
            Some(3),
            "{r}: a subdomain of a blocked name"
        );
        // A query in IP fragments is judged whole; an allowed one still gets through.
        assert_eq!(
            udp_rcode(&lan, r, padded_query("malware.test", 2400)),
            Some(3),
            "{r}: a fragmented query of a blocked name"
        );
        assert_eq!(
            udp_rcode(&lan, r, padded_query("ok.test", 2400)),
            Some(0),
            "{r}: a fragmented query of an allowed name"
        );
        // Over TCP: one query, two in one segment, and each cut in pieces.
        assert_eq!(tcp_rcodes(&lan, r, vec![q("ok.test")], false), [0], "{r}");
        assert_eq!(
            tcp_rcodes(&lan, r, vec![q("malware.test")], false),
            [0u8; 0],
            "{r}: a blocked lookup over TCP"
        );
        assert_eq!(
            tcp_rcodes(&lan, r, vec![q("ok.test"), q("ok2.test")], false),
            [0, 0],
            "{r}: pipelined allowed lookups"
        );
        assert_eq!(
            tcp_rcodes(&lan, r, vec![q("ok.test"), q("malware.test")], false),
            [0u8; 0],
            "{r}: a blocked lookup pipelined behind an allowed one"
        );
        assert_eq!(
            tcp_rcodes(&lan, r, vec![q("ok.test"), q("ok2.test")], true),
            [0, 0],
            "{r}: split allowed lookups"
        );
        assert_eq!(
            tcp_rcodes(&lan, r, vec![q("ok.test"), q("malware.test")], true),
            [0],
            "{r}: only the allowed lookup is answered when each is cut in pieces"
        );
    }
    let logs =
        String::from_utf8_lossy(&d.cli(&["service", "logs", "t-bypass"]).stdout).into_owned();
    assert!(logs.contains("blocked malware.test"), "{logs}");
    stop.store(true, Ordering::Relaxed);
    resolver.join().unwrap();
}
