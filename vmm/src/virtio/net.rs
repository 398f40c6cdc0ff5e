//! virtio-net on a tap device. Frames cross as they are (the tap has no vnet header): the
//! device adds a zeroed `virtio_net_hdr_v1` on receive and strips the driver's on transmit,
//! and offers no offloads, so the guest never hands the tap a frame it cannot take.
//!
//! Receive is driven by the VMM's I/O thread ([`Net::backend_ready`]) when the tap is
//! readable; a frame that finds no receive buffer waits in the device (and the tap is not
//! read again) until the driver adds buffers.

use super::{gather, scatter, DeviceError, VirtioDevice};
use crate::memory::Memory;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// `virtio_net_hdr_v1`: what VERSION_1 drivers put before every frame.
pub const HDR_LEN: usize = 12;
/// The largest frame that crosses: a 64 KiB frame plus its header (no device offers more).
const MAX_FRAME: usize = 65536;
const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];

pub struct Net {
    tap: File,
    mac: [u8; 6],
    /// A frame read from the tap that found no receive buffer yet (length in `pending_len`).
    pending: Vec<u8>,
    pending_len: usize,
    /// True while receive waits for buffers: the I/O thread stops polling the tap.
    rx_waiting: bool,
    /// Wakes the I/O thread when the driver adds receive buffers.
    rx_wake: EventFd,
    tx_buf: Vec<u8>,
}

impl Net {
    /// `tap` must be a non-blocking tap (IFF_TAP | IFF_NO_PI) file.
    pub fn new(tap: File, mac: [u8; 6], rx_wake: EventFd) -> Net {
        Net {
            tap,
            mac,
            pending: vec![0; MAX_FRAME],
            pending_len: 0,
            rx_waiting: false,
            rx_wake,
            tx_buf: Vec::with_capacity(MAX_FRAME + HDR_LEN),
        }
    }

    fn receive(&mut self, mem: &Memory, q: &mut Queue) -> Result<bool, DeviceError> {
        let mut used = false;
        loop {
            if self.pending_len == 0 {
                match self.tap.read(&mut self.pending) {
                    Ok(0) => return Ok(used),
                    Ok(n) => self.pending_len = n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        self.rx_waiting = false;
                        return Ok(used);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(DeviceError::Backend(format!("tap read: {e}"))),
                }
            }
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                self.rx_waiting = true;
                return Ok(used);
            };
            let head = chain.head_index();
            let mut hdr = [0u8; HDR_LEN];
            hdr[10] = 1; // num_buffers
            let frame = &self.pending[..self.pending_len];
            let total = HDR_LEN + frame.len();
            let written = scatter(mem, chain, &[&hdr, frame])?;
            if written < total {
                // The guest's buffer is too small for this frame: drop the frame, keep the
                // buffer for the next one.
                q.go_to_previous_position();
                self.pending_len = 0;
                continue;
            }
            q.add_used(mem, head, total as u32)
                .map_err(|e| DeviceError::Queue(RX, format!("used ring: {e}")))?;
            self.pending_len = 0;
            used = true;
        }
    }

    fn transmit(&mut self, mem: &Memory, q: &mut Queue) -> Result<bool, DeviceError> {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            gather(mem, chain, MAX_FRAME + HDR_LEN, &mut self.tx_buf)?;
            let len = self.tx_buf.len();
            if len < HDR_LEN {
                return Err(DeviceError::Chain {
                    head,
                    why: format!("{len} bytes is shorter than the virtio-net header"),
                });
            }
            // A full or downed tap drops the frame, like a congested wire.
            let _ = self.tap.write(&self.tx_buf[HDR_LEN..len]);
            q.add_used(mem, head, 0)
                .map_err(|e| DeviceError::Queue(TX, format!("used ring: {e}")))?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_bytes(&self.mac, offset, data);
    }

    fn queue_notify(
        &mut self,
        mem: &Memory,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, DeviceError> {
        match index {
            RX => {
                let used = self.receive(mem, &mut queues[RX])?;
                // The I/O thread may be waiting for buffers rather than for the tap.
                let _ = self.rx_wake.write(1);
                Ok(used)
            }
            TX => self.transmit(mem, &mut queues[TX]),
            _ => Ok(false),
        }
    }

    fn backend_ready(&mut self, mem: &Memory, queues: &mut [Queue]) -> Result<bool, DeviceError> {
        self.receive(mem, &mut queues[RX])
    }

    fn backend_fds(&self) -> Vec<(std::os::fd::RawFd, i16)> {
        use std::os::fd::AsRawFd;
        if self.rx_waiting {
            Vec::new()
        } else {
            vec![(self.tap.as_raw_fd(), libc::POLLIN)]
        }
    }

    fn reset(&mut self) {
        self.pending_len = 0;
        self.rx_waiting = false;
    }

    fn saved(&self) -> Vec<u8> {
        self.mac.to_vec()
    }

    /// The guest read its MAC when its driver probed: the restored interface must have it.
    /// A frame the old process held for a receive buffer is lost, like one on a busy wire.
    fn resume(
        &mut self,
        saved: &[u8],
        _mem: &Memory,
        _queues: &mut [Queue],
        _live: bool,
    ) -> Result<bool, String> {
        if saved != self.mac {
            return Err("the snapshot's interface has another MAC than this one".into());
        }
        self.reset();
        Ok(false)
    }
}

/// Copies `src[offset..]` into `data`, zeros past its end.
pub(crate) fn read_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| src.get(at))
            .copied()
            .unwrap_or(0);
    }
}
