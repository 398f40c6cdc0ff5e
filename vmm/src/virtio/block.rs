//! virtio-blk on a raw image file: read, write (unless read-only), flush and the device id.
//! Requests are served on the vCPU thread when the driver notifies the queue.
//!
//! A request is a chain: a 16-byte readable header (type, reserved, sector), the data
//! buffers, and a writable status byte last. Sectors beyond the image, writes to a read-only
//! disk and unknown types are answered with a status (IOERR, UNSUPP) — the driver's mistake,
//! not a broken device; a chain that breaks the framing breaks the device.

use super::net::read_bytes;
use super::{DeviceError, VirtioDevice};
use crate::memory::Memory;
use std::fs::File;
use std::os::unix::fs::FileExt;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes};

pub const SECTOR: u64 = 512;
const HEADER_LEN: u32 = 16;
/// Longest chain accepted (header + data + status); Linux uses at most seg_max + 2.
const MAX_DESCRIPTORS: usize = 256;
/// Data moved per system call, whatever the descriptor's length.
const CHUNK: usize = 64 * 1024;
const ID_LEN: usize = 20;
const QUEUE_SIZES: [u16; 1] = [256];

pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    /// The device id the guest reads (`/sys/block/vda/serial`).
    id: [u8; ID_LEN],
    chunk: Vec<u8>,
}

impl Block {
    pub fn new(file: File, read_only: bool, id: &str) -> std::io::Result<Block> {
        let len = file.metadata()?.len();
        let mut idb = [0u8; ID_LEN];
        for (d, s) in idb.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        Ok(Block {
            file,
            read_only,
            capacity_sectors: len / SECTOR,
            id: idb,
            chunk: vec![0; CHUNK],
        })
    }

    /// Serves one request; returns the bytes written into the chain (data and status).
    fn request(
        &mut self,
        mem: &Memory,
        head: u16,
        descs: &[Descriptor],
    ) -> Result<u32, DeviceError> {
        let bad = |why: &str| DeviceError::Chain {
            head,
            why: why.to_string(),
        };
        let (first, rest) = descs.split_first().ok_or_else(|| bad("empty chain"))?;
        let (status, data) = rest
            .split_last()
            .ok_or_else(|| bad("no status descriptor"))?;
        if first.is_write_only() || first.len() < HEADER_LEN {
            return Err(bad("the header must be 16 readable bytes"));
        }
        if !status.is_write_only() || status.len() < 1 {
            return Err(bad("the status must be a writable byte"));
        }
        let mut hdr = [0u8; HEADER_LEN as usize];
        mem.read_slice(&mut hdr, first.addr())
            .map_err(|e| bad(&format!("header: {e}")))?;
        let kind = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap());

        let mut written = 0u32;
        let code = match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let out = kind == VIRTIO_BLK_T_OUT;
                if data.iter().any(|d| d.is_write_only() == out) {
                    return Err(bad("data buffers of the wrong direction"));
                }
                let bytes: u64 = data.iter().map(|d| d.len() as u64).sum();
                let end = sector
                    .checked_mul(SECTOR)
                    .and_then(|start| start.checked_add(bytes));
                let past_end = end.is_none_or(|e| e > self.capacity_sectors * SECTOR);
                if (out && self.read_only) || past_end {
                    VIRTIO_BLK_S_IOERR
                } else {
                    let mut pos = sector * SECTOR;
                    let mut result = VIRTIO_BLK_S_OK;
                    for d in data {
                        match self.transfer(mem, d, pos, out) {
                            Ok(()) => {}
                            Err(Transfer::Guest(e)) => return Err(bad(&e)),
                            Err(Transfer::Host(e)) => {
                                eprintln!("gatevisor vmm: disk I/O at {pos}: {e}");
                                result = VIRTIO_BLK_S_IOERR;
                                break;
                            }
                        }
                        pos += d.len() as u64;
                        if !out {
                            written = written.saturating_add(d.len());
                        }
                    }
                    result
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => VIRTIO_BLK_S_OK,
                Err(_) => VIRTIO_BLK_S_IOERR,
            },
            VIRTIO_BLK_T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = (d.len() as usize).min(ID_LEN);
                    mem.write_slice(&self.id[..n], d.addr())
                        .map_err(|e| bad(&format!("id buffer: {e}")))?;
                    written = n as u32;
                    VIRTIO_BLK_S_OK
                }
                _ => return Err(bad("GET_ID needs a writable buffer")),
            },
            _ => VIRTIO_BLK_S_UNSUPP,
        };
        mem.write_obj(code as u8, status.addr())
            .map_err(|e| bad(&format!("status: {e}")))?;
        Ok(written + 1)
    }

    fn transfer(
        &mut self,
        mem: &Memory,
        d: &Descriptor,
        pos: u64,
        out: bool,
    ) -> Result<(), Transfer> {
        let mut done = 0u64;
        let len = d.len() as u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let at = d
                .addr()
                .checked_add(done)
                .ok_or_else(|| Transfer::Guest("buffer wraps around".into()))?;
            let buf = &mut self.chunk[..n];
            if out {
                mem.read_slice(buf, at)
                    .map_err(|e| Transfer::Guest(format!("data buffer: {e}")))?;
                self.file
                    .write_all_at(buf, pos + done)
                    .map_err(|e| Transfer::Host(e.to_string()))?;
            } else {
                self.file
                    .read_exact_at(buf, pos + done)
                    .map_err(|e| Transfer::Host(e.to_string()))?;
                mem.write_slice(buf, at)
                    .map_err(|e| Transfer::Guest(format!("data buffer: {e}")))?;
            }
            done += n as u64;
        }
        Ok(())
    }
}

enum Transfer {
    Guest(String),
    Host(String),
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        if self.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            1 << VIRTIO_BLK_F_FLUSH
        }
    }

    /// The guest sized its disk and knows whether it may write it.
    /// The capacity; read-only or not is in the features, which the transport checks.
    fn saved(&self) -> Vec<u8> {
        self.capacity_sectors.to_le_bytes().to_vec()
    }

    fn resume(
        &mut self,
        saved: &[u8],
        _mem: &Memory,
        _queues: &mut [Queue],
        _live: bool,
    ) -> Result<bool, String> {
        let Ok(was) = <[u8; 8]>::try_from(saved).map(u64::from_le_bytes) else {
            return Err("the snapshot's disk state has the wrong size".into());
        };
        if was != self.capacity_sectors {
            return Err(format!(
                "the snapshot's disk had {was} sectors, this one {}",
                self.capacity_sectors
            ));
        }
        // Requests are served on the vCPU thread as they come: none was in flight.
        Ok(false)
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_bytes(&self.capacity_sectors.to_le_bytes(), offset, data);
    }

    fn queue_notify(
        &mut self,
        mem: &Memory,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, DeviceError> {
        let Some(q) = queues.get_mut(index) else {
            return Ok(false);
        };
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(MAX_DESCRIPTORS + 1).collect();
            if descs.len() > MAX_DESCRIPTORS {
                return Err(DeviceError::Chain {
                    head,
                    why: format!("more than {MAX_DESCRIPTORS} descriptors"),
                });
            }
            let len = self.request(mem, head, &descs)?;
            q.add_used(mem, head, len)
                .map_err(|e| DeviceError::Queue(index, format!("used ring: {e}")))?;
            used = true;
        }
        Ok(used)
    }
}
