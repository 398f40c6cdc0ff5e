//! The verdict API: newline-delimited JSON over a per-service Unix socket. The socket lives in
//! `STATE/run/NAME/` on the host, which is bind-mounted into the container at
//! `/run/gatevisor/` (the service finds it through `$GATEVISOR_VERDICT_SOCKET`). microVMs will
//! reach the same API over vsock.
//!
//! Requests, one JSON object per line; one reply line each:
//! - `{"op":"hello"}` → `{"ok":true,"service":"NAME","api":1}`
//! - `{"op":"ping"}` → `{"ok":true}`
//! - `{"op":"ready"}` → `{"ok":true,"port_held":B}`: the service can take its traffic now
//!   (manifests with `[network] ready = "notify"` are steered to only after this; said again
//!   after every reconnection, it changes nothing). The SDK sends its packet socket along
//!   (SCM_RIGHTS), and the supervisor holds it while the service runs (see [`PortHold`]).
//! - `{"op":"verdict","verdict":"allow"|"block","session":{"proto":"tcp","src":"A:P","dst":"B:Q"}}`
//!   → `{"ok":true}` once the verdict is on the switch.
//! - `{"op":"settings"}` → `{"ok":true,"generation":G,"settings":{...}}`: the operator's
//!   settings as the service declared them, typed.
//! - `{"op":"watch"}` → the same reply, then the connection only carries
//!   `{"event":"settings","generation":G,"settings":{...}}`, one line each time the operator
//!   changes them (the generation counts changes since the daemon opened the socket).
//! - `{"op":"call","call":OP,"args":{...}}` → `{"ok":true,"result":...}` or
//!   `{"ok":false,"kind":KIND,"error":...}`: a host call ([`crate::hostcall`]), if granted;
//!   at most [`MAX_CALLS_PER_S`] a second per service, each one audited.
//!
//! A packet socket that the service sends on any request is held ([`PortHold`]): with one
//! more reference, the service's death no longer closes it. Closing an AF_PACKET socket waits
//! for an RCU grace period (`synchronize_net`, ~10-25 ms here), and a process's pidfd says it
//! ended only after its descriptors are closed: with the socket held, the death is seen
//! within a millisecond and its class fails over at once; the supervisor closes its copy after
//! that, off its loop. Descriptors of any other kind are closed unread.
//!
//! Everything a service sends is untrusted: lines are bounded, bad requests get an error reply
//! (the connection stays usable), a service holds at most [`MAX_CONNECTIONS`] connections at
//! once, and its verdicts are rate-limited per service (more connections do not buy more).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowbridge::steering::Session;
use serde::Deserialize;
use serde_json::json;

use crate::supervisor::Msg;

pub const API_VERSION: u32 = 1;
/// Where the socket's directory appears inside the container.
pub const CONTAINER_DIR: &str = "/run/gatevisor";
pub const SOCKET_NAME: &str = "verdict.sock";
const MAX_LINE: usize = 4096;
/// Verdicts per second one service may send, over all its connections.
const MAX_VERDICTS_PER_S: u32 = 2000;
/// Host calls per second one service may make, over all its connections.
pub const MAX_CALLS_PER_S: u32 = 200;
/// Connections one service may hold open at once; one more is answered with an error and
/// closed.
pub const MAX_CONNECTIONS: usize = 8;

/// What all of one service's connections share.
struct Shared {
    name: String,
    tx: Sender<Msg>,
    stop: Arc<AtomicBool>,
    seen: Seen,
    /// The verdicts' rate window.
    window: RateWindow,
    connections: std::sync::atomic::AtomicUsize,
    /// A `ready` was passed to the supervisor and not handled yet: however often a service
    /// says it, at most one waits on the supervisor's loop.
    ready_pending: Arc<AtomicBool>,
    settings: Arc<Published>,
    /// What the service's host calls may reach, and where the board keeps it.
    host: Arc<std::sync::Mutex<Arc<HostAccess>>>,
    /// The host calls' rate window.
    calls: RateWindow,
    /// The service's packet socket, held while it runs.
    port: Arc<PortHold>,
}

/// The packet socket a service handed over, held so that its death is seen at once (see the
/// module's comment). The newest one replaces the one before.
#[derive(Default)]
pub struct PortHold(std::sync::Mutex<Option<std::os::fd::OwnedFd>>);

impl PortHold {
    /// Holds `fd` if it is an AF_PACKET socket (the one before is let go); other descriptors
    /// are closed. Whether it is held.
    fn offer(&self, fd: std::os::fd::OwnedFd) -> bool {
        if !is_packet_socket(&fd) {
            close_aside(fd);
            return false;
        }
        let old = self.0.lock().unwrap_or_else(|p| p.into_inner()).replace(fd);
        if let Some(old) = old {
            close_aside(old);
        }
        true
    }

    /// Whether a socket is held.
    fn held(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Lets the socket go (closed on a thread of its own: the close waits for a grace period).
    pub fn release(&self) {
        if let Some(fd) = self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            close_aside(fd);
        }
    }
}

/// Whether `fd` is an AF_PACKET socket.
fn is_packet_socket(fd: &std::os::fd::OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut domain: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `domain`, alive for the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            &mut domain as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && domain == libc::AF_PACKET
}

/// Closes `fd` on a short-lived thread: the last close of a packet socket blocks its caller
/// for an RCU grace period, which neither the supervisor's loop nor a connection should wait.
fn close_aside(fd: std::os::fd::OwnedFd) {
    // Should the thread not start, the closure and the descriptor are dropped right here.
    let _ = std::thread::Builder::new()
        .name("close-port".into())
        .stack_size(16 * 1024)
        .spawn(move || drop(fd));
}

/// The service's end of a connection, read with any descriptors it sends (at most one per
/// read; more are closed by the kernel), which go to the service's [`PortHold`].
struct Incoming<'a> {
    sock: UnixStream,
    port: &'a PortHold,
}

impl std::io::Read for Incoming<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::{FromRawFd, OwnedFd};
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        // Eight slots fill their control buffer exactly (no room from alignment for a ninth
        // that would be installed and not returned): up to eight are taken over here and
        // closed unless kept; with more, the call closes them all and fails.
        let mut fds = [-1; 8];
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        }];
        // SAFETY: the iovec points into `buf`, alive and writable for the whole call.
        let (n, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: recvmsg installed the first `nfds` descriptors in this process; nothing
        // else owns them.
        let mut received = fds[..nfds]
            .iter()
            .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) });
        if let Some(first) = received.next() {
            self.port.offer(first);
        }
        received.for_each(close_aside);
        Ok(n)
    }
}

/// A one-second window and what was counted in it, shared by a service's connections.
struct RateWindow(std::sync::Mutex<(Instant, u32)>);

impl RateWindow {
    fn new() -> RateWindow {
        RateWindow(std::sync::Mutex::new((Instant::now(), 0)))
    }

    /// Counts one more in the current second; false once more than `limit` were counted.
    fn take(&self, limit: u32) -> bool {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if w.0.elapsed() >= Duration::from_secs(1) {
            *w = (Instant::now(), 0);
        }
        w.1 += 1;
        w.1 <= limit
    }
}

/// A service's host-call grants and the board's sources they read.
#[derive(Debug, Clone, Default)]
pub struct HostAccess {
    pub grants: crate::hostcall::Grants,
    pub sources: Arc<crate::hostcall::Sources>,
}

/// The service's settings as last published, and their generation; watchers wait on it.
#[derive(Default)]
struct Published {
    value: std::sync::Mutex<(u64, serde_json::Value)>,
    changed: std::sync::Condvar,
}

impl Published {
    /// The line that tells the settings, and their generation.
    fn line(&self, event: bool) -> (serde_json::Value, u64) {
        let (g, v) = &*self.value.lock().unwrap();
        let line = if event {
            json!({"event": "settings", "generation": g, "settings": v})
        } else {
            json!({"ok": true, "generation": g, "settings": v})
        };
        (line, *g)
    }
}

impl Shared {
    /// Counts one verdict against the service's budget; false when it is spent.
    fn take_verdict(&self) -> bool {
        self.window.take(MAX_VERDICTS_PER_S)
    }

    /// Runs a host call and tells the supervisor, which audits it.
    fn host_call(&self, call: crate::hostcall::Call) -> serde_json::Value {
        let t0 = Instant::now();
        let result = if self.calls.take(MAX_CALLS_PER_S) {
            let access = self.host.lock().unwrap_or_else(|p| p.into_inner()).clone();
            crate::hostcall::execute(&call, &access.grants, &access.sources)
        } else {
            Err(crate::hostcall::CallError {
                kind: "rate-limited",
                error: format!("at most {MAX_CALLS_PER_S} host calls a second"),
            })
        };
        let _ = self.tx.send(Msg::HostCalled {
            name: self.name.clone(),
            call: format!("{} {}", call.op(), call.target().unwrap_or("*")),
            refused: result.as_ref().err().map(|e| e.kind),
            micros: t0.elapsed().as_micros() as u64,
        });
        match result {
            Ok(v) => json!({"ok": true, "result": v}),
            Err(e) => json!({"ok": false, "kind": e.kind, "error": e.error}),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Block,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    // Empty struct variants, not unit ones: serde only rejects unknown fields in those.
    Hello {},
    Ping {},
    Ready {},
    Verdict { verdict: Verdict, session: Session },
    Settings {},
    Watch {},
    Call(crate::hostcall::Call),
}

/// A service's verdict socket; dropping it closes the socket.
pub struct VerdictServer {
    stop: Arc<AtomicBool>,
    path: PathBuf,
    /// When the service last sent a well-formed request (ms since the epoch).
    last_seen_ms: Arc<std::sync::atomic::AtomicU64>,
    ready_pending: Arc<AtomicBool>,
    settings: Arc<Published>,
    host: Arc<std::sync::Mutex<Arc<HostAccess>>>,
    port: Arc<PortHold>,
}

impl VerdictServer {
    /// The service ended or is stopping: the packet socket it handed over is let go.
    pub fn release_port(&self) {
        self.port.release();
    }

    /// What the service's host calls may reach from now on (a new version's grants).
    pub fn set_host_access(&self, access: HostAccess) {
        *self.host.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(access);
    }

    /// Publishes the service's settings: the next `settings` answer carries them and every
    /// watcher is sent them now. Publishing the same value again sends nothing.
    pub fn publish_settings(&self, settings: serde_json::Value) {
        let mut cur = self.settings.value.lock().unwrap();
        if cur.1 == settings && cur.0 > 0 {
            return;
        }
        *cur = (cur.0 + 1, settings);
        self.settings.changed.notify_all();
    }

    /// When the service last spoke on its socket (ms since the epoch; 0: never).
    pub fn last_seen_ms(&self) -> u64 {
        self.last_seen_ms.load(Ordering::Relaxed)
    }

    /// The supervisor handled the service's `ready`: the next one is passed on again.
    pub fn ready_handled(&self) {
        self.ready_pending.store(false, Ordering::SeqCst);
    }

    /// The same time, for a worker that watches it (a health check).
    pub fn seen(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.last_seen_ms.clone()
    }
}

impl Drop for VerdictServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.port.release();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `dir/verdict.sock` for service `name` and serves it on its own threads.
/// `owner`: the host uid of the container's root when it runs in a user namespace (the
/// socket is its alone).
pub fn serve(
    dir: &Path,
    name: &str,
    owner: Option<u32>,
    host: HostAccess,
    tx: Sender<Msg>,
) -> std::io::Result<VerdictServer> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(&path, Some(uid), Some(uid))?;
    }
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let last_seen_ms = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ready_pending = Arc::new(AtomicBool::new(false));
    let settings = Arc::new(Published::default());
    *settings.value.lock().unwrap() = (0, json!({}));
    let host = Arc::new(std::sync::Mutex::new(Arc::new(host)));
    let port = Arc::new(PortHold::default());
    let shared = Arc::new(Shared {
        port: port.clone(),
        host: host.clone(),
        calls: RateWindow::new(),
        name: name.to_string(),
        tx,
        stop: stop.clone(),
        seen: last_seen_ms.clone(),
        window: RateWindow::new(),
        connections: std::sync::atomic::AtomicUsize::new(0),
        ready_pending: ready_pending.clone(),
        settings: settings.clone(),
    });
    std::thread::Builder::new()
        .name(format!("verdict-{name}"))
        .stack_size(128 * 1024)
        .spawn(move || accept_loop(listener, shared))?;
    Ok(VerdictServer {
        stop,
        path,
        last_seen_ms,
        ready_pending,
        settings,
        host,
        port,
    })
}

type Seen = Arc<std::sync::atomic::AtomicU64>;

/// Gives a connection's place back when its thread ends.
struct Place(Arc<Shared>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    use std::os::fd::AsFd;
    while !shared.stop.load(Ordering::Relaxed) {
        let mut fds = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16));
        match listener.accept() {
            Ok((mut conn, _)) => {
                if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    shared.connections.fetch_sub(1, Ordering::SeqCst);
                    let _ = conn.set_write_timeout(Some(Duration::from_millis(100)));
                    let _ = reply(
                        &mut conn,
                        json!({"ok": false, "error": format!("at most {MAX_CONNECTIONS} connections per service; closing")}),
                    );
                    continue;
                }
                let place = Place(shared.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("verdict-{}", shared.name))
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        let _ = serve_conn(conn, &place.0);
                        drop(place);
                    });
                if spawned.is_err() {
                    // The closure (and its place) was dropped with the failed spawn.
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn reply(w: &mut UnixStream, v: serde_json::Value) -> std::io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())
}

fn serve_conn(conn: UnixStream, shared: &Shared) -> std::io::Result<()> {
    let (name, tx, stop, seen) = (&shared.name, &shared.tx, &shared.stop, &shared.seen);
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    // A service that does not read its replies cannot hold the thread forever.
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(Incoming {
        sock: conn,
        port: &shared.port,
    });
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        // A read timeout keeps what arrived so far: the rest of the line comes later.
        let room = (MAX_LINE + 1).saturating_sub(line.len()) as u64;
        match std::io::Read::take(&mut r, room).read_until(b'\n', &mut line) {
            Ok(0) if room > 0 => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
        if line.len() > MAX_LINE {
            reply(
                &mut w,
                json!({"ok": false, "error": format!("line longer than {MAX_LINE} bytes; closing")}),
            )?;
            return Ok(());
        }
        if !line.ends_with(b"\n") {
            continue;
        }
        let parsed = serde_json::from_slice::<Request>(&line);
        line.clear();
        let req = match parsed {
            Ok(r) => {
                // Any well-formed request shows the service is alive (its heartbeat).
                seen.store(crate::state::now_ms(), Ordering::Relaxed);
                r
            }
            Err(e) => {
                reply(
                    &mut w,
                    json!({"ok": false, "error": format!("bad request: {e}")}),
                )?;
                continue;
            }
        };
        match req {
            Request::Hello {} => reply(
                &mut w,
                json!({"ok": true, "service": name, "api": API_VERSION}),
            )?,
            Request::Ping {} => reply(&mut w, json!({"ok": true}))?,
            Request::Ready {} => {
                if !shared.ready_pending.swap(true, Ordering::SeqCst) {
                    let _ = tx.send(Msg::Ready { name: name.clone() });
                }
                reply(&mut w, json!({"ok": true, "port_held": shared.port.held()}))?
            }
            Request::Settings {} => reply(&mut w, shared.settings.line(false).0)?,
            Request::Watch {} => {
                let (line, told) = shared.settings.line(false);
                reply(&mut w, line)?;
                return watch(r.into_inner().sock, w, shared, told);
            }
            Request::Call(call) => reply(&mut w, shared.host_call(call))?,
            Request::Verdict { verdict, session } => {
                if !shared.take_verdict() {
                    reply(
                        &mut w,
                        json!({"ok": false, "error": "rate limited: too many verdicts per second"}),
                    )?;
                    continue;
                }
                let (rtx, rrx) = mpsc::channel();
                let msg = Msg::Verdict {
                    name: name.to_string(),
                    session,
                    allow: verdict == Verdict::Allow,
                    reply: rtx,
                };
                if tx.send(msg).is_err() {
                    return Ok(());
                }
                match rrx.recv_timeout(Duration::from_secs(5)) {
                    Ok(Ok(())) => reply(&mut w, json!({"ok": true}))?,
                    Ok(Err(e)) => reply(&mut w, json!({"ok": false, "error": e}))?,
                    Err(_) => reply(
                        &mut w,
                        json!({"ok": false, "error": "the supervisor did not answer"}),
                    )?,
                }
            }
        }
    }
    Ok(())
}

/// A watching connection: one line per change of the settings, until the service closes it
/// or the socket is closed. Anything the service sends on it is read and ignored.
fn watch(
    mut conn: UnixStream,
    mut w: UnixStream,
    shared: &Shared,
    mut seen: u64,
) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_millis(1)))?;
    let mut sink = [0u8; 512];
    while !shared.stop.load(Ordering::Relaxed) {
        let changed = {
            let g = shared.settings.value.lock().unwrap();
            let (g, _) = shared
                .settings
                .changed
                .wait_timeout_while(g, Duration::from_millis(500), |(gen, _)| *gen == seen)
                .unwrap();
            (g.0 != seen).then_some(g.0)
        };
        if changed.is_some() {
            let (line, told) = shared.settings.line(true);
            seen = told;
            reply(&mut w, line)?;
        }
        // A closed peer ends the watch (its place is given back).
        match std::io::Read::read(&mut conn, &mut sink) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A supervisor that accepts every verdict at once.
    fn accepting() -> Sender<Msg> {
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::spawn(move || {
            for m in rx {
                if let Msg::Verdict { reply, .. } = m {
                    let _ = reply.send(Ok(()));
                }
            }
        });
        tx
    }

    fn line(c: &mut UnixStream) -> String {
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while c.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn watchers_get_every_settings_change_and_give_their_place_back() {
        let d = tempfile::tempdir().unwrap();
        let v = serve(d.path(), "svc", None, HostAccess::default(), accepting()).unwrap();
        v.publish_settings(json!({"Block": ["a.test"]}));
        let mut w = UnixStream::connect(d.path().join(SOCKET_NAME)).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        w.write_all(b"{\"op\":\"watch\"}\n").unwrap();
        let first: serde_json::Value = serde_json::from_str(&line(&mut w)).unwrap();
        assert_eq!(first["settings"], json!({"Block": ["a.test"]}), "{first}");
        let g = first["generation"].as_u64().unwrap();
        // The same value again is no change; a new one is pushed.
        // What a hostile service sends on a watching connection is read and ignored: it
        // neither stops the watch nor reaches the supervisor.
        w.write_all(b"{\"op\":\"verdict\",\"junk\":1}\n\xff\xfe not json\n")
            .unwrap();
        v.publish_settings(json!({"Block": ["a.test"]}));
        v.publish_settings(json!({"Block": ["b.test"]}));
        let ev: serde_json::Value = serde_json::from_str(&line(&mut w)).unwrap();
        assert_eq!(ev["event"], "settings");
        assert_eq!(ev["generation"], g + 1, "{ev}");
        assert_eq!(ev["settings"], json!({"Block": ["b.test"]}));
        // Plain requests see the same value; closed watchers free their place.
        let mut c = UnixStream::connect(d.path().join(SOCKET_NAME)).unwrap();
        c.write_all(b"{\"op\":\"settings\"}\n").unwrap();
        assert!(line(&mut c).contains("b.test"));
        drop(c);
        drop(w);
        for i in 0..(MAX_CONNECTIONS * 2) {
            // A watcher sees its peer gone within about half a second.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                // A connection over the limit is answered with an error and closed at once:
                // writing to it may already fail.
                let mut w = UnixStream::connect(d.path().join(SOCKET_NAME)).unwrap();
                if w.write_all(b"{\"op\":\"watch\"}\n").is_ok()
                    && line(&mut w).contains("\"ok\":true")
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "watcher {i}: no place given back"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    #[test]
    fn a_service_gets_a_bounded_number_of_connections() {
        let d = tempfile::tempdir().unwrap();
        let _srv = serve(d.path(), "svc", None, HostAccess::default(), accepting()).unwrap();
        let path = d.path().join(SOCKET_NAME);
        let mut held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut c = UnixStream::connect(&path).unwrap();
                c.write_all(b"{\"op\":\"ping\"}\n").unwrap();
                assert_eq!(line(&mut c), r#"{"ok":true}"#);
                c
            })
            .collect();
        let mut extra = UnixStream::connect(&path).unwrap();
        extra
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let refused = line(&mut extra);
        assert!(refused.contains("at most 8 connections"), "{refused}");
        // A place freed is a place to be had again.
        held.pop();
        let again = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            let mut c = UnixStream::connect(&path).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"{\"op\":\"ping\"}\n").is_ok() && line(&mut c) == r#"{"ok":true}"#
        });
        assert!(again);
    }

    #[test]
    fn the_verdict_rate_is_the_services_whatever_its_connections() {
        let d = tempfile::tempdir().unwrap();
        let _srv = serve(d.path(), "svc", None, HostAccess::default(), accepting()).unwrap();
        let path = d.path().join(SOCKET_NAME);
        let verdict = b"{\"op\":\"verdict\",\"verdict\":\"allow\",\"session\":{\"proto\":\"tcp\",\"src\":\"10.0.0.2:1\",\"dst\":\"10.0.0.1:80\"}}\n";
        let mut conns: Vec<UnixStream> = (0..4)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let start = Instant::now();
        let (mut ok, mut limited) = (0u32, 0u32);
        // 4 connections, 1000 verdicts each, within one window: only the service's 2000 pass.
        for round in 0..1000 {
            let _ = round;
            for c in conns.iter_mut() {
                c.write_all(verdict).unwrap();
                let r = line(c);
                if r.contains("rate limited") {
                    limited += 1;
                } else {
                    assert_eq!(r, r#"{"ok":true}"#);
                    ok += 1;
                }
            }
        }
        if start.elapsed() < Duration::from_secs(1) {
            assert_eq!(ok, MAX_VERDICTS_PER_S, "{ok} passed, {limited} limited");
        } else {
            // A slow machine crossed windows: still no window passed more than its share.
            assert!(ok <= MAX_VERDICTS_PER_S * (start.elapsed().as_secs() as u32 + 1));
        }
    }

    #[test]
    fn a_flood_of_ready_puts_one_message_on_the_supervisors_loop() {
        let d = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel::<Msg>();
        let srv = serve(d.path(), "svc", None, HostAccess::default(), tx).unwrap();
        let path = d.path().join(SOCKET_NAME);
        let mut conns: Vec<UnixStream> = (0..4)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let ready = |conns: &mut Vec<UnixStream>, n: usize| {
            for _ in 0..n {
                for c in conns.iter_mut() {
                    c.write_all(b"{\"op\":\"ready\"}\n").unwrap();
                    assert_eq!(line(c), r#"{"ok":true,"port_held":false}"#);
                }
            }
        };
        let readies = |rx: &mpsc::Receiver<Msg>| {
            rx.try_iter()
                .filter(|m| matches!(m, Msg::Ready { name } if name == "svc"))
                .count()
        };
        // 4 connections x 2,500: the service is answered every time, the loop hears it once.
        ready(&mut conns, 2500);
        assert_eq!(readies(&rx), 1);
        // Once the supervisor handled it, the next `ready` (a restarted service's) is heard.
        srv.ready_handled();
        ready(&mut conns, 10);
        assert_eq!(readies(&rx), 1);
        // A ready with anything more is a bad request, not a ready.
        conns[0]
            .write_all(b"{\"op\":\"ready\",\"service\":\"other\"}\n")
            .unwrap();
        assert!(line(&mut conns[0]).contains("bad request"));
        srv.ready_handled();
        assert_eq!(readies(&rx), 0);
    }

    #[test]
    fn requests_parse_and_bad_ones_are_rejected() {
        let r: Request = serde_json::from_str(
            r#"{"op":"verdict","verdict":"allow","session":{"proto":"tcp","src":"10.0.0.2:1234","dst":"10.0.0.1:80"}}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::Verdict {
                verdict: Verdict::Allow,
                ..
            }
        ));
        for bad in [
            r#"{"op":"format"}"#,
            r#"{"op":"verdict","verdict":"maybe","session":{"proto":"tcp","src":"10.0.0.2:1","dst":"10.0.0.1:80"}}"#,
            r#"{"op":"verdict","verdict":"allow","session":{"proto":"tcp","src":"10.0.0.2","dst":"10.0.0.1:80"}}"#,
            r#"{"op":"verdict","verdict":"allow","session":{"proto":"icmp","src":"10.0.0.2:1","dst":"10.0.0.1:80"}}"#,
            r#"{"op":"ping","extra":1}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    /// Sends `ready` with `fds` attached, as the SDK does (with one); the reply.
    fn ready_with(c: &mut UnixStream, fds: &[std::os::fd::RawFd]) -> serde_json::Value {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let request = b"{\"op\":\"ready\"}\n";
        sendmsg::<()>(
            c.as_raw_fd(),
            &[std::io::IoSlice::new(request)],
            &[ControlMessage::ScmRights(fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        serde_json::from_str(&line(c)).unwrap()
    }

    /// Whether anything (the server) still holds the read end of the pipe whose write end is
    /// `w`, once this side closed its own: a write fails with EPIPE when nothing does.
    fn read_end_held(w: &std::os::fd::OwnedFd) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if nix::unistd::write(w, b"x") == Err(nix::errno::Errno::EPIPE) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    /// A verdict server in `dir` whose supervisor accepts every verdict, and a connection to
    /// it that waits up to 5 s for a reply.
    fn served(dir: &Path) -> (VerdictServer, UnixStream) {
        let v = serve(dir, "svc", None, HostAccess::default(), accepting()).unwrap();
        let c = UnixStream::connect(dir.join(SOCKET_NAME)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (v, c)
    }

    #[test]
    fn descriptors_a_service_sends_that_are_not_packet_sockets_are_not_kept() {
        use std::os::fd::AsRawFd;
        let d = tempfile::tempdir().unwrap();
        let (_v, mut c) = served(d.path());
        // One pipe: closed unread.
        let (r1, w1) = nix::unistd::pipe().unwrap();
        assert_eq!(
            ready_with(&mut c, &[r1.as_raw_fd()]),
            json!({"ok": true, "port_held": false})
        );
        drop(r1);
        assert!(!read_end_held(&w1), "the server kept a pipe it was sent");
        // Three at once (the server keeps at most one per message): it answers, keeps none,
        // and the connection goes on.
        let pipes: Vec<_> = (0..3).map(|_| nix::unistd::pipe().unwrap()).collect();
        let fds: Vec<_> = pipes.iter().map(|(r, _)| r.as_raw_fd()).collect();
        let r = ready_with(&mut c, &fds);
        assert_eq!(r["port_held"], false, "{r}");
        for (i, (r, w)) in pipes.into_iter().enumerate() {
            drop(r);
            assert!(
                !read_end_held(&w),
                "the server kept descriptor {i} of three"
            );
        }
        c.write_all(b"{\"op\":\"ping\"}\n").unwrap();
        assert_eq!(line(&mut c), r#"{"ok":true}"#);
        // Nine, more than a message may carry: the connection is closed and none is kept.
        let pipes: Vec<_> = (0..9).map(|_| nix::unistd::pipe().unwrap()).collect();
        let fds: Vec<_> = pipes.iter().map(|(r, _)| r.as_raw_fd()).collect();
        {
            use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
            sendmsg::<()>(
                c.as_raw_fd(),
                &[std::io::IoSlice::new(b"{\"op\":\"ready\"}\n")],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::empty(),
                None,
            )
            .unwrap();
        }
        assert_eq!(line(&mut c), "", "the connection is closed");
        for (i, (r, w)) in pipes.into_iter().enumerate() {
            drop(r);
            assert!(!read_end_held(&w), "the server kept descriptor {i} of nine");
        }
    }

    #[test]
    fn a_handed_over_packet_socket_is_held_until_released_and_nothing_else_is() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let d = tempfile::tempdir().unwrap();
        let (v, mut c) = served(d.path());
        // Not a packet socket: closed unread, and the connection goes on.
        let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
        let r = ready_with(&mut c, &[pipe_r.as_raw_fd()]);
        assert_eq!(r, json!({"ok": true, "port_held": false}));
        // SAFETY: socket(2) with constant arguments; the result is checked before it is owned.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        if raw < 0 {
            eprintln!("skipping the packet-socket half: no CAP_NET_RAW here");
            return;
        }
        // SAFETY: a new descriptor nothing else owns.
        let packet = unsafe { OwnedFd::from_raw_fd(raw) };
        let r = ready_with(&mut c, &[packet.as_raw_fd()]);
        assert_eq!(r, json!({"ok": true, "port_held": true}));
        // Plain requests around it change nothing; a release lets it go.
        c.write_all(b"{\"op\":\"ping\"}\n").unwrap();
        assert_eq!(line(&mut c), r#"{"ok":true}"#);
        v.release_port();
        c.write_all(b"{\"op\":\"ready\"}\n").unwrap();
        let r: serde_json::Value = serde_json::from_str(&line(&mut c)).unwrap();
        assert_eq!(r["port_held"], false, "{r}");
    }
}
