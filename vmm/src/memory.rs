//! Guest RAM: reserved address space, populated only where the guest or the VMM touches it.

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
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

/// Creates anonymous guest RAM made of several regions, `(guest-physical start, bytes)` each
/// (for a guest whose RAM continues above a 32-bit MMIO gap), mapped as [`create_anonymous`]
/// does and meant for guests that use all of their RAM (Linux): each region is placed at a
/// host address aligned to [`HUGE_PAGE_SIZE`] when the host allows it, and advised
/// `MADV_HUGEPAGE`. KVM backs a guest 2 MiB frame with one huge-page entry of its own page
/// tables only when the guest-physical and host addresses agree modulo 2 MiB; then one fault
/// and one TLB entry cover 2 MiB, which matters most under nested virtualization, where
/// every such fault is an exit. The cost is resident memory in 2 MiB steps. The functions of
/// this module that take "the region" ([`host_range`], [`take_vmm_dirty`],
/// [`replace_with_private_file`]) see only the first one.
pub fn create_anonymous_regions(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemory> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, size) in ranges {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(Error::InvalidConfig(format!(
                "guest memory region size {size} is not a positive multiple of {PAGE_SIZE}"
            )));
        }
        let mapping = map_huge_page_aligned(size)?;
        regions.push(GuestRegionMmap::new(mapping, start).ok_or_else(|| {
            Error::Memory(format!(
                "region at {:#x} does not fit the guest address space",
                start.0
            ))
        })?);
    }
    GuestMemory::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))
}

/// Size of a transparent huge page (x86-64 PMD).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// An anonymous mapping of `size` bytes, at a 2 MiB-aligned address when the kernel's
/// placement allows it, advised for transparent huge pages.
///
/// `vm-memory` owns (and unmaps) only mappings it made itself, at an address of the kernel's
/// choosing; so this reserves `size` + 2 MiB, frees that reservation from its start up to the
/// end of the first aligned `size`-byte block, and lets the kernel place the real mapping:
/// its top-down search puts it at the top of the highest gap that fits, which is that
/// block. Another thread mapping memory in between, or a bottom-up layout, only costs the
/// alignment; the result is checked and logged, never wrong.
fn map_huge_page_aligned(size: usize) -> Result<MmapRegion<AtomicBitmap>> {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let reserve_len = size + HUGE_PAGE_SIZE;
    // SAFETY: a new PROT_NONE anonymous mapping at an address the kernel chooses; it touches
    // no existing memory.
    let reserved = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            reserve_len,
            libc::PROT_NONE,
            flags,
            -1,
            0,
        )
    };
    if reserved == libc::MAP_FAILED {
        return Err(Error::Memory(format!(
            "reserving {reserve_len} bytes: {}",
            std::io::Error::last_os_error()
        )));
    }
    let base = reserved as usize;
    let aligned = base.next_multiple_of(HUGE_PAGE_SIZE);
    // SAFETY: [base, aligned + size) lies inside the reservation made above, which nothing
    // else uses.
    unsafe { libc::munmap(reserved, aligned + size - base) };
    let built =
        MmapRegion::<AtomicBitmap>::build(None, size, libc::PROT_READ | libc::PROT_WRITE, flags)
            .map_err(|e| Error::Memory(format!("mmap of {size} bytes: {e}")));
    // SAFETY: the rest of the reservation, [aligned + size, base + reserve_len), is still
    // ours: the mapping just made does not overlap it (the kernel never places a new
    // mapping over an existing one without MAP_FIXED).
    unsafe {
        libc::munmap(
            (aligned + size) as *mut libc::c_void,
            base + reserve_len - (aligned + size),
        )
    };
    let region = built?;
    if region.as_ptr() as usize % HUGE_PAGE_SIZE != 0 {
        tracing::debug!(
            size,
            "guest memory is not 2 MiB-aligned; KVM will use 4 KiB pages"
        );
    }
    // SAFETY: advice on the region's own mapping; it changes how pages are backed, never
    // their contents.
    unsafe {
        libc::madvise(region.as_ptr().cast(), size, libc::MADV_HUGEPAGE);
    }
    Ok(region)
}

/// Maps `file` copy-on-write as `size` bytes of guest RAM at guest-physical 0:
/// `MAP_PRIVATE | MAP_NORESERVE`, so pages are read from the page cache on first touch
/// (shared with every other mapping of the file) and guest writes stay private.
///
/// The file must be exactly `size` bytes long: a shorter one would fault the host on access.
pub fn map_private_file(file: std::fs::File, size: usize) -> Result<GuestMemory> {
    let len = file
        .metadata()
        .map_err(|e| Error::Memory(format!("reading the memory file's length: {e}")))?
        .len();
    if len != size as u64 || size == 0 || size % PAGE_SIZE != 0 {
        return Err(Error::Memory(format!(
            "memory file is {len} bytes, expected {size} (a positive multiple of {PAGE_SIZE})"
        )));
    }
    let region =
        vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(vm_memory::FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| Error::Memory(format!("mmap of the memory file: {e}")))?;
    from_region(region)
}

/// Replaces the contents of guest memory's single region with a copy-on-write mapping of
/// `file` (`MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE` over the same host addresses), so a VM
/// whose memory slot is already registered can take on a snapshot's memory without
/// re-registering the slot. The region keeps ownership: it unmaps the range when dropped.
///
/// # Safety
/// No vCPU may have run on this memory (KVM would keep translations of the old pages until
/// its MMU notifier ran, and the guest would see a mix), and nothing may access the region
/// during the call: in practice, call it on a VM that was just created.
pub unsafe fn replace_with_private_file(memory: &GuestMemory, file: &std::fs::File) -> Result<()> {
    use std::os::unix::io::AsRawFd;
    let (addr, len) = host_range(memory)?;
    let file_len = file
        .metadata()
        .map_err(|e| Error::Memory(format!("reading the memory file's length: {e}")))?
        .len();
    if file_len != len as u64 {
        return Err(Error::Memory(format!(
            "memory file is {file_len} bytes, guest memory {len}"
        )));
    }
    // SAFETY: [addr, addr + len) is exactly the region's own mapping (host_range), so
    // MAP_FIXED replaces only pages this region owns; the caller guarantees nothing uses them
    // meanwhile; the file covers the whole length (checked above), so no access can fault
    // past its end.
    let mapped = unsafe {
        libc::mmap(
            addr.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
            file.as_raw_fd(),
            0,
        )
    };
    if mapped == libc::MAP_FAILED {
        return Err(Error::Memory(format!(
            "mapping the memory file: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Host address and length of guest memory's first region.
pub fn host_range(memory: &GuestMemory) -> Result<(*mut u8, usize)> {
    use vm_memory::GuestMemoryBackend;
    let region = memory
        .iter()
        .next()
        .ok_or_else(|| Error::Memory("guest memory has no region".into()))?;
    let addr = region
        .get_host_address(vm_memory::MemoryRegionAddress(0))
        .map_err(|e| Error::Memory(e.to_string()))?;
    Ok((addr, region.len() as usize))
}

/// Takes (and clears) the bitmap of pages the VMM wrote through `memory`'s accessors, in
/// KVM's dirty-log word format (bit i of word w = page 64w + i).
pub fn take_vmm_dirty(memory: &GuestMemory) -> Vec<u64> {
    use vm_memory::GuestMemoryBackend;
    memory
        .iter()
        .next()
        .map(|region| region.bitmap_words())
        .unwrap_or_default()
}

trait BitmapWords {
    fn bitmap_words(&self) -> Vec<u64>;
}

impl BitmapWords for GuestRegionMmap<AtomicBitmap> {
    fn bitmap_words(&self) -> Vec<u64> {
        use std::ops::Deref;
        self.deref().bitmap().get_and_reset()
    }
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
    fn vmm_writes_are_tracked_and_cleared() {
        let mem = create_anonymous(256 * PAGE_SIZE).unwrap();
        mem.write_obj(1u8, GuestAddress(3 * PAGE_SIZE as u64))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(130 * PAGE_SIZE as u64))
            .unwrap();
        let words = take_vmm_dirty(&mem);
        assert_eq!(words.len(), 4);
        assert_eq!(words[0], 1 << 3);
        assert_eq!(words[2], 1 << 2);
        assert!(take_vmm_dirty(&mem).iter().all(|w| *w == 0));
    }

    #[test]
    fn private_file_mappings_are_copy_on_write() {
        use std::io::Write;
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 4 * PAGE_SIZE]).unwrap();
        let mem = map_private_file(file.try_clone().unwrap(), 4 * PAGE_SIZE).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(5)).unwrap(), 7);
        mem.write_obj(9u8, GuestAddress(5)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(5)).unwrap(), 9);
        let mut byte = [0u8; 1];
        use std::os::unix::fs::FileExt;
        file.read_exact_at(&mut byte, 5).unwrap();
        assert_eq!(byte, [7], "the file is untouched");
        assert!(
            map_private_file(file, 8 * PAGE_SIZE).is_err(),
            "length must match"
        );
    }

    #[test]
    fn anonymous_memory_can_take_on_a_file() {
        use std::io::Write;
        let mem = create_anonymous(4 * PAGE_SIZE).unwrap();
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![3u8; 4 * PAGE_SIZE]).unwrap();
        // SAFETY: no vCPU exists for this memory and nothing else uses it.
        unsafe { replace_with_private_file(&mem, &file) }.unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 3);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(3 * PAGE_SIZE as u64))
                .unwrap(),
            3
        );
        let short = tempfile::tempfile().unwrap();
        // SAFETY: as above.
        assert!(unsafe { replace_with_private_file(&mem, &short) }.is_err());
    }

    #[test]
    fn several_regions_leave_a_gap() {
        let mem = create_anonymous_regions(&[
            (GuestAddress(0), 4 * PAGE_SIZE),
            (GuestAddress(1 << 32), 2 * PAGE_SIZE),
        ])
        .unwrap();
        assert_eq!(size_of(&mem), 6 * PAGE_SIZE as u64);
        assert!(mem.address_in_range(GuestAddress(1 << 32)));
        assert!(!mem.address_in_range(GuestAddress(4 * PAGE_SIZE as u64)));
        assert!(create_anonymous_regions(&[(GuestAddress(0), 100)]).is_err());
    }

    #[test]
    fn multi_region_memory_is_placed_for_huge_pages() {
        use vm_memory::GuestMemoryBackend;
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
