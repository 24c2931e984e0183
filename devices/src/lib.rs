//! Emulated devices for capsules and the buses that route guest I/O to them.
//!
//! A vCPU exit for port I/O or MMIO is dispatched through a [`Bus`] to the [`BusDevice`] that
//! owns the address. A device answers a write with a [`WriteOutcome`]: usually `Handled`,
//! `Yield` when the guest asked the host to act (a doorbell): the vCPU then stops running and
//! reports the value to whoever owns it, or `Shutdown` when the guest asked to reset or power
//! off the machine.
//!
//! Devices for Linux guests: an 8250 UART ([`serial`]), a reset-only keyboard controller
//! ([`i8042`]), and virtio devices on the virtio-mmio transport ([`virtio`]: entropy and the
//! agent's console channel). Device work for virtio runs on one [`event_loop::DeviceThread`]
//! fed by ioeventfds, not on the vCPU threads; interrupts leave through irqfd-ready
//! eventfds. Every stateful device has a plain serde `...State` with `save`/`restore`.
#![deny(missing_docs)]

pub mod acpi_pm;
mod bus;
mod doorbell;
pub mod event_loop;
pub mod i8042;
pub mod ring;
pub mod serial;
pub mod virtio;

pub use acpi_pm::AcpiPm;
pub use bus::{Bus, BusDevice, BusError, WriteOutcome};
pub use doorbell::Doorbell;
