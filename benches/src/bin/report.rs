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
//! - `disk_write_gbps`: 256 MiB written with `O_DIRECT` to a new file in the data directory
//!   and fsynced, by this program, each time right before a 256 MiB pause (with `syncfs`
//!   before and after it, untimed, so neither pays for the other's leftovers).
//! - `pause_256mib_over_disk`: each 256 MiB pause's bandwidth over the disk sample taken
//!   right before it (the disk's bandwidth drifts within a minute), p50 and p99 of the 12
//!   pairs; the ratio of the two medians goes to stderr.
//! - `spawn_1000_from_template_ms`: 1000 capsules from one template, total milliseconds.
//! - `template_clone_rss_kib`: RSS growth per template clone beyond the template pages it maps.
//! - `spawn_10000_from_template_ms` (only with `CAPSULE_REPORT_SPAWN=10000`; another count
//!   gives `spawn_N_from_template_ms`): that many capsules from one template in this process,
//!   all kept running, in blocks of 1000, with `spawn_scaling_ratio` (the last block's time
//!   over the first's), `spawn_rss_per_clone_kib`, `spawn_maps_per_capsule` (lines of
//!   `/proc/self/maps`) and `spawn_fds_per_capsule`, each from before the first spawn to
//!   after the last. Raises this process's soft `RLIMIT_NOFILE` to its hard limit first.
//!   With `CAPSULE_REPORT_NOFILE=N` it also raises the hard limit to `N` (needs
//!   `CAP_SYS_RESOURCE`). If a spawn fails, it says after how many and why.
//!
//! `CAPSULE_REPORT_ONLY=pause,spawn` (any of `floor`, `create`, `echo`, `idle`, `memcpy`,
//! `template`, `resume`, `pause`, `spawn`) runs only those sections; `CAPSULE_REPORT_POOL=N`
//! sets the engine's shell pool size (default 2).

use std::time::Instant;

use capsule::{CapsuleConfig, Engine, EngineConfig};
use capsule_benches::{
    disk_write_gbps, fd_count, json_line, json_ratio_line, map_count, micros, raise_nofile_limit,
    rss_kib, rss_of_mappings_sized_kib, rss_of_mappings_under_kib, start_phases, summarize,
    sync_file_system, Summary,
};

const MEMORY_MB: u64 = 512;

/// Whether the section `name` runs (`CAPSULE_REPORT_ONLY` unset, or listing it).
fn wants(name: &str) -> bool {
    match std::env::var("CAPSULE_REPORT_ONLY") {
        Ok(only) => only.split(',').any(|s| s.trim() == name),
        Err(_) => true,
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut builder = EngineConfig::builder().data_dir(dir.path());
    if let Some(n) = std::env::var("CAPSULE_REPORT_POOL")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.shell_pool_size(n);
    }
    let engine = Engine::new(builder)?;
    eprintln!("host: {}", engine.host().virtualization);
    if !start_phases::install() {
        eprintln!("report: another tracing subscriber is installed: no pause phases");
    }

    if wants("floor") {
        println!(
            "{}",
            json_line("kvm_create_vm_vcpu", "us", summarize(&kvm_floor(200)?))
        );
    }

    let config = CapsuleConfig::builder("probe").memory_mb(MEMORY_MB).build();
    // Warm up once: first use maps code and libraries.
    engine.create(config.clone())?.destroy()?;
    if wants("create") {
        let mut create = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            let capsule = engine.create(config.clone())?;
            create.push(micros(t.elapsed()));
            capsule.destroy()?;
        }
        println!("{}", json_line("create_to_ready", "us", summarize(&create)));
    }

    if wants("echo") {
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
            assert_eq!(out.stdout, b"hi\n");
        }
        println!("{}", json_line("echo_roundtrip", "us", summarize(&echo)));
        capsule.destroy()?;
    }

    if wants("idle") {
        println!(
            "{}",
            json_line(
                "idle_rss_kib",
                "kib",
                summarize(&idle_rss(&engine, &config, 100)?)
            )
        );
    }

    if wants("memcpy") {
        let gbps = memcpy_gbps();
        println!("{}", json_line("memcpy_gbps", "GB/s", summarize(&gbps)));
    }

    // A template of a warmed-up probe (4 MiB of touched pages).
    let source = engine.create(config.clone())?;
    source.commands().run("touch 1024")?;
    source.snapshot("bench")?;
    source.destroy()?;
    let from_template = CapsuleConfig::new("bench");
    if wants("template") {
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
    }

    if wants("resume") || wants("pause") {
        let capsule = engine.create(from_template.clone())?;
        if wants("resume") {
            let mut resume = Vec::new();
            for _ in 0..200 {
                capsule.pause()?;
                let t = Instant::now();
                capsule.resume()?;
                capsule.commands().run("echo hi")?;
                resume.push(micros(t.elapsed()));
            }
            println!("{}", json_line("resume_to_ready", "us", summarize(&resume)));
        }
        if wants("pause") {
            pauses(&engine, &capsule)?;
        }
        capsule.destroy()?;
    }

    if wants("spawn") {
        let (total_ms, clone_rss) = spawn_many(&engine, &from_template, 1000)?;
        println!(
            "{}",
            json_line("spawn_1000_from_template_ms", "ms", summarize(&[total_ms]))
        );
        println!(
            "{}",
            json_line("template_clone_rss_kib", "kib", summarize(&clone_rss))
        );
        if let Some(n) = std::env::var("CAPSULE_REPORT_SPAWN")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            spawn_scale(&engine, &from_template, n)?;
        }
    }
    engine.delete_template("bench")?;
    Ok(())
}

/// The pause metrics, and the disk's own `O_DIRECT` bandwidth measured right before each
/// 256 MiB pause, into the same data directory.
fn pauses(engine: &Engine, capsule: &capsule::Capsule) -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = engine.config().data_dir();
    let mut disk = Vec::new();
    // Each 256 MiB pause over the disk sample taken right before it: this disk's bandwidth
    // drifts by half within a minute, so pairs compare better than medians of each.
    let mut ratios = Vec::new();
    let mut pause_256 = None;
    start_phases::take();
    for (mib, n) in [(0u64, 200), (1, 100), (16, 30), (256, 12)] {
        let mut pause = Vec::new();
        for _ in 0..n {
            capsule.commands().run(format!("touch {}", mib * 256))?;
            if mib == 256 {
                // Each timed write starts from a file system with nothing pending.
                sync_file_system(data_dir)?;
                disk.push(disk_write_gbps(data_dir, 256 << 20)?);
                sync_file_system(data_dir)?;
            }
            let t = Instant::now();
            capsule.pause()?;
            pause.push(micros(t.elapsed()));
            if mib == 256 {
                let gbps = (256u64 << 20) as f64 / t.elapsed().as_secs_f64() / 1e9;
                if let Some(disk) = disk.last() {
                    ratios.push(gbps / disk);
                }
            }
            capsule.resume()?;
        }
        let summary = summarize(&pause);
        println!(
            "{}",
            json_line(&format!("pause_dirty_{mib}mib"), "us", summary)
        );
        if mib == 256 {
            pause_256 = Some(summary);
        }
        // Where the pauses of this size spent their time (the probe's resumes log no phases).
        let (p50, seen) = start_phases::medians(&start_phases::take());
        if seen > 0 {
            eprintln!(
                "pause_dirty_{mib}mib phases (p50 of {seen}): {}",
                start_phases::describe(&p50)
            );
        }
    }
    let disk = summarize(&disk);
    println!("{}", json_line("disk_write_gbps", "GB/s", disk));
    if let Some(pause) = pause_256 {
        let gbps = |us: f64| (256u64 << 20) as f64 / (us / 1e6) / 1e9;
        let ratio = gbps(pause.p50) / disk.p50;
        eprintln!(
            "pause of 256 MiB dirty writes at {:.2} GB/s, the disk at {:.2} GB/s",
            gbps(pause.p50),
            disk.p50
        );
        eprintln!("ratio of the medians: {ratio:.2}");
        println!(
            "{}",
            json_line("pause_256mib_over_disk", "ratio", summarize(&ratios))
        );
    }
    Ok(())
}

/// Starts `n` capsules from a template in blocks of 1000 and keeps them all running, then
/// prints the scaling metrics (see the module docs). A failed spawn ends the run early with
/// what stopped it.
fn spawn_scale(
    engine: &Engine,
    config: &CapsuleConfig,
    n: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    const BLOCK: usize = 1000;
    let wanted_hard = std::env::var("CAPSULE_REPORT_NOFILE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let (soft, hard) = raise_nofile_limit(wanted_hard)?;
    eprintln!(
        "spawn {n}: RLIMIT_NOFILE {soft} (hard {hard}); vm.max_map_count {}; kernel.threads-max {}; kernel.pid_max {}",
        read_proc("/proc/sys/vm/max_map_count"),
        read_proc("/proc/sys/kernel/threads-max"),
        read_proc("/proc/sys/kernel/pid_max"),
    );
    let (maps0, fds0, rss0) = (map_count(), fd_count(), rss_kib());
    let mut keep = Vec::with_capacity(n);
    let mut blocks = Vec::new();
    let mut stopped = None;
    let t_all = Instant::now();
    'outer: while keep.len() < n {
        let t = Instant::now();
        let size = BLOCK.min(n - keep.len());
        for _ in 0..size {
            match engine.create(config.clone()) {
                Ok(capsule) => keep.push(capsule),
                Err(e) => {
                    stopped = Some(e);
                    break 'outer;
                }
            }
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        blocks.push(ms);
        eprintln!(
            "spawn {:>5}: block of {size} in {ms:.0} ms; {} maps, {} fds",
            keep.len(),
            map_count(),
            fd_count()
        );
    }
    let total_ms = t_all.elapsed().as_secs_f64() * 1e3;
    let (maps1, fds1, rss1) = (map_count(), fd_count(), rss_kib());
    let count = keep.len();
    if let Some(e) = &stopped {
        eprintln!(
            "spawn stopped after {count} capsules: {e} ({} maps, {} fds, RSS {} MiB)",
            maps1,
            fds1,
            rss1 >> 10
        );
    }
    let per = |a: f64, b: f64| (b - a) / count.max(1) as f64;
    let one = |v: f64| Summary {
        p50: v,
        p99: v,
        n: 1,
    };
    if stopped.is_none() {
        println!(
            "{}",
            json_line(&format!("spawn_{n}_from_template_ms"), "ms", one(total_ms))
        );
    }
    if let (Some(first), Some(last)) = (blocks.first(), blocks.last()) {
        if blocks.len() > 1 {
            println!("{}", json_ratio_line("spawn_scaling_ratio", last / first));
        }
    }
    println!(
        "{}",
        json_line(
            "spawn_rss_per_clone_kib",
            "kib",
            one(per(rss0 as f64, rss1 as f64))
        )
    );
    println!(
        "{}",
        json_line(
            "spawn_maps_per_capsule",
            "maps",
            one(per(maps0 as f64, maps1 as f64))
        )
    );
    println!(
        "{}",
        json_line(
            "spawn_fds_per_capsule",
            "fds",
            one(per(fds0 as f64, fds1 as f64))
        )
    );
    let t = Instant::now();
    for capsule in keep {
        capsule.destroy()?;
    }
    eprintln!(
        "destroyed {count} capsules in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// A one-line /proc file, trimmed ("?" if unreadable).
fn read_proc(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
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
