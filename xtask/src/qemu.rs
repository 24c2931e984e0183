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
    /// Stopped because L1's kernel reported a CPU stuck in a soft lockup this long (at
    /// least [`LOCKUP_LIMIT`]): its watchdog keeps the console talking, so silence would
    /// never tell.
    pub locked_up: Option<Duration>,
    pub wall: Duration,
}

/// The kernel command line of L1.
pub const APPEND: &str = "console=ttyS0 panic=-1 quiet";

/// Boots L1 and follows its console (also copied to `log`) until QEMU exits or the timeout.
pub fn boot(boot: &Boot, log: &Path) -> Result<Outcome> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-cpu", "max"])
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
        .arg(APPEND)
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
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(boot.stall)) {
            Ok(line) => {
                if let Some(stuck) = soft_lockup(&line).filter(|s| *s >= LOCKUP_LIMIT) {
                    locked_up = Some(stuck);
                    break;
                }
                report.line(&line, started.elapsed());
            }
            Err(RecvTimeoutError::Timeout) => {
                if left <= boot.stall {
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
    if let Some(silence) = stalled {
        println!(
            "xtask: L1 printed nothing for {} s: it hung; stopping QEMU",
            silence.as_secs()
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
        locked_up,
        wall,
    })
}

/// How long a CPU of L1 may be stuck in a soft lockup before L1 counts as hung (TCG has
/// left one stuck for over 8 minutes, its watchdog printing every ~30 s).
pub const LOCKUP_LIMIT: Duration = Duration::from_secs(120);

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
    fn soft_lockup_lines() {
        assert_eq!(
            soft_lockup("[  156.5] watchdog: BUG: soft lockup - CPU#0 stuck for 44s! [a_fork:744]"),
            Some(Duration::from_secs(44))
        );
        assert_eq!(soft_lockup("test x ... ok"), None);
        assert_eq!(soft_lockup("soft lockup - CPU#1 stuck for many s!"), None);
    }
}
