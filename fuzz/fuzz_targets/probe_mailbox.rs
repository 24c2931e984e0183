//! Fuzzes the host's decoding of a probe mailbox: every byte of it is guest-controlled.
//!
//! Properties: decoding never panics, and an accepted reply never claims more output than
//! the mailbox areas hold.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = probe_abi::decode_reply_header(data);
    let mut mailbox = vec![0u8; probe_abi::MAILBOX_SIZE as usize];
    let n = data.len().min(mailbox.len());
    mailbox[..n].copy_from_slice(&data[..n]);
    if let Ok(reply) = probe_abi::decode_reply(&mailbox) {
        assert!(reply.stdout.len() <= probe_abi::STDOUT_MAX);
        assert!(reply.stderr.len() <= probe_abi::STDERR_MAX);
        assert_eq!(reply.stdout.len(), reply.header.stdout_len as usize);
    }
});
