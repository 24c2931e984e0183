//! State-file images with a valid header around fuzzed payload bytes.
//!
//! A mutated state file almost always fails its CRC-64 before the payload decoder sees it,
//! so the state-file targets also decode each input with its header rebuilt: whatever
//! follows the 32-byte header is taken as the payload, and magic, version, flags, length
//! and checksum are made to fit it.

use capsule_snapshot::state_file::{checksum, FORMAT_VERSION, HEADER_LEN, MAGIC};

/// `data` with its header replaced by a valid one for the bytes after it; `None` when
/// `data` is shorter than a header.
pub fn with_valid_header(data: &[u8]) -> Option<Vec<u8>> {
    let payload = data.get(HEADER_LEN..)?;
    let mut out = Vec::with_capacity(data.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&checksum(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_snapshot::state_file::{decode_state_bytes, encode_state_bytes};

    #[test]
    fn a_broken_header_is_repaired_around_the_payload() {
        let value = (String::from("seed"), vec![1u64, 2, 3]);
        let mut image = encode_state_bytes(&value).unwrap();
        // A mutated magic, flags and checksum: rejected as it is, accepted once repaired.
        image[0] ^= 0xff;
        image[12] = 1;
        image[24] ^= 0x55;
        assert!(decode_state_bytes::<(String, Vec<u64>)>(&image).is_err());
        let repaired = with_valid_header(&image).unwrap();
        assert_eq!(
            decode_state_bytes::<(String, Vec<u64>)>(&repaired).unwrap(),
            value
        );
    }

    #[test]
    fn inputs_shorter_than_a_header_are_left_alone() {
        assert_eq!(with_valid_header(&[0u8; HEADER_LEN - 1]), None);
        let empty_payload = with_valid_header(&[7u8; HEADER_LEN]).unwrap();
        assert_eq!(empty_payload.len(), HEADER_LEN);
        assert_eq!(&empty_payload[..8], &MAGIC);
    }
}
