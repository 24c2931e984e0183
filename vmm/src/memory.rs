//! Guest RAM: reserved address space, populated only where the guest or the VMM touches it.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::error::{Error, Result};

/// Guest memory as the VMM sees it. The [`AtomicBitmap`] records pages the VMM itself writes
/// (devices, mailboxes), which KVM's dirty log does not see.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Host page size assumed for dirty tracking and snapshots.
pub const PAGE_SIZE: usize = 4096;

/// Creates `size` bytes of anonymous guest RAM at guest-physical 0.
///
/// The mapping is `MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`: it reserves address space
/// only, so a capsule's resident memory is what its guest actually touched.
pub fn create_anonymous(size: usize) -> Result<GuestMemory> {
    if size == 0 || size % PAGE_SIZE != 0 {
        return Err(Error::InvalidConfig(format!(
            "guest memory size {size} is not a positive multiple of {PAGE_SIZE}"
        )));
    }
    let region = MmapRegion::<AtomicBitmap>::build(
        None,
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
    )
    .map_err(|e| Error::Memory(format!("mmap of {size} bytes: {e}")))?;
    from_region(region)
}

/// Wraps one mapping as guest RAM at guest-physical 0.
pub fn from_region(region: MmapRegion<AtomicBitmap>) -> Result<GuestMemory> {
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| Error::Memory("region does not fit the guest address space".into()))?;
    GuestMemory::from_regions(vec![region]).map_err(|e| Error::Memory(e.to_string()))
}

/// Bytes of guest RAM, summed over regions.
pub fn size_of(memory: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryBackend;
    memory.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn memory_is_bounds_checked() {
        let mem = create_anonymous(16 * PAGE_SIZE).unwrap();
        assert_eq!(size_of(&mem), 16 * PAGE_SIZE as u64);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(mem
            .write_obj(1u64, GuestAddress(16 * PAGE_SIZE as u64 - 4))
            .is_err());
        assert!(mem.read_obj::<u8>(GuestAddress(u64::MAX)).is_err());
        assert!(!mem.address_in_range(GuestAddress(16 * PAGE_SIZE as u64)));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(create_anonymous(0).is_err());
        assert!(create_anonymous(100).is_err());
    }
}
