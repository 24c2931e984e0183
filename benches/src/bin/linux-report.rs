//! Linux capsules against QEMU's microvm machine and Firecracker, side by side in one run, as
//! JSON lines: `cargo run --release --bin linux-report` on a hardware-virtualization host
//! with the "minimal" template built (`cargo xtask build-minimal`), or inside the nested
//! harness: `cargo xtask nested-test --report-only` (see xtask/README.md). Absolute times
//! under the nested harness's QEMU TCG mean little; the ratios of one run are what counts.
//!
//! Every system boots the same kernel and initramfs (the "minimal" template: Debian's cloud
//! kernel, capsule's agent as `/init`) with the same command line
//! ([`capsule::LINUX_KERNEL_CMDLINE`]). Two console lines that `/init` prints time the
//! systems that cannot talk to the agent (Firecracker has no virtio-console): the boot
//! marker `capsule-init: marker T` (printed early at every boot, before the modules and the
//! agent's channel; T is the guest's `CLOCK_MONOTONIC`) and, where asked for, a heartbeat
//! `capsule-hb N` every `CAPSULE_LINUX_REPORT_HEARTBEAT_MS` (default 5) ms, whose next line
//! after a restore is the guest's first sign of life. A peer's console is its stdout, read
//! by a thread that timestamps each line as it arrives. "Ready" always means the agent
//! answers: its `Hello` arrived (a capsule), it printed `capsule-agent: ready` (QEMU boot),
//! or a `true` sent through its channel answered (capsule and QEMU restores).
//!
//! Boots, 256 MiB, 1 vCPU; capsule, QEMU and Firecracker take turns (the order rotates each
//! round) after one unmeasured warm-up each:
//! - `linux_boot_to_ready`: `Engine::create` until it returns running (the agent's `Hello`).
//! - `linux_boot_to_marker`: from the same boots, create until the marker. The engine shows a
//!   capsule's console only once it runs, so the marker's host time is derived from the guest
//!   clock: right after create the report runs `grep -m1 '^now at' /proc/timer_list` (the
//!   guest's `CLOCK_MONOTONIC` in ns) three times and, with the reading whose round trip was
//!   shortest, takes the marker's time as the midpoint of that round trip less the
//!   guest-clock difference (error: at most half the round trip, a few ms; stderr shows it).
//! - `qemu_microvm_boot_to_ready`, `qemu_microvm_boot_to_marker`:
//!   `qemu-system-x86_64 -M microvm,acpi=on -enable-kvm -cpu host` with the same virtio
//!   devices (virtio-serial + `virtconsole` as `hvc0`, connected to nothing; virtio-rng), from
//!   spawning QEMU until `capsule-agent: ready` (and the marker) on its serial console; then
//!   SIGTERM. QEMU's guest spends ~3.4 s in the `rtc_cmos` probe, which `rtc=off` does not
//!   remove: its boot figures are inflated by that, and the report says so beside the ratio.
//! - `firecracker_boot_to_marker`: `firecracker --no-api --config-file` (1 vCPU, no SMT, no
//!   drives), from spawning the process until the marker on its serial console; then SIGKILL.
//! - `boot_ratio_capsule_over_qemu`: p50/p50 and p99/p99 of the two boot-to-ready figures.
//! - `linux_boot_guest_to_marker`, `firecracker_boot_guest_to_marker`: T in the marker of
//!   the same boots, the guest's own time from its kernel's clock starting to the marker:
//!   the same kernel doing the same work under both, which no VMM can shorten.
//! - `linux_exec_roundtrip`: `commands().run("true")` on a running capsule.
//!
//! Guest I/O, in the exec phase's capsule (256 MiB, 1 vCPU), before its exec runs. Throughputs
//! in MB/s (10^6 bytes per second), each sample one transfer of 100 MiB (8 MiB in the nested
//! harness, where the guest's console driver moves output 4 KiB at a time, each waiting for
//! the host: well under 1 MB/s under TCG); first `CAPSULE_LINUX_REPORT_FILES` (default 3)
//! file transfers each way, then one unmeasured warm-up round (an eighth of the size) and
//! `CAPSULE_LINUX_REPORT_STREAMS` (default 3) rounds of the channel from the agent, a stream
//! and the channel to the agent, in that order:
//! - `linux_file_write_mbps`: `files().write_from` (a reader of one repeated byte) into the
//!   guest's `/tmp` (a tmpfs): host to guest, 1 MiB `WriteFile` chunks.
//! - `linux_file_read_mbps`: `files().read_into` of that file into a sink: guest to host.
//! - `linux_stream_mbps`: `commands().spawn("head -c LEN /dev/zero")` and its `output()`
//!   taken chunk by chunk (and dropped) until it ends, from the spawn call; the byte count and
//!   exit 0 are checked. What a streamed command costs end to end: the process and its pipe,
//!   the agent's reads, `Stdout` frames of up to 64 KiB, the credit window, the engine's
//!   decoding and the handle's buffer.
//! - `linux_channel_mbps`: the ceiling of the same path, measured in the same capsule:
//!   `Capsule::channel_test` (the engine's `testing` feature) asks the agent for LEN raw
//!   bytes (the agent protocol's experimental `ChannelTest`): the agent writes zeros to its
//!   channel (`/dev/hvc0`) 64 KiB at a time, as it writes streamed output, with no frame, no
//!   process, no pipe and no flow control, and the engine's reader thread takes them out of
//!   the virtio-console's socket and drops them without decoding. Time from the request to
//!   the last byte read. Every guest-to-host transfer (streams, file reads) goes through
//!   exactly this: the guest's tty and virtio-console driver, the device thread and the
//!   socket; all it adds is protocol work, so no transfer can be faster.
//! - `linux_channel_in_mbps`: the same, host to guest (the direction of file writes and
//!   stdin): the engine writes the request and LEN raw zeros, 64 KiB at a time, and the
//!   agent reads and drops them; time until its `Ack` of the last byte.
//! - `linux_stream_first_byte`: `spawn("echo x")` until its first stdout chunk arrived
//!   (`output().recv_timeout`), µs; `CAPSULE_LINUX_REPORT_EXECS` samples after five
//!   unmeasured spawns.
//!
//! Streams and files against the channel they go through, target ≥ 0.7 (p50/p50 and p99/p99,
//! each with a `target:` line): `linux_stream_mbps` / `linux_channel_mbps`,
//! `linux_file_read_mbps` / `linux_channel_mbps`, `linux_file_write_mbps` /
//! `linux_channel_in_mbps` (a file write is compared with the channel in its own direction).
//!
//! Lifecycle, 512 MiB, 1 vCPU, `CAPSULE_LINUX_REPORT_LIFECYCLE` rounds (default: as many as
//! boots), the three systems taking turns; each round boots each system afresh, with the
//! heartbeat running (a capsule: started by its one command, `setsid /init --heartbeat MS`;
//! QEMU and Firecracker: `capsule.heartbeat=MS` on the command line):
//! - `linux_pause`: `Capsule::pause()` of a capsule that booted and ran that one command.
//! - `linux_resume_to_live`: `resume()` until a heartbeat newer than any printed before the
//!   pause shows in `Capsule::console_log()` (polled every 200 µs).
//! - `linux_resume_to_ready`: a second pause, then `resume()` until `run("true")` answers.
//! - `firecracker_snapshot_create`: `PATCH /vm {"state": "Paused"}` then `PUT
//!   /snapshot/create` (Full, state and memory files in `/tmp`, a tmpfs in the nested L1) of
//!   a guest that showed its first heartbeat; both requests together.
//! - `firecracker_restore_to_live`: spawn of a new Firecracker process (`--api-sock`) and `PUT
//!   /snapshot/load` (File backend, `resume_vm: true`) until the restored guest's first
//!   heartbeat line (or the end of one it began before the snapshot) on the new process's
//!   console. Stderr also gives spawn to the load's reply.
//! - `linux_resume_guest_to_live`: of each `linux_resume_to_live`, the guest's own part:
//!   from its vCPU threads starting (the engine's `start phases` event, less its last
//!   phase, `agent`, which begins there) until the heartbeat.
//!   `firecracker_restore_guest_to_live`: of each `firecracker_restore_to_live`, from the
//!   load's reply (Firecracker resumes the VM before it answers) until the heartbeat.
//! - `qemu_microvm_snapshot_create`: QMP `stop` then `migrate` to `exec:cat > FILE` (no
//!   bandwidth limit) until `query-migrate` says completed, of a guest that printed its
//!   ready line.
//! - `qemu_microvm_restore_to_ready`: spawn of a second QEMU with the same machine and
//!   `-incoming exec:cat FILE` until a `true` sent through the agent's channel (a Unix
//!   socket chardev, the agent protocol; connected at once, the request sent once the guest
//!   runs) answered. The saved VM was stopped, so QEMU keeps the restored one paused: the
//!   report polls QMP `query-status` and sends `cont` (what Firecracker's `resume_vm` does). `qemu_microvm_restore_to_live`: the same restores until
//!   the first heartbeat.
//!
//! Templates and forks (capsules only, 512 MiB): a source capsule boots and starts the
//! heartbeat, and `snapshot(name)` makes a template of it while it runs.
//! - `linux_template_spawn_to_ready`: `Engine::create` from the template until `run("true")`
//!   answers.
//! - `linux_template_spawn_to_live`: `create` (not waiting) from the template until a
//!   heartbeat appears in the clone's console. If the clone's console starts with its
//!   template's (the snapshot keeps the UART's log), heartbeats up to the one the source had
//!   printed when `snapshot` froze it are not the clone's: that number is found by watching
//!   the source's console during `snapshot` (the longest pause of its heartbeat).
//!   `linux_template_spawn_guest_to_live`: its guest's own part, as for resumes;
//!   `linux_template_spawn_guest_to_ready`: the same for `linux_template_spawn_to_ready`
//!   (most of it the first command's first touches of the clone's memory, each a nested page
//!   fault).
//! - `linux_fork_to_ready`: `fork(1)` of the running source until the fork answers `true`.
//! - `linux_clone_rss_kib`: growth of this process's `VmRSS` (/proc/self/status) per idle
//!   running clone: 10 clones of a template taken after the heartbeat was stopped, each read
//!   300 ms after `create` returned (the clone is running and its agent answered the
//!   start-up sync); p50/p99 over the 10 increments. `linux_clone_pss_kib`: the same for
//!   `Pss` (/proc/self/smaps_rollup), which counts a page shared by several mappings once.
//!   `linux_clone_command_rss_kib`: what one `run("true")` in each clone then adds (300 ms
//!   after it answered): the pages a fork and exec touch.
//!
//! Ratios (`A_over_B`, p50/p50 and p99/p99) and their targets, each also as a line
//! `linux-report: target: ...`: `linux_boot_to_marker` / `firecracker_boot_to_marker` ≤ 0.5,
//! `linux_template_spawn_to_live` and `linux_resume_to_live` / `firecracker_restore_to_live`
//! ≤ 0.1, `linux_template_spawn_to_ready` / `linux_boot_to_ready` ≤ 0.05, `linux_pause` /
//! `firecracker_snapshot_create` ≤ 0.25; and `linux_clone_rss_kib` ≤ 4096.
//!
//! Floors (`linux-report: floor: ...`, with their ratio lines): how low four of those
//! ratios could go if the engine's own work took no time at all, because what passes once
//! the guest runs (its own code and the VM exits it makes) is in the numerator whatever the
//! engine does: `linux_boot_guest_to_marker` / `firecracker_boot_to_marker` under the boot
//! target, `linux_template_spawn_guest_to_live` and `linux_resume_guest_to_live` /
//! `firecracker_restore_to_live` under the restore targets, and
//! `linux_template_spawn_guest_to_ready` / `linux_boot_to_ready` under the spawn target.
//! Each line says whether its target lies below the floor (unreachable in that run). Under
//! the nested harness that part is most of every figure: the guest runs under TCG, and each
//! of its nested page faults is an emulated VM exit.
//!
//! `CAPSULE_LINUX_REPORT_PARTS` (comma-separated; default all) runs only some parts:
//! `boot` (the boots), `io` (command round trips, files, streams, the channel), `lifecycle`
//! (pause and resume against the peers), `templates` (template spawns, forks, clone RSS).
//! The template part uses `CAPSULE_LINUX_REPORT_LIFECYCLE` rounds (at least one) either way.
//!
//! Where a restore's first moments go: around each capsule resume, template spawn and
//! Firecracker restore (until the guest is live) the report prints KVM's event counters
//! (`linux-report: WHAT: KVM events: exits=.. pf_fixed=..`, from debugfs where mounted, as in
//! the nested harness), summed over the VMs that exist when they are read (so read before
//! a clone is destroyed; a template's source runs meanwhile and counts too): `pf_fixed`
//! counts the nested page faults KVM fixed, i.e. guest pages first touched after the restore.
//!
//! Where the engine's starts spend their time: each boot, resume, template spawn and fork
//! sample prints `linux-report: METRIC: start phases: shell=..ms memory=..ms machine=..ms
//! vcpu_threads=..ms agent=..ms` (the engine's `start phases` debug events, collected by
//! `capsule_benches::start_phases`), and the end of the run `linux-report: phases of METRIC
//! (p50 of N): ...`.
//!
//! A metric that cannot be measured prints `linux-report: METRIC not measured: WHY` and the
//! others continue; a peer that cannot run prints `linux-report: QEMU microvm not measured:
//! WHY` or `linux-report: Firecracker not measured: WHY`. Since TCG's nested SVM breaks a
//! guest now and then (xtask/README.md), a failed sample prints `linux-report: METRIC: a
//! sample failed: WHY` and the next round tries again; a metric is given up after two
//! failures, or at once when the engine answers `Unsupported`. A capsule boot that fails is
//! booted once more (a second failure ends the report). Every phase runs under a watchdog
//! (300 s) that ends the report when it hangs.
//!
//! Environment:
//! - `CAPSULE_MINIMAL_IMAGES`: the images directory (holding `minimal/vmlinuz` and
//!   `minimal/initrd.img`); else `$CAPSULE_NESTED_EXTRA/images`; else the engine's default.
//! - `CAPSULE_QEMU`: the QEMU command, split on whitespace (a dynamic loader with its
//!   `--library-path` and `-L FIRMWARE-DIR` may be part of it); default `qemu-system-x86_64`.
//! - `CAPSULE_QEMU_MACHINE`: the `-M` value; default `microvm,acpi=on`.
//! - `CAPSULE_FIRECRACKER`: the Firecracker binary (the nested harness packs one); when
//!   unset, `CAPSULE_FIRECRACKER_ABSENT` may say why, and Firecracker is not measured.
//! - `CAPSULE_LINUX_REPORT_FILES` (default 3), `CAPSULE_LINUX_REPORT_STREAMS` (default 3):
//!   file transfers each way, rounds of streams and the channel.
//! - `CAPSULE_LINUX_REPORT_BOOTS` (default 5), `CAPSULE_LINUX_REPORT_EXECS` (default 50),
//!   `CAPSULE_LINUX_REPORT_LIFECYCLE` (default: the boots), `CAPSULE_LINUX_REPORT_HEARTBEAT_MS`
//!   (default 5).
//! - `CAPSULE_LINUX_REPORT_DMESG=1`: also print the guest's `dmesg` after the first boot (to
//!   stderr), to see where a boot's time goes.

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt::Display;
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule::{Capsule, CapsuleConfig, Engine, EngineConfig, Status, LINUX_KERNEL_CMDLINE};
use capsule_benches::console::{self, heartbeat_seq, is_life_after_restore, last_heartbeat};
use capsule_benches::firecracker::Firecracker;
use capsule_benches::qemu::Qemu;
use capsule_benches::{json_line, micros, summarize, Summary};
use capsule_benches::{kvm_stats, start_phases};

/// Memory of the boots (as in the existing boot figures).
const MEMORY_MB: u64 = 256;
/// Memory of the lifecycle measurements (pause, resume, templates, forks, snapshots).
const LIFECYCLE_MEMORY_MB: u64 = 512;
/// Generous: under QEMU TCG (the nested harness) a boot takes seconds.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a restored or resumed guest may take to show life or answer.
const LIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// Clones for `linux_clone_rss_kib`.
const CLONES: usize = 10;
/// How long each of those clones idles before the RSS is read.
const CLONE_SETTLE: Duration = Duration::from_millis(300);
/// How often a capsule's console is polled for a heartbeat.
const CONSOLE_POLL: Duration = Duration::from_micros(200);

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

/// The samples of every metric, and why those that could not be measured were not.
#[derive(Default)]
struct Metrics {
    samples: BTreeMap<&'static str, Vec<f64>>,
    failed: BTreeMap<&'static str, Failure>,
    /// The engine's start phases of each sample, by metric (`start_phases`).
    starts: BTreeMap<&'static str, Vec<Vec<(String, f64)>>>,
}

/// Why samples of a metric failed.
struct Failure {
    /// The first reason.
    why: String,
    count: u32,
    /// No later sample can succeed (the engine said `Unsupported`).
    permanent: bool,
    /// The `not measured` line was printed.
    printed: bool,
}

impl Metrics {
    fn add(&mut self, metric: &'static str, value: f64) {
        self.samples.entry(metric).or_default().push(value);
    }

    fn add_time(&mut self, metric: &'static str, took: Duration) {
        self.add(metric, micros(took));
    }

    /// Files the engine starts seen since the last call under `metric` and prints them:
    /// `linux-report: METRIC: start phases: shell=..ms memory=..ms ...`. Returns when the
    /// guest of the last of them began to run (its vCPU threads started), if known.
    fn add_starts(&mut self, metric: &'static str) -> Option<Instant> {
        let mut guest_started = None;
        for (at, start) in start_phases::take_timed() {
            eprintln!(
                "linux-report: {metric}: start phases: {}",
                start_phases::describe(&start)
            );
            guest_started = start_phases::guest_started(at, &start);
            self.starts.entry(metric).or_default().push(start);
        }
        guest_started
    }

    /// `linux-report: phases of METRIC (p50 of N): ...` for every metric with starts.
    fn print_starts(&self) {
        for (metric, starts) in &self.starts {
            let (p50, n) = start_phases::medians(starts);
            println!(
                "linux-report: phases of {metric} (p50 of {n}): {}",
                start_phases::describe(&p50)
            );
        }
    }

    /// Records that a sample of `metric` failed. Under the nested harness TCG's emulation
    /// now and then breaks a guest, so one failure only prints
    /// `linux-report: METRIC: a sample failed: WHY`; after a second the metric is given up
    /// ([`Metrics::gave_up`]). A metric left without samples is reported `not measured` with
    /// the first reason when its part prints ([`Metrics::print`]).
    fn fail(&mut self, metric: &'static str, why: impl Display) {
        let why = why.to_string();
        println!("linux-report: {metric}: a sample failed: {why}");
        self.failed
            .entry(metric)
            .or_insert(Failure {
                why,
                count: 0,
                permanent: false,
                printed: false,
            })
            .count += 1;
    }

    /// Records that `metric` cannot be measured at all, and prints
    /// `linux-report: METRIC not measured: WHY` (once).
    fn fail_for_good(&mut self, metric: &'static str, why: impl Display) {
        let failure = self.failed.entry(metric).or_insert(Failure {
            why: why.to_string(),
            count: 0,
            permanent: true,
            printed: false,
        });
        failure.count += 1;
        failure.permanent = true;
        if !failure.printed {
            println!("linux-report: {metric} not measured: {}", failure.why);
            failure.printed = true;
        }
    }

    /// [`Metrics::fail_for_good`] when the engine said `Unsupported`, else [`Metrics::fail`].
    fn fail_engine(&mut self, metric: &'static str, error: &capsule::Error, context: &str) {
        let why = format!("{context}{error}");
        if matches!(error, capsule::Error::Unsupported(_)) {
            self.fail_for_good(metric, why);
        } else {
            self.fail(metric, why);
        }
    }

    /// Whether to stop trying `metric`: it cannot work, or failed twice.
    fn gave_up(&self, metric: &str) -> bool {
        self.failed
            .get(metric)
            .is_some_and(|f| f.permanent || f.count >= 2)
    }

    fn summary(&self, metric: &str) -> Option<Summary> {
        self.samples
            .get(metric)
            .filter(|s| !s.is_empty())
            .map(|s| summarize(s))
    }

    /// The JSON line of each of `metrics` that has samples; for the others that failed, a
    /// `not measured` line (unless printed already).
    fn print(&mut self, metrics: &[(&str, &str)]) {
        for (metric, unit) in metrics {
            if let Some(summary) = self.summary(metric) {
                println!("{}", json_line(metric, unit, summary));
            } else if let Some(failure) = self.failed.get_mut(*metric) {
                if !failure.printed {
                    println!("linux-report: {metric} not measured: {}", failure.why);
                    failure.printed = true;
                }
            }
        }
    }

    /// The summaries of `a` and `b`, or why the first missing one is missing.
    fn summaries(&self, a: &str, b: &str) -> std::result::Result<(Summary, Summary), String> {
        let get = |m: &str| self.summary(m).ok_or_else(|| self.why_missing(m));
        Ok((get(a)?, get(b)?))
    }

    /// Why `metric` has no samples, for a ratio that needs it.
    fn why_missing(&self, metric: &str) -> String {
        match self.failed.get(metric) {
            Some(failure) => format!("{metric} not measured: {}", failure.why),
            None => format!("{metric} has no samples"),
        }
    }

    /// `{"metric": "A_over_B", "unit": "x", ...}` (p50/p50, p99/p99) and a target line.
    fn ratio(&self, a: &str, b: &str, target: f64, note: Option<&str>) {
        let (sa, sb) = match self.summaries(a, b) {
            Ok(pair) => pair,
            Err(why) => {
                println!("linux-report: target: {a} / {b} <= {target} not computed: {why}");
                return;
            }
        };
        println!("{}", ratio_line(&format!("{a}_over_{b}"), sa, sb));
        let p50 = sa.p50 / sb.p50;
        println!(
            "linux-report: target: {a} / {b} = {p50:.3} (p50), target <= {target}: {}{}",
            if p50 <= target { "met" } else { "MISSED" },
            note.map(|n| format!(" ({n})")).unwrap_or_default()
        );
    }

    /// The floor under the target `ratio_of / b <= target`: `guest_part / b`, where
    /// `guest_part` is the share of `ratio_of` that the guest spends running its own code
    /// (the same kernel under every system), which no engine work can remove. Prints the
    /// ratio line and `linux-report: floor: ...`, saying whether the target lies below it.
    fn floor(&self, guest_part: &str, b: &str, ratio_of: &str, target: f64) {
        let (sa, sb) = match self.summaries(guest_part, b) {
            Ok(pair) => pair,
            Err(why) => {
                println!("linux-report: floor: {guest_part} / {b} not computed: {why}");
                return;
            }
        };
        println!("{}", ratio_line(&format!("{guest_part}_over_{b}"), sa, sb));
        let p50 = sa.p50 / sb.p50;
        println!(
            "linux-report: floor: {guest_part} / {b} = {p50:.3} (p50): what passes once the \
             guest runs (its own code and the VM exits it makes) is already that share of {b}, \
             so {ratio_of} / {b} cannot go below it without a faster guest; the target \
             {target} is {}",
            if p50 > target {
                "below the floor: unreachable in this run"
            } else {
                "above the floor"
            }
        );
    }
}

/// `{"metric": NAME, "unit": "x", ...}`: p50 over p50, p99 over p99.
fn ratio_line(name: &str, ours: Summary, theirs: Summary) -> String {
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    format!(
        "{{\"metric\": \"{name}\", \"unit\": \"x\", \"p50\": {:.3}, \"p99\": {:.3}, \"n\": {}}}",
        div(ours.p50, theirs.p50),
        div(ours.p99, theirs.p99),
        ours.n.min(theirs.n)
    )
}

/// The systems measured, for rotating their order.
#[derive(Clone, Copy, Debug)]
enum System {
    Capsule,
    Qemu,
    Firecracker,
}

/// The order of round `i`: the three rotate, so that each goes first, second and third.
fn rotation(i: usize) -> [System; 3] {
    let all = [System::Capsule, System::Qemu, System::Firecracker];
    [all[i % 3], all[(i + 1) % 3], all[(i + 2) % 3]]
}

/// Everything the phases share.
struct Setup {
    engine: Engine,
    qemu: Option<Qemu>,
    firecracker: Option<Firecracker>,
    heartbeat_ms: u64,
    /// The command line with the heartbeat on, for the peers' lifecycle VMs.
    heartbeat_cmdline: String,
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
    let rounds = env_num("CAPSULE_LINUX_REPORT_LIFECYCLE", boots)?;
    let heartbeat_ms = env_num("CAPSULE_LINUX_REPORT_HEARTBEAT_MS", 5)?.max(1) as u64;

    let dir = tempfile::tempdir()?;
    // The peers' sockets, configuration and snapshot files (in L1: /tmp, a tmpfs).
    let work = tempfile::tempdir()?;
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
    start_watchdog();
    if !start_phases::install() {
        eprintln!("linux-report: note: another tracing subscriber is installed: no start phases");
    }

    let qemu = match Qemu::from_env(&kernel, &initrd, work.path()) {
        Ok(q) => {
            println!(
                "linux-report: QEMU: {}",
                q.describe(MEMORY_MB, LINUX_KERNEL_CMDLINE)
            );
            eprintln!(
                "linux-report: QEMU process start and exit alone (`-version`, median of 3): \
                 {:.0} ms",
                q.version_ms(3)
            );
            Some(q)
        }
        Err(why) => {
            println!("linux-report: QEMU microvm not measured: {why}");
            None
        }
    };
    let firecracker = match std::env::var_os("CAPSULE_FIRECRACKER") {
        Some(path) => match Firecracker::new(&PathBuf::from(path), &kernel, &initrd, work.path()) {
            Ok(fc) => {
                println!(
                    "linux-report: Firecracker: {} ({}), same kernel, initramfs and command \
                     line (it appends pci=off)",
                    fc.version(),
                    fc.program().display()
                );
                Some(fc)
            }
            Err(why) => {
                println!("linux-report: Firecracker not measured: {why}");
                None
            }
        },
        None => {
            println!(
                "linux-report: Firecracker not measured: {}",
                std::env::var("CAPSULE_FIRECRACKER_ABSENT").unwrap_or_else(|_| {
                    "CAPSULE_FIRECRACKER (the path of a firecracker binary) is not set".into()
                })
            );
            None
        }
    };
    println!(
        "linux-report: {boots} boots each (plus one warm-up), capsule, QEMU and Firecracker in \
         turn; kernel command line {LINUX_KERNEL_CMDLINE:?}; {rounds} lifecycle rounds at \
         {LIFECYCLE_MEMORY_MB} MiB, heartbeat every {heartbeat_ms} ms"
    );
    let mut setup = Setup {
        engine,
        qemu,
        firecracker,
        heartbeat_ms,
        heartbeat_cmdline: format!("{LINUX_KERNEL_CMDLINE} capsule.heartbeat={heartbeat_ms}"),
    };
    let mut metrics = Metrics::default();

    let parts = parts()?;
    if parts.contains(&"boot") {
        boot_phase(&mut setup, &mut metrics, boots)?;
    }
    if parts.contains(&"io") {
        exec_phase(&setup, &mut metrics, execs)?;
    }
    metrics.print(&[
        ("linux_boot_to_ready", "us"),
        ("linux_boot_to_marker", "us"),
        ("qemu_microvm_boot_to_ready", "us"),
        ("qemu_microvm_boot_to_marker", "us"),
        ("firecracker_boot_to_marker", "us"),
        ("linux_boot_guest_to_marker", "us"),
        ("firecracker_boot_guest_to_marker", "us"),
        ("linux_exec_roundtrip", "us"),
        ("linux_file_write_mbps", "MB/s"),
        ("linux_file_read_mbps", "MB/s"),
    ]);
    print_stream_and_channel(&mut metrics);
    if let (Some(ours), Some(theirs)) = (
        metrics.summary("linux_boot_to_ready"),
        metrics.summary("qemu_microvm_boot_to_ready"),
    ) {
        println!(
            "{}",
            ratio_line("boot_ratio_capsule_over_qemu", ours, theirs)
        );
        println!(
            "linux-report: note: QEMU's boot figures include ~3.4 s that its guest spends in \
             the rtc_cmos probe (not removed by rtc=off); compare boots with Firecracker"
        );
    }

    let lifecycle_rounds = if parts.contains(&"lifecycle") {
        rounds
    } else {
        0
    };
    for i in 0..lifecycle_rounds {
        for system in rotation(i) {
            match system {
                System::Capsule => capsule_round(&setup, &mut metrics, i),
                System::Qemu => qemu_round(&mut setup, &mut metrics, i),
                System::Firecracker => firecracker_round(&mut setup, &mut metrics, i),
            }
        }
    }
    metrics.print(&[
        ("linux_pause", "us"),
        ("linux_resume_to_live", "us"),
        ("linux_resume_guest_to_live", "us"),
        ("linux_resume_to_ready", "us"),
        ("firecracker_snapshot_create", "us"),
        ("firecracker_restore_to_live", "us"),
        ("firecracker_restore_guest_to_live", "us"),
        ("qemu_microvm_snapshot_create", "us"),
        ("qemu_microvm_restore_to_ready", "us"),
        ("qemu_microvm_restore_to_live", "us"),
    ]);

    if parts.contains(&"templates") {
        template_phase(&setup, &mut metrics, rounds.max(1));
    }
    metrics.print(&[
        ("linux_template_spawn_to_ready", "us"),
        ("linux_template_spawn_guest_to_ready", "us"),
        ("linux_template_spawn_to_live", "us"),
        ("linux_template_spawn_guest_to_live", "us"),
        ("linux_fork_to_ready", "us"),
        ("linux_clone_rss_kib", "KiB"),
        ("linux_clone_pss_kib", "KiB"),
        ("linux_clone_command_rss_kib", "KiB"),
    ]);
    *PHASE.lock().unwrap_or_else(|p| p.into_inner()) = None;
    metrics.print_starts();

    metrics.ratio(
        "linux_boot_to_marker",
        "firecracker_boot_to_marker",
        0.5,
        None,
    );
    metrics.ratio(
        "linux_template_spawn_to_live",
        "firecracker_restore_to_live",
        0.1,
        None,
    );
    metrics.ratio(
        "linux_resume_to_live",
        "firecracker_restore_to_live",
        0.1,
        None,
    );
    metrics.ratio(
        "linux_template_spawn_to_ready",
        "linux_boot_to_ready",
        0.05,
        None,
    );
    metrics.ratio(
        "linux_pause",
        "firecracker_snapshot_create",
        0.25,
        Some("same guest, 512 MiB"),
    );
    metrics.floor(
        "linux_boot_guest_to_marker",
        "firecracker_boot_to_marker",
        "linux_boot_to_marker",
        0.5,
    );
    metrics.floor(
        "linux_template_spawn_guest_to_live",
        "firecracker_restore_to_live",
        "linux_template_spawn_to_live",
        0.1,
    );
    metrics.floor(
        "linux_resume_guest_to_live",
        "firecracker_restore_to_live",
        "linux_resume_to_live",
        0.1,
    );
    metrics.floor(
        "linux_template_spawn_guest_to_ready",
        "linux_boot_to_ready",
        "linux_template_spawn_to_ready",
        0.05,
    );
    match metrics.summary("linux_clone_rss_kib") {
        Some(s) => println!(
            "linux-report: target: linux_clone_rss_kib = {:.0} KiB (p50), target <= 4096: {}",
            s.p50,
            if s.p50 <= 4096.0 { "met" } else { "MISSED" }
        ),
        None => println!(
            "linux-report: target: linux_clone_rss_kib <= 4096 not computed: {}",
            metrics.why_missing("linux_clone_rss_kib")
        ),
    }
    Ok(())
}

/// Prints `linux-report: WHAT: KVM events: exits=.. pf_fixed=.. ...` since `before` (when
/// KVM's counters can be read: debugfs, as in the nested harness's L1). The counters are the
/// host's, so nothing else may run a VM meanwhile (the report runs one system at a time).
fn print_kvm_stats(what: &str, before: Option<kvm_stats::KvmStats>) {
    if let (Some(before), Some(after)) = (before, kvm_stats::read()) {
        eprintln!(
            "linux-report: {what}: KVM events: {}",
            before.delta_to(&after)
        );
    }
}

/// The parts of the report to run: `CAPSULE_LINUX_REPORT_PARTS`, a comma-separated subset
/// of [`PARTS`] (default: all), so a part can be measured again alone.
fn parts() -> Result<Vec<&'static str>> {
    let Ok(list) = std::env::var("CAPSULE_LINUX_REPORT_PARTS") else {
        return Ok(PARTS.to_vec());
    };
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            PARTS
                .iter()
                .copied()
                .find(|&known| known == p)
                .ok_or_else(|| {
                    format!("CAPSULE_LINUX_REPORT_PARTS: unknown part {p:?} (parts: {PARTS:?})")
                        .into()
                })
        })
        .collect()
}

/// The report's parts, in the order they run.
const PARTS: [&str; 4] = ["boot", "io", "lifecycle", "templates"];

/// The boots, interleaved, after one warm-up each.
fn boot_phase(setup: &mut Setup, metrics: &mut Metrics, boots: usize) -> Result<()> {
    let config = CapsuleConfig::builder("minimal")
        .vcpus(1)
        .memory_mb(MEMORY_MB)
        .build();
    // Warm-ups, not measured: the first use of each maps code and fills caches.
    phase("warm-up: capsule boot");
    let warm = Instant::now();
    match setup.engine.create(config.clone()) {
        Ok(first) => {
            eprintln!(
                "linux-report: warm-up capsule boot {:.0} ms",
                warm.elapsed().as_secs_f64() * 1e3
            );
            if std::env::var_os("CAPSULE_LINUX_REPORT_DMESG").is_some() {
                print_guest_diagnostics(&first);
            }
            first.destroy()?;
        }
        // Not measured; a broken guest here must not end the report.
        Err(e) => println!("linux-report: the warm-up capsule did not boot: {e}"),
    }
    qemu_boot(setup, metrics, None);
    firecracker_boot(setup, metrics, None);

    for i in 0..boots {
        for system in rotation(i) {
            match system {
                System::Capsule => capsule_boot(setup, metrics, &config, i)?,
                System::Qemu => qemu_boot(setup, metrics, Some(i)),
                System::Firecracker => firecracker_boot(setup, metrics, Some(i)),
            }
        }
    }
    Ok(())
}

/// One capsule boot: `linux_boot_to_ready`, and `linux_boot_to_marker` from the guest clock.
fn capsule_boot(
    setup: &Setup,
    metrics: &mut Metrics,
    config: &CapsuleConfig,
    i: usize,
) -> Result<()> {
    phase(format!("boot {}: capsule", i + 1));
    start_phases::take();
    let mut t = Instant::now();
    let capsule = match setup.engine.create(config.clone()) {
        Ok(c) => c,
        Err(e) => {
            // TCG's nested SVM breaks a guest now and then (xtask/README.md): once more.
            println!(
                "linux-report: boot {}: the capsule did not boot ({e}); booting it once more",
                i + 1
            );
            t = Instant::now();
            setup.engine.create(config.clone())?
        }
    };
    let took = t.elapsed();
    metrics.add_time("linux_boot_to_ready", took);
    metrics.add_starts("linux_boot_to_ready");
    if let Some(clock) = console::marker_clock(&capsule.console_log()) {
        metrics.add("linux_boot_guest_to_marker", clock * 1e6);
    }
    let marker = marker_time(&capsule, t);
    match &marker {
        Ok((at, error)) => {
            metrics.add_time("linux_boot_to_marker", *at);
            eprintln!(
                "linux-report: boot {}: capsule ready {:.0} ms, marker {:.0} ms (from the guest \
                 clock, ± {:.1} ms)",
                i + 1,
                took.as_secs_f64() * 1e3,
                at.as_secs_f64() * 1e3,
                error.as_secs_f64() * 1e3
            );
        }
        Err(e) => {
            metrics.fail("linux_boot_to_marker", e);
            eprintln!(
                "linux-report: boot {}: capsule ready {:.0} ms",
                i + 1,
                took.as_secs_f64() * 1e3
            );
        }
    }
    phase(format!("boot {}: destroying the capsule", i + 1));
    capsule.destroy()?;
    Ok(())
}

/// When the boot marker appeared, since `created` (the host time of `create`), and the
/// uncertainty: see the module docs.
fn marker_time(
    capsule: &Capsule,
    created: Instant,
) -> std::result::Result<(Duration, Duration), String> {
    let log = capsule.console_log();
    let marker = console::marker_clock(&log).ok_or_else(|| {
        format!(
            "no `{}` line on the capsule's console (an agent without the marker?)",
            console::MARKER
        )
    })?;
    // The reading with the shortest round trip (the first command after a boot is slower).
    let mut best: Option<(Instant, Duration, f64)> = None;
    for _ in 0..3 {
        let sent = Instant::now();
        let out = capsule
            .commands()
            .run("grep -m1 '^now at' /proc/timer_list")
            .map_err(|e| format!("reading the guest clock: {e}"))?;
        let answered = Instant::now();
        // "now at 2043198114 nsecs"
        let now_ns: f64 = out
            .stdout_str()
            .split_whitespace()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("unexpected /proc/timer_list line {:?}", out.stdout))?;
        let half = answered.duration_since(sent) / 2;
        if best.is_none_or(|(_, h, _)| half < h) {
            best = Some((sent + half, half, now_ns / 1e9));
        }
    }
    let (midpoint, half, now) = best.ok_or("no guest clock reading")?;
    let since_marker = now - marker;
    if since_marker < 0.0 {
        return Err(format!(
            "the guest clock went backwards: marker at {marker} s, now {now} s"
        ));
    }
    let at = midpoint
        .checked_sub(Duration::from_secs_f64(since_marker))
        .and_then(|at| at.checked_duration_since(created))
        .ok_or("the marker's host time falls before the create")?;
    Ok((at, half))
}

/// One QEMU boot (`round`: none for the warm-up). A failure is printed and ends QEMU's
/// boot measurements.
fn qemu_boot(setup: &mut Setup, metrics: &mut Metrics, round: Option<usize>) {
    let Some(q) = &setup.qemu else { return };
    phase(match round {
        Some(i) => format!("boot {}: QEMU", i + 1),
        None => "warm-up: QEMU boot".to_string(),
    });
    match q.boot_to_ready(MEMORY_MB, LINUX_KERNEL_CMDLINE, BOOT_TIMEOUT) {
        Ok((marker, ready)) => {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            let marker_ms = marker.map_or("?".into(), |m| format!("{:.0}", ms(m)));
            match round {
                Some(i) => {
                    metrics.add_time("qemu_microvm_boot_to_ready", ready);
                    match marker {
                        Some(m) => metrics.add_time("qemu_microvm_boot_to_marker", m),
                        None => metrics.fail(
                            "qemu_microvm_boot_to_marker",
                            "no marker line before the ready line",
                        ),
                    }
                    eprintln!(
                        "linux-report: boot {}: QEMU ready {:.0} ms, marker {marker_ms} ms",
                        i + 1,
                        ms(ready)
                    );
                }
                None => eprintln!(
                    "linux-report: warm-up QEMU boot {:.0} ms (marker {marker_ms} ms)",
                    ms(ready)
                ),
            }
        }
        Err(why) => {
            println!("linux-report: QEMU microvm not measured: {why}");
            setup.qemu = None;
        }
    }
}

/// One Firecracker boot (`round`: none for the warm-up). A failure is printed and ends
/// Firecracker's boot measurements.
fn firecracker_boot(setup: &mut Setup, metrics: &mut Metrics, round: Option<usize>) {
    let Some(fc) = &setup.firecracker else {
        return;
    };
    if metrics.gave_up("firecracker_boot_to_marker") {
        return;
    }
    phase(match round {
        Some(i) => format!("boot {}: Firecracker", i + 1),
        None => "warm-up: Firecracker boot".to_string(),
    });
    match fc.boot_to_marker(MEMORY_MB, LINUX_KERNEL_CMDLINE, BOOT_TIMEOUT) {
        Ok((took, guest_clock)) => {
            let ms = took.as_secs_f64() * 1e3;
            match round {
                Some(i) => {
                    metrics.add_time("firecracker_boot_to_marker", took);
                    if let Some(clock) = guest_clock {
                        metrics.add("firecracker_boot_guest_to_marker", clock * 1e6);
                    }
                    eprintln!(
                        "linux-report: boot {}: Firecracker marker {ms:.0} ms",
                        i + 1
                    );
                }
                None => eprintln!("linux-report: warm-up Firecracker boot {ms:.0} ms"),
            }
        }
        Err(why) => metrics.fail("firecracker_boot_to_marker", why),
    }
}

fn exec_phase(setup: &Setup, metrics: &mut Metrics, execs: usize) -> Result<()> {
    let config = CapsuleConfig::builder("minimal")
        .vcpus(1)
        .memory_mb(MEMORY_MB)
        .build();
    // A guest that TCG's nested SVM breaks (xtask/README.md) gets one more try.
    for attempt in 1..=2 {
        phase(format!(
            "exec: capsule boot, then {execs} runs of `true`{}",
            if attempt > 1 { " (once more)" } else { "" }
        ));
        let t = Instant::now();
        let capsule = match setup.engine.create(config.clone()) {
            Ok(c) => c,
            Err(e) => {
                metrics.fail(
                    "linux_exec_roundtrip",
                    format!("the capsule did not boot: {e}"),
                );
                continue;
            }
        };
        print_boot_breakdown(&capsule, t.elapsed());
        match file_transfers(&capsule, env_num("CAPSULE_LINUX_REPORT_FILES", 3)?) {
            Ok((writes, reads)) => {
                for (w, r) in writes.into_iter().zip(reads) {
                    metrics.add("linux_file_write_mbps", w);
                    metrics.add("linux_file_read_mbps", r);
                }
            }
            Err(e) => {
                metrics.fail("linux_file_write_mbps", &e);
                metrics.fail("linux_file_read_mbps", &e);
            }
        }
        let streams = env_num("CAPSULE_LINUX_REPORT_STREAMS", 3)?;
        stream_and_channel(&capsule, metrics, streams, execs);
        let exec = exec_roundtrips(&capsule, execs).map_err(|e| {
            let info = capsule.info();
            format!(
                "{e} (capsule {:?}, {:?}); its console:\n{}",
                info.status,
                info.error,
                capsule.console_log()
            )
        });
        if let Err(e) = capsule.destroy() {
            eprintln!("linux-report: destroying a capsule failed: {e}");
        }
        match exec {
            Ok(exec) => {
                for sample in exec {
                    metrics.add("linux_exec_roundtrip", sample);
                }
                return Ok(());
            }
            Err(e) => metrics.fail("linux_exec_roundtrip", e),
        }
    }
    Ok(())
}

/// `n` transfers each way of 100 MiB (8 MiB in the nested harness) through `files().write_from` into the guest's `/tmp`
/// and `files().read_into` back, in MB/s (default 1: under TCG each takes minutes).
fn file_transfers(capsule: &Capsule, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    // In the nested harness the guest's hvc console driver moves output 4 KiB at a time,
    // each waiting for the host, at well under 1 MB/s under TCG: 8 MiB there (the rate is
    // what counts), 100 MiB elsewhere.
    let len: u64 = if std::env::var_os("CAPSULE_NESTED").is_some() {
        8 << 20
    } else {
        100 << 20
    };
    let mib = len >> 20;
    const PATH: &str = "/tmp/linux-report.bin";
    let files = capsule.files().timeout(PHASE_LIMIT);
    let mbps = |d: Duration| len as f64 / 1e6 / d.as_secs_f64();
    let (mut writes, mut reads) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 1..=n {
        phase(format!("files: writing {mib} MiB ({i} of {n})"));
        let t = Instant::now();
        files.write_from(
            PATH,
            Progress::new("written", std::io::repeat(0x5a).take(len)),
        )?;
        let write = t.elapsed();
        phase(format!("files: reading {mib} MiB ({i} of {n})"));
        let t = Instant::now();
        let read = files.read_into(PATH, Progress::new("read", std::io::sink()))?;
        let read_time = t.elapsed();
        // The guest's /tmp is half of its memory: one file at a time.
        files.remove(PATH)?;
        if read != len {
            return Err(format!("read {read} bytes of {len}").into());
        }
        writes.push(mbps(write));
        reads.push(mbps(read_time));
    }
    Ok((writes, reads))
}

/// A reader or writer that prints a line every 16 MiB through it: a transfer that takes
/// minutes under TCG must not look like a hung L1 to the nested harness (silent 300 s).
struct Progress<T> {
    what: &'static str,
    inner: T,
    bytes: u64,
}

impl<T> Progress<T> {
    fn new(what: &'static str, inner: T) -> Self {
        Progress {
            what,
            inner,
            bytes: 0,
        }
    }

    fn count(&mut self, n: usize) {
        const STEP: u64 = 16 << 20;
        let before = self.bytes / STEP;
        self.bytes += n as u64;
        if self.bytes / STEP > before {
            eprintln!(
                "linux-report: files: {} MiB {}",
                self.bytes >> 20,
                self.what
            );
        }
    }
}

impl<T: std::io::Read> std::io::Read for Progress<T> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count(n);
        Ok(n)
    }
}

impl<T: std::io::Write> std::io::Write for Progress<T> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count(n);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// `n` timed runs of `true` after five warm-up runs, in microseconds.
fn exec_roundtrips(capsule: &Capsule, n: usize) -> Result<Vec<f64>> {
    let commands = capsule.commands();
    for _ in 0..5 {
        commands.run("true")?;
    }
    let mut exec = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = commands.run("true")?;
        exec.push(micros(t.elapsed()));
        if out.exit_code != Some(0) {
            return Err(format!("`true` exited {:?} in the guest", out.exit_code).into());
        }
    }
    Ok(exec)
}

fn lifecycle_config() -> CapsuleConfig {
    CapsuleConfig::builder("minimal")
        .vcpus(1)
        .memory_mb(LIFECYCLE_MEMORY_MB)
        .build()
}

/// Starts the heartbeat in a capsule (`/init --heartbeat MS` in its own session, writing to
/// `/dev/console`), as its one command; returns the heartbeat's pid, once a heartbeat line
/// is on the console.
fn start_heartbeat(capsule: &Capsule, ms: u64) -> std::result::Result<u32, String> {
    let out = capsule
        .commands()
        .run(format!(
            "setsid /init --heartbeat {ms} </dev/null >/dev/null 2>&1 & echo $!"
        ))
        .map_err(|e| format!("starting the heartbeat: {e}"))?;
    let pid = out
        .stdout_str()
        .trim()
        .parse()
        .map_err(|_| format!("starting the heartbeat printed {:?}", out.stdout))?;
    wait_heartbeat_after(capsule, None, Instant::now() + LIVE_TIMEOUT)?;
    Ok(pid)
}

/// Polls the capsule's console until a heartbeat numbered above `baseline` shows; when it
/// was seen.
fn wait_heartbeat_after(
    capsule: &Capsule,
    baseline: Option<u64>,
    deadline: Instant,
) -> std::result::Result<Instant, String> {
    loop {
        if last_heartbeat(&capsule.console_log()) > baseline {
            return Ok(Instant::now());
        }
        check_alive(capsule, deadline, "a heartbeat")?;
        std::thread::sleep(CONSOLE_POLL);
    }
}

/// An error if the capsule failed or stopped, or `deadline` passed.
fn check_alive(
    capsule: &Capsule,
    deadline: Instant,
    what: &str,
) -> std::result::Result<(), String> {
    let status = capsule.status();
    if matches!(status, Status::Error | Status::Stopped) {
        let info = capsule.info();
        return Err(format!(
            "the capsule is {status:?} ({:?}) while waiting for {what}; console tail:\n{}",
            info.error,
            tail(&capsule.console_log(), 10)
        ));
    }
    if Instant::now() > deadline {
        return Err(format!(
            "no {what} within {} s (capsule {status:?}); console tail:\n{}",
            LIVE_TIMEOUT.as_secs(),
            tail(&capsule.console_log(), 10)
        ));
    }
    Ok(())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

const CAPSULE_LIFECYCLE: [&str; 3] = [
    "linux_pause",
    "linux_resume_to_live",
    "linux_resume_to_ready",
];

/// One capsule round: boot, one command (the heartbeat), pause, resume until the next
/// heartbeat, pause again, resume until a command answers.
fn capsule_round(setup: &Setup, metrics: &mut Metrics, i: usize) {
    if CAPSULE_LIFECYCLE.iter().all(|m| metrics.gave_up(m)) {
        return;
    }
    phase(format!(
        "lifecycle {}: capsule boot ({LIFECYCLE_MEMORY_MB} MiB) and its one command",
        i + 1
    ));
    let capsule = match setup.engine.create(lifecycle_config()) {
        Ok(c) => c,
        Err(e) => {
            for m in CAPSULE_LIFECYCLE {
                metrics.fail(m, format!("the capsule did not boot: {e}"));
            }
            return;
        }
    };
    capsule_pause_resume(&capsule, setup, metrics, i);
    phase(format!("lifecycle {}: destroying the capsule", i + 1));
    if let Err(e) = capsule.destroy() {
        eprintln!("linux-report: destroying a capsule failed: {e}");
    }
}

/// The measurements of [`capsule_round`] on a booted capsule; a failure is recorded for
/// the metrics it prevents, and ends the round.
fn capsule_pause_resume(capsule: &Capsule, setup: &Setup, metrics: &mut Metrics, i: usize) {
    let fail_all = |metrics: &mut Metrics, why: &str| {
        for m in CAPSULE_LIFECYCLE {
            metrics.fail(m, why);
        }
    };
    if let Err(e) = start_heartbeat(capsule, setup.heartbeat_ms) {
        fail_all(metrics, &e);
        return;
    }
    phase(format!("lifecycle {}: capsule pause", i + 1));
    let t = Instant::now();
    if let Err(e) = capsule.pause() {
        metrics.fail_engine("linux_pause", &e, "");
        let context = "needs a paused capsule: pause failed: ";
        metrics.fail_engine("linux_resume_to_live", &e, context);
        metrics.fail_engine("linux_resume_to_ready", &e, context);
        return;
    }
    let paused = t.elapsed();
    metrics.add_time("linux_pause", paused);
    let baseline = last_heartbeat(&capsule.console_log());

    phase(format!(
        "lifecycle {}: capsule resume until the next heartbeat",
        i + 1
    ));
    start_phases::take();
    let stats = kvm_stats::read();
    let t = Instant::now();
    let live = capsule
        .resume()
        .map_err(|e| format!("resume failed: {e}"))
        .map(|()| t.elapsed())
        .and_then(|resumed| {
            wait_heartbeat_after(capsule, baseline, t + LIVE_TIMEOUT).map(|at| (resumed, at))
        });
    match live {
        Ok((resumed, at)) => {
            let took = at.duration_since(t);
            metrics.add_time("linux_resume_to_live", took);
            if let Some(guest) = metrics.add_starts("linux_resume_to_live") {
                metrics.add_time("linux_resume_guest_to_live", at.duration_since(guest));
            }
            print_kvm_stats(
                &format!("lifecycle {}: capsule resume to live", i + 1),
                stats,
            );
            eprintln!(
                "linux-report: lifecycle {}: capsule pause {:.1} ms; resume returned {:.1} ms, \
                 live {:.1} ms (heartbeat after {baseline:?})",
                i + 1,
                paused.as_secs_f64() * 1e3,
                resumed.as_secs_f64() * 1e3,
                took.as_secs_f64() * 1e3
            );
        }
        Err(e) => {
            metrics.fail("linux_resume_to_live", &e);
            metrics.fail("linux_resume_to_ready", format!("the first resume: {e}"));
            return;
        }
    }

    phase(format!(
        "lifecycle {}: capsule second pause, resume until `true`",
        i + 1
    ));
    let t = Instant::now();
    if let Err(e) = capsule.pause() {
        metrics.fail(
            "linux_resume_to_ready",
            format!("the second pause failed: {e}"),
        );
        return;
    }
    let second = t.elapsed();
    let t = Instant::now();
    let ready = capsule
        .resume()
        .map_err(|e| format!("resume failed: {e}"))
        .and_then(|()| {
            capsule
                .commands()
                .run("true")
                .map_err(|e| format!("`true` after the resume failed: {e}"))
        });
    match ready {
        Ok(_) => {
            let took = t.elapsed();
            metrics.add_time("linux_resume_to_ready", took);
            eprintln!(
                "linux-report: lifecycle {}: capsule second pause {:.1} ms, resume to ready \
                 {:.1} ms",
                i + 1,
                second.as_secs_f64() * 1e3,
                took.as_secs_f64() * 1e3
            );
        }
        Err(e) => metrics.fail("linux_resume_to_ready", e),
    }
}

const FIRECRACKER_LIFECYCLE: [&str; 2] =
    ["firecracker_snapshot_create", "firecracker_restore_to_live"];

/// One Firecracker round: boot with the heartbeat, pause and snapshot, kill, restore in a
/// new process until the heartbeat.
fn firecracker_round(setup: &mut Setup, metrics: &mut Metrics, i: usize) {
    let Some(fc) = &setup.firecracker else {
        return;
    };
    if FIRECRACKER_LIFECYCLE.iter().any(|m| metrics.gave_up(m)) {
        return;
    }
    phase(format!(
        "lifecycle {}: Firecracker boot ({LIFECYCLE_MEMORY_MB} MiB, heartbeat)",
        i + 1
    ));
    let result = (|| -> std::result::Result<(Duration, Duration, Duration), (&str, String)> {
        let boot_failed = |e: String| ("boot", e);
        let mut vm = fc
            .start(LIFECYCLE_MEMORY_MB, &setup.heartbeat_cmdline)
            .map_err(boot_failed)?;
        if vm
            .console()
            .wait_for(BOOT_TIMEOUT, |_, l| heartbeat_seq(l).is_some())
            .is_none()
        {
            return Err(boot_failed(vm.failure("no heartbeat after the boot")));
        }
        phase(format!(
            "lifecycle {}: Firecracker pause and snapshot",
            i + 1
        ));
        let snapshot = fc.snapshot_paths();
        let t = Instant::now();
        let paused = vm.pause().map_err(|e| ("snapshot", e))?;
        vm.snapshot(&snapshot).map_err(|e| ("snapshot", e))?;
        let created = t.elapsed();
        drop(vm);
        phase(format!("lifecycle {}: Firecracker restore", i + 1));
        let stats = kvm_stats::read();
        let (mut restored, loaded) = fc.restore(&snapshot).map_err(|e| ("restore", e))?;
        let Some(live) = restored
            .console()
            .wait_for(LIVE_TIMEOUT, is_life_after_restore)
        else {
            return Err((
                "restore",
                restored.failure("no heartbeat after the snapshot was loaded"),
            ));
        };
        print_kvm_stats(
            &format!("lifecycle {}: Firecracker restore to live", i + 1),
            stats,
        );
        let live = live.duration_since(restored.started());
        eprintln!(
            "linux-report: lifecycle {}: Firecracker pause {:.1} ms, snapshot create (with the \
             pause) {:.1} ms; restore: load answered {:.1} ms, live {:.1} ms",
            i + 1,
            paused.as_secs_f64() * 1e3,
            created.as_secs_f64() * 1e3,
            loaded.as_secs_f64() * 1e3,
            live.as_secs_f64() * 1e3
        );
        Ok((created, loaded, live))
    })();
    match result {
        Ok((created, loaded, live)) => {
            metrics.add_time("firecracker_snapshot_create", created);
            metrics.add_time("firecracker_restore_to_live", live);
            metrics.add_time(
                "firecracker_restore_guest_to_live",
                live.saturating_sub(loaded),
            );
        }
        Err(("snapshot", e)) | Err(("boot", e)) => {
            for m in FIRECRACKER_LIFECYCLE {
                metrics.fail(m, &e);
            }
        }
        Err((_, e)) => metrics.fail("firecracker_restore_to_live", e),
    }
}

const QEMU_LIFECYCLE: [&str; 3] = [
    "qemu_microvm_snapshot_create",
    "qemu_microvm_restore_to_ready",
    "qemu_microvm_restore_to_live",
];

/// One QEMU round: boot with the heartbeat until ready, save (stop, migrate to a file), a
/// second QEMU restoring it until a command answers and until the heartbeat.
fn qemu_round(setup: &mut Setup, metrics: &mut Metrics, i: usize) {
    let Some(q) = &setup.qemu else { return };
    if QEMU_LIFECYCLE.iter().any(|m| metrics.gave_up(m)) {
        return;
    }
    phase(format!(
        "lifecycle {}: QEMU boot ({LIFECYCLE_MEMORY_MB} MiB, heartbeat)",
        i + 1
    ));
    let file = q.migration_file();
    let result =
        (|| -> std::result::Result<(Duration, Duration, Duration), (bool, String)> {
            let mut vm = q
                .start(LIFECYCLE_MEMORY_MB, &setup.heartbeat_cmdline)
                .map_err(|e| (true, e))?;
            if vm
                .console()
                .wait_for(BOOT_TIMEOUT, |_, l| l.contains(console::READY))
                .is_none()
            {
                return Err((true, vm.failure("no ready line after the boot")));
            }
            phase(format!(
                "lifecycle {}: QEMU save (stop, migrate to a file)",
                i + 1
            ));
            let saved = vm.save(&file).map_err(|e| (true, e))?;
            drop(vm);
            phase(format!("lifecycle {}: QEMU restore (-incoming)", i + 1));
            let mut restored = q
                .restore(LIFECYCLE_MEMORY_MB, &setup.heartbeat_cmdline, &file)
                .map_err(|e| (false, e))?;
            let agent = restored.agent().map_err(|e| (false, e))?;
            let resumed = restored.resume_incoming().map_err(|e| (false, e))?;
            let ready = agent
                .run_true(LIVE_TIMEOUT)
                .map_err(|e| (false, restored.failure(&e)))?;
            let Some(live) = restored
                .console()
                .wait_for(LIVE_TIMEOUT, is_life_after_restore)
            else {
                return Err((false, restored.failure("no heartbeat after the restore")));
            };
            let started = restored.started();
            eprintln!(
            "linux-report: lifecycle {}: QEMU save {:.1} ms ({} KiB); restore: cont at {:.1} ms, \
             ready {:.1} ms, live {:.1} ms",
            i + 1,
            saved.as_secs_f64() * 1e3,
            std::fs::metadata(&file).map(|m| m.len() / 1024).unwrap_or(0),
            resumed.duration_since(started).as_secs_f64() * 1e3,
            ready.duration_since(started).as_secs_f64() * 1e3,
            live.duration_since(started).as_secs_f64() * 1e3
        );
            Ok((
                saved,
                ready.duration_since(started),
                live.duration_since(started),
            ))
        })();
    let _ = std::fs::remove_file(&file);
    match result {
        Ok((saved, ready, live)) => {
            metrics.add_time("qemu_microvm_snapshot_create", saved);
            metrics.add_time("qemu_microvm_restore_to_ready", ready);
            metrics.add_time("qemu_microvm_restore_to_live", live);
        }
        Err((true, e)) => {
            for m in QEMU_LIFECYCLE {
                metrics.fail(m, &e);
            }
        }
        Err((false, e)) => {
            metrics.fail("qemu_microvm_restore_to_ready", &e);
            metrics.fail("qemu_microvm_restore_to_live", &e);
        }
    }
}

const TEMPLATE: &str = "linux-report-template";
const QUIET_TEMPLATE: &str = "linux-report-quiet";

/// Templates and forks of a running capsule.
fn template_phase(setup: &Setup, metrics: &mut Metrics, rounds: usize) {
    const ALL: [&str; 6] = [
        "linux_template_spawn_to_ready",
        "linux_template_spawn_to_live",
        "linux_fork_to_ready",
        "linux_clone_rss_kib",
        "linux_clone_pss_kib",
        "linux_clone_command_rss_kib",
    ];
    phase(format!(
        "templates: source capsule boot ({LIFECYCLE_MEMORY_MB} MiB) and heartbeat"
    ));
    let source = match setup.engine.create(lifecycle_config()) {
        Ok(c) => c,
        Err(e) => {
            for m in ALL {
                metrics.fail(m, format!("the source capsule did not boot: {e}"));
            }
            return;
        }
    };
    let heartbeat = match start_heartbeat(&source, setup.heartbeat_ms) {
        Ok(pid) => pid,
        Err(e) => {
            for m in ALL {
                metrics.fail(m, &e);
            }
            let _ = source.destroy();
            return;
        }
    };

    phase("templates: snapshot of the running source");
    let before = last_heartbeat(&source.console_log());
    let watch = SourceWatch::start(&source);
    let snapshot = source.snapshot(TEMPLATE);
    let (frozen, plateau) = watch.stop(setup.heartbeat_ms);
    let after = last_heartbeat(&source.console_log());
    match snapshot {
        Ok(_) => {
            eprintln!(
                "linux-report: templates: the source's heartbeat: {before:?} before snapshot, \
                 {after:?} after; it stood still longest at {frozen:?} ({:.1} ms)",
                plateau.as_secs_f64() * 1e3
            );
            for i in 0..rounds {
                template_spawn_round(setup, metrics, i, before, frozen.or(after));
            }
        }
        Err(e) => {
            for m in [
                "linux_template_spawn_to_ready",
                "linux_template_spawn_to_live",
            ] {
                metrics.fail_engine(m, &e, "snapshot (the template) failed: ");
            }
        }
    }

    for i in 0..rounds {
        if metrics.gave_up("linux_fork_to_ready") {
            break;
        }
        phase(format!(
            "fork {}: fork(1) of the running source until `true`",
            i + 1
        ));
        start_phases::take();
        let t = Instant::now();
        match source.fork(1) {
            Ok(forks) => {
                let answered = forks
                    .first()
                    .ok_or_else(|| "fork(1) returned no capsule".to_string())
                    .and_then(|f| {
                        f.commands()
                            .run("true")
                            .map_err(|e| format!("`true` in the fork failed: {e}"))
                    });
                match answered {
                    Ok(_) => {
                        let took = t.elapsed();
                        metrics.add_time("linux_fork_to_ready", took);
                        metrics.add_starts("linux_fork_to_ready");
                        eprintln!(
                            "linux-report: fork {}: ready {:.1} ms",
                            i + 1,
                            took.as_secs_f64() * 1e3
                        );
                    }
                    Err(e) => metrics.fail("linux_fork_to_ready", e),
                }
                for f in forks {
                    let _ = f.destroy();
                }
            }
            Err(e) => metrics.fail_engine("linux_fork_to_ready", &e, "fork failed: "),
        }
    }

    clone_rss(setup, metrics, &source, heartbeat);
    let _ = source.destroy();
    for name in [TEMPLATE, QUIET_TEMPLATE] {
        if let Err(e) = setup.engine.delete_template(name) {
            if !matches!(e, capsule::Error::TemplateNotFound(_)) {
                eprintln!("linux-report: deleting template {name}: {e}");
            }
        }
    }
}

/// One spawn from the template until ready, one until live.
fn template_spawn_round(
    setup: &Setup,
    metrics: &mut Metrics,
    i: usize,
    before: Option<u64>,
    frozen: Option<u64>,
) {
    phase(format!("template spawn {}: until `true` answers", i + 1));
    start_phases::take();
    let t = Instant::now();
    let ready = setup
        .engine
        .create(CapsuleConfig::new(TEMPLATE))
        .map_err(|e| format!("create from the template failed: {e}"))
        .and_then(|c| {
            let ran = c
                .commands()
                .run("true")
                .map_err(|e| format!("`true` in the clone failed: {e}"));
            let took = t.elapsed();
            let _ = c.destroy();
            ran.map(|_| took)
        });
    match ready {
        Ok(took) => {
            metrics.add_time("linux_template_spawn_to_ready", took);
            if let Some(guest) = metrics.add_starts("linux_template_spawn_to_ready") {
                metrics.add_time(
                    "linux_template_spawn_guest_to_ready",
                    (t + took).duration_since(guest),
                );
            }
        }
        Err(e) => metrics.fail("linux_template_spawn_to_ready", e),
    }

    phase(format!("template spawn {}: until a heartbeat", i + 1));
    start_phases::take();
    let stats = kvm_stats::read();
    let t = Instant::now();
    let live = setup
        .engine
        .create(CapsuleConfig::builder(TEMPLATE).wait(false).build())
        .map_err(|e| format!("create from the template failed: {e}"))
        .and_then(|c| {
            let seen = wait_clone_heartbeat(&c, before, frozen, t + LIVE_TIMEOUT);
            // Before the destroy: debugfs sums the counters of the VMs that exist.
            print_kvm_stats(&format!("template spawn {} to live", i + 1), stats);
            // The start's phases are logged once it is ready (after the heartbeat).
            let _ = c.wait_ready(LIVE_TIMEOUT, Duration::from_millis(1));
            let _ = c.destroy();
            seen
        });
    match live {
        Ok((at, inherited)) => {
            let took = at.duration_since(t);
            metrics.add_time("linux_template_spawn_to_live", took);
            if let Some(guest) = metrics.add_starts("linux_template_spawn_to_live") {
                metrics.add_time(
                    "linux_template_spawn_guest_to_live",
                    at.duration_since(guest),
                );
            }
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            eprintln!(
                "linux-report: template spawn {}: ready {}, live {:.1} ms (clone console {})",
                i + 1,
                metrics
                    .samples
                    .get("linux_template_spawn_to_ready")
                    .and_then(|s| s.last())
                    .map_or("?".into(), |us| format!("{:.1} ms", us / 1e3)),
                ms(took),
                if inherited {
                    "continues the template's"
                } else {
                    "starts empty"
                }
            );
        }
        Err(e) => metrics.fail("linux_template_spawn_to_live", e),
    }
}

/// Polls a clone's console until it shows a heartbeat of its own: any, when its console
/// starts empty; one numbered above `frozen` (what the source had printed when the
/// snapshot froze it) when the console continues the template's (it holds a heartbeat
/// numbered at most `before`, printed before the snapshot). Returns when, and whether the
/// console was inherited.
fn wait_clone_heartbeat(
    clone: &Capsule,
    before: Option<u64>,
    frozen: Option<u64>,
    deadline: Instant,
) -> std::result::Result<(Instant, bool), String> {
    loop {
        let log = clone.console_log();
        if !log.is_empty() {
            let inherited = before.is_some()
                && log
                    .lines()
                    .filter_map(heartbeat_seq)
                    .any(|n| Some(n) <= before);
            let baseline = if inherited { frozen } else { None };
            if last_heartbeat(&log) > baseline {
                return Ok((Instant::now(), inherited));
            }
        }
        check_alive(clone, deadline, "the clone's heartbeat")?;
        std::thread::sleep(CONSOLE_POLL);
    }
}

/// Watches a running capsule's heartbeat while a snapshot of it is taken, to find the one
/// it stood still at (the snapshot froze it there).
struct SourceWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Instant, Option<u64>)>>,
}

impl SourceWatch {
    fn start(capsule: &Capsule) -> SourceWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let capsule = capsule.clone();
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let at = Instant::now();
                seen.push((at, last_heartbeat(&capsule.console_log())));
                std::thread::sleep(Duration::from_millis(1));
            }
            seen
        });
        SourceWatch { stop, thread }
    }

    /// The heartbeat the source stood still at longest, if that was clearly longer than the
    /// heartbeat's interval (`ms`), and for how long.
    fn stop(self, ms: u64) -> (Option<u64>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let seen = self.thread.join().unwrap_or_default();
        let mut best: (Option<u64>, Duration) = (None, Duration::ZERO);
        let mut start = 0;
        for i in 1..=seen.len() {
            if i == seen.len() || seen[i].1 != seen[start].1 {
                let held = seen[i - 1].0.duration_since(seen[start].0);
                if held > best.1 {
                    best = (seen[start].1, held);
                }
                start = i;
            }
        }
        if best.1 >= Duration::from_millis(3 * ms) {
            best
        } else {
            (None, best.1)
        }
    }
}

/// `linux_clone_rss_kib` and `linux_clone_pss_kib`: 10 idle clones of a template of the
/// source taken after its heartbeat was stopped.
fn clone_rss(setup: &Setup, metrics: &mut Metrics, source: &Capsule, heartbeat: u32) {
    const BOTH: [&str; 3] = [
        "linux_clone_rss_kib",
        "linux_clone_pss_kib",
        "linux_clone_command_rss_kib",
    ];
    phase("clone RSS: a quiet template (the heartbeat stopped)");
    let template = source
        .commands()
        .run(format!("kill {heartbeat}"))
        .map_err(|e| format!("stopping the heartbeat: {e}"))
        .and_then(|_| {
            source
                .snapshot(QUIET_TEMPLATE)
                .map_err(|e| format!("snapshot (the template) failed: {e}"))
        });
    if let Err(e) = template {
        for m in BOTH {
            metrics.fail(m, &e);
        }
        return;
    }
    phase(format!("clone RSS: {CLONES} idle clones"));
    let mut clones = Vec::new();
    let mut previous = (vm_rss_kib(), pss_kib());
    let first = previous;
    let mut failure = None;
    for _ in 0..CLONES {
        let clone = match setup.engine.create(CapsuleConfig::new(QUIET_TEMPLATE)) {
            Ok(c) => c,
            Err(e) => {
                failure = Some(format!("create from the template failed: {e}"));
                break;
            }
        };
        // Ready (its agent answered the start-up sync), then idle.
        std::thread::sleep(CLONE_SETTLE);
        let idle = (vm_rss_kib(), pss_kib());
        metrics.add("linux_clone_rss_kib", idle.0 as f64 - previous.0 as f64);
        metrics.add("linux_clone_pss_kib", idle.1 as f64 - previous.1 as f64);
        let ran = clone.commands().run("true");
        clones.push(clone);
        if let Err(e) = ran {
            failure = Some(format!("`true` in a clone failed: {e}"));
            break;
        }
        std::thread::sleep(CLONE_SETTLE);
        let now = (vm_rss_kib(), pss_kib());
        metrics.add("linux_clone_command_rss_kib", now.0 as f64 - idle.0 as f64);
        previous = now;
    }
    eprintln!(
        "linux-report: clone RSS: VmRSS {} -> {} KiB, Pss {} -> {} KiB over {} clones",
        first.0,
        previous.0,
        first.1,
        previous.1,
        clones.len()
    );
    if let Some(e) = failure {
        for m in BOTH {
            metrics.fail(m, &e);
        }
        metrics.samples.remove("linux_clone_rss_kib");
        metrics.samples.remove("linux_clone_pss_kib");
        metrics.samples.remove("linux_clone_command_rss_kib");
    }
    for c in clones {
        let _ = c.destroy();
    }
}

/// `VmRSS` of this process (/proc/self/status), KiB.
fn vm_rss_kib() -> u64 {
    proc_kib("/proc/self/status", "VmRSS:")
}

/// `Pss` of this process (/proc/self/smaps_rollup), KiB.
fn pss_kib() -> u64 {
    proc_kib("/proc/self/smaps_rollup", "Pss:")
}

fn proc_kib(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Splits one capsule boot (`took`, host clock) by the guest's clock (stderr): the kvm-clock
/// offset the kernel found at its clock's start (time since the vCPU was created: host set-up
/// after it, the bzImage's decompression), the kernel's uptime at `/init`, and its uptime when
/// the first command after `Hello` ran. The rest is host-side (before the vCPU existed, and
/// after `Hello`).
fn print_boot_breakdown(capsule: &Capsule, took: Duration) {
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
         clock (decompression, early set-up) {}, kernel to /init {}, marker {}, uptime at the \
         first command {}; host-side rest {}",
        took.as_secs_f64() * 1e3,
        ms(offset),
        ms(stamp("Run /init as init process")),
        ms(console::marker_clock(&capsule.console_log())),
        ms(uptime),
        ms(offset.zip(uptime).map(|(o, u)| took.as_secs_f64() - o - u))
    );
}

/// Prints the guest's kernel log and uptime (stderr): where the first boot's time went.
fn print_guest_diagnostics(capsule: &Capsule) {
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

/// Bytes of each stream and channel transfer, as the file transfers: 100 MiB, 8 MiB in the
/// nested harness (where the guest's console driver moves output at well under 1 MB/s).
fn io_len() -> u64 {
    if std::env::var_os("CAPSULE_NESTED").is_some() {
        8 << 20
    } else {
        100 << 20
    }
}

/// Streams and the agent's channel, in the exec phase's capsule right after its file
/// transfers: one unmeasured warm-up round of an eighth of the size, then `rounds` rounds,
/// each of [`io_len`] bytes through the raw channel from the agent (`linux_channel_mbps`), of a
/// spawned command's stdout (`linux_stream_mbps`) and through the raw channel to the agent
/// (`linux_channel_in_mbps`), in that order, so the three share the capsule's and the host's
/// state; then `first_bytes` spawns of `echo x` (after five unmeasured ones) for
/// `linux_stream_first_byte`.
fn stream_and_channel(capsule: &Capsule, metrics: &mut Metrics, rounds: usize, first_bytes: usize) {
    let mbps = |len: u64, d: Duration| len as f64 / 1e6 / d.as_secs_f64();
    for i in 0..=rounds {
        let (len, what) = if i == 0 {
            (io_len() / 8, format!("warm-up, {} MiB", io_len() >> 23))
        } else {
            (io_len(), format!("{} MiB, {i} of {rounds}", io_len() >> 20))
        };
        // `Some(to_guest)`: the raw channel that way; `None`: the stream.
        for (metric, channel) in [
            ("linux_channel_mbps", Some(false)),
            ("linux_stream_mbps", None),
            ("linux_channel_in_mbps", Some(true)),
        ] {
            if metrics.gave_up(metric) {
                continue;
            }
            let took = match channel {
                None => {
                    phase(format!(
                        "stream: `head -c {len} /dev/zero`, its stdout streamed ({what})"
                    ));
                    stream_once(capsule, len)
                }
                Some(to_guest) => {
                    phase(format!(
                        "channel: raw bytes {} the agent ({what})",
                        if to_guest { "to" } else { "from" }
                    ));
                    capsule.channel_test(len, to_guest, PHASE_LIMIT)
                }
            };
            match took {
                Ok(took) if i > 0 => metrics.add(metric, mbps(len, took)),
                Ok(took) => eprintln!(
                    "linux-report: {metric} warm-up: {:.1} MB/s",
                    mbps(len, took)
                ),
                Err(e) => metrics.fail_engine(metric, &e, ""),
            }
        }
    }
    phase(format!(
        "stream: {first_bytes} spawns of `echo x` until the first chunk"
    ));
    for i in 0..first_bytes + 5 {
        if metrics.gave_up("linux_stream_first_byte") {
            break;
        }
        match first_byte(capsule) {
            Ok(took) if i >= 5 => metrics.add_time("linux_stream_first_byte", took),
            Ok(_) => {}
            Err(e) => metrics.fail_engine("linux_stream_first_byte", &e, ""),
        }
    }
}

/// Spawns `head -c LEN /dev/zero` and takes its stdout as it streams, dropping it: the time
/// from `spawn` until the last byte was taken (the command's exit is checked after).
fn stream_once(capsule: &Capsule, len: u64) -> capsule::Result<Duration> {
    let bad = |why: String| capsule::Error::Agent {
        id: capsule.id().clone(),
        reason: why,
    };
    let started = Instant::now();
    let handle = capsule.commands().spawn(
        format!("head -c {len} /dev/zero"),
        capsule::RunOptions::new().timeout(PHASE_LIMIT),
    )?;
    let mut output = handle.output();
    let mut got = 0u64;
    while let Some(chunk) = output.recv_timeout(PHASE_LIMIT)? {
        if chunk.is_stderr() {
            return Err(bad(format!(
                "stderr: {}",
                String::from_utf8_lossy(chunk.bytes())
            )));
        }
        got += chunk.bytes().len() as u64;
    }
    let took = started.elapsed();
    let exit = handle.wait()?;
    if got != len || exit.exit_code != Some(0) {
        return Err(bad(format!(
            "streamed {got} bytes of {len}, exit {:?}",
            exit.exit_code
        )));
    }
    Ok(took)
}

/// Spawns `echo x`: the time from `spawn` until its first stdout chunk arrived.
fn first_byte(capsule: &Capsule) -> capsule::Result<Duration> {
    let started = Instant::now();
    let handle = capsule
        .commands()
        .spawn("echo x", capsule::RunOptions::new().timeout(LIVE_TIMEOUT))?;
    let first = handle.output().recv_timeout(LIVE_TIMEOUT)?;
    let took = started.elapsed();
    let exit = handle.wait()?;
    match first {
        Some(capsule::Output::Stdout(bytes))
            if bytes.starts_with(b"x") && exit.exit_code == Some(0) =>
        {
            Ok(took)
        }
        other => Err(capsule::Error::Agent {
            id: capsule.id().clone(),
            reason: format!("`echo x` gave {other:?} first, exit {:?}", exit.exit_code),
        }),
    }
}

/// The JSON lines of the streams and the channel, and how streams and files compare with
/// the channel they go through: `linux_stream_mbps` and `linux_file_read_mbps` (agent to
/// host) over `linux_channel_mbps`, `linux_file_write_mbps` (host to agent) over
/// `linux_channel_in_mbps`, each with the target ≥ 0.7.
fn print_stream_and_channel(metrics: &mut Metrics) {
    metrics.print(&[
        ("linux_stream_mbps", "MB/s"),
        ("linux_stream_first_byte", "us"),
        ("linux_channel_mbps", "MB/s"),
        ("linux_channel_in_mbps", "MB/s"),
    ]);
    for (a, b) in [
        ("linux_stream_mbps", "linux_channel_mbps"),
        ("linux_file_read_mbps", "linux_channel_mbps"),
        ("linux_file_write_mbps", "linux_channel_in_mbps"),
    ] {
        ratio_at_least(metrics, a, b, 0.7);
    }
}

/// [`Metrics::ratio`] for a target the ratio must reach (a throughput against its ceiling):
/// `{"metric": "A_over_B", "unit": "x", ...}` and `linux-report: target: A / B = R (p50),
/// target >= T: met` (or `MISSED`, or `not computed: WHY`).
fn ratio_at_least(metrics: &Metrics, a: &str, b: &str, target: f64) {
    let (sa, sb) = match (metrics.summary(a), metrics.summary(b)) {
        (Some(sa), Some(sb)) => (sa, sb),
        (sa, _) => {
            let missing = if sa.is_none() { a } else { b };
            println!(
                "linux-report: target: {a} / {b} >= {target} not computed: {}",
                metrics.why_missing(missing)
            );
            return;
        }
    };
    println!("{}", ratio_line(&format!("{a}_over_{b}"), sa, sb));
    let p50 = sa.p50 / sb.p50;
    println!(
        "linux-report: target: {a} / {b} = {p50:.3} (p50), target >= {target}: {}",
        if p50 >= target { "met" } else { "MISSED" }
    );
}
