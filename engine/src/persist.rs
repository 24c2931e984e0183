//! Writing a frozen capsule to disk and mapping it back: the engine's snapshot format on top
//! of `capsule_snapshot`.
//!
//! A snapshot directory holds `state.bin` (a [`SnapshotState`] in the versioned, checksummed
//! state-file format) and memory layer files. `state.bin` is the commit point: it is written
//! last, atomically, and names exactly the layers it needs, so a crash or an I/O error at
//! any earlier point leaves the previous snapshot valid (new layer files are then orphans,
//! removed at the next successful write).
//!
//! What a write stores depends on where the capsule's memory came from:
//! - fresh memory: one sparse base layer with every page written since boot;
//! - memory mapped from a chain (a resumed capsule, or one spawned from a template): the
//!   chain's layers (hard-linked when they live in another directory, so a template can be
//!   deleted later) plus one diff layer with the pages dirtied since. When the chain would
//!   exceed [`MAX_LAYERS`] generations, a single new base with every page replaces it.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use capsule_snapshot::bitmap::PageBitmap;
use capsule_snapshot::chain::{remove_unreferenced_layers, LayerDesc, MemoryChain};
use capsule_snapshot::mapping::{overlay_layers, MAX_OVERLAY_MAPPINGS};
use capsule_snapshot::memory::{write_layer, WriteOptions};
use capsule_snapshot::state_file::{read_state, write_state};
use capsule_snapshot::{atomic, STATE_FILE_NAME};
use capsule_vmm::memory;
use capsule_vmm::vm_memory::{Bytes, GuestAddress};

use crate::error::{Error, Result};
use crate::guest::{Frozen, MachineState, MemoryOrigin};
use crate::pool::{BackingId, Shell};
use crate::store::CapsuleMeta;

/// Most layers a capsule's memory chain may have before it is merged (Wrenn merges after 8
/// generations).
pub(crate) const MAX_LAYERS: usize = 8;

/// A pause that dirtied at most this many pages stores them inside `state.bin` instead of a
/// new layer file: one file and one fsync instead of two, and no layer to map on resume.
pub(crate) const INLINE_MAX_PAGES: u64 = 16;

/// Layers of at least this many pages are written with `O_DIRECT` (several times faster than
/// buffered writes plus fsync for large layers here, and they do not linger in the page
/// cache); smaller ones are written through the page cache, which keeps them warm for a
/// quick resume.
pub(crate) const DIRECT_IO_MIN_PAGES: u64 = 256;

/// A page stored inline in `state.bin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PagePatch {
    /// Guest page number.
    pub(crate) page: u64,
    /// Its 4096 bytes.
    pub(crate) data: Vec<u8>,
}

/// The memory of a snapshot or template, ready to be put under a new VM.
pub(crate) struct MemoryImage {
    /// Where the layer files are.
    pub(crate) dir: PathBuf,
    pub(crate) chain: MemoryChain,
    /// The base layer, already open (templates keep it open).
    pub(crate) base: Option<fs::File>,
    /// `base`'s identity, known in advance (a template's, taken when it was loaded).
    pub(crate) base_id: Option<BackingId>,
    /// Pages newer than the chain.
    pub(crate) patch: Vec<PagePatch>,
}

/// The version of [`SnapshotState`]'s layout inside the state file; bump it when the layout
/// changes so old engines refuse new snapshots instead of misreading them.
pub(crate) const SNAPSHOT_SCHEMA: u32 = 1;

/// Everything in `state.bin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SnapshotState {
    /// [`SNAPSHOT_SCHEMA`] when written.
    pub(crate) schema: u32,
    /// The guest kind (`"probe"`).
    pub(crate) kind: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mb: u64,
    pub(crate) machine: MachineState,
    pub(crate) memory: MemoryChain,
    /// Pages newer than `memory`, stored inline (see [`INLINE_MAX_PAGES`]).
    pub(crate) patch: Vec<PagePatch>,
    /// The paused capsule this is the snapshot of (none for a template).
    pub(crate) capsule: Option<CapsuleMeta>,
}

fn snap(e: capsule_snapshot::Error) -> Error {
    Error::Snapshot(e)
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A fresh name for a layer file.
fn layer_name() -> String {
    let mut bytes = [0u8; 8];
    let random = getrandom::fill(&mut bytes)
        .map(|()| u64::from_le_bytes(bytes))
        .unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
    format!("{random:016x}.{}", capsule_snapshot::LAYER_EXTENSION)
}

/// The frozen VM's memory as bytes.
fn memory_bytes(frozen: &Frozen) -> Result<&[u8]> {
    let (addr, len) = memory::host_range(frozen.vm.memory())?;
    // SAFETY: the region is a live mapping owned by the VM, which `frozen` keeps alive for the
    // borrow; every vCPU is stopped and the VMM writes guest memory only while serving a
    // command, so nothing writes it while the slice exists.
    Ok(unsafe { std::slice::from_raw_parts(addr, len) })
}

/// Writes `frozen` as the snapshot in `dir` (a capsule's own snapshot directory).
pub(crate) fn write_snapshot(
    dir: &Path,
    frozen: &Frozen,
    capsule: &CapsuleMeta,
    options: &WriteOptions,
) -> Result<MemoryChain> {
    fs::create_dir_all(dir).map_err(io("creating the snapshot directory", dir))?;
    let mem = memory_bytes(frozen)?;
    let (mut chain, mut pages) = match &frozen.origin {
        MemoryOrigin::Fresh => (MemoryChain::new(mem.len() as u64), frozen.dirty.clone()),
        MemoryOrigin::Chain {
            dir: origin, chain, ..
        } => {
            if origin != dir {
                link_layers(origin, dir, chain)?;
            }
            (chain.clone(), frozen.dirty.clone())
        }
    };
    let mut patch = Vec::new();
    if !chain.layers.is_empty() && pages.count_ones() <= INLINE_MAX_PAGES {
        patch = page_patches(mem, &pages)?;
    } else {
        if chain.layers.len() >= MAX_LAYERS {
            // Merge: one new base holding every page present anywhere in the chain.
            let mut all = chain.union().map_err(snap)?;
            all.or_assign(&pages).map_err(snap)?;
            chain = MemoryChain::new(mem.len() as u64);
            pages = all;
        }
        let name = layer_name();
        let direct = pages.count_ones() >= DIRECT_IO_MIN_PAGES;
        let options = options.clone().with_direct_io(direct);
        write_layer(&dir.join(&name), &[mem], &pages, &options).map_err(snap)?;
        chain
            .push_layer(LayerDesc {
                file_name: name,
                pages,
            })
            .map_err(snap)?;
    }
    let state = SnapshotState {
        schema: SNAPSHOT_SCHEMA,
        kind: capsule.kind.clone(),
        vcpus: capsule.vcpus,
        memory_mb: capsule.memory_mb,
        machine: frozen.machine.clone(),
        memory: chain.clone(),
        patch,
        capsule: Some(capsule.clone()),
    };
    write_state(&dir.join(STATE_FILE_NAME), &state).map_err(snap)?;
    if let Err(e) = remove_unreferenced_layers(dir, &chain) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove old layers");
    }
    Ok(chain)
}

/// Writes `frozen` as a new, self-contained template in `dir` (which must not exist): one
/// base layer with every page the guest has, then `state.bin`; built under a temporary name
/// and renamed into place.
pub(crate) fn write_template(
    dir: &Path,
    frozen: &Frozen,
    kind: &str,
    vcpus: u32,
    memory_mb: u64,
) -> Result<()> {
    let mem = memory_bytes(frozen)?;
    let mut pages = frozen.dirty.clone();
    if let MemoryOrigin::Chain { chain, .. } = &frozen.origin {
        pages
            .or_assign(&chain.union().map_err(snap)?)
            .map_err(snap)?;
    }
    atomic::publish_new_dir(dir, |tmp| {
        let base = layer_name();
        write_layer(&tmp.join(&base), &[mem], &pages, &WriteOptions::default())?;
        let mut chain = MemoryChain::new(mem.len() as u64);
        chain.push_layer(LayerDesc {
            file_name: base,
            pages,
        })?;
        let state = SnapshotState {
            schema: SNAPSHOT_SCHEMA,
            kind: kind.to_owned(),
            vcpus,
            memory_mb,
            machine: frozen.machine.clone(),
            memory: chain,
            patch: Vec::new(),
            capsule: None,
        };
        write_state(&tmp.join(STATE_FILE_NAME), &state)
    })
    .map_err(|e| match e {
        capsule_snapshot::Error::AlreadyExists { .. } => {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            Error::InvalidArgument(format!("a template named {name:?} already exists"))
        }
        e => snap(e),
    })
}

/// Copies the pages set in `pages` out of `mem`.
fn page_patches(mem: &[u8], pages: &PageBitmap) -> Result<Vec<PagePatch>> {
    let page_size = capsule_snapshot::PAGE_SIZE as usize;
    let mut patch = Vec::with_capacity(pages.count_ones() as usize);
    for (first, count) in pages.runs() {
        for page in first..first + count {
            let start = page as usize * page_size;
            let data = mem.get(start..start + page_size).ok_or_else(|| {
                Error::Snapshot(capsule_snapshot::Error::InvalidMemory {
                    reason: format!("dirty page {page} outside memory"),
                })
            })?;
            patch.push(PagePatch {
                page,
                data: data.to_vec(),
            });
        }
    }
    Ok(patch)
}

/// Hard-links `chain`'s layer files from `from` into `to`, so `to` no longer depends on
/// `from` (a template may then be deleted while capsules spawned from it live on).
fn link_layers(from: &Path, to: &Path, chain: &MemoryChain) -> Result<()> {
    for layer in &chain.layers {
        let target = to.join(&layer.file_name);
        if target.exists() {
            continue;
        }
        let source = from.join(&layer.file_name);
        fs::hard_link(&source, &target).map_err(io("linking a template layer", &source))?;
    }
    Ok(())
}

/// Decodes and checks a `state.bin` image without touching the file system: what `load`
/// does after reading the file. Exposed (hidden) for the fuzz target.
pub(crate) fn decode(bytes: &[u8]) -> Result<SnapshotState> {
    let state: SnapshotState =
        capsule_snapshot::state_file::decode_state_bytes(bytes).map_err(snap)?;
    check(state)
}

/// Reads and checks `dir/state.bin`.
pub(crate) fn load(dir: &Path) -> Result<SnapshotState> {
    let state: SnapshotState = read_state(&dir.join(STATE_FILE_NAME)).map_err(snap)?;
    check(state)
}

/// The checks every loaded snapshot passes before it is used.
fn check(state: SnapshotState) -> Result<SnapshotState> {
    if state.schema != SNAPSHOT_SCHEMA {
        return Err(Error::Snapshot(
            capsule_snapshot::Error::UnsupportedVersion {
                found: state.schema,
                supported: SNAPSHOT_SCHEMA,
            },
        ));
    }
    state.memory.validate().map_err(snap)?;
    let pages = state.memory.page_count();
    let page_size = capsule_snapshot::PAGE_SIZE as usize;
    if let Some(bad) = state
        .patch
        .iter()
        .find(|p| p.page >= pages || p.data.len() != page_size)
    {
        return Err(Error::Snapshot(capsule_snapshot::Error::InvalidMemory {
            reason: format!("inline page {} is malformed", bad.page),
        }));
    }
    if state.memory.mem_size != state.memory_mb << 20 {
        return Err(Error::Snapshot(capsule_snapshot::Error::InvalidMemory {
            reason: format!(
                "memory chain of {} bytes for a {} MiB guest",
                state.memory.mem_size, state.memory_mb
            ),
        }));
    }
    Ok(state)
}

/// Puts `image` under `shell`'s VM: the base layer mapped `MAP_PRIVATE` in place of the
/// shell's anonymous memory, newer layers overlaid, inline pages written (the VMM's dirty
/// bitmap then records them, so the next snapshot carries them forward).
pub(crate) fn apply_memory(shell: &Shell, image: &MemoryImage) -> Result<()> {
    let memory = shell.vm.memory();
    // A shell pre-built for this template already maps its base layer.
    let premapped = image.base_id.is_some() && image.base_id == shell.backing;
    if !premapped {
        map_base(shell, image)?;
    }
    if image.chain.layers.len() > 1 {
        let range = memory::host_range(memory)?;
        // SAFETY: the range is the shell's memory region, mapped from the base layer and used
        // by nobody else yet (a shell's vCPUs have never run).
        unsafe { overlay_layers(&[range], &image.dir, &image.chain, MAX_OVERLAY_MAPPINGS) }
            .map_err(snap)?;
    }
    for patch in &image.patch {
        memory
            .write_slice(
                &patch.data,
                GuestAddress(patch.page * capsule_snapshot::PAGE_SIZE),
            )
            .map_err(|e| Error::Hypervisor(capsule_vmm::Error::Memory(e.to_string())))?;
    }
    Ok(())
}

/// Maps the image's base layer over the shell's memory.
fn map_base(shell: &Shell, image: &MemoryImage) -> Result<()> {
    let base = match &image.base {
        Some(file) => file
            .try_clone()
            .map_err(io("opening a memory layer", &image.dir))?,
        None => {
            let name = image
                .chain
                .layers
                .first()
                .map(|l| l.file_name.as_str())
                .unwrap_or_default();
            let path = image.dir.join(name);
            fs::File::open(&path).map_err(io("opening a memory layer", &path))?
        }
    };
    // SAFETY: a shell's vCPUs have never run and the shell is ours alone until it is handed
    // to a runtime, so nothing reads or maps its memory meanwhile.
    unsafe { memory::replace_with_private_file(shell.vm.memory(), &base) }.map_err(|e| {
        Error::Snapshot(capsule_snapshot::Error::InvalidMemory {
            reason: e.to_string(),
        })
    })
}
