//! Anonymous mappings placed for transparent huge pages.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::MmapRegion;

use crate::error::{Error, Result};

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
pub(super) fn map_huge_page_aligned(size: usize) -> Result<MmapRegion<AtomicBitmap>> {
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
            .map_err(|e| Error::mmap(&format!("mmap of {size} bytes"), e));
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
