//! The capsule lifecycle on real KVM: create, wait, status, info, list, get, destroy. Each
//! test runs for the probe and for Linux (`name::probe`, `name::linux`; see
//! `common/kinds.rs`).

mod common;

use std::time::{Duration, SystemTime};

use capsule::{CapsuleConfig, Error, Status, TimeoutKind};
use common::kinds::{for_both_kinds, Kind};

for_both_kinds!(
    full_lifecycle,
    destroy_by_id_and_list_order,
    background_create_goes_pending_then_running,
    destroying_a_pending_capsule_stops_it_before_it_starts,
    default_config_is_wrenns,
);

fn full_lifecycle(kind: Kind) {
    let Some((engine, _dir)) = kind.engine() else {
        return;
    };
    let before = SystemTime::now();
    let capsule = engine.create(kind.config().vcpus(2)).unwrap();
    assert!(capsule.id().as_str().starts_with("cl-"));
    assert!(capsule.is_running());
    capsule
        .wait_ready(Duration::from_secs(1), Duration::from_millis(10))
        .unwrap();

    let info = capsule.info();
    assert_eq!(info.id, *capsule.id());
    assert_eq!(info.status, Status::Running);
    assert_eq!(info.template, kind.template());
    assert_eq!((info.vcpus, info.memory_mb), (2, kind.memory_mb()));
    assert_eq!(info.timeout, Duration::ZERO);
    assert!(info.created_at >= before);
    assert_eq!(info.error, None);

    assert_eq!(kind.out(&capsule, &kind.echo("lifecycle")), "lifecycle\n");
    assert!(capsule.info().last_activity >= info.last_activity);

    let listed = engine.list();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, *capsule.id());
    let again = engine.get(capsule.id()).unwrap();
    assert_eq!(kind.out(&again, kind.count()), "1\n");

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
        kind.run(&capsule, &kind.echo("x")),
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

fn destroy_by_id_and_list_order(kind: Kind) {
    let Some((engine, _dir)) = kind.engine() else {
        return;
    };
    let a = engine.create(kind.config()).unwrap();
    let b = engine.create(kind.config()).unwrap();
    let ids: Vec<_> = engine.list().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![a.id().clone(), b.id().clone()]);
    engine.destroy(a.id()).unwrap();
    assert_eq!(a.status(), Status::Stopped);
    assert!(matches!(engine.destroy(a.id()), Err(Error::NotFound(_))));
    assert_eq!(engine.list().len(), 1);
    assert_eq!(kind.out(&b, &kind.echo("still here")), "still here\n");
}

fn background_create_goes_pending_then_running(kind: Kind) {
    let Some((engine, _dir)) = kind.engine_with(|c| c.max_concurrent_starts(1)) else {
        return;
    };
    let slot = engine.hold_start_slot();
    let capsule = engine.create(kind.config().wait(false)).unwrap();
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
        .wait_ready(
            kind.pick(Duration::from_secs(10), kind.start_patience()),
            Duration::from_millis(5),
        )
        .unwrap();
    assert_eq!(kind.out(&capsule, &kind.echo("up")), "up\n");
}

fn destroying_a_pending_capsule_stops_it_before_it_starts(kind: Kind) {
    let Some((engine, _dir)) = kind.engine_with(|c| c.max_concurrent_starts(1)) else {
        return;
    };
    let slot = engine.hold_start_slot();
    let capsule = engine.create(kind.config().wait(false)).unwrap();
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

/// Both built-in templates default to Wrenn's 1 vCPU and 512 MiB.
fn default_config_is_wrenns(kind: Kind) {
    let config = CapsuleConfig::new(kind.template());
    assert_eq!(config.vcpus(), None, "the template decides");
    assert_eq!(config.memory_mb(), None);
    let Some((engine, _dir)) = kind.engine() else {
        return;
    };
    let capsule = engine.create(config).unwrap();
    assert_eq!((capsule.info().vcpus, capsule.info().memory_mb), (1, 512));
    assert_eq!(
        kind.run(&capsule, &kind.echo("default")).unwrap().exit_code,
        Some(0)
    );
}
