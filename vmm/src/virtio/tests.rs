//! The devices driven through their MMIO registers by a small driver written here, as a
//! guest's would: set-up, requests through split queues, and hostile inputs.

use super::block::Block;
use super::mmio::{Interrupt, MmioTransport};
use super::net::{Net, HDR_LEN};
use crate::memory::Memory;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;
const S_NEEDS_RESET: u32 = 0x40;
const F_WRITE: u16 = 2;
const F_NEXT: u16 = 1;

pub fn memory() -> Memory {
    crate::memory::Memory::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

/// One split queue the test driver set up: rings at fixed addresses per queue index.
#[derive(Clone, Copy)]
pub struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    fn at(index: u64) -> Ring {
        let base = 0x1_0000 + index * 0x4000;
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
        }
    }
}

pub struct Driver {
    pub mem: Memory,
    pub t: MmioTransport,
    pub rings: Vec<Ring>,
}

impl Driver {
    pub fn new(dev: Box<dyn super::VirtioDevice>) -> Driver {
        let mem = memory();
        let t = MmioTransport::new(dev, mem.clone(), Interrupt::new(EventFd::new(0).unwrap()));
        Driver {
            mem,
            t,
            rings: Vec::new(),
        }
    }

    /// The same guest with `dev` in a fresh transport that took `saved` (a restore): the
    /// memory and the driver's ring bookkeeping carry over.
    pub fn restored(
        &self,
        dev: Box<dyn super::VirtioDevice>,
        saved: &super::mmio::SavedDevice,
    ) -> Result<Driver, String> {
        let mut t = MmioTransport::new(
            dev,
            self.mem.clone(),
            Interrupt::new(EventFd::new(0).unwrap()),
        );
        t.restore(saved)?;
        Ok(Driver {
            mem: self.mem.clone(),
            t,
            rings: self.rings.clone(),
        })
    }

    pub fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    pub fn r(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    /// The whole set-up of a Linux driver: status steps, features (all offered ones),
    /// `queues` queues of QSIZE, DRIVER_OK. Returns the final status.
    pub fn bring_up(&mut self, queues: u64) -> u32 {
        self.w(0x70, S_ACK);
        self.w(0x70, S_ACK | S_DRIVER);
        for sel in 0..2 {
            self.w(0x14, sel);
            let f = self.r(0x10);
            self.w(0x24, sel);
            self.w(0x20, f);
        }
        self.w(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
        for q in 0..queues {
            let ring = Ring::at(q);
            self.w(0x30, q as u32);
            self.w(0x38, QSIZE as u32);
            self.w(0x80, ring.desc as u32);
            self.w(0x84, 0);
            self.w(0x90, ring.avail as u32);
            self.w(0x94, 0);
            self.w(0xa0, ring.used as u32);
            self.w(0xa4, 0);
            self.w(0x44, 1);
            self.rings.push(ring);
        }
        self.w(0x70, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
        self.r(0x70)
    }

    /// Makes a chain of `(addr, len, device-writable)` available in queue `q` (no notify).
    pub fn push(&mut self, q: usize, chain: &[(u64, u32, bool)]) -> u16 {
        let ring = &mut self.rings[q];
        let head = ring.next_desc;
        for (i, (addr, len, write)) in chain.iter().enumerate() {
            let idx = (ring.next_desc % QSIZE) as u64;
            let last = i + 1 == chain.len();
            let next = (ring.next_desc + 1) % QSIZE;
            let flags = if *write { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            let at = GuestAddress(ring.desc + idx * 16);
            self.mem.write_obj(*addr, at).unwrap();
            self.mem.write_obj(*len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(next, at.unchecked_add(14)).unwrap();
            ring.next_desc = next;
        }
        let slot = GuestAddress(ring.avail + 4 + (ring.avail_idx % QSIZE) as u64 * 2);
        self.mem.write_obj(head % QSIZE, slot).unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(ring.avail_idx, GuestAddress(ring.avail + 2))
            .unwrap();
        head
    }

    /// The used ring's index and its entries so far: (head, len).
    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let ring = self.rings[q];
        let idx: u16 = self.mem.read_obj(GuestAddress(ring.used + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = GuestAddress(ring.used + 4 + (i % QSIZE) as u64 * 8);
                (
                    self.mem.read_obj(at).unwrap(),
                    self.mem.read_obj(at.unchecked_add(4)).unwrap(),
                )
            })
            .collect()
    }
}

use vm_memory::Address;

fn block(read_only: bool, sectors: u64) -> (Driver, tempfile::NamedTempFile) {
    let img = tempfile::NamedTempFile::new().unwrap();
    let pattern: Vec<u8> = (0..sectors * 512).map(|i| (i / 512) as u8).collect();
    std::fs::write(img.path(), &pattern).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(img.path())
        .unwrap();
    let mut d = Driver::new(Box::new(Block::new(f, read_only, "test-disk").unwrap()));
    assert_eq!(d.bring_up(1) & S_DRIVER_OK, S_DRIVER_OK);
    (d, img)
}

/// A block request: header at 0x8_0000, data at 0x9_0000, status at 0xa_0000.
fn blk_request(d: &mut Driver, kind: u32, sector: u64, data_len: u32, write: bool) -> u8 {
    d.mem.write_obj(kind, GuestAddress(0x8_0000)).unwrap();
    d.mem.write_obj(0u32, GuestAddress(0x8_0004)).unwrap();
    d.mem.write_obj(sector, GuestAddress(0x8_0008)).unwrap();
    d.mem.write_obj(0xffu8, GuestAddress(0xa_0000)).unwrap();
    let mut chain = vec![(0x8_0000, 16, false)];
    if data_len > 0 {
        chain.push((0x9_0000, data_len, write));
    }
    chain.push((0xa_0000, 1, true));
    d.push(0, &chain);
    d.w(0x50, 0);
    d.mem.read_obj(GuestAddress(0xa_0000)).unwrap()
}

#[test]
fn the_transport_identifies_itself_as_virtio_mmio_version_2() {
    let (d, _img) = block(true, 8);
    assert_eq!(d.r(0x00), 0x7472_6976);
    assert_eq!(d.r(0x04), 2);
    assert_eq!(d.r(0x08), 2); // block
    let mut cap = [0u8; 8];
    d.t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
}

#[test]
fn driver_ok_without_features_ok_or_without_version_1_is_refused() {
    let img = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(img.path(), [0u8; 4096]).unwrap();
    let f = File::open(img.path()).unwrap();
    let mut d = Driver::new(Box::new(Block::new(f, true, "x").unwrap()));
    d.w(0x70, S_ACK);
    d.w(0x70, S_ACK | S_DRIVER);
    // Skipping FEATURES_OK.
    d.w(0x70, S_ACK | S_DRIVER | S_DRIVER_OK);
    assert_eq!(d.r(0x70), S_ACK | S_DRIVER);
    // A legacy driver (no VERSION_1) cannot get FEATURES_OK.
    d.w(0x24, 0);
    d.w(0x20, 1 << 5);
    d.w(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(d.r(0x70) & S_FEATURES_OK, 0);
    // Nor a feature the device never offered.
    d.w(0x24, 1);
    d.w(0x20, 1 | 1 << 30);
    d.w(0x70, S_ACK | S_DRIVER | S_FEATURES_OK);
    assert_eq!(d.r(0x70) & S_FEATURES_OK, 0);
    // Reset, then the full bring-up works.
    d.w(0x70, 0);
    assert_eq!(d.r(0x70), 0);
    assert_eq!(d.bring_up(1) & S_DRIVER_OK, S_DRIVER_OK);
}

#[test]
fn block_reads_and_writes_sectors_and_flushes() {
    let (mut d, img) = block(false, 8);
    assert_eq!(blk_request(&mut d, 0, 3, 1024, true), 0);
    let mut got = vec![0u8; 1024];
    d.mem.read_slice(&mut got, GuestAddress(0x9_0000)).unwrap();
    assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));
    // Write sector 7 with 0xab, then flush.
    d.mem
        .write_slice(&[0xab; 512], GuestAddress(0x9_0000))
        .unwrap();
    assert_eq!(blk_request(&mut d, 1, 7, 512, false), 0);
    assert_eq!(blk_request(&mut d, 4, 0, 0, false), 0);
    let on_disk = std::fs::read(img.path()).unwrap();
    assert!(on_disk[7 * 512..].iter().all(|b| *b == 0xab));
    assert!(on_disk[6 * 512..7 * 512].iter().all(|b| *b == 6));
    let used = d.used(0);
    assert_eq!(used.len(), 3);
    assert_eq!(used[0].1, 1024 + 1, "read: data and status written");
    assert_eq!(used[1].1, 1, "write: only the status");
    assert_eq!(d.t.interrupt().status() & 1, 1);
}

#[test]
fn block_refuses_sectors_past_the_end_writes_to_read_only_and_unknown_requests() {
    let (mut d, _img) = block(true, 8);
    assert_eq!(
        blk_request(&mut d, 0, 7, 1024, true),
        1,
        "past the end: IOERR"
    );
    assert_eq!(
        blk_request(&mut d, 0, u64::MAX / 256, 512, true),
        1,
        "overflowing sector"
    );
    assert_eq!(blk_request(&mut d, 1, 0, 512, false), 1, "read-only: IOERR");
    assert_eq!(blk_request(&mut d, 99, 0, 0, false), 2, "unknown: UNSUPP");
    // GET_ID answers the serial.
    assert_eq!(blk_request(&mut d, 8, 0, 20, true), 0);
    let mut id = [0u8; 9];
    d.mem.read_slice(&mut id, GuestAddress(0x9_0000)).unwrap();
    assert_eq!(&id, b"test-disk");
    assert!(d.t.broken().is_none());
}

#[test]
fn a_descriptor_outside_guest_memory_needs_a_reset_and_hurts_nothing_else() {
    let (mut d, _img) = block(false, 8);
    d.mem.write_obj(0u32, GuestAddress(0x8_0000)).unwrap();
    d.push(
        0,
        &[
            (0x8_0000, 16, false),
            (MEM as u64 - 256, 4096, true), // runs off the end of memory
            (0xa_0000, 1, true),
        ],
    );
    d.w(0x50, 0);
    assert!(d.t.broken().is_some());
    assert_eq!(d.r(0x70) & S_NEEDS_RESET, S_NEEDS_RESET);
    assert_eq!(d.t.interrupt().status() & 2, 2, "configuration interrupt");
    // Nothing is served until the driver resets and sets the device up again.
    let before = d.used(0).len();
    blk_request(&mut d, 0, 0, 512, true);
    assert_eq!(d.used(0).len(), before);
    d.w(0x70, 0);
    d.rings.clear();
    // Fresh rings: zero the old ones so the device starts from index 0.
    d.mem
        .write_slice(&vec![0u8; 0x4000], GuestAddress(0x1_0000))
        .unwrap();
    assert_eq!(d.bring_up(1) & S_DRIVER_OK, S_DRIVER_OK);
    assert_eq!(blk_request(&mut d, 0, 1, 512, true), 0);
}

#[test]
fn a_chain_with_the_wrong_framing_breaks_the_device() {
    for chain in [
        vec![(0x8_0000u64, 16u32, true), (0xa_0000, 1, true)], // writable header
        vec![(0x8_0000, 16, false), (0xa_0000, 1, false)],     // read-only status
        vec![(0x8_0000, 8, false), (0xa_0000, 1, true)],       // short header
        vec![(0x8_0000, 16, false)],                           // no status
    ] {
        let (mut d, _img) = block(false, 8);
        d.mem.write_obj(0u32, GuestAddress(0x8_0000)).unwrap();
        d.push(0, &chain);
        d.w(0x50, 0);
        assert!(d.t.broken().is_some(), "{chain:?}");
    }
}

fn net() -> (Driver, UnixDatagram) {
    let (a, b) = UnixDatagram::pair().unwrap();
    a.set_nonblocking(true).unwrap();
    let tap = File::from(OwnedFd::from(a));
    let dev = Net::new(tap, [2, 0, 0, 0, 0, 1], EventFd::new(0).unwrap());
    let mut d = Driver::new(Box::new(dev));
    assert_eq!(d.bring_up(2) & S_DRIVER_OK, S_DRIVER_OK);
    (d, b)
}

#[test]
fn net_sends_frames_without_the_virtio_header_and_reports_its_mac() {
    let (mut d, peer) = net();
    let mut mac = [0u8; 6];
    d.t.read(0x100, &mut mac);
    assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    let frame: Vec<u8> = (0..60u8).collect();
    d.mem
        .write_slice(&[0u8; HDR_LEN], GuestAddress(0x8_0000))
        .unwrap();
    d.mem.write_slice(&frame, GuestAddress(0x9_0000)).unwrap();
    d.push(
        1,
        &[(0x8_0000, HDR_LEN as u32, false), (0x9_0000, 60, false)],
    );
    d.w(0x50, 1);
    let mut got = [0u8; 100];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &frame[..]);
    assert_eq!(d.used(1).len(), 1);
}

#[test]
fn net_delivers_a_frame_into_a_receive_buffer_with_a_header_and_waits_when_there_is_none() {
    let (mut d, peer) = net();
    let frame = [0x5au8; 98];
    peer.send(&frame).unwrap();
    // No buffers yet: the frame waits.
    d.t.backend_ready();
    assert!(d.t.backend_fds().is_empty());
    assert_eq!(d.used(0).len(), 0);
    d.push(0, &[(0x8_0000, 1526, true)]);
    d.w(0x50, 0);
    assert_eq!(d.used(0), vec![(0, (HDR_LEN + 98) as u32)]);
    let mut got = [0u8; HDR_LEN + 98];
    d.mem.read_slice(&mut got, GuestAddress(0x8_0000)).unwrap();
    assert_eq!(got[10], 1, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &frame);
    assert!(!d.t.backend_fds().is_empty());
}

#[test]
fn net_drops_a_frame_too_big_for_the_buffer_and_keeps_the_buffer() {
    let (mut d, peer) = net();
    d.push(0, &[(0x8_0000, 64, true)]);
    d.w(0x50, 0);
    peer.send(&[1u8; 200]).unwrap();
    peer.send(&[2u8; 40]).unwrap();
    d.t.backend_ready();
    assert_eq!(d.used(0), vec![(0, (HDR_LEN + 40) as u32)]);
}

#[test]
fn net_refuses_a_receive_buffer_it_may_not_write() {
    let (mut d, peer) = net();
    peer.send(&[1u8; 60]).unwrap();
    d.push(0, &[(0x8_0000, 1526, false)]);
    d.w(0x50, 0);
    assert!(d.t.broken().is_some());
}

mod hostile {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        /// Whatever a driver puts in its rings and registers, the devices (block, net,
        /// vsock) neither panic nor touch memory outside the guest's: every descriptor
        /// table, ring index, address and length below is arbitrary.
        #[test]
        fn arbitrary_rings_and_registers_never_panic(
            ring_bytes in proptest::collection::vec(any::<u8>(), 0x3000),
            writes in proptest::collection::vec((0u64..0x120, any::<u32>()), 0..40),
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..4),
        ) {
            // Block.
            let (mut d, _img) = block(false, 16);
            d.mem.write_slice(&ring_bytes, GuestAddress(0x1_0000)).unwrap();
            d.w(0x50, 0);
            for (off, v) in &writes {
                d.w(*off & !3, *v);
                d.w(0x50, 0);
            }
            // Net, both queues.
            let (mut n, peer) = net();
            n.mem.write_slice(&ring_bytes, GuestAddress(0x1_0000)).unwrap();
            n.mem.write_slice(&ring_bytes, GuestAddress(0x1_4000)).unwrap();
            for f in &frames {
                let _ = peer.send(f);
            }
            n.w(0x50, 0);
            n.w(0x50, 1);
            n.t.backend_ready();
            for (off, v) in &writes {
                n.w(*off & !3, *v);
                n.t.backend_ready();
            }
            // vsock: arbitrary rings, and a host that connects and sends bytes.
            let dir = tempfile::tempdir().unwrap();
            let dev = crate::virtio::vsock::Vsock::new(
                3,
                dir.path().join("v.sock"),
                EventFd::new(0).unwrap(),
            )
            .unwrap();
            let mut v = Driver::new(Box::new(dev));
            v.bring_up(3);
            v.mem.write_slice(&ring_bytes, GuestAddress(0x1_0000)).unwrap();
            v.mem.write_slice(&ring_bytes, GuestAddress(0x1_4000)).unwrap();
            if let Ok(mut host) = std::os::unix::net::UnixStream::connect(dir.path().join("v.sock")) {
                use std::io::Write;
                let _ = host.write_all(b"CONNECT 5\n");
                for f in &frames {
                    let _ = host.write_all(f);
                }
            }
            for q in 0..3 {
                v.w(0x50, q);
                v.t.backend_ready();
            }
            for (off, val) in &writes {
                v.w(*off & !3, *val);
                v.t.backend_ready();
            }
        }
    }
}

mod vsock {
    use super::*;
    use crate::virtio::vsock::{Header, Vsock, BUF_ALLOC, HDR_LEN as VHDR};
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};

    const CID: u64 = 7;

    fn device(dir: &std::path::Path) -> Driver {
        let dev = Vsock::new(CID, dir.join("v.sock"), EventFd::new(0).unwrap()).unwrap();
        let mut d = Driver::new(Box::new(dev));
        assert_eq!(d.bring_up(3) & S_DRIVER_OK, S_DRIVER_OK);
        d
    }

    /// Gives the device `n` receive buffers at 0x8_0000 + i * 0x1_0000.
    fn rx_buffers(d: &mut Driver, n: u64) {
        for i in 0..n {
            d.push(0, &[(0x8_0000 + i * 0x1_0000, 0x1_0000, true)]);
        }
        d.w(0x50, 0);
    }

    /// The packets the device put in the receive queue so far.
    fn received(d: &Driver) -> Vec<(Header, Vec<u8>)> {
        d.used(0)
            .iter()
            .map(|(head, len)| {
                let at = GuestAddress(0x8_0000 + *head as u64 * 0x1_0000);
                let mut b = vec![0u8; *len as usize];
                d.mem.read_slice(&mut b, at).unwrap();
                let h = Header::parse(b[..VHDR].try_into().unwrap());
                (h, b[VHDR..].to_vec())
            })
            .collect()
    }

    fn send(d: &mut Driver, h: Header, payload: &[u8]) {
        d.mem
            .write_slice(&h.bytes(), GuestAddress(0x6_0000))
            .unwrap();
        d.mem.write_slice(payload, GuestAddress(0x7_0000)).unwrap();
        let mut chain = vec![(0x6_0000, VHDR as u32, false)];
        if !payload.is_empty() {
            chain.push((0x7_0000, payload.len() as u32, false));
        }
        d.push(1, &chain);
        d.w(0x50, 1);
    }

    fn guest(op: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: 2,
            src_port,
            dst_port,
            len,
            kind: 1,
            op,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn a_host_connect_reaches_the_guest_and_bytes_flow_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(dir.path());
        let mut cid = [0u8; 8];
        d.t.read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), CID);
        rx_buffers(&mut d, 8);
        let mut host = UnixStream::connect(dir.path().join("v.sock")).unwrap();
        host.write_all(b"CONNECT 5000\nearly").unwrap();
        // The I/O thread's part: accept, read the line, ask the guest.
        for _ in 0..3 {
            d.t.backend_ready();
        }
        let got = received(&d);
        let (req, _) = &got[0];
        assert_eq!(
            (req.op, req.dst_port, req.dst_cid, req.src_cid),
            (1, 5000, CID, 2)
        );
        let host_port = req.src_port;
        // The guest accepts; the host is told OK and the early bytes reach the guest.
        send(
            &mut d,
            Header {
                op: 2,
                ..guest(2, 5000, host_port, 0)
            },
            &[],
        );
        let mut line = String::new();
        BufReader::new(host.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, format!("OK {host_port}\n"));
        d.t.backend_ready();
        let got = received(&d);
        let (rw, data) = got.last().unwrap();
        // fwd_cnt counts only the guest's bytes, not the VMM's own OK line: the guest
        // computes its credit from it.
        assert_eq!(
            (rw.op, rw.len, rw.buf_alloc, rw.fwd_cnt),
            (5, 5, BUF_ALLOC, 0)
        );
        assert_eq!(data, b"early");
        // Guest → host.
        send(&mut d, guest(5, 5000, host_port, 5), b"hello");
        let mut b = [0u8; 5];
        host.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hello");
        // The host hangs up: the guest is told (SHUTDOWN both ways).
        drop(host);
        d.t.backend_ready();
        let (last, _) = received(&d).pop().unwrap();
        assert_eq!((last.op, last.flags), (4, 3));
        assert!(d.t.broken().is_none());
    }

    #[test]
    fn a_guest_connect_reaches_the_hosts_port_socket_or_is_reset() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(dir.path());
        rx_buffers(&mut d, 8);
        let listener = UnixListener::bind(dir.path().join("v.sock_6000")).unwrap();
        send(&mut d, guest(1, 1234, 6000, 0), &[]);
        let (mut conn, _) = listener.accept().unwrap();
        let (resp, _) = received(&d)[0].clone();
        assert_eq!((resp.op, resp.src_port, resp.dst_port), (2, 6000, 1234));
        send(&mut d, guest(5, 1234, 6000, 3), b"abc");
        let mut b = [0u8; 3];
        conn.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"abc");
        // Nobody listens on 6001: RST.
        send(&mut d, guest(1, 1235, 6001, 0), &[]);
        let (rst, _) = received(&d).pop().unwrap();
        assert_eq!((rst.op, rst.dst_port), (3, 1235));
        // A packet for a connection that does not exist: RST, not a broken device.
        send(&mut d, guest(5, 999, 6000, 1), b"x");
        assert_eq!(received(&d).pop().unwrap().0.op, 3);
        // A forged source CID is refused.
        send(
            &mut d,
            Header {
                src_cid: 99,
                ..guest(1, 1, 6000, 0)
            },
            &[],
        );
        assert_eq!(received(&d).pop().unwrap().0.op, 3);
        assert!(d.t.broken().is_none());
    }

    #[test]
    fn a_length_that_disagrees_with_the_chain_breaks_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = device(dir.path());
        send(&mut d, guest(5, 1, 2, 100), b"short");
        assert!(d.t.broken().is_some());
    }
}

mod restore {
    use super::*;
    use crate::virtio::vsock::Vsock;

    fn disk_file(img: &tempfile::NamedTempFile, read_only: bool) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(img.path())
            .unwrap()
    }

    #[test]
    fn a_restored_disk_goes_on_from_the_queue_positions_the_snapshot_kept() {
        let (mut d, img) = block(false, 8);
        assert_eq!(blk_request(&mut d, 0, 3, 512, true), 0);
        assert_eq!(blk_request(&mut d, 0, 4, 512, true), 0);
        d.w(0x64, 1); // the driver acknowledged the interrupt
        let saved = d.t.save();
        assert_eq!(saved.regs.status & S_DRIVER_OK, S_DRIVER_OK);
        assert_eq!(saved.queues[0].next_avail, 2);
        assert_eq!(saved.queues[0].next_used, 2);

        let dev = Block::new(disk_file(&img, false), false, "test-disk").unwrap();
        let mut r = d.restored(Box::new(dev), &saved).unwrap();
        assert_eq!(r.r(0x70), saved.regs.status, "no new bring-up");
        assert_eq!(r.t.interrupt().status(), 0, "nothing was pending");
        // The third request is served as the third, in the next used slot.
        assert_eq!(blk_request(&mut r, 0, 5, 512, true), 0);
        let mut got = [0u8; 512];
        r.mem.read_slice(&mut got, GuestAddress(0x9_0000)).unwrap();
        assert!(got.iter().all(|b| *b == 5));
        assert_eq!(r.used(0).len(), 3);
        assert_eq!(r.t.interrupt().status() & 1, 1);
        assert!(r.t.broken().is_none());
        assert_eq!(r.t.save().queues, {
            let mut q = saved.queues.clone();
            q[0].next_avail = 3;
            q[0].next_used = 3;
            q
        });
    }

    #[test]
    fn an_unacknowledged_interrupt_is_raised_again_after_a_restore() {
        let (mut d, img) = block(true, 8);
        assert_eq!(blk_request(&mut d, 0, 1, 512, true), 0);
        let saved = d.t.save();
        assert_eq!(saved.regs.interrupt_status, 1);
        let dev = Block::new(disk_file(&img, true), true, "test-disk").unwrap();
        let r = d.restored(Box::new(dev), &saved).unwrap();
        assert_eq!(r.t.interrupt().status(), 1);
    }

    #[test]
    fn a_restore_into_another_device_or_an_impossible_state_is_refused_with_the_reason() {
        let (mut d, img) = block(false, 8);
        assert_eq!(blk_request(&mut d, 0, 1, 512, true), 0);
        let saved = d.t.save();

        // A disk of another size or mode: the guest knows the old one.
        let other = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(other.path(), [0u8; 16 * 512]).unwrap();
        let dev = Block::new(disk_file(&other, false), false, "x").unwrap();
        let e = d.restored(Box::new(dev), &saved).err().unwrap();
        assert!(e.contains("8 sectors, this one 16"), "{e}");
        // A read-only one offers other features than the writable one the driver took.
        let dev = Block::new(disk_file(&img, true), true, "x").unwrap();
        let e = d.restored(Box::new(dev), &saved).err().unwrap();
        assert!(e.contains("features this device does not offer"), "{e}");

        // Another kind of device.
        let (a, _b) = UnixDatagram::pair().unwrap();
        let net = Net::new(
            File::from(OwnedFd::from(a)),
            [2, 0, 0, 0, 0, 1],
            EventFd::new(0).unwrap(),
        );
        let e = d.restored(Box::new(net), &saved).err().unwrap();
        assert!(e.contains("device 2 in the snapshot, 1 here"), "{e}");

        // Queues no driver could have set up, features never offered.
        let fresh = || Box::new(Block::new(disk_file(&img, false), false, "x").unwrap());
        let mut bad = saved.clone();
        bad.queues[0].max_size = 1024;
        let e = d.restored(fresh(), &bad).err().unwrap();
        assert!(
            e.contains("queue 0 is not one this device could have"),
            "{e}"
        );
        let mut bad = saved.clone();
        bad.queues[0].size = 3;
        let e = d.restored(fresh(), &bad).err().unwrap();
        assert!(e.contains("queue 0"), "{e}");
        let mut bad = saved.clone();
        bad.queues[0].used_ring = (MEM as u64) - 8;
        let e = d.restored(fresh(), &bad).err().unwrap();
        assert!(e.contains("outside guest memory"), "{e}");
        let mut bad = saved.clone();
        bad.regs.driver_features |= 1 << 40;
        let e = d.restored(fresh(), &bad).err().unwrap();
        assert!(e.contains("does not offer"), "{e}");
        let mut bad = saved.clone();
        bad.device.push(0);
        let e = d.restored(fresh(), &bad).err().unwrap();
        assert!(e.contains("wrong size"), "{e}");
    }

    #[test]
    fn a_restored_interface_keeps_its_mac_and_its_rings() {
        let (mut d, peer) = net();
        d.push(0, &[(0x8_0000, 2048, true)]);
        d.w(0x50, 0);
        let saved = d.t.save();
        assert_eq!(saved.device, [2, 0, 0, 0, 0, 1]);

        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let other_mac = Net::new(
            File::from(OwnedFd::from(a.try_clone().unwrap())),
            [2, 0, 0, 0, 0, 9],
            EventFd::new(0).unwrap(),
        );
        let e = d.restored(Box::new(other_mac), &saved).err().unwrap();
        assert!(e.contains("another MAC"), "{e}");

        // The same MAC on a new tap: the receive buffer given before the snapshot takes the
        // first frame that arrives after it.
        let dev = Net::new(
            File::from(OwnedFd::from(a)),
            [2, 0, 0, 0, 0, 1],
            EventFd::new(0).unwrap(),
        );
        let mut r = d.restored(Box::new(dev), &saved).unwrap();
        drop(peer);
        b.send(&[0x77u8; 64]).unwrap();
        r.t.backend_ready();
        let used = r.used(0);
        assert_eq!(used, vec![(0, (HDR_LEN + 64) as u32)]);
        let mut got = [0u8; 64];
        r.mem
            .read_slice(&mut got, GuestAddress(0x8_0000 + HDR_LEN as u64))
            .unwrap();
        assert_eq!(got, [0x77u8; 64]);
    }

    fn vsock_device(dir: &std::path::Path, cid: u64) -> Box<Vsock> {
        Box::new(Vsock::new(cid, dir.join("v.sock"), EventFd::new(0).unwrap()).unwrap())
    }

    #[test]
    fn a_restored_vsock_tells_the_guest_its_connections_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Driver::new(vsock_device(dir.path(), 7));
        assert_eq!(d.bring_up(3) & S_DRIVER_OK, S_DRIVER_OK);
        // The guest keeps an event buffer posted, as Linux's driver does.
        d.mem
            .write_obj(0xffff_ffffu32, GuestAddress(0x5_0000))
            .unwrap();
        d.push(2, &[(0x5_0000, 8, true)]);
        d.w(0x50, 2);
        assert!(d.used(2).is_empty(), "no event before a restore");
        let saved = d.t.save();
        assert_eq!(saved.device, 7u64.to_le_bytes());

        let other = tempfile::tempdir().unwrap();
        let e = d
            .restored(vsock_device(other.path(), 8), &saved)
            .err()
            .unwrap();
        assert!(e.contains("context id 7, this one 8"), "{e}");

        let r = d.restored(vsock_device(other.path(), 7), &saved).unwrap();
        assert_eq!(r.used(2), vec![(0, 4)]);
        let id: u32 = r.mem.read_obj(GuestAddress(0x5_0000)).unwrap();
        assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
        assert_eq!(r.t.interrupt().status() & 1, 1);
    }

    #[test]
    fn a_vsock_restored_before_its_event_buffer_sends_the_reset_when_it_comes() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = Driver::new(vsock_device(dir.path(), 7));
        assert_eq!(d.bring_up(3) & S_DRIVER_OK, S_DRIVER_OK);
        let saved = d.t.save();
        let other = tempfile::tempdir().unwrap();
        let mut r = d.restored(vsock_device(other.path(), 7), &saved).unwrap();
        assert!(r.used(2).is_empty());
        r.push(2, &[(0x5_0000, 8, true)]);
        r.w(0x50, 2);
        assert_eq!(r.used(2), vec![(0, 4)]);
        // Once only.
        r.push(2, &[(0x5_1000, 8, true)]);
        r.w(0x50, 2);
        assert_eq!(r.used(2).len(), 1);
    }

    #[test]
    fn a_device_the_driver_never_started_is_restored_unstarted() {
        let dir = tempfile::tempdir().unwrap();
        let d = Driver::new(vsock_device(dir.path(), 7));
        let saved = d.t.save();
        let other = tempfile::tempdir().unwrap();
        let mut r = d.restored(vsock_device(other.path(), 7), &saved).unwrap();
        assert_eq!(r.r(0x70), 0);
        assert_eq!(r.bring_up(3) & S_DRIVER_OK, S_DRIVER_OK);
        assert!(
            r.used(2).is_empty(),
            "no reset for a driver that had no connections"
        );
    }
}
