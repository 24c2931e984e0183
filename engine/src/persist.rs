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

use capsule_snapshot::chain::{remove_unreferenced_layers, LayerDesc, MemoryChain};
use capsule_snapshot::mapping::{overlay_layers, MAX_OVERLAY_MAPPINGS};
use capsule_snapshot::memory::{write_layer, WriteOptions};
use capsule_snapshot::state_file::{read_state, write_state};
use capsule_snapshot::{atomic, STATE_FILE_NAME};
use capsule_vmm::{memory, GuestMemory};

use crate::error::{Error, Result};
use crate::guest::{Frozen, MachineState, MemoryOrigin};

/// Most layers a capsule's memory chain may have before it is merged (Wrenn merges after 8
/// generations).
pub(crate) const MAX_LAYERS: usize = 8;

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
    kind: &str,
    vcpus: u32,
    memory_mb: u64,
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
    if chain.layers.len() >= MAX_LAYERS && pages.any() {
        // Merge: one new base holding every page present anywhere in the chain.
        let mut all = chain.union().map_err(snap)?;
        all.or_assign(&pages).map_err(snap)?;
        chain = MemoryChain::new(mem.len() as u64);
        pages = all;
    }
    if chain.layers.is_empty() || pages.any() {
        let name = layer_name();
        write_layer(&dir.join(&name), mem, &pages, options).map_err(snap)?;
        chain
            .push_layer(LayerDesc {
                file_name: name,
                pages,
            })
            .map_err(snap)?;
    }
    let state = SnapshotState {
        schema: SNAPSHOT_SCHEMA,
        kind: kind.to_owned(),
        vcpus,
        memory_mb,
        machine: frozen.machine.clone(),
        memory: chain.clone(),
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
    let parent = dir
        .parent()
        .ok_or_else(|| Error::InvalidArgument("template directory has no parent".into()))?;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::InvalidArgument("bad template directory".into()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", layer_name()));
    fs::create_dir(&tmp).map_err(io("creating the template directory", &tmp))?;
    let result = (|| {
        let mem = memory_bytes(frozen)?;
        let mut pages = frozen.dirty.clone();
        if let MemoryOrigin::Chain { chain, .. } = &frozen.origin {
            pages
                .or_assign(&chain.union().map_err(snap)?)
                .map_err(snap)?;
        }
        let base = layer_name();
        write_layer(&tmp.join(&base), mem, &pages, &WriteOptions::default()).map_err(snap)?;
        let mut chain = MemoryChain::new(mem.len() as u64);
        chain
            .push_layer(LayerDesc {
                file_name: base,
                pages,
            })
            .map_err(snap)?;
        let state = SnapshotState {
            schema: SNAPSHOT_SCHEMA,
            kind: kind.to_owned(),
            vcpus,
            memory_mb,
            machine: frozen.machine.clone(),
            memory: chain,
        };
        write_state(&tmp.join(STATE_FILE_NAME), &state).map_err(snap)?;
        atomic::sync_dir(&tmp).map_err(snap)?;
        if dir.exists() {
            return Err(Error::InvalidArgument(format!(
                "a template named {name:?} already exists"
            )));
        }
        fs::rename(&tmp, dir).map_err(io("publishing the template", dir))?;
        atomic::sync_dir(parent).map_err(snap)
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
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

/// Reads and checks `dir/state.bin`.
pub(crate) fn load(dir: &Path) -> Result<SnapshotState> {
    let state: SnapshotState = read_state(&dir.join(STATE_FILE_NAME)).map_err(snap)?;
    if state.schema != SNAPSHOT_SCHEMA {
        return Err(Error::Snapshot(
            capsule_snapshot::Error::UnsupportedVersion {
                found: state.schema,
                supported: SNAPSHOT_SCHEMA,
            },
        ));
    }
    state.memory.validate().map_err(snap)?;
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

/// Maps the snapshot's memory copy-on-write: the base layer `MAP_PRIVATE`, newer layers
/// overlaid.
pub(crate) fn map_memory(dir: &Path, chain: &MemoryChain) -> Result<GuestMemory> {
    let base = chain.layers.first().ok_or_else(|| {
        Error::Snapshot(capsule_snapshot::Error::InvalidMemory {
            reason: "no base layer".into(),
        })
    })?;
    let path: PathBuf = dir.join(&base.file_name);
    let file = fs::File::open(&path).map_err(io("opening a memory layer", &path))?;
    map_memory_from(file, dir, chain)
}

/// Like [`map_memory`] with the base layer already open.
pub(crate) fn map_memory_from(
    base: fs::File,
    dir: &Path,
    chain: &MemoryChain,
) -> Result<GuestMemory> {
    let memory = memory::map_private_file(base, chain.mem_size as usize).map_err(|e| {
        Error::Snapshot(capsule_snapshot::Error::InvalidMemory {
            reason: e.to_string(),
        })
    })?;
    if chain.layers.len() > 1 {
        let (addr, len) = memory::host_range(&memory)?;
        // SAFETY: `memory` was mapped just above as one private mapping of `len` bytes owned
        // by its region, and nothing else has seen it yet.
        unsafe { overlay_layers(addr, len, dir, chain, MAX_OVERLAY_MAPPINGS) }.map_err(snap)?;
    }
    Ok(memory)
}
