//! `probe_mailbox` seeds: the start of a probe vCPU's mailbox after a command, as the host's
//! request header and the guest's reply header lay it out.

use probe_abi::{
    decode_reply, decode_reply_header, encode_request_header, ReplyHeader, FLAG_STDERR_TRUNCATED,
    FLAG_STDOUT_TRUNCATED, MAILBOX_SIZE, REPLY_HEADER_OFFSET, REQUEST_OFFSET, STDERR_MAX,
    STDOUT_MAX, STDOUT_OFFSET,
};

use crate::Seed;

/// The mailbox bytes up to the end of the stdout text (the target zero-fills the rest).
fn mailbox(seq: u32, request: &str, reply: ReplyHeader, stdout: &[u8]) -> Result<Vec<u8>, String> {
    let req = encode_request_header(seq, request.len()).ok_or("request too long")?;
    let mut m = vec![0u8; STDOUT_OFFSET + stdout.len()];
    m[..req.len()].copy_from_slice(&req);
    m[REQUEST_OFFSET..REQUEST_OFFSET + request.len()].copy_from_slice(request.as_bytes());
    let header = reply.to_bytes();
    m[REPLY_HEADER_OFFSET..REPLY_HEADER_OFFSET + header.len()].copy_from_slice(&header);
    m[STDOUT_OFFSET..].copy_from_slice(stdout);
    Ok(m)
}

fn reply(
    seq: u32,
    exit_code: i32,
    stdout_len: usize,
    stderr_len: usize,
    flags: u32,
) -> ReplyHeader {
    ReplyHeader {
        seq,
        exit_code,
        stdout_len: stdout_len as u32,
        stderr_len: stderr_len as u32,
        flags,
    }
}

/// The seeds.
pub fn seeds() -> Result<Vec<Seed>, String> {
    let hello = b"hello\n";
    Ok(vec![
        Seed::new(
            "echo-hello",
            mailbox(1, "echo hello", reply(1, 0, hello.len(), 0, 0), hello)?,
        ),
        Seed::new(
            "count-second-command",
            mailbox(2, "count", reply(2, 0, 2, 0, 0), b"2\n")?,
        ),
        Seed::new(
            "failed-with-stderr",
            mailbox(3, "nosuch", reply(3, 127, 0, 24, 0), b"")?,
        ),
        Seed::new(
            "both-truncated",
            mailbox(
                9,
                "spam 1000000",
                reply(
                    9,
                    0,
                    STDOUT_MAX,
                    STDERR_MAX,
                    FLAG_STDOUT_TRUNCATED | FLAG_STDERR_TRUNCATED,
                ),
                b"spam spam spam\n",
            )?,
        ),
        Seed::new(
            "reply-header-only",
            reply(4, -1, 3, 1, 0).to_bytes().to_vec(),
        ),
    ])
}

/// A seed is valid if its whole mailbox, or its bytes as a bare reply header, decode.
pub fn check(data: &[u8]) -> Result<(), String> {
    let mut mailbox = vec![0u8; MAILBOX_SIZE as usize];
    let n = data.len().min(mailbox.len());
    mailbox[..n].copy_from_slice(&data[..n]);
    match decode_reply(&mailbox) {
        Ok(_) => Ok(()),
        Err(e) => decode_reply_header(data)
            .map(|_| ())
            .map_err(|e2| format!("mailbox: {e}; bare header: {e2}")),
    }
}
