//! Pages of guest memory that the process owns privately, read from `/proc/self/pagemap`:
//! what a guest without KVM dirty logging has written since its memory was mapped.
//!
//! Anonymous memory is populated only where something wrote it (a read of an untouched page
//! maps the shared zero page, or nothing), and a private file mapping gets a private
//! anonymous copy of a page on its first write. So the pages that are present (or swapped
//! out) and not file pages are exactly those written since the mapping was made: by the
//! guest, by KVM on its behalf (kvmclock, steal time) or by the VMM. Dirty logging would
//! tell the same, but it makes KVM map guest memory in 4 KiB pages, which costs a Linux
//! guest much of its speed; this costs one 8-byte read per page at pause time.
//!
//! Over-reporting is harmless (a page is saved that did not change; a read fault on a huge
//! page maps the whole 2 MiB); under-reporting would lose data, so every page whose state
//! is unclear counts as written. One such case: a page of fresh anonymous memory that was
//! only read maps the shared zero page, which pagemap shows as a present anonymous page
//! like any other; only its "mapped exclusively" bit would tell it apart, and that bit is
//! also clear on a written page while a child the program forked still shares it. So
//! read-only pages of fresh memory count too (a Linux guest reads little it never wrote).

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::{host_ranges, GuestMemory, PAGE_SIZE};
use crate::error::{Error, Result};

/// Page present in memory.
const PM_PRESENT: u64 = 1 << 63;
/// Page swapped out.
const PM_SWAP: u64 = 1 << 62;
/// File page or shared anonymous page.
const PM_FILE: u64 = 1 << 61;
/// Entries read at once (512 KiB of pagemap).
const CHUNK_ENTRIES: usize = 64 * 1024;

/// The pages of `memory` the process holds privately (see the module docs): one vector per
/// region, in flat order, in KVM's dirty-log word format (bit i of word w = page 64w + i of
/// that region), like [`super::take_vmm_dirty`]. Reading changes nothing; call it with
/// every vCPU stopped for a consistent answer.
pub fn private_pages(memory: &GuestMemory) -> Result<Vec<Vec<u64>>> {
    let pagemap = File::open("/proc/self/pagemap").map_err(|e| Error::Os {
        op: "opening /proc/self/pagemap",
        source: e,
    })?;
    host_ranges(memory)?
        .into_iter()
        .map(|(addr, len)| region_pages(&pagemap, addr as usize, len))
        .collect()
}

fn region_pages(pagemap: &File, addr: usize, len: usize) -> Result<Vec<u64>> {
    let pages = len / PAGE_SIZE;
    let first = addr / PAGE_SIZE;
    let mut words = vec![0u64; pages.div_ceil(64)];
    let mut entries = vec![0u8; CHUNK_ENTRIES.min(pages) * 8];
    let mut page = 0;
    while page < pages {
        let n = CHUNK_ENTRIES.min(pages - page);
        let buf = &mut entries[..n * 8];
        pagemap
            .read_exact_at(buf, ((first + page) * 8) as u64)
            .map_err(|e| Error::Os {
                op: "reading /proc/self/pagemap",
                source: e,
            })?;
        for (i, entry) in buf.chunks_exact(8).enumerate() {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(entry);
            if is_private(u64::from_le_bytes(raw)) {
                let at = page + i;
                words[at / 64] |= 1 << (at % 64);
            }
        }
        page += n;
    }
    Ok(words)
}

/// Whether a pagemap entry is a page the process holds privately.
fn is_private(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAP) != 0 && entry & PM_FILE == 0
}

#[cfg(test)]
mod tests {
    use super::super::{create_anonymous_regions, map_private_file, PAGE_SIZE};
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};

    fn pages(words: &[u64]) -> Vec<usize> {
        (0..words.len() * 64)
            .filter(|p| words[p / 64] & (1 << (p % 64)) != 0)
            .collect()
    }

    #[test]
    fn written_anonymous_pages_are_private_and_untouched_ones_are_not() {
        let high = 1u64 << 32;
        let mem = create_anonymous_regions(&[
            (GuestAddress(0), 64 * PAGE_SIZE),
            (GuestAddress(high), 100 * PAGE_SIZE),
        ])
        .unwrap();
        mem.write_obj(1u8, GuestAddress(5 * PAGE_SIZE as u64))
            .unwrap();
        mem.write_obj(1u8, GuestAddress(high + 70 * PAGE_SIZE as u64))
            .unwrap();
        // A read maps the zero page: it may count (see the module docs), never hides one.
        let _: u8 = mem.read_obj(GuestAddress(9 * PAGE_SIZE as u64)).unwrap();
        let words = private_pages(&mem).unwrap();
        assert_eq!(words.len(), 2);
        let low = pages(&words[0]);
        assert!(low == [5] || low == [5, 9], "{low:?}");
        assert_eq!(pages(&words[1]), [70]);
    }

    #[test]
    fn only_copied_pages_of_a_private_file_mapping_are_private() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&vec![7u8; 32 * PAGE_SIZE]).unwrap();
        let mem = map_private_file(file, 32 * PAGE_SIZE).unwrap();
        let _: u8 = mem.read_obj(GuestAddress(2 * PAGE_SIZE as u64)).unwrap();
        mem.write_obj(9u8, GuestAddress(30 * PAGE_SIZE as u64))
            .unwrap();
        assert_eq!(pages(&private_pages(&mem).unwrap()[0]), [30]);
    }
}
