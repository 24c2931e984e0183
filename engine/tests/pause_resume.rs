//! Pause and resume on real KVM: exact continuation, persistence, auto-pause.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule::{CapsuleId, Engine, EngineConfig, Error, Status};
use common::{engine, engine_with, probe};

#[test]
fn pause_and_resume_continue_exactly() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let c = engine.create(probe().vcpus(2)).unwrap();
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "1\n"
    );
    let touched = c
        .commands()
        .run("touch 20")
        .unwrap()
        .stdout_str()
        .into_owned();
    c.pause().unwrap();
    assert_eq!(c.status(), Status::Paused);
    assert!(matches!(
        c.commands().run("count"),
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
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "2\n"
    );
    assert_eq!(
        c.commands().run("sum").unwrap().stdout_str().into_owned(),
        touched
    );
    assert_eq!(
        c.commands()
            .run("echo back")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "back\n"
    );
}

#[test]
fn two_hundred_pause_resume_cycles() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let mut sum = c
        .commands()
        .run("touch 3")
        .unwrap()
        .stdout_str()
        .into_owned();
    assert_eq!(
        c.commands().run("sum").unwrap().stdout_str().into_owned(),
        sum
    );
    for cycle in 1..=200u32 {
        c.pause().unwrap();
        c.resume().unwrap();
        assert_eq!(
            c.commands().run("count").unwrap().stdout_str().into_owned(),
            format!("{cycle}\n")
        );
        assert_eq!(
            c.commands().run("sum").unwrap().stdout_str().into_owned(),
            sum,
            "cycle {cycle}"
        );
        if cycle % 25 == 0 {
            // Change memory now and then, so later cycles restore new diff layers.
            c.commands().run("touch 2").unwrap();
            sum = c.commands().run("sum").unwrap().stdout_str().into_owned();
        }
    }
}

#[test]
fn connect_resumes_a_paused_capsule() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    c.commands().run("count").unwrap();
    engine.pause(c.id()).unwrap();
    assert_eq!(engine.get(c.id()).unwrap().status(), Status::Paused);
    let again = engine.connect(c.id()).unwrap();
    assert!(again.is_running());
    assert_eq!(
        again
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "2\n"
    );
    engine.pause(c.id()).unwrap();
    engine.resume(c.id()).unwrap();
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "3\n"
    );
    let unknown: CapsuleId = "cl-nosuchcapsule".parse().unwrap();
    assert!(matches!(engine.connect(&unknown), Err(Error::NotFound(_))));
    assert!(matches!(engine.pause(&unknown), Err(Error::NotFound(_))));
    assert!(matches!(engine.resume(&unknown), Err(Error::NotFound(_))));
}

#[test]
fn destroying_a_paused_capsule_deletes_its_files() {
    let Some((engine, dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
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

#[test]
fn pause_of_crashed_or_stopped_capsules_is_refused() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let _ = c.commands().run("crash");
    assert!(matches!(c.pause(), Err(Error::GuestCrashed { .. })));
    assert!(matches!(c.resume(), Err(Error::GuestCrashed { .. })));
    assert!(matches!(c.ping(), Err(Error::GuestCrashed { .. })));
    c.destroy().unwrap();
    assert!(matches!(
        c.pause(),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
}

#[test]
fn inactivity_pauses_ping_keeps_alive_and_zero_never_pauses() {
    let Some((engine, _dir)) = engine_with(|c| c.idle_check_interval(Duration::from_millis(10)))
    else {
        return;
    };
    // Margins wide enough for a loaded CI machine or a nested TCG run: activity every 30 ms
    // (plus a command's latency), inactivity timeout 1 s, observed for 2.5 s.
    let timeout = Duration::from_secs(1);
    let idle = engine.create(probe().timeout(timeout)).unwrap();
    let pinged = engine.create(probe().timeout(timeout)).unwrap();
    let busy = engine.create(probe().timeout(timeout)).unwrap();
    let never = engine.create(probe()).unwrap();
    idle.commands().run("count").unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        pinged.ping().unwrap();
        busy.commands().run("echo working").unwrap();
        std::thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(
        idle.status(),
        Status::Paused,
        "idle for longer than its timeout"
    );
    assert_eq!(pinged.status(), Status::Running, "ping is activity");
    assert_eq!(busy.status(), Status::Running, "commands are activity");
    assert_eq!(never.status(), Status::Running, "timeout 0 never pauses");
    assert!(matches!(
        idle.ping(),
        Err(Error::InvalidState {
            status: Status::Paused,
            ..
        })
    ));
    // An auto-paused capsule resumes like any other, state intact.
    let idle = engine.connect(idle.id()).unwrap();
    assert_eq!(
        idle.commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "2\n"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while pinged.status() == Status::Running && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        pinged.status(),
        Status::Paused,
        "once pings stop it pauses too"
    );
}

#[test]
fn a_new_engine_on_the_same_directory_resumes_paused_capsules() {
    let dir = tempfile::tempdir().unwrap();
    let open = || Engine::new(EngineConfig::builder().data_dir(dir.path()));
    let engine = match open() {
        Ok(e) => e,
        Err(Error::KvmUnavailable { .. }) if !std::path::Path::new("/dev/kvm").exists() => {
            eprintln!("SKIPPED: /dev/kvm does not exist on this host");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert!(
        matches!(open(), Err(Error::DataDirLocked(_))),
        "one engine per directory"
    );
    let paused = engine.create(probe().vcpus(2)).unwrap();
    paused.commands().run("count").unwrap();
    let sum = paused
        .commands()
        .run("touch 7")
        .unwrap()
        .stdout_str()
        .into_owned();
    paused.pause().unwrap();
    let running = engine.create(probe()).unwrap();
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
        (2, 32)
    );
    assert_eq!(
        listed[&running_id].status,
        Status::Stopped,
        "its process ended while it ran"
    );
    let c = engine.connect(&paused_id).unwrap();
    assert_eq!(
        c.commands().run("count").unwrap().stdout_str().into_owned(),
        "2\n"
    );
    assert_eq!(
        c.commands().run("sum").unwrap().stdout_str().into_owned(),
        sum
    );
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
            c.commands().run("count").unwrap().stdout_str().into_owned(),
            format!("{}\n", n + 1)
        );
    }
}
