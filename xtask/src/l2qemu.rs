//! QEMU for inside L1 (`nested-test --linux-report`): the host's `qemu-system-x86_64` with
//! the shared libraries `ldd` resolves, the dynamic loader, and the firmware QEMU's microvm
//! machine loads. L1 is a bare busybox initramfs, so QEMU runs through the loader:
//! `LOADER --library-path LIB QEMU -L SHARE ...` (see [`command_in_l1`]).
//!
//! Layout under `/nested/extra/` (`$CAPSULE_NESTED_EXTRA`): `qemu/bin/qemu-system-x86_64`,
//! `qemu/lib/<soname>` (and the loader), `qemu/share/<firmware>`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::initramfs::Extra;
use crate::util::{stdout_of, Context, Error, Result};

const QEMU: &str = "qemu-system-x86_64";
/// Where the extras go in L1, under `/nested/extra`.
const DIR: &str = "qemu";
/// Firmware QEMU's microvm loads (`bios-microvm.bin` is qboot; `linuxboot_dma.bin` for
/// `-kernel`), and a few small ROMs it may ask for with other options. Missing ones are
/// skipped, except [`REQUIRED_FIRMWARE`].
const FIRMWARE: &[&str] = &[
    "bios-microvm.bin",
    "qboot.rom",
    "linuxboot_dma.bin",
    "linuxboot.bin",
    "pvh.bin",
    "kvmvapic.bin",
];
const REQUIRED_FIRMWARE: &[&str] = &["bios-microvm.bin", "linuxboot_dma.bin"];
/// Where Debian (and most distributions) keep QEMU's firmware.
const FIRMWARE_DIRS: &[&str] = &["/usr/share/qemu", "/usr/share/seabios", "/usr/share/qboot"];

/// The extra files that make up QEMU in L1.
pub fn extras() -> Result<Vec<Extra>> {
    let qemu = find_program(QEMU).context(|| format!("{QEMU} is not in PATH"))?;
    let mut extras = vec![Extra {
        source: qemu.clone(),
        dest: format!("{DIR}/bin/{QEMU}"),
    }];
    let ldd = stdout_of(Command::new("ldd").arg(&qemu))?;
    let libs = parse_ldd(&ldd)?;
    if !libs.iter().any(|(name, _)| name.starts_with("ld-linux")) {
        return Err(Error::msg(format!(
            "`ldd {}` names no dynamic loader (ld-linux*)",
            qemu.display()
        )));
    }
    for (name, path) in libs {
        extras.push(Extra {
            source: path,
            dest: format!("{DIR}/lib/{name}"),
        });
    }
    for name in FIRMWARE {
        match FIRMWARE_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
        {
            Some(source) => extras.push(Extra {
                source,
                dest: format!("{DIR}/share/{name}"),
            }),
            None if REQUIRED_FIRMWARE.contains(name) => {
                return Err(Error::msg(format!(
                    "QEMU firmware {name} not found in {}",
                    FIRMWARE_DIRS.join(", ")
                )))
            }
            None => {}
        }
    }
    Ok(extras)
}

/// The command that runs the packed QEMU inside L1, as words (for `CAPSULE_QEMU`).
pub fn command_in_l1(extras: &[Extra]) -> Result<String> {
    let loader = extras
        .iter()
        .filter_map(|e| e.dest.strip_prefix(&format!("{DIR}/lib/")))
        .find(|name| name.starts_with("ld-linux"))
        .context(|| "no dynamic loader among QEMU's files".to_string())?;
    let root = format!("/nested/extra/{DIR}");
    Ok(format!(
        "{root}/lib/{loader} --library-path {root}/lib {root}/bin/{QEMU} -L {root}/share"
    ))
}

/// `(file name in L1, host path)` for every library in `ldd`'s output, the loader included;
/// symbolic links resolved (the file name stays the name the program asks for).
pub(crate) fn parse_ldd(text: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with("linux-vdso") || line.starts_with("linux-gate") {
            continue;
        }
        if line.contains("not found") {
            return Err(Error::msg(format!("a shared library is missing: {line}")));
        }
        // `libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        let Some(path) = path.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let path = Path::new(path);
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context(|| format!("bad ldd line {line:?}"))?;
        if !libs.iter().any(|(n, _)| *n == name) {
            libs.push((name, path.to_path_buf()));
        }
    }
    Ok(libs)
}

fn find_program(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f01)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f02)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f03)\n";
        let libs = parse_ldd(text).unwrap();
        let names: Vec<&str> = libs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["libz.so.1", "libc.so.6", "ld-linux-x86-64.so.2"]);
        assert_eq!(libs[2].1, Path::new("/lib64/ld-linux-x86-64.so.2"));
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn command_runs_through_the_loader() {
        let extras = vec![
            Extra {
                source: "/usr/bin/qemu-system-x86_64".into(),
                dest: "qemu/bin/qemu-system-x86_64".into(),
            },
            Extra {
                source: "/lib64/ld-linux-x86-64.so.2".into(),
                dest: "qemu/lib/ld-linux-x86-64.so.2".into(),
            },
        ];
        assert_eq!(
            command_in_l1(&extras).unwrap(),
            "/nested/extra/qemu/lib/ld-linux-x86-64.so.2 --library-path /nested/extra/qemu/lib \
             /nested/extra/qemu/bin/qemu-system-x86_64 -L /nested/extra/qemu/share"
        );
    }
}
