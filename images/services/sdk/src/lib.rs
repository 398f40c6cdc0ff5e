//! The service side of gatevisor steering.
//!
//! - [`PacketPort`]: the frames steered to the service on its interface, with their 802.1Q tag
//!   restored (the kernel moves tags into metadata; `PACKET_AUXDATA` gives them back), and the
//!   way to send them back with a verdict in the PCP.
//! - [`Frame`]: bounds-checked access to the tagged Ethernet / IPv4 or IPv6 / UDP or TCP
//!   frame.
//! - [`Defrag`]: IP fragments (both families) put back together, so a query sent in pieces
//!   is judged whole; [`TcpMessages`]: length-prefixed messages (DNS over TCP) read across and
//!   within segments.
//! - [`VerdictClient`]: the verdict socket (`$GATEVISOR_VERDICT_SOCKET`): hello, heartbeat,
//!   session verdicts, and host calls ([`VerdictClient::host_call`]; the `host-call` binary
//!   makes one from a shell).
//!
//! Everything read from the wire is untrusted: accessors return `None` instead of panicking.

mod defrag;
mod frame;
mod stream;

pub use defrag::{Defrag, Defragged, Expired};
pub use frame::{Fragment, Frame};
pub use stream::{TcpMessages, TcpVerdict};

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How every service starts: read its configuration (`$ENV_VAR`, else `default_path`) with
/// `parse`, start the heartbeat on its verdict socket, open `eth0`. Exits with a message
/// naming what is wrong (2: configuration, 1: the port).
pub fn start<C>(
    service: &str,
    env_var: &str,
    default_path: &str,
    parse: impl FnOnce(&str) -> Result<C, String>,
) -> (C, PacketPort) {
    let config = read_config(service, env_var, default_path, parse);
    (config, open_port(service))
}

/// A configuration the operator can change while the service runs.
pub type Live<C> = std::sync::Arc<std::sync::RwLock<std::sync::Arc<C>>>;

/// [`start`] for a service that takes the operator's settings: when the supervisor
/// delivers settings that `from_settings` understands (`Some`), they are the configuration,
/// and every later change replaces it while the service runs (a change it refuses is
/// logged and the old one kept); otherwise the file is read as by [`start`]. The settings
/// are read before the port opens, so no frame is judged with anything else.
pub fn start_with_settings<C: Send + Sync + 'static>(
    service: &'static str,
    env_var: &str,
    default_path: &str,
    parse: impl FnOnce(&str) -> Result<C, String>,
    from_settings: fn(&serde_json::Value) -> Option<Result<C, String>>,
) -> (Live<C>, PacketPort) {
    // Without a control channel there is nothing to watch; with one that does not answer
    // yet, the file configuration serves until it does.
    let watch = first_watch();
    let channel = watch.is_some();
    let (first, reader) = match watch.flatten() {
        Some((v, r)) => (Some(v), Some(r)),
        None => (None, None),
    };
    let config = match first.as_ref().and_then(from_settings) {
        Some(Ok(c)) => c,
        Some(Err(e)) => {
            eprintln!("{service}: settings: {e}");
            std::process::exit(2);
        }
        None => {
            if channel && reader.is_none() {
                eprintln!(
                    "{service}: the supervisor is not reachable yet; its settings apply once it is"
                );
            }
            read_config(service, env_var, default_path, parse)
        }
    };
    let l: Live<C> = std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(config)));
    if channel {
        // Followed once the configuration is live, so no change can come before it.
        let live = l.clone();
        follow_settings(
            reader,
            first.unwrap_or_default(),
            move |v| match from_settings(v) {
                Some(Ok(c)) => {
                    *live.write().unwrap() = std::sync::Arc::new(c);
                    println!("{service}: settings changed");
                }
                Some(Err(e)) => eprintln!("{service}: settings refused, keeping the old: {e}"),
                None => {}
            },
        );
    }
    (l, open_port(service))
}

fn read_config<C>(
    service: &str,
    env_var: &str,
    default_path: &str,
    parse: impl FnOnce(&str) -> Result<C, String>,
) -> C {
    let path = std::env::var(env_var).unwrap_or_else(|_| default_path.into());
    match std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|t| parse(&t))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{service}: {path}: {e}");
            std::process::exit(2);
        }
    }
}

/// Starts the heartbeat and opens `eth0`; says ready once it is open.
fn open_port(service: &str) -> PacketPort {
    VerdictClient::spawn_heartbeat(
        std::env::var("GATEVISOR_VERDICT_SOCKET").is_ok(),
        Duration::from_secs(1),
    );
    match PacketPort::open("eth0") {
        Ok(p) => {
            // Handed to the supervisor with every `ready` (see VerdictClient::mark_ready).
            if let Ok(dup) = p.sock.try_clone() {
                let _ = HANDED_PORT.set(dup);
            }
            // Frames steered from now on are read: the supervisor may steer to us.
            VerdictClient::mark_ready();
            p
        }
        Err(e) => {
            eprintln!("{service}: cannot open eth0 (needs CAP_NET_RAW): {e}");
            std::process::exit(1);
        }
    }
}

/// `aa:bb:cc:dd:ee:ff` → bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// Bytes → `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What to do with a steered packet, carried back in the PCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward this packet; keep inspecting the session.
    Forward = 0,
    /// Allow the session: the rest takes the fast path.
    Allow = 1,
    /// Block the session.
    Block = 2,
    /// This is an answer the service wrote: send it out of the original port.
    Reply = 3,
}

/// `<linux/if_packet.h>` options the libc crate does not name on every target.
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

/// The service's end of steering: frames in, frames back out with a verdict.
pub struct PacketPort {
    sock: OwnedFd,
    buf: Vec<u8>,
}

impl PacketPort {
    /// Opens an AF_PACKET socket on `ifname` (the service's `eth0`). Needs CAP_NET_RAW.
    pub fn open(ifname: &str) -> std::io::Result<PacketPort> {
        // SAFETY: plain socket(2); the fd is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                (libc::ETH_P_ALL as u16).to_be() as i32,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and nothing else owns it.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let ifindex = nix::net::if_::if_nametoindex(ifname).map_err(std::io::Error::from)?;
        // SAFETY: a zeroed sockaddr_ll is valid; its fields are set before bind reads it.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: sll is a valid sockaddr_ll of the given size, alive for the call.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                &sll as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Self::from_fd(sock))
    }

    /// A port over an AF_PACKET socket opened elsewhere (the supervisor side, say); it must be
    /// bound to the interface already. `PACKET_AUXDATA` is switched on here.
    pub fn from_fd(sock: OwnedFd) -> PacketPort {
        let one: libc::c_int = 1;
        // PACKET_AUXDATA gives the tags back. PACKET_IGNORE_OUTGOING (Linux 4.20) keeps the
        // frames the service sends from coming back to its own socket (a wake-up and a read
        // per verdict otherwise), and PACKET_QDISC_BYPASS sends them without the qdisc; both
        // are only savings, so their errors on an older kernel are ignored.
        for opt in [
            libc::PACKET_AUXDATA,
            PACKET_IGNORE_OUTGOING,
            PACKET_QDISC_BYPASS,
        ] {
            // SAFETY: `one` is a valid int option, alive for the call; `sock` is an open
            // socket.
            unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_PACKET,
                    opt,
                    &one as *const _ as *const libc::c_void,
                    4,
                )
            };
        }
        PacketPort {
            sock,
            buf: vec![0u8; 9216 + 4],
        }
    }

    pub fn into_fd(self) -> OwnedFd {
        self.sock
    }

    /// Makes `recv` return `WouldBlock` after `timeout` without a frame.
    pub fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as _,
            tv_usec: timeout.subsec_micros() as _,
        };
        // SAFETY: tv is a valid timeval for SO_RCVTIMEO, alive for the call.
        let rc = unsafe {
            libc::setsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The next frame received (not sent) on the port, its tag restored.
    pub fn recv(&mut self) -> std::io::Result<Frame<'_>> {
        loop {
            // SAFETY: zeroed sockaddr_ll/msghdr are valid; every pointer below refers to a
            // live buffer of the stated length for the duration of recvmsg.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut cbuf = [0u64; 32];
            let mut iov = libc::iovec {
                iov_base: self.buf[4..].as_mut_ptr().cast(),
                iov_len: self.buf.len() - 4,
            };
            // SAFETY: as above.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = &mut from as *mut _ as *mut libc::c_void;
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cbuf);
            // SAFETY: msg's pointers are valid as described.
            let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let mut n = n as usize;
            let mut start = 4;
            // SAFETY: CMSG_* walk the control buffer recvmsg filled, within msg_controllen.
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !cmsg.is_null() {
                // SAFETY: cmsg points at a complete header inside cbuf.
                let (level, ty) = unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type) };
                if level == libc::SOL_PACKET && ty == libc::PACKET_AUXDATA {
                    // SAFETY: this message carries a tpacket_auxdata; read it unaligned.
                    let aux: libc::tpacket_auxdata =
                        unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                    if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 && n >= 12 {
                        self.buf.copy_within(4..16, 0);
                        self.buf[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
                        self.buf[14..16].copy_from_slice(&aux.tp_vlan_tci.to_be_bytes());
                        start = 0;
                        n += 4;
                    }
                }
                // SAFETY: walking the same control buffer.
                cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
            }
            return Ok(Frame {
                bytes: &mut self.buf[start..start + n],
            });
        }
    }

    /// Sends `frame` back with `verdict` in its PCP.
    pub fn send(&self, frame: &mut [u8], verdict: Verdict) -> std::io::Result<()> {
        self.send_pcp(frame, verdict as u8)
    }

    /// Sends `frame` back with `pcp` (0-7) in its tag.
    pub fn send_pcp(&self, frame: &mut [u8], pcp: u8) -> std::io::Result<()> {
        if frame.len() < 18 {
            return Ok(());
        }
        frame[14] = (frame[14] & 0x1f) | (pcp & 7) << 5;
        // SAFETY: frame is a valid buffer of its length; the socket is bound to the port.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A vsock stream to `cid`:`port`. It is returned as a `UnixStream`, which only reads,
/// writes and sets timeouts on it: operations any connected stream socket supports.
fn connect_vsock(cid: u32, port: u32) -> std::io::Result<UnixStream> {
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: connect(2) with a pointer to `addr` and its exact size.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// A new connection to `$GATEVISOR_VERDICT_SOCKET`: a Unix socket path (a container), or
/// `vsock:CID:PORT` (a microVM: the supervisor's side is on the host, CID 2).
fn connect_env() -> Option<UnixStream> {
    let addr = std::env::var("GATEVISOR_VERDICT_SOCKET").ok()?;
    match addr.strip_prefix("vsock:") {
        Some(rest) => {
            let (cid, port) = rest.split_once(':')?;
            connect_vsock(cid.parse().ok()?, port.parse().ok()?).ok()
        }
        None => UnixStream::connect(addr).ok(),
    }
}

/// One `watch` connection: its first answer's settings, and the reader for the rest.
fn open_watch() -> Option<(serde_json::Value, BufReader<UnixStream>)> {
    let mut s = connect_env()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"{\"op\":\"watch\"}\n").ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    if v["ok"] != true {
        return None;
    }
    // From now on lines come only when the operator changes something.
    r.get_ref().set_read_timeout(None).ok()?;
    Some((v["settings"].clone(), r))
}

/// The items of the `string-list` setting `name` in a settings object (none when absent).
pub fn setting_list(settings: &serde_json::Value, name: &str) -> Vec<String> {
    settings[name]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The operator's settings (the object the supervisor delivers on the control channel,
/// every declared setting with its typed value): returned as they are now (`None` without
/// a control channel, or when it cannot be reached yet), then `on_change` is called on a
/// thread of its own with every new value, also the one found after a reconnection (a
/// restarted supervisor, or one not reachable at the service's start). A service without the
/// SDK finds the same object in `/run/gatevisor/settings.json` (containers).
pub fn watch_settings(
    on_change: impl Fn(&serde_json::Value) + Send + 'static,
) -> Option<serde_json::Value> {
    let (first, reader) = match first_watch()? {
        Some((v, r)) => (Some(v), Some(r)),
        None => (None, None),
    };
    follow_settings(reader, first.clone().unwrap_or_default(), on_change);
    first
}

/// The first answer of a settings watch and its connection: `None` without a control
/// channel, `Some(None)` when the channel does not answer (yet).
fn first_watch() -> Option<Option<(serde_json::Value, BufReader<UnixStream>)>> {
    std::env::var_os("GATEVISOR_VERDICT_SOCKET")?;
    Some(open_watch())
}

/// On a thread of its own: calls `on_change` with every value of the settings that differs
/// from `last`, read from `reader` and, whenever there is none (the supervisor not there yet,
/// or any more), from a new watch tried every 500 ms.
fn follow_settings(
    mut reader: Option<BufReader<UnixStream>>,
    mut last: serde_json::Value,
    on_change: impl Fn(&serde_json::Value) + Send + 'static,
) {
    std::thread::spawn(move || loop {
        let Some(r) = reader.as_mut() else {
            std::thread::sleep(Duration::from_millis(500));
            if let Some((v, r)) = open_watch() {
                reader = Some(r);
                if v != last {
                    last = v;
                    on_change(&last);
                }
            }
            continue;
        };
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(n) if n > 0 => {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["event"] == "settings" && v["settings"] != last {
                        last = v["settings"].clone();
                        on_change(&last);
                    }
                }
            }
            _ => reader = None,
        }
    });
}

/// A copy of the packet socket, sent along with `ready` on a Unix control channel: the
/// supervisor holds it while the service runs, so that the service's death does not wait for
/// the socket's close (an RCU grace period) before its process is seen to end, and its
/// traffic fails over at once.
static HANDED_PORT: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();

/// Whether the service's packet port is open (see [`VerdictClient::mark_ready`]).
static READY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The verdict socket.
pub struct VerdictClient {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl VerdictClient {
    /// Connects to `$GATEVISOR_VERDICT_SOCKET` and says hello; `None` without one. The
    /// variable is a Unix socket path (a container), or `vsock:CID:PORT` (a microVM: the
    /// supervisor's side is on the host, CID 2).
    pub fn from_env() -> Option<VerdictClient> {
        let s = connect_env()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut c = VerdictClient {
            w: s.try_clone().ok()?,
            r: BufReader::new(s),
        };
        c.ask("{\"op\":\"hello\"}").ok()?;
        Some(c)
    }

    fn ask(&mut self, line: &str) -> std::io::Result<serde_json::Value> {
        self.w.write_all(format!("{line}\n").as_bytes())?;
        self.reply()
    }

    /// The next reply line.
    fn reply(&mut self) -> std::io::Result<serde_json::Value> {
        let mut resp = String::new();
        self.r.read_line(&mut resp)?;
        serde_json::from_str(&resp).map_err(std::io::Error::other)
    }

    /// Says the service can take its traffic (manifests with `[network] ready = "notify"`
    /// are steered to only after this). Said at once on a connection of its own, and again by
    /// the heartbeat after every reconnection (a restarted supervisor hears it too).
    pub fn mark_ready() {
        READY.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(mut c) = VerdictClient::from_env() {
            let _ = c.ready();
        }
    }

    /// Says `ready`, handing over the packet socket on a Unix control channel (a vsock one,
    /// whose address is no Unix address, cannot carry descriptors).
    fn ready(&mut self) -> bool {
        const LINE: &[u8] = b"{\"op\":\"ready\"}\n";
        let sent = match HANDED_PORT.get().filter(|_| self.w.local_addr().is_ok()) {
            Some(port) => {
                use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
                let fds = [port.as_raw_fd()];
                match sendmsg::<()>(
                    self.w.as_raw_fd(),
                    &[std::io::IoSlice::new(LINE)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::empty(),
                    None,
                ) {
                    Ok(n) if n == LINE.len() => Ok(()),
                    Ok(_) => Err(std::io::ErrorKind::WriteZero.into()),
                    Err(e) => Err(e.into()),
                }
            }
            None => self.w.write_all(LINE),
        };
        sent.and_then(|()| self.reply())
            .is_ok_and(|v| v["ok"] == true)
    }

    /// Makes a host call: `call` names the operation (`link.stats`, `link.list`,
    /// `neigh.list`, `dhcp.leases`, `board.fact`), `args` its arguments. Only what the
    /// service's manifest was granted is answered.
    pub fn host_call(
        &mut self,
        call: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, HostCallError> {
        let line = serde_json::json!({"op": "call", "call": call, "args": args}).to_string();
        let v = self.ask(&line).map_err(|e| HostCallError {
            kind: "io".into(),
            error: e.to_string(),
        })?;
        if v["ok"] == true {
            return Ok(v["result"].clone());
        }
        Err(HostCallError {
            kind: v["kind"].as_str().unwrap_or("invalid").into(),
            error: v["error"].as_str().unwrap_or("no reason given").into(),
        })
    }

    pub fn ping(&mut self) -> bool {
        self.ask("{\"op\":\"ping\"}").is_ok_and(|v| v["ok"] == true)
    }

    /// Pings every `every` on a thread of its own (the supervisor's heartbeat).
    pub fn spawn_heartbeat(path_from_env: bool, every: Duration) {
        if !path_from_env {
            return;
        }
        // Reconnects when the socket goes away: a restarted supervisor binds it again and
        // must keep hearing from a service it re-adopted.
        std::thread::spawn(move || loop {
            if let Some(mut c) = VerdictClient::from_env() {
                let mut said = false;
                while c.ping() {
                    if !said && READY.load(std::sync::atomic::Ordering::SeqCst) {
                        said = c.ready();
                    }
                    std::thread::sleep(every);
                }
            }
            std::thread::sleep(every);
        });
    }
}

/// Why a host call was not answered: its kind (`not-granted`, `rate-limited`, `invalid`,
/// `not-found`, `unsupported`, `failed`; `io` when the socket failed) and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCallError {
    pub kind: String,
    pub error: String,
}

impl std::fmt::Display for HostCallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.error, self.kind)
    }
}

impl std::error::Error for HostCallError {}
