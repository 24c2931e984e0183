//! Prints capsule's headline numbers as JSON lines, all measured in this one run:
//! `cargo run --release --bin report`.
//!
//! - `kvm_create_vm_vcpu`: the floor, KVM_CREATE_VM + KVM_CREATE_VCPU + close, with raw ioctls.
//! - `create_to_ready`: `Engine::create` of a probe capsule (default 512 MiB) until it runs.
//! - `echo_roundtrip`: `commands().run("echo hi")` on a running probe.
//! - `idle_rss_kib`: process RSS growth per idle running probe capsule, guest pages excluded.
//! - `memcpy_gbps`: the host's memory copy bandwidth (256 MiB, warm buffers), the baseline.
//! - `template_spawn_to_ready`: create from a template until the first command is answered.
//! - `resume_to_ready`: resume of a paused probe until the first command is answered.
//! - `pause_dirty_{0,1,16,256}mib`: pause of a resumed probe that dirtied that much memory.
//! - `spawn_1000_from_template_ms`: 1000 capsules from one template, total milliseconds.
//! - `template_clone_rss_kib`: RSS growth per template clone beyond the template pages it maps.

use std::time::Instant;

use capsule::{CapsuleConfig, Engine, EngineConfig};
use capsule_benches::{
    json_line, micros, rss_kib, rss_of_mappings_sized_kib, rss_of_mappings_under_kib, summarize,
};

const MEMORY_MB: u64 = 512;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let engine = Engine::new(EngineConfig::builder().data_dir(dir.path()))?;
    eprintln!("host: {}", engine.host().virtualization);

    println!(
        "{}",
        json_line("kvm_create_vm_vcpu", "us", summarize(&kvm_floor(200)?))
    );

    let config = CapsuleConfig::builder("probe").memory_mb(MEMORY_MB).build();
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

    let gbps = memcpy_gbps();
    println!("{}", json_line("memcpy_gbps", "GB/s", summarize(&gbps)));

    // A template of a warmed-up probe (4 MiB of touched pages).
    let source = engine.create(config.clone())?;
    source.commands().run("touch 1024")?;
    source.snapshot("bench")?;
    source.destroy()?;
    let from_template = CapsuleConfig::new("bench");
    let mut spawn = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        let capsule = engine.create(from_template.clone())?;
        capsule.commands().run("echo hi")?;
        spawn.push(micros(t.elapsed()));
        capsule.destroy()?;
    }
    println!(
        "{}",
        json_line("template_spawn_to_ready", "us", summarize(&spawn))
    );

    let capsule = engine.create(from_template.clone())?;
    let mut resume = Vec::new();
    for _ in 0..200 {
        capsule.pause()?;
        let t = Instant::now();
        capsule.resume()?;
        capsule.commands().run("echo hi")?;
        resume.push(micros(t.elapsed()));
    }
    println!("{}", json_line("resume_to_ready", "us", summarize(&resume)));

    for (mib, n) in [(0u64, 200), (1, 100), (16, 30), (256, 8)] {
        let mut pause = Vec::new();
        for _ in 0..n {
            capsule.commands().run(&format!("touch {}", mib * 256))?;
            let t = Instant::now();
            capsule.pause()?;
            pause.push(micros(t.elapsed()));
            capsule.resume()?;
        }
        let summary = summarize(&pause);
        println!(
            "{}",
            json_line(&format!("pause_dirty_{mib}mib"), "us", summary)
        );
        if mib == 256 {
            let gb_per_s = (256u64 << 20) as f64 / (summary.p50 / 1e6) / 1e9;
            eprintln!("pause of 256 MiB dirty writes at {gb_per_s:.2} GB/s");
        }
    }
    capsule.destroy()?;

    let (total_ms, clone_rss) = spawn_many(&engine, &from_template, 1000)?;
    println!(
        "{}",
        json_line("spawn_1000_from_template_ms", "ms", summarize(&[total_ms]))
    );
    println!(
        "{}",
        json_line("template_clone_rss_kib", "kib", summarize(&clone_rss))
    );
    engine.delete_template("bench")?;
    Ok(())
}

/// Copy bandwidth between two warm 256 MiB buffers, five runs.
fn memcpy_gbps() -> Vec<f64> {
    let len = 256usize << 20;
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    dst.copy_from_slice(&src); // warm both
    (0..5)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&dst);
            len as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect()
}

/// Starts `n` capsules from a template and keeps them all running: total time, and each
/// clone's RSS growth beyond the template pages it maps (sampled on the first 100).
fn spawn_many(
    engine: &Engine,
    config: &CapsuleConfig,
    n: usize,
) -> Result<(f64, Vec<f64>), Box<dyn std::error::Error>> {
    let template_dir = engine.config().data_dir().join("templates").join("bench");
    let mut keep = Vec::with_capacity(n);
    let mut rss = Vec::new();
    for _ in 0..100 {
        let (rss0, mapped0) = (rss_kib(), rss_of_mappings_under_kib(&template_dir));
        let capsule = engine.create(config.clone())?;
        capsule.commands().run("echo hi")?;
        let (rss1, mapped1) = (rss_kib(), rss_of_mappings_under_kib(&template_dir));
        rss.push(((rss1 as f64 - rss0 as f64) - (mapped1 as f64 - mapped0 as f64)).max(0.0));
        keep.push(capsule);
    }
    for capsule in keep.drain(..) {
        capsule.destroy()?;
    }
    let t = Instant::now();
    for _ in 0..n {
        keep.push(engine.create(config.clone())?);
    }
    let total_ms = t.elapsed().as_secs_f64() * 1e3;
    for capsule in keep {
        capsule.destroy()?;
    }
    Ok((total_ms, rss))
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
