//! PID 1 duties: basic mounts, kernel modules, boot options, the channel.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::time::Duration;

use crate::sys;

/// Default channel device when neither `--channel` nor `capsule.channel=`
/// names one.
pub const DEFAULT_CHANNEL: &str = "/dev/hvc1";

/// Default list of kernel modules to load at boot.
pub const DEFAULT_MODULES_FILE: &str = "/etc/capsule/modules";

/// Options the agent reads from the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootOptions {
    /// `capsule.channel=PATH`.
    pub channel: Option<String>,
    /// `capsule.ready` (or `capsule.ready=1`): print the ready line.
    pub ready: bool,
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
            opts.ready = !matches!(v, "0" | "n" | "no" | "false" | "off");
        }
    }
    opts
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
                ready: true
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
