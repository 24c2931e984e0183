//! Linux capsules against QEMU's microvm machine, side by side in one run, as JSON lines:
//! `cargo run --release --bin linux-report` on a hardware-virtualization host with the
//! "minimal" template built (`cargo xtask build-minimal`), or inside the nested harness:
//! `cargo xtask nested-test --linux-report` (see xtask/README.md).
//!
//! - `linux_boot_to_ready`: `Engine::create` of a "minimal" capsule (1 vCPU, 256 MiB) until it
//!   runs, that is until the agent's `Hello` arrived.
//! - `qemu_microvm_boot_to_ready`: `qemu-system-x86_64 -M microvm,acpi=on -enable-kvm` booting
//!   the same kernel and initramfs with the same command line and the same virtio devices
//!   (console, rng), from spawning the process until `capsule-agent: ready` (printed by the
//!   agent once its `Hello` is sent) appears on QEMU's serial console; then QEMU is killed.
//! - `boot_ratio_capsule_over_qemu`: the p50s (and the p99s) of the two, divided.
//! - `linux_exec_roundtrip`: `commands().run("true")` on a running minimal capsule.
//! - `linux_file_write_mbps`, `linux_file_read_mbps`: 100 MiB written to the guest's `/tmp`
//!   with `files().write_from` and read back with `files().read_into`, in MB/s.
//!
//! Boots alternate between capsule and QEMU (A/B, then B/A), after one unmeasured warm-up
//! each, so that both see the same machine. If QEMU cannot run, a line
//! `linux-report: QEMU microvm not measured: WHY` says why and capsule's numbers still come.
//!
//! Environment:
//! - `CAPSULE_MINIMAL_IMAGES`: the images directory (holding `minimal/vmlinuz` and
//!   `minimal/initrd.img`); else `$CAPSULE_NESTED_EXTRA/images`; else the engine's default.
//! - `CAPSULE_QEMU`: the QEMU command, split on whitespace (a dynamic loader with its
//!   `--library-path` and `-L FIRMWARE-DIR` may be part of it); default `qemu-system-x86_64`.
//! - `CAPSULE_QEMU_MACHINE`: the `-M` value; default `microvm,acpi=on`.
//! - `CAPSULE_LINUX_REPORT_BOOTS` (default 5), `CAPSULE_LINUX_REPORT_EXECS` (default 50),
//!   `CAPSULE_LINUX_REPORT_FILES` (file transfers each way, default 3).
//! - `CAPSULE_LINUX_REPORT_DMESG=1`: also print the guest's `dmesg` after the first boot (to
//!   stderr), to see where a boot's time goes.

use std::error::Error;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use capsule::{CapsuleConfig, Engine, EngineConfig, LINUX_KERNEL_CMDLINE};
use capsule_benches::{json_line, micros, summarize, Summary};

/// What the agent prints on the console once its `Hello` is sent (`capsule.ready`).
const READY_LINE: &str = "capsule-agent: ready";
const MEMORY_MB: u64 = 256;
/// Generous: under QEMU TCG (the nested harness) a boot takes seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// A phase (one boot, the exec runs) that takes longer than this ends the report: a hung
/// VM must not hang the harness.
const PHASE_LIMIT: Duration = Duration::from_secs(300);

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// What the report is doing, for the watchdog.
static PHASE: Mutex<Option<(String, Instant)>> = Mutex::new(None);

fn phase(what: impl Into<String>) {
    let what = what.into();
    eprintln!("linux-report: {what}");
    *PHASE.lock().unwrap_or_else(|p| p.into_inner()) = Some((what, Instant::now()));
}

/// Ends the process when a phase passes [`PHASE_LIMIT`].
fn start_watchdog() {
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_secs(1));
        let guard = PHASE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((what, since)) = guard.as_ref() {
            if since.elapsed() > PHASE_LIMIT {
                println!(
                    "linux-report: FAILED: stuck for {} s in: {what}",
                    since.elapsed().as_secs()
                );
                std::process::exit(3);
            }
        }
    });
}

fn main() -> Result<()> {
    let images = images_dir();
    // The kernel file the engine boots: the ELF (PVH) when the image has one.
    let elf = images.join("minimal").join("vmlinux");
    let kernel = if elf.is_file() {
        elf
    } else {
        images.join("minimal").join("vmlinuz")
    };
    let initrd = images.join("minimal").join("initrd.img");
    if !kernel.is_file() || !initrd.is_file() {
        return Err(format!(
            "no minimal template in {} (run `cargo xtask build-minimal`, or set \
             CAPSULE_MINIMAL_IMAGES)",
            images.display()
        )
        .into());
    }
    let boots = env_num("CAPSULE_LINUX_REPORT_BOOTS", 5)?.max(1);
    let execs = env_num("CAPSULE_LINUX_REPORT_EXECS", 50)?.max(1);

    let dir = tempfile::tempdir()?;
    let engine = Engine::new(
        EngineConfig::builder()
            .data_dir(dir.path())
            .linux_images(&images)
            .boot_timeout(BOOT_TIMEOUT),
    )?;
    println!("linux-report: host KVM: {}", engine.host().virtualization);
    if !engine.host().can_boot_linux() {
        println!(
            "linux-report: SKIPPED: this host's KVM is {}: it cannot boot Linux guests; run \
             on hardware virtualization or in `cargo xtask nested-test --linux-report`",
            engine.host().virtualization
        );
        return Ok(());
    }
    let config = CapsuleConfig::builder("minimal")
        .vcpus(1)
        .memory_mb(MEMORY_MB)
        .build();
    start_watchdog();

    let mut qemu = match Qemu::from_env(&kernel, &initrd) {
        Ok(q) => Some(q),
        Err(why) => {
            println!("linux-report: QEMU microvm not measured: {why}");
            None
        }
    };
    if let Some(q) = &qemu {
        println!("linux-report: QEMU: {}", q.describe());
        eprintln!(
            "linux-report: QEMU process start and exit alone (`-version`, median of 3): {:.0} ms",
            q.version_ms(3)
        );
    }
    println!(
        "linux-report: {boots} boots each (plus one warm-up), alternating capsule and QEMU; \
         kernel command line {LINUX_KERNEL_CMDLINE:?}"
    );

    // Warm-ups, not measured: the first use of each maps code and fills caches.
    phase("warm-up: capsule boot");
    let warm = Instant::now();
    let first = engine.create(config.clone())?;
    eprintln!(
        "linux-report: warm-up capsule boot {:.0} ms",
        warm.elapsed().as_secs_f64() * 1e3
    );
    if std::env::var_os("CAPSULE_LINUX_REPORT_DMESG").is_some() {
        print_guest_diagnostics(&first);
    }
    first.destroy()?;
    qemu_boot(&mut qemu, None);

    let mut ours = Vec::with_capacity(boots);
    let mut theirs = Vec::with_capacity(boots);
    for i in 0..boots {
        let capsule_first = i % 2 == 0;
        if !capsule_first {
            qemu_boot(&mut qemu, Some(&mut theirs));
        }
        phase(format!("boot {}: capsule", i + 1));
        let t = Instant::now();
        let capsule = engine.create(config.clone())?;
        let took = t.elapsed();
        ours.push(micros(took));
        eprintln!(
            "linux-report: boot {}: capsule {:.0} ms",
            i + 1,
            took.as_secs_f64() * 1e3
        );
        phase(format!("boot {}: destroying the capsule", i + 1));
        capsule.destroy()?;
        if capsule_first {
            qemu_boot(&mut qemu, Some(&mut theirs));
        }
    }

    phase(format!("exec: capsule boot, then {execs} runs of `true`"));
    let t = Instant::now();
    let capsule = engine.create(config.clone())?;
    print_boot_breakdown(&capsule, t.elapsed());
    let exec = exec_roundtrips(&capsule, execs).map_err(|e| {
        let info = capsule.info();
        format!(
            "{e} (capsule {:?}, {:?}); its console:\n{}",
            info.status,
            info.error,
            capsule.console_log()
        )
    })?;
    let (file_write, file_read) =
        file_transfers(&capsule, env_num("CAPSULE_LINUX_REPORT_FILES", 3)?)?;
    capsule.destroy()?;
    *PHASE.lock().unwrap_or_else(|p| p.into_inner()) = None;

    let ours = summarize(&ours);
    println!("{}", json_line("linux_boot_to_ready", "us", ours));
    if !theirs.is_empty() {
        let theirs = summarize(&theirs);
        println!("{}", json_line("qemu_microvm_boot_to_ready", "us", theirs));
        println!("{}", ratio_line(ours, theirs));
    }
    println!(
        "{}",
        json_line("linux_exec_roundtrip", "us", summarize(&exec))
    );
    if !file_write.is_empty() {
        let (write, read) = (summarize(&file_write), summarize(&file_read));
        println!("{}", json_line("linux_file_write_mbps", "MB/s", write));
        println!("{}", json_line("linux_file_read_mbps", "MB/s", read));
    }
    Ok(())
}

/// `n` timed 100 MiB writes of a new file into the guest's `/tmp` (a tmpfs of half its 256
/// MiB) and reads of it back, after one unmeasured round; each in MB/s. Each file is removed
/// before the next.
fn file_transfers(capsule: &capsule::Capsule, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    const LEN: u64 = 100 << 20;
    const PATH: &str = "/tmp/linux-report.bin";
    let files = capsule.files().timeout(PHASE_LIMIT);
    let mbps = |d: Duration| LEN as f64 / 1e6 / d.as_secs_f64();
    let (mut writes, mut reads) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..=n {
        phase(format!("files: writing 100 MiB ({i} of {n})"));
        let t = Instant::now();
        files.write_from(PATH, std::io::repeat(0x5a).take(LEN))?;
        let write = t.elapsed();
        phase(format!("files: reading 100 MiB ({i} of {n})"));
        let t = Instant::now();
        let read = files.read_into(PATH, std::io::sink())?;
        let read_time = t.elapsed();
        files.remove(PATH)?;
        if read != LEN {
            return Err(format!("read {read} bytes of {LEN}").into());
        }
        if i > 0 {
            writes.push(mbps(write));
            reads.push(mbps(read_time));
        }
    }
    Ok((writes, reads))
}

/// `n` timed runs of `true` after five warm-up runs, in microseconds.
fn exec_roundtrips(capsule: &capsule::Capsule, n: usize) -> Result<Vec<f64>> {
    let commands = capsule.commands();
    for _ in 0..5 {
        commands.run("true")?;
    }
    let mut exec = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = commands.run("true")?;
        exec.push(micros(t.elapsed()));
        if !out.success() {
            return Err(format!("`true` exited {:?} in the guest", out.exit_code).into());
        }
    }
    Ok(exec)
}

/// `{"metric": "boot_ratio_capsule_over_qemu", "unit": "x", ...}`: p50 over p50, p99 over p99.
fn ratio_line(ours: Summary, theirs: Summary) -> String {
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    format!(
        "{{\"metric\": \"boot_ratio_capsule_over_qemu\", \"unit\": \"x\", \"p50\": {:.3}, \
         \"p99\": {:.3}, \"n\": {}}}",
        div(ours.p50, theirs.p50),
        div(ours.p99, theirs.p99),
        ours.n.min(theirs.n)
    )
}

/// One QEMU boot, its time added to `samples` (none: a warm-up). A failure is printed and
/// ends QEMU's measurements.
fn qemu_boot(qemu: &mut Option<Qemu>, samples: Option<&mut Vec<f64>>) {
    let Some(q) = qemu else { return };
    phase(match &samples {
        Some(samples) => format!("boot {}: QEMU", samples.len() + 1),
        None => "warm-up: QEMU boot".to_string(),
    });
    match q.boot_to_ready() {
        Ok(took) => {
            let ms = took.as_secs_f64() * 1e3;
            match samples {
                Some(samples) => {
                    samples.push(micros(took));
                    eprintln!("linux-report: boot {}: QEMU {ms:.0} ms", samples.len());
                }
                None => eprintln!("linux-report: warm-up QEMU boot {ms:.0} ms"),
            }
        }
        Err(why) => {
            println!("linux-report: QEMU microvm not measured: {why}");
            *qemu = None;
        }
    }
}

/// Splits one capsule boot (`took`, host clock) by the guest's clock (stderr): the kvm-clock
/// offset the kernel found at its clock's start (time since the vCPU was created: host set-up
/// after it, the bzImage's decompression), the kernel's uptime at `/init`, and its uptime when
/// the first command after `Hello` ran. The rest is host-side (before the vCPU existed, and
/// after `Hello`).
fn print_boot_breakdown(capsule: &capsule::Capsule, took: Duration) {
    let run = |cmd: &str| {
        capsule
            .commands()
            .run(cmd)
            .map(|o| o.stdout_str().into_owned())
            .unwrap_or_default()
    };
    let uptime: Option<f64> = run("cat /proc/uptime")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok());
    let dmesg = run("dmesg");
    let stamp = |needle: &str| {
        dmesg.lines().find(|l| l.contains(needle)).and_then(|l| {
            let (_, rest) = l.split_once('[')?;
            let (t, _) = rest.split_once(']')?;
            t.trim().parse::<f64>().ok()
        })
    };
    // `kvm-clock: using sched offset of N cycles`: N is in nanoseconds of kvm-clock.
    let offset = dmesg
        .lines()
        .find_map(|l| l.split_once("using sched offset of "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ns| ns / 1e9);
    let ms = |s: Option<f64>| s.map_or("?".to_string(), |s| format!("{:.0} ms", s * 1e3));
    eprintln!(
        "linux-report: a capsule boot of {:.0} ms by the guest's clock: before the kernel's \
         clock (decompression, early set-up) {}, kernel to /init {}, uptime at the first command \
         {}; host-side rest {}",
        took.as_secs_f64() * 1e3,
        ms(offset),
        ms(stamp("Run /init as init process")),
        ms(uptime),
        ms(offset.zip(uptime).map(|(o, u)| took.as_secs_f64() - o - u))
    );
}

/// Prints the guest's kernel log and uptime (stderr): where the first boot's time went.
fn print_guest_diagnostics(capsule: &capsule::Capsule) {
    for cmd in ["cat /proc/uptime", "dmesg"] {
        match capsule.commands().run(cmd) {
            Ok(out) => {
                for line in out.stdout_str().lines() {
                    eprintln!("linux-report: guest `{cmd}`: {line}");
                }
            }
            Err(e) => eprintln!("linux-report: guest `{cmd}` failed: {e}"),
        }
    }
}

/// The images directory: `$CAPSULE_MINIMAL_IMAGES`, the nested harness's extra files, or the
/// engine's default.
fn images_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CAPSULE_MINIMAL_IMAGES") {
        return PathBuf::from(dir);
    }
    if let Some(extra) = std::env::var_os("CAPSULE_NESTED_EXTRA") {
        return PathBuf::from(extra).join("images");
    }
    EngineConfig::default().linux_images()
}

fn env_num(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|_| format!("{name}={v:?} is not a number").into()),
        Err(_) => Ok(default),
    }
}

/// How to start QEMU's microvm on the minimal template.
struct Qemu {
    program: String,
    args: Vec<String>,
    /// How many of `args` come from `CAPSULE_QEMU` (the loader's options, `-L`).
    prefix_len: usize,
}

impl Qemu {
    /// The command from `CAPSULE_QEMU`; checks that `-version` runs.
    fn from_env(kernel: &Path, initrd: &Path) -> std::result::Result<Qemu, String> {
        let words: Vec<String> = std::env::var("CAPSULE_QEMU")
            .unwrap_or_else(|_| "qemu-system-x86_64".into())
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        let (program, prefix) = words
            .split_first()
            .ok_or("CAPSULE_QEMU is empty".to_string())?;
        let version = Command::new(program)
            .args(prefix)
            .arg("-version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {program}: {e}"))?;
        if !version.status.success() {
            return Err(format!(
                "`{} -version` failed ({}): {}",
                words.join(" "),
                version.status,
                String::from_utf8_lossy(&version.stderr).trim()
            ));
        }
        if !Path::new("/dev/kvm").exists() {
            return Err("no /dev/kvm".into());
        }
        let machine =
            std::env::var("CAPSULE_QEMU_MACHINE").unwrap_or_else(|_| "microvm,acpi=on".into());
        let mut args: Vec<String> = prefix.to_vec();
        for a in [
            "-M",
            &machine,
            "-enable-kvm",
            "-cpu",
            "host",
            "-m",
            &MEMORY_MB.to_string(),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-kernel",
            &kernel.to_string_lossy(),
            "-initrd",
            &initrd.to_string_lossy(),
            "-append",
            LINUX_KERNEL_CMDLINE,
            // The agent's channel: a virtio-console (hvc0), as in capsule; nobody listens.
            "-device",
            "virtio-serial-device",
            "-chardev",
            "null,id=agent",
            "-device",
            "virtconsole,chardev=agent",
            "-device",
            "virtio-rng-device",
        ] {
            args.push(a.to_string());
        }
        Ok(Qemu {
            program: program.clone(),
            args,
            prefix_len: prefix.len(),
        })
    }

    /// Median milliseconds of `n` runs of `QEMU -version`: loading QEMU and its libraries.
    fn version_ms(&self, n: usize) -> f64 {
        let prefix = &self.args[..self.prefix_len];
        let mut samples: Vec<f64> = (0..n)
            .map(|_| {
                let t = Instant::now();
                let _ = Command::new(&self.program)
                    .args(prefix)
                    .arg("-version")
                    .stdin(Stdio::null())
                    .output();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        samples.sort_by(|a, b| a.total_cmp(b));
        samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
    }

    fn describe(&self) -> String {
        let quoted: Vec<String> = self
            .args
            .iter()
            .map(|a| {
                if a.contains(' ') {
                    format!("{a:?}")
                } else {
                    a.clone()
                }
            })
            .collect();
        format!("{} {}", self.program, quoted.join(" "))
    }

    /// Spawns QEMU, waits for the ready line on its serial console, kills it.
    fn boot_to_ready(&self) -> std::result::Result<Duration, String> {
        let started = Instant::now();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program))?;
        let result = wait_ready(&mut child, started);
        stop(&mut child);
        result
    }
}

/// Ends QEMU as a user would (SIGTERM: it tears its VM down and exits), SIGKILL after 10 s.
fn stop(child: &mut Child) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, which is not reaped yet (so the pid is still ours).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!("linux-report: QEMU ignored SIGTERM for 10 s; killing it");
    let _ = child.kill();
    child.wait().ok()
}

/// Reads `child`'s stdout until [`READY_LINE`]; its time since `started`.
fn wait_ready(child: &mut Child, started: Instant) -> std::result::Result<Duration, String> {
    let mut stdout = child.stdout.take().ok_or("QEMU has no stdout pipe")?;
    let mut stderr = child.stderr.take().ok_or("QEMU has no stderr pipe")?;
    let (tx, rx) = mpsc::channel::<Instant>();
    // The reader owns the console text and hands it back when QEMU's stdout closes.
    let reader = std::thread::spawn(move || {
        let mut console = Vec::new();
        let mut buf = [0u8; 4096];
        let mut seen = false;
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let at = Instant::now();
                    // Search only what can hold a line starting in the new bytes.
                    let from = console.len().saturating_sub(READY_LINE.len());
                    console.extend_from_slice(&buf[..n]);
                    if !seen
                        && console[from..]
                            .windows(READY_LINE.len())
                            .any(|w| w == READY_LINE.as_bytes())
                    {
                        seen = true;
                        let _ = tx.send(at);
                    }
                }
            }
        }
        console
    });
    let ready = rx.recv_timeout(BOOT_TIMEOUT);
    if let Ok(at) = ready {
        return Ok(at.duration_since(started));
    }
    // No ready line: QEMU exited or hung. Stop it and show why.
    let status = stop(child);
    let console = reader.join().unwrap_or_default();
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    let console = String::from_utf8_lossy(&console);
    let tail: Vec<&str> = console.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!(
        "no `{READY_LINE}` within {} s (QEMU {}); stderr: {}; console tail:\n{}",
        BOOT_TIMEOUT.as_secs(),
        status.map_or("still running".into(), |s| s.to_string()),
        err.trim(),
        tail.join("\n")
    ))
}
