//! The "minimal" Linux template in tests: where its image is, and an engine that can boot
//! it (or `None`, with the reason printed, on a host that cannot).

use std::path::PathBuf;
use std::time::Duration;

use capsule::{CapsuleConfig, CapsuleConfigBuilder, Engine, EngineConfig, EngineConfigBuilder};

/// The images directory: `$CAPSULE_MINIMAL_IMAGES`, the nested harness's extra files, or the
/// engine's default.
pub fn images() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAPSULE_MINIMAL_IMAGES") {
        return PathBuf::from(dir);
    }
    if let Some(extra) = std::env::var_os("CAPSULE_NESTED_EXTRA") {
        return PathBuf::from(extra).join("images");
    }
    EngineConfig::default().linux_images()
}

/// How long a boot may take. Inside the nested harness the L1 runs under QEMU TCG and its
/// two CPUs carry several guests at once (tests run in parallel): boots there take 5-16 s
/// instead of well under a second, so the default 30 s is too close; a stuck boot still
/// fails, with its console tail in [`Error::BootTimeout`].
pub fn boot_timeout() -> Duration {
    if std::env::var_os("CAPSULE_NESTED").is_some() {
        Duration::from_secs(120)
    } else {
        EngineConfig::default().boot_timeout()
    }
}

/// An engine that can boot Linux, or `None` with the reason printed.
pub fn linux_engine() -> Option<(Engine, tempfile::TempDir)> {
    linux_engine_with(|c| c)
}

/// Like [`linux_engine`], with the configuration adjusted by `adjust`.
pub fn linux_engine_with(
    adjust: impl FnOnce(EngineConfigBuilder) -> EngineConfigBuilder,
) -> Option<(Engine, tempfile::TempDir)> {
    let (engine, dir) =
        super::engine_with(|c| adjust(c.linux_images(images()).boot_timeout(boot_timeout())))?;
    if !engine.host().can_boot_linux() {
        eprintln!(
            "SKIPPED: the host's KVM is {}; Linux capsules need hardware virtualization \
             (run `cargo xtask nested-test`)",
            engine.host().virtualization
        );
        return None;
    }
    if !images().join("minimal").join("initrd.img").is_file() {
        assert!(
            std::env::var_os("CAPSULE_NESTED").is_none(),
            "the nested harness must provide the minimal image"
        );
        eprintln!(
            "SKIPPED: no minimal image in {}: run `cargo xtask build-minimal`",
            images().display()
        );
        return None;
    }
    Some((engine, dir))
}

/// A small "minimal" capsule.
pub fn minimal() -> CapsuleConfigBuilder {
    CapsuleConfig::builder("minimal").memory_mb(256)
}
