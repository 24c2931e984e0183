//! Files in and out of a Linux capsule: upload a host file, write one from memory, let a
//! command in the guest work on them, list what it made, read and download the results, and
//! stream a large file through without holding it in memory.
//!
//! Needs hardware virtualization and the "minimal" image (`cargo xtask build-minimal`).
//! Run with `cargo run --release --example files_in_and_out`.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::time::Instant;

use capsule::{CapsuleConfig, Engine, EngineConfig, WriteOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = std::env::temp_dir().join("capsule-files-example");
    // A data directory of its own; the Linux images where `cargo xtask build-minimal` put
    // them (the default data directory's `images/`), or in `$CAPSULE_MINIMAL_IMAGES`.
    let images = std::env::var_os("CAPSULE_MINIMAL_IMAGES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| EngineConfig::default().linux_images());
    let engine = Engine::new(
        EngineConfig::builder()
            .data_dir(&data_dir)
            .linux_images(images),
    )?;
    if !engine.host().can_boot_linux() {
        println!(
            "this host's KVM ({}) cannot boot Linux capsules; nothing to do",
            engine.host().virtualization
        );
        return Ok(());
    }
    let capsule = engine.create(CapsuleConfig::builder("minimal").memory_mb(512))?;
    let files = capsule.files();

    // In: a host file (its permission bits come along) and bytes from memory.
    let host_dir = std::env::temp_dir().join(format!("capsule-files-{}", std::process::id()));
    std::fs::create_dir_all(&host_dir)?;
    let script = host_dir.join("count-words.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nfor f in /work/in/*; do wc -w \"$f\"; done > /work/out/counts.txt\n",
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    files.upload(&script, "/work/bin/count-words.sh")?;
    files.write_with(
        "/work/secret.conf",
        "token = not-for-everyone\n",
        WriteOptions::new().mode(0o600).owner(1000, 1000),
    )?;
    files.write("/work/in/a.txt", "the quick brown fox")?;
    files.write("/work/in/b.txt", "jumps over the lazy dog again")?;
    files.make_dir("/work/out")?;

    // Work in the guest.
    let out = capsule.commands().run("/work/bin/count-words.sh")?;
    println!("the script exited with {:?}", out.exit_code);

    // Out: a listing, a small file as text, a download.
    for entry in files.list("/work", 2)? {
        println!(
            "{:<28} {:<9} {:>6} bytes  mode {:o}",
            entry.path, entry.kind, entry.size, entry.mode
        );
    }
    print!("{}", files.read_to_string("/work/out/counts.txt")?);
    let downloaded = host_dir.join("counts.txt");
    files.download("/work/out/counts.txt", &downloaded)?;
    println!("downloaded to {}", downloaded.display());

    // A large file streams in chunks: 64 MiB of zeros in, then read back, never whole in
    // the host's memory.
    let size = 64 << 20;
    let started = Instant::now();
    files.write_from("/tmp/zeros.bin", std::io::repeat(0).take(size))?;
    let written = started.elapsed();
    let started = Instant::now();
    let read = files.read_into("/tmp/zeros.bin", std::io::sink())?;
    println!(
        "64 MiB written in {written:?}, {read} bytes read back in {:?}",
        started.elapsed()
    );

    // Errors are typed and name the guest path.
    match files.read("/work/missing.txt") {
        Err(capsule::Error::File { path, kind, .. }) => println!("{path}: {kind}"),
        other => println!("unexpected: {other:?}"),
    }

    files.remove("/work")?;
    capsule.destroy()?;
    std::fs::remove_dir_all(&host_dir)?;
    Ok(())
}
