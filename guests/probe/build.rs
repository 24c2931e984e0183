//! Builds the probe guest from `guest/main.rs` with the same `rustc` that builds the host,
//! freestanding for the host's own x86_64 target, then flattens the ELF into the image the
//! engine copies into guest memory at `IMAGE_ADDR`. Nothing prebuilt is committed.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "../probe-abi/src/lib.rs"]
#[allow(dead_code, unused_attributes, clippy::wrong_self_convention)]
mod abi;

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let source = manifest.join("guest/main.rs");
    let script = manifest.join("guest/link.ld");
    let abi = manifest.join("../probe-abi/src/lib.rs");
    for path in [&source, &script, &abi] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let elf = out.join("probe.elf");
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let status = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "probe_guest",
        ])
        .args(["--target", "x86_64-unknown-linux-gnu"])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=static",
        ])
        .args([
            "-C",
            "debuginfo=0",
            "-C",
            "strip=symbols",
            "-C",
            "codegen-units=1",
        ])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static", "-C", "link-arg=-no-pie"])
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .arg("-o")
        .arg(&elf)
        .arg(&source)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {rustc}: {e}"));
    assert!(status.success(), "building the probe guest failed");

    let bytes = fs::read(&elf).expect("read the probe ELF");
    let (image, entry) = flatten(&bytes);
    assert!(
        image.len() as u64 <= abi::IMAGE_MAX,
        "probe image is {} bytes, more than IMAGE_MAX",
        image.len()
    );
    fs::write(out.join("probe.bin"), &image).expect("write probe.bin");
    fs::write(out.join("probe_entry.rs"), format!("{entry:#x}")).expect("write probe_entry.rs");
    let _ = Path::new(&out);
}

/// Lays the ELF's PT_LOAD segments out flat from `IMAGE_ADDR`; returns the image and the
/// entry point. The ELF is our own build output, so malformed input is a build bug: panic.
fn flatten(elf: &[u8]) -> (Vec<u8>, u64) {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().expect("8 bytes"));
    assert_eq!(&elf[0..4], b"\x7fELF", "not an ELF file");
    assert_eq!(elf[4], 2, "not a 64-bit ELF");
    let entry = u64_at(24);
    let phoff = u64_at(32) as usize;
    let phentsize = u16_at(54) as usize;
    let phnum = u16_at(56) as usize;
    let mut image = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(ph) != 1 {
            continue; // not PT_LOAD
        }
        let offset = u64_at(ph + 8) as usize;
        let paddr = u64_at(ph + 24);
        let filesz = u64_at(ph + 32) as usize;
        assert!(
            paddr >= abi::IMAGE_ADDR,
            "segment below IMAGE_ADDR: {paddr:#x}"
        );
        let at = (paddr - abi::IMAGE_ADDR) as usize;
        if image.len() < at + filesz {
            image.resize(at + filesz, 0);
        }
        image[at..at + filesz].copy_from_slice(&elf[offset..offset + filesz]);
    }
    assert!(!image.is_empty(), "the probe ELF has no loadable segment");
    (image, entry)
}
