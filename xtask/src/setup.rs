//! Installs what `nested-test` needs on the host: Debian packages through apt-get and the
//! musl target through rustup. Everything it does is printed.

use std::path::Path;
use std::process::Command;

use crate::util::{have_program, is_static_elf, output, run, stdout_of, Error, Result};

/// The Rust target the L1 test binaries are built for (static, no libraries needed in L1).
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Where Debian's busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// A host requirement: how to tell it is there and which package provides it.
struct Need {
    what: &'static str,
    packages: &'static [&'static str],
    present: fn() -> bool,
}

const NEEDS: &[Need] = &[
    Need {
        what: "qemu-system-x86_64",
        packages: &["qemu-system-x86"],
        present: || have_program("qemu-system-x86_64"),
    },
    Need {
        what: "a static busybox (/bin/busybox)",
        packages: &["busybox-static"],
        present: || std::fs::read(BUSYBOX).is_ok_and(|b| is_static_elf(&b)),
    },
    Need {
        what: "gzip",
        packages: &["gzip"],
        present: || have_program("gzip"),
    },
    Need {
        what: "dpkg-deb",
        packages: &["dpkg"],
        present: || have_program("dpkg-deb"),
    },
    Need {
        what: "a C compiler (cc) to link the probe guest",
        packages: &["gcc", "libc6-dev"],
        present: || have_program("cc"),
    },
];

/// Makes sure a static busybox is at [`BUSYBOX`], installing `busybox-static` if allowed.
pub fn ensure_busybox(install: bool) -> Result<()> {
    let present = || std::fs::read(BUSYBOX).is_ok_and(|b| is_static_elf(&b));
    if present() {
        return Ok(());
    }
    if !install {
        return Err(Error::msg(format!(
            "no static busybox at {BUSYBOX} (install busybox-static, or pass --busybox)"
        )));
    }
    apt_install(&["busybox-static"])?;
    if present() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "busybox-static did not provide {BUSYBOX}"
        )))
    }
}

/// Makes sure every host tool is there, installing what is missing unless `install` is false.
pub fn ensure_host_tools(install: bool) -> Result<()> {
    if !have_program("apt-get") {
        let missing: Vec<&str> = NEEDS
            .iter()
            .filter(|n| !(n.present)())
            .map(|n| n.what)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        return Err(Error::msg(format!(
            "missing {} and this host has no apt-get to install them (the harness expects \
             Debian/Ubuntu; install the equivalent packages by hand)",
            missing.join(", ")
        )));
    }
    let missing: Vec<&Need> = NEEDS.iter().filter(|n| !(n.present)()).collect();
    if missing.is_empty() {
        println!(
            "xtask: host tools present (qemu-system-x86_64, static busybox, gzip, dpkg-deb, cc)"
        );
        return Ok(());
    }
    for need in &missing {
        println!(
            "xtask: missing {} (Debian package {})",
            need.what,
            need.packages.join(" ")
        );
    }
    if !install {
        return Err(Error::msg(
            "missing host tools and --no-install was given".to_string(),
        ));
    }
    let packages: Vec<&str> = missing
        .iter()
        .flat_map(|n| n.packages.iter().copied())
        .collect();
    if let Err(e) = apt_install(&packages) {
        // A qemu-utils from bookworm-backports (some images carry one) Breaks the
        // distribution's qemu-system-common: the harness needs the system emulator, not
        // qemu-img, so try once more without it.
        if !(packages.contains(&"qemu-system-x86") && dpkg_installed("qemu-utils")) {
            return Err(e);
        }
        println!("xtask: retrying without qemu-utils, which may break qemu-system-common");
        let mut again = packages.clone();
        again.push("qemu-utils-");
        apt_install(&again)?;
    }
    let still: Vec<&str> = NEEDS
        .iter()
        .filter(|n| !(n.present)())
        .map(|n| n.what)
        .collect();
    if still.is_empty() {
        Ok(())
    } else {
        Err(Error::msg(format!(
            "still missing after apt-get install: {}",
            still.join(", ")
        )))
    }
}

/// `apt-get install -y PACKAGES`, after `apt-get update` when apt does not know a package.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    let unknown = packages.iter().any(|p| !apt_knows(p));
    if unknown {
        apt_update()?;
    }
    let mut cmd = privileged("apt-get");
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(packages);
    if run(&mut cmd).is_ok() {
        return Ok(());
    }
    if !unknown {
        // Stale package lists make downloads 404: refresh them and try once more.
        apt_update()?;
        return run(&mut cmd);
    }
    Err(Error::msg(format!(
        "apt-get install {} failed (see its output above)",
        packages.join(" ")
    )))
}

/// Whether dpkg has `package` installed.
fn dpkg_installed(package: &str) -> bool {
    stdout_of(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|status| status.contains("install ok installed"))
}

/// Refreshes apt's package lists.
pub fn apt_update() -> Result<()> {
    run(privileged("apt-get").arg("update"))
}

/// Whether apt has a candidate version of `package`.
pub fn apt_knows(package: &str) -> bool {
    stdout_of(Command::new("apt-cache").args(["policy", package])).is_ok_and(|text| {
        text.lines()
            .any(|l| l.trim_start().starts_with("Candidate:") && !l.contains("(none)"))
    })
}

/// A command run as root: directly when we are root, else through `sudo` when there is one.
pub fn privileged(program: &str) -> Command {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if root || !have_program("sudo") {
        Command::new(program)
    } else {
        let mut cmd = Command::new("sudo");
        cmd.arg(program);
        cmd
    }
}

/// Adds the musl target through rustup when the toolchain lacks it.
pub fn ensure_musl_target(install: bool) -> Result<()> {
    if musl_std_present() {
        println!("xtask: Rust target {MUSL_TARGET} present");
        return Ok(());
    }
    if !install {
        return Err(Error::msg(format!(
            "the Rust target {MUSL_TARGET} is missing and --no-install was given"
        )));
    }
    if !have_program("rustup") {
        return Err(Error::msg(format!(
            "the Rust target {MUSL_TARGET} is missing and there is no rustup to add it"
        )));
    }
    run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// Whether the active toolchain has the musl standard library.
fn musl_std_present() -> bool {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let Ok(out) = output(Command::new(rustc).args(["--print", "sysroot"])) else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(MUSL_TARGET)
        .join("lib")
        .is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_knows_what_is_installed() {
        if !have_program("dpkg-query") {
            return; // not a Debian host
        }
        assert!(dpkg_installed("dpkg"));
        assert!(!dpkg_installed("no-such-package-capsule-test"));
    }
}
