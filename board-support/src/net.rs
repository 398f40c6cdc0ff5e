//! Networking features, probed by creating the real thing in a throw-away network namespace.
//!
//! `unshare(CLONE_NEWNET)` affects only the calling thread, so a short-lived probe thread gets a
//! fresh namespace, creates a tap (TUNSETIFF; the kernel refuses taps over rtnetlink) and a veth
//! pair (one RTM_NEWLINK request on a route netlink socket) there, and everything vanishes with
//! the thread. The host's namespace is never touched.
//!
//! The veth request is built here rather than with `rtnetlink`: that crate and its
//! `netlink-packet-route` parser cost ~450 KB of the stripped binary for this one message, and
//! the binary must fit a gateway's flash (≤ 4 MiB).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NetReport {
    pub netns: Result<(), String>,
    pub tap: Result<(), String>,
    pub veth: Result<(), String>,
}

pub fn probe() -> NetReport {
    std::thread::Builder::new()
        .name("gv-net-probe".into())
        .spawn(probe_in_new_netns)
        .ok()
        .and_then(|h| h.join().ok())
        .unwrap_or_else(|| NetReport {
            netns: Err("probe thread failed".into()),
            tap: Err("not probed".into()),
            veth: Err("not probed".into()),
        })
}

fn probe_in_new_netns() -> NetReport {
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
        let why = format!("unshare(CLONE_NEWNET): {e}");
        return NetReport {
            netns: Err(why.clone()),
            tap: Err(format!("not probed: {why}")),
            veth: Err(format!("not probed: {why}")),
        };
    }
    NetReport {
        netns: Ok(()),
        tap: probe_tap(),
        veth: probe_veth(),
    }
}

fn probe_tap() -> Result<(), String> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("cannot open /dev/net/tun: {e}"))?;
    tap_setiff(&tun, "gvprobe0").map_err(|e| format!("TUNSETIFF: {e}"))
    // The tap is not persistent: closing `tun` removes it.
}

/// Attaches `file` (an open `/dev/net/tun`) to a new tap interface `name`.
pub fn tap_setiff(file: &std::fs::File, name: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "interface name must be 1 to 15 bytes",
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun descriptor owned by the caller for the whole call;
    // `req` is a properly sized, initialised `struct ifreq` that the kernel reads and writes
    // only within its 40 bytes while the call runs.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn probe_veth() -> Result<(), String> {
    create_veth("gvprobe-a", "gvprobe-b").map_err(|e| format!("RTM_NEWLINK veth: {e}"))
}

/// Route-netlink constants the `libc` crate does not carry (linux/if_link.h, linux/veth.h).
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
const IFINFOMSG_LEN: usize = 16;

/// A netlink message under construction: attributes are appended 4-byte aligned, nests are
/// opened and closed by patching their length.
struct NlBuf(Vec<u8>);

impl NlBuf {
    fn align(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
    fn attr(&mut self, kind: u16, payload: &[u8]) {
        let start = self.open(kind);
        self.0.extend_from_slice(payload);
        self.close(start);
    }
    fn attr_str(&mut self, kind: u16, s: &str) {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.attr(kind, &v);
    }
    fn open(&mut self, kind: u16) -> usize {
        self.align();
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0.extend_from_slice(&kind.to_ne_bytes());
        start
    }
    fn close(&mut self, start: usize) {
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.align();
    }
    /// An all-zero `struct ifinfomsg` (AF_UNSPEC, no index, no flags).
    fn ifinfomsg(&mut self) {
        self.align();
        self.0.extend_from_slice(&[0; IFINFOMSG_LEN]);
    }
}

/// Creates the veth pair `name`/`peer` in the calling thread's network namespace with one
/// `RTM_NEWLINK` request, and returns the kernel's answer.
pub fn create_veth(name: &str, peer: &str) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    for n in [name, peer] {
        if n.is_empty() || n.len() >= libc::IFNAMSIZ {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                "interface name must be 1 to 15 bytes",
            ));
        }
    }
    let mut m = NlBuf(vec![0; 16]); // struct nlmsghdr, filled in below
    m.ifinfomsg();
    m.attr_str(libc::IFLA_IFNAME, name);
    let info = m.open(IFLA_LINKINFO | NLA_F_NESTED);
    m.attr_str(IFLA_INFO_KIND, "veth");
    let data = m.open(IFLA_INFO_DATA | NLA_F_NESTED);
    let peer_attr = m.open(VETH_INFO_PEER | NLA_F_NESTED);
    m.ifinfomsg();
    m.attr_str(libc::IFLA_IFNAME, peer);
    m.close(peer_attr);
    m.close(data);
    m.close(info);
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    let len = m.0.len() as u32;
    m.0[0..4].copy_from_slice(&len.to_ne_bytes());
    m.0[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
    m.0[6..8].copy_from_slice(&flags.to_ne_bytes());
    m.0[8..12].copy_from_slice(&1u32.to_ne_bytes()); // sequence number

    use nix::sys::socket::{self as so, MsgFlags};
    use std::os::fd::AsRawFd;
    let sock = send_route(&m.0)?;
    let mut answer = [0u8; 4096];
    let got = so::recv(sock.as_raw_fd(), &mut answer, MsgFlags::empty())?;
    ack_status(&answer[..got])
}

/// Opens a route netlink socket and sends the kernel `msg` (a whole netlink message); the
/// answer is read from the returned socket.
pub(crate) fn send_route(msg: &[u8]) -> std::io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{self as so, AddressFamily, MsgFlags, SockFlag, SockType};
    use std::os::fd::AsRawFd;
    let sock = so::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        so::SockProtocol::NetlinkRoute,
    )?;
    so::sendto(
        sock.as_raw_fd(),
        msg,
        &so::NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )?;
    Ok(sock)
}

/// Reads the kernel's `NLMSG_ERROR` acknowledgement: error 0 is success, anything else the
/// errno of the refusal.
fn ack_status(answer: &[u8]) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    let short = || Error::new(ErrorKind::InvalidData, "short netlink acknowledgement");
    let kind = u16::from_ne_bytes(answer.get(4..6).ok_or_else(short)?.try_into().unwrap());
    if kind != libc::NLMSG_ERROR as u16 {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("netlink answered with message type {kind}, not an acknowledgement"),
        ));
    }
    let errno = i32::from_ne_bytes(answer.get(16..20).ok_or_else(short)?.try_into().unwrap());
    match errno {
        0 => Ok(()),
        e => Err(Error::from_raw_os_error(-e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_runs_without_touching_host_namespace() {
        let before = std::fs::read_to_string("/proc/net/dev").unwrap();
        let r = probe();
        let after = std::fs::read_to_string("/proc/net/dev").unwrap();
        assert!(!after.contains("gvprobe"), "probe leaked an interface");
        assert_eq!(before.contains("gvprobe"), after.contains("gvprobe"));
        if nix::unistd::geteuid().is_root() {
            assert!(r.netns.is_ok(), "root can create a netns: {:?}", r.netns);
            assert!(r.veth.is_ok(), "veth: {:?}", r.veth);
            assert!(r.tap.is_ok(), "tap: {:?}", r.tap);
        } else {
            eprintln!("skipped the root part: not root");
        }
    }

    #[test]
    fn veth_request_is_refused_with_the_kernels_errno_when_the_name_is_taken() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: creating a network namespace needs root");
            return;
        }
        let r = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let first = create_veth("gvt-a", "gvt-b");
            let again = create_veth("gvt-a", "gvt-c");
            // /proc/net is the thread group leader's namespace; this thread has its own.
            let links = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
            (first, again, links)
        })
        .join()
        .unwrap();
        r.0.expect("first veth");
        assert_eq!(r.1.unwrap_err().raw_os_error(), Some(libc::EEXIST));
        assert!(r.2.contains("gvt-a") && r.2.contains("gvt-b"), "{}", r.2);
        assert!(!r.2.contains("gvt-c"), "{}", r.2);
    }

    #[test]
    fn interface_names_longer_than_the_kernel_allows_are_refused_before_sending() {
        let e = create_veth("a-name-of-16-byte", "b").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }
}
