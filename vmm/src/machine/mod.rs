//! The machines the VMM builds: for each kind of guest, its VM options, memory layout,
//! devices and boot, defined in one place. The caller creates the VM and vCPUs (or takes
//! pre-created ones), hands them to a machine, then runs the vCPUs on the machine's buses.
//!
//! - [`linux`]: a stock Linux kernel with a serial console, reset and power-off, and
//!   virtio-console and virtio-rng on virtio-mmio ([`LinuxMachine`]).
//! - [`probe`]: the built-in probe guest, entered in user mode, with its doorbell.

pub mod linux;
pub mod probe;

pub use linux::{LinuxDevices, LinuxMachine};
