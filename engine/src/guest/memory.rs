//! Putting a snapshot's memory under a new VM: the base layer mapped copy-on-write in place
//! of the VM's anonymous memory (every region from its flat offset), newer layers overlaid,
//! inline pages written.

use std::fs::File;
use std::path::PathBuf;

use capsule_snapshot::mapping::{overlay_layers, MAX_OVERLAY_MAPPINGS};
use capsule_snapshot::stored::StoredMemory;
use capsule_snapshot::PAGE_SIZE;
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
