//! Emulated devices for capsules and the buses that route guest I/O to them.
//!
//! A vCPU exit for port I/O or MMIO is dispatched through a [`Bus`] to the [`BusDevice`] that
//! owns the address. A device answers a write with a [`WriteOutcome`]: usually `Handled`, or
//! `Yield` when the guest asked the host to act (a doorbell): the vCPU then stops running and
//! reports the value to whoever owns it.
#![deny(missing_docs)]

mod bus;
mod doorbell;

pub use bus::{Bus, BusDevice, BusError, WriteOutcome};
pub use doorbell::Doorbell;
