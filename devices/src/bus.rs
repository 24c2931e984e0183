//! An address-range bus shared by port I/O (16-bit ports) and MMIO (64-bit addresses).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a device wants after a guest write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The write is done; the vCPU continues.
    Handled,
    /// Stop the vCPU and hand this value to its owner (a doorbell rang).
    Yield(u64),
    /// The guest asked to reset or power off the machine (for example the keyboard
    /// controller's reset command): stop every vCPU; the VMM decides what happens next.
    Shutdown,
}

/// A device that answers guest reads and writes in its address range.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let _ = offset;
    }

    /// A guest write of `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
        let _ = (offset, data);
        WriteOutcome::Handled
    }
}

/// Why a device could not be inserted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around.
    #[error("invalid bus range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Routes accesses to the device whose `[base, base + len)` contains the address.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.devices.iter().map(|(b, (l, _))| (*b, *l)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let before = self.devices.range(..end).next_back();
        if let Some((b, (l, _))) = before {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &SharedDevice)> {
        let (base, (len, device)) = self.devices.range(..=addr).next_back()?;
        (addr - base < *len).then_some((addr - base, device))
    }

    /// Dispatches a read; `false` when no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; `None` when no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<WriteOutcome> {
        let (offset, device) = self.find(addr)?;
        let outcome = lock(device).write(offset, data);
        Some(outcome)
    }
}

/// A device's lock; a device that panicked while locked still serves later accesses.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> WriteOutcome {
            self.0.push((offset, data.to_vec()));
            WriteOutcome::Yield(offset)
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlaps() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(dev.clone(), 0x110, 1).is_ok());
        assert_eq!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::InvalidRange {
                base: u64::MAX,
                len: 2
            })
        );
        assert_eq!(
            bus.insert(dev.clone(), 5, 0),
            Err(BusError::InvalidRange { base: 5, len: 0 })
        );

        let mut buf = [0u8; 2];
        assert!(bus.read(0x103, &mut buf));
        assert_eq!(buf, [3, 3]);
        assert!(!bus.read(0xff, &mut buf));
        assert!(!bus.read(0x111, &mut buf));
        assert_eq!(bus.write(0x104, &[9]), Some(WriteOutcome::Yield(4)));
        assert_eq!(bus.write(0x200, &[9]), None);
        assert_eq!(dev.lock().unwrap().0, vec![(4, vec![9])]);
    }
}
