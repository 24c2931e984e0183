//! Pause and resume on real KVM: exact continuation, persistence, auto-pause. Each test
//! runs for the probe and for Linux (`name::probe`, `name::linux`; see `common/kinds.rs`)
//! unless it says otherwise.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule::{CapsuleId, Error, Status};
use common::kinds::{for_both_kinds, wait_for_status, Kind};
use common::{engine, probe};

for_both_kinds!(
    pause_and_resume_continue_exactly,
    pause_resume_cycles,
    connect_resumes_a_paused_capsule,
    destroying_a_paused_capsule_deletes_its_files,
    pause_of_crashed_or_stopped_capsules_is_refused,
    inactivity_pauses_ping_keeps_alive_and_zero_never_pauses,
    a_new_engine_on_the_same_directory_resumes_paused_capsules,
);

fn pause_and_resume_continue_exactly(kind: Kind) {
    let Some((engine, dir)) = kind.engine() else {
        return;
    };
    let c = engine.create(kind.config().vcpus(2)).unwrap();
    assert_eq!(kind.out(&c, kind.count()), "1\n");
    let touched = kind.out(&c, &kind.touch(20));
    c.pause().unwrap();
    assert_eq!(c.status(), Status::Paused);
    assert!(matches!(
        kind.run(&c, kind.count()),
        Err(Error::InvalidState {
            status: Status::Paused,
            ..
        })
    ));
    let snapshot = dir
        .path()
        .join("capsules")
        .join(c.id().as_str())
        .join("snapshot");
    assert!(snapshot.join("state.bin").exists());
    c.pause().unwrap(); // pausing a paused capsule does nothing
    c.resume().unwrap();
    assert_eq!(c.status(), Status::Running);
    c.resume().unwrap(); // resuming a running capsule does nothing
    assert_eq!(kind.out(&c, kind.count()), "2\n");
    assert_eq!(kind.out(&c, kind.sum()), touched);
    assert_eq!(kind.out(&c, &kind.echo("back")), "back\n");
}

/// Two hundred cycles on the probe; six on Linux, whose every pause writes what the kernel
/// changed (far slower under nested TCG).
fn pause_resume_cycles(kind: Kind) {
    let Some((engine, _dir)) = kind.engine() else {
        return;
    };
    let (cycles, change_every) = kind.pick((200u32, 25), (6, 2));
    let c = engine.create(kind.config()).unwrap();
    let mut sum = kind.out(&c, &kind.touch(3));
    assert_eq!(kind.out(&c, kind.sum()), sum);
    for cycle in 1..=cycles {
        c.pause().unwrap();
        c.resume().unwrap();
        assert_eq!(kind.out(&c, kind.count()), format!("{cycle}\n"));
        assert_eq!(kind.out(&c, kind.sum()), sum, "cycle {cycle}");
        if cycle % change_every == 0 {
            // Change memory now and then, so later cycles restore new diff layers.
            kind.out(&c, &kind.touch(2));
            sum = kind.out(&c, kind.sum());
        }
    }
}

fn connect_resumes_a_paused_capsule(kind: Kind) {
    let Some((engine, _dir)) = kind.engine() else {
        return;
    };
    let c = engine.create(kind.config()).unwrap();
    kind.out(&c, kind.count());
    engine.pause(c.id()).unwrap();
    assert_eq!(engine.get(c.id()).unwrap().status(), Status::Paused);
    let again = engine.connect(c.id()).unwrap();
    assert!(again.is_running());
    assert_eq!(kind.out(&again, kind.count()), "2\n");
    engine.pause(c.id()).unwrap();
    engine.resume(c.id()).unwrap();
    assert_eq!(kind.out(&c, kind.count()), "3\n");
    let unknown: CapsuleId = "cl-nosuchcapsule".parse().unwrap();
    assert!(matches!(engine.connect(&unknown), Err(Error::NotFound(_))));
    assert!(matches!(engine.pause(&unknown), Err(Error::NotFound(_))));
    assert!(matches!(engine.resume(&unknown), Err(Error::NotFound(_))));
}

fn destroying_a_paused_capsule_deletes_its_files(kind: Kind) {
    let Some((engine, dir)) = kind.engine() else {
        return;
    };
    let c = engine.create(kind.config()).unwrap();
    c.pause().unwrap();
    let files = dir.path().join("capsules").join(c.id().as_str());
    assert!(files.exists());
    c.destroy().unwrap();
    assert!(!files.exists());
    assert!(matches!(
        c.resume(),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
    assert!(matches!(engine.get(c.id()), Err(Error::NotFound(_))));
}

fn pause_of_crashed_or_stopped_capsules_is_refused(kind: Kind) {
    let Some((engine, _dir)) = kind.engine() else {
        return;
    };
    let c = engine.create(kind.config()).unwrap();
    kind.crash(&c);
    assert!(matches!(c.pause(), Err(Error::GuestCrashed { .. })));
    assert!(matches!(c.resume(), Err(Error::GuestCrashed { .. })));
    assert!(matches!(c.ping(), Err(Error::GuestCrashed { .. })));
    assert!(matches!(c.fork(1), Err(Error::GuestCrashed { .. })));
    c.destroy().unwrap();
    assert!(matches!(
        c.pause(),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn inactivity_pauses_ping_keeps_alive_and_zero_never_pauses(kind: Kind) {
    let Some((engine, _dir)) =
        kind.engine_with(|c| c.idle_check_interval(Duration::from_millis(10)))
    else {
        return;
    };
    // Margins wide enough for a loaded CI machine or a nested TCG run: activity every 30 ms
    // (plus a command's latency), inactivity timeout 1 s (3 s for Linux, whose commands take
    // up to 100 ms there, and for the probe in the nested harness, where L1's two emulated
    // CPUs also run the Linux variant's boots), observed for 2.5 timeouts. The capsules in
    // use are kept busy from their creation on: a Linux boot there (5-16 s) outlasts the
    // timeout.
    let nested = std::env::var_os("CAPSULE_NESTED").is_some();
    let timeout = kind.pick(
        Duration::from_secs(if nested { 3 } else { 1 }),
        Duration::from_secs(3),
    );
    let idle = engine.create(kind.config().timeout(timeout)).unwrap();
    kind.out(&idle, kind.count());
    let pinged = engine.create(kind.config().timeout(timeout)).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // However the scope ends (a failed assertion too), the helpers stop, so the scope
        // can join them: a failure fails the test instead of hanging it.
        let _stop_helpers = StopOnDrop(&stop);
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                pinged.ping().unwrap();
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        let busy = engine.create(kind.config().timeout(timeout)).unwrap();
        let worker = busy.clone();
        let stop = &stop;
        s.spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                kind.out(&worker, &kind.echo("working"));
                std::thread::sleep(Duration::from_millis(30));
            }
        });
        let never = engine.create(kind.config()).unwrap();
        std::thread::sleep(timeout * 5 / 2);
        // An auto-pause writes its snapshot first: seconds under nested TCG (the probe's
        // too, beside the Linux variant's boots), milliseconds elsewhere.
        let deadline = Instant::now() + Duration::from_secs(60);
        assert_eq!(
            wait_for_status(&idle, Status::Paused, deadline),
            Status::Paused,
            "idle for longer than its timeout"
        );
        assert_eq!(pinged.status(), Status::Running, "ping is activity");
        assert_eq!(busy.status(), Status::Running, "commands are activity");
        assert_eq!(never.status(), Status::Running, "timeout 0 never pauses");
        stop.store(true, Ordering::SeqCst);
    });
    assert!(matches!(
        idle.ping(),
        Err(Error::InvalidState {
            status: Status::Paused,
            ..
        })
    ));
    // An auto-paused capsule resumes like any other, state intact.
    let idle = engine.connect(idle.id()).unwrap();
    assert_eq!(kind.out(&idle, kind.count()), "2\n");
    let deadline = Instant::now() + Duration::from_secs(60);
    assert_eq!(
        wait_for_status(&pinged, Status::Paused, deadline),
        Status::Paused,
        "once pings stop it pauses too"
    );
}

fn a_new_engine_on_the_same_directory_resumes_paused_capsules(kind: Kind) {
    let Some((engine, dir)) = kind.engine() else {
        return;
    };
    let open = || kind.open(dir.path());
    assert!(
        matches!(open(), Err(Error::DataDirLocked(_))),
        "one engine per directory"
    );
    let paused = engine.create(kind.config().vcpus(2)).unwrap();
    kind.out(&paused, kind.count());
    let sum = kind.out(&paused, &kind.touch(7));
    paused.pause().unwrap();
    let running = engine.create(kind.config()).unwrap();
    let (paused_id, running_id) = (paused.id().clone(), running.id().clone());
    drop((paused, running, engine));

    let engine = open().unwrap();
    let listed: HashMap<_, _> = engine
        .list()
        .into_iter()
        .map(|i| (i.id.clone(), i))
        .collect();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[&paused_id].status, Status::Paused);
    assert_eq!(
        (listed[&paused_id].vcpus, listed[&paused_id].memory_mb),
        (2, kind.memory_mb())
    );
    assert_eq!(
        listed[&running_id].status,
        Status::Stopped,
        "its process ended while it ran"
    );
    let c = engine.connect(&paused_id).unwrap();
    assert_eq!(kind.out(&c, kind.count()), "2\n");
    assert_eq!(kind.out(&c, kind.sum()), sum);
    assert!(matches!(
        engine.resume(&running_id),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
    engine.destroy(&running_id).unwrap();
    assert_eq!(engine.list().len(), 1);
}

/// Sixteen threads pause, resume and run commands on four capsules by id, at random. Every
/// transition must be legal, nothing may deadlock, and each capsule's counter must hand out
/// every value exactly once across all the pauses.
///
/// Probe only: a Linux pause does not wait for running commands, so a `count` frozen
/// mid-way is refused to its caller yet may still increment the counter after the resume,
/// and "every value exactly once" does not hold there by design.
#[test]
fn random_pause_resume_from_sixteen_threads() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let ids: Vec<CapsuleId> = (0..4)
        .map(|_| engine.create(probe()).unwrap().id().clone())
        .collect();
    let seen: Arc<Mutex<HashMap<CapsuleId, Vec<u64>>>> = Arc::default();
    let threads: Vec<_> = (0..16u64)
        .map(|t| {
            let (engine, ids, seen) = (engine.clone(), ids.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ t.wrapping_mul(0x2545_f491_4f6c_dd1d);
                for _ in 0..60 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let id = &ids[(state % 4) as usize];
                    match (state >> 8) % 4 {
                        0 => engine.pause(id).unwrap(),
                        1 => engine.resume(id).unwrap(),
                        _ => match engine.get(id).unwrap().commands().run("count") {
                            Ok(out) => {
                                let n: u64 = out.stdout_str().trim().parse().unwrap();
                                seen.lock().unwrap().entry(id.clone()).or_default().push(n);
                            }
                            Err(Error::InvalidState {
                                status: Status::Paused,
                                ..
                            }) => {}
                            Err(e) => panic!("unexpected error {e}"),
                        },
                    }
                    let status = engine.get(id).unwrap().status();
                    assert!(
                        matches!(status, Status::Running | Status::Paused),
                        "{status}"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let seen = seen.lock().unwrap();
    for id in &ids {
        let c = engine.connect(id).unwrap();
        let mut values = seen.get(id).cloned().unwrap_or_default();
        values.sort_unstable();
        let n = values.len() as u64;
        assert_eq!(
            values,
            (1..=n).collect::<Vec<_>>(),
            "every count value exactly once"
        );
        assert_eq!(
            c.commands().run("count").unwrap().stdout_str(),
            format!("{}\n", n + 1)
        );
    }
}
