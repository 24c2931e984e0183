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
use crate::guest::start_phases::StartPhases;
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
    phases: &mut StartPhases,
) -> Result<()> {
    fs::create_dir_all(dir).map_err(Error::io("creating the snapshot directory", dir))?;
    let mem = memory_slices(frozen)?;
    let origin = match &frozen.origin {
        MemoryOrigin::Fresh => None,
        MemoryOrigin::Chain {
            dir: origin, chain, ..
        } => Some((origin.as_path(), chain)),
    };
    // state.bin's atomic write, next, fsyncs this directory: that makes the layer's new
    // name durable too, before anything refers to it.
    let memory = save_memory(
        dir,
        &mem,
        &frozen.dirty,
        origin,
        &SavePolicy::default(),
        &options.clone().with_deferred_directory_sync(true),
    )?;
    phases.mark("memory");
    let state = SnapshotState {
        schema: SNAPSHOT_SCHEMA,
        of: SnapshotOf::Capsule(capsule.clone()),
        machine: frozen.machine.clone(),
        memory,
    };
    write_state(&dir.join(STATE_FILE_NAME), &state)?;
    phases.mark("state");
    if let Err(e) = remove_unreferenced_layers(dir, &state.memory.chain) {
        tracing::warn!(dir = %dir.display(), error = %e, "could not remove old layers");
    }
    phases.mark("cleanup");
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use capsule_devices::serial::SerialState;
    use capsule_devices::virtio::console::ConsoleState;
    use capsule_devices::virtio::mmio::MmioTransportState;
    use capsule_devices::virtio::rng::RngState;
    use capsule_snapshot::bitmap::PageBitmap;
    use capsule_snapshot::chain::{LayerDesc, MemoryChain};
    use capsule_snapshot::state_file::{decode_state_bytes, encode_state_bytes};
    use capsule_vmm::machine::linux::LinuxDeviceState;
    use capsule_vmm::vm::VmState;

    use super::*;
    use crate::guest::linux::{AgentState, LinuxGuestState};
    use crate::guest::GuestState;

    /// A paused Linux capsule's state, every guest-kind field set (no vCPU: their state is
    /// KVM's own structures, pinned by the VMM).
    fn linux_state() -> SnapshotState {
        let record = CapsuleRecord {
            id: "cl-golden000001".parse().expect("a valid id"),
            template: "minimal".into(),
            kind: GuestKind::Linux,
            vcpus: 1,
            memory_mb: 512,
            timeout: Duration::from_secs(120),
            created_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000),
        };
        let transport = MmioTransportState {
            driver_features: 1 << 32,
            status: 0xf,
            interrupt_status: 1,
            config_generation: 2,
            activated: true,
            ..MmioTransportState::default()
        };
        let devices = LinuxDeviceState {
            serial: SerialState {
                line_control: 3,
                in_buffer: b"in".to_vec(),
                log_capacity: 64,
                log: b"console".to_vec(),
                ..SerialState::default()
            },
            console_transport: transport.clone(),
            console: ConsoleState {
                buffer_bytes: 65536,
                to_guest: b"to guest".to_vec(),
                to_host: b"to host".to_vec(),
            },
            rng_transport: transport,
            rng: RngState { bytes_served: 4096 },
        };
        let pages = (512 << 20) / 4096;
        let mut base = PageBitmap::new(pages);
        base.set_range(0, 300).expect("in range");
        let mut chain = MemoryChain::new(512 << 20);
        chain
            .push_layer(LayerDesc {
                file_name: "base.layer".into(),
                pages: base,
            })
            .expect("a base layer");
        SnapshotState {
            schema: SNAPSHOT_SCHEMA,
            of: SnapshotOf::Capsule(record),
            machine: MachineState {
                vm: VmState {
                    irqchip: None,
                    pit: None,
                    clock: None,
                },
                vcpus: Vec::new(),
                guest: GuestState::Linux(Box::new(LinuxGuestState {
                    devices,
                    agent: AgentState {
                        protocol_version: 2,
                        agent_version: "0.1.0".into(),
                        capabilities: 0x7f,
                        next_request_id: 42,
                    },
                })),
            },
            memory: StoredMemory {
                chain,
                inline: Vec::new(),
            },
        }
    }

    /// `tests/golden/linux_snapshot_schema2.bin` pins how a Linux capsule's snapshot state is
    /// written (schema [`SNAPSHOT_SCHEMA`]): a change to these bytes is a format change, which
    /// needs a schema bump. Regenerate deliberately with `CAPSULE_REGENERATE_GOLDEN=1`.
    #[test]
    fn a_linux_snapshot_state_is_written_as_the_golden_file_says() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join("golden")
            .join("linux_snapshot_schema2.bin");
        let bytes = encode_state_bytes(&linux_state()).unwrap();
        if std::env::var_os("CAPSULE_REGENERATE_GOLDEN").is_some() {
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, &bytes).unwrap();
            return; // compiled in below: build again to compare
        }
        // Compiled in, so the test binary runs anywhere (the nested harness has no sources).
        let golden: &[u8] = include_bytes!("../tests/golden/linux_snapshot_schema2.bin");
        let decoded: SnapshotState = decode_state_bytes(golden).unwrap();
        assert_eq!(decoded, linux_state());
        assert_eq!(check(decoded).unwrap(), linux_state());
        assert_eq!(bytes, golden, "the encoding changed: bump SNAPSHOT_SCHEMA");
    }
}
