//! x86_64 boot-time state.
//!
//! - [`user_mode`]: entering a guest directly in 64-bit user mode (CPL 3, IOPL 3) with
//!   host-built page tables, GDT and TSS: how the probe guest starts, at native speed on both
//!   hardware KVM and PVM.

pub mod user_mode;
