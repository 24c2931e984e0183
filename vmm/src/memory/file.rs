//! Guest memory mapped copy-on-write from a flat memory file (a snapshot's base layer).
//!
//! Every function here maps region i from the file at its flat offset (the sum of the
//! lengths of the regions before it), and wants the file to be exactly the memory's total
//! size: a shorter one would fault the host on access past its end.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress};

use super::{check_size, from_regions, guest_region, host_ranges, GuestMemory};
use crate::error::{Error, Result};

/// Maps `file` copy-on-write as `size` bytes of guest RAM at guest-physical 0 (one region):
/// [`map_private_file_regions`] with the layout `[(0, size)]`. An `Arc<File>` shared by many
/// guests costs one descriptor for all of them.
pub fn map_private_file(file: impl Into<Arc<File>>, size: usize) -> Result<GuestMemory> {
    map_private_file_regions(file, &[(GuestAddress(0), size)])
}

/// Maps `file` copy-on-write as guest RAM of the regions `layout` gives (`(guest-physical
/// start, bytes)` each, ascending, as [`super::layout`] returns them), each from its flat
/// offset in the file: `MAP_PRIVATE | MAP_NORESERVE`, so pages are read from the page cache
/// on first touch (shared with every other mapping of the file) and guest writes stay
/// private.
///
/// The file must be exactly as long as the regions together. The regions keep `file` (not a
/// duplicate of its descriptor).
pub fn map_private_file_regions(
    file: impl Into<Arc<File>>,
    layout: &[(GuestAddress, usize)],
) -> Result<GuestMemory> {
    let file = file.into();
    for &(_, size) in layout {
        check_size(size)?;
    }
    let total: usize = layout.iter().map(|&(_, size)| size).sum();
    check_file_len(&file, total)?;
    let mut regions = Vec::with_capacity(layout.len());
    let mut offset = 0u64;
    for &(start, size) in layout {
        let mapping = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| Error::mmap(&format!("mmap of the memory file at {offset:#x}"), e))?;
        regions.push(guest_region(mapping, start)?);
        offset += size as u64;
    }
    from_regions(regions)
}

/// Replaces the contents of every region of guest memory with a copy-on-write mapping of
/// `file` from the region's flat offset (`MAP_PRIVATE | MAP_FIXED | MAP_NORESERVE` over the
/// same host addresses), so a VM whose memory slots are already registered can take on a
/// snapshot's memory without re-registering them. The regions keep ownership: each unmaps
/// its range when dropped. The file must be exactly the memory's total size.
///
/// # Safety
/// No vCPU may have run on this memory (KVM would keep translations of the old pages until
/// its MMU notifier ran, and the guest would see a mix), and nothing may access the memory
/// during the call: in practice, call it on a VM that was just created.
pub unsafe fn replace_with_private_file(memory: &GuestMemory, file: &File) -> Result<()> {
    let ranges = host_ranges(memory)?;
    check_file_len(file, ranges.iter().map(|&(_, len)| len).sum())?;
    let mut offset = 0usize;
    for (addr, len) in ranges {
        let file_offset = libc::off_t::try_from(offset)
            .map_err(|_| Error::Memory(format!("flat offset {offset:#x} is too large")))?;
        // SAFETY: [addr, addr + len) is exactly one region's own mapping (host_ranges), so
        // MAP_FIXED replaces only pages this region owns; the caller guarantees nothing uses
        // them meanwhile; the file covers [offset, offset + len) (its length was checked
        // above), so no access can fault past its end.
        let mapped = unsafe {
            libc::mmap(
                addr.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                file_offset,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(Error::Memory(format!(
                "mapping the memory file at {offset:#x}: {}",
                std::io::Error::last_os_error()
            )));
        }
        offset += len;
    }
    Ok(())
}

/// Fails unless `file` is exactly `expected` bytes long.
fn check_file_len(file: &File, expected: usize) -> Result<()> {
    let len = file
        .metadata()
        .map_err(|e| Error::Memory(format!("reading the memory file's length: {e}")))?
        .len();
    if len != expected as u64 {
        return Err(Error::Memory(format!(
            "memory file is {len} bytes, guest memory {expected}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{create_anonymous, create_anonymous_regions, layout, PAGE_SIZE};
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    const HIGH: u64 = 1 << 32;

    /// A file of `pages` pages, page i filled with byte i + 1.
    fn numbered_file(pages: usize) -> File {
        let mut file = tempfile::tempfile().unwrap();
        for page in 0..pages {
            file.write_all(&vec![page as u8 + 1; PAGE_SIZE]).unwrap();
        }
        file
    }

    fn byte_at(mem: &GuestMemory, addr: u64) -> u8 {
        mem.read_obj::<u8>(GuestAddress(addr)).unwrap()
    }

    #[test]
    fn private_file_mappings_are_copy_on_write() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 4 * PAGE_SIZE]).unwrap();
        let mem = map_private_file(file.try_clone().unwrap(), 4 * PAGE_SIZE).unwrap();
        assert_eq!(byte_at(&mem, 5), 7);
        mem.write_obj(9u8, GuestAddress(5)).unwrap();
        assert_eq!(byte_at(&mem, 5), 9);
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
    fn each_region_maps_the_file_at_its_flat_offset() {
        let regions = [
            (GuestAddress(0), 3 * PAGE_SIZE),
            (GuestAddress(HIGH), 2 * PAGE_SIZE),
        ];
        let mem = map_private_file_regions(numbered_file(5), &regions).unwrap();
        assert_eq!(layout(&mem), regions);
        assert_eq!(byte_at(&mem, 0), 1);
        assert_eq!(byte_at(&mem, 2 * PAGE_SIZE as u64), 3);
        assert_eq!(
            byte_at(&mem, HIGH),
            4,
            "flat page 3 is the high region's first"
        );
        assert_eq!(byte_at(&mem, HIGH + PAGE_SIZE as u64 + 9), 5);
        assert!(map_private_file_regions(numbered_file(4), &regions).is_err());
        assert!(map_private_file_regions(numbered_file(6), &regions).is_err());
    }

    #[test]
    fn anonymous_memory_can_take_on_a_file() {
        let mem = create_anonymous(4 * PAGE_SIZE).unwrap();
        mem.write_obj(1u8, GuestAddress(0)).unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![3u8; 4 * PAGE_SIZE]).unwrap();
        // SAFETY: no vCPU exists for this memory and nothing else uses it.
        unsafe { replace_with_private_file(&mem, &file) }.unwrap();
        assert_eq!(byte_at(&mem, 0), 3);
        assert_eq!(byte_at(&mem, 3 * PAGE_SIZE as u64), 3);
        let short = tempfile::tempfile().unwrap();
        // SAFETY: as above.
        assert!(unsafe { replace_with_private_file(&mem, &short) }.is_err());
    }

    #[test]
    fn every_region_takes_on_its_part_of_the_file() {
        let mem = create_anonymous_regions(&[
            (GuestAddress(0), 2 * PAGE_SIZE),
            (GuestAddress(HIGH), 3 * PAGE_SIZE),
        ])
        .unwrap();
        mem.write_obj(0xeeu8, GuestAddress(HIGH)).unwrap();
        // SAFETY: no vCPU exists for this memory and nothing else uses it.
        unsafe { replace_with_private_file(&mem, &numbered_file(5)) }.unwrap();
        assert_eq!(byte_at(&mem, 0), 1);
        assert_eq!(byte_at(&mem, PAGE_SIZE as u64), 2);
        assert_eq!(byte_at(&mem, HIGH), 3);
        assert_eq!(byte_at(&mem, HIGH + 2 * PAGE_SIZE as u64), 5);
        // Writes stay private to the mapping.
        mem.write_obj(0xaau8, GuestAddress(HIGH)).unwrap();
        assert_eq!(byte_at(&mem, HIGH), 0xaa);
        // SAFETY: as above.
        assert!(unsafe { replace_with_private_file(&mem, &numbered_file(4)) }.is_err());
    }
}
