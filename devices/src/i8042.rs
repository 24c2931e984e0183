//! Just enough of the i8042 keyboard controller for a guest to reset the machine.
//!
//! Linux's `reboot` on a machine without an ACPI reset register falls back to the keyboard
//! controller: it waits for the status register (port 0x64) to show an empty input buffer,
//! then writes the "pulse reset line" command 0xFE to port 0x64. This device reads as 0 (no
//! data, buffers empty) and turns that command into [`WriteOutcome::Shutdown`].

use crate::bus::{BusDevice, WriteOutcome};

/// First port of the controller (data port 0x60); the command/status port is 0x64.
pub const I8042_PORT: u16 = 0x60;
/// Ports the controller spans from [`I8042_PORT`] (0x60..=0x64).
pub const I8042_PORT_LEN: u64 = 5;
/// Offset of the command/status register from [`I8042_PORT`].
const COMMAND_OFFSET: u64 = 4;
/// The command that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// The reset-only keyboard controller. Put it on the port-I/O bus at [`I8042_PORT`].
#[derive(Debug, Default)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            tracing::info!("guest requested a reset through the i8042");
            return WriteOutcome::Shutdown;
        }
        WriteOutcome::Handled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_shuts_down_everything_else_is_ignored() {
        let mut kbd = I8042;
        assert_eq!(kbd.write(4, &[0xfe]), WriteOutcome::Shutdown);
        assert_eq!(kbd.write(4, &[0xd1]), WriteOutcome::Handled);
        assert_eq!(kbd.write(0, &[0xfe]), WriteOutcome::Handled);
        assert_eq!(kbd.write(4, &[]), WriteOutcome::Handled);
        let mut status = [0xff; 1];
        kbd.read(4, &mut status);
        assert_eq!(status, [0]);
    }
}
