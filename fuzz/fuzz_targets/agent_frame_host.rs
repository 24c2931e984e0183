//! Fuzzes the host side of the agent protocol: the bytes an (untrusted)
//! guest agent sends, decoded in one piece and as a stream.
//!
//! Properties: decoding never panics, and every frame that decodes
//! re-encodes to exactly the bytes it came from (the encoding is canonical).
#![no_main]

use capsule_agent_protocol::{decode_frame, encode, FrameDecoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One-shot decoding of consecutive frames.
    let mut rest = data;
    while let Ok(Some((frame, used))) = decode_frame(rest) {
        assert_eq!(encode(&frame.message, frame.id), rest[..used]);
        rest = &rest[used..];
    }
    // Streaming decoding of the whole input at once.
    let mut dec = FrameDecoder::new();
    dec.push(data);
    loop {
        match dec.next_frame() {
            Ok(Some(frame)) => {
                let bytes = encode(&frame.message, frame.id);
                assert_eq!(
                    decode_frame(&bytes).ok().flatten().map(|(f, _)| f),
                    Some(frame)
                );
            }
            Ok(None) => break,
            Err(e) if e.is_fatal() => break,
            Err(_) => {}
        }
    }
});
