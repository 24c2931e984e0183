//! x86_64 boot-time state.
//!
//! - [`user_mode`]: entering a guest directly in 64-bit user mode (CPL 3, IOPL 3) with
//!   host-built page tables, GDT and TSS: how the probe guest starts, at native speed on both
//!   hardware KVM and PVM.
//!
//! [`bits`] names the control-register, EFER, RFLAGS and page-table bits both use.
//!
//! For Linux guests (put together by [`crate::boot`]):
//! - [`layout`]: the guest-physical memory map, ports and GSIs.
//! - [`loader`]: loading the kernel and initramfs; `boot_params` and PVH start info.
//! - [`regs`]: registers, GDT and page tables for PVH and 64-bit entry.
//! - [`cpuid`]: the guest's CPUID.
//! - [`msrs`]: boot MSR values.
//! - [`interrupts`]: LAPIC `LINT0`/`LINT1`.
//! - [`acpi`]: RSDP, XSDT, FADT, MADT and DSDT.

pub mod acpi;
pub mod bits;
pub mod cpuid;
pub mod interrupts;
pub mod layout;
pub mod loader;
pub mod msrs;
pub mod regs;
#[cfg(test)]
pub(crate) mod test_images;
pub mod user_mode;
