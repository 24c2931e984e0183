//! Shared set-up for the engine's integration tests: a real engine on the host's /dev/kvm.
#![allow(dead_code)]

pub mod kinds;
pub mod linux;

use capsule::{
    CapsuleConfig, CapsuleConfigBuilder, Engine, EngineConfig, EngineConfigBuilder, Error,
    KvmUnavailable,
};

/// An engine over a fresh temporary data directory, or `None` (with a message) only when the
/// host has no /dev/kvm at all. Any other failure fails the test.
pub fn engine() -> Option<(Engine, tempfile::TempDir)> {
    engine_with(|c| c)
}

/// Like [`engine`], with the configuration adjusted by `adjust`.
pub fn engine_with(
    adjust: impl FnOnce(EngineConfigBuilder) -> EngineConfigBuilder,
) -> Option<(Engine, tempfile::TempDir)> {
    let dir = tempfile::tempdir().expect("temp dir");
    match Engine::new(adjust(EngineConfig::builder().data_dir(dir.path()))) {
        Ok(engine) => Some((engine, dir)),
        Err(Error::KvmUnavailable {
            kind: KvmUnavailable::Missing,
            ..
        }) => {
            eprintln!("SKIPPED: /dev/kvm does not exist on this host");
            None
        }
        Err(e) => panic!("cannot start the engine: {e}"),
    }
}

/// A small probe configuration (memory is only reserved, but smaller slots start faster).
pub fn probe() -> CapsuleConfigBuilder {
    CapsuleConfig::builder("probe").memory_mb(32)
}
