//! The capsule lifecycle on real KVM: create, wait, status, info, list, get, destroy.

mod common;

use std::time::{Duration, SystemTime};

use capsule::{CapsuleConfig, Error, Status, TimeoutKind};
use common::{engine, probe};

#[test]
fn full_lifecycle() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let before = SystemTime::now();
    let capsule = engine.create(probe().vcpus(2)).unwrap();
    assert!(capsule.id().as_str().starts_with("cl-"));
    assert!(capsule.is_running());
    capsule
        .wait_ready(Duration::from_secs(1), Duration::from_millis(10))
        .unwrap();

    let info = capsule.info();
    assert_eq!(info.id, *capsule.id());
    assert_eq!(info.status, Status::Running);
    assert_eq!(info.template, "probe");
    assert_eq!((info.vcpus, info.memory_mb), (2, 32));
    assert_eq!(info.timeout, Duration::ZERO);
    assert!(info.created_at >= before);
    assert_eq!(info.error, None);

    let out = capsule.commands().run("echo lifecycle").unwrap();
    assert_eq!(out.stdout_str(), "lifecycle\n");
    assert!(capsule.info().last_activity >= info.last_activity);

    let listed = engine.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, *capsule.id());
    let again = engine.get(capsule.id()).unwrap();
    assert_eq!(
        again
            .commands()
            .run("count")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "1\n"
    );

    capsule.destroy().unwrap();
    assert_eq!(capsule.status(), Status::Stopped);
    assert_eq!(
        again.status(),
        Status::Stopped,
        "every handle sees the same capsule"
    );
    assert!(engine.list().is_empty());
    assert!(matches!(engine.get(capsule.id()), Err(Error::NotFound(_))));
    assert!(matches!(
        capsule.commands().run("echo x"),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
    assert!(matches!(
        capsule.wait_ready(Duration::from_secs(1), Duration::from_millis(10)),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
}

#[test]
fn destroy_by_id_and_list_order() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let a = engine.create(probe()).unwrap();
    let b = engine.create(probe()).unwrap();
    let ids: Vec<_> = engine.list().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![a.id().clone(), b.id().clone()]);
    engine.destroy(a.id()).unwrap();
    assert_eq!(a.status(), Status::Stopped);
    assert!(matches!(engine.destroy(a.id()), Err(Error::NotFound(_))));
    assert_eq!(engine.list().len(), 1);
    assert_eq!(
        b.commands()
            .run("echo still here")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "still here\n"
    );
}

#[test]
fn background_create_goes_pending_then_running() {
    let Some((engine, _dir)) = common::engine_with(|c| c.max_concurrent_starts(1)) else {
        return;
    };
    let slot = engine.hold_start_slot();
    let capsule = engine.create(probe().wait(false)).unwrap();
    assert_eq!(capsule.status(), Status::Pending);
    assert!(!capsule.is_running());
    match capsule.wait_ready(Duration::from_millis(50), Duration::from_millis(5)) {
        Err(Error::Timeout {
            kind: TimeoutKind::WaitReady,
            after,
        }) => assert_eq!(after, Duration::from_millis(50)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(engine.list()[0].status, Status::Pending);
    drop(slot);
    capsule
        .wait_ready(Duration::from_secs(10), Duration::from_millis(5))
        .unwrap();
    assert_eq!(
        capsule
            .commands()
            .run("echo up")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "up\n"
    );
}

#[test]
fn destroying_a_pending_capsule_stops_it_before_it_starts() {
    let Some((engine, _dir)) = common::engine_with(|c| c.max_concurrent_starts(1)) else {
        return;
    };
    let slot = engine.hold_start_slot();
    let capsule = engine.create(probe().wait(false)).unwrap();
    let waiter = {
        let capsule = capsule.clone();
        std::thread::spawn(move || {
            capsule.wait_ready(Duration::from_secs(10), Duration::from_secs(1))
        })
    };
    capsule.destroy().unwrap();
    assert!(matches!(
        waiter.join().unwrap(),
        Err(Error::InvalidState {
            status: Status::Stopped,
            ..
        })
    ));
    drop(slot);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        capsule.status(),
        Status::Stopped,
        "a destroyed capsule never starts"
    );
}

#[test]
fn default_config_is_wrenns() {
    let config = CapsuleConfig::new("probe");
    assert_eq!(config.vcpus(), None, "the template decides");
    assert_eq!(config.memory_mb(), None);
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let capsule = engine.create(config).unwrap();
    assert_eq!((capsule.info().vcpus, capsule.info().memory_mb), (1, 512));
    assert_eq!(
        capsule.commands().run("echo default").unwrap().exit_code,
        Some(0)
    );
}
