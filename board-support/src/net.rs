//! Networking features, probed by creating the real thing in a throw-away network namespace.
//!
//! `unshare(CLONE_NEWNET)` affects only the calling thread, so a short-lived probe thread gets a
//! fresh namespace, creates a tap (TUNSETIFF; the kernel refuses taps over rtnetlink) and a veth
//! pair (rtnetlink) there, and everything vanishes with the thread. The host's namespace is never
//! touched.

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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async {
        let (conn, handle, _) =
            rtnetlink::new_connection().map_err(|e| format!("netlink socket: {e}"))?;
        tokio::spawn(conn);
        handle
            .link()
            .add(rtnetlink::LinkVeth::new("gvprobe-a", "gvprobe-b").build())
            .execute()
            .await
            .map_err(|e| format!("RTM_NEWLINK veth: {e}"))
    })
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
        } else {
            eprintln!("skipped the root part: not root");
        }
    }
}
