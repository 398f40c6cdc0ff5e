//! The virtio-mmio transport, version 2 ("modern"): one 4 KiB register window per device and
//! one interrupt line (an irqfd on its GSI).
//!
//! The driver's side of the protocol is a state machine on the status register
//! (ACKNOWLEDGE → DRIVER → FEATURES_OK → DRIVER_OK, or FAILED, or reset by writing 0). Queue
//! registers are only writable before DRIVER_OK, features only before FEATURES_OK; writes out
//! of order are ignored, as the specification lets a device do.

use super::{DeviceError, VirtioDevice};
use crate::memory::Memory;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Size of one device's register window.
pub const WINDOW: u64 = 0x1000;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "GVSR": whose device this is.
const VENDOR: u32 = 0x5253_5647;
const CONFIG_START: u64 = 0x100;

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The device's interrupt line: the status bits the driver reads and acknowledges, and the
/// eventfd KVM turns into an edge on the device's GSI.
#[derive(Clone)]
pub struct Interrupt {
    status: Arc<AtomicU32>,
    event: Arc<EventFd>,
}

impl Interrupt {
    pub fn new(event: EventFd) -> Interrupt {
        Interrupt {
            status: Arc::new(AtomicU32::new(0)),
            event: Arc::new(event),
        }
    }

    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // A full eventfd counter still delivers the pending edge.
        let _ = self.event.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// The transport's registers as a snapshot keeps them (what the driver programmed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable)]
#[repr(C)]
pub struct TransportRegs {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    /// 1 when the device was out of service (it stays so until the driver resets it).
    pub broken: u32,
}

/// One queue as a snapshot keeps it: where its rings are and how far both sides got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable)]
#[repr(C)]
pub struct QueueRegs {
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub max_size: u16,
    pub size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub ready: u8,
    pub event_idx: u8,
    _pad: [u8; 6],
}

/// A device's whole state in a snapshot: its transport, its queues, its own bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedDevice {
    pub regs: TransportRegs,
    pub queues: Vec<QueueRegs>,
    pub device: Vec<u8>,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Memory,
    queues: Vec<Queue>,
    interrupt: Interrupt,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// Why the device stopped serving, until the driver resets it.
    broken: Option<DeviceError>,
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: Memory, interrupt: Interrupt) -> MmioTransport {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|max| Queue::new(*max).expect("queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            queues,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            broken: None,
        }
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// Why the device is out of service, if it is.
    pub fn broken(&self) -> Option<&DeviceError> {
        self.broken.as_ref()
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn active(&self) -> bool {
        self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.broken.is_none()
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            // Registers are 32-bit; anything else reads as nothing.
            data.fill(0);
            return;
        }
        let features = self.offered_features();
        let q = self.queues.get(self.queue_sel as usize);
        let v: u32 = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x34 => q.map(|q| q.max_size() as u32).unwrap_or(0),
            0x44 => q.map(|q| q.ready() as u32).unwrap_or(0),
            0x60 => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            // No device here has writable configuration.
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        let before_features_ok = self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
            && self.status & VIRTIO_CONFIG_S_DRIVER != 0;
        let setting_up = self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 if before_features_ok => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                1 => {
                    self.driver_features = (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if setting_up => {
                if let Some(q) = self.selected() {
                    q.set_size(v.min(u16::MAX as u32) as u16);
                }
            }
            0x44 if setting_up => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => self.notify(v as usize),
            0x64 => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if setting_up => {
                let (low, high) = if offset.is_multiple_of(8) {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected() {
                    match offset & !0xf {
                        0x80 => q.set_desc_table_address(low, high),
                        0x90 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added, in order; the driver may always give up (FAILED).
        let adding = v & !self.status;
        if v & self.status != self.status {
            return;
        }
        let ok = match adding {
            VIRTIO_CONFIG_S_ACKNOWLEDGE => self.status == 0,
            VIRTIO_CONFIG_S_DRIVER => self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE,
            VIRTIO_CONFIG_S_FEATURES_OK => {
                self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
                    // Only features offered, and version 1 is a must for this transport.
                    && self.driver_features & !self.offered_features() == 0
                    && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0
            }
            VIRTIO_CONFIG_S_DRIVER_OK => {
                self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0 && self.activate()
            }
            VIRTIO_CONFIG_S_FAILED => true,
            _ => false,
        };
        if ok {
            self.status = v;
        }
    }

    /// Checks every ready queue against guest memory and starts the device.
    fn activate(&mut self) -> bool {
        for (i, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                self.fail(DeviceError::Queue(
                    i,
                    "rings outside guest memory, misaligned or of a bad size".into(),
                ));
                return false;
            }
        }
        match self.device.activate(self.driver_features) {
            Ok(()) => true,
            Err(e) => {
                self.fail(e);
                false
            }
        }
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
        self.broken = None;
    }

    /// The device cannot go on: tell the driver (NEEDS_RESET and a configuration interrupt)
    /// and serve nothing until it resets the device.
    fn fail(&mut self, e: DeviceError) {
        eprintln!(
            "gatevisor vmm: virtio device {} needs a reset: {e}",
            self.device.device_type()
        );
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.broken = Some(e);
        self.interrupt.raise(INT_CONFIG);
    }

    /// The device's state for a snapshot. The caller holds the transport (no I/O runs) and
    /// the vCPUs are paused, so nothing moves the queues while guest memory is saved.
    pub fn save(&self) -> SavedDevice {
        SavedDevice {
            regs: TransportRegs {
                device_type: self.device.device_type(),
                status: self.status,
                driver_features: self.driver_features,
                device_features_sel: self.device_features_sel,
                driver_features_sel: self.driver_features_sel,
                queue_sel: self.queue_sel,
                config_generation: self.config_generation,
                interrupt_status: self.interrupt.status(),
                broken: self.broken.is_some() as u32,
            },
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueRegs {
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        max_size: s.max_size,
                        size: s.size,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        ready: s.ready as u8,
                        event_idx: s.event_idx_enabled as u8,
                        _pad: [0; 6],
                    }
                })
                .collect(),
            device: self.device.saved(),
        }
    }

    /// Puts a saved state into this fresh transport (of a restored machine, whose guest
    /// memory is already the snapshot's). Everything is checked as a driver's writes are:
    /// a state this device could not have been in is refused with the reason.
    pub fn restore(&mut self, saved: &SavedDevice) -> Result<(), String> {
        let r = &saved.regs;
        if r.device_type != self.device.device_type() {
            return Err(format!(
                "device {} in the snapshot, {} here",
                r.device_type,
                self.device.device_type()
            ));
        }
        if saved.queues.len() != self.queues.len() {
            return Err(format!(
                "{} queues in the snapshot, {} here",
                saved.queues.len(),
                self.queues.len()
            ));
        }
        if r.driver_features & !self.offered_features() != 0 {
            return Err("the driver had features this device does not offer".into());
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (i, (q, max)) in saved
            .queues
            .iter()
            .zip(self.device.queue_max_sizes())
            .enumerate()
        {
            if q.max_size != *max || q.ready > 1 || q.event_idx > 1 {
                return Err(format!("queue {i} is not one this device could have"));
            }
            let queue = Queue::try_from(QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx == 1,
                size: q.size,
                ready: q.ready == 1,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            })
            .map_err(|e| format!("queue {i}: {e}"))?;
            queues.push(queue);
        }
        self.queues = queues;
        self.status = r.status;
        self.driver_features = r.driver_features;
        self.device_features_sel = r.device_features_sel;
        self.driver_features_sel = r.driver_features_sel;
        self.queue_sel = r.queue_sel;
        self.config_generation = r.config_generation;
        self.broken = (r.broken != 0).then(|| {
            DeviceError::Backend("it was out of service when the snapshot was taken".into())
        });
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            for (i, q) in self.queues.iter().enumerate() {
                if q.ready() && !q.is_valid(&self.mem) {
                    return Err(format!("queue {i}'s rings are outside guest memory"));
                }
            }
        }
        let live = self.active();
        let used = self
            .device
            .resume(&saved.device, &self.mem, &mut self.queues, live)?;
        // An interrupt the driver had not acknowledged yet is raised again: the restored
        // guest must not wait for an edge that was lost with the old process.
        if r.interrupt_status != 0 || used {
            self.interrupt
                .raise(r.interrupt_status | if used { INT_USED_RING } else { 0 });
        }
        Ok(())
    }

    /// The driver made buffers available in queue `index`.
    pub fn notify(&mut self, index: usize) {
        if !self.active() || index >= self.queues.len() || !self.queues[index].ready() {
            return;
        }
        match self.device.queue_notify(&self.mem, &mut self.queues, index) {
            Ok(true) => self.interrupt.raise(INT_USED_RING),
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }

    /// What the I/O thread should poll for the device's backend now: nothing unless the
    /// device is live, then what the device asks for.
    pub fn backend_fds(&self) -> Vec<(std::os::fd::RawFd, i16)> {
        if self.active() {
            self.device.backend_fds()
        } else {
            Vec::new()
        }
    }

    /// The device's backend has work for the driver.
    pub fn backend_ready(&mut self) {
        if !self.active() {
            return;
        }
        match self.device.backend_ready(&self.mem, &mut self.queues) {
            Ok(true) => self.interrupt.raise(INT_USED_RING),
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }
}
