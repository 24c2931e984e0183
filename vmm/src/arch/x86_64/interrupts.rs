//! Local APIC setup for boot: `LINT0` delivers the legacy PIC's interrupts (ExtINT) and
//! `LINT1` delivers NMIs, as a BIOS leaves them (Linux relies on it for the PIC-based timer
//! check and NMI watchdog). Read-modify-write of `KVM_GET_LAPIC` / `KVM_SET_LAPIC`; needs the
//! VM's in-kernel irqchip.

use kvm_bindings::kvm_lapic_state;

use crate::error::{Error, Result};
use crate::vcpu::Vcpu;

/// Offset of the LVT `LINT0` register in the APIC page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT `LINT1` register.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode NMI (bits 8–10 of an LVT entry).
pub const APIC_MODE_NMI: u32 = 0x4;
/// Delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

fn get_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = lapic.regs[offset + i] as u8;
    }
    u32::from_le_bytes(bytes)
}

fn set_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *b as _;
    }
}

/// `reg` with its delivery mode replaced by `mode`.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets `LINT0` to ExtINT and `LINT1` to NMI in a LAPIC state (other bits, the mask
/// included, are kept).
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    let lvt0 = get_reg(lapic, APIC_LVT0);
    set_reg(lapic, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = get_reg(lapic, APIC_LVT1);
    set_reg(lapic, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Applies [`set_lint`] to `vcpu`'s in-kernel LAPIC.
pub fn configure_lapic(vcpu: &Vcpu) -> Result<()> {
    let mut lapic = vcpu
        .fd()
        .get_lapic()
        .map_err(|e| Error::kvm("KVM_GET_LAPIC", e))?;
    set_lint(&mut lapic);
    vcpu.fd()
        .set_lapic(&lapic)
        .map_err(|e| Error::kvm("KVM_SET_LAPIC", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_modes_are_set_and_other_bits_kept() {
        let mut lapic = kvm_lapic_state::default();
        set_reg(&mut lapic, APIC_LVT0, 0x0001_0000 | (0x1 << 8)); // masked, mode 1
        set_reg(&mut lapic, APIC_LVT1, 0x0001_0000);
        set_lint(&mut lapic);
        assert_eq!(get_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(get_reg(&lapic, APIC_LVT1), 0x0001_0400);
    }
}
