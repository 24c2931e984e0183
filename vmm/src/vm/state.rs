//! Saving and restoring the VM-wide state KVM keeps, as a plain serde struct ([`VmState`]).
//!
//! | field | ioctls | present |
//! |---|---|---|
//! | [`VmState::irqchip`] | `KVM_GET/SET_IRQCHIP` for the master PIC, slave PIC and IOAPIC | when the VM was created with [`VmOptions::irqchip`](super::VmOptions::irqchip) |
//! | [`VmState::pit`] | `KVM_GET/SET_PIT2` | likewise (the PIT is created with the irqchip) |
//! | [`VmState::clock`] | `KVM_GET/SET_CLOCK` (kvmclock) | when the host has `KVM_CAP_ADJUST_CLOCK` |
//!
//! Guest memory is not part of it (the owner of the [`GuestMemory`](crate::GuestMemory) saves
//! it), nor are the vCPUs (each has its [`VcpuState`](crate::vcpu::VcpuState)). Restore the VM
//! state before the vCPUs' (Firecracker's order: the LAPICs then see a configured IOAPIC).
//!
//! The clock is restored with the flags it was saved with, less `KVM_CLOCK_TSC_STABLE` (which
//! only `KVM_GET_CLOCK` reports; kernels before 5.16 refuse it in `KVM_SET_CLOCK`). When the
//! saved flags include `KVM_CLOCK_REALTIME`, KVM advances kvmclock by the wall-clock time that
//! passed since the save, as Firecracker does; without it the guest clock resumes where it
//! stopped.
//!
//! On PVM (measured): all of these ioctls work; `KVM_CAP_ADJUST_CLOCK` reports
//! `KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC` as supported, but
//! `KVM_GET_CLOCK` returns flags 0 (no stable master clock), so the clock resumes where it
//! stopped.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME,
    KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};
use zerocopy::IntoBytes;

use super::Vm;
use crate::error::{Error, Result};

/// Everything KVM keeps about a VM besides its memory and vCPUs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VmState {
    /// The in-kernel PICs and IOAPIC; `None` when the VM has no in-kernel irqchip.
    pub irqchip: Option<IrqchipState>,
    /// The in-kernel PIT; `None` when the VM has none.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock; `None` when the host has no `KVM_CAP_ADJUST_CLOCK`.
    pub clock: Option<kvm_clock_data>,
}

/// The three chips of KVM's in-kernel irqchip.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IrqchipState {
    /// `KVM_IRQCHIP_PIC_MASTER`.
    pub pic_master: Irqchip,
    /// `KVM_IRQCHIP_PIC_SLAVE`.
    pub pic_slave: Irqchip,
    /// `KVM_IRQCHIP_IOAPIC`.
    pub ioapic: Irqchip,
}

/// One chip's state as KVM returns it (`struct kvm_irqchip`, whose payload is a union, so
/// kvm-bindings gives it neither `Debug` nor `PartialEq`; this compares and prints its bytes).
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Irqchip(pub kvm_irqchip);

impl Irqchip {
    /// The chip's `struct kvm_irqchip` as bytes (chip id, padding, then the 512-byte payload).
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl PartialEq for Irqchip {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl std::fmt::Debug for Irqchip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Irqchip")
            .field("chip_id", &self.0.chip_id)
            .field("bytes", &self.as_bytes())
            .finish()
    }
}

impl VmState {
    /// Makes a restore of this state start kvmclock exactly where it was saved, however much
    /// wall-clock time passed (by dropping `KVM_CLOCK_REALTIME` and `KVM_CLOCK_HOST_TSC`):
    /// the guest's monotonic clocks then count only time it ran, and whoever restores it sets
    /// the guest's wall clock itself.
    pub fn clear_clock_advance(&mut self) {
        if let Some(clock) = &mut self.clock {
            clock.flags &= !(KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC);
        }
    }
}

impl Vm {
    /// Reads the irqchip, PIT and kvmclock state (up to five ioctls). Pause every vCPU first.
    pub fn save_state(&self) -> Result<VmState> {
        let irqchip = if self.options.irqchip {
            Some(IrqchipState {
                pic_master: self.get_chip(KVM_IRQCHIP_PIC_MASTER)?,
                pic_slave: self.get_chip(KVM_IRQCHIP_PIC_SLAVE)?,
                ioapic: self.get_chip(KVM_IRQCHIP_IOAPIC)?,
            })
        } else {
            None
        };
        let pit = if self.options.irqchip {
            Some(
                self.fd
                    .get_pit2()
                    .map_err(|e| Error::kvm("KVM_GET_PIT2", e))?,
            )
        } else {
            None
        };
        let clock = if self.adjust_clock {
            let mut clock = self
                .fd
                .get_clock()
                .map_err(|e| Error::kvm("KVM_GET_CLOCK", e))?;
            // Reported by KVM_GET_CLOCK only; older kernels refuse it in KVM_SET_CLOCK.
            clock.flags &= !KVM_CLOCK_TSC_STABLE;
            Some(clock)
        } else {
            None
        };
        Ok(VmState {
            irqchip,
            pit,
            clock,
        })
    }

    /// Writes `state` into this VM, which should be freshly created with the same
    /// [`VmOptions::irqchip`](super::VmOptions::irqchip) setting, before the vCPUs' states are
    /// restored. On error the VM is left partly restored; discard it.
    pub fn restore_state(&self, state: &VmState) -> Result<()> {
        let has = |present: bool| if present { "has" } else { "lacks" };
        if state.irqchip.is_some() != self.options.irqchip
            || state.pit.is_some() != self.options.irqchip
        {
            return Err(Error::IncompatibleState(format!(
                "the state {} an irqchip and {} a PIT, the VM {} both",
                has(state.irqchip.is_some()),
                has(state.pit.is_some()),
                has(self.options.irqchip),
            )));
        }
        if state.clock.is_some() && !self.adjust_clock {
            return Err(Error::IncompatibleState(
                "the state has a kvmclock but this host has no KVM_CAP_ADJUST_CLOCK".into(),
            ));
        }
        // Firecracker's order: PIT, clock, then the chips.
        if let Some(pit) = &state.pit {
            self.fd
                .set_pit2(pit)
                .map_err(|e| Error::kvm("KVM_SET_PIT2", e))?;
        }
        if let Some(clock) = &state.clock {
            self.fd
                .set_clock(clock)
                .map_err(|e| Error::kvm("KVM_SET_CLOCK", e))?;
        }
        if let Some(chips) = &state.irqchip {
            for (chip, expected) in [
                (&chips.pic_master, KVM_IRQCHIP_PIC_MASTER),
                (&chips.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
                (&chips.ioapic, KVM_IRQCHIP_IOAPIC),
            ] {
                if chip.0.chip_id != expected {
                    return Err(Error::IncompatibleState(format!(
                        "irqchip state for chip {} found where chip {expected} belongs",
                        chip.0.chip_id
                    )));
                }
                self.fd
                    .set_irqchip(&chip.0)
                    .map_err(|e| Error::kvm("KVM_SET_IRQCHIP", e))?;
            }
        }
        Ok(())
    }

    fn get_chip(&self, chip_id: u32) -> Result<Irqchip> {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(|e| Error::kvm("KVM_GET_IRQCHIP", e))?;
        Ok(Irqchip(chip))
    }
}
