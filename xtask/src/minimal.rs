//! `cargo xtask build-minimal`: builds the "minimal" Linux template's image from Debian
//! packages: the cloud kernel (`linux-image-cloud-amd64`), the virtio modules it needs,
//! `busybox-static` for `/bin/sh` and friends, and capsule's agent (static, musl) as `/init`.
//!
//! Output: `IMAGES/minimal/vmlinuz` and `IMAGES/minimal/initrd.img` (newc cpio, gzip), where
//! IMAGES defaults to the engine's default (`$XDG_DATA_HOME/capsule/images`, else
//! `~/.local/share/capsule/images`). On hosts without apt, pass `--kernel` (a bzImage),
//! `--modules` (its `lib/modules/<release>` directory) and `--busybox` (a static busybox).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::binaries;
use crate::cpio::CpioWriter;
use crate::kernel;
use crate::setup::{self, BUSYBOX};
use crate::util::{is_static_elf, stdout_of, Context, Error, Result};

/// The modules the agent loads, by name; their dependencies come first automatically.
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_mmio",
    "drivers/char/virtio_console",
    "drivers/char/hw_random/virtio-rng",
];
/// Where dependencies of [`MODULES`] are looked for, by module name.
const DEPENDENCY_DIRS: &[&str] = &["drivers/virtio"];

/// Options of `build-minimal`.
#[derive(Debug, Default)]
pub struct Options {
    pub images: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub modules: Option<PathBuf>,
    pub busybox: Option<PathBuf>,
    pub install: bool,
}

/// The engine's default images directory.
pub fn default_images_dir() -> Result<PathBuf> {
    let data = match std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|home| PathBuf::from(home).join(".local/share"))
            .context(|| "neither XDG_DATA_HOME nor HOME is set: pass --images".to_string())?,
    };
    Ok(data.join("capsule").join("images"))
}

/// Builds the image; returns the directory holding `vmlinuz` and `initrd.img`.
pub fn build(workspace: &Path, cache: &Path, o: &Options) -> Result<PathBuf> {
    let images = match &o.images {
        Some(dir) => dir.clone(),
        None => default_images_dir()?,
    };
    let out = images.join("minimal");
    fs::create_dir_all(&out).context(|| format!("cannot create {}", out.display()))?;

    let (vmlinuz, modules_root) = match (&o.kernel, &o.modules) {
        (Some(kernel), Some(modules)) => (kernel.clone(), modules.clone()),
        (None, None) => {
            let k = kernel::fetch(cache, o.install)?;
            let modules = k.root.join("lib/modules").join(&k.release);
            (k.vmlinuz, modules)
        }
        _ => return Err(Error::msg("--kernel and --modules go together")),
    };
    let busybox = match &o.busybox {
        Some(path) => path.clone(),
        None => {
            setup::ensure_busybox(o.install)?;
            PathBuf::from(BUSYBOX)
        }
    };
    let bytes = fs::read(&busybox).context(|| format!("cannot read {}", busybox.display()))?;
    if !is_static_elf(&bytes) {
        return Err(Error::msg(format!(
            "{} is not a static executable",
            busybox.display()
        )));
    }
    setup::ensure_musl_target(o.install)?;
    let agent = binaries::build_binary(workspace, "capsule-agent", "capsule-agent")?;
    let modules = module_load_order(&modules_root.join("kernel"))?;
    let applets = busybox_applets(&busybox)?;

    let initrd = out.join("initrd.img");
    let tmp = out.join(".initrd.img.tmp");
    write_initramfs(&tmp, &agent, &busybox, &applets, &modules)?;
    fs::rename(&tmp, &initrd).context(|| format!("cannot write {}", initrd.display()))?;
    fs::copy(&vmlinuz, out.join("vmlinuz"))
        .context(|| format!("cannot copy {}", vmlinuz.display()))?;
    // The uncompressed ELF beside it: booted through PVH, it spares every boot the kernel's
    // self-decompression. The engine uses it when present.
    match extract_vmlinux(&vmlinuz, o.install)? {
        Some(elf) => {
            let tmp = out.join(".vmlinux.tmp");
            fs::write(&tmp, elf).context(|| format!("cannot write {}", tmp.display()))?;
            fs::rename(&tmp, out.join("vmlinux"))
                .context(|| format!("cannot write {}", out.join("vmlinux").display()))?;
        }
        None => {
            let _ = fs::remove_file(out.join("vmlinux"));
            println!("xtask: the kernel's payload is not LZ4: booting the bzImage");
        }
    }
    println!(
        "xtask: minimal template in {} (kernel {}, {} modules, agent {})",
        out.display(),
        vmlinuz.display(),
        modules.len(),
        agent.display()
    );
    Ok(out)
}

/// The ELF `vmlinux` inside a bzImage whose payload is LZ4 (legacy frames, as Debian's cloud
/// kernel), decompressed with the `lz4` tool; `None` for other payloads.
fn extract_vmlinux(bzimage: &Path, install: bool) -> Result<Option<Vec<u8>>> {
    let bz = fs::read(bzimage).context(|| format!("cannot read {}", bzimage.display()))?;
    let u32_at = |at: usize| -> Option<u32> {
        bz.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let setup_sects = match bz.get(0x1f1) {
        Some(0) | None => 4,
        Some(&n) => usize::from(n),
    };
    let (Some(offset), Some(length)) = (u32_at(0x248), u32_at(0x24c)) else {
        return Ok(None);
    };
    let start = (setup_sects + 1) * 512 + offset as usize;
    let Some(payload) = bz.get(start..start + length as usize) else {
        return Ok(None);
    };
    // Legacy LZ4 frame magic; the kernel appends the uncompressed size (4 bytes) after it.
    if payload.get(..4) != Some(&[0x02, 0x21, 0x4c, 0x18]) || payload.len() < 8 {
        return Ok(None);
    }
    if !crate::util::have_program("lz4") {
        if !install {
            return Err(Error::msg("the lz4 tool is missing (--no-install)"));
        }
        setup::apt_install(&["lz4"])?;
    }
    let mut child = Command::new("lz4")
        .arg("-dc")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context(|| "cannot start lz4".to_string())?;
    let mut stdin = child
        .stdin
        .take()
        .context(|| "lz4 has no stdin".to_string())?;
    let body = payload[..payload.len() - 4].to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&body)
    });
    let out = child
        .wait_with_output()
        .context(|| "cannot run lz4".to_string())?;
    let wrote = writer
        .join()
        .map_err(|_| Error::msg("lz4 writer panicked"))?;
    if !out.status.success() || wrote.is_err() || out.stdout.get(..4) != Some(b"\x7fELF") {
        return Err(Error::msg(format!(
            "decompressing {}'s payload failed ({})",
            bzimage.display(),
            out.status
        )));
    }
    Ok(Some(out.stdout))
}

/// The `.ko` files of [`MODULES`] and their dependencies, dependencies first. Dependencies
/// are read from each module's `.modinfo` (`depends=`), so no `modules.dep` is needed.
fn module_load_order(kernel_dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut order: Vec<(String, PathBuf)> = Vec::new();
    fn visit(
        kernel_dir: &Path,
        path: PathBuf,
        order: &mut Vec<(String, PathBuf)>,
        depth: u32,
    ) -> Result<()> {
        if depth > 16 {
            return Err(Error::msg("module dependencies nest too deep"));
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().replace('-', "_"))
            .unwrap_or_default();
        if order.iter().any(|(n, _)| *n == name) {
            return Ok(());
        }
        let bytes = fs::read(&path).context(|| format!("cannot read {}", path.display()))?;
        for dep in modinfo_depends(&bytes) {
            let found = DEPENDENCY_DIRS
                .iter()
                .map(|dir| kernel_dir.join(dir).join(format!("{dep}.ko")))
                .chain(std::iter::once(kernel_dir.join(format!("{dep}.ko"))))
                .find(|p| p.is_file())
                .context(|| format!("dependency {dep} of {} not found", path.display()))?;
            visit(kernel_dir, found, order, depth + 1)?;
        }
        order.push((name, path));
        Ok(())
    }
    for module in MODULES {
        let path = kernel_dir.join(format!("{module}.ko"));
        if !path.is_file() {
            return Err(Error::msg(format!(
                "{} not found: a compressed or built-in module is not supported here",
                path.display()
            )));
        }
        visit(kernel_dir, path, &mut order, 0)?;
    }
    Ok(order)
}

/// The `depends=` list of a module's `.modinfo`.
fn modinfo_depends(module: &[u8]) -> Vec<String> {
    let key = b"depends=";
    module
        .windows(key.len())
        .position(|w| w == key)
        .map(|at| {
            let rest = &module[at + key.len()..];
            let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let list = stdout_of(Command::new(busybox).arg("--list"))?;
    Ok(list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(str::to_owned)
        .collect())
}

fn write_initramfs(
    path: &Path,
    agent: &Path,
    busybox: &Path,
    applets: &[String],
    modules: &[(String, PathBuf)],
) -> Result<()> {
    let file = fs::File::create(path).context(|| format!("cannot create {}", path.display()))?;
    let mut gzip = Command::new("gzip")
        .arg("-9c")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::from(file))
        .spawn()
        .context(|| "cannot start gzip".to_string())?;
    let stdin = gzip
        .stdin
        .take()
        .context(|| "gzip has no stdin".to_string())?;
    let io = |e: std::io::Error| Error::msg(format!("writing the initramfs: {e}"));
    {
        let mut cpio = CpioWriter::new(std::io::BufWriter::new(stdin));
        for dir in [
            "/bin",
            "/sbin",
            "/dev",
            "/proc",
            "/sys",
            "/tmp",
            "/run",
            "/root",
            "/etc",
            "/etc/capsule",
            "/lib",
            "/lib/modules",
            "/usr",
            "/usr/bin",
            "/usr/sbin",
            "/var",
        ] {
            cpio.dir(dir, 0o755).map_err(io)?;
        }
        cpio.char_dev("/dev/console", 0o600, 5, 1).map_err(io)?;
        cpio.file_from("/init", 0o755, agent).map_err(io)?;
        cpio.busybox(busybox, applets).map_err(io)?;
        let mut list = String::new();
        for (name, source) in modules {
            let dest = format!("/lib/modules/{name}.ko");
            cpio.file_from(&dest, 0o644, source).map_err(io)?;
            list.push_str(&dest);
            list.push('\n');
        }
        cpio.file("/etc/capsule/modules", 0o644, list.as_bytes())
            .map_err(io)?;
        cpio.file("/etc/passwd", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
            .map_err(io)?;
        cpio.file("/etc/group", 0o644, b"root:x:0:\n").map_err(io)?;
        cpio.finish().map_err(io)?;
    }
    let status = gzip.wait().context(|| "cannot wait for gzip".to_string())?;
    if !status.success() {
        return Err(Error::msg(format!("gzip failed ({status})")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_depends_is_read() {
        let mut module = b"\x7fELF...license=GPL\0depends=virtio,virtio_ring\0intree=Y\0".to_vec();
        assert_eq!(modinfo_depends(&module), vec!["virtio", "virtio_ring"]);
        module = b"license=GPL\0depends=\0".to_vec();
        assert!(modinfo_depends(&module).is_empty());
        assert!(modinfo_depends(b"nothing").is_empty());
    }
}
