//! Fuzzes the engine's snapshot decoder: a `state.bin` image (header, checksum, the full
//! VM/vCPU/guest state, the memory chain and inline pages) must be accepted or rejected with
//! a typed error, never panic or allocate without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = capsule::fuzzing::decode_snapshot_state(data);
});
