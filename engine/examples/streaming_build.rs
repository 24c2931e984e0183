//! Streams a long-running command's output as it happens: a pretend build in a Linux
//! capsule, its stdout and stderr printed chunk by chunk with the time they arrived, then
//! its exit; and the same with an output callback.
//!
//! ```sh
//! cargo xtask build-minimal                            # once: the Linux image
//! cargo run --release --example streaming_build
//! ```
//!
//! It needs hardware virtualization (on a host that cannot boot Linux it says so and
//! exits).

use std::io::Write;
use std::time::{Duration, Instant};

use capsule::{CapsuleConfig, Engine, EngineConfig, Output, RunOptions};

/// Four steps, each printing a few lines a little apart and a warning on stderr.
const BUILD: &str = r#"
for step in fetch compile link test; do
    echo "== $step"
    i=0
    while [ $i -lt 3 ]; do
        echo "$step: unit $i"
        i=$((i+1))
        sleep 0.2
    done
    echo "warning: $step took a while" >&2
done
echo "build finished"
exit 0
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = std::env::temp_dir().join("capsule-example-streaming");
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
            "this host's KVM ({}) cannot boot Linux capsules; run this where hardware \
             virtualization is available",
            engine.host().virtualization
        );
        return Ok(());
    }
    let capsule = engine.create(CapsuleConfig::builder("minimal").memory_mb(256))?;
    println!("capsule {} is running", capsule.id());

    let started = Instant::now();
    let build = capsule.commands().spawn(
        BUILD,
        RunOptions::new()
            .env("CI", "1")
            .timeout(Duration::from_secs(300)),
    )?;
    println!("build started as pid {}", build.pid());
    let mut stdout = std::io::stdout();
    for chunk in build.output() {
        let at = started.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(chunk.bytes());
        for line in text.lines() {
            match chunk {
                Output::Stdout(_) => writeln!(stdout, "[{at:6.2}s] {line}")?,
                Output::Stderr(_) => writeln!(stdout, "[{at:6.2}s] stderr: {line}")?,
            }
        }
    }
    let result = build.wait()?;
    println!(
        "build ended after {:.2?}: exit code {:?}, signal {:?}",
        started.elapsed(),
        result.exit_code,
        result.signal
    );

    // The same output through a callback, with `run`: it is called as the chunks come, and
    // the result keeps the output too.
    let result = capsule.commands().run_with(
        "for i in 1 2 3; do echo tick $i; sleep 0.3; done",
        RunOptions::new().on_stdout(move |chunk| {
            print!(
                "[{:6.2}s] callback: {}",
                started.elapsed().as_secs_f64(),
                String::from_utf8_lossy(chunk)
            );
        }),
    )?;
    println!("run kept {} bytes of stdout", result.stdout.len());

    capsule.destroy()?;
    Ok(())
}
