//! Prints capsule's headline numbers as JSON lines, all measured in this one run:
//! `cargo run --release --bin report`.
//!
//! - `kvm_create_vm_vcpu`: the floor, KVM_CREATE_VM + KVM_CREATE_VCPU + close, with raw ioctls.
//! - `create_to_ready`: `Engine::create` of a probe capsule (default 512 MiB) until it runs.
//! - `echo_roundtrip`: `commands().run("echo hi")` on a running probe.
//! - `idle_rss_kib`: process RSS growth per idle running probe capsule, guest pages excluded.

use std::time::Instant;

use capsule::{CapsuleConfig, Engine, EngineConfig};
use capsule_benches::{json_line, micros, rss_kib, rss_of_mappings_sized_kib, summarize};

const MEMORY_MB: u64 = 512;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let engine = Engine::new(EngineConfig::default().data_dir(dir.path()))?;
    eprintln!("host: {}", engine.host().virtualization);

    println!(
        "{}",
        json_line("kvm_create_vm_vcpu", "us", summarize(&kvm_floor(200)?))
    );

    let config = CapsuleConfig::new("probe").memory_mb(MEMORY_MB);
    // Warm up once: first use maps code and libraries.
    engine.create(config.clone())?.destroy()?;
    let mut create = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let capsule = engine.create(config.clone())?;
        create.push(micros(t.elapsed()));
        capsule.destroy()?;
    }
    println!("{}", json_line("create_to_ready", "us", summarize(&create)));

    let capsule = engine.create(config.clone())?;
    let commands = capsule.commands();
    for _ in 0..100 {
        commands.run("echo hi")?;
    }
    let mut echo = Vec::new();
    for _ in 0..5000 {
        let t = Instant::now();
        let out = commands.run("echo hi")?;
        echo.push(micros(t.elapsed()));
        assert_eq!(out.stdout, "hi\n");
    }
    println!("{}", json_line("echo_roundtrip", "us", summarize(&echo)));
    capsule.destroy()?;

    println!(
        "{}",
        json_line(
            "idle_rss_kib",
            "kib",
            summarize(&idle_rss(&engine, &config, 100)?)
        )
    );
    Ok(())
}

/// Raw KVM cost of a VM with one vCPU, created and closed `n` times.
fn kvm_floor(n: usize) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let kvm = kvm_ioctls::Kvm::new()?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let vm = kvm.create_vm()?;
        let vcpu = vm.create_vcpu(0)?;
        drop(vcpu);
        drop(vm);
        samples.push(micros(t.elapsed()));
    }
    Ok(samples)
}

/// RSS growth of each of `n` capsules kept running side by side, minus the guest-memory
/// pages (mappings of exactly the guest's size) each one made resident.
fn idle_rss(
    engine: &Engine,
    config: &CapsuleConfig,
    n: usize,
) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let guest_kib = MEMORY_MB * 1024;
    let mut keep = Vec::with_capacity(n);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let (rss0, guest0) = (rss_kib(), rss_of_mappings_sized_kib(guest_kib));
        let capsule = engine.create(config.clone())?;
        capsule.commands().run("echo idle")?;
        let (rss1, guest1) = (rss_kib(), rss_of_mappings_sized_kib(guest_kib));
        let overhead = (rss1 as f64 - rss0 as f64) - (guest1 as f64 - guest0 as f64);
        samples.push(overhead.max(0.0));
        keep.push(capsule);
    }
    for capsule in keep {
        capsule.destroy()?;
    }
    Ok(samples)
}
