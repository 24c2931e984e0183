//! The KVM layer of capsule: opening the hypervisor, guest memory, VMs, vCPUs, x86_64 CPU setup
//! and the vCPU exit loop.
//!
//! This crate knows nothing about capsules, templates or snapshots on disk: it builds and runs
//! virtual machines and exposes every piece of their state to whoever drives them.
//!
//! - [`hypervisor`]: `/dev/kvm`, and what kind of KVM the host has ([`HostInfo`]).
//! - [`memory`]: guest RAM, reserved but not populated, with a dirty bitmap for VMM writes;
//!   every operation works on all of its regions.
//! - [`vm`]: a VM with its memory slots and optional in-kernel irqchip and PIT; its state
//!   ([`vm::VmState`], saved and restored by [`Vm::save_state`] / [`Vm::restore_state`]).
//! - [`vcpu`]: a vCPU, its run loop ([`vcpu::Vcpu::run`]: where VM exits are handled), how
//!   another thread interrupts it ([`vcpu::Kicker`]) and its state ([`vcpu::VcpuState`], saved
//!   and restored by [`Vcpu::save_state`] / [`Vcpu::restore_state`]).
//!
//! The state structs are plain serde types: the caller decides where and how they are stored.
//! - [`arch::x86_64`]: boot-time CPU state: page tables, GDT/TSS and segment registers; for
//!   Linux guests also the memory layout, kernel loader, CPUID, MSRs, LAPIC and ACPI tables.
//! - [`boot`]: booting a stock Linux kernel ([`boot::boot_linux`]).
//! - [`machine`]: the machines built from all of the above, devices included: Linux
//!   ([`machine::LinuxMachine`]) and the probe ([`machine::probe`]).
//! - [`seccomp`]: the seccomp filters vCPU threads and the device thread install on
//!   themselves (the system calls and KVM ioctls each may make; anything else fails with
//!   `EPERM`).
#![deny(missing_docs)]

pub mod arch;
pub mod boot;
mod error;
pub mod hypervisor;
pub mod machine;
pub mod memory;
pub mod seccomp;
pub mod vcpu;
pub mod vm;

pub use error::{Error, KvmUnavailable, Result};
pub use hypervisor::{HostInfo, Hypervisor, Virtualization};
pub use memory::GuestMemory;
pub use vcpu::{Kicker, Vcpu, VcpuContext, VcpuEvent, VcpuPosition, VcpuState};
pub use vm::{Vm, VmOptions, VmState};
