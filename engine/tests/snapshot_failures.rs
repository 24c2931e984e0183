//! A corrupt, truncated or missing snapshot, or a write that fails mid-pause, gives a typed
//! error and loses nothing. Each test runs for the probe and for Linux (`name::probe`,
//! `name::linux`; see `common/kinds.rs`) unless it says otherwise.

mod common;

use std::path::PathBuf;

use capsule::{Capsule, Error, Status};
use common::kinds::{for_both_kinds, Kind};
use common::{engine, probe};

for_both_kinds!(
    a_corrupt_state_file_is_a_typed_error_and_the_capsule_stays_paused,
    a_truncated_or_missing_memory_file_is_a_typed_error,
    a_write_failure_mid_pause_keeps_the_capsule_running_and_its_files_intact,
    a_write_failure_on_the_first_pause_leaves_no_snapshot,
);

fn snapshot_dir(dir: &tempfile::TempDir, c: &Capsule) -> PathBuf {
    dir.path()
        .join("capsules")
        .join(c.id().as_str())
        .join("snapshot")
}

fn layers(dir: &PathBuf) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "layer"))
        .collect();
    v.sort();
    v
}

fn a_corrupt_state_file_is_a_typed_error_and_the_capsule_stays_paused(kind: Kind) {
    let Some((engine, dir)) = kind.engine() else {
        return;
    };
    let c = engine.create(kind.config()).unwrap();
    let other = engine.create(kind.config()).unwrap();
    kind.out(&c, kind.count());
    c.pause().unwrap();
    let state = snapshot_dir(&dir, &c).join("state.bin");
    let good = std::fs::read(&state).unwrap();

    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    std::fs::write(&state, &flipped).unwrap();
    assert!(matches!(c.resume(), Err(Error::Snapshot(_))));
    assert_eq!(c.status(), Status::Paused);

    std::fs::write(&state, &good[..good.len() / 2]).unwrap();
    assert!(matches!(c.resume(), Err(Error::Snapshot(_))));
    std::fs::write(&state, b"garbage").unwrap();
    assert!(matches!(c.resume(), Err(Error::Snapshot(_))));
    std::fs::remove_file(&state).unwrap();
    assert!(matches!(c.resume(), Err(Error::Snapshot(_))));
    assert_eq!(c.status(), Status::Paused);

    // Another capsule is unaffected; the broken one can still be destroyed.
    assert_eq!(kind.out(&other, &kind.echo("fine")), "fine\n");
    std::fs::write(&state, &good).unwrap();
    c.resume().unwrap();
    assert_eq!(kind.out(&c, kind.count()), "2\n");
    c.destroy().unwrap();
}

fn a_truncated_or_missing_memory_file_is_a_typed_error(kind: Kind) {
    let Some((engine, dir)) = kind.engine() else {
        return;
    };
    let c = engine.create(kind.config()).unwrap();
    kind.out(&c, &kind.touch(10));
    c.pause().unwrap();
    let snap = snapshot_dir(&dir, &c);
    let base = layers(&snap).pop().unwrap();
    let saved = std::fs::read(&base).unwrap();

    std::fs::OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert!(matches!(c.resume(), Err(Error::Snapshot(_))));
    assert_eq!(c.status(), Status::Paused);

    std::fs::remove_file(&base).unwrap();
    assert!(matches!(
        c.resume(),
        Err(Error::Io { .. } | Error::Snapshot(_))
    ));
    assert_eq!(c.status(), Status::Paused);

    std::fs::write(&base, saved).unwrap();
    c.resume().unwrap();
    assert_eq!(
        kind.run(&c, &kind.echo("whole again")).unwrap().exit_code,
        Some(0)
    );
}

fn a_write_failure_mid_pause_keeps_the_capsule_running_and_its_files_intact(kind: Kind) {
    let Some((engine, dir)) = kind.engine() else {
        return;
    };
    let c = engine.create(kind.config()).unwrap();
    kind.out(&c, kind.count());
    let first_sum = kind.out(&c, &kind.touch(64));
    c.pause().unwrap();
    c.resume().unwrap();
    let snap = snapshot_dir(&dir, &c);
    // A resumed capsule's snapshot is retired (it runs on from it); its layers stay.
    assert!(!snap.join("state.bin").exists());
    let layers_before = layers(&snap);
    assert!(!layers_before.is_empty());

    let second_sum = kind.out(&c, &kind.touch(64));
    engine.inject_write_fault(Some(8192)); // fails 2 pages into the new layer
    assert!(matches!(c.pause(), Err(Error::Snapshot(_))));
    assert_eq!(c.status(), Status::Running, "the capsule keeps running");
    assert_eq!(kind.out(&c, kind.count()), "2\n");
    assert!(
        !snap.join("state.bin").exists(),
        "no half-written snapshot reads as valid"
    );
    assert_eq!(
        layers(&snap),
        layers_before,
        "no half-written layer left behind"
    );
    assert_ne!(first_sum, second_sum);

    // The next pause works and everything written since the last good snapshot is there.
    let sum = kind.out(&c, kind.sum());
    assert_ne!(sum, first_sum);
    c.pause().unwrap();
    c.resume().unwrap();
    assert_eq!(kind.out(&c, kind.count()), "3\n");
    assert_eq!(kind.out(&c, kind.sum()), sum);
}

fn a_write_failure_on_the_first_pause_leaves_no_snapshot(kind: Kind) {
    let Some((engine, dir)) = kind.engine() else {
        return;
    };
    let c = engine.create(kind.config()).unwrap();
    kind.out(&c, &kind.touch(8));
    engine.inject_write_fault(Some(0));
    assert!(matches!(c.pause(), Err(Error::Snapshot(_))));
    assert!(c.is_running());
    assert!(!snapshot_dir(&dir, &c).join("state.bin").exists());
    c.pause().unwrap();
    c.resume().unwrap();
}

/// What the `snapshot_state` fuzz target checks, run deterministically: mutated and
/// truncated copies of a real `state.bin` are rejected or accepted, never a panic.
///
/// Probe only: thousands of decodes are slow under the nested harness's emulated CPUs, and
/// Linux states have their own fuzz target and golden file.
#[test]
fn mutated_state_files_never_panic_the_decoder() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let c = engine.create(probe().vcpus(2)).unwrap();
    c.commands().run("touch 3").unwrap();
    c.pause().unwrap();
    let good = std::fs::read(snapshot_dir(&dir, &c).join("state.bin")).unwrap();
    assert!(capsule::fuzzing::decode_snapshot_state(&good));
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for len in (0..good.len()).step_by(97) {
        assert!(!capsule::fuzzing::decode_snapshot_state(&good[..len]));
    }
    for _ in 0..3000 {
        let mut bytes = good.clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % bytes.len();
            bytes[at] = next() as u8;
        }
        let _ = capsule::fuzzing::decode_snapshot_state(&bytes);
    }
}
