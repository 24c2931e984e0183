//! Create a probe capsule, run a few commands, print its info, destroy it.
//!
//! Run with `cargo run --release --example quickstart`.

use std::time::Instant;

use capsule::{CapsuleConfig, Engine, EngineConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = std::env::temp_dir().join("capsule-quickstart");
    let engine = Engine::new(EngineConfig::builder().data_dir(&data_dir))?;
    println!("host KVM: {}", engine.host().virtualization);

    let started = Instant::now();
    let capsule = engine.create(CapsuleConfig::builder("probe").memory_mb(64))?;
    println!("created {} in {:?}", capsule.id(), started.elapsed());

    for command in [
        "echo hello from a capsule",
        "count",
        "count",
        "touch 16",
        "sum",
        "exit 3",
        "nope",
    ] {
        let out = capsule.commands().run(command)?;
        let exit = out.exit_code.map_or("-".into(), |c| c.to_string());
        println!(
            "$ {command:<28} exit={exit:<3} {:>9.1?}  stdout={:?} stderr={:?}",
            out.duration,
            out.stdout_str(),
            out.stderr_str()
        );
    }

    let info = capsule.info();
    println!(
        "info: id={} status={} template={} vcpus={} memory={} MiB",
        info.id, info.status, info.template, info.vcpus, info.memory_mb
    );
    println!("capsules in the engine: {}", engine.list().len());

    capsule.destroy()?;
    println!("destroyed; status now {}", capsule.status());
    Ok(())
}
