//! Admission control: the engine's limits on capsules and guest memory, checked at create,
//! resume and connect, and running out of file descriptors, all as typed errors that leave
//! nothing behind and other capsules untouched.

mod common;

use std::time::Duration;

use capsule::{Error, Resource, Status};
use common::{engine_with, probe};

fn exhausted(result: capsule::Result<impl std::fmt::Debug>) -> (Resource, u64, Option<u64>) {
    match result {
        Err(Error::ResourceExhausted {
            resource,
            in_use,
            limit,
            ..
        }) => (resource, in_use, limit),
        other => panic!("expected ResourceExhausted, got {other:?}"),
    }
}

#[test]
fn the_capsule_limit_counts_capsules_holding_a_vm() {
    let Some((engine, _dir)) = engine_with(|c| c.max_capsules(2)) else {
        return;
    };
    let a = engine.create(probe()).unwrap();
    let b = engine.create(probe()).unwrap();
    assert_eq!(
        exhausted(engine.create(probe())),
        (Resource::Capsules, 2, Some(2))
    );
    assert_eq!(
        engine.list().len(),
        2,
        "a refused create leaves nothing behind"
    );
    // A paused capsule holds no VM: its place is free.
    a.commands().run("count").unwrap();
    a.pause().unwrap();
    let c = engine.create(probe()).unwrap();
    // Resuming it now would make three.
    assert_eq!(exhausted(a.resume()), (Resource::Capsules, 2, Some(2)));
    assert_eq!(exhausted(engine.connect(a.id())).0, Resource::Capsules);
    assert_eq!(
        a.status(),
        Status::Paused,
        "a refused resume keeps the capsule paused"
    );
    c.destroy().unwrap();
    let a = engine.connect(a.id()).unwrap();
    assert_eq!(
        a.commands().run("count").unwrap().stdout_str().into_owned(),
        "2\n"
    );
    assert_eq!(
        b.commands()
            .run("echo untouched")
            .unwrap()
            .stdout_str()
            .into_owned(),
        "untouched\n"
    );
}

#[test]
fn the_memory_limit_counts_the_guest_memory_of_capsules_holding_a_vm() {
    let Some((engine, _dir)) = engine_with(|c| c.max_memory_mb(100)) else {
        return;
    };
    let first = engine.create(probe().memory_mb(32)).unwrap();
    engine.create(probe().memory_mb(32)).unwrap();
    engine.create(probe().memory_mb(32)).unwrap();
    assert_eq!(
        exhausted(engine.create(probe().memory_mb(32))),
        (Resource::MemoryMb, 96, Some(100))
    );
    // A background create is refused the same way, at once.
    assert_eq!(
        exhausted(engine.create(probe().memory_mb(32).wait(false))).0,
        Resource::MemoryMb
    );
    assert_eq!(engine.list().len(), 3);
    first.pause().unwrap();
    let small = engine.create(probe().memory_mb(16)).unwrap();
    assert_eq!(
        exhausted(first.resume()),
        (Resource::MemoryMb, 80, Some(100))
    );
    small.destroy().unwrap();
    first.resume().unwrap();
}

#[test]
fn the_engine_raises_its_file_descriptor_limit() {
    let Some((_engine, _dir)) = engine_with(|c| c) else {
        return;
    };
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct passed.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    assert_eq!(limit.rlim_cur, limit.rlim_max);
}

/// In a child process (this test binary run again), with few file descriptors allowed:
/// capsules are created until the descriptors run out, which must be a typed error that
/// leaves the earlier capsules running.
const FD_CHILD: &str = "CAPSULE_TEST_FD_EXHAUSTION_CHILD";

#[test]
fn running_out_of_file_descriptors_is_a_typed_error_in_a_child_process() {
    if std::env::var_os(FD_CHILD).is_some() {
        fd_exhaustion_child();
        return;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm does not exist on this host");
        return;
    }
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "running_out_of_file_descriptors_is_a_typed_error_in_a_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FD_CHILD, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the child failed:\n{text}");
    assert!(
        text.contains("CHILD-OK"),
        "the child did not run its checks:\n{text}"
    );
}

fn fd_exhaustion_child() {
    let open = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
    // Room for the engine and a handful of capsules, not for sixty.
    let allowed = open + 40;
    let limit = libc::rlimit {
        rlim_cur: allowed,
        rlim_max: allowed,
    };
    // SAFETY: setrlimit reads the struct passed; lowering a limit is always allowed.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let (engine, _dir) = engine_with(|c| c.shell_pool_size(0)).expect("KVM exists");
    let mut capsules = Vec::new();
    let error = loop {
        match engine.create(probe()) {
            Ok(c) => capsules.push(c),
            Err(e) => break e,
        }
        assert!(capsules.len() < 60, "40 descriptors never ran out");
    };
    match &error {
        Error::ResourceExhausted {
            resource: Resource::FileDescriptors,
            in_use,
            limit,
            ..
        } => {
            assert_eq!(*limit, Some(allowed), "{error}");
            assert!(*in_use + 5 >= allowed, "{error}");
        }
        other => panic!("expected ResourceExhausted(FileDescriptors), got {other:?}"),
    }
    assert!(!capsules.is_empty(), "not even one capsule fitted");
    assert_eq!(engine.list().len(), capsules.len(), "nothing left behind");
    for c in &capsules {
        assert_eq!(
            c.commands()
                .run("echo still")
                .unwrap()
                .stdout_str()
                .into_owned(),
            "still\n"
        );
    }
    // Room again once one capsule is gone.
    capsules.pop().unwrap().destroy().unwrap();
    let again = engine.create(probe()).unwrap();
    again
        .wait_ready(Duration::from_secs(5), Duration::from_millis(5))
        .unwrap();
    println!(
        "CHILD-OK: {} capsules fitted; then: {error}",
        capsules.len() + 1
    );
}
