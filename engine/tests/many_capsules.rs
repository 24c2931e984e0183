//! Many capsules at once, one engine shared by many threads, and isolation of failures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use capsule::{Error, RunOptions, Status};
use common::{engine, probe};

#[test]
fn a_crash_leaves_ten_other_capsules_answering() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let others: Vec<_> = (0..10).map(|_| engine.create(probe()).unwrap()).collect();
    let victim = engine.create(probe()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = others
        .iter()
        .cloned()
        .map(|c| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || n < 5 {
                    n += 1;
                    assert_eq!(
                        c.commands().run("count").unwrap().stdout_str().into_owned(),
                        format!("{n}\n")
                    );
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(20));
    assert!(matches!(
        victim.commands().run("crash"),
        Err(Error::GuestCrashed { .. })
    ));
    assert_eq!(victim.status(), Status::Error);
    std::thread::sleep(Duration::from_millis(20));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        assert!(w.join().unwrap() >= 5);
    }
    for c in &others {
        assert!(c.is_running());
        assert_eq!(
            c.commands()
                .run("echo fine")
                .unwrap()
                .stdout_str()
                .into_owned(),
            "fine\n"
        );
    }
}

#[test]
fn fifty_capsules_at_once() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let creators: Vec<_> = (0..5)
        .map(|_| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| engine.create(probe()).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let capsules: Vec<_> = creators
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(capsules.len(), 50);
    assert_eq!(engine.list().len(), 50);
    assert!(engine.list().iter().all(|i| i.status == Status::Running));
    for (i, c) in capsules.iter().enumerate() {
        assert_eq!(
            c.commands()
                .run(format!("echo {i}"))
                .unwrap()
                .stdout_str()
                .into_owned(),
            format!("{i}\n")
        );
    }
    for c in &capsules {
        c.destroy().unwrap();
    }
    assert!(engine.list().is_empty());
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_hundred_512_mib_capsules_fit_when_each_touches_little() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let before = rss_kib();
    let capsules: Vec<_> = (0..100)
        .map(|_| {
            engine
                .create(capsule::CapsuleConfig::builder("probe").memory_mb(512))
                .unwrap()
        })
        .collect();
    for c in &capsules {
        assert_eq!(c.commands().run("touch 4").unwrap().exit_code, Some(0));
    }
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    // 100 x 512 MiB = 50 GiB reserved on a 24 GiB host; resident stays small.
    assert!(grown_mib < 1024, "100 capsules grew RSS by {grown_mib} MiB");
    for c in capsules {
        c.destroy().unwrap();
    }
}

#[test]
fn destroy_while_spin_runs() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let runner = {
        let c = c.clone();
        std::thread::spawn(move || {
            let result = c
                .commands()
                .run_with("spin 100000000000000", RunOptions::new().no_timeout());
            let _ = tx.send(());
            result
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    c.destroy().unwrap();
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the running command returns once the capsule is destroyed");
    assert!(matches!(
        runner.join().unwrap(),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
    assert!(engine.list().is_empty());
}

#[test]
fn one_engine_from_sixteen_threads() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let shared = engine.create(probe().vcpus(4)).unwrap();
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let engine = engine.clone();
            let shared = shared.clone();
            std::thread::spawn(move || {
                for round in 0..5 {
                    let own = engine.create(probe()).unwrap();
                    let text = format!("t{t}r{round}");
                    assert_eq!(
                        own.commands()
                            .run(format!("echo {text}"))
                            .unwrap()
                            .stdout_str()
                            .into_owned(),
                        format!("{text}\n")
                    );
                    let by_id = engine.get(own.id()).unwrap();
                    assert_eq!(
                        by_id
                            .commands()
                            .run("count")
                            .unwrap()
                            .stdout_str()
                            .into_owned(),
                        "1\n"
                    );
                    assert!(engine.list().iter().any(|i| i.id == *own.id()));
                    assert_eq!(shared.commands().run("count").unwrap().exit_code, Some(0));
                    if round % 2 == 0 {
                        engine.destroy(own.id()).unwrap();
                    } else {
                        own.destroy().unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        shared
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "81\n"
    );
    assert_eq!(engine.list().len(), 1);
}

#[test]
fn dropping_the_engine_stops_its_capsules() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    let id = c.id().clone();
    drop(c);
    drop(engine);
    // Nothing to observe from outside except that no thread or VM lingers: a new engine
    // does not know the capsule.
    let Some((engine, _dir)) = common::engine() else {
        return;
    };
    assert!(matches!(engine.get(&id), Err(Error::NotFound(_))));
}
