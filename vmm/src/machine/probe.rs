//! The probe machine: the built-in probe guest (`guests/probe`) entered directly in 64-bit
//! user mode, one region of RAM at guest-physical 0, no interrupts, and one device: the
//! [`Doorbell`] on [`probe_abi::DOORBELL_PORT`], whose writes end [`Vcpu::run`] with a
//! [`crate::VcpuEvent::Yield`].
//!
//! ```text
//! let vm = Vm::new(&hv, memory::create_anonymous(size)?, probe::vm_options())?;
//! let vcpus = ...;                                    // vm.create_vcpu(i) for each vCPU
//! probe::boot(&vm, &vcpus, size as u64)?;              // or probe::restore(...)
//! let pio = probe::pio_bus()?;                          // run every vCPU on it
//! ```
//!
//! The mailbox protocol (requests and replies through guest memory, see `probe_abi`) is the
//! caller's business.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_regs;
use vm_memory::{Bytes, GuestAddress};

use capsule_devices::{Bus, Doorbell};

use crate::arch::x86_64::user_mode::{self, UserModeLayout};
use crate::error::{Error, Result};
use crate::memory;
use crate::vcpu::{Vcpu, VcpuState};
use crate::vm::{Vm, VmOptions, VmState};

/// Where the probe ABI wants the boot structures (page tables, GDT, TSS).
pub const LAYOUT: UserModeLayout = UserModeLayout {
    gdt: probe_abi::GDT_ADDR,
    tss: probe_abi::TSS_ADDR,
    pml4: probe_abi::PML4_ADDR,
    pdpt: probe_abi::PDPT_ADDR,
    pd: probe_abi::PD_ADDR,
    max_pd_pages: probe_abi::MAX_PD_PAGES,
};

/// The probe's VMs: KVM logs dirty pages (for incremental snapshots); no irqchip is needed.
pub fn vm_options() -> VmOptions {
    VmOptions {
        dirty_log: true,
        ..VmOptions::default()
    }
}

/// Loads the probe into `vm`'s memory (page tables, GDT, TSS, the program) and sets every
/// vCPU to enter it. `mem_size` is the guest's RAM, told to the guest: it must be the size
/// of the memory's single region at guest-physical 0.
pub fn boot(vm: &Vm, vcpus: &[Vcpu], mem_size: u64) -> Result<()> {
    let memory = vm.memory();
    let layout = memory::layout(memory);
    if layout != [(GuestAddress(0), mem_size as usize)] {
        return Err(Error::InvalidConfig(format!(
            "the probe needs one region of {mem_size:#x} bytes at 0, not {layout:x?}"
        )));
    }
    user_mode::write_tables(memory, &LAYOUT, mem_size)?;
    memory
        .write_slice(probe_guest::IMAGE, GuestAddress(probe_abi::IMAGE_ADDR))
        .map_err(|e| Error::Memory(format!("writing the probe image: {e}")))?;
    for vcpu in vcpus {
        vcpu.set_sregs(&user_mode::sregs(vcpu.sregs()?, &LAYOUT))?;
        restart(vcpu, mem_size)?;
    }
    Ok(())
}

/// Puts saved state back: `vm_state` into `vm`, `vcpu_states[i]` into `vcpus[i]`. The
/// memory must already hold the snapshot's pages.
pub fn restore(
    vm: &Vm,
    vcpus: &[Vcpu],
    vm_state: &VmState,
    vcpu_states: &[VcpuState],
) -> Result<()> {
    if vcpus.len() != vcpu_states.len() {
        return Err(Error::IncompatibleState(format!(
            "{} saved vCPUs for {} vCPUs",
            vcpu_states.len(),
            vcpus.len()
        )));
    }
    vm.restore_state(vm_state)?;
    for (vcpu, state) in vcpus.iter().zip(vcpu_states) {
        vcpu.restore_state(state)?;
    }
    Ok(())
}

/// Sends `vcpu` back to the probe's entry point with a fresh stack (after its command was
/// killed); `mem_size` as given to [`boot`]. Guest memory is left as it is.
pub fn restart(vcpu: &Vcpu, mem_size: u64) -> Result<()> {
    vcpu.set_regs(&entry_regs(vcpu.index(), mem_size))
}

/// The probe's port I/O bus: the doorbell.
pub fn pio_bus() -> Result<Bus> {
    let mut pio = Bus::new();
    pio.insert(
        Arc::new(Mutex::new(Doorbell)),
        u64::from(probe_abi::DOORBELL_PORT),
        4,
    )
    .map_err(|e| Error::InvalidConfig(e.to_string()))?;
    Ok(pio)
}

/// Registers at the probe's entry point for vCPU `index`: its stack, and its index and the
/// memory size as the entry function's arguments.
fn entry_regs(index: u32, mem_size: u64) -> kvm_regs {
    user_mode::regs(
        probe_guest::ENTRY,
        probe_abi::stack_top(u64::from(index)),
        [u64::from(index), mem_size],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_vcpu_enters_with_its_own_stack_and_index() {
        let regs = entry_regs(3, 64 << 20);
        assert_eq!(regs.rip, probe_guest::ENTRY);
        assert_eq!(regs.rsp, probe_abi::stack_top(3));
        assert_eq!((regs.rdi, regs.rsi), (3, 64 << 20));
    }

    #[test]
    fn the_doorbell_yields_what_the_guest_writes() {
        let pio = pio_bus().unwrap();
        let ready = probe_abi::DOORBELL_READY.to_le_bytes();
        assert_eq!(
            pio.write(u64::from(probe_abi::DOORBELL_PORT), &ready),
            Some(capsule_devices::WriteOutcome::Yield(u64::from(
                probe_abi::DOORBELL_READY
            )))
        );
    }
}
