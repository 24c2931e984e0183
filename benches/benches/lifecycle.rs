//! Criterion benchmarks of the capsule lifecycle on real KVM: create → ready, and a command
//! round trip. Run with `cargo bench -p capsule-benches`.

use std::time::{Duration, Instant};

use capsule::{CapsuleConfig, Engine, EngineConfig};
use criterion::{criterion_group, criterion_main, Criterion};

fn engine() -> Option<(Engine, tempfile::TempDir)> {
    let dir = tempfile::tempdir().ok()?;
    match Engine::new(EngineConfig::builder().data_dir(dir.path())) {
        Ok(engine) => Some((engine, dir)),
        Err(e) => {
            eprintln!("skipping benchmarks: {e}");
            None
        }
    }
}

fn create_to_ready(c: &mut Criterion) {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let config = CapsuleConfig::new("probe");
    c.bench_function("create_to_ready", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let capsule = engine.create(config.clone()).expect("create");
                total += t.elapsed();
                capsule.destroy().expect("destroy");
            }
            total
        })
    });
}

fn command_roundtrip(c: &mut Criterion) {
    let Some((engine, _dir)) = engine() else {
        return;
    };
    let capsule = engine.create(CapsuleConfig::new("probe")).expect("create");
    let commands = capsule.commands();
    c.bench_function("echo_roundtrip", |b| {
        b.iter(|| commands.run("echo hi").expect("echo"))
    });
    capsule.destroy().expect("destroy");
}

criterion_group!(benches, create_to_ready, command_roundtrip);
criterion_main!(benches);
