//! Errors and process helpers shared by the xtask commands.

use std::fmt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// An error with the chain of what was being done, outermost first.
#[derive(Debug)]
pub struct Error(String);

impl Error {
    pub fn msg(text: impl Into<String>) -> Self {
        Error(text.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

/// Adds what was being attempted to an error.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error(format!("{}: {e}", what())))
    }
}

impl<T> Context<T> for Option<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.ok_or_else(|| Error(what()))
    }
}

/// Shows a command the way a shell user would type it.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Runs `cmd` with inherited stdio after printing it; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = describe(cmd);
    println!("xtask: $ {shown}");
    let status = cmd.status().context(|| format!("cannot start `{shown}`"))?;
    if status.success() {
        Ok(())
    } else {
        Err(Error(format!("`{shown}` failed ({status})")))
    }
}

/// Runs `cmd` quietly and returns its output, whatever its exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let shown = describe(cmd);
    cmd.stdin(Stdio::null())
        .output()
        .context(|| format!("cannot start `{shown}`"))
}

/// Runs `cmd` quietly; returns its stdout when it exits 0.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let shown = describe(cmd);
    let out = output(cmd)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether `program` is found in PATH (or is an existing path).
pub fn have_program(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).is_file();
    }
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Whether `bytes` is an x86_64 ELF executable without a program interpreter (static or
/// static-pie), i.e. one that runs in the bare L1 initramfs.
pub fn is_static_elf(bytes: &[u8]) -> bool {
    let u16_at = |o: usize| {
        bytes
            .get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    if bytes.get(0..5) != Some(b"\x7fELF\x02") || u16_at(18) != Some(62) {
        return false; // not a 64-bit x86_64 ELF
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff + i * usize::from(phentsize);
        matches!(u32_at(at), Some(kind) if kind != 3) // PT_INTERP
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_prefixed() {
        let r: std::result::Result<(), &str> = Err("boom");
        let e = r.context(|| "doing x".to_string()).unwrap_err();
        assert_eq!(e.to_string(), "doing x: boom");
        assert_eq!(
            None::<u8>
                .context(|| "missing".into())
                .unwrap_err()
                .to_string(),
            "missing"
        );
    }

    #[test]
    fn static_elf_detection() {
        assert!(!is_static_elf(b"#!/bin/sh\n"));
        assert!(!is_static_elf(b"\x7fELF\x02"));
        // Built for the glibc target, this test binary is dynamically linked: it has PT_INTERP.
        if cfg!(all(target_env = "gnu", target_arch = "x86_64")) {
            let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
            assert!(!is_static_elf(&me));
        }
    }
}
