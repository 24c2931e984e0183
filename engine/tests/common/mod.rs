//! Shared set-up for the engine's integration tests: a real engine on the host's /dev/kvm.
#![allow(dead_code)]

pub mod kinds;
pub mod linux;

use std::io::Read;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

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

/// Runs the example `name` as `cmd` ([`run_with_limit`]), prints how long it took with its
/// output, and fails unless it exited successfully within `limit`; its stdout.
pub fn run_to_success(name: &str, cmd: &mut Command, limit: Duration) -> String {
    let started = std::time::Instant::now();
    let (status, stdout, stderr) = run_with_limit(cmd, limit);
    eprintln!(
        "{name} took {:.1} s and exited with {status:?}\n--- stdout\n{stdout}--- stderr\n{stderr}---",
        started.elapsed().as_secs_f64()
    );
    let status =
        status.unwrap_or_else(|| panic!("{name} did not finish within {} s", limit.as_secs()));
    assert!(status.success(), "{name} failed: {status}\n{stderr}");
    stdout
}

/// Runs `cmd` (stdout and stderr piped), killing it after `limit`; its exit status (`None`
/// when killed), stdout and stderr.
pub fn run_with_limit(cmd: &mut Command, limit: Duration) -> (Option<ExitStatus>, String, String) {
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = reader(Box::new(child.stdout.take().expect("stdout")));
    let stderr = reader(Box::new(child.stderr.take().expect("stderr")));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (
        status,
        stdout.join().expect("stdout reader"),
        stderr.join().expect("stderr reader"),
    )
}
