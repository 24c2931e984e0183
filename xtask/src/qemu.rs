//! Boots L1 under QEMU TCG, streams its serial console live, and enforces the timeout.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use crate::report::Report;
use crate::util::{describe, Context, Result};

/// How to boot L1.
#[derive(Debug)]
pub struct Boot {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub smp: u32,
    pub memory_mb: u32,
    pub timeout: Duration,
    /// L1 counts as hung after this long without a console line (tests print one as each
    /// finishes; the slowest takes about a minute in L1).
    pub stall: Duration,
}

/// How the L1 run ended.
#[derive(Debug)]
pub struct Outcome {
    pub report: Report,
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    /// Stopped because the console was silent this long ([`Boot::stall`]).
    pub stalled: Option<Duration>,
    /// With `stalled`: L1's heartbeat went on through the silence, so L1 ran and a test was
    /// stuck (its threads are in the `NESTED-HB` lines of the console).
    pub test_stuck: bool,
    /// Stopped because L1's kernel reported a CPU stuck in a soft lockup, or an RCU stall,
    /// this long (at least [`LOCKUP_LIMIT`]): its watchdogs keep the console talking, so
    /// silence would never tell.
    pub locked_up: Option<Duration>,
    pub wall: Duration,
}

/// The kernel command line of L1.
pub const APPEND: &str = "console=ttyS0 panic=-1 quiet";

/// Boots L1 and follows its console (also copied to `log`) until QEMU exits or the timeout.
pub fn boot(boot: &Boot, log: &Path) -> Result<Outcome> {
    let mut cmd = Command::new("qemu-system-x86_64");
    // `CAPSULE_NESTED_ACCEL` (e.g. `tcg,thread=single`) is for experiments with the emulator.
    let accel = std::env::var("CAPSULE_NESTED_ACCEL").unwrap_or_else(|_| "tcg".to_string());
    cmd.args(["-accel", &accel, "-cpu", "max"])
        .args(["-smp", &boot.smp.to_string()])
        .args(["-m", &boot.memory_mb.to_string()])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(&boot.kernel)
        .arg("-initrd")
        .arg(&boot.initrd)
        .arg("-append")
        .arg(match std::env::var("CAPSULE_NESTED_APPEND") {
            // More kernel parameters for L1, for experiments.
            Ok(more) if !more.trim().is_empty() => format!("{APPEND} {more}"),
            _ => APPEND.to_string(),
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let shown = describe(&cmd);
    println!("xtask: $ {shown}");
    println!(
        "xtask: ---- L1 serial console (timeout {} s) ----",
        boot.timeout.as_secs()
    );
    let mut log = File::create(log).context(|| format!("cannot create {}", log.display()))?;
    let started = Instant::now();
    let mut child = cmd.spawn().context(|| format!("cannot start `{shown}`"))?;
    let stdout = child
        .stdout
        .take()
        .context(|| "QEMU has no stdout pipe".to_string())?;

    let (tx, rx) = mpsc::channel::<String>();
    let reader = thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match stdout.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            while matches!(raw.last(), Some(b'\n' | b'\r')) {
                raw.pop();
            }
            let line = printable(&String::from_utf8_lossy(&raw));
            println!("{line}");
            let _ = writeln!(log, "{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = started + boot.timeout;
    let mut report = Report::default();
    let (mut timed_out, mut stalled, mut locked_up) = (false, None, None);
    let mut rcu = RcuStalls::default();
    // Heartbeat lines (`NESTED-HB`, from /init) are not output: a test stuck while L1 runs on
    // is as silent as a hung L1; they only tell the two apart.
    let mut last_output = Instant::now();
    let mut heartbeats_in_silence = 0u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let quiet_left = boot.stall.saturating_sub(last_output.elapsed());
        match rx.recv_timeout(left.min(quiet_left)) {
            Ok(line) if is_heartbeat(&line) => heartbeats_in_silence += 1,
            Ok(line) => {
                last_output = Instant::now();
                heartbeats_in_silence = 0;
                if let Some(stuck) = soft_lockup(&line).filter(|s| *s >= LOCKUP_LIMIT) {
                    locked_up = Some(stuck);
                    break;
                }
                if let Some(stuck) = rcu.line(&line, started.elapsed()) {
                    locked_up = Some(stuck);
                    break;
                }
                report.line(&line, started.elapsed());
            }
            Err(RecvTimeoutError::Timeout) => {
                if left <= quiet_left {
                    timed_out = true;
                } else {
                    stalled = Some(boot.stall);
                }
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out {
        println!(
            "xtask: L1 ran past the {} s timeout; stopping QEMU",
            boot.timeout.as_secs()
        );
        let _ = child.kill();
    }
    if let Some(stuck) = locked_up {
        println!(
            "xtask: an L1 CPU has been stuck in its kernel for {} s: L1 hung; stopping QEMU",
            stuck.as_secs()
        );
        let _ = child.kill();
    }
    let test_stuck = heartbeats_in_silence > 0;
    if let Some(silence) = stalled {
        println!(
            "xtask: L1 {}; stopping QEMU",
            describe_silence(silence, test_stuck)
        );
        let _ = child.kill();
    }
    let status = child.wait().ok();
    let wall = started.elapsed();
    // Drain what the reader still had (it ends with QEMU's stdout).
    let _ = reader.join();
    while let Ok(line) = rx.try_recv() {
        report.line(&line, wall);
    }
    println!(
        "xtask: ---- end of L1 console ({:.1} s) ----",
        wall.as_secs_f64()
    );
    Ok(Outcome {
        report,
        status,
        timed_out,
        stalled,
        test_stuck: stalled.is_some() && test_stuck,
        locked_up,
        wall,
    })
}

/// What a console silence of `silence` means, after "L1": a test stuck while L1 ran on (its
/// heartbeat went on), or L1 itself hung.
pub fn describe_silence(silence: Duration, test_stuck: bool) -> String {
    if test_stuck {
        format!(
            "had a test stuck: no test output for {} s while its heartbeat went on (the \
             test's threads are in the console's NESTED-HB lines)",
            silence.as_secs()
        )
    } else {
        format!(
            "hung: no console output for {} s, not even its heartbeat",
            silence.as_secs()
        )
    }
}

/// A line of /init's heartbeat (`NESTED-HB ...`), which does not count as output.
fn is_heartbeat(line: &str) -> bool {
    line.trim_start().starts_with("NESTED-HB")
}

/// How long a CPU of L1 may be stuck in a soft lockup before L1 counts as hung (TCG has
/// left one stuck for over 8 minutes, its watchdog printing every ~30 s).
pub const LOCKUP_LIMIT: Duration = Duration::from_secs(120);

/// L1's reports of an RCU grace period that does not end (`rcu: INFO: rcu_preempt detected
/// stalls on CPUs/tasks:`): a CPU stuck with interrupts off, which the soft-lockup watchdog
/// does not report (seen: one such CPU for over 8 minutes, the stall re-reported every ~63 s
/// and a test task blocked behind it). Reports that follow each other within
/// [`RCU_REPORT_GAP`] are one stall; one that lasts [`LOCKUP_LIMIT`] means L1 hung.
#[derive(Debug, Default)]
struct RcuStalls {
    /// When the current stall was first and last reported (time since L1 started).
    streak: Option<(Duration, Duration)>,
}

/// Longest gap between two reports of one RCU stall (the kernel repeats them every ~63 s).
const RCU_REPORT_GAP: Duration = Duration::from_secs(100);

impl RcuStalls {
    /// Takes a console line seen at `at`; how long the stall has lasted once that is at
    /// least [`LOCKUP_LIMIT`].
    fn line(&mut self, line: &str, at: Duration) -> Option<Duration> {
        if !line.contains("rcu: INFO:") || !line.contains("detected stalls") {
            return None;
        }
        let first = match self.streak {
            Some((first, last)) if at.saturating_sub(last) <= RCU_REPORT_GAP => first,
            _ => at,
        };
        self.streak = Some((first, at));
        let lasted = at.saturating_sub(first);
        (lasted >= LOCKUP_LIMIT).then_some(lasted)
    }
}

/// How long the CPU of a `watchdog: BUG: soft lockup - CPU#0 stuck for 44s! [...]` line has
/// been stuck.
fn soft_lockup(line: &str) -> Option<Duration> {
    let rest = line.split_once("soft lockup - CPU#")?.1;
    let secs = rest.split_once(" stuck for ")?.1.split_once("s!")?.0;
    secs.parse().ok().map(Duration::from_secs)
}

/// `line` without terminal escape sequences (SeaBIOS and the kernel clear the screen, which
/// would also reset the user's terminal) and other control characters except tabs.
fn printable(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                // CSI: parameters and intermediates, then one final byte in @..=~.
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            } else {
                chars.next(); // a two-character sequence such as ESC c (reset)
            }
        } else if !c.is_control() || c == '\t' {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_removed() {
        assert_eq!(
            printable("\u{1b}c\u{1b}[?7l\u{1b}[2JNESTED-INIT x\r"),
            "NESTED-INIT x"
        );
        assert_eq!(printable("a\tb \u{1b}[0mc"), "a\tb c");
        assert_eq!(printable("µs ok"), "µs ok");
    }

    #[test]
    fn an_rcu_stall_reported_for_two_minutes_is_a_hang() {
        let stall = "[  130.88] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:";
        let s = Duration::from_secs;
        let mut rcu = RcuStalls::default();
        assert_eq!(rcu.line("test x ... ok", s(10)), None);
        assert_eq!(rcu.line(stall, s(67)), None);
        assert_eq!(rcu.line(stall, s(130)), None);
        assert_eq!(rcu.line(stall, s(193)), Some(s(126)));
        // Stalls that end (no report for longer than the gap) do not add up.
        let mut rcu = RcuStalls::default();
        assert_eq!(rcu.line(stall, s(67)), None);
        assert_eq!(rcu.line(stall, s(130)), None);
        assert_eq!(rcu.line(stall, s(400)), None);
        assert_eq!(rcu.line(stall, s(463)), None);
        assert_eq!(rcu.line(stall, s(526)), Some(s(126)));
    }

    #[test]
    fn soft_lockup_lines() {
        assert_eq!(
            soft_lockup("[  156.5] watchdog: BUG: soft lockup - CPU#0 stuck for 44s! [a_fork:744]"),
            Some(Duration::from_secs(44))
        );
        assert_eq!(soft_lockup("test x ... ok"), None);
        assert_eq!(soft_lockup("soft lockup - CPU#1 stuck for many s!"), None);
    }
}
