//! Port-I/O devices of the microVM.
//!
//! | ports        | device                                                     |
//! |--------------|------------------------------------------------------------|
//! | 0x3f8-0x3ff  | 8250 UART (vm-superio), IRQ 4, output to the service log   |
//! | 0x60, 0x64   | i8042: enough of the controller for Linux's probe, and its reset line (0xfe to 0x64), by which the guest ends its VM |
//! | 0x70, 0x71   | CMOS RTC: the host's UTC time, never "update in progress"  |
//! | 0xf4         | debug exit: a byte written ends the VM with that status (test guests) |
//! | 0x3c0        | ACPI sleep control (hardware-reduced): S5 ends the VM as "power off" |
//! | anything else| reads all-ones (nothing there), writes ignored             |

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

pub const COM1: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA: u16 = 0x60;
pub const I8042_COMMAND: u16 = 0x64;
pub const I8042_RESET: u8 = 0xfe;
pub const DEBUG_EXIT: u16 = 0xf4;
pub const CMOS_INDEX: u16 = 0x70;
pub const CMOS_DATA: u16 = 0x71;

/// What a port access asks of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortAction {
    Continue,
    /// The guest pulsed the reset line (Linux's `reboot`, and its power-off without ACPI).
    Reset,
    /// The guest wrote its status to the debug-exit port.
    DebugExit(u8),
    /// The guest entered ACPI S5 through the sleep control register: power off.
    PowerOff,
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

/// Where the serial console goes: the service log (rate-limited), and a console client
/// when one is attached (`gatevisor service console`). A client that cannot keep up loses
/// output, never the guest's time; one that errors is dropped.
pub struct ConsoleTee<W: Write> {
    pub log: W,
    pub client: Arc<Mutex<Option<UnixStream>>>,
}

impl<W: Write> Write for ConsoleTee<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = client.as_mut() {
            match c.write(buf) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => *client = None,
            }
        }
        drop(client);
        self.log.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.log.flush()
    }
}

/// The i8042 keyboard controller, as much as Linux's probe needs: the command byte (CTR),
/// self-test, and the reset line. No keyboard is attached. Without it, the kernel waits
/// seconds for answers that never come.
#[derive(Debug, Default)]
pub struct I8042 {
    ctr: u8,
    out: Option<u8>,
    /// The next data-port write is the command byte.
    write_ctr: bool,
}

impl I8042 {
    const STATUS_OBF: u8 = 0x01;
    const STATUS_SYS: u8 = 0x04;

    fn status(&self) -> u8 {
        Self::STATUS_SYS
            | if self.out.is_some() {
                Self::STATUS_OBF
            } else {
                0
            }
    }

    fn command(&mut self, cmd: u8) -> PortAction {
        match cmd {
            0x20 => self.out = Some(self.ctr),
            0x60 => self.write_ctr = true,
            0xaa => self.out = Some(0x55), // controller self-test passed
            0xab | 0xa9 => self.out = Some(0x00), // port tests passed
            0xa7 => self.ctr |= 0x20,      // disable the aux port
            0xa8 => self.ctr &= !0x20,
            0xad => self.ctr |= 0x10, // disable the keyboard port
            0xae => self.ctr &= !0x10,
            I8042_RESET => return PortAction::Reset,
            _ => {}
        }
        PortAction::Continue
    }

    fn data_write(&mut self, v: u8) {
        if std::mem::take(&mut self.write_ctr) {
            self.ctr = v;
        }
    }

    fn data_read(&mut self) -> u8 {
        self.out.take().unwrap_or(0)
    }
}

/// The i8042's state in a snapshot.
#[derive(Debug, Clone, Copy, zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)]
#[repr(C)]
pub struct I8042State {
    ctr: u8,
    has_out: u8,
    out: u8,
    write_ctr: u8,
}

impl I8042 {
    pub fn state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            has_out: self.out.is_some() as u8,
            out: self.out.unwrap_or(0),
            write_ctr: self.write_ctr as u8,
        }
    }

    pub fn from_state(s: &I8042State) -> I8042 {
        I8042 {
            ctr: s.ctr,
            out: (s.has_out != 0).then_some(s.out),
            write_ctr: s.write_ctr != 0,
        }
    }
}

/// The CMOS's state in a snapshot: its index and storage (the clock is the host's).
#[derive(Debug, Clone, Copy, zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::Immutable)]
#[repr(C)]
pub struct CmosState {
    index: u8,
    regs: [u8; 128],
}

/// The CMOS real-time clock: reports the host's UTC time in BCD; other registers are plain
/// storage. Linux's rtc_cmos waits while "update in progress" is set, so it never is.
#[derive(Debug)]
pub struct Cmos {
    index: u8,
    regs: [u8; 128],
}

impl Default for Cmos {
    fn default() -> Self {
        let mut regs = [0u8; 128];
        regs[0x0a] = 0x26; // 32.768 kHz time base, 1024 Hz rate, UIP clear
        regs[0x0b] = 0x02; // 24-hour, BCD
        regs[0x0d] = 0x80; // valid RAM and time
        Cmos { index: 0, regs }
    }
}

impl Cmos {
    pub fn state(&self) -> CmosState {
        CmosState {
            index: self.index,
            regs: self.regs,
        }
    }

    pub fn from_state(s: &CmosState) -> Cmos {
        Cmos {
            index: s.index & 0x7f,
            regs: s.regs,
        }
    }

    fn bcd(v: i32) -> u8 {
        let v = v.clamp(0, 99) as u8;
        ((v / 10) << 4) | (v % 10)
    }

    fn read(&self) -> u8 {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        // UTC by arithmetic: libc's gmtime opens /etc/localtime on first use, which the VMM's
        // seccomp filter (rightly) does not allow.
        let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
        let (year, month, day) = civil_from_days(days);
        match self.index {
            0x00 => Self::bcd((rem % 60) as i32),
            0x02 => Self::bcd((rem / 60 % 60) as i32),
            0x04 => Self::bcd((rem / 3600) as i32),
            0x06 => Self::bcd(((days + 4).rem_euclid(7) + 1) as i32), // 1970-01-01 was a Thursday
            0x07 => Self::bcd(day as i32),
            0x08 => Self::bcd(month as i32),
            0x09 => Self::bcd((year % 100) as i32),
            0x32 => Self::bcd((year / 100) as i32),
            i => self.regs[i as usize & 0x7f],
        }
    }

    fn write(&mut self, v: u8) {
        match self.index {
            // The clock is the host's; status registers A, C and D are read-only here.
            0x00..=0x09 | 0x0a | 0x0c | 0x0d | 0x32 => {}
            i => self.regs[i as usize & 0x7f] = v,
        }
    }
}

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The legacy I/O port space of the VM.
pub struct PortBus<W: Write> {
    pub serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, W>,
    pub i8042: I8042,
    pub cmos: Cmos,
}

impl<W: Write> PortBus<W> {
    pub fn new(serial_irq: EventFd, console: W) -> Self {
        PortBus {
            serial: Serial::new(IrqTrigger(serial_irq), console),
            i8042: I8042::default(),
            cmos: Cmos::default(),
        }
    }

    /// A guest `in`: fills `data` (1, 2 or 4 bytes, as the guest asked).
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        if data.is_empty() {
            return;
        }
        match port {
            p if (COM1..COM1 + 8).contains(&p) => {
                if let Some(b) = data.first_mut() {
                    *b = self.serial.read((p - COM1) as u8);
                }
            }
            I8042_COMMAND => data[0] = self.i8042.status(),
            I8042_DATA => data[0] = self.i8042.data_read(),
            CMOS_DATA => data[0] = self.cmos.read(),
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
            I8042_COMMAND => self.i8042.command(byte),
            I8042_DATA => {
                self.i8042.data_write(byte);
                PortAction::Continue
            }
            CMOS_INDEX => {
                self.cmos.index = byte & 0x7f;
                PortAction::Continue
            }
            CMOS_DATA => {
                self.cmos.write(byte);
                PortAction::Continue
            }
            DEBUG_EXIT => PortAction::DebugExit(byte),
            crate::acpi::SLEEP_CONTROL_PORT if crate::acpi::is_s5_poweroff(byte) => {
                PortAction::PowerOff
            }
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
        bus.read(I8042_COMMAND, &mut []);
    }

    #[test]
    fn i8042_answers_the_linux_probe() {
        let mut bus = PortBus::new(EventFd::new(0).unwrap(), Vec::new());
        let mut b = [0u8];
        bus.write(I8042_COMMAND, &[0x60]);
        bus.write(I8042_DATA, &[0x45]);
        bus.write(I8042_COMMAND, &[0x20]);
        bus.read(I8042_COMMAND, &mut b);
        assert_eq!(b[0] & 1, 1, "output buffer full");
        bus.read(I8042_DATA, &mut b);
        assert_eq!(b[0], 0x45);
        bus.read(I8042_COMMAND, &mut b);
        assert_eq!(b[0] & 1, 0, "drained");
        bus.write(I8042_COMMAND, &[0xa7]);
        bus.write(I8042_COMMAND, &[0x20]);
        bus.read(I8042_DATA, &mut b);
        assert_eq!(b[0] & 0x20, 0x20, "aux port disabled");
    }

    #[test]
    fn civil_dates_from_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_781), (2026, 11, 24));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn cmos_clock_reads_bcd_time_and_is_never_updating() {
        let mut bus = PortBus::new(EventFd::new(0).unwrap(), Vec::new());
        let mut b = [0u8];
        bus.write(CMOS_INDEX, &[0x0a]);
        bus.read(CMOS_DATA, &mut b);
        assert_eq!(b[0] & 0x80, 0);
        bus.write(CMOS_INDEX, &[0x08]);
        bus.read(CMOS_DATA, &mut b);
        assert!((0x01..=0x12).contains(&b[0]), "month {:#x}", b[0]);
        bus.write(CMOS_INDEX, &[0x32]);
        bus.read(CMOS_DATA, &mut b);
        assert_eq!(b[0], 0x20, "century");
        // Writes to the clock do not change it; scratch registers keep what is written.
        bus.write(CMOS_INDEX, &[0x40]);
        bus.write(CMOS_DATA, &[0x99]);
        bus.read(CMOS_DATA, &mut b);
        assert_eq!(b[0], 0x99);
    }
}
