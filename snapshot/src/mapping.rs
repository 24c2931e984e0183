//! Zero-copy, copy-on-write restore of a memory chain over caller-owned mappings.
//!
//! The caller maps the base layer file `MAP_PRIVATE`, read-write, as its guest
//! memory: one host range per memory region, region `i` mapped from the base
//! file at its flat offset (see the crate docs). [`overlay_layers`] then maps
//! every run owned by a newer layer over those ranges with
//! `MAP_PRIVATE | MAP_FIXED`, at the same flat offset of that layer's file; a
//! run crossing from one range into the next is split in two. Pages are
//! faulted in from the page cache on first touch; guest writes copy the page
//! privately and never reach the files.
//!
//! Overlay mappings are bounded by [`MAX_OVERLAY_MAPPINGS`] (each one is a
//! kernel VMA, and a process has `vm.max_map_count`, 65530 by default). When a
//! chain needs more, the largest runs are mapped and the remaining (smallest)
//! runs are copied into the private mapping with `pread` instead, which
//! allocates anonymous copies of those pages up front.
//!
//! Layer files must not be modified while mapped: pages of a `MAP_PRIVATE`
//! mapping that were never written may reflect later changes to the file.

use std::os::fd::AsRawFd;
use std::path::Path;

use crate::chain::{restore_plan, LayerFiles, MemoryChain};
use crate::error::{Error, Result};
use crate::flat::{FlatLayout, Piece};
use crate::memory;
use crate::PAGE_SIZE;

/// Default for the `max_overlays` argument of [`overlay_layers`]; further runs are copied.
pub const MAX_OVERLAY_MAPPINGS: usize = 4096;

/// What [`overlay_layers`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverlayStats {
    /// Runs mapped over the base with `MAP_FIXED`.
    pub overlays: usize,
    /// Runs copied in with `pread` (past the overlay limit).
    pub copied_runs: usize,
}

/// One piece of a newer layer's run, inside one host range.
struct Overlay<'a> {
    layer_index: usize,
    file_name: &'a str,
    piece: Piece,
}

/// Lays the newer layers of `chain` (files in `dir`) over the caller's mapping of its base
/// layer: the largest `max_overlays` pieces are mapped `MAP_PRIVATE | MAP_FIXED` at their
/// offsets, the rest copied in with `pread`.
///
/// `ranges` are the host ranges `(address, length)` holding guest memory, in flat order
/// (region 0 first); each is page aligned and a whole number of pages long, and together
/// they are `chain.mem_size` bytes (both checked). For the result to be the chain's memory,
/// each range must already hold the base layer's bytes at its flat offsets (typically a
/// `MAP_PRIVATE` mapping of the base file at that file offset); overlays replace pages
/// of those mappings only.
///
/// # Safety
/// Every range must be one private, writable mapping owned by the caller, no two may
/// overlap, and no one may access them during the call.
pub unsafe fn overlay_layers(
    ranges: &[(*mut u8, usize)],
    dir: &Path,
    chain: &MemoryChain,
    max_overlays: usize,
) -> Result<OverlayStats> {
    let layout = FlatLayout::new(ranges.iter().map(|&(_, len)| len as u64))?;
    if layout.len() != chain.mem_size {
        return Err(Error::invalid(format!(
            "mappings of {} bytes for a chain of {} bytes",
            layout.len(),
            chain.mem_size
        )));
    }
    if let Some(index) = ranges
        .iter()
        .position(|&(addr, _)| addr as usize % PAGE_SIZE as usize != 0)
    {
        return Err(Error::invalid(format!(
            "memory region {index} is not page aligned"
        )));
    }
    let plan = restore_plan(chain)?;
    let mut overlays = Vec::new();
    for run in plan.iter().filter(|r| r.layer_index > 0) {
        for piece in layout.pieces(run.offset, run.len)? {
            overlays.push(Overlay {
                layer_index: run.layer_index,
                file_name: &run.file_name,
                piece,
            });
        }
    }
    let map_limit = if host_page_is_4k() { max_overlays } else { 0 };
    let (to_map, to_copy) = split_by_size(overlays, map_limit);
    let mut files = LayerFiles::new(dir, chain.mem_size);
    let mut stats = OverlayStats::default();
    for overlay in &to_map {
        let piece = overlay.piece;
        let (file, _) = files.get(overlay.layer_index, overlay.file_name)?;
        let offset = libc::off_t::try_from(piece.flat_offset)
            .map_err(|_| Error::invalid("overlay offset too large"))?;
        // SAFETY: the piece lies inside range `piece.region` (FlatLayout cut it from the
        // ranges' lengths), which the caller owns exclusively, so the target is part of
        // the caller's mapping; the layer file is mem_size bytes long (checked when
        // opened), so the file range is fully backed.
        let raw = unsafe {
            libc::mmap(
                target(ranges, &piece).cast(),
                piece.len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                offset,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::last_os("mmap(MAP_FIXED)"));
        }
        stats.overlays += 1;
    }
    for overlay in &to_copy {
        let piece = overlay.piece;
        let (file, path) = files.get(overlay.layer_index, overlay.file_name)?;
        // SAFETY: the piece lies inside range `piece.region` (as above), which nobody else
        // accesses during this call.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(target(ranges, &piece), piece.len as usize) };
        memory::read_exact_at(file, path, dst, piece.flat_offset)?;
        stats.copied_runs += 1;
    }
    tracing::debug!(dir = %dir.display(), ?stats, "overlaid memory layers");
    Ok(stats)
}

/// Host address of `piece`, inside its range.
fn target(ranges: &[(*mut u8, usize)], piece: &Piece) -> *mut u8 {
    let (addr, _) = ranges[piece.region];
    // The offset is inside the range (FlatLayout), so this stays in one allocation.
    addr.wrapping_add(piece.region_offset as usize)
}

/// Splits overlay pieces into (mapped, copied): the `limit` largest are mapped.
fn split_by_size(
    mut overlays: Vec<Overlay<'_>>,
    limit: usize,
) -> (Vec<Overlay<'_>>, Vec<Overlay<'_>>) {
    if overlays.len() <= limit {
        return (overlays, Vec::new());
    }
    // Largest first; ties by offset for determinism.
    overlays.sort_unstable_by(|a, b| {
        b.piece
            .len
            .cmp(&a.piece.len)
            .then(a.piece.flat_offset.cmp(&b.piece.flat_offset))
    });
    let copied = overlays.split_off(limit);
    (overlays, copied)
}

/// Whether the host page size equals [`PAGE_SIZE`] (required for 4 KiB overlays).
fn host_page_is_4k() -> bool {
    // SAFETY: sysconf has no memory-safety preconditions.
    let sz = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    sz == PAGE_SIZE as libc::c_long
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::PageBitmap;
    use crate::chain::LayerDesc;
    use crate::memory::{write_layer, WriteOptions};

    /// Builds a 3-layer chain over 64 pages and returns it with the expected bytes.
    fn build(dir: &Path, fragmented: bool) -> (MemoryChain, Vec<u8>) {
        let pages = 64u64;
        let size = (pages * PAGE_SIZE) as usize;
        let mut chain = MemoryChain::new(pages * PAGE_SIZE);
        let mut expected = vec![0u8; size];
        for layer in 0..3u8 {
            let mut bm = PageBitmap::new(pages);
            for p in 0..pages {
                let pick = match layer {
                    0 => p < 60,
                    1 if fragmented => p % 2 == 0,
                    1 => (10..30).contains(&p),
                    _ => p % 7 == 3 || p == 62,
                };
                if pick {
                    bm.set(p).unwrap();
                }
            }
            let mem: Vec<u8> = (0..size)
                .map(|i| (i as u8).wrapping_add(layer * 50 + 1))
                .collect();
            let name = format!("g{layer}.layer");
            write_layer(&dir.join(&name), &[&mem], &bm, &WriteOptions::default()).unwrap();
            for (f, n) in bm.runs() {
                let r = (f * PAGE_SIZE) as usize..((f + n) * PAGE_SIZE) as usize;
                expected[r.clone()].copy_from_slice(&mem[r]);
            }
            chain
                .push_layer(LayerDesc {
                    file_name: name,
                    pages: bm,
                })
                .unwrap();
        }
        (chain, expected)
    }

    /// The base layer mapped privately as separate ranges of `split` pages, then `pages - split`.
    struct Mapped {
        ranges: Vec<(*mut u8, usize)>,
    }

    impl Mapped {
        fn base(dir: &Path, chain: &MemoryChain, split: u64) -> Self {
            let file = std::fs::File::open(dir.join(&chain.layers[0].file_name)).unwrap();
            let lens = [split, chain.page_count() - split];
            let mut offset = 0;
            let mut ranges = Vec::new();
            for pages in lens {
                let len = (pages * PAGE_SIZE) as usize;
                // SAFETY: a fresh private mapping of a file long enough for it, checked below.
                let addr = unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        len,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE,
                        file.as_raw_fd(),
                        offset as libc::off_t,
                    )
                };
                assert_ne!(addr, libc::MAP_FAILED);
                ranges.push((addr.cast::<u8>(), len));
                offset += len;
            }
            Mapped { ranges }
        }

        fn bytes(&self) -> Vec<u8> {
            self.ranges
                .iter()
                // SAFETY: each range is a live mapping owned by `self`.
                .flat_map(|&(a, l)| unsafe { std::slice::from_raw_parts(a, l) }.to_vec())
                .collect()
        }
    }

    impl Drop for Mapped {
        fn drop(&mut self) {
            for &(addr, len) in &self.ranges {
                // SAFETY: unmapping a range mapped in `base`, once.
                unsafe { libc::munmap(addr.cast(), len) };
            }
        }
    }

    #[test]
    fn overlays_over_two_ranges_match_and_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, expected) = build(dir.path(), false);
        let before: Vec<Vec<u8>> = chain
            .layers
            .iter()
            .map(|l| std::fs::read(dir.path().join(&l.file_name)).unwrap())
            .collect();
        // Layer 1's run 10..30 crosses the boundary at page 24.
        let m = Mapped::base(dir.path(), &chain, 24);
        // SAFETY: the ranges are private mappings owned by `m`, used by nobody else.
        let stats =
            unsafe { overlay_layers(&m.ranges, dir.path(), &chain, MAX_OVERLAY_MAPPINGS) }.unwrap();
        assert!(stats.overlays > 0);
        assert_eq!(stats.copied_runs, 0);
        assert!(m.bytes() == expected);

        for &(addr, len) in &m.ranges {
            // SAFETY: writes into our own private mappings.
            unsafe { std::ptr::write_bytes(addr, 0xEE, len) };
        }
        drop(m);
        for (l, old) in chain.layers.iter().zip(&before) {
            assert_eq!(&std::fs::read(dir.path().join(&l.file_name)).unwrap(), old);
        }
    }

    #[test]
    fn overlay_limit_falls_back_to_copying() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, expected) = build(dir.path(), true);
        for limit in [0usize, 3, usize::MAX] {
            let m = Mapped::base(dir.path(), &chain, 33);
            // SAFETY: as above.
            let stats = unsafe { overlay_layers(&m.ranges, dir.path(), &chain, limit) }.unwrap();
            assert!(stats.overlays <= limit);
            if limit == 0 {
                assert_eq!(stats.overlays, 0);
                assert!(stats.copied_runs > 0);
            }
            assert!(m.bytes() == expected, "limit {limit}");
        }
    }

    #[test]
    fn ranges_that_do_not_fit_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, _) = build(dir.path(), false);
        let m = Mapped::base(dir.path(), &chain, 24);
        let (a, la) = m.ranges[0];
        let (b, lb) = m.ranges[1];
        for ranges in [
            vec![(a, la)],
            vec![(a, la - 1), (b, lb + 1)],
            vec![(a.wrapping_add(1), la), (b, lb)],
        ] {
            // SAFETY: every call is rejected before touching memory; the ranges are ours.
            let err = unsafe { overlay_layers(&ranges, dir.path(), &chain, 1) }.unwrap_err();
            assert!(matches!(err, Error::InvalidMemory { .. }), "{err:?}");
        }
    }

    #[test]
    fn short_layer_file_is_rejected_not_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, _) = build(dir.path(), false);
        let m = Mapped::base(dir.path(), &chain, 24);
        std::fs::write(dir.path().join("g1.layer"), b"short").unwrap();
        // SAFETY: the ranges are private mappings owned by `m`.
        let err = unsafe { overlay_layers(&m.ranges, dir.path(), &chain, 16) }.unwrap_err();
        assert!(matches!(err, Error::InvalidMemory { .. }), "{err:?}");
    }
}
