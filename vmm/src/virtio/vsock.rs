//! virtio-vsock with its host side on Unix sockets (the convention Firecracker made common):
//!
//! - **host → guest**: a host process connects to the VMM's socket `uds_path` and writes
//!   `CONNECT <port>\n`; the VMM asks the guest (REQUEST to that port) and answers
//!   `OK <host port>\n` once the guest accepts, then bytes flow both ways; a refusal closes
//!   the Unix connection;
//! - **guest → host**: a guest connecting to CID 2 port P reaches the Unix socket
//!   `<uds_path>_<P>` (a refused or missing one answers RST).
//!
//! Flow control is virtio-vsock's credit: the VMM never sends the guest more than its
//! buffer allows, and advertises its own buffer ([`BUF_ALLOC`]) so the guest never sends
//! more than the VMM holds for a slow host reader. Every header field from the guest is
//! checked: wrong CIDs, types, lengths or unknown connections get RST, a malformed chain
//! breaks the device.

use super::net::read_bytes;
use super::{DeviceError, VirtioDevice};
use crate::memory::Memory;
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub const HOST_CID: u64 = 2;
pub const HDR_LEN: usize = 44;
/// The VMM's receive buffer per connection, as advertised to the guest.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// The largest payload of one packet either way.
const MAX_PAYLOAD: usize = 64 * 1024;
/// Connections at once (host- and guest-initiated together).
const MAX_CONNS: usize = 64;
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// `virtio_vsock_event.id`: the guest must drop every connection (after a restore).
const EVENT_TRANSPORT_RESET: u32 = 0;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
const QUEUE_SIZES: [u16; 3] = [256, 256, 16];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

struct Conn {
    stream: UnixStream,
    state: State,
    /// The guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    tx_cnt: u32,
    /// Bytes written to the host stream, and the count last told to the guest.
    fwd_cnt: u32,
    fwd_told: u32,
    /// Bytes the host has not read yet: guest bytes (at most BUF_ALLOC, the guest respects
    /// credit), after the first `to_host_ours` bytes, which are the VMM's own `OK` line.
    to_host: Vec<u8>,
    to_host_ours: usize,
    /// The host closed its side: no more reads.
    host_eof: bool,
    /// Host bytes read with the `CONNECT` line, for the guest first.
    early: Vec<u8>,
}

impl Conn {
    fn new(stream: UnixStream, state: State) -> Conn {
        Conn {
            stream,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_told: 0,
            to_host: Vec::new(),
            to_host_ours: 0,
            host_eof: false,
            early: Vec::new(),
        }
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            match self.stream.write(&self.to_host) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    // Only the guest's bytes count as forwarded: the guest computes its
                    // credit from them.
                    let ours = n.min(self.to_host_ours);
                    self.to_host_ours -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Connection key: (host-side port, guest port).
type Key = (u32, u32);

pub struct Vsock {
    cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// Host connections that have not said `CONNECT <port>` yet, with what they sent so far.
    accepting: Vec<(UnixStream, Vec<u8>)>,
    conns: HashMap<Key, Conn>,
    /// Control packets for the guest, waiting for receive buffers.
    control: VecDeque<Header>,
    next_host_port: u32,
    rx_waiting: bool,
    rx_wake: EventFd,
    buf: Vec<u8>,
    /// A transport reset the guest has not been told of yet (no event buffer so far).
    reset_pending: bool,
}

impl Vsock {
    /// Listens on `uds_path` (replacing a stale socket file) for host connections.
    pub fn new(cid: u64, uds_path: PathBuf, rx_wake: EventFd) -> std::io::Result<Vsock> {
        let _ = std::fs::remove_file(&uds_path);
        let listener = UnixListener::bind(&uds_path)?;
        listener.set_nonblocking(true)?;
        Ok(Vsock {
            cid,
            uds_path,
            listener,
            accepting: Vec::new(),
            conns: HashMap::new(),
            control: VecDeque::new(),
            next_host_port: 1 << 30,
            rx_waiting: false,
            rx_wake,
            buf: vec![0; MAX_PAYLOAD],
            reset_pending: false,
        })
    }

    fn packet(&self, key: Key, op: u16, flags: u32, len: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn rst(&mut self, key: Key) {
        let h = self.packet(key, OP_RST, 0, 0, 0);
        self.control.push_back(h);
    }

    /// Accepts host connections and reads their `CONNECT <port>` lines.
    fn accept_host(&mut self) {
        while let Ok((s, _)) = self.listener.accept() {
            if self.accepting.len() + self.conns.len() >= MAX_CONNS
                || s.set_nonblocking(true).is_err()
            {
                continue; // dropped: the host sees its connection closed
            }
            self.accepting.push((s, Vec::new()));
        }
        let mut i = 0;
        while i < self.accepting.len() {
            let (s, line) = &mut self.accepting[i];
            let mut b = [0u8; 64];
            let done = match s.read(&mut b) {
                Ok(0) => Some(None),
                Ok(n) => {
                    line.extend_from_slice(&b[..n]);
                    if let Some(end) = line.iter().position(|c| *c == b'\n') {
                        let text = String::from_utf8_lossy(&line[..end]).to_string();
                        let port = text
                            .strip_prefix("CONNECT ")
                            .and_then(|p| p.trim().parse::<u32>().ok());
                        Some(port)
                    } else if line.len() > 32 {
                        Some(None)
                    } else {
                        None
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                Err(_) => Some(None),
            };
            match done {
                None => i += 1,
                Some(port) => {
                    let (s, line) = self.accepting.swap_remove(i);
                    let Some(port) = port else { continue };
                    let end = line.iter().position(|c| *c == b'\n').unwrap_or(line.len());
                    let key = (self.next_host_port, port);
                    self.next_host_port = self.next_host_port.wrapping_add(1).max(1 << 30);
                    let mut c = Conn::new(s, State::Connecting);
                    // Bytes after the line are the first of the stream.
                    c.early = line[end + 1..].to_vec();
                    let h = self.packet(key, OP_REQUEST, 0, 0, 0);
                    self.control.push_back(h);
                    self.conns.insert(key, c);
                }
            }
        }
    }

    /// Handles one packet from the guest.
    fn handle_guest_packet(&mut self, h: &Header, payload: &[u8]) {
        let key = (h.dst_port, h.src_port);
        if h.dst_cid != HOST_CID || h.src_cid != self.cid || h.kind != TYPE_STREAM {
            if h.op != OP_RST {
                let r = self.packet((h.dst_port, h.src_port), OP_RST, 0, 0, 0);
                self.control.push_back(r);
            }
            return;
        }
        if h.op == OP_REQUEST {
            if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNS {
                self.rst(key);
                return;
            }
            let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
            match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(s) => {
                    let mut c = Conn::new(s, State::Established);
                    c.peer_buf_alloc = h.buf_alloc;
                    c.peer_fwd_cnt = h.fwd_cnt;
                    self.conns.insert(key, c);
                    let r = self.packet(key, OP_RESPONSE, 0, 0, 0);
                    self.control.push_back(r);
                }
                Err(_) => self.rst(key),
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            if h.op != OP_RST {
                self.rst(key);
            }
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match (h.op, &c.state) {
            (OP_RESPONSE, State::Connecting) => {
                c.state = State::Established;
                let ok = format!("OK {}\n", key.0);
                c.to_host.extend_from_slice(ok.as_bytes());
                c.to_host_ours += ok.len();
                if c.flush().is_err() {
                    self.close(key, true);
                }
            }
            (OP_RW, State::Established) => {
                // The guest must respect the credit we advertised.
                if c.to_host.len() - c.to_host_ours + payload.len() > BUF_ALLOC as usize {
                    self.close(key, true);
                    return;
                }
                c.to_host.extend_from_slice(payload);
                if c.flush().is_err() {
                    self.close(key, true);
                    return;
                }
                self.maybe_credit_update(key);
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, State::Established) => {
                let fwd = c.fwd_cnt;
                c.fwd_told = fwd;
                let p = self.packet(key, OP_CREDIT_UPDATE, 0, 0, fwd);
                self.control.push_back(p);
            }
            (OP_SHUTDOWN, _) => {
                // The guest will neither send nor receive (both bits) or stops sending: the
                // host sees the end of the stream once the buffer is out.
                let _ = c.flush();
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
                if h.flags & 3 == 3 {
                    self.close(key, true);
                }
            }
            (OP_RST, _) => self.close(key, false),
            _ => self.close(key, true),
        }
    }

    fn maybe_credit_update(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if c.fwd_cnt.wrapping_sub(c.fwd_told) >= BUF_ALLOC / 4 {
                let fwd = c.fwd_cnt;
                c.fwd_told = fwd;
                let p = self.packet(key, OP_CREDIT_UPDATE, 0, 0, fwd);
                self.control.push_back(p);
            }
        }
    }

    /// Forgets a connection (its Unix stream closes); tells the guest with RST if `rst`.
    fn close(&mut self, key: Key, rst: bool) {
        self.conns.remove(&key);
        if rst {
            self.rst(key);
        }
    }

    /// Flushes what slow host readers left, reading and sending nothing.
    fn flush_all(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            let failed = self.conns.get_mut(&key).is_some_and(|c| c.flush().is_err());
            if failed {
                self.close(key, true);
            } else {
                self.maybe_credit_update(key);
            }
        }
    }

    /// The next packet for the guest, with its payload in `self.buf[..len]`: control
    /// first, then data from a host stream the guest has credit for.
    fn next_for_guest(&mut self) -> Option<(Header, usize)> {
        if let Some(h) = self.control.pop_front() {
            return Some((h, 0));
        }
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            let c = self.conns.get_mut(&key)?;
            if c.state != State::Established || c.host_eof {
                continue;
            }
            let credit = (c.peer_credit() as usize).min(MAX_PAYLOAD);
            if credit == 0 {
                continue;
            }
            let n = if !c.early.is_empty() {
                let n = c.early.len().min(credit);
                self.buf[..n].copy_from_slice(&c.early[..n]);
                c.early.drain(..n);
                n
            } else {
                match c.stream.read(&mut self.buf[..credit]) {
                    Ok(0) => {
                        c.host_eof = true;
                        let fwd = c.fwd_cnt;
                        // The host will send no more (and, closed, reads no more).
                        return Some((self.packet(key, OP_SHUTDOWN, 3, 0, fwd), 0));
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                    Err(_) => {
                        self.close(key, true);
                        continue;
                    }
                }
            };
            c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            let fwd = c.fwd_cnt;
            c.fwd_told = fwd;
            return Some((self.packet(key, OP_RW, 0, n as u32, fwd), n));
        }
        None
    }

    /// Tells the guest of a pending transport reset, in an event buffer if it gave one.
    fn send_reset(&mut self, mem: &Memory, q: &mut Queue) -> Result<bool, DeviceError> {
        if !self.reset_pending {
            return Ok(false);
        }
        let Some(chain) = q.pop_descriptor_chain(mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        let written = super::scatter(mem, chain, &[&EVENT_TRANSPORT_RESET.to_le_bytes()])?;
        if written < 4 {
            return Err(DeviceError::Chain {
                head,
                why: format!("an event buffer of {written} bytes"),
            });
        }
        q.add_used(mem, head, 4)
            .map_err(|e| DeviceError::Queue(EVENT, format!("used ring: {e}")))?;
        self.reset_pending = false;
        Ok(true)
    }

    fn receive(&mut self, mem: &Memory, q: &mut Queue) -> Result<bool, DeviceError> {
        let mut used = false;
        loop {
            if q.avail_idx(mem, std::sync::atomic::Ordering::Acquire).ok()
                == Some(std::num::Wrapping(q.next_avail()))
            {
                self.rx_waiting = true;
                return Ok(used);
            }
            let Some((h, len)) = self.next_for_guest() else {
                self.rx_waiting = false;
                return Ok(used);
            };
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                // Unreachable after the check above; keep the packet for later.
                self.control.push_front(h);
                self.rx_waiting = true;
                return Ok(used);
            };
            let head = chain.head_index();
            let hdr = h.bytes();
            let total = HDR_LEN + len;
            let written = super::scatter(mem, chain, &[&hdr, &self.buf[..len]])?;
            if written < total {
                return Err(DeviceError::Chain {
                    head,
                    why: format!("a receive buffer of {written} bytes for a {total}-byte packet"),
                });
            }
            q.add_used(mem, head, total as u32)
                .map_err(|e| DeviceError::Queue(RX, format!("used ring: {e}")))?;
            used = true;
        }
    }

    fn transmit(&mut self, mem: &Memory, q: &mut Queue) -> Result<bool, DeviceError> {
        let mut used = false;
        let mut bytes = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            super::gather(mem, chain, HDR_LEN + MAX_PAYLOAD, &mut bytes)?;
            if bytes.len() < HDR_LEN {
                return Err(DeviceError::Chain {
                    head,
                    why: format!("{} bytes is shorter than a vsock header", bytes.len()),
                });
            }
            let h = Header::parse(bytes[..HDR_LEN].try_into().unwrap());
            let body = &bytes[HDR_LEN..];
            if h.len as usize != body.len() && !(h.op != OP_RW && h.len == 0) {
                return Err(DeviceError::Chain {
                    head,
                    why: format!(
                        "header says {} bytes, the chain holds {}",
                        h.len,
                        body.len()
                    ),
                });
            }
            self.handle_guest_packet(&h, &body[..h.len as usize]);
            q.add_used(mem, head, 0)
                .map_err(|e| DeviceError::Queue(TX, format!("used ring: {e}")))?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn queue_notify(
        &mut self,
        mem: &Memory,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, DeviceError> {
        let used = match index {
            TX => {
                let tx = self.transmit(mem, &mut queues[TX])?;
                // Replies (RESPONSE, RST, credit) go out at once if there are buffers.
                let rx = self.receive(mem, &mut queues[RX])?;
                tx || rx
            }
            RX => self.receive(mem, &mut queues[RX])?,
            // The event queue: its one event is the reset after a restore.
            _ => self.send_reset(mem, &mut queues[EVENT])?,
        };
        let _ = self.rx_wake.write(1);
        Ok(used)
    }

    fn backend_ready(&mut self, mem: &Memory, queues: &mut [Queue]) -> Result<bool, DeviceError> {
        self.accept_host();
        self.flush_all();
        self.receive(mem, &mut queues[RX])
    }

    fn backend_fds(&self) -> Vec<(RawFd, i16)> {
        let mut fds = vec![(self.listener.as_raw_fd(), libc::POLLIN)];
        fds.extend(
            self.accepting
                .iter()
                .map(|(s, _)| (s.as_raw_fd(), libc::POLLIN)),
        );
        for c in self.conns.values() {
            let mut ev = 0;
            let readable = c.state == State::Established
                && !c.host_eof
                && c.peer_credit() > 0
                && !self.rx_waiting;
            if readable {
                ev |= libc::POLLIN;
            }
            if !c.to_host.is_empty() {
                ev |= libc::POLLOUT;
            }
            if ev != 0 {
                fds.push((c.stream.as_raw_fd(), ev));
            }
        }
        fds
    }

    fn reset(&mut self) {
        // The guest's connections are gone with its driver.
        self.conns.clear();
        self.control.clear();
        self.rx_waiting = false;
        self.reset_pending = false;
    }

    fn saved(&self) -> Vec<u8> {
        self.cid.to_le_bytes().to_vec()
    }

    /// The guest's connections ended with the old process (their host ends are its Unix
    /// sockets): a live driver is told so by a transport reset event, as the specification
    /// has it for a migrated device, and drops them; its listeners stay.
    fn resume(
        &mut self,
        saved: &[u8],
        mem: &Memory,
        queues: &mut [Queue],
        live: bool,
    ) -> Result<bool, String> {
        if saved != self.cid.to_le_bytes() {
            let was = saved
                .try_into()
                .map(u64::from_le_bytes)
                .map_err(|_| "the snapshot's vsock state has the wrong size".to_string())?;
            return Err(format!(
                "the snapshot's guest had context id {was}, this one {}",
                self.cid
            ));
        }
        if !live {
            return Ok(false);
        }
        self.reset_pending = true;
        self.send_reset(mem, &mut queues[EVENT])
            .map_err(|e| format!("telling the guest of the reset: {e}"))
    }
}
