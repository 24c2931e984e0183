//! Zero-copy, copy-on-write restore of a memory chain.
//!
//! [`PrivateMapping::map_chain`] maps the base layer file whole with
//! `MAP_PRIVATE | MAP_NORESERVE`, read-write, then overlays every run owned by
//! a newer layer (see [`restore_plan`]) by mapping that layer's file at the
//! same offset with `MAP_PRIVATE | MAP_FIXED`. Pages are faulted in from the
//! page cache on first touch; guest writes copy the page privately and never
//! reach the files.
//!
//! Overlay mappings are bounded by [`MAX_OVERLAY_MAPPINGS`] (each one is a
//! kernel VMA, and a process has `vm.max_map_count`, 65530 by default). When a
//! chain needs more, the largest runs are mapped and the remaining (smallest)
//! runs are copied into the private mapping with `pread` instead, which
//! allocates anonymous copies of those pages up front.
//!
//! Layer files must not be modified while mapped: pages of a `MAP_PRIVATE`
//! mapping that were never written may reflect later changes to the file.

use std::path::Path;
use std::ptr::NonNull;

use crate::chain::{restore_plan, LayerFiles, MapRun, MemoryChain};
use crate::error::{Error, Result};
use crate::memory;
use crate::PAGE_SIZE;
use std::os::fd::AsRawFd;

/// Most overlay `mmap`s [`PrivateMapping::map_chain`] creates; further runs are copied.
pub const MAX_OVERLAY_MAPPINGS: usize = 4096;

/// A private, writable mapping of a restored memory chain; unmapped on drop.
///
/// The address stays valid and fixed until the value is dropped, so it can
/// be handed to e.g. vm-memory's `MmapRegion::build_raw`, which must not
/// outlive it.
#[derive(Debug)]
pub struct PrivateMapping {
    ptr: NonNull<u8>,
    len: usize,
    overlays: usize,
    copied_runs: usize,
}

// SAFETY: the mapping is plain process memory exclusively owned by this value;
// the safe API hands out `&[u8]` only through `&self` and `&mut [u8]` only
// through `&mut self`, so Rust's aliasing rules carry over across threads.
unsafe impl Send for PrivateMapping {}
// SAFETY: see `Send`; shared access is read-only.
unsafe impl Sync for PrivateMapping {}

impl PrivateMapping {
    /// Maps the memory described by `chain` (layer files in `dir`), copy-on-write.
    pub fn map_chain(dir: &Path, chain: &MemoryChain) -> Result<Self> {
        Self::map_chain_with_limit(dir, chain, MAX_OVERLAY_MAPPINGS)
    }

    /// [`map_chain`](Self::map_chain) with an explicit cap on overlay
    /// mappings (`0` copies every overlay run).
    pub fn map_chain_with_limit(
        dir: &Path,
        chain: &MemoryChain,
        max_overlays: usize,
    ) -> Result<Self> {
        chain.validate()?;
        let Some(base) = chain.layers.first() else {
            return Err(Error::invalid("memory chain has no layers"));
        };
        let len = usize::try_from(chain.mem_size)
            .map_err(|_| Error::invalid("memory size exceeds the address space"))?;
        let mut files = LayerFiles::new(dir, chain.mem_size);

        let (base_file, _) = files.get(0, &base.file_name)?;
        // SAFETY: a fresh mapping (no MAP_FIXED) of a file whose length we
        // checked equals `len`, so every page is backed; the result is checked
        // for MAP_FAILED before use.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                base_file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(Error::last_os("mmap"));
        }
        let Some(ptr) = NonNull::new(raw.cast::<u8>()) else {
            return Err(Error::invalid("mmap returned null"));
        };
        // From here on, Drop unmaps on every error path.
        let mut mapping = PrivateMapping {
            ptr,
            len,
            overlays: 0,
            copied_runs: 0,
        };
        // SAFETY: the whole range is the private mapping created just above, owned by
        // `mapping` and not yet shared with anyone.
        let stats = unsafe { overlay_layers(ptr.as_ptr(), len, dir, chain, max_overlays)? };
        mapping.overlays = stats.overlays;
        mapping.copied_runs = stats.copied_runs;
        Ok(mapping)
    }

    /// Start address of the mapping (valid until `self` is dropped).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes (= guest memory size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the mapping is empty (never true for a mapped chain).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of overlay `mmap`s applied over the base mapping.
    pub fn overlay_count(&self) -> usize {
        self.overlays
    }

    /// Number of overlay runs that were copied with `pread` instead of mapped.
    pub fn copied_run_count(&self) -> usize {
        self.copied_runs
    }

    /// The memory as a byte slice.
    ///
    /// Anyone writing through [`as_ptr`](Self::as_ptr) while this borrow lives
    /// breaks Rust's aliasing rules; that requires `unsafe` on their side.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live, readable mapping owned by self for
        // at least the lifetime of the borrow.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The memory as a mutable byte slice (writes stay private to this process).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as for `as_slice`, and `&mut self` guarantees exclusivity
        // within safe code; the mapping is PROT_WRITE.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PrivateMapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe exactly the region mapped in map_chain
        // (overlays replaced sub-ranges of it), unmapped only here, once.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::error!(error = %std::io::Error::last_os_error(), "munmap failed");
        }
    }
}

/// What [`overlay_layers`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverlayStats {
    /// Runs mapped over the base with `MAP_FIXED`.
    pub overlays: usize,
    /// Runs copied in with `pread` (past the overlay limit).
    pub copied_runs: usize,
}

/// Lays the newer layers of `chain` (files in `dir`) over an existing mapping of its base
/// layer at `addr`: the largest `max_overlays` runs are mapped `MAP_PRIVATE | MAP_FIXED` at
/// their offsets, the rest copied in with `pread`.
///
/// This lets a caller own the base mapping (for instance a vm-memory region mapped
/// `MAP_PRIVATE` from the base file, unmapped when the region drops).
///
/// # Safety
/// `[addr, addr + len)` must be one private, writable mapping owned by the caller, `len`
/// must equal `chain.mem_size`, and no one may access the range during the call. Overlays
/// replace pages of that mapping only.
pub unsafe fn overlay_layers(
    addr: *mut u8,
    len: usize,
    dir: &Path,
    chain: &MemoryChain,
    max_overlays: usize,
) -> Result<OverlayStats> {
    if len as u64 != chain.mem_size {
        return Err(Error::invalid(
            "mapping length differs from the chain's memory size",
        ));
    }
    let plan = restore_plan(chain)?;
    let mut files = LayerFiles::new(dir, chain.mem_size);
    let overlays: Vec<&MapRun> = plan.iter().filter(|r| r.layer_index > 0).collect();
    let map_limit = if host_page_is_4k() { max_overlays } else { 0 };
    let (to_map, to_copy) = split_by_size(overlays, map_limit);
    let mut stats = OverlayStats::default();
    for run in to_map {
        let (file, _) = files.get(run.layer_index, &run.file_name)?;
        let offset = libc::off_t::try_from(run.offset)
            .map_err(|_| Error::invalid("overlay offset too large"))?;
        // The plan's runs lie inside [0, mem_size) and are page aligned (restore_plan
        // validates the chain), and mem_size == len.
        // SAFETY: the target range is inside the caller's mapping (see above) which the
        // caller owns exclusively; the layer file is mem_size bytes long (checked when
        // opened), so the file range is fully backed.
        let raw = unsafe {
            libc::mmap(
                addr.add(run.offset as usize).cast(),
                run.len as usize,
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
    for run in to_copy {
        let (file, path) = files.get(run.layer_index, &run.file_name)?;
        // SAFETY: the run lies inside the caller's mapping (as above), which nobody else
        // accesses during this call.
        let dst = unsafe {
            std::slice::from_raw_parts_mut(addr.add(run.offset as usize), run.len as usize)
        };
        memory::read_exact_at(file, path, dst, run.offset)?;
        stats.copied_runs += 1;
    }
    tracing::debug!(dir = %dir.display(), ?stats, "overlaid memory layers");
    Ok(stats)
}

/// Splits overlay runs into (mapped, copied): the `limit` largest are mapped.
fn split_by_size(mut runs: Vec<&MapRun>, limit: usize) -> (Vec<&MapRun>, Vec<&MapRun>) {
    if runs.len() <= limit {
        return (runs, Vec::new());
    }
    // Largest first; ties by offset for determinism.
    runs.sort_unstable_by(|a, b| b.len.cmp(&a.len).then(a.offset.cmp(&b.offset)));
    let copied = runs.split_off(limit);
    (runs, copied)
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
                    1 => (10..20).contains(&p),
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

    #[test]
    fn mapped_chain_matches_and_writes_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, expected) = build(dir.path(), false);
        let before: Vec<Vec<u8>> = chain
            .layers
            .iter()
            .map(|l| std::fs::read(dir.path().join(&l.file_name)).unwrap())
            .collect();

        let mut m = PrivateMapping::map_chain(dir.path(), &chain).unwrap();
        assert_eq!(m.len(), expected.len());
        assert!(m.overlay_count() > 0);
        assert_eq!(m.copied_run_count(), 0);
        assert!(m.as_slice() == expected.as_slice());

        m.as_mut_slice().fill(0xEE);
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
            let m = PrivateMapping::map_chain_with_limit(dir.path(), &chain, limit).unwrap();
            assert!(m.overlay_count() <= limit);
            if limit == 0 {
                assert_eq!(m.overlay_count(), 0);
                assert!(m.copied_run_count() > 0);
            }
            assert!(m.as_slice() == expected.as_slice(), "limit {limit}");
        }
    }

    #[test]
    fn short_layer_file_is_rejected_not_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, _) = build(dir.path(), false);
        std::fs::write(dir.path().join("g1.layer"), b"short").unwrap();
        assert!(matches!(
            PrivateMapping::map_chain(dir.path(), &chain),
            Err(Error::InvalidMemory { .. })
        ));
    }
}
