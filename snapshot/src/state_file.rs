//! Versioned, checksummed state files holding one serde value.
//!
//! Layout (all integers little-endian, 32-byte header):
//!
//! | offset | size | field                                             |
//! |-------:|-----:|---------------------------------------------------|
//! | 0      | 8    | magic `b"CAPSNAP\0"` ([`MAGIC`])                  |
//! | 8      | 4    | format version, `u32` ([`FORMAT_VERSION`])        |
//! | 12     | 4    | flags, `u32`; none defined, must be 0             |
//! | 16     | 8    | payload length in bytes, `u64`                    |
//! | 24     | 8    | CRC-64/XZ of the payload, `u64` ([`checksum`])    |
//! | 32     | len  | payload: the value in the crate's binary encoding |
//!
//! Validation order on read: magic, version (checked before anything else
//! past it, since another version may lay the rest out differently), flags,
//! payload length against the bytes actually present (before allocating),
//! checksum, then decoding.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::{atomic, codec};

/// The 8 bytes every state file starts with.
pub const MAGIC: [u8; 8] = *b"CAPSNAP\0";

/// The state-file format version this crate writes and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 32;

/// Flag bits this reader understands (none so far).
const KNOWN_FLAGS: u32 = 0;

/// CRC-64/XZ (a.k.a. CRC-64/GO-ECMA): ECMA-182 polynomial
/// `0x42F0E1EBA9EA3693`, reflected, init and xor-out all ones.
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// CRC-64/XZ of `bytes` — the checksum stored in the header (offset 24).
///
/// Parameters: polynomial `0x42F0E1EBA9EA3693` (ECMA-182), reflected input
/// and output, initial value and final xor `0xFFFF_FFFF_FFFF_FFFF`; the check
/// value of `b"123456789"` is `0x995D_C9BB_DF19_39FA`.
pub fn checksum(bytes: &[u8]) -> u64 {
    CRC64.checksum(bytes)
}

/// A parsed, validated header.
#[derive(Debug, Clone, Copy)]
struct Header {
    payload_len: u64,
    checksum: u64,
}

/// Validates the header found in `head` (the first bytes of a file whose
/// total size is `total_len`).
fn parse_header(head: &[u8], total_len: u64) -> Result<Header> {
    let truncated = || Error::Truncated {
        expected: HEADER_LEN as u64,
        actual: total_len,
    };
    let magic_len = head.len().min(MAGIC.len());
    if head[..magic_len] != MAGIC[..magic_len] {
        return Err(Error::BadMagic);
    }
    let Some(version) = le_u32(head, 8) else {
        return Err(truncated());
    };
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let (Some(flags), Some(payload_len), Some(checksum)) =
        (le_u32(head, 12), le_u64(head, 16), le_u64(head, 24))
    else {
        return Err(truncated());
    };
    if flags & !KNOWN_FLAGS != 0 {
        return Err(Error::UnsupportedFlags { flags });
    }
    let available = total_len.saturating_sub(HEADER_LEN as u64);
    if payload_len > available {
        return Err(Error::Truncated {
            expected: (HEADER_LEN as u64).saturating_add(payload_len),
            actual: total_len,
        });
    }
    if payload_len < available {
        return Err(Error::TrailingData {
            extra: available - payload_len,
        });
    }
    Ok(Header {
        payload_len,
        checksum,
    })
}

/// Checks the payload's checksum, then decodes it.
fn decode_payload<T: DeserializeOwned>(header: &Header, payload: &[u8]) -> Result<T> {
    let actual = checksum(payload);
    if actual != header.checksum {
        return Err(Error::ChecksumMismatch {
            expected: header.checksum,
            actual,
        });
    }
    codec::decode(payload)
}

fn le_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(bytes))
}

fn le_u64(b: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = b.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(bytes))
}

/// Encodes `value` as a complete state file image (header + payload).
pub fn encode_state_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let payload = codec::encode(value)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes a complete state file image held in memory.
///
/// This is a pure function (no I/O) suitable for fuzzing; it returns a typed
/// error for any malformed input and never panics or allocates more than a
/// small multiple of `bytes.len()`.
pub fn decode_state_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let header = parse_header(bytes, bytes.len() as u64)?;
    decode_payload(&header, &bytes[HEADER_LEN..])
}

/// Serializes `value` into a state file at `path`, atomically and durably
/// (see [`crate::atomic::write_file`]).
pub fn write_state<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = encode_state_bytes(value)?;
    atomic::write_file(path, &bytes)?;
    tracing::debug!(path = %path.display(), len = bytes.len(), "wrote state file");
    Ok(())
}

/// Reads and validates the state file at `path` and deserializes its payload.
///
/// The payload buffer is only allocated after its declared length has been
/// checked against the file's real size.
pub fn read_state<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let mut file = File::open(path).at(path)?;
    let total_len = file.metadata().at(path)?.len();
    let mut head = [0u8; HEADER_LEN];
    let head_len = (HEADER_LEN as u64).min(total_len) as usize;
    file.read_exact(&mut head[..head_len]).at(path)?;
    let header = parse_header(&head[..head_len], total_len)?;

    // Bounded by the real file size, checked in parse_header.
    let mut payload = vec![0u8; header.payload_len as usize];
    file.read_exact(&mut payload).at(path)?;
    decode_payload(&header, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        on: bool,
    }

    fn sample() -> Sample {
        Sample {
            name: "vcpu0".into(),
            regs: (0..40).map(|i| i * 0x1234_5678).collect(),
            on: true,
        }
    }

    #[test]
    fn crc_is_crc64_xz() {
        assert_eq!(checksum(b"123456789"), 0x995D_C9BB_DF19_39FA);
    }

    #[test]
    fn round_trip_bytes_and_file() {
        let bytes = encode_state_bytes(&sample()).unwrap();
        assert_eq!(&bytes[..8], b"CAPSNAP\0");
        assert_eq!(decode_state_bytes::<Sample>(&bytes).unwrap(), sample());

        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.bin");
        write_state(&p, &sample()).unwrap();
        assert_eq!(read_state::<Sample>(&p).unwrap(), sample());
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
    }

    #[test]
    fn bad_magic() {
        let mut bytes = encode_state_bytes(&sample()).unwrap();
        bytes[0] ^= 1;
        assert!(matches!(
            decode_state_bytes::<Sample>(&bytes),
            Err(Error::BadMagic)
        ));
        assert!(matches!(
            decode_state_bytes::<Sample>(b"XY"),
            Err(Error::BadMagic)
        ));
    }

    #[test]
    fn future_and_past_versions_are_rejected() {
        for v in [0u32, 2, u32::MAX] {
            let mut bytes = encode_state_bytes(&sample()).unwrap();
            bytes[8..12].copy_from_slice(&v.to_le_bytes());
            // Garbage after the version must not matter.
            bytes.truncate(12);
            match decode_state_bytes::<Sample>(&bytes) {
                Err(Error::UnsupportedVersion { found, supported }) => {
                    assert_eq!((found, supported), (v, FORMAT_VERSION));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_flags_rejected() {
        let mut bytes = encode_state_bytes(&sample()).unwrap();
        bytes[12] = 1;
        assert!(matches!(
            decode_state_bytes::<Sample>(&bytes),
            Err(Error::UnsupportedFlags { flags: 1 })
        ));
    }

    #[test]
    fn truncation_at_every_length() {
        let bytes = encode_state_bytes(&sample()).unwrap();
        for len in 0..bytes.len() {
            match decode_state_bytes::<Sample>(&bytes[..len]) {
                Err(Error::Truncated { .. }) => {}
                other => panic!("len {len}: unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn trailing_data_rejected() {
        let mut bytes = encode_state_bytes(&sample()).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode_state_bytes::<Sample>(&bytes),
            Err(Error::TrailingData { extra: 1 })
        ));
    }

    #[test]
    fn every_flipped_payload_byte_fails_checksum() {
        let bytes = encode_state_bytes(&sample()).unwrap();
        for i in HEADER_LEN..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(
                matches!(
                    decode_state_bytes::<Sample>(&b),
                    Err(Error::ChecksumMismatch { .. })
                ),
                "byte {i}"
            );
        }
    }

    #[test]
    fn huge_declared_length_does_not_allocate() {
        let mut bytes = encode_state_bytes(&sample()).unwrap();
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_state_bytes::<Sample>(&bytes),
            Err(Error::Truncated { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, &bytes).unwrap();
        assert!(matches!(
            read_state::<Sample>(&p),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn valid_checksum_wrong_type_is_decode_error() {
        // A payload whose inner length prefix is absurd but whose CRC is right.
        let payload = codec::encode(&(u64::MAX,)).unwrap();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&checksum(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        assert!(matches!(
            decode_state_bytes::<Vec<u64>>(&bytes),
            Err(Error::Decode(_))
        ));
        assert!(matches!(
            decode_state_bytes::<String>(&bytes),
            Err(Error::Decode(_))
        ));
    }

    #[test]
    fn missing_file_is_io_error_with_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("absent");
        match read_state::<Sample>(&p) {
            Err(Error::Io { path, .. }) => assert_eq!(path, p),
            other => panic!("unexpected {other:?}"),
        }
    }
}
