//! Auto-pause never pauses a capsule in use: a command running longer than the timeout, a
//! command or ping arriving while the watcher is pausing, a boot longer than the timeout.
//! The races are made deterministic by holding the watcher at each point of its pause.
//! Each test runs for the probe and for Linux (`name::probe`, `name::linux`; see
//! `common/kinds.rs`); Linux timeouts are longer, as its commands take up to 100 ms and its
//! boots 5-16 s in the nested harness.

mod common;

use std::time::{Duration, Instant};

use capsule::testing::{AutoPauseHold, AutoPausePoint};
use capsule::{Capsule, Engine, Error, RunOptions, Status};
use common::kinds::{for_both_kinds, wait_for_status, Kind};

for_both_kinds!(
    a_command_longer_than_the_timeout_is_activity_until_it_ends,
    a_command_after_the_idle_decision_cancels_the_pause,
    a_ping_after_the_idle_decision_cancels_the_pause,
    a_command_sent_to_a_frozen_capsule_cancels_the_pause_and_runs,
    a_command_sent_while_the_snapshot_is_written_cancels_the_pause_and_runs,
    the_idle_clock_starts_when_the_capsule_is_running,
    deleting_a_template_waits_for_a_clone_being_paused_to_release_it,
    a_clone_frozen_for_its_auto_pause_is_one_user_of_its_template,
);

/// An engine whose watcher looks every 5 ms.
fn engine(kind: Kind) -> Option<(Engine, tempfile::TempDir)> {
    kind.engine_with(|c| c.idle_check_interval(Duration::from_millis(5)))
}

/// How long the watcher may take to reach a point of its pause: the capsule's start, its
/// timeout and (for the later points) a Linux snapshot written under nested TCG.
fn watcher_patience(kind: Kind) -> Duration {
    kind.pick(
        Duration::from_secs(20),
        kind.start_patience() + Duration::from_secs(60),
    )
}

/// Asserts `capsule` stays running (and answers) for `period`.
fn stays_running(capsule: &Capsule, period: Duration) {
    let until = Instant::now() + period;
    while Instant::now() < until {
        assert_eq!(capsule.status(), Status::Running);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn a_command_longer_than_the_timeout_is_activity_until_it_ends(kind: Kind) {
    let Some((engine, _dir)) = engine(kind) else {
        return;
    };
    let timeout = kind.pick(Duration::from_secs(1), Duration::from_secs(3));
    // The watcher is held where it decides to pause: a decision during the command shows
    // there, and no scheduling delay of this thread after the command can turn into a
    // pause before the checks below.
    let hold = engine.hold_auto_pause(AutoPausePoint::Decided);
    let capsule = engine.create(kind.config().timeout(timeout)).unwrap();
    let command = kind.long_command(&capsule, timeout * 4);
    let t = Instant::now();
    capsule
        .commands()
        .run_with(&command, RunOptions::new().no_timeout())
        .unwrap();
    let took = t.elapsed();
    let decided = hold.wait_reached(Duration::ZERO);
    assert!(took > timeout * 3 / 2, "{took:?}");
    assert!(
        !decided,
        "the watcher decided to pause a capsule busy with a command (the command took {took:?})"
    );
    assert_eq!(capsule.status(), Status::Running);
    // The capsule was busy, not idle, for the whole command.
    assert_eq!(kind.out(&capsule, kind.count()), "1\n");
    // Idle afterwards, it is paused as usual.
    drop(hold);
    let deadline = Instant::now() + kind.pick(Duration::from_secs(10), Duration::from_secs(60));
    assert_eq!(
        wait_for_status(&capsule, Status::Paused, deadline),
        Status::Paused
    );
}

/// Holds the watcher at `point` of its pause of an idle capsule (timeout 1 s; 3 s for
/// Linux), runs `in_use` meanwhile, releases it, and checks the capsule was not paused. A
/// command `in_use` left running in the background must answer "1" before the next one is
/// sent (on Linux two counts at once may both read the old value).
fn use_during_auto_pause(
    kind: Kind,
    point: AutoPausePoint,
    in_use: impl FnOnce(&Capsule) -> Option<std::thread::JoinHandle<String>>,
) {
    let Some((engine, dir)) = engine(kind) else {
        return;
    };
    let timeout = kind.pick(Duration::from_secs(1), Duration::from_secs(3));
    let hold = engine.hold_auto_pause(point);
    let capsule = engine.create(kind.config().timeout(timeout)).unwrap();
    assert!(
        hold.wait_reached(watcher_patience(kind)),
        "the watcher never reached {point:?}"
    );
    let waiting = in_use(&capsule);
    drop(hold);
    if let Some(waiting) = waiting {
        assert_eq!(waiting.join().unwrap(), "1\n");
    }
    // The use restarted the inactivity clock: nothing may pause it for a timeout.
    stays_running(&capsule, timeout * 2 / 5);
    assert_eq!(kind.out(&capsule, kind.count()), "2\n");
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

/// Runs the counter on another thread (it waits while the guest is frozen) and returns once
/// the engine has counted it as activity.
fn count_in_background(kind: Kind, capsule: &Capsule) -> std::thread::JoinHandle<String> {
    let before = capsule.info().last_activity;
    let runner = capsule.clone();
    let handle = std::thread::spawn(move || kind.out(&runner, kind.count()));
    let deadline = Instant::now() + Duration::from_secs(5);
    while capsule.info().last_activity == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    handle
}

fn a_command_after_the_idle_decision_cancels_the_pause(kind: Kind) {
    use_during_auto_pause(kind, AutoPausePoint::Decided, |c| {
        assert_eq!(kind.out(c, kind.count()), "1\n");
        None
    });
}

fn a_ping_after_the_idle_decision_cancels_the_pause(kind: Kind) {
    use_during_auto_pause(kind, AutoPausePoint::Decided, |c| {
        c.ping().unwrap();
        kind.out(c, kind.count());
        None
    });
}

fn a_command_sent_to_a_frozen_capsule_cancels_the_pause_and_runs(kind: Kind) {
    use_during_auto_pause(kind, AutoPausePoint::Frozen, |c| {
        Some(count_in_background(kind, c))
    });
}

fn a_command_sent_while_the_snapshot_is_written_cancels_the_pause_and_runs(kind: Kind) {
    use_during_auto_pause(kind, AutoPausePoint::Written, |c| {
        Some(count_in_background(kind, c))
    });
}

/// Waiting for a start slot is not idleness, and neither is a Linux boot (5-16 s in the
/// nested harness, longer than its 3 s timeout).
fn the_idle_clock_starts_when_the_capsule_is_running(kind: Kind) {
    let Some((engine, _dir)) = kind.engine_with(|c| {
        c.idle_check_interval(Duration::from_millis(5))
            .max_concurrent_starts(1)
    }) else {
        return;
    };
    let timeout = kind.pick(Duration::from_millis(300), Duration::from_secs(3));
    let slot = engine.hold_start_slot();
    let capsule = engine
        .create(kind.config().timeout(timeout).wait(false))
        .unwrap();
    // Waiting to start for longer than its timeout is not idleness.
    std::thread::sleep(timeout * 2);
    assert_eq!(capsule.status(), Status::Pending);
    drop(slot);
    capsule
        .wait_ready(kind.start_patience(), Duration::from_millis(1))
        .unwrap();
    assert_eq!(kind.out(&capsule, kind.count()), "1\n");
    assert_eq!(capsule.status(), Status::Running);
}

/// A clone of a new template `name` (its source destroyed) with a 100 ms timeout, once the
/// watcher's auto-pause of it has reached `point` and is held there.
fn idle_clone_held_at(
    engine: &Engine,
    kind: Kind,
    name: &str,
    point: AutoPausePoint,
) -> (Capsule, AutoPauseHold) {
    let source = engine.create(kind.config()).unwrap();
    source.snapshot(name).unwrap();
    source.destroy().unwrap();
    let hold = engine.hold_auto_pause(point);
    let clone = engine
        .create(capsule::CapsuleConfig::builder(name).timeout(Duration::from_millis(100)))
        .unwrap();
    assert!(hold.wait_reached(watcher_patience(kind)));
    (clone, hold)
}

fn deleting_a_template_waits_for_a_clone_being_paused_to_release_it(kind: Kind) {
    let Some((engine, _dir)) = engine(kind) else {
        return;
    };
    // Hold the watcher after its pause of the clone is committed, before the clone's VM,
    // which maps the template, is released.
    let (clone, hold) = idle_clone_held_at(&engine, kind, "released", AutoPausePoint::Committed);
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
    assert_eq!(kind.out(&clone, &kind.echo("on")), "on\n");
}

/// A clone whose auto-pause has frozen it (and holds the snapshot in progress) still counts
/// as one capsule using its template, not two (the soak saw `used by 2 running capsule(s)`
/// with one clone: the snapshot's copy of the memory origin pinned the template too).
fn a_clone_frozen_for_its_auto_pause_is_one_user_of_its_template(kind: Kind) {
    let Some((engine, _dir)) = engine(kind) else {
        return;
    };
    let (clone, hold) = idle_clone_held_at(&engine, kind, "frozen-clone", AutoPausePoint::Frozen);
    assert_eq!(clone.status(), Status::Running);
    match engine.delete_template("frozen-clone") {
        Err(Error::TemplateInUse { capsules, .. }) => assert_eq!(capsules, 1),
        other => panic!("expected TemplateInUse, got {other:?}"),
    }
    drop(hold);
    let paused = wait_for_status(
        &clone,
        Status::Paused,
        std::time::Instant::now() + watcher_patience(kind),
    );
    assert_eq!(paused, Status::Paused);
    engine.delete_template("frozen-clone").unwrap();
    clone.resume().unwrap();
    assert_eq!(kind.out(&clone, &kind.echo("on")), "on\n");
}

/// Dropping the last handles of an engine while its watcher is in the middle of an
/// auto-pause waits for the watcher, so the data directory is free once the drop returns
/// (the watcher holds the engine for that moment; the engine used to go later, on the
/// watcher's thread, and a new engine on the directory got `DataDirLocked`).
#[test]
fn dropping_the_engine_waits_for_its_watcher_and_frees_the_directory() {
    let Some((engine, dir)) = engine(Kind::Probe) else {
        return;
    };
    let hold = engine.hold_auto_pause(AutoPausePoint::Decided);
    let capsule = engine
        .create(Kind::Probe.config().timeout(Duration::from_millis(200)))
        .unwrap();
    assert!(
        hold.wait_reached(Duration::from_secs(30)),
        "the watcher did not decide"
    );
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(hold);
    });
    drop((capsule, engine));
    let reopened = Engine::new(capsule::EngineConfig::builder().data_dir(dir.path()));
    assert!(reopened.is_ok(), "{:?}", reopened.err());
    release.join().unwrap();
}
