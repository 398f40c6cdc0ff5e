//! The lab shared by the steering tests and the steering benchmark: hosts in network
//! namespaces plugged into a bridge, DNS helpers, and a service that reads the frames steered
//! to it with AF_PACKET, as a real service does.
#![allow(dead_code)]

use std::net::UdpSocket;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    // SAFETY: plain socket(2) call; the returned fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            (libc::ETH_P_ALL as u16).to_be() as i32,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fd was just returned by socket(2) and is owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let ifindex = nix::net::if_::if_nametoindex(ifname).unwrap();
    // SAFETY: zeroed sockaddr_ll is a valid value; fields are set before bind reads it.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the stated size, alive for the call.
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &sll as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0);
    sock
}

/// Serves frames arriving on `sock` until `stop`.
pub fn serve_packets(
    sock: OwnedFd,
    stop: Arc<AtomicBool>,
    mut handler: impl FnMut(&mut [u8], usize, u8) -> u8,
) {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: tv is a valid timeval for SO_RCVTIMEO, alive for the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    // The kernel moves 802.1Q tags into packet metadata before packet sockets see a frame;
    // PACKET_AUXDATA hands the tag back so the frame can be rebuilt as it was on the wire.
    let one: libc::c_int = 1;
    // SAFETY: `one` is a valid int option value, alive for the call.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_AUXDATA,
            &one as *const _ as *const libc::c_void,
            4,
        )
    };
    let mut buf = [0u8; 9216];
    let mut cbuf = [0u64; 32]; // u64: cmsg headers need 8-byte alignment
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: zeroed sockaddr_ll and msghdr are valid values; the fields are set below.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf[4..].as_mut_ptr().cast(),
            iov_len: buf.len() - 4,
        };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = &mut from as *mut _ as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: every pointer in msg refers to a live buffer of the stated length.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
        if n <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let mut n = n as usize;
        let mut start = 4;
        // SAFETY: CMSG_* walk the control buffer recvmsg filled, within msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg points at a complete header inside cbuf (CMSG_FIRSTHDR/NXTHDR).
            let (level, ty) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
            if level == libc::SOL_PACKET && ty == libc::PACKET_AUXDATA {
                // SAFETY: the kernel put a tpacket_auxdata in this message's data; read it
                // unaligned since cbuf gives no alignment guarantee.
                let aux: libc::tpacket_auxdata =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                    buf.copy_within(4..16, 0);
                    buf[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
                    buf[14..16].copy_from_slice(&aux.tp_vlan_tci.to_be_bytes());
                    start = 0;
                    n += 4;
                }
            }
            // SAFETY: as above, walking within the same control buffer.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        let f = &mut buf[start..start + n];
        // Only frames we were sent carry our tag: 802.1Q, then IPv4.
        if f.len() < 18 + 20 + 8 || f[12..14] != [0x81, 0x00] || f[16..18] != [0x08, 0x00] {
            continue;
        }
        let ihl = (f[18] & 0x0f) as usize * 4;
        let proto = f[18 + 9];
        let l4 = 18 + ihl;
        let pcp = handler(f, l4, proto);
        f[14] = (f[14] & 0x1f) | pcp << 5;
        // SAFETY: f is a valid buffer of its length; the socket is bound to eth0.
        unsafe { libc::send(sock.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
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
