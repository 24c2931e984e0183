//! A doorbell: the guest writes a value to a port to say "look at shared memory now".

use crate::bus::{BusDevice, WriteOutcome};

/// Turns every guest write into [`WriteOutcome::Yield`] carrying the written value (up to 8
/// bytes, little endian), so the vCPU stops and its owner handles the message. Reads return 0.
#[derive(Debug, Default)]
pub struct Doorbell;

impl BusDevice for Doorbell {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> WriteOutcome {
        let mut value = [0u8; 8];
        let n = data.len().min(8);
        value[..n].copy_from_slice(&data[..n]);
        WriteOutcome::Yield(u64::from_le_bytes(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yields_the_written_value() {
        let mut bell = Doorbell;
        assert_eq!(
            bell.write(0, &[1, 2, 3, 4]),
            WriteOutcome::Yield(0x0403_0201)
        );
        assert_eq!(bell.write(0, &[0xff; 12]), WriteOutcome::Yield(u64::MAX));
        let mut buf = [7u8; 4];
        bell.read(0, &mut buf);
        assert_eq!(buf, [0; 4]);
    }
}
