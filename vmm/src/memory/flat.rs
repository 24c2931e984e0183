//! Flat offsets: guest memory seen as its regions laid end to end in guest-physical order,
//! as a snapshot's memory file stores it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{GuestMemory, PAGE_SIZE};
use crate::error::{Error, Result};

/// Writes `bytes` at flat offset `flat_offset`, through vm-memory's accessors (so the
/// VMM's dirty bitmap, [`super::take_vmm_dirty`], records the pages). The bytes may span
/// regions; the whole range must lie inside the memory.
pub fn write_flat(memory: &GuestMemory, flat_offset: u64, bytes: &[u8]) -> Result<()> {
    let mut done = 0;
    for (addr, len) in guest_chunks(memory, flat_offset, bytes.len())? {
        memory
            .write_slice(&bytes[done..done + len], addr)
            .map_err(|e| Error::Memory(format!("writing at {:#x}: {e}", addr.0)))?;
        done += len;
    }
    Ok(())
}

/// Fills `bytes` from flat offset `flat_offset` (see [`write_flat`]).
pub fn read_flat(memory: &GuestMemory, flat_offset: u64, bytes: &mut [u8]) -> Result<()> {
    let mut done = 0;
    for (addr, len) in guest_chunks(memory, flat_offset, bytes.len())? {
        memory
            .read_slice(&mut bytes[done..done + len], addr)
            .map_err(|e| Error::Memory(format!("reading at {:#x}: {e}", addr.0)))?;
        done += len;
    }
    Ok(())
}

/// Joins per-region page bitmaps (one per region, in flat order, in KVM's dirty-log word
/// format, as [`crate::Vm::take_dirty_pages`] and [`super::take_vmm_dirty`] return them) into
/// one bitmap of flat pages: bit i of word w = flat page 64w + i. Bits past a region's last
/// page are ignored.
pub fn flatten_dirty(memory: &GuestMemory, per_region: &[Vec<u64>]) -> Result<Vec<u64>> {
    let regions: Vec<u64> = memory.iter().map(|r| r.len() / PAGE_SIZE as u64).collect();
    if regions.len() != per_region.len() {
        return Err(Error::InvalidConfig(format!(
            "{} page bitmaps for {} memory regions",
            per_region.len(),
            regions.len()
        )));
    }
    let total: u64 = regions.iter().sum();
    let mut flat = vec![0u64; total.div_ceil(64) as usize];
    let mut first_page = 0u64;
    for (pages, words) in regions.into_iter().zip(per_region) {
        for (w, &word) in words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if page >= pages {
                    break;
                }
                let flat_page = first_page + page;
                flat[(flat_page / 64) as usize] |= 1 << (flat_page % 64);
            }
        }
        first_page += pages;
    }
    Ok(flat)
}

/// The guest-physical pieces, one per region touched, of `len` bytes from flat offset
/// `flat_offset`.
fn guest_chunks(
    memory: &GuestMemory,
    flat_offset: u64,
    len: usize,
) -> Result<Vec<(GuestAddress, usize)>> {
    let out_of_range = || {
        Error::Memory(format!(
            "flat range {flat_offset:#x}+{len:#x} is outside guest memory"
        ))
    };
    let end = flat_offset
        .checked_add(len as u64)
        .ok_or_else(out_of_range)?;
    let mut chunks = Vec::new();
    let mut region_start = 0u64;
    let mut at = flat_offset;
    for region in memory.iter() {
        let region_end = region_start + region.len();
        if at < end && at < region_end {
            let piece = end.min(region_end) - at;
            chunks.push((
                GuestAddress(region.start_addr().0 + (at - region_start)),
                piece as usize,
            ));
            at += piece;
        }
        region_start = region_end;
    }
    if at < end {
        return Err(out_of_range());
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::super::{create_anonymous_regions, take_vmm_dirty};
    use super::*;

    const HIGH: u64 = 1 << 32;
    const PAGE: u64 = PAGE_SIZE as u64;

    /// Two regions: 3 pages at 0, 2 pages at 4 GiB (flat pages 3 and 4).
    fn two_regions() -> GuestMemory {
        create_anonymous_regions(&[
            (GuestAddress(0), 3 * PAGE_SIZE),
            (GuestAddress(HIGH), 2 * PAGE_SIZE),
        ])
        .unwrap()
    }

    #[test]
    fn flat_offsets_continue_into_the_next_region() {
        let mem = two_regions();
        write_flat(&mem, 3 * PAGE + 8, &[1, 2, 3]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(HIGH + 9)).unwrap(), 2);
        let mut back = [0u8; 3];
        read_flat(&mem, 3 * PAGE + 8, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3]);
    }

    #[test]
    fn a_flat_range_may_span_two_regions() {
        let mem = two_regions();
        write_flat(&mem, 3 * PAGE - 2, &[7, 8, 9, 10]).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * PAGE - 1)).unwrap(), 8);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(HIGH)).unwrap(), 9);
        let mut back = [0u8; 4];
        read_flat(&mem, 3 * PAGE - 2, &mut back).unwrap();
        assert_eq!(back, [7, 8, 9, 10]);
    }

    #[test]
    fn flat_writes_are_recorded_in_the_vmm_bitmap() {
        let mem = two_regions();
        take_vmm_dirty(&mem);
        write_flat(&mem, PAGE, &[1]).unwrap();
        write_flat(&mem, 4 * PAGE, &[1; PAGE_SIZE]).unwrap();
        assert_eq!(take_vmm_dirty(&mem), vec![vec![0b10], vec![0b10]]);
    }

    #[test]
    fn flat_ranges_past_the_end_are_refused() {
        let mem = two_regions();
        assert!(write_flat(&mem, 5 * PAGE, &[1]).is_err());
        assert!(write_flat(&mem, 5 * PAGE - 1, &[1, 2]).is_err());
        assert!(write_flat(&mem, u64::MAX, &[1]).is_err());
        assert!(read_flat(&mem, 5 * PAGE - 1, &mut [0u8; 1]).is_ok());
        assert!(write_flat(&mem, 5 * PAGE, &[]).is_ok());
    }

    #[test]
    fn per_region_bitmaps_flatten_to_flat_pages() {
        let mem = two_regions();
        let flat = flatten_dirty(&mem, &[vec![0b101], vec![0b11 | 1 << 40]]).unwrap();
        assert_eq!(
            flat,
            vec![0b11101],
            "region 1's pages follow region 0's three"
        );
        assert!(flatten_dirty(&mem, &[vec![1]]).is_err());

        let mem = create_anonymous_regions(&[
            (GuestAddress(0), 64 * PAGE_SIZE),
            (GuestAddress(HIGH), 65 * PAGE_SIZE),
        ])
        .unwrap();
        let flat = flatten_dirty(&mem, &[vec![1 << 63], vec![1, 1]]).unwrap();
        assert_eq!(flat, vec![1 << 63, 1, 1]);
    }
}
