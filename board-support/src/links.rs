//! The host's links and neighbours, read from the kernel over route netlink (`RTM_GETLINK`
//! and `RTM_GETNEIGH` dumps) in the calling thread's network namespace.
//!
//! The messages are read here rather than with `netlink-packet-route` for the same reason
//! as the veth probe (`net.rs`): that parser costs ~450 KB of a binary that must fit a
//! gateway's flash, for a handful of attributes. Everything the kernel sends is bounds-checked:
//! a short or malformed message ends the dump with an error, never a panic.

use std::io::{Error, ErrorKind};
use std::net::IpAddr;
use std::os::fd::AsRawFd;

use serde::Serialize;

/// One network link and its counters (`struct rtnl_link_stats64`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<String>,
    pub mtu: Option<u32>,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// The carrier is there (`IFF_LOWER_UP`).
    pub lower_up: bool,
    pub stats: Option<LinkStats>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_errors: u64,
    pub tx_errors: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    pub multicast: u64,
}

/// One neighbour table entry (ARP for IPv4, NDP for IPv6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Neighbour {
    /// The link it was seen on.
    pub link: String,
    pub ip: IpAddr,
    pub mac: Option<String>,
    /// `reachable`, `stale`, `delay`, `probe`, `failed`, `incomplete`, `noarp`, `permanent`.
    pub state: &'static str,
}

const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const NDMSG_LEN: usize = 12;
const RTA_HDRLEN: usize = 4;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_STATS64: u16 = 23;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const IFF_UP: u32 = 0x1;
const IFF_LOWER_UP: u32 = 0x10000;

/// Every link of the calling thread's network namespace.
pub fn links() -> std::io::Result<Vec<Link>> {
    let mut out = Vec::new();
    dump(libc::RTM_GETLINK, IFINFOMSG_LEN, |kind, body| {
        if kind == libc::RTM_NEWLINK {
            out.push(parse_link(body)?);
        }
        Ok(())
    })?;
    Ok(out)
}

/// Every neighbour entry, IPv4 and IPv6, with the name of its link.
pub fn neighbours() -> std::io::Result<Vec<Neighbour>> {
    let names: std::collections::HashMap<u32, String> =
        links()?.into_iter().map(|l| (l.index, l.name)).collect();
    let mut out = Vec::new();
    dump(libc::RTM_GETNEIGH, NDMSG_LEN, |kind, body| {
        if kind == libc::RTM_NEWNEIGH {
            if let Some(n) = parse_neighbour(body, &names)? {
                out.push(n);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

fn malformed(what: &str) -> Error {
    Error::new(ErrorKind::InvalidData, format!("malformed netlink {what}"))
}

/// Sends a dump request of `kind` (its family header `header_len` bytes of zeros: every
/// family, every link) and hands each answer's type and body to `each` until the dump ends.
fn dump(
    kind: u16,
    header_len: usize,
    mut each: impl FnMut(u16, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use nix::sys::socket::{self as so, MsgFlags};
    let mut req = vec![0u8; NLMSG_HDRLEN + header_len];
    let len = req.len() as u32;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    req[0..4].copy_from_slice(&len.to_ne_bytes());
    req[4..6].copy_from_slice(&kind.to_ne_bytes());
    req[6..8].copy_from_slice(&flags.to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    let sock = crate::net::send_route(&req)?;
    // A dump answer is at most a page or so per message; 32 KiB holds many.
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let got = so::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        if got == 0 {
            return Err(malformed("dump: the socket closed"));
        }
        let mut at = 0;
        while at + NLMSG_HDRLEN <= got {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
            if len < NLMSG_HDRLEN || at + len > got {
                return Err(malformed("message length"));
            }
            let body = &buf[at + NLMSG_HDRLEN..at + len];
            match ty as i32 {
                libc::NLMSG_DONE => return Ok(()),
                libc::NLMSG_ERROR => {
                    let code = body
                        .get(0..4)
                        .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                        .ok_or_else(|| malformed("error"))?;
                    return Err(Error::from_raw_os_error(-code));
                }
                _ => each(ty, body)?,
            }
            at += (len + 3) & !3;
        }
    }
}

/// The attributes after a family header of `skip` bytes: (type, payload) pairs.
fn attrs(body: &[u8], skip: usize) -> std::io::Result<Vec<(u16, &[u8])>> {
    let mut out = Vec::new();
    let mut at = skip;
    while at + RTA_HDRLEN <= body.len() {
        let len = u16::from_ne_bytes(body[at..at + 2].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(body[at + 2..at + 4].try_into().unwrap()) & 0x3fff;
        if len < RTA_HDRLEN || at + len > body.len() {
            return Err(malformed("attribute"));
        }
        out.push((ty, &body[at + RTA_HDRLEN..at + len]));
        at += (len + 3) & !3;
    }
    Ok(out)
}

/// A link-layer address as text, `aa:bb:cc:dd:ee:ff` (any length).
pub fn mac_text(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn parse_link(body: &[u8]) -> std::io::Result<Link> {
    if body.len() < IFINFOMSG_LEN {
        return Err(malformed("link"));
    }
    let index = u32_at(body, 4).ok_or_else(|| malformed("link"))?;
    let flags = u32_at(body, 8).ok_or_else(|| malformed("link"))?;
    let mut link = Link {
        index,
        name: String::new(),
        mac: None,
        mtu: None,
        up: flags & IFF_UP != 0,
        lower_up: flags & IFF_LOWER_UP != 0,
        stats: None,
    };
    for (ty, p) in attrs(body, IFINFOMSG_LEN)? {
        match ty {
            IFLA_IFNAME => {
                let s = p.split(|b| *b == 0).next().unwrap_or_default();
                link.name = String::from_utf8_lossy(s).into_owned();
            }
            IFLA_ADDRESS if !p.is_empty() => link.mac = Some(mac_text(p)),
            IFLA_MTU => link.mtu = u32_at(p, 0),
            IFLA_STATS64 if p.len() >= 9 * 8 => {
                let f = |i: usize| u64::from_ne_bytes(p[i * 8..i * 8 + 8].try_into().unwrap());
                link.stats = Some(LinkStats {
                    rx_packets: f(0),
                    tx_packets: f(1),
                    rx_bytes: f(2),
                    tx_bytes: f(3),
                    rx_errors: f(4),
                    tx_errors: f(5),
                    rx_dropped: f(6),
                    tx_dropped: f(7),
                    multicast: f(8),
                });
            }
            _ => {}
        }
    }
    Ok(link)
}

fn neighbour_state(s: u16) -> &'static str {
    match s {
        s if s & 0x80 != 0 => "permanent",
        s if s & 0x40 != 0 => "noarp",
        s if s & 0x02 != 0 => "reachable",
        s if s & 0x04 != 0 => "stale",
        s if s & 0x08 != 0 => "delay",
        s if s & 0x10 != 0 => "probe",
        s if s & 0x20 != 0 => "failed",
        s if s & 0x01 != 0 => "incomplete",
        _ => "none",
    }
}

fn parse_neighbour(
    body: &[u8],
    names: &std::collections::HashMap<u32, String>,
) -> std::io::Result<Option<Neighbour>> {
    if body.len() < NDMSG_LEN {
        return Err(malformed("neighbour"));
    }
    let index = u32_at(body, 4).ok_or_else(|| malformed("neighbour"))?;
    let state = u16::from_ne_bytes(body[8..10].try_into().unwrap());
    let (mut ip, mut mac) = (None, None);
    for (ty, p) in attrs(body, NDMSG_LEN)? {
        match (ty, p.len()) {
            (NDA_DST, 4) => ip = Some(IpAddr::from(<[u8; 4]>::try_from(p).unwrap())),
            (NDA_DST, 16) => ip = Some(IpAddr::from(<[u8; 16]>::try_from(p).unwrap())),
            (NDA_LLADDR, n) if n > 0 => mac = Some(mac_text(p)),
            _ => {}
        }
    }
    // Entries without an address (multicast, proxies) are not neighbours a service asks for.
    let Some(ip) = ip else { return Ok(None) };
    Ok(Some(Neighbour {
        link: names
            .get(&index)
            .cloned()
            .unwrap_or_else(|| index.to_string()),
        ip,
        mac,
        state: neighbour_state(state),
    }))
}

/// Turns off transmit checksum offload (and with it the segmentation offloads that need it) of
/// interface `ifname` in the network namespace of process `pid`. A userspace datapath (Open
/// vSwitch `netdev`) forwards a frame as it is: one whose checksum its sender left to the
/// hardware, as a veth does by default, reaches the receiver with a wrong checksum and is
/// dropped (pings pass, TCP never connects). Done on a thread of its own, which enters the
/// namespace and ends.
pub fn tx_checksum_off(pid: i32, ifname: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let name = ifname.as_bytes().to_vec();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an interface name",
        ));
    }
    std::thread::spawn(move || -> std::io::Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let sock = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        /// `struct ethtool_value`.
        #[repr(C)]
        struct EthtoolValue {
            cmd: u32,
            data: u32,
        }
        const ETHTOOL_STXCSUM: u32 = 0x17;
        const SIOCETHTOOL: libc::c_ulong = 0x8946;
        let mut value = EthtoolValue {
            cmd: ETHTOOL_STXCSUM,
            data: 0,
        };
        // SAFETY: an all-zero ifreq is valid (a name of NULs, a null union).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(&name) {
            *d = *s as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        // SAFETY: SIOCETHTOOL on a socket we own with an ifreq naming the interface and
        // pointing at an ethtool_value, both living across the call; the kernel reads the
        // command and writes nothing beyond them.
        let r = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut ifr) };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loopback_link_is_found_with_its_counters() {
        let all = links().unwrap();
        let lo = all.iter().find(|l| l.name == "lo").expect("lo is listed");
        assert_eq!(lo.index, 1);
        assert!(lo.up);
        assert_eq!(lo.mtu.map(|m| m > 0), Some(true));
        let before = lo.stats.unwrap().tx_packets;
        // Traffic on loopback moves its counters.
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..10 {
            s.send_to(b"x", s.local_addr().unwrap()).unwrap();
        }
        let after = links()
            .unwrap()
            .into_iter()
            .find(|l| l.name == "lo")
            .unwrap()
            .stats
            .unwrap()
            .tx_packets;
        assert!(after >= before + 10, "{before} -> {after}");
    }

    #[test]
    fn neighbours_read_without_error_and_malformed_answers_are_errors() {
        neighbours().unwrap();
        assert!(parse_link(&[0; 8]).is_err());
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend_from_slice(&[200, 0, 3, 0]); // an attribute longer than the message
        assert!(parse_link(&body).is_err());
        assert!(parse_neighbour(&[0; 4], &Default::default()).is_err());
    }
}
