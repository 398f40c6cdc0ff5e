//! The lab shared by the steering tests and the steering benchmark: hosts in network
//! namespaces plugged into a bridge, DNS helpers, and a service that reads the frames steered
//! to it with AF_PACKET, as a real service does.
#![allow(dead_code)]

use gatevisor_service_sdk::PacketPort;
use std::net::UdpSocket;
use std::os::fd::OwnedFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with one veth whose host end is plugged into the bridge.
pub struct Host {
    pub ns: String,
    pub host_if: String,
}

impl Host {
    pub fn new(tag: &str, addr: Option<&str>) -> Host {
        let ns = format!("gvt-{tag}-{}", std::process::id());
        let host_if = format!("gv{tag}{}", std::process::id() % 10000);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        sh(&["ip", "netns", "add", &ns]);
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ]);
        sh(&["ip", "link", "set", &host_if, "up"]);
        sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        sh(&[
            "ip", "netns", "exec", &ns, "ip", "link", "set", "eth0", "up",
        ]);
        if let Some(a) = addr {
            sh(&[
                "ip", "netns", "exec", &ns, "ip", "addr", "add", a, "dev", "eth0",
            ]);
        }
        // Raw-socket services and the userspace datapath want real checksums and inline tags.
        for (ns_cmd, dev) in [(true, "eth0"), (false, host_if.as_str())] {
            let mut c = vec![];
            if ns_cmd {
                c.extend(["ip", "netns", "exec", ns.as_str()]);
            }
            c.extend([
                "ethtool", "-K", dev, "tx", "off", "rxvlan", "off", "txvlan", "off",
            ]);
            let _ = Command::new(c[0]).args(&c[1..]).output();
        }
        Host { ns, host_if }
    }

    /// Adds an IPv6 address (`fd00:1::2/64`) to the host's `eth0`, usable at once (no
    /// duplicate address detection).
    pub fn add_ipv6(&self, cidr: &str) {
        sh(&[
            "ip", "netns", "exec", &self.ns, "ip", "-6", "addr", "add", cidr, "dev", "eth0",
            "nodad",
        ]);
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// A DNS query for `name` (A record, id 0x1234).
pub fn dns_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

pub fn query_name(dns: &[u8]) -> String {
    let mut i = 12;
    let mut parts = Vec::new();
    while i < dns.len() && dns[i] != 0 {
        let n = dns[i] as usize;
        parts.push(
            String::from_utf8_lossy(dns.get(i + 1..i + 1 + n).unwrap_or_default()).into_owned(),
        );
        i += 1 + n;
    }
    parts.join(".")
}

/// Sends a query from the current namespace; returns the RCODE of the answer, or None.
pub fn lookup(server: &str, name: &str) -> Option<u8> {
    lookup_within(server, name, Duration::from_millis(700))
}

/// `lookup` with its own answer timeout.
pub fn lookup_within(server: &str, name: &str, timeout: Duration) -> Option<u8> {
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.send_to(&dns_query(name), server).unwrap();
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf).ok()?;
    (n >= 4).then(|| buf[3] & 0x0f)
}

/// A service reading the frames steered to it; `handler` may rewrite a frame and returns the
/// verdict (PCP) to send it back with.
pub fn run_raw_service(stop: Arc<AtomicBool>, handler: impl FnMut(&mut [u8], usize, u8) -> u8) {
    serve_packets(open_packet_socket("eth0"), stop, handler)
}

/// An AF_PACKET socket bound to `ifname` in the calling thread's network namespace.
pub fn open_packet_socket(ifname: &str) -> OwnedFd {
    PacketPort::open(ifname).expect("packet socket").into_fd()
}

/// Serves frames steered to `sock` until `stop`: `handler` may rewrite a tagged IPv4 frame and
/// returns the verdict (PCP) it goes back with.
pub fn serve_packets(
    sock: OwnedFd,
    stop: Arc<AtomicBool>,
    mut handler: impl FnMut(&mut [u8], usize, u8) -> u8,
) {
    let mut port = PacketPort::from_fd(sock);
    port.set_read_timeout(Duration::from_millis(100)).unwrap();
    while !stop.load(Ordering::Relaxed) {
        let Ok(frame) = port.recv() else { continue };
        if frame.ethertype() != Some(0x0800) || !frame.is_tagged_ip() {
            continue;
        }
        let (Some(l4), Some(proto)) = (frame.l4(), frame.proto()) else {
            continue;
        };
        let mut out = frame.bytes.to_vec();
        let pcp = handler(&mut out, l4, proto);
        let _ = port.send_pcp(&mut out, pcp);
    }
}

/// The DNS service's rule: a query for `blocked.test` becomes an NXDOMAIN answer sent back to
/// the asker (verdict 3); every other frame is forwarded (verdict 0).
pub fn nxdomain_for_blocked_test(f: &mut [u8], l4: usize, proto: u8) -> u8 {
    if f.len() < l4 + 8 + 12 {
        return 0;
    }
    let dport = u16::from_be_bytes([f[l4 + 2], f[l4 + 3]]);
    if proto != 17 || dport != 53 || query_name(&f[l4 + 8..]) != "blocked.test" {
        return 0;
    }
    let (a, b) = f.split_at_mut(6);
    a.swap_with_slice(&mut b[..6]);
    for i in 0..4 {
        f.swap(18 + 12 + i, 18 + 16 + i);
    }
    f.swap(l4, l4 + 2);
    f.swap(l4 + 1, l4 + 3);
    f[l4 + 6] = 0;
    f[l4 + 7] = 0; // UDP checksum optional over IPv4
    let dns = l4 + 8;
    f[dns + 2] |= 0x80;
    f[dns + 3] = 0x80 | 3;
    3
}

/// Waits (up to ~50 pings) until the host in namespace `ns` reaches `ip`: fresh ports on a
/// bridge take a moment to forward.
pub fn wait_reachable(ns: &str, ip: &str) -> bool {
    (0..50).any(|_| {
        Command::new("ip")
            .args(["netns", "exec", ns, "ping", "-c1", "-W1", ip])
            .output()
            .is_ok_and(|o| o.status.success())
    })
}
