//! Golden files pinning the version-1 on-disk formats.
//!
//! `tests/golden/state_v1.bin` is a state file holding [`Sample`] and
//! `tests/golden/manifest_v1.bin` a memory manifest. They were generated once
//! by this test and are committed. If this test fails, the bytes this crate
//! writes (or accepts) changed: that is a format change, which must come with
//! a `FORMAT_VERSION` bump, never a silent regeneration.
//!
//! To regenerate deliberately (after such a bump, renaming the files to the
//! new version), run:
//!
//! ```text
//! CAPSULE_SNAPSHOT_REGENERATE_GOLDEN=1 cargo test -p capsule-snapshot --test golden
//! ```
//!
//! and commit the new files together with the version bump.

use std::path::PathBuf;

use capsule_snapshot::bitmap::PageBitmap;
use capsule_snapshot::chain::{LayerDesc, MemoryChain};
use capsule_snapshot::state_file::{
    checksum, decode_state_bytes, encode_state_bytes, read_state, FORMAT_VERSION, HEADER_LEN,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Sample {
    name: String,
    vcpus: u32,
    regs: Vec<u64>,
    enabled: bool,
    tag: Option<i16>,
}

fn sample() -> Sample {
    Sample {
        name: "golden".into(),
        vcpus: 2,
        regs: vec![0, 1, 0xFFFF_FFFF, u64::MAX],
        enabled: true,
        tag: Some(-3),
    }
}

fn manifest() -> MemoryChain {
    let pages = 100;
    let mut base = PageBitmap::new(pages);
    base.set_range(0, 100).unwrap();
    let mut diff = PageBitmap::new(pages);
    diff.set_range(10, 5).unwrap();
    diff.set(99).unwrap();
    let mut chain = MemoryChain::new(pages * 4096);
    chain
        .push_layer(LayerDesc {
            file_name: "base.layer".into(),
            pages: base,
        })
        .unwrap();
    chain
        .push_layer(LayerDesc {
            file_name: "diff-1.layer".into(),
            pages: diff,
        })
        .unwrap();
    chain
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compares `fresh` with the committed golden file (or rewrites it on request).
fn check_golden(name: &str, fresh: &[u8]) -> Vec<u8> {
    let path = golden_path(name);
    if std::env::var_os("CAPSULE_SNAPSHOT_REGENERATE_GOLDEN").is_some() {
        std::fs::write(&path, fresh).unwrap();
    }
    let golden = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; see the header of tests/golden.rs to generate it",
            path.display()
        )
    });
    assert_eq!(
        golden, fresh,
        "encoding differs from {name}: the on-disk format changed"
    );
    golden
}

#[test]
fn state_file_header_is_pinned() {
    let golden = check_golden("state_v1.bin", &encode_state_bytes(&sample()).unwrap());

    // The header, field by field.
    assert_eq!(&golden[0..8], b"CAPSNAP\0");
    assert_eq!(u32::from_le_bytes(golden[8..12].try_into().unwrap()), 1);
    assert_eq!(FORMAT_VERSION, 1);
    assert_eq!(u32::from_le_bytes(golden[12..16].try_into().unwrap()), 0);
    let len = u64::from_le_bytes(golden[16..24].try_into().unwrap());
    assert_eq!(len as usize, golden.len() - HEADER_LEN);
    let crc = u64::from_le_bytes(golden[24..32].try_into().unwrap());
    assert_eq!(crc, checksum(&golden[32..]));

    // Still readable, from memory and from disk.
    assert_eq!(decode_state_bytes::<Sample>(&golden).unwrap(), sample());
    assert_eq!(
        read_state::<Sample>(&golden_path("state_v1.bin")).unwrap(),
        sample()
    );
}

#[test]
fn manifest_encoding_is_pinned() {
    let golden = check_golden("manifest_v1.bin", &encode_state_bytes(&manifest()).unwrap());
    assert_eq!(
        decode_state_bytes::<MemoryChain>(&golden).unwrap(),
        manifest()
    );
}
