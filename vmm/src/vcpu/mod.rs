//! A vCPU and its run loop: this is where VM exits are handled.
//!
//! [`Vcpu::run`] enters the guest and handles exits until one needs its owner: port I/O and
//! MMIO go to the [`Bus`]es (a device may ask to [`WriteOutcome::Yield`]); a triple fault, a
//! `hlt`, or an error KVM reports end the run with a [`VcpuEvent`]. Another thread can make a
//! running vCPU return promptly with its [`Kicker`].

mod context;
mod kick;
pub mod state;

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};

pub use context::VcpuContext;
pub use kick::{install_kick_handler, Kicker, KICK_SIGNAL_OFFSET};
pub use state::VcpuState;

use crate::error::{Error, Result};
use capsule_devices::{Bus, WriteOutcome};

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuEvent {
    /// A device asked the owner to act (a doorbell rang) with this value.
    Yield(u64),
    /// Another thread kicked the vCPU ([`Kicker::kick`]); the guest can be re-entered.
    Kicked,
    /// The guest shut down: a triple fault, or a reset/power-off request.
    Shutdown,
    /// The guest executed `hlt` with nothing to wake it.
    Halted,
    /// KVM could not continue the guest (internal error, failed entry, unexpected exit).
    Failed(String),
}

/// Where a vCPU is ([`Vcpu::position`]). Displays as
/// `vCPU{index}: rip {rip:#x}, rsp {rsp:#x}, rflags {rflags:#x}, mp_state {mp_state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuPosition {
    /// The vCPU's index.
    pub index: u32,
    /// Instruction pointer.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Flags register.
    pub rflags: u64,
    /// Multiprocessing state (`KVM_MP_STATE_*`).
    pub mp_state: u32,
}

impl std::fmt::Display for VcpuPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vCPU{}: rip {:#x}, rsp {:#x}, rflags {:#x}, mp_state {}",
            self.index, self.rip, self.rsp, self.rflags, self.mp_state
        )
    }
}

/// One virtual CPU. Owned and run by one thread at a time.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    index: u32,
    kicker: Kicker,
    caps: state::VcpuCaps,
    /// The last `run` returned from inside an I/O or MMIO exit that KVM completes only on the
    /// next `KVM_RUN` (see [`Vcpu::complete_pending_exit`]).
    exit_pending: bool,
}

impl Vcpu {
    pub(crate) fn new(fd: VcpuFd, index: u32, caps: state::VcpuCaps) -> Self {
        Vcpu {
            fd,
            index,
            kicker: Kicker::new(),
            caps,
            exit_pending: false,
        }
    }

    /// The vCPU's index in its VM.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// A handle other threads use to interrupt [`Vcpu::run`]. Valid once the running thread
    /// has called `run` at least once (it records which thread to signal).
    pub fn kicker(&self) -> Kicker {
        self.kicker.clone()
    }

    /// General-purpose registers.
    pub fn regs(&self) -> Result<kvm_regs> {
        self.fd
            .get_regs()
            .map_err(|e| Error::kvm("KVM_GET_REGS", e))
    }

    /// Sets the general-purpose registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<()> {
        self.fd
            .set_regs(regs)
            .map_err(|e| Error::kvm("KVM_SET_REGS", e))
    }

    /// Segment, control and descriptor-table registers.
    pub fn sregs(&self) -> Result<kvm_sregs> {
        self.fd
            .get_sregs()
            .map_err(|e| Error::kvm("KVM_GET_SREGS", e))
    }

    /// Sets the segment, control and descriptor-table registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<()> {
        self.fd
            .set_sregs(sregs)
            .map_err(|e| Error::kvm("KVM_SET_SREGS", e))
    }

    /// The KVM vCPU handle.
    pub(crate) fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The multiprocessing state (`KVM_MP_STATE_*`: runnable, waiting for INIT/SIPI, halted...).
    pub fn mp_state(&self) -> Result<u32> {
        self.fd
            .get_mp_state()
            .map(|state| state.mp_state)
            .map_err(|e| Error::kvm("KVM_GET_MP_STATE", e))
    }

    /// Where the vCPU is: instruction and stack pointers, flags and multiprocessing state
    /// (for reports on a guest that is stuck or gone).
    pub fn position(&self) -> Result<VcpuPosition> {
        let regs = self.regs()?;
        Ok(VcpuPosition {
            index: self.index,
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            mp_state: self.mp_state()?,
        })
    }

    /// The control registers, EFER and the GS and IDT bases, as words (`cr0 0x.. cr2 0x..
    /// cr3 0x.. cr4 0x.. efer 0x.. gs.base 0x.. idt 0x../0x..`): what tells a triple fault
    /// apart (the last page-fault address, whether the per-CPU base is the guest's own).
    pub fn fault_registers(&self) -> Result<String> {
        let s = self.sregs()?;
        Ok(format!(
            "cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} gs.base {:#x} idt {:#x}/{:#x}",
            s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.gs.base, s.idt.base, s.idt.limit
        ))
    }

    /// Whether the last [`Vcpu::run`] returned from inside a port I/O or MMIO exit that KVM
    /// has not completed yet (a [`VcpuEvent::Yield`], or a kick that came between an exit and
    /// the next entry).
    pub fn exit_pending(&self) -> bool {
        self.exit_pending
    }

    /// Completes the exit the last [`Vcpu::run`] returned from, without running any guest
    /// instruction, so that the vCPU state is consistent for [`Vcpu::save_state`].
    ///
    /// KVM finishes a port I/O or MMIO exit (for an `out`: advancing `rip` past it) only when
    /// the vCPU re-enters `KVM_RUN`; this enters with `immediate_exit` set, which completes
    /// the exit and returns at once (the KVM API's documented way). One `KVM_RUN`; nothing to
    /// do when no exit is pending.
    pub fn complete_pending_exit(&mut self) -> Result<()> {
        if !self.exit_pending {
            return Ok(());
        }
        self.fd.set_kvm_immediate_exit(1);
        let result = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(e) => Err(Error::kvm("KVM_RUN", e)),
            Ok(exit) => Err(Error::IncompatibleState(format!(
                "KVM_RUN with immediate_exit set ran the guest to {exit:?}"
            ))),
        };
        self.fd.set_kvm_immediate_exit(0);
        self.exit_pending = false;
        result
    }

    /// Runs the guest until an exit needs the owner. Port I/O goes to `pio`, MMIO to `mmio`;
    /// accesses no device claims read as all-ones and writes are dropped, as on real hardware.
    pub fn run(&mut self, pio: &Bus, mmio: &Bus) -> Result<VcpuEvent> {
        let _armed = self.kicker.arm(self.fd.get_kvm_run());
        loop {
            if self.kicker.take() {
                return Ok(VcpuEvent::Kicked);
            }
            // Entering KVM_RUN completes whatever exit was pending.
            self.exit_pending = false;
            match self.fd.run() {
                Ok(exit) => match exit {
                    // Every I/O and MMIO exit is completed by KVM only at the next entry (an
                    // `in`'s value reaches the register then): until that entry, the vCPU's
                    // state is not consistent for a save, even when a kick ends this run
                    // before it re-enters (see `complete_pending_exit`).
                    VcpuExit::IoOut(port, data) => {
                        self.exit_pending = true;
                        let outcome = pio.write(u64::from(port), data);
                        if let Some(event) = after_write(outcome, &mut self.exit_pending) {
                            return Ok(event);
                        }
                    }
                    VcpuExit::IoIn(port, data) => {
                        self.exit_pending = true;
                        if !pio.read(u64::from(port), data) {
                            data.fill(0xff);
                        }
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        self.exit_pending = true;
                        let outcome = mmio.write(addr, data);
                        if let Some(event) = after_write(outcome, &mut self.exit_pending) {
                            return Ok(event);
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        self.exit_pending = true;
                        if !mmio.read(addr, data) {
                            data.fill(0xff);
                        }
                    }
                    VcpuExit::Shutdown => return Ok(VcpuEvent::Shutdown),
                    VcpuExit::Hlt => return Ok(VcpuEvent::Halted),
                    VcpuExit::InternalError => {
                        return Ok(VcpuEvent::Failed("KVM internal error".into()))
                    }
                    VcpuExit::FailEntry(reason, cpu) => {
                        return Ok(VcpuEvent::Failed(format!(
                            "VM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                        )))
                    }
                    VcpuExit::Intr => {}
                    other => return Ok(VcpuEvent::Failed(format!("unexpected VM exit {other:?}"))),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.kicker.disarm_immediate_exit(self.fd.get_kvm_run());
                }
                Err(e) => return Err(Error::kvm("KVM_RUN", e)),
            }
        }
    }
}

/// What a device's answer to a guest write means for the run loop: an event for the owner
/// (the exit then stays pending until the next `KVM_RUN`), or `None` to keep running. Writes
/// no device claims are dropped, as on real hardware.
fn after_write(outcome: Option<WriteOutcome>, exit_pending: &mut bool) -> Option<VcpuEvent> {
    let event = match outcome? {
        WriteOutcome::Handled => return None,
        WriteOutcome::Yield(value) => VcpuEvent::Yield(value),
        WriteOutcome::Shutdown => VcpuEvent::Shutdown,
    };
    *exit_pending = true;
    Some(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_reads_as_one_line() {
        let position = VcpuPosition {
            index: 1,
            rip: 0x1000,
            rsp: 0x8ff0,
            rflags: 0x202,
            mp_state: 0,
        };
        assert_eq!(
            position.to_string(),
            "vCPU1: rip 0x1000, rsp 0x8ff0, rflags 0x202, mp_state 0"
        );
    }
}
