//! A shell on a pseudo-terminal in a Linux capsule: types commands into it, resizes the
//! terminal, interrupts a command with Ctrl-C, and prints everything the terminal shows
//! (escape codes and all) as it comes.
//!
//! ```sh
//! cargo xtask build-minimal                     # once: the Linux image
//! cargo run --release --example pty_session
//! ```
//!
//! It needs hardware virtualization (on a host that cannot boot Linux it says so and
//! exits).

use std::io::Write;
use std::time::Duration;

use capsule::{CapsuleConfig, Engine, EngineConfig, PtySize, RunOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = std::env::temp_dir().join("capsule-example-pty");
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
    let pty = capsule.pty().create(
        PtySize::new(24, 80),
        RunOptions::new().env("PS1", "capsule$ "),
    )?;
    println!("shell on a terminal, pid {}", pty.pid());

    // Print what the terminal shows, from another thread, as it comes.
    let screen = pty.output();
    let printer = std::thread::spawn(move || {
        let mut out = std::io::stdout();
        for chunk in screen {
            let _ = out.write_all(chunk.bytes());
            let _ = out.flush();
        }
    });

    let pause = || std::thread::sleep(Duration::from_millis(400));
    for line in [
        "echo hello from a terminal",
        "tty; stty size",
        "test -t 0 && echo stdin is a terminal",
    ] {
        pty.write(format!("{line}\n").as_bytes())?;
        pause();
    }
    pty.resize(PtySize::new(40, 120))?;
    pty.write(b"stty size\n")?;
    pause();
    // A command that would run forever, interrupted like a person would.
    pty.write(b"sleep 1000\n")?;
    pause();
    pty.write(b"\x03")?;
    pause();
    pty.write(b"echo interrupted; exit 7\n")?;

    let result = pty.wait_timeout(Duration::from_secs(60))?;
    printer.join().ok();
    println!("\nthe shell exited with {:?}", result.exit_code);
    capsule.destroy()?;
    Ok(())
}
