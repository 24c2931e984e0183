//! A corrupt, truncated or missing snapshot, or a write that fails mid-pause, gives a typed
//! error and loses nothing.

mod common;

use std::path::PathBuf;

use capsule::{Capsule, Error, Status};
use common::{engine, probe};

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

#[test]
fn a_corrupt_state_file_is_a_typed_error_and_the_capsule_stays_paused() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let other = engine.create(probe()).unwrap();
    c.commands().run("count").unwrap();
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
    assert_eq!(
        other
            .commands()
            .run("echo fine")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "fine\n"
    );
    std::fs::write(&state, &good).unwrap();
    c.resume().unwrap();
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "2\n"
    );
    c.destroy().unwrap();
}

#[test]
fn a_truncated_or_missing_memory_file_is_a_typed_error() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    c.commands().run("touch 10").unwrap();
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
        c.commands().run("echo whole again").unwrap().exit_code,
        Some(0)
    );
}

#[test]
fn a_write_failure_mid_pause_keeps_the_capsule_running_and_its_files_intact() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    c.commands().run("count").unwrap();
    let first_sum = c
        .commands()
        .run("touch 64")
        .unwrap()
        .stdout_str()
        .into_owned();
    c.pause().unwrap();
    c.resume().unwrap();
    let snap = snapshot_dir(&dir, &c);
    // A resumed capsule's snapshot is retired (it runs on from it); its layers stay.
    assert!(!snap.join("state.bin").exists());
    let layers_before = layers(&snap);
    assert!(!layers_before.is_empty());

    let second_sum = c
        .commands()
        .run("touch 64")
        .unwrap()
        .stdout_str()
        .into_owned();
    engine.inject_write_fault(Some(8192)); // fails 2 pages into the new layer
    assert!(matches!(c.pause(), Err(Error::Snapshot(_))));
    assert_eq!(c.status(), Status::Running, "the capsule keeps running");
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "2\n"
    );
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
    let sum = c.commands().run("sum").unwrap().stdout_str().into_owned();
    assert_ne!(sum, first_sum);
    c.pause().unwrap();
    c.resume().unwrap();
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "3\n"
    );
    assert_eq!(
        c.commands().run("sum").unwrap().stdout_str().into_owned(),
        sum
    );
}

#[test]
fn a_write_failure_on_the_first_pause_leaves_no_snapshot() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    c.commands().run("touch 8").unwrap();
    engine.inject_write_fault(Some(0));
    assert!(matches!(c.pause(), Err(Error::Snapshot(_))));
    assert!(c.is_running());
    assert!(!snapshot_dir(&dir, &c).join("state.bin").exists());
    c.pause().unwrap();
    c.resume().unwrap();
}

/// What the `snapshot_state` fuzz target checks, run deterministically: mutated and
/// truncated copies of a real `state.bin` are rejected or accepted, never a panic.
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
