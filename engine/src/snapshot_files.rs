//! Snapshot files: writing a frozen machine to disk and reading it back, in the format of
//! `capsule_snapshot`. Words used throughout the engine: a *snapshot* is the files of a
//! frozen machine (this format); a *pause* writes one into the capsule's own directory
//! ([`write_paused`]); [`crate::Capsule::snapshot`] publishes one as a named *template*
//! ([`write_template`]).
//!
//! A snapshot directory holds `state.bin` (a [`SnapshotState`] in the versioned, checksummed
//! state-file format) and memory layer files. `state.bin` is the commit point: it is written
//! last, atomically, and names exactly the layers it needs, so a crash or an I/O error at
//! any earlier point leaves the previous snapshot valid (new layer files are then orphans,
//! removed at the next successful write).
//!
//! What a write stores (fresh base, inline pages, a new layer or a merge, layers of a
//! template hard-linked in) is the snapshot crate's save policy:
//! [`capsule_snapshot::save::save_memory`] for a pause, `save_full_image` for a template.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use capsule_snapshot::chain::remove_unreferenced_layers;
use capsule_snapshot::memory::WriteOptions;
use capsule_snapshot::save::{link_layers, save_full_image, save_memory, SavePolicy};
use capsule_snapshot::state_file::{read_state, write_state};
use capsule_snapshot::stored::StoredMemory;
use capsule_snapshot::{atomic, STATE_FILE_NAME};
use capsule_vmm::memory;

use crate::error::{Error, Result};
use crate::guest::{Frozen, MachineState, MemoryOrigin};
use crate::model::record::CapsuleRecord;
use crate::model::GuestKind;

/// The version of [`SnapshotState`]'s layout inside the state file; bump it when the layout
/// changes so old engines refuse new snapshots instead of misreading them.
pub(crate) const SNAPSHOT_SCHEMA: u32 = 2;

/// Everything in `state.bin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SnapshotState {
    /// [`SNAPSHOT_SCHEMA`] when written.
    pub(crate) schema: u32,
    /// Whose snapshot this is, which also says what machine it is of.
    pub(crate) of: SnapshotOf,
    pub(crate) machine: MachineState,
    /// The memory: the layer chain and the pages stored inline.
    pub(crate) memory: StoredMemory,
}

/// Whose snapshot a `state.bin` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SnapshotOf {
    /// A paused capsule, as it was created.
    Capsule(CapsuleRecord),
    /// A template: the machine of the capsules that start from it.
    Template {
        kind: GuestKind,
        vcpus: u32,
        memory_mb: u64,
    },
}

impl SnapshotOf {
    /// The guest kind, vCPU count and memory size (MiB) of the machine.
    pub(crate) fn shape(&self) -> (GuestKind, u32, u64) {
        match self {
            SnapshotOf::Capsule(r) => (r.kind, r.vcpus, r.memory_mb),
            SnapshotOf::Template {
                kind,
                vcpus,
                memory_mb,
            } => (*kind, *vcpus, *memory_mb),
        }
    }

    /// The paused capsule's record, if this is one's.
    pub(crate) fn capsule(&self) -> Option<&CapsuleRecord> {
        match self {
            SnapshotOf::Capsule(record) => Some(record),
            SnapshotOf::Template { .. } => None,
        }
    }
}

/// The frozen VM's memory, each region's bytes in flat order.
fn memory_slices(frozen: &Frozen) -> Result<Vec<&[u8]>> {
    // SAFETY: the regions are live mappings owned by the VM, which `frozen` keeps alive for
    // the borrow; every vCPU is stopped and the VMM writes guest memory only while serving a
    // guest (a command, a device), which a frozen guest does not do, so nothing writes or
    // remaps it while the slices exist.
    Ok(unsafe { memory::host_slices(frozen.vm.memory()) }?)
}

/// Writes `frozen` as the snapshot in `dir` (a capsule's own snapshot directory).
pub(crate) fn write_paused(
    dir: &Path,
    frozen: &Frozen,
    capsule: &CapsuleRecord,
    options: &WriteOptions,
) -> Result<()> {
    fs::create_dir_all(dir).map_err(Error::io("creating the snapshot directory", dir))?;
    let mem = memory_slices(frozen)?;
    let origin = match &frozen.origin {
        MemoryOrigin::Fresh => None,
        MemoryOrigin::Chain {
            dir: origin, chain, ..
        } => Some((origin.as_path(), chain)),
    };
    let memory = save_memory(
        dir,
        &mem,
        &frozen.dirty,
        origin,
        &SavePolicy::default(),
        options,
    )?;
    let state = SnapshotState {
        schema: SNAPSHOT_SCHEMA,
        of: SnapshotOf::Capsule(capsule.clone()),
        machine: frozen.machine.clone(),
        memory,
    };
    write_state(&dir.join(STATE_FILE_NAME), &state)?;
    if let Err(e) = remove_unreferenced_layers(dir, &state.memory.chain) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove old layers");
    }
    Ok(())
}

/// Writes `frozen` as a new, self-contained template in `dir` (which must not exist): one
/// base layer with every page the guest has, then `state.bin`; built under a temporary name
/// and renamed into place.
pub(crate) fn write_template(
    dir: &Path,
    frozen: &Frozen,
    kind: GuestKind,
    vcpus: u32,
    memory_mb: u64,
) -> Result<()> {
    let mem = memory_slices(frozen)?;
    let origin = match &frozen.origin {
        MemoryOrigin::Fresh => None,
        MemoryOrigin::Chain { chain, .. } => Some(chain),
    };
    publish_template(dir, (kind, vcpus, memory_mb), &frozen.machine, |tmp| {
        save_full_image(tmp, &mem, &frozen.dirty, origin)
    })
}

/// Publishes the paused capsule's snapshot in `from` as a new template in `dir`: its layers
/// hard-linked, its state marked as a template's. The paused capsule is not changed.
pub(crate) fn write_template_from_paused(from: &Path, dir: &Path) -> Result<()> {
    let paused = load(from)?;
    publish_template(dir, paused.of.shape(), &paused.machine, |tmp| {
        link_layers(from, tmp, &paused.memory.chain)?;
        Ok(paused.memory.clone())
    })
}

/// Builds a template's directory `dir` (which must not exist) under a temporary name: its
/// memory from `fill`, then `state.bin` describing a machine of `(kind, vcpus, memory_mb)`
/// in `machine`'s state; renamed into place once complete.
fn publish_template(
    dir: &Path,
    (kind, vcpus, memory_mb): (GuestKind, u32, u64),
    machine: &MachineState,
    fill: impl FnOnce(&Path) -> capsule_snapshot::Result<StoredMemory>,
) -> Result<()> {
    atomic::publish_new_dir(dir, |tmp| {
        let state = SnapshotState {
            schema: SNAPSHOT_SCHEMA,
            of: SnapshotOf::Template {
                kind,
                vcpus,
                memory_mb,
            },
            machine: machine.clone(),
            memory: fill(tmp)?,
        };
        write_state(&tmp.join(STATE_FILE_NAME), &state)
    })
    .map_err(|e| match e {
        capsule_snapshot::Error::AlreadyExists { .. } => {
            let name = dir.file_name().unwrap_or_default().to_string_lossy();
            Error::InvalidArgument(format!("a template named {name:?} already exists"))
        }
        e => e.into(),
    })
}

/// Retires the snapshot in `dir` (removes its `state.bin`, the commit point) when the
/// capsule runs on from it: a new engine then reports the capsule stopped if this process
/// dies, never rolled back. The layers stay: the running capsule may map them, and its next
/// pause builds on them or removes them.
pub(crate) fn retire(dir: &Path) {
    let state_file = dir.join(STATE_FILE_NAME);
    if let Err(e) = fs::remove_file(&state_file) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %state_file.display(), error = %e, "could not retire a snapshot");
        }
    }
}

/// Decodes and checks a `state.bin` image without touching the file system: what `load`
/// does after reading the file. Exposed (`testing` feature) for the fuzz target.
#[cfg(feature = "testing")]
pub(crate) fn decode(bytes: &[u8]) -> Result<SnapshotState> {
    let state: SnapshotState = capsule_snapshot::state_file::decode_state_bytes(bytes)?;
    check(state)
}

/// Reads and checks `dir/state.bin`.
pub(crate) fn load(dir: &Path) -> Result<SnapshotState> {
    let state: SnapshotState = read_state(&dir.join(STATE_FILE_NAME))?;
    check(state)
}

/// The checks every loaded snapshot passes before it is used.
fn check(state: SnapshotState) -> Result<SnapshotState> {
    if state.schema != SNAPSHOT_SCHEMA {
        return Err(Error::SnapshotVersion {
            found: state.schema,
            supported: SNAPSHOT_SCHEMA,
        });
    }
    let (_, _, memory_mb) = state.of.shape();
    state.memory.validate(memory_mb << 20)?;
    Ok(state)
}
