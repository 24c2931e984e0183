//! PID 1 duties: basic mounts, kernel modules, boot options, the boot marker and heartbeat,
//! the channel.
//!
//! The marker and the heartbeat exist for benchmarks that compare VMMs, some of which (like
//! Firecracker) have no virtio-console, so the agent never gets its channel there: every
//! system is timed to the same lines on the serial console instead. The marker
//! ([`MARKER_LINE`], then the guest's `CLOCK_MONOTONIC`) is printed once, early, before the
//! modules are loaded and the channel is opened; `capsule.marker=0` turns it off. The
//! heartbeat (`capsule.heartbeat=MS`, off by default) is a thread that prints
//! `capsule-hb N` (N = 1, 2, ...) every MS milliseconds for the rest of the guest's life:
//! after a snapshot is restored, its next line is the guest's first sign of life. The same
//! heartbeat runs as an ordinary process with `capsule-agent --heartbeat MS` (it writes to
//! `/dev/console`), for guests whose kernel command line cannot be changed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::Duration;

use crate::sys;

/// Default channel device when neither `--channel` nor `capsule.channel=`
/// names one.
pub const DEFAULT_CHANNEL: &str = "/dev/hvc1";

/// Default list of kernel modules to load at boot.
pub const DEFAULT_MODULES_FILE: &str = "/etc/capsule/modules";

/// The start of the line PID 1 prints on the console early at boot (the boot marker),
/// followed by a space and the guest's `CLOCK_MONOTONIC` in seconds (six decimals).
pub const MARKER_LINE: &str = "capsule-init: marker";

/// The start of a heartbeat line: `capsule-hb N`, N counting from 1.
pub const HEARTBEAT_PREFIX: &str = "capsule-hb";

/// Options the agent reads from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    /// `capsule.channel=PATH`.
    pub channel: Option<String>,
    /// `capsule.ready` (or `capsule.ready=1`): print the ready line.
    pub ready: bool,
    /// Print the boot marker ([`MARKER_LINE`]); on unless `capsule.marker=0` (or `n`, `no`,
    /// `false`, `off`).
    pub marker: bool,
    /// `capsule.heartbeat=MS`: print a heartbeat line every MS milliseconds (0 or a value
    /// that is not a number: none).
    pub heartbeat: Option<Duration>,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            channel: None,
            ready: false,
            marker: true,
            heartbeat: None,
        }
    }
}

/// Whether a boolean option's value means on (`capsule.ready=1`); only `0`, `n`, `no`,
/// `false` and `off` mean off.
fn flag_value(v: &str) -> bool {
    !matches!(v, "0" | "n" | "no" | "false" | "off")
}

/// Parses the contents of `/proc/cmdline`. Later words win.
pub fn parse_cmdline(cmdline: &str) -> BootOptions {
    let mut opts = BootOptions::default();
    for word in cmdline.split_ascii_whitespace() {
        if let Some(path) = word.strip_prefix("capsule.channel=") {
            if !path.is_empty() {
                opts.channel = Some(path.to_string());
            }
        } else if word == "capsule.ready" {
            opts.ready = true;
        } else if let Some(v) = word.strip_prefix("capsule.ready=") {
            opts.ready = flag_value(v);
        } else if word == "capsule.marker" {
            opts.marker = true;
        } else if let Some(v) = word.strip_prefix("capsule.marker=") {
            opts.marker = flag_value(v);
        } else if let Some(v) = word.strip_prefix("capsule.heartbeat=") {
            opts.heartbeat = parse_heartbeat_ms(v);
        }
    }
    opts
}

/// A heartbeat interval in milliseconds: `None` for 0 or anything but a number.
pub fn parse_heartbeat_ms(value: &str) -> Option<Duration> {
    match value.trim().parse::<u64>() {
        Ok(0) | Err(_) => None,
        Ok(ms) => Some(Duration::from_millis(ms)),
    }
}

/// The boot marker line (with its newline) for the monotonic time `now`.
pub fn marker_line(now: Duration) -> String {
    format!(
        "{MARKER_LINE} {}.{:06}\n",
        now.as_secs(),
        now.subsec_micros()
    )
}

/// Prints the boot marker on stderr (PID 1's stderr is `/dev/console`) in one write.
pub fn print_marker() {
    let line = marker_line(sys::monotonic());
    // Nothing to do if the console is gone: the marker is for benchmarks only.
    let _ = io::stderr().write_all(line.as_bytes());
}

/// Heartbeat line number `seq` (with its newline).
pub fn heartbeat_line(seq: u64) -> String {
    format!("{HEARTBEAT_PREFIX} {seq}\n")
}

/// Writes a heartbeat line to `out` every `interval`, forever (write errors are ignored:
/// the console may come back).
pub fn run_heartbeat(out: &mut dyn Write, interval: Duration) -> ! {
    let mut seq: u64 = 0;
    loop {
        std::thread::sleep(interval);
        seq += 1;
        // One write per line, so that lines from other writers do not split it.
        let _ = out.write_all(heartbeat_line(seq).as_bytes());
    }
}

/// Starts a thread that prints the heartbeat on stderr (PID 1's console) every `interval`.
pub fn start_heartbeat(interval: Duration) -> io::Result<()> {
    std::thread::Builder::new()
        .name("heartbeat".into())
        .stack_size(64 * 1024)
        .spawn(move || run_heartbeat(&mut io::stderr(), interval))
        .map(drop)
}

/// `/dev/console` opened for writing (never as a controlling terminal), for a heartbeat
/// that runs as an ordinary process; stderr if it cannot be opened.
pub fn console_writer() -> Box<dyn Write> {
    use std::os::unix::fs::OpenOptionsExt;
    match OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/console")
    {
        Ok(f) => Box::new(f),
        Err(_) => Box::new(io::stderr()),
    }
}

/// One mount made by [`mount_basics`].
#[derive(Debug, Clone, Copy)]
pub struct MountSpec {
    /// Source (informational for pseudo file systems).
    pub source: &'static str,
    /// Mount point, created if missing.
    pub target: &'static str,
    /// File system type.
    pub fstype: &'static str,
    /// Mount flags.
    pub flags: libc::c_ulong,
    /// File-system specific options.
    pub data: Option<&'static str>,
}

/// What PID 1 mounts, in order.
pub const BASIC_MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        data: None,
    },
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: libc::MS_NOSUID,
        data: Some("mode=0755"),
    },
    // Pseudo-terminals (`/dev/ptmx` opens the instance mounted here).
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
        data: Some("gid=5,mode=0620,ptmxmode=0666"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: libc::MS_NOSUID | libc::MS_NODEV,
        data: Some("mode=0755"),
    },
];

/// Mounts [`BASIC_MOUNTS`]; an already-mounted target (EBUSY) is fine.
/// Returns the failures, which the caller logs; boot goes on regardless.
pub fn mount_basics() -> Vec<(&'static str, io::Error)> {
    let mut failures = Vec::new();
    for m in BASIC_MOUNTS {
        let _ = fs::create_dir_all(m.target);
        match sys::mount(m.source, m.target, m.fstype, m.flags, m.data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => failures.push((m.target, e)),
        }
    }
    failures
}

/// The module paths listed in a modules file: one per line, blank lines and
/// `#` comments ignored, surrounding whitespace trimmed.
pub fn parse_modules_list(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect()
}

/// Result of loading one module.
#[derive(Debug)]
pub struct ModuleLoad {
    /// The module file.
    pub path: String,
    /// `Ok(true)` loaded, `Ok(false)` was already loaded (EEXIST), or the error.
    pub result: io::Result<bool>,
}

/// Loads, in order, the modules listed in `list` with `finit_module`. A
/// missing list file means nothing to load.
pub fn load_modules(list: &Path) -> Vec<ModuleLoad> {
    let text = match fs::read_to_string(list) {
        Ok(t) => t,
        Err(_) => return Vec::new(),
    };
    parse_modules_list(&text)
        .into_iter()
        .map(|path| {
            let result = File::open(&path).and_then(|f| match sys::finit_module(&f) {
                Ok(()) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(false),
                Err(e) => Err(e),
            });
            ModuleLoad { path, result }
        })
        .collect()
}

/// Opens the channel device read-write, retrying every `retry` until it
/// exists and opens; a terminal is switched to raw mode. Logs the first
/// failure only.
pub fn open_channel(path: &str, retry: Duration) -> File {
    let mut logged = false;
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => {
                if let Err(e) = sys::make_raw_if_tty(&f) {
                    eprintln!("capsule-agent: {path}: cannot set raw mode: {e}");
                }
                return f;
            }
            Err(e) => {
                if !logged {
                    eprintln!("capsule-agent: waiting for channel {path}: {e}");
                    logged = true;
                }
                std::thread::sleep(retry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_options() {
        let o = parse_cmdline(
            "console=hvc0 root=/dev/vda capsule.channel=/dev/hvc2 capsule.ready quiet\n",
        );
        assert_eq!(
            o,
            BootOptions {
                channel: Some("/dev/hvc2".into()),
                ready: true,
                marker: true,
                heartbeat: None,
            }
        );
        assert_eq!(
            parse_cmdline("capsule.ready=0 capsule.channel="),
            BootOptions::default()
        );
        assert!(parse_cmdline("capsule.ready=1").ready);
        assert_eq!(parse_cmdline("").channel, None);
    }

    #[test]
    fn marker_and_heartbeat_options() {
        // The marker is on by default, so the engine's command line needs no new word.
        assert!(parse_cmdline("console=ttyS0 quiet").marker);
        assert!(parse_cmdline("capsule.marker").marker);
        assert!(parse_cmdline("capsule.marker=1").marker);
        for off in ["0", "n", "no", "false", "off"] {
            assert!(
                !parse_cmdline(&format!("capsule.marker={off}")).marker,
                "{off}"
            );
        }
        assert!(parse_cmdline("capsule.marker=0 capsule.marker").marker);
        // The heartbeat is off unless asked for with a positive number of milliseconds.
        assert_eq!(parse_cmdline("console=ttyS0").heartbeat, None);
        assert_eq!(
            parse_cmdline("quiet capsule.heartbeat=5 capsule.ready").heartbeat,
            Some(Duration::from_millis(5))
        );
        assert_eq!(
            parse_cmdline("capsule.heartbeat=5 capsule.heartbeat=250").heartbeat,
            Some(Duration::from_millis(250))
        );
        for bad in ["0", "", "x", "-5", "1.5", "5ms"] {
            assert_eq!(
                parse_cmdline(&format!("capsule.heartbeat={bad}")).heartbeat,
                None,
                "{bad:?}"
            );
        }
        assert_eq!(parse_cmdline("capsule.heartbeat").heartbeat, None);
        assert!(!parse_cmdline("capsule.heartbeat=5").ready);
    }

    #[test]
    fn marker_and_heartbeat_lines() {
        assert_eq!(
            marker_line(Duration::new(1, 234_567_891)),
            "capsule-init: marker 1.234567\n"
        );
        assert_eq!(
            marker_line(Duration::from_micros(5)),
            "capsule-init: marker 0.000005\n"
        );
        assert!(marker_line(Duration::ZERO).starts_with(MARKER_LINE));
        assert_eq!(heartbeat_line(1), "capsule-hb 1\n");
        assert!(heartbeat_line(42).starts_with(HEARTBEAT_PREFIX));
    }

    #[test]
    fn modules_list() {
        let text = "# drivers\n/lib/modules/a.ko\n\n  /lib/modules/b.ko  \n#x\n";
        assert_eq!(
            parse_modules_list(text),
            vec!["/lib/modules/a.ko", "/lib/modules/b.ko"]
        );
        assert!(load_modules(Path::new("/nonexistent/modules")).is_empty());
    }

    #[test]
    fn module_errors_are_reported_not_fatal() {
        let dir = std::env::temp_dir().join(format!("capsule-mod-{}", std::process::id()));
        let _ = fs::create_dir_all(&dir);
        let list = dir.join("modules");
        fs::write(&list, "/nonexistent/x.ko\n").unwrap();
        let r = load_modules(&list);
        assert_eq!(r.len(), 1);
        assert!(r[0].result.is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
