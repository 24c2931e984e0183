//! The HW-reduced ACPI sleep registers, so that `poweroff` in a Linux guest reaches the VMM.
//!
//! With `HW_REDUCED_ACPI`, the FADT points `SLEEP_CONTROL_REG` and `SLEEP_STATUS_REG` at two
//! one-byte I/O ports (the VMM's layout puts them at 0x600 and 0x601). To enter S5 the kernel
//! writes `SLP_TYP << 2 | SLP_EN` to the control register, with `SLP_TYP` taken from the
//! DSDT's `_S5_` package. This device turns that write into [`WriteOutcome::Shutdown`];
//! the status register reads as 0 and ignores writes (the kernel clears `WAK_STS` first).

use crate::bus::{BusDevice, WriteOutcome};

/// `SLP_EN`: bit 5 of the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// `SLP_TYP`: bits 2..=4 of the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// The two registers, control at offset 0 and status at offset 1.
#[derive(Debug)]
pub struct AcpiPm {
    s5_sleep_type: u8,
}

impl AcpiPm {
    /// A device that reports a shutdown when the guest enters sleep type `s5_sleep_type` (the
    /// value of the DSDT's `_S5_`).
    pub fn new(s5_sleep_type: u8) -> Self {
        AcpiPm { s5_sleep_type }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        let Some(&value) = data.first() else {
            return WriteOutcome::Handled;
        };
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if offset == 0 && value & SLP_EN != 0 && sleep_type == self.s5_sleep_type {
            tracing::info!("guest powered off through ACPI S5");
            return WriteOutcome::Shutdown;
        }
        WriteOutcome::Handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_enable_is_a_shutdown_and_nothing_else_is() {
        let mut pm = AcpiPm::new(5);
        assert_eq!(pm.write(0, &[(5 << 2) | SLP_EN]), WriteOutcome::Shutdown);
        assert_eq!(pm.write(0, &[5 << 2]), WriteOutcome::Handled, "no SLP_EN");
        assert_eq!(
            pm.write(0, &[(3 << 2) | SLP_EN]),
            WriteOutcome::Handled,
            "S3"
        );
        assert_eq!(
            pm.write(1, &[0x80]),
            WriteOutcome::Handled,
            "status register"
        );
        assert_eq!(pm.write(0, &[]), WriteOutcome::Handled);
        let mut byte = [9u8];
        pm.read(1, &mut byte);
        assert_eq!(byte, [0]);
    }
}
