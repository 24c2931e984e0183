//! Packs the L1 initramfs (newc cpio, gzip): busybox and its applet links, `/init`, the KVM
//! modules, the test binaries, the host report program and any extra files.
//!
//! Layout inside L1:
//! - `/init` (`xtask/l1/init.sh`), `/bin/busybox` + applet links, `/bin/nested-exit`;
//! - `/nested/modules/*.ko` and `/nested/modules.list` (load order; a module's parameters
//!   follow its name on its line);
//! - `/nested/tests/<package>.<target>` and `/nested/tests.list` (run order);
//! - `/nested/host-report` (the `quickstart` example: prints `engine.host()`);
//! - `/nested/linux-report` (`--linux-report`: the `capsule-benches` binary `linux-report`);
//! - `/nested/args` (libtest arguments, one per line), `/nested/config.sh`;
//! - `/nested/extra/<dest>`: extra files; tests find the directory in `$CAPSULE_NESTED_EXTRA`;
//! - `/nested/resume.list`, only in an L1 run after one that broke down ([`with_resume`]).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::binaries::TestBinary;
use crate::cpio::CpioWriter;
use crate::util::{have_program, Context, Error, Result};

/// The `/init` script.
const INIT: &str = include_str!("../l1/init.sh");

/// Busybox applets linked into `/bin`: what `/init` uses, plus tools for debugging in L1.
const APPLETS: &[&str] = &[
    "sh", "ash", "cat", "chmod", "cp", "cut", "date", "dd", "df", "dmesg", "echo", "env", "find",
    "free", "grep", "head", "insmod", "ln", "ls", "lsmod", "mkdir", "mknod", "mount", "mv",
    "nproc", "poweroff", "ps", "readlink", "reboot", "rm", "sed", "sleep", "sync", "tail", "tee",
    "timeout", "tr", "umount", "uname", "wc",
];

/// A host file copied into L1 at `/nested/extra/<dest>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extra {
    pub source: PathBuf,
    pub dest: String,
}

/// Everything that goes into the L1 initramfs.
#[derive(Debug)]
pub struct Contents {
    pub busybox: PathBuf,
    pub exit_helper: PathBuf,
    pub modules: Vec<PathBuf>,
    pub tests: Vec<TestBinary>,
    pub host_report: Option<PathBuf>,
    pub extra: Vec<Extra>,
    pub args: Vec<String>,
    pub test_threads: u32,
    /// Whether `/init` runs failed tests a second time (`RETRY_FAILED=1`).
    pub retry_failed: bool,
    /// The `linux-report` binary and its environment in L1 (`NAME`, value).
    pub linux_report: Option<(PathBuf, Vec<(String, String)>)>,
}

/// L1's `kvm-amd` module parameters (env `CAPSULE_NESTED_KVM_AMD` replaces them).
const KVM_AMD_PARAMS: &str = "";

fn kvm_amd_params() -> String {
    std::env::var("CAPSULE_NESTED_KVM_AMD").unwrap_or_else(|_| KVM_AMD_PARAMS.to_string())
}

/// Writes to `output` the initramfs `base` followed by a second, uncompressed archive
/// holding `/nested/resume.list` (what `/init` skips: `done BINARY` for a binary an earlier
/// L1 run finished, `passed BINARY TEST` for a test one saw pass). Linux unpacks archives
/// laid end to end, each starting at a 4-byte boundary; zero bytes between them are skipped.
pub fn with_resume(base: &Path, output: &Path, resume_list: &str) -> Result<()> {
    let mut bytes = fs::read(base).context(|| format!("cannot read {}", base.display()))?;
    bytes.resize(bytes.len().next_multiple_of(4), 0);
    let mut cpio = CpioWriter::new(bytes);
    cpio.file("/nested/resume.list", 0o644, resume_list.as_bytes())
        .and_then(|()| cpio.finish())
        .and_then(|bytes| fs::write(output, bytes))
        .context(|| format!("cannot write {}", output.display()))
}

/// Writes `contents` as a gzip-compressed newc cpio to `output`; `stage` holds stripped
/// copies of the binaries. Returns the compressed size.
pub fn pack(contents: &Contents, stage: &Path, output: &Path) -> Result<u64> {
    fs::create_dir_all(stage).context(|| format!("cannot create {}", stage.display()))?;
    let file = File::create(output).context(|| format!("cannot create {}", output.display()))?;
    let mut gzip = Command::new("gzip")
        .arg("-c")
        .stdin(Stdio::piped())
        .stdout(Stdio::from(file))
        .spawn()
        .context(|| "cannot start gzip".to_string())?;
    let stdin = gzip
        .stdin
        .take()
        .context(|| "gzip has no stdin".to_string())?;
    let written = write_cpio(contents, stage, BufWriter::new(stdin))
        .context(|| format!("cannot write {}", output.display()));
    // write_cpio consumed (and so closed) gzip's stdin, whatever happened.
    let status = gzip.wait().context(|| "cannot wait for gzip".to_string())?;
    written?;
    if !status.success() {
        return Err(Error::msg(format!("gzip failed ({status})")));
    }
    Ok(fs::metadata(output)
        .context(|| format!("cannot stat {}", output.display()))?
        .len())
}

fn write_cpio<W: Write>(contents: &Contents, stage: &Path, out: W) -> Result<()> {
    let io = |e: std::io::Error| Error::msg(e.to_string());
    let mut cpio = CpioWriter::new(out);
    for dir in [
        "/bin",
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/nested",
        "/nested/modules",
        "/nested/tests",
        "/nested/extra",
    ] {
        cpio.dir(dir, 0o755).map_err(io)?;
    }
    // The kernel opens /dev/console for init's stdio before /init mounts devtmpfs.
    cpio.char_dev("/dev/console", 0o600, 5, 1).map_err(io)?;
    cpio.file("/init", 0o755, INIT.as_bytes()).map_err(io)?;
    cpio.busybox(&contents.busybox, APPLETS).map_err(io)?;
    cpio.file_from("/bin/nested-exit", 0o755, &contents.exit_helper)
        .map_err(io)?;

    let mut list = String::new();
    for module in &contents.modules {
        let name = file_name(module)?;
        cpio.file_from(&format!("/nested/modules/{name}"), 0o644, module)
            .map_err(io)?;
        list.push_str(&name);
        if name == "kvm-amd.ko" {
            list.push(' ');
            list.push_str(&kvm_amd_params());
        }
        list.push('\n');
    }
    cpio.file("/nested/modules.list", 0o644, list.as_bytes())
        .map_err(io)?;

    let mut list = String::new();
    for test in &contents.tests {
        let packed = stripped(&test.path, &stage.join(&test.name))?;
        cpio.file_from(&format!("/nested/tests/{}", test.name), 0o755, &packed)
            .map_err(io)?;
        list.push_str(&test.name);
        list.push('\n');
    }
    cpio.file("/nested/tests.list", 0o644, list.as_bytes())
        .map_err(io)?;

    if let Some(report) = &contents.host_report {
        let packed = stripped(report, &stage.join("host-report"))?;
        cpio.file_from("/nested/host-report", 0o755, &packed)
            .map_err(io)?;
    }

    let mut args = String::new();
    for arg in &contents.args {
        if arg.contains('\n') {
            return Err(Error::msg(format!(
                "test argument {arg:?} contains a newline"
            )));
        }
        args.push_str(arg);
        args.push('\n');
    }
    cpio.file("/nested/args", 0o644, args.as_bytes())
        .map_err(io)?;
    let mut config = format!(
        "TEST_THREADS={}\nRETRY_FAILED={}\n",
        contents.test_threads,
        u8::from(contents.retry_failed)
    );
    if let Some((report, env)) = &contents.linux_report {
        let packed = stripped(report, &stage.join("linux-report"))?;
        cpio.file_from("/nested/linux-report", 0o755, &packed)
            .map_err(io)?;
        let mut exports = Vec::new();
        for (name, value) in env {
            if value.contains(['\'', '\n'])
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                return Err(Error::msg(format!("cannot pass {name}={value:?} to L1")));
            }
            config.push_str(&format!("{name}='{value}'\n"));
            exports.push(name.as_str());
        }
        if !exports.is_empty() {
            config.push_str(&format!("export {}\n", exports.join(" ")));
        }
    }
    cpio.file("/nested/config.sh", 0o644, config.as_bytes())
        .map_err(io)?;

    let mut dirs = BTreeSet::new();
    for extra in &contents.extra {
        let dest = extra_dest(&extra.dest)?;
        let mut parent = String::from("/nested/extra");
        let parts: Vec<&str> = dest.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            parent = format!("{parent}/{part}");
            if dirs.insert(parent.clone()) {
                cpio.dir(&parent, 0o755).map_err(io)?;
            }
        }
        let meta = fs::metadata(&extra.source)
            .context(|| format!("extra file {}", extra.source.display()))?;
        let perm = if is_executable(&meta) { 0o755 } else { 0o644 };
        cpio.file_from(&format!("/nested/extra/{dest}"), perm, &extra.source)
            .map_err(io)?;
    }
    cpio.finish().map_err(io)?;
    Ok(())
}

/// Checks an extra file's destination: relative, no `..`, no empty component.
pub fn extra_dest(dest: &str) -> Result<&str> {
    let dest = dest.trim_start_matches('/');
    if dest.is_empty()
        || dest
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        return Err(Error::msg(format!(
            "bad destination {dest:?} for an extra file (want a relative path like dir/name)"
        )));
    }
    Ok(dest)
}

fn file_name(path: &Path) -> Result<String> {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context(|| format!("{} has no file name", path.display()))
}

fn is_executable(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::PermissionsExt;
    meta.permissions().mode() & 0o111 != 0
}

/// A copy of `source` without debug information at `dest` (the release profile keeps line
/// tables; they would triple the initramfs). Falls back to `source` when there is no `strip`.
pub fn stripped(source: &Path, dest: &Path) -> Result<PathBuf> {
    if !have_program("strip") {
        return Ok(source.to_path_buf());
    }
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(dest)
        .arg(source)
        .status()
        .context(|| "cannot run strip".to_string())?;
    if status.success() {
        Ok(dest.to_path_buf())
    } else {
        Err(Error::msg(format!(
            "`strip --strip-debug -o {} {}` failed ({status})",
            dest.display(),
            source.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The second archive starts at a 4-byte boundary after the first, untouched.
    #[test]
    fn a_resume_list_follows_the_archive_aligned() {
        let dir = std::env::temp_dir().join(format!("xtask-resume-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (base, out) = (dir.join("base"), dir.join("out"));
        fs::write(&base, b"\x1f\x8b12345").unwrap();
        with_resume(&base, &out, "done capsule.api\n").unwrap();
        let bytes = fs::read(&out).unwrap();
        assert_eq!(&bytes[..7], b"\x1f\x8b12345");
        assert_eq!(&bytes[7..8], b"\0");
        assert_eq!(&bytes[8..14], b"070701");
        let text = String::from_utf8_lossy(&bytes[8..]);
        assert!(text.contains("nested/resume.list\0"));
        assert!(text.contains("done capsule.api\n"));
        assert!(text.contains("TRAILER!!!"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn extra_destinations() {
        assert_eq!(extra_dest("guest/vmlinux").unwrap(), "guest/vmlinux");
        assert_eq!(extra_dest("/x").unwrap(), "x");
        assert!(extra_dest("../x").is_err());
        assert!(extra_dest("a//b").is_err());
        assert!(extra_dest("").is_err());
    }

    #[test]
    fn init_script_markers() {
        for marker in [
            "NESTED-INIT",
            "NESTED-KVM-READY",
            "NESTED-TEST-BEGIN",
            "NESTED-TEST-END",
            "NESTED-DONE",
            "NESTED-ERROR",
            "NESTED-REPORT-BEGIN",
            "NESTED-REPORT-END",
            "NESTED-RETRY-BEGIN",
            "NESTED-RETRY-END",
        ] {
            assert!(INIT.contains(marker), "{marker}");
        }
    }
}
