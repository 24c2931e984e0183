//! Auto-pause never pauses a capsule in use: a command running longer than the timeout, a
//! command or ping arriving while the watcher is pausing, a boot longer than the timeout.
//! The races are made deterministic by holding the watcher at each point of its pause.

mod common;

use std::time::{Duration, Instant};

use capsule::testing::AutoPausePoint;
use capsule::{Capsule, Engine, Status};
use common::{engine_with, probe};

/// An engine whose watcher looks every 5 ms.
fn engine() -> Option<(Engine, tempfile::TempDir)> {
    engine_with(|c| c.idle_check_interval(Duration::from_millis(5)))
}

/// A `spin` argument that keeps a probe vCPU busy for about `wanted` on this host: the
/// calibration spin grows until it takes at least 100 ms, so that a command's own cost (an
/// exit, milliseconds under nested TCG) does not count as spinning.
fn spin_for(capsule: &Capsule, wanted: Duration) -> u64 {
    let mut probe = 1_000_000u64;
    loop {
        let t = Instant::now();
        capsule
            .commands()
            .run_with(
                format!("spin {probe}"),
                capsule::RunOptions::new().no_timeout(),
            )
            .unwrap();
        let took = t.elapsed();
        if took >= Duration::from_millis(100) || probe >= 1 << 40 {
            return (wanted.as_secs_f64() / took.as_secs_f64() * probe as f64) as u64;
        }
        probe *= 4;
    }
}

/// Asserts `capsule` stays running (and answers) for `period`.
fn stays_running(capsule: &Capsule, period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        assert_eq!(capsule.status(), Status::Running);
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_command_longer_than_the_timeout_is_activity_until_it_ends() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let capsule = engine
        .create(probe().timeout(Duration::from_millis(200)))
        .unwrap();
    let n = spin_for(&capsule, Duration::from_millis(800));
    let t = Instant::now();
    capsule
        .commands()
        .run_with(format!("spin {n}"), capsule::RunOptions::new().no_timeout())
        .unwrap();
    assert!(
        t.elapsed() > Duration::from_millis(300),
        "{:?}",
        t.elapsed()
    );
    // Sent at once: the capsule was busy, not idle, for the whole command.
    assert_eq!(
        capsule
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "1\n"
    );
    assert_eq!(capsule.status(), Status::Running);
    // Idle afterwards, it is paused as usual.
    let deadline = Instant::now() + Duration::from_secs(10);
    while capsule.status() == Status::Running && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(capsule.status(), Status::Paused);
}

/// Holds the watcher at `point` of its pause of an idle capsule (timeout 1 s), runs
/// `in_use` meanwhile, releases it, and checks the capsule was not paused.
fn use_during_auto_pause(point: AutoPausePoint, in_use: impl FnOnce(&Capsule)) {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let hold = engine.hold_auto_pause(point);
    let capsule = engine
        .create(probe().timeout(Duration::from_secs(1)))
        .unwrap();
    assert!(
        hold.wait_reached(Duration::from_secs(20)),
        "the watcher never reached {point:?}"
    );
    in_use(&capsule);
    drop(hold);
    // The use restarted the inactivity clock: nothing may pause it for a second.
    stays_running(&capsule, Duration::from_millis(400));
    assert_eq!(
        capsule
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "2\n"
    );
    let state = dir
        .path()
        .join("capsules")
        .join(capsule.id().as_str())
        .join("snapshot/state.bin");
    assert!(
        !state.exists(),
        "an abandoned pause leaves no snapshot to roll back to"
    );
}

/// Runs `count` on another thread (it waits while the guest is frozen) and returns once the
/// engine has counted it as activity.
fn count_in_background(capsule: &Capsule) -> std::thread::JoinHandle<String> {
    let before = capsule.info().last_activity;
    let runner = capsule.clone();
    let handle = std::thread::spawn(move || {
        runner
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned()
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while capsule.info().last_activity == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    handle
}

#[test]
fn a_command_after_the_idle_decision_cancels_the_pause() {
    use_during_auto_pause(AutoPausePoint::Decided, |c| {
        assert_eq!(
            c.commands().run("count").unwrap().stdout_str().into_owned(),
            "1\n"
        );
    });
}

#[test]
fn a_ping_after_the_idle_decision_cancels_the_pause() {
    use_during_auto_pause(AutoPausePoint::Decided, |c| {
        c.ping().unwrap();
        c.commands().run("count").unwrap();
    });
}

#[test]
fn a_command_sent_to_a_frozen_capsule_cancels_the_pause_and_runs() {
    let mut waiting = None;
    use_during_auto_pause(AutoPausePoint::Frozen, |c| {
        waiting = Some(count_in_background(c));
    });
    if let Some(waiting) = waiting {
        assert_eq!(waiting.join().unwrap(), "1\n");
    }
}

#[test]
fn a_command_sent_while_the_snapshot_is_written_cancels_the_pause_and_runs() {
    let mut waiting = None;
    use_during_auto_pause(AutoPausePoint::Written, |c| {
        waiting = Some(count_in_background(c));
    });
    if let Some(waiting) = waiting {
        assert_eq!(waiting.join().unwrap(), "1\n");
    }
}

#[test]
fn the_idle_clock_starts_when_the_capsule_is_running() {
    let Some((engine, _dir)) = engine_with(|c| {
        c.idle_check_interval(Duration::from_millis(5))
            .max_concurrent_starts(1)
    }) else {
        return;
    };
    let slot = engine.hold_start_slot();
    let capsule = engine
        .create(probe().timeout(Duration::from_millis(300)).wait(false))
        .unwrap();
    // Waiting to start for longer than its timeout is not idleness.
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(capsule.status(), Status::Pending);
    drop(slot);
    capsule
        .wait_ready(Duration::from_secs(20), Duration::from_millis(1))
        .unwrap();
    assert_eq!(
        capsule
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "1\n"
    );
    assert_eq!(capsule.status(), Status::Running);
}

#[test]
fn deleting_a_template_waits_for_a_clone_being_paused_to_release_it() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let source = engine.create(probe()).unwrap();
    source.snapshot("released").unwrap();
    source.destroy().unwrap();
    // Hold the watcher after its pause of the clone is committed, before the clone's VM,
    // which maps the template, is released.
    let hold = engine.hold_auto_pause(AutoPausePoint::Committed);
    let clone = engine
        .create(capsule::CapsuleConfig::builder("released").timeout(Duration::from_millis(100)))
        .unwrap();
    assert!(hold.wait_reached(Duration::from_secs(20)));
    assert_eq!(clone.status(), Status::Paused);
    let deleting = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.delete_template("released"))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !deleting.is_finished(),
        "the delete waits for the pause to finish"
    );
    drop(hold);
    // A paused capsule never blocks deletion.
    deleting.join().unwrap().unwrap();
    clone.resume().unwrap();
    assert_eq!(
        clone
            .commands()
            .run("echo on")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "on\n"
    );
}
