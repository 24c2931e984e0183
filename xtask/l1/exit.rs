//! `nested-exit CODE`: ends the L1 virtual machine with CODE through QEMU's `isa-debug-exit`
//! device (port 0xf4); QEMU then exits with status `CODE * 2 + 1`.
//!
//! Built by `cargo xtask nested-test` with plain `rustc` for x86_64-unknown-linux-musl (static)
//! and packed into the L1 initramfs as `/bin/nested-exit`. The Debian kernel has no /dev/port
//! (`CONFIG_DEVPORT` is not set), so busybox alone cannot write to an I/O port.

use std::arch::asm;
use std::process::exit;

const DEBUG_EXIT_PORT: u16 = 0xf4;

extern "C" {
    /// musl's `ioperm(2)` wrapper.
    fn ioperm(
        from: std::ffi::c_ulong,
        num: std::ffi::c_ulong,
        turn_on: std::ffi::c_int,
    ) -> std::ffi::c_int;
}

fn main() {
    let Some(code) = std::env::args().nth(1).and_then(|a| a.parse::<u8>().ok()) else {
        eprintln!("usage: nested-exit CODE (0..=255)");
        exit(2);
    };
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { ioperm(DEBUG_EXIT_PORT.into(), 4, 1) } != 0 {
        eprintln!("nested-exit: ioperm: {}", std::io::Error::last_os_error());
        exit(1);
    }
    // SAFETY: port 0xf4 is QEMU's isa-debug-exit device; the write ends the VM.
    unsafe { asm!("out dx, al", in("dx") DEBUG_EXIT_PORT, in("al") code, options(nomem, nostack)) };
    // Only reached when the device is absent (e.g. QEMU started without it).
    eprintln!("nested-exit: no isa-debug-exit device at port {DEBUG_EXIT_PORT:#x}");
    exit(1);
}
