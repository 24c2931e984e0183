//! Guest RAM: reserved address space, populated only where the guest or the VMM touches it.
//!
//! Guest memory may have several regions (a Linux guest's RAM continues above the 32-bit MMIO
//! gap), and every operation here works on all of them. Where memory is seen as one run of
//! bytes (a snapshot's memory file), it is **flat**: the regions laid end to end in
//! guest-physical order, so flat offset 0 is the first byte of the lowest region and the
//! first byte of region i+1 follows the last byte of region i ([`layout`] says where each
//! region starts).
//!
//! - creating it: [`create_anonymous`], [`create_anonymous_regions`], [`map_private_file`],
//!   [`map_private_file_regions`]; taking on a file in place: [`replace_with_private_file`];
//! - the host's view of it: [`host_ranges`], [`host_slices`];
//! - flat offsets: [`write_flat`], [`read_flat`], [`flatten_dirty`];
//! - pages the VMM wrote: [`take_vmm_dirty`] (KVM's log of guest writes is
//!   [`crate::Vm::take_dirty_pages`], which includes these); pages written by anyone since
//!   the memory was mapped, without a dirty log: [`private_pages`];
//! - memory shared with other guests, mapped only where touched: [`TouchedOnly`].

mod dirty;
mod file;
mod flat;
mod huge;
mod owned;
mod touched_only;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::error::{Error, Result};

pub(crate) use dirty::or_words;
pub use dirty::take_vmm_dirty;
pub use file::{map_private_file, map_private_file_regions, replace_with_private_file};
pub use flat::{flatten_dirty, read_flat, write_flat};
pub use huge::HUGE_PAGE_SIZE;
pub use owned::private_pages;
pub use touched_only::TouchedOnly;

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
    check_size(size)?;
    let region = MmapRegion::<AtomicBitmap>::build(
        None,
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
    )
    .map_err(|e| Error::mmap(&format!("mmap of {size} bytes"), e))?;
    from_region(region)
}

/// Creates anonymous guest RAM made of several regions, `(guest-physical start, bytes)` each,
/// in ascending order (for a guest whose RAM continues above a 32-bit MMIO gap), mapped as
/// [`create_anonymous`] does and meant for guests that use all of their RAM (Linux): each
/// region is placed at a host address aligned to [`HUGE_PAGE_SIZE`] when the host allows it,
/// and advised `MADV_HUGEPAGE`. KVM backs a guest 2 MiB frame with one huge-page entry of its
/// own page tables only when the guest-physical and host addresses agree modulo 2 MiB; then
/// one fault and one TLB entry cover 2 MiB, which matters most under nested virtualization,
/// where every such fault is an exit. The cost is resident memory in 2 MiB steps.
pub fn create_anonymous_regions(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemory> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, size) in ranges {
        check_size(size)?;
        regions.push(guest_region(huge::map_huge_page_aligned(size)?, start)?);
    }
    from_regions(regions)
}

/// Wraps one mapping as guest RAM at guest-physical 0.
pub fn from_region(region: MmapRegion<AtomicBitmap>) -> Result<GuestMemory> {
    from_regions(vec![guest_region(region, GuestAddress(0))?])
}

/// Bytes of guest RAM, summed over regions.
pub fn size_of(memory: &GuestMemory) -> u64 {
    memory.iter().map(|r| r.len()).sum()
}

/// Each region's guest-physical start and length, in guest-physical (so flat) order: the
/// shape [`create_anonymous_regions`] and [`map_private_file_regions`] take.
pub fn layout(memory: &GuestMemory) -> Vec<(GuestAddress, usize)> {
    memory
        .iter()
        .map(|r| (r.start_addr(), r.len() as usize))
        .collect()
}

/// Host address and length of each region's mapping, in flat order.
///
/// The pointers stay valid as long as `memory` (or a clone of it) is alive; reading or
/// writing through them is up to the caller's own `unsafe` code, which must not race with
/// the guest or the VMM on the same bytes (see [`host_slices`]).
pub fn host_ranges(memory: &GuestMemory) -> Result<Vec<(*mut u8, usize)>> {
    memory
        .iter()
        .map(|region| {
            let addr = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| Error::Memory(e.to_string()))?;
            Ok((addr, region.len() as usize))
        })
        .collect()
}

/// Every region's bytes, in flat order: concatenated, they are the flat memory image.
///
/// # Safety
/// Nothing may write the memory while the slices are alive: no vCPU of a VM over it may
/// run (stop or freeze them all first) and the VMM must not write it (devices, mailboxes,
/// [`write_flat`]), and no one may remap it ([`replace_with_private_file`]). Reading it
/// meanwhile is fine.
pub unsafe fn host_slices(memory: &GuestMemory) -> Result<Vec<&[u8]>> {
    let ranges = host_ranges(memory)?;
    Ok(ranges
        .into_iter()
        // SAFETY: each range is a live mapping owned by `memory`, which the returned
        // lifetime borrows, so it outlives the slice; the caller guarantees nothing writes
        // or remaps it meanwhile.
        .map(|(addr, len)| unsafe { std::slice::from_raw_parts(addr.cast_const(), len) })
        .collect())
}

fn check_size(size: usize) -> Result<()> {
    if size == 0 || size % PAGE_SIZE != 0 {
        return Err(Error::InvalidConfig(format!(
            "guest memory region size {size} is not a positive multiple of {PAGE_SIZE}"
        )));
    }
    Ok(())
}

fn guest_region(
    mapping: MmapRegion<AtomicBitmap>,
    start: GuestAddress,
) -> Result<GuestRegionMmap<AtomicBitmap>> {
    GuestRegionMmap::new(mapping, start).ok_or_else(|| {
        Error::Memory(format!(
            "region at {:#x} does not fit the guest address space",
            start.0
        ))
    })
}

fn from_regions(regions: Vec<GuestRegionMmap<AtomicBitmap>>) -> Result<GuestMemory> {
    GuestMemory::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    const HIGH: u64 = 1 << 32;

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
        assert!(create_anonymous(100).is_err());
    }

    #[test]
    fn several_regions_leave_a_gap() {
        let regions = [
            (GuestAddress(0), 4 * PAGE_SIZE),
            (GuestAddress(HIGH), 2 * PAGE_SIZE),
        ];
        let mem = create_anonymous_regions(&regions).unwrap();
        assert_eq!(size_of(&mem), 6 * PAGE_SIZE as u64);
        assert_eq!(layout(&mem), regions);
        assert!(mem.address_in_range(GuestAddress(HIGH)));
        assert!(!mem.address_in_range(GuestAddress(4 * PAGE_SIZE as u64)));
        assert!(create_anonymous_regions(&[(GuestAddress(0), 100)]).is_err());
    }

    #[test]
    fn the_host_sees_every_region_in_flat_order() {
        let mem = create_anonymous_regions(&[
            (GuestAddress(0), 2 * PAGE_SIZE),
            (GuestAddress(HIGH), 3 * PAGE_SIZE),
        ])
        .unwrap();
        mem.write_obj(0x11u8, GuestAddress(PAGE_SIZE as u64))
            .unwrap();
        mem.write_obj(0x22u8, GuestAddress(HIGH + 5)).unwrap();
        let ranges = host_ranges(&mem).unwrap();
        assert_eq!(
            ranges.iter().map(|&(_, len)| len).collect::<Vec<_>>(),
            [2 * PAGE_SIZE, 3 * PAGE_SIZE]
        );
        assert_eq!(
            ranges[1].0,
            mem.get_host_address(GuestAddress(HIGH)).unwrap()
        );
        // SAFETY: nothing writes the memory while the slices are alive.
        let slices = unsafe { host_slices(&mem) }.unwrap();
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[0][PAGE_SIZE], 0x11);
        assert_eq!(slices[1][5], 0x22);
        let flat: Vec<u8> = slices.concat();
        assert_eq!(flat.len(), 5 * PAGE_SIZE);
        assert_eq!(flat[2 * PAGE_SIZE + 5], 0x22);
    }

    #[test]
    fn multi_region_memory_is_placed_for_huge_pages() {
        // Placement is best effort (another thread may map memory in between), so ask for
        // several and expect most to be aligned.
        let memories: Vec<_> = (0..4)
            .map(|_| create_anonymous_regions(&[(GuestAddress(0), 64 << 20)]).unwrap())
            .collect();
        let aligned = memories
            .iter()
            .filter(|m| {
                let host = m.get_host_address(GuestAddress(0)).unwrap() as usize;
                host % HUGE_PAGE_SIZE == 0
            })
            .count();
        assert!(aligned >= 2, "{aligned} of 4 regions 2 MiB-aligned");
        for m in &memories {
            m.write_obj(0xabcdu32, GuestAddress((64 << 20) - 4))
                .unwrap();
            assert_eq!(
                m.read_obj::<u32>(GuestAddress((64 << 20) - 4)).unwrap(),
                0xabcd
            );
        }
    }
}
