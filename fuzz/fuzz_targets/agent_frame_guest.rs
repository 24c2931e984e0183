//! Fuzzes the guest side of the agent protocol: the agent's streaming
//! decoder fed with host bytes split at arbitrary points.
//!
//! The first input byte picks the chunk size, so the fuzzer explores frames
//! that straddle reads. Properties: no panic, the decoder's buffer never
//! exceeds what was pushed, and the frames decoded do not depend on how the
//! input was split.
#![no_main]

use capsule_agent_protocol::{DecodeError, Frame, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fn run(data: &[u8], chunk: usize) -> Vec<Result<Frame, DecodeError>> {
    let mut dec = FrameDecoder::new();
    let mut out = Vec::new();
    let mut pushed = 0;
    for piece in data.chunks(chunk) {
        dec.push(piece);
        pushed += piece.len();
        assert!(dec.buffered_len() <= pushed);
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => out.push(Ok(f)),
                Ok(None) => break,
                Err(e) => {
                    let fatal = e.is_fatal();
                    out.push(Err(e));
                    if fatal {
                        return out;
                    }
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunked = run(rest, usize::from(first % 32) + 1);
    let whole = run(rest, rest.len().max(1));
    assert_eq!(chunked, whole);
});
