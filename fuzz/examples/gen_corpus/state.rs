//! `state_file` and `snapshot_state` seeds: state files written by the snapshot crate's save
//! policy and by the engine pausing real probe capsules.

use std::path::Path;
use std::time::Duration;

use capsule::{CapsuleConfig, Engine, EngineConfig};
use capsule_snapshot::bitmap::PageBitmap;
use capsule_snapshot::memory::WriteOptions;
use capsule_snapshot::save::{save_full_image, save_memory, SavePolicy};
use capsule_snapshot::state_file::{decode_state_bytes, encode_state_bytes};
use capsule_snapshot::stored::StoredMemory;
use capsule_snapshot::{PAGE_SIZE, STATE_FILE_NAME};

use crate::Seed;

/// The generic value the `state_file` target also decodes.
type Generic = (String, Vec<u64>, Option<u32>, bool);

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Guest memory of `pages` pages where each page in `written` holds a recognisable pattern.
fn memory(pages: u64, written: &[u64]) -> Result<(Vec<u8>, PageBitmap), String> {
    let mut mem = vec![0u8; (pages * PAGE_SIZE) as usize];
    let mut dirty = PageBitmap::new(pages);
    for &page in written {
        let start = (page * PAGE_SIZE) as usize;
        for (i, b) in mem[start..start + PAGE_SIZE as usize]
            .iter_mut()
            .enumerate()
        {
            *b = (page as usize + i) as u8;
        }
        dirty.set(page).map_err(err)?;
    }
    Ok((mem, dirty))
}

fn encode(memory: &StoredMemory) -> Result<Vec<u8>, String> {
    encode_state_bytes(memory).map_err(err)
}

/// Seeds for `state_file`: a `StoredMemory` as each case of the save policy stores it, and the
/// generic value.
pub fn state_file_seeds() -> Result<Vec<Seed>, String> {
    let dir = tempfile::tempdir().map_err(err)?;
    let dir = dir.path();
    let policy = SavePolicy::default();
    let options = WriteOptions::default();

    // A fresh guest's first pause: one base layer of the pages it wrote.
    let (mem, dirty) = memory(16, &[0, 1, 5])?;
    let base = save_memory(dir, &[&mem], &dirty, None, &policy, &options).map_err(err)?;

    // Paused again after writing one page: the base plus that page inline.
    let (mem2, _) = memory(16, &[0, 1, 5, 9])?;
    let mut one = PageBitmap::new(16);
    one.set(9).map_err(err)?;
    let inline = save_memory(
        dir,
        &[&mem2],
        &one,
        Some((dir, &base.chain)),
        &policy,
        &options,
    )
    .map_err(err)?;

    // With inline pages turned off: a second layer on the base.
    let layered = SavePolicy {
        inline_max_pages: 0,
        ..SavePolicy::default()
    };
    let layers = save_memory(
        dir,
        &[&mem2],
        &one,
        Some((dir, &base.chain)),
        &layered,
        &options,
    )
    .map_err(err)?;

    // A template of a two-region guest: one self-contained base.
    let (low, _) = memory(8, &[0, 3])?;
    let (high, _) = memory(4, &[1])?;
    let mut both = PageBitmap::new(12);
    for page in [0, 3, 9] {
        both.set(page).map_err(err)?;
    }
    let template = save_full_image(dir, &[&low, &high], &both, None).map_err(err)?;

    let generic: Generic = ("capsule".into(), vec![1, 2, 0x4000_0000], Some(7), true);
    Ok(vec![
        Seed::new("fresh-base", encode(&base)?),
        Seed::new("base-and-inline-page", encode(&inline)?),
        Seed::new("two-layers", encode(&layers)?),
        Seed::new("two-region-template", encode(&template)?),
        Seed::new("generic-value", encode_state_bytes(&generic).map_err(err)?),
    ])
}

/// A `state_file` seed decodes as a valid `StoredMemory`, or as the generic value.
pub fn check_state_file(data: &[u8]) -> Result<(), String> {
    match decode_state_bytes::<StoredMemory>(data) {
        Ok(stored) => stored.validate(stored.chain.mem_size).map_err(err),
        Err(e) => decode_state_bytes::<Generic>(data)
            .map(|_| ())
            .map_err(|e2| format!("as memory: {e}; as the generic value: {e2}")),
    }
}

fn read_state(dir: &Path) -> Result<Vec<u8>, String> {
    let path = dir.join(STATE_FILE_NAME);
    std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))
}

/// Seeds for `snapshot_state`: the `state.bin` of paused probe capsules and of a template,
/// written by a real engine (needs `/dev/kvm`).
pub fn snapshot_seeds() -> Result<Vec<Seed>, String> {
    let data = tempfile::tempdir().map_err(err)?;
    let engine = Engine::new(EngineConfig::builder().data_dir(data.path())).map_err(err)?;
    let probe = || CapsuleConfig::builder("probe").memory_mb(8);
    let run = |c: &capsule::Capsule, cmd: &str| c.commands().run(cmd).map(|_| ()).map_err(err);
    let snapshot_dir = |c: &capsule::Capsule| {
        data.path()
            .join("capsules")
            .join(c.id().as_str())
            .join("snapshot")
    };

    let first = engine.create(probe()).map_err(err)?;
    first
        .wait_ready(Duration::from_secs(10), Duration::from_millis(1))
        .map_err(err)?;
    run(&first, "touch 3")?;
    first.pause().map_err(err)?;
    let fresh = read_state(&snapshot_dir(&first))?;
    first.resume().map_err(err)?;
    run(&first, "count")?;
    first.pause().map_err(err)?;
    let again = read_state(&snapshot_dir(&first))?;

    let two = engine.create(probe().vcpus(2)).map_err(err)?;
    run(&two, "echo template")?;
    two.snapshot("seed").map_err(err)?;
    let template = read_state(&data.path().join("templates").join("seed"))?;
    let clone = engine.create("seed").map_err(err)?;
    run(&clone, "touch 1")?;
    clone.pause().map_err(err)?;
    let from_template = read_state(&snapshot_dir(&clone))?;

    for c in [first, two, clone] {
        c.destroy().map_err(err)?;
    }
    Ok(vec![
        Seed::new("paused-fresh-probe", fresh),
        Seed::new("paused-again", again),
        Seed::new("template-two-vcpus", template),
        Seed::new("paused-from-template", from_template),
    ])
}

/// A `snapshot_state` seed is a `state.bin` the engine would resume from.
pub fn check_snapshot(data: &[u8]) -> Result<(), String> {
    if capsule::fuzzing::decode_snapshot_state(data) {
        Ok(())
    } else {
        Err("the engine rejects it".into())
    }
}
