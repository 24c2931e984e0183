//! Putting a snapshot's memory under a new VM: the base layer mapped copy-on-write in place
//! of the VM's anonymous memory (every region from its flat offset), newer layers overlaid,
//! inline pages written.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use capsule_snapshot::mapping::{overlay_layers, MAX_OVERLAY_MAPPINGS};
use capsule_snapshot::stored::StoredMemory;
use capsule_snapshot::PAGE_SIZE;
use capsule_vmm::memory::TouchedOnly;
use capsule_vmm::{memory, GuestMemory};

use crate::error::{Error, Result};
use crate::pool::BackingId;

/// The memory of a snapshot or template, ready to be put under a new VM.
pub(crate) struct MemoryImage {
    /// Where the layer files are.
    pub(crate) dir: PathBuf,
    /// The layer chain and the pages stored inline.
    pub(crate) memory: StoredMemory,
    /// The base layer, already open (templates keep it open).
    pub(crate) base: Option<File>,
    /// `base`'s identity, known in advance (a template's, taken when it was loaded).
    pub(crate) base_id: Option<BackingId>,
    /// For a template's memory, shared by all its clones: the userfaultfd that makes each
    /// clone map only the template pages it touches (`None`: the kernel's default).
    pub(crate) touched_only: Option<Arc<TouchedOnly>>,
}

/// Makes `memory` hold `image`. `premapped`: `memory` already maps the image's base layer
/// (a shell pre-built for this template), so only newer layers and inline pages are laid
/// over it. Inline pages are written through the VMM's accessors, so its dirty bitmap
/// records them and the next snapshot carries them forward.
///
/// # Safety
/// No vCPU may have run on `memory` and nothing else may access it during the call (KVM
/// would keep translations of the replaced pages): call it on a VM that was just created.
pub(crate) unsafe fn restore(
    memory: &GuestMemory,
    image: &MemoryImage,
    premapped: bool,
) -> Result<()> {
    let chain = &image.memory.chain;
    if !premapped {
        let base = open_base(image)?;
        // SAFETY: the caller guarantees the memory is fresh and unused (see above).
        unsafe { memory::replace_with_private_file(memory, &base) }?;
    }
    if chain.layers.len() > 1 {
        let ranges = memory::host_ranges(memory)?;
        // SAFETY: the ranges are the memory's own private mappings, in flat order, mapped
        // from the base layer and used by nobody during this call (the caller's guarantee).
        unsafe { overlay_layers(&ranges, &image.dir, chain, MAX_OVERLAY_MAPPINGS) }?;
    }
    for patch in &image.memory.inline {
        memory::write_flat(memory, patch.page * PAGE_SIZE, &patch.data)?;
    }
    if let Some(touched_only) = &image.touched_only {
        // A template's pages are shared by all its clones: map each clone only the pages
        // it touches, so its RSS says what it uses (the kernel would otherwise map page-cache
        // neighbours of every fault, ~16x more). A resumed capsule keeps fault-around: its
        // files are its own and fewer faults make the resume faster.
        touched_only.register(memory)?;
    }
    Ok(())
}

/// The image's base layer file, its length checked.
fn open_base(image: &MemoryImage) -> Result<File> {
    match &image.base {
        Some(file) => file
            .try_clone()
            .map_err(|e| Error::os("duplicating a memory layer's descriptor", e)),
        None => Ok(image.memory.chain.open_base(&image.dir)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_snapshot::bitmap::PageBitmap;
    use capsule_snapshot::memory::WriteOptions;
    use capsule_snapshot::save::{save_memory, SavePolicy};
    use vm_memory::{Bytes, GuestAddress};

    const PAGE: usize = PAGE_SIZE as usize;
    /// Two regions with a gap between them, as a Linux guest's RAM around the 32-bit hole.
    const LAYOUT: [(GuestAddress, usize); 2] = [
        (GuestAddress(0), 48 * PAGE),
        (GuestAddress(1 << 32), 80 * PAGE),
    ];

    /// The guest's pages as the VMM dirty bitmap saw them, in flat order.
    fn dirty(memory: &GuestMemory) -> PageBitmap {
        let flat = memory::flatten_dirty(memory, &memory::take_vmm_dirty(memory)).unwrap();
        PageBitmap::from_kvm_words(&flat, 128).unwrap()
    }

    fn save(
        dir: &std::path::Path,
        memory: &GuestMemory,
        origin: Option<&StoredMemory>,
    ) -> StoredMemory {
        // SAFETY: nothing else uses `memory` while the slices live.
        let slices = unsafe { memory::host_slices(memory) }.unwrap();
        let origin = origin.map(|o| (dir, &o.chain));
        save_memory(
            dir,
            &slices,
            &dirty(memory),
            origin,
            &SavePolicy::default(),
            &WriteOptions::default(),
        )
        .unwrap()
    }

    fn restored(dir: &std::path::Path, stored: &StoredMemory) -> GuestMemory {
        let memory = memory::create_anonymous_regions(&LAYOUT).unwrap();
        let image = MemoryImage {
            dir: dir.to_path_buf(),
            memory: stored.clone(),
            base: None,
            base_id: None,
            touched_only: None,
        };
        // SAFETY: a fresh memory with no VM and no other user.
        unsafe { restore(&memory, &image, false) }.unwrap();
        memory
    }

    fn bytes(memory: &GuestMemory) -> Vec<u8> {
        let mut out = vec![0u8; 128 * PAGE];
        memory::read_flat(memory, 0, &mut out).unwrap();
        out
    }

    #[test]
    fn a_two_region_guest_restores_every_region_layers_and_inline_pages() {
        let dir = tempfile::tempdir().unwrap();
        let guest = memory::create_anonymous_regions(&LAYOUT).unwrap();
        // A base layer with pages in both regions, the last page of the low one included.
        for (addr, byte) in [
            (0u64, 1u8),
            (47 * 4096, 2),
            (1 << 32, 3),
            ((1 << 32) + 79 * 4096, 4),
        ] {
            guest.write_slice(&[byte; 100], GuestAddress(addr)).unwrap();
        }
        let base = save(dir.path(), &guest, None);
        assert_eq!(base.chain.layers.len(), 1);
        assert_eq!(bytes(&restored(dir.path(), &base)), bytes(&guest));

        // A diff large enough for its own layer, spanning the boundary between the regions.
        for page in 40..48u64 {
            guest
                .write_slice(&[9u8; PAGE], GuestAddress(page * 4096))
                .unwrap();
        }
        for page in 0..20u64 {
            guest
                .write_slice(&[8u8; PAGE], GuestAddress((1 << 32) + page * 4096))
                .unwrap();
        }
        let layered = save(dir.path(), &guest, Some(&base));
        assert_eq!(layered.chain.layers.len(), 2);
        assert_eq!(bytes(&restored(dir.path(), &layered)), bytes(&guest));

        // A tiny diff in the high region: stored inline, written back through the VMM's
        // accessors, so the restored memory's dirty bitmap carries it to the next pause.
        guest
            .write_slice(&[7u8; 10], GuestAddress((1 << 32) + 70 * 4096))
            .unwrap();
        let inline = save(dir.path(), &guest, Some(&layered));
        assert_eq!(inline.inline.len(), 1);
        assert_eq!(inline.inline[0].page, 48 + 70);
        let back = restored(dir.path(), &inline);
        assert_eq!(bytes(&back), bytes(&guest));
        assert!(dirty(&back).get(48 + 70));
    }
}
