//! Fuzzes the state-file decoder: arbitrary bytes must yield a typed error
//! or a value, never a panic, hang or oversized allocation. Each input is decoded as it is
//! and with its header repaired (`capsule_fuzz::state_image`), since a mutation almost
//! never keeps the checksum right.
#![no_main]

use capsule_fuzz::state_image::with_valid_header;
use capsule_snapshot::state_file::{decode_state_bytes, encode_state_bytes};
use capsule_snapshot::stored::StoredMemory;
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8]) {
    // The memory description is the most structured payload this crate defines.
    if let Ok(stored) = decode_state_bytes::<StoredMemory>(data) {
        // Checking it must not panic either, whatever it claims.
        let _ = stored.validate(stored.chain.mem_size);
        // Anything accepted must re-encode to a file that decodes to the same value.
        let again = encode_state_bytes(&stored).expect("re-encode");
        let back: StoredMemory = decode_state_bytes(&again).expect("decode re-encoded");
        assert_eq!(back, stored);
    }
    // A generic shape exercising strings, sequences, options and integers.
    let _ = decode_state_bytes::<(String, Vec<u64>, Option<u32>, bool)>(data);
}

fuzz_target!(|data: &[u8]| {
    check(data);
    // The same payload behind a valid header, so that mutations reach the payload decoder.
    if let Some(repaired) = with_valid_header(data) {
        check(&repaired);
    }
});
