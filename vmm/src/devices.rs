//! Port-I/O devices of the microVM.
//!
//! | ports        | device                                                     |
//! |--------------|------------------------------------------------------------|
//! | 0x3f8-0x3ff  | 8250 UART (vm-superio), IRQ 4, output to the service log   |
//! | 0x60, 0x64   | i8042: only the reset line (0xfe to 0x64) — the guest ends its VM |
//! | 0xf4         | debug exit: a byte written ends the VM with that status (test guests) |
//! | anything else| reads all-ones (nothing there), writes ignored             |

use std::io::Write;
use std::time::Instant;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

pub const COM1: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
pub const I8042_RESET: u8 = 0xfe;
pub const DEBUG_EXIT: u16 = 0xf4;

/// What a port access asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    Continue,
    /// The guest pulsed the reset line (Linux's `reboot`, and its power-off without ACPI).
    Reset,
    /// The guest wrote its status to the debug-exit port.
    DebugExit(u8),
}

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl vm_superio::Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// A guest's console output: bounded to `rate` bytes per second (with a burst of `burst`),
/// so that a guest printing in a loop cannot fill the gateway's flash. What is dropped is
/// counted and reported in the log.
pub struct RateLimitedLog<W: Write> {
    out: W,
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    dropped: u64,
}

impl<W: Write> RateLimitedLog<W> {
    pub fn new(out: W, rate_bytes_per_s: u64, burst_bytes: u64) -> Self {
        RateLimitedLog {
            out,
            rate: rate_bytes_per_s as f64,
            burst: burst_bytes as f64,
            tokens: burst_bytes as f64,
            last: Instant::now(),
            dropped: 0,
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write> Write for RateLimitedLog<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        let allowed = (self.tokens as usize).min(buf.len());
        if allowed < buf.len() {
            if self.dropped == 0 || allowed > 0 {
                let _ = self
                    .out
                    .write_all(b"\n[gatevisor: console output rate-limited]\n");
            }
            self.dropped += (buf.len() - allowed) as u64;
        }
        if allowed > 0 {
            self.out.write_all(&buf[..allowed])?;
            self.tokens -= allowed as f64;
        }
        // The guest's bytes are consumed either way: a slow log never stalls the vCPU.
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The legacy I/O port space of the VM.
pub struct PortBus<W: Write> {
    pub serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write> PortBus<W> {
    pub fn new(serial_irq: EventFd, console: W) -> Self {
        PortBus {
            serial: Serial::new(IrqTrigger(serial_irq), console),
        }
    }

    /// A guest `in`: fills `data` (1, 2 or 4 bytes, as the guest asked).
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                if let Some(b) = data.first_mut() {
                    *b = self.serial.read((p - COM1) as u8);
                }
            }
            // i8042 status: no data, input buffer empty (so the kernel's reset write proceeds).
            I8042_COMMAND | I8042_DATA => data.fill(0),
            _ => {}
        }
    }

    /// A guest `out` of `data`.
    pub fn write(&mut self, port: u16, data: &[u8]) -> PortAction {
        let Some(&byte) = data.first() else {
            return PortAction::Continue;
        };
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                // A full or failing log is the host's problem, not a reason to stop the guest.
                let _ = self.serial.write((p - COM1) as u8, byte);
                PortAction::Continue
            }
            I8042_COMMAND if byte == I8042_RESET => PortAction::Reset,
            DEBUG_EXIT => PortAction::DebugExit(byte),
            _ => PortAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_drops_beyond_the_burst_and_says_so() {
        let mut log = RateLimitedLog::new(Vec::new(), 10, 100);
        assert_eq!(log.write(&[b'x'; 150]).unwrap(), 150);
        let out = log.into_inner();
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("rate-limited"), "{text}");
        assert_eq!(out.iter().filter(|b| **b == b'x').count(), 100);
    }

    #[test]
    fn serial_output_reaches_the_log_and_reset_is_recognised() {
        let mut bus = PortBus::new(EventFd::new(0).unwrap(), Vec::new());
        for b in b"hi" {
            assert_eq!(bus.write(COM1, &[*b]), PortAction::Continue);
        }
        assert_eq!(bus.serial.writer().as_slice(), b"hi");
        assert_eq!(bus.write(I8042_COMMAND, &[I8042_RESET]), PortAction::Reset);
        assert_eq!(bus.write(DEBUG_EXIT, &[7]), PortAction::DebugExit(7));
        let mut d = [0u8; 4];
        bus.read(0x2f8, &mut d);
        assert_eq!(d, [0xff; 4], "no device: all ones");
        // Empty and oversized accesses from a hostile guest are harmless.
        assert_eq!(bus.write(COM1, &[]), PortAction::Continue);
        bus.read(COM1, &mut []);
    }
}
