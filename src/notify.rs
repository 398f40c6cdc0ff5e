//! The systemd notify protocol (`sd_notify`), without libsystemd: one datagram per message to
//! the Unix socket named by `$NOTIFY_SOCKET` (a path, or an abstract name starting with `@`).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `$WATCHDOG_USEC` as a duration: ping at least every half of it.
    pub watchdog: Option<Duration>,
}

impl Notifier {
    /// From the environment systemd sets; `None` when not started by systemd with
    /// `Type=notify`.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|us| *us > 0)
            .filter(|_| {
                // WATCHDOG_PID, when set, must be us.
                std::env::var("WATCHDOG_PID")
                    .ok()
                    .and_then(|p| p.parse::<u32>().ok())
                    .is_none_or(|p| p == std::process::id())
            })
            .map(Duration::from_micros);
        Notifier::new(&path.to_string_lossy(), watchdog).ok()
    }

    pub fn new(path: &str, watchdog: Option<Duration>) -> std::io::Result<Notifier> {
        let addr = match path.strip_prefix('@') {
            Some(name) => SocketAddr::from_abstract_name(name.as_bytes())?,
            None => SocketAddr::from_pathname(path)?,
        };
        Ok(Notifier {
            socket: UnixDatagram::unbound()?,
            addr,
            watchdog,
        })
    }

    pub fn send(&self, state: &str) {
        if let Err(e) = self.socket.send_to_addr(state.as_bytes(), &self.addr) {
            tracing::warn!("sd_notify {state:?} failed: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!(
            "READY=1\nSTATUS={status}\nMAINPID={}",
            std::process::id()
        ));
    }

    pub fn watchdog_ping(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_watchdog_datagrams_reach_the_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap(), Some(Duration::from_secs(10))).unwrap();
        n.ready("2 services");
        n.watchdog_ping();
        n.stopping();
        let mut buf = [0u8; 256];
        let got: Vec<String> = (0..3)
            .map(|_| {
                let k = server.recv(&mut buf).unwrap();
                String::from_utf8_lossy(&buf[..k]).into_owned()
            })
            .collect();
        assert!(
            got[0].starts_with("READY=1\nSTATUS=2 services\nMAINPID="),
            "{}",
            got[0]
        );
        assert_eq!(got[1], "WATCHDOG=1");
        assert_eq!(got[2], "STOPPING=1");
    }

    #[test]
    fn abstract_socket_names_are_supported() {
        let name = format!("gv-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(&format!("@{name}"), None)
            .unwrap()
            .send("READY=1");
        let mut buf = [0u8; 64];
        let k = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"READY=1");
    }
}
