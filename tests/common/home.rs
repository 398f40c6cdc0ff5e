//! A small home for remote-control tests and benchmarks: a LAN host and a WAN host on the
//! daemon's bridge, a resolver on the WAN that answers NOERROR to everything (so only a
//! filtering service can answer NXDOMAIN), and the dns-filter service as a signed package.
#![allow(dead_code)]

use super::lab;
use super::Daemon;
use std::net::UdpSocket;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Home {
    pub lan: lab::Host,
    pub wan: lab::Host,
    pub wan_ip: String,
    stop: Arc<AtomicBool>,
    resolver: Option<std::thread::JoinHandle<()>>,
}

impl Home {
    /// Hosts `NET.2` (LAN) and `NET.1` (WAN, the resolver) for a /24 `NET` like `10.97.0`.
    pub fn new(d: &Daemon, tag: &str, net: &str) -> Home {
        let wan_ip = format!("{net}.1");
        let lan = lab::Host::new(&format!("{tag}l"), Some(&format!("{net}.2/24")));
        let wan = lab::Host::new(&format!("{tag}w"), Some(&format!("{wan_ip}/24")));
        for h in [&lan, &wan] {
            d.plug_host(&h.host_if);
        }
        assert!(lab::wait_reachable(&lan.ns, &wan_ip));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let resolver = {
            let (stop, ip) = (stop.clone(), wan_ip.clone());
            wan.spawn(move || {
                let u = UdpSocket::bind((ip.as_str(), 53)).unwrap();
                u.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                ready_tx.send(()).unwrap();
                let mut b = [0u8; 1024];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = u.recv_from(&mut b) {
                        b[2] |= 0x80;
                        b[3] = 0x80; // NOERROR
                        let _ = u.send_to(&b[..n], from);
                    }
                }
            })
        };
        ready_rx.recv().unwrap();
        Home {
            lan,
            wan,
            wan_ip,
            stop,
            resolver: Some(resolver),
        }
    }

    /// Is `malware.test` answered NXDOMAIN (by a filtering service) within 50 ms?
    pub fn filtered(&self) -> bool {
        self.blocked("malware.test")
    }

    /// Is `name` answered NXDOMAIN (by a filtering service) within 50 ms?
    pub fn blocked(&self, name: &str) -> bool {
        self.ask(name, Duration::from_millis(50)).map(|a| a.0) == Some(3)
    }

    /// The LAN host's A query for `name`: (rcode, answers, last 4 bytes of the reply) when
    /// an answer comes within `timeout`.
    pub fn ask(&self, name: &str, timeout: Duration) -> Option<(u8, u16, [u8; 4])> {
        let ip = self.wan_ip.clone();
        let name = name.to_string();
        self.lan
            .spawn(move || {
                let s = UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(timeout)).unwrap();
                s.send_to(&lab::dns_query(&name), (ip.as_str(), 53))
                    .unwrap();
                let mut b = [0u8; 512];
                let (n, _) = s.recv_from(&mut b).ok()?;
                let r = b.get(..n).filter(|r| r.len() >= 12)?;
                Some((
                    r[3] & 0x0f,
                    u16::from_be_bytes([r[6], r[7]]),
                    r[n - 4..].try_into().ok()?,
                ))
            })
            .join()
            .unwrap()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.resolver.take() {
            let _ = r.join();
        }
    }
}

/// dns-filter (blocking `malware.test` for everyone) as a signed package named `name`.
pub fn dns_filter_package(d: &Daemon, name: &str) -> PathBuf {
    dns_filter_package_with(d, name, "open")
}

/// The same with `failure_mode` (`open` or `closed`). It is steered to once it says it is
/// ready (`ready = "notify"`).
pub fn dns_filter_package_with(d: &Daemon, name: &str, failure_mode: &str) -> PathBuf {
    dns_filter_package_more(d, name, failure_mode, "")
}

/// The same with `more` appended to its service manifest (tables such as `[restart]`).
pub fn dns_filter_package_more(d: &Daemon, name: &str, failure_mode: &str, more: &str) -> PathBuf {
    let binary = super::build_static("dns-filter", false);
    let src = d.dir.path().join(format!("src-{name}"));
    std::fs::create_dir_all(src.join("files/bin")).unwrap();
    std::fs::create_dir_all(src.join("files/etc")).unwrap();
    std::fs::copy(&binary, src.join("files/bin/dns-filter")).unwrap();
    std::fs::write(
        src.join("files/etc/dns-filter.toml"),
        "[default]\nname = \"everyone\"\nblock = [\"malware.test\"]\n",
    )
    .unwrap();
    std::fs::write(
        src.join("service.toml"),
        format!(
            "name = \"{name}\"\nversion = \"1.0.0\"\nruntime = \"auto\"\nimage = \"package\"\n\
             command = [\"/bin/dns-filter\"]\ncapabilities = [\"NET_RAW\"]\nfailure_mode = \"{failure_mode}\"\n\
             stop_timeout_s = 1\n[resources]\nmemory_mib = 32\n[network]\nsteering = [{{ kind = \"dns\" }}]\n\
             ready = \"notify\"\n{more}"
        ),
    )
    .unwrap();
    d.signed_package(&src, &format!("{name}.gvpkg"))
}
