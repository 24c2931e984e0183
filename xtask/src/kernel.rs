//! The L1 kernel: Debian's cloud kernel (`linux-image-cloud-amd64` and the
//! `linux-image-<version>-cloud-amd64` package it depends on), downloaded with
//! `apt-get download`, unpacked with `dpkg -x` and kept in the cache between runs.
//!
//! Cache layout (under `target/nested/`):
//! - `debs/`: the downloaded `.deb` files;
//! - `kernel/<package>/`: the unpacked package (`boot/vmlinuz-*`, `lib/modules/*`), with a
//!   `.complete` marker written once unpacking succeeded;
//! - `modules/<release>/`: the KVM modules, decompressed when the package compresses them.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::setup::{apt_install, apt_knows, apt_update};
use crate::util::{have_program, run, stdout_of, Context, Error, Result};

/// The Debian meta package that always points at the current cloud kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// The modules L1 loads, in this order, relative to `lib/modules/<release>/kernel/`, without
/// the `.ko` suffix.
pub const KVM_MODULES: [&str; 3] = [
    "virt/lib/irqbypass",
    "arch/x86/kvm/kvm",
    "arch/x86/kvm/kvm-amd",
];

/// An unpacked kernel package, ready to boot.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// e.g. `linux-image-6.1.0-57-cloud-amd64`.
    pub package: String,
    /// The unpacked package root.
    pub root: PathBuf,
    /// `root/boot/vmlinuz-<release>` (a bzImage).
    pub vmlinuz: PathBuf,
    /// e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// The uncompressed KVM modules, in load order.
    pub modules: Vec<PathBuf>,
}

/// Resolves, downloads (once) and unpacks the cloud kernel under `cache`.
pub fn fetch(cache: &Path, install: bool) -> Result<Kernel> {
    let kernels = cache.join("kernel");
    let package = match resolve_package() {
        Ok(package) => package,
        Err(e) => match newest_cached(&kernels) {
            Some(package) => {
                println!("xtask: cannot resolve {META_PACKAGE} ({e}); using the cached {package}");
                package
            }
            None => return Err(e),
        },
    };
    let root = kernels.join(&package);
    if root.join(".complete").is_file() {
        println!("xtask: kernel {package} cached in {}", root.display());
    } else {
        download_and_unpack(cache, &package, &root)?;
    }
    let (vmlinuz, release) = find_vmlinuz(&root)?;
    let out = cache.join("modules").join(&release);
    fs::create_dir_all(&out).context(|| format!("cannot create {}", out.display()))?;
    let modules = KVM_MODULES
        .iter()
        .map(|m| module(&root, &release, m, &out, install))
        .collect::<Result<Vec<_>>>()?;
    Ok(Kernel {
        package,
        root,
        vmlinuz,
        release,
        modules,
    })
}

/// The versioned package the meta package depends on, from `apt-cache depends`.
fn resolve_package() -> Result<String> {
    if !apt_knows(META_PACKAGE) {
        println!("xtask: apt does not know {META_PACKAGE} yet; refreshing the package lists");
        apt_update()?;
    }
    let text = stdout_of(Command::new("apt-cache").args(["depends", META_PACKAGE]))?;
    parse_depends(&text).context(|| {
        format!("`apt-cache depends {META_PACKAGE}` names no linux-image package:\n{text}")
    })
}

/// Finds `linux-image-…` in `apt-cache depends` output or a `Depends:` control field.
fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .flat_map(|line| {
            let line = line.trim();
            let value = line.strip_prefix("Depends:").unwrap_or(line);
            value.split(',').map(str::trim).collect::<Vec<_>>()
        })
        .map(|dep| {
            dep.split_whitespace()
                .next()
                .unwrap_or("")
                .trim_matches(|c| c == '<' || c == '>')
                .to_string()
        })
        .find(|name| name.starts_with("linux-image-") && name != META_PACKAGE)
}

/// The most recently unpacked kernel in the cache, for offline runs.
fn newest_cached(kernels: &Path) -> Option<String> {
    let entries = fs::read_dir(kernels).ok()?;
    entries
        .flatten()
        .filter(|e| e.path().join(".complete").is_file())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

fn download_and_unpack(cache: &Path, package: &str, root: &Path) -> Result<()> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).context(|| format!("cannot create {}", debs.display()))?;
    let wanted = [META_PACKAGE, package];
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| find_deb(&debs, p).is_none())
        .collect();
    if !missing.is_empty() {
        println!(
            "xtask: downloading {} into {}",
            missing.join(" "),
            debs.display()
        );
        let mut cmd = Command::new("apt-get");
        cmd.current_dir(&debs).arg("download");
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            // apt's `_apt` sandbox user cannot write into a root-owned cache directory.
            cmd.args(["-o", "APT::Sandbox::User=root"]);
        }
        cmd.args(&missing);
        if run(&mut cmd).is_err() {
            apt_update()?;
            run(&mut cmd)?;
        }
    }
    let meta = find_deb(&debs, META_PACKAGE)
        .context(|| format!("no {META_PACKAGE}_*.deb in {}", debs.display()))?;
    let deb =
        find_deb(&debs, package).context(|| format!("no {package}_*.deb in {}", debs.display()))?;
    let depends = stdout_of(Command::new("dpkg-deb").arg("-f").arg(&meta).arg("Depends"))?;
    if parse_depends(&depends).as_deref() != Some(package) {
        println!(
            "xtask: note: {} depends on `{}`, apt-cache said {package}; using {package}",
            meta.display(),
            depends.trim()
        );
    }
    let mut partial = root.as_os_str().to_os_string();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    if let Some(parent) = root.parent() {
        fs::create_dir_all(parent).context(|| format!("cannot create {}", parent.display()))?;
    }
    if partial.exists() {
        fs::remove_dir_all(&partial).context(|| format!("cannot remove {}", partial.display()))?;
    }
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&partial))?;
    if root.exists() {
        fs::remove_dir_all(root).context(|| format!("cannot remove {}", root.display()))?;
    }
    fs::rename(&partial, root).context(|| format!("cannot rename to {}", root.display()))?;
    fs::write(root.join(".complete"), format!("{}\n", deb.display()))
        .context(|| format!("cannot mark {} complete", root.display()))?;
    Ok(())
}

/// The newest `PACKAGE_*.deb` in `dir`.
fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_");
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&prefix) && name.ends_with(".deb")
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

fn find_vmlinuz(root: &Path) -> Result<(PathBuf, String)> {
    let boot = root.join("boot");
    let mut found: Vec<PathBuf> = fs::read_dir(&boot)
        .context(|| format!("cannot read {}", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    let vmlinuz = found
        .pop()
        .context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    let release = vmlinuz
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .trim_start_matches("vmlinuz-")
                .to_string()
        })
        .unwrap_or_default();
    Ok((vmlinuz, release))
}

/// Locates module `name` (`.ko`, `.ko.xz`, `.ko.zst` or `.ko.gz`) and returns an
/// uncompressed copy in `out` (busybox `insmod` may not handle compressed modules).
fn module(root: &Path, release: &str, name: &str, out: &Path, install: bool) -> Result<PathBuf> {
    let base = root.join("lib/modules").join(release).join("kernel");
    let file_name = Path::new(name)
        .file_name()
        .map(|n| format!("{}.ko", n.to_string_lossy()))
        .unwrap_or_default();
    let target = out.join(&file_name);
    for (suffix, tool, package) in [
        (".ko", None, ""),
        (".ko.xz", Some("xz"), "xz-utils"),
        (".ko.zst", Some("zstd"), "zstd"),
        (".ko.gz", Some("gzip"), "gzip"),
    ] {
        let source = base.join(format!("{name}{suffix}"));
        if !source.is_file() {
            continue;
        }
        match tool {
            None => {
                fs::copy(&source, &target).context(|| {
                    format!("cannot copy {} to {}", source.display(), target.display())
                })?;
            }
            Some(tool) => {
                if !have_program(tool) {
                    if !install {
                        return Err(Error::msg(format!(
                            "{} is compressed and {tool} is missing (--no-install)",
                            source.display()
                        )));
                    }
                    apt_install(&[package])?;
                }
                let file = fs::File::create(&target)
                    .context(|| format!("cannot create {}", target.display()))?;
                let status = Command::new(tool)
                    .arg("-dc")
                    .arg(&source)
                    .stdout(Stdio::from(file))
                    .status()
                    .context(|| format!("cannot run {tool}"))?;
                if !status.success() {
                    return Err(Error::msg(format!(
                        "`{tool} -dc {}` failed ({status})",
                        source.display()
                    )));
                }
            }
        }
        return Ok(target);
    }
    Err(Error::msg(format!(
        "module {name}.ko (or .ko.xz/.ko.zst/.ko.gz) not found under {}",
        base.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_cache_depends_output() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
    }

    #[test]
    fn control_field() {
        let text = "linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)\n";
        assert_eq!(
            parse_depends(text).as_deref(),
            Some("linux-image-6.1.0-57-cloud-amd64")
        );
        assert_eq!(parse_depends("kmod, linux-base (>= 4.3~)"), None);
    }
}
