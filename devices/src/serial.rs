//! A 16550A-compatible UART (the 8250 family Linux drives as `ttyS0`) on port I/O.
//!
//! Register emulation is vm-superio's [`vm_superio::Serial`]. What the guest transmits
//! goes into a bounded [`SerialLog`] (newest bytes kept, the dropped ones counted) and, when
//! set, to a tee callback. The interrupt is an [`EventFd`] the VMM registers with
//! `KVM_IRQFD` for [`COM1_IRQ`].

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as SuperioSerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusDevice, WriteOutcome};
use crate::ring::LogRing;

/// COM1's first port.
pub const COM1_PORT: u16 = 0x3f8;
/// How many ports a UART occupies.
pub const SERIAL_PORT_LEN: u64 = 8;
/// COM1's ISA interrupt line.
pub const COM1_IRQ: u32 = 4;
/// Default size of the console log.
pub const DEFAULT_LOG_CAPACITY: usize = 64 * 1024;

/// Why a serial device could not be created or restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The interrupt eventfd could not be created or duplicated.
    #[error("serial interrupt eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// A saved state does not describe a valid UART (its receive FIFO is too long).
    #[error("invalid serial state: {0}")]
    InvalidState(String),
}

/// An [`EventFd`] used as vm-superio's interrupt trigger.
#[derive(Debug)]
pub struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

type Tee = Box<dyn FnMut(&[u8]) + Send>;

/// A shared handle to the guest's serial output: a bounded log plus an optional tee.
#[derive(Clone)]
pub struct SerialLog {
    inner: Arc<Mutex<LogInner>>,
}

struct LogInner {
    ring: LogRing,
    tee: Option<Tee>,
}

impl std::fmt::Debug for SerialLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("SerialLog")
            .field("capacity", &inner.ring.capacity())
            .field("dropped", &inner.ring.dropped())
            .field("tee", &inner.tee.is_some())
            .finish()
    }
}

impl SerialLog {
    /// An empty log of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self::from_ring(LogRing::new(capacity))
    }

    fn from_ring(ring: LogRing) -> Self {
        Self {
            inner: Arc::new(Mutex::new(LogInner { ring, tee: None })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, LogInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of the newest output bytes, oldest first.
    pub fn console_log(&self) -> Vec<u8> {
        self.lock().ring.snapshot()
    }

    /// How many output bytes were dropped from the log because it was full.
    pub fn dropped(&self) -> u64 {
        self.lock().ring.dropped()
    }

    /// Also hands every output byte to `tee` (called with the log's lock held: keep it short,
    /// and do not read the log from inside it). Replaces any previous tee.
    pub fn set_tee(&self, tee: impl FnMut(&[u8]) + Send + 'static) {
        self.lock().tee = Some(Box::new(tee));
    }

    /// Stops teeing.
    pub fn clear_tee(&self) {
        self.lock().tee = None;
    }

    fn append(&self, data: &[u8]) {
        let mut inner = self.lock();
        inner.ring.push(data);
        if let Some(tee) = inner.tee.as_mut() {
            tee(data);
        }
    }
}

impl io::Write for SerialLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The UART's registers and receive FIFO plus the console log, as plain data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes received from the host that the guest has not read yet.
    pub in_buffer: Vec<u8>,
    /// Capacity of the console log.
    pub log_capacity: usize,
    /// The console log's contents, oldest first.
    pub log: Vec<u8>,
    /// Bytes dropped from the console log.
    pub log_dropped: u64,
}

/// An 8250/16550A UART on the port-I/O bus (insert it at [`COM1_PORT`], [`SERIAL_PORT_LEN`]).
pub struct SerialDevice {
    uart: Serial<IrqTrigger, NoEvents, SerialLog>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("log", self.uart.writer())
            .finish()
    }
}

impl SerialDevice {
    /// A UART whose interrupt is `irq` and whose output goes to a log of `log_capacity` bytes.
    pub fn new(irq: EventFd, log_capacity: usize) -> Self {
        Self {
            uart: Serial::new(IrqTrigger(irq), SerialLog::new(log_capacity)),
        }
    }

    /// A UART with a fresh non-blocking interrupt eventfd and the default log size.
    pub fn with_new_eventfd() -> Result<Self, SerialError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(Self::new(irq, DEFAULT_LOG_CAPACITY))
    }

    /// The interrupt eventfd, for `KVM_IRQFD` on [`COM1_IRQ`].
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// A handle to the output log that stays valid while the device is on the bus.
    pub fn log(&self) -> SerialLog {
        self.uart.writer().clone()
    }

    /// A copy of the newest output bytes, oldest first.
    pub fn console_log(&self) -> Vec<u8> {
        self.uart.writer().console_log()
    }

    /// Queues host input for the guest to read; returns how many bytes fit in the UART's
    /// FIFO (the rest is not taken). Raises the receive interrupt when enabled.
    pub fn enqueue_input(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&data[..n]) {
            Ok(taken) => taken,
            Err(e) => {
                tracing::warn!(error = %e, "serial input not delivered");
                0
            }
        }
    }

    /// The device's state as plain data.
    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        let log = self.uart.writer().lock();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            log_capacity: log.ring.capacity(),
            log: log.ring.snapshot(),
            log_dropped: log.ring.dropped(),
        }
    }

    /// Rebuilds a device from `state`, raising `irq` if an interrupt was pending.
    pub fn restore(irq: EventFd, state: &SerialState) -> Result<Self, SerialError> {
        let superio = SuperioSerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let log = SerialLog::from_ring(LogRing::from_parts(
            state.log_capacity,
            &state.log,
            state.log_dropped,
        ));
        let uart = Serial::from_state(&superio, IrqTrigger(irq), NoEvents, log)
            .map_err(|e| SerialError::InvalidState(e.to_string()))?;
        Ok(Self { uart })
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i as u64).map(u8::try_from) {
                Some(Ok(reg)) if u64::from(reg) < SERIAL_PORT_LEN => self.uart.read(reg),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        for (i, byte) in data.iter().enumerate() {
            let Some(Ok(reg)) = offset.checked_add(i as u64).map(u8::try_from) else {
                continue;
            };
            if u64::from(reg) >= SERIAL_PORT_LEN {
                continue;
            }
            if let Err(e) = self.uart.write(reg, *byte) {
                tracing::warn!(error = %e, "serial write failed");
            }
        }
        WriteOutcome::Handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LCR: u64 = 3;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    fn device(cap: usize) -> SerialDevice {
        SerialDevice::new(EventFd::new(libc::EFD_NONBLOCK).unwrap(), cap)
    }

    #[test]
    fn output_goes_to_the_bounded_log_and_the_tee() {
        let mut dev = device(8);
        let teed = Arc::new(Mutex::new(Vec::new()));
        let t = teed.clone();
        dev.log()
            .set_tee(move |b| t.lock().unwrap().extend_from_slice(b));
        for b in b"hello, world" {
            assert_eq!(dev.write(THR, &[*b]), WriteOutcome::Handled);
        }
        assert_eq!(dev.console_log(), b"o, world");
        assert_eq!(dev.log().dropped(), 4);
        assert_eq!(teed.lock().unwrap().as_slice(), b"hello, world");
    }

    #[test]
    fn transmit_interrupt_fires_through_the_eventfd() {
        let mut dev = device(64);
        // Enable the THR-empty interrupt, then transmit.
        dev.write(IER, &[0x02]);
        assert!(dev.irq_evt().read().unwrap() >= 1);
        // Reading the IIR acknowledges the pending THR-empty interrupt.
        let mut iir = [0];
        dev.read(2, &mut iir);
        assert_eq!(iir[0] & 0x0f, 0x02);
        dev.write(THR, b"x");
        assert!(dev.irq_evt().read().unwrap() >= 1);
        let mut lsr = [0];
        dev.read(LSR, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
    }

    #[test]
    fn input_is_bounded_by_the_fifo_and_readable() {
        let mut dev = device(64);
        let big = vec![b'a'; 1000];
        let n = dev.enqueue_input(&big);
        assert!(n > 0 && n < 1000);
        let mut byte = [0];
        dev.read(THR, &mut byte);
        assert_eq!(byte[0], b'a');
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let mut dev = device(64);
        let mut data = [0u8; 4];
        dev.read(6, &mut data);
        assert_eq!(data[2..], [0xff, 0xff]);
        assert_eq!(dev.write(u64::MAX, &[1, 2]), WriteOutcome::Handled);
        dev.read(u64::MAX - 1, &mut data);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut dev = device(16);
        dev.write(LCR, &[0x03]);
        dev.write(SCR, &[0x5a]);
        dev.write(IER, &[0x01]);
        dev.write(THR, b"A");
        dev.write(THR, b"B");
        dev.enqueue_input(b"in");
        let state = dev.save();
        let restored =
            SerialDevice::restore(EventFd::new(libc::EFD_NONBLOCK).unwrap(), &state).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(restored.console_log(), b"AB");
        // A pending receive interrupt is raised again on restore.
        assert!(restored.irq_evt().read().unwrap() >= 1);

        let mut bad = state.clone();
        bad.in_buffer = vec![0; 1 << 16];
        assert!(SerialDevice::restore(EventFd::new(0).unwrap(), &bad).is_err());
    }
}
