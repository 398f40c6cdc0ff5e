//! Virtio devices over the virtio-mmio transport (version 2), with split queues from the
//! rust-vmm `virtio-queue` crate.
//!
//! - [`mmio`]: the transport: the register window a driver programs, feature negotiation, the
//!   device status state machine, queue set-up and the interrupt;
//! - [`net`]: virtio-net on a tap device (the tap flowbridge plugs into the gateway's bridge);
//! - [`block`]: virtio-blk on a raw image file, read-only or read-write.
//!
//! Everything a driver writes (register values, ring addresses, descriptor addresses and
//! lengths, request headers) is hostile: it is checked against guest memory and the device's
//! limits, and a driver that breaks the rules gets its device marked `DEVICE_NEEDS_RESET`;
//! the VMM and the host carry on.

pub mod block;
pub mod mmio;
pub mod net;
#[cfg(test)]
mod tests;
pub mod vsock;

use crate::memory::Memory;
use virtio_queue::Queue;
use vm_memory::Bytes;

/// Why a device stopped serving its driver until the driver resets it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceError {
    #[error("descriptor chain {head}: {why}")]
    Chain { head: u16, why: String },
    #[error("queue {0} is not usable: {1}")]
    Queue(usize, String),
    #[error("backend: {0}")]
    Backend(String),
}

/// One virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 net, 2 block, ...).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// The largest size of each queue; their count is the device's queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space at `offset` (out of range reads see zeros).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver set DRIVER_OK with these features: the device may use its queues.
    fn activate(&mut self, _acked_features: u64) -> Result<(), DeviceError> {
        Ok(())
    }
    /// The driver notified queue `index`. Returns whether used buffers were returned (the
    /// transport then interrupts the driver).
    fn queue_notify(
        &mut self,
        mem: &Memory,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, DeviceError>;
    /// The backend has work (a frame arrived on the tap). Returns as [`Self::queue_notify`].
    fn backend_ready(&mut self, _mem: &Memory, _queues: &mut [Queue]) -> Result<bool, DeviceError> {
        Ok(false)
    }
    /// The descriptors the I/O thread should poll for this device now, with poll events
    /// (none while receive waits for buffers, for instance).
    fn backend_fds(&self) -> Vec<(std::os::fd::RawFd, i16)> {
        Vec::new()
    }
    /// The driver reset the device: forget negotiated state (the backend stays open).
    fn reset(&mut self) {}
    /// What a snapshot keeps of the device beyond its transport and queues: what the guest
    /// learned from it and must find again (its MAC, capacity, context id).
    fn saved(&self) -> Vec<u8> {
        Vec::new()
    }
    /// The machine was restored from a snapshot whose device state was `saved`: refuse a
    /// device the guest would not recognise (the reason), else go on. `live` says whether
    /// the driver had set DRIVER_OK. Returns whether used buffers were returned.
    fn resume(
        &mut self,
        saved: &[u8],
        _mem: &Memory,
        _queues: &mut [Queue],
        _live: bool,
    ) -> Result<bool, String> {
        if saved.is_empty() {
            Ok(false)
        } else {
            Err("the snapshot has state for it that this device does not know".into())
        }
    }
}

/// The chains the devices pop from their queues.
pub(crate) type Chain<'a> = virtio_queue::DescriptorChain<&'a Memory>;

/// Gathers what the driver gave the device, the chain's readable descriptors in order, into
/// `out` (cleared first): at most `limit` bytes. A device-writable descriptor, more than
/// `limit` bytes or an address outside guest memory breaks the chain.
pub(crate) fn gather(
    mem: &Memory,
    chain: Chain<'_>,
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<(), DeviceError> {
    let head = chain.head_index();
    let bad = |why: String| DeviceError::Chain { head, why };
    out.clear();
    for desc in chain {
        if desc.is_write_only() {
            return Err(bad(
                "a transmit buffer the driver marked device-writable".into()
            ));
        }
        let start = out.len();
        let end = start
            .checked_add(desc.len() as usize)
            .filter(|n| *n <= limit)
            .ok_or_else(|| bad(format!("more than {limit} bytes")))?;
        out.resize(end, 0);
        mem.read_slice(&mut out[start..], desc.addr())
            .map_err(|e| bad(format!("transmit buffer: {e}")))?;
    }
    Ok(())
}

/// Writes `parts`, one after the other, into the chain's device-writable descriptors in
/// order; returns how many bytes fit (less than all of them when the buffers are too small).
/// A descriptor the device may not write, or outside guest memory, breaks the chain.
pub(crate) fn scatter(
    mem: &Memory,
    chain: Chain<'_>,
    parts: &[&[u8]],
) -> Result<usize, DeviceError> {
    let head = chain.head_index();
    let bad = |why: String| DeviceError::Chain { head, why };
    let mut bytes = parts.iter().flat_map(|p| p.iter()).copied();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut written = 0usize;
    let mut piece = Vec::new();
    for desc in chain {
        if !desc.is_write_only() {
            return Err(bad("a receive buffer the device may not write".into()));
        }
        if written == total {
            break;
        }
        let take = (desc.len() as usize).min(total - written);
        piece.clear();
        piece.extend(bytes.by_ref().take(take));
        mem.write_slice(&piece, desc.addr())
            .map_err(|e| bad(format!("receive buffer: {e}")))?;
        written += take;
    }
    Ok(written)
}
