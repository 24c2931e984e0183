//! Bad input gets a clear, typed error and changes nothing.

mod common;

use capsule::{CapsuleConfig, CapsuleId, Engine, EngineConfig, Error, InvalidId, KvmUnavailable};
use common::{engine, probe};

#[test]
fn invalid_configs_are_rejected_before_anything_starts() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let cases = [
        probe().vcpus(0).build(),
        probe().vcpus(33).build(),
        probe().memory_mb(0).build(),
        probe().memory_mb(probe_abi::MIN_MEMORY_MIB - 1).build(),
        probe().memory_mb(u64::MAX).build(),
        CapsuleConfig::new("no-such-template"),
        CapsuleConfig::new(""),
    ];
    for config in cases {
        match engine.create(config.clone()) {
            Err(Error::InvalidConfig(why)) => assert!(!why.is_empty()),
            other => panic!("{config:?}: expected InvalidConfig, got {other:?}"),
        }
    }
    assert!(engine.list().is_empty(), "nothing is left behind");
    assert!(engine
        .create(probe().memory_mb(probe_abi::MIN_MEMORY_MIB))
        .is_ok());
}

#[test]
fn unknown_and_malformed_ids() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let unknown: CapsuleId = "cl-doesnotexist1".parse().unwrap();
    assert!(matches!(engine.get(&unknown), Err(Error::NotFound(id)) if id == unknown));
    assert!(matches!(engine.destroy(&unknown), Err(Error::NotFound(_))));
    for bad in [
        "",
        "cl-",
        "capsule-1",
        "cl-UPPER",
        "cl-a/b",
        "../../etc/passwd",
    ] {
        assert!(matches!(bad.parse::<CapsuleId>(), Err(InvalidId(s)) if s == bad));
        // `?` in a function returning capsule::Result turns it into Error::InvalidId.
        let via_question_mark = || -> capsule::Result<CapsuleId> { Ok(bad.parse::<CapsuleId>()?) };
        assert!(matches!(via_question_mark(), Err(Error::InvalidId(s)) if s == bad));
    }
    let err = "nope".parse::<CapsuleId>().unwrap_err();
    assert_eq!(err.to_string(), "\"nope\" is not a capsule id");
}

#[test]
fn a_missing_kvm_device_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig::builder()
        .data_dir(dir.path())
        .kvm_path("/nonexistent/kvm");
    match Engine::new(config) {
        Err(Error::KvmUnavailable { path, kind, .. }) => {
            assert_eq!(kind, KvmUnavailable::Missing);
            assert_eq!(path, std::path::Path::new("/nonexistent/kvm"));
        }
        other => panic!("expected KvmUnavailable, got {other:?}"),
    }
}

#[test]
fn a_kvm_path_that_is_not_kvm_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig::builder()
        .data_dir(dir.path())
        .kvm_path("/dev/null");
    assert!(matches!(
        Engine::new(config),
        Err(Error::KvmUnavailable {
            kind: KvmUnavailable::NotKvm,
            ..
        })
    ));
}

#[test]
fn an_unusable_data_directory_is_an_io_error() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: /dev/kvm does not exist on this host");
        return;
    }
    let file = tempfile::NamedTempFile::new().unwrap();
    let config = EngineConfig::builder().data_dir(file.path().join("sub"));
    assert!(matches!(Engine::new(config), Err(Error::Io { .. })));
}

#[test]
fn host_kind_is_reported() {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let host = engine.host();
    assert_eq!(host.api_version, 12);
    assert!(host.max_vcpus >= 1);
    // On PVM, Linux cannot boot; on VMX/SVM it can.
    assert_eq!(
        host.can_boot_linux(),
        matches!(
            host.virtualization,
            capsule::Virtualization::HardwareVmx | capsule::Virtualization::HardwareSvm
        )
    );
}

/// A timeout too long to add to the clock means "no deadline", never a panic: the engine's
/// boot timeout, `wait_ready` and a command's timeout.
#[test]
fn timeouts_too_long_for_the_clock_mean_no_deadline() {
    let Some((engine, _dir)) = common::engine_with(|c| c.boot_timeout(std::time::Duration::MAX))
    else {
        return;
    };
    let c = engine.create(probe()).unwrap();
    c.wait_ready(std::time::Duration::MAX, std::time::Duration::MAX)
        .unwrap();
    let out = c
        .commands()
        .run_with(
            "echo hi",
            capsule::RunOptions::new().timeout(std::time::Duration::MAX),
        )
        .unwrap();
    assert_eq!(out.stdout_str(), "hi\n");
    c.destroy().unwrap();
}
