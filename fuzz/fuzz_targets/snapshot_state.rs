//! Fuzzes the engine's snapshot decoder: a `state.bin` image (header, checksum, the full
//! VM/vCPU/guest state, the memory chain and inline pages) must be accepted or rejected with
//! a typed error, never panic or allocate without bound. Each input is decoded as it is and
//! with its header repaired (`capsule_fuzz::state_image`), since a mutation almost never
//! keeps the checksum right.
#![no_main]

use capsule_fuzz::state_image::with_valid_header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = capsule::fuzzing::decode_snapshot_state(data);
    if let Some(repaired) = with_valid_header(data) {
        let _ = capsule::fuzzing::decode_snapshot_state(&repaired);
    }
});
