//! A process killed at any moment (mid-pause included) never leaves a snapshot that reads as
//! valid but is not, and never loses the last good state.
//!
//! The test re-runs its own binary as a child that pauses and resumes a capsule in a loop,
//! kills it with SIGKILL at varying moments, then opens the data directory with a new engine.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use capsule::{CapsuleConfig, Engine, EngineConfig, Status};

const CHILD_DIR: &str = "CAPSULE_CRASH_CHILD_DIR";

/// The child's work when run by the parent (a no-op in a normal test run).
#[test]
fn child_pause_loop() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let engine = Engine::new(EngineConfig::builder().data_dir(&dir)).unwrap();
    let c = engine
        .create(CapsuleConfig::builder("probe").memory_mb(64))
        .unwrap();
    println!("ready");
    for round in 0u64.. {
        c.commands()
            .run(format!("touch {}", 64 + round % 512))
            .unwrap();
        c.commands().run("count").unwrap();
        c.pause().unwrap();
        // Stay paused a little, so that kills land both mid-pause and while paused.
        std::thread::sleep(Duration::from_millis(15));
        c.resume().unwrap();
    }
}

#[test]
fn a_process_killed_mid_pause_leaves_a_usable_snapshot() {
    if common::engine().is_none() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut outcomes = Vec::new();
    for (round, delay_ms) in [90u64, 170, 260, 333, 410, 520].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(&exe)
            .args([
                "child_pause_loop",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Wait for the capsule to exist, then let it pause and resume for a while.
        let mut out = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !String::from_utf8_lossy(&seen).contains("ready") {
            use std::io::Read;
            if out.read(&mut byte).unwrap() == 0 {
                panic!("child ended early: {}", String::from_utf8_lossy(&seen));
            }
            seen.push(byte[0]);
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();

        let engine = Engine::new(EngineConfig::builder().data_dir(dir.path())).unwrap();
        let listed = engine.list();
        assert_eq!(
            listed.len(),
            1,
            "round {round}: the capsule is never dropped"
        );
        let info = &listed[0];
        outcomes.push(info.status);
        match info.status {
            Status::Paused => {
                // The last committed snapshot must resume and work.
                let c = engine.connect(&info.id).unwrap();
                let n: u64 = c
                    .commands()
                    .run("count")
                    .unwrap()
                    .stdout_str()
                    .trim()
                    .parse()
                    .unwrap();
                assert!(n >= 1, "round {round}: count continues ({n})");
                let sum = c.commands().run("sum").unwrap().stdout_str().into_owned();
                c.pause().unwrap();
                c.resume().unwrap();
                assert_eq!(
                    c.commands().run("sum").unwrap().stdout_str().into_owned(),
                    sum
                );
            }
            Status::Stopped => {} // killed while running: reported, not resumable
            other => panic!("round {round}: unexpected status {other}"),
        }
    }
    eprintln!("outcomes: {outcomes:?}");
    assert!(
        outcomes.contains(&Status::Paused),
        "some kill must land while paused: {outcomes:?}"
    );
}
