//! What the probe guest and the host agree on: the guest-physical memory layout, the doorbell
//! port, and the byte layout of each vCPU's mailbox.
//!
//! This file is the single definition both sides compile: the host crates depend on it as an
//! ordinary crate, and the probe guest (a `no_std` program built by `probe-guest`'s build script)
//! includes the same source with `#[path]`. It has no dependencies and no `std`.
//!
//! # Memory layout (guest physical = guest virtual, identity mapped with 2 MiB pages)
//!
//! | range | what |
//! |---|---|
//! | `GDT_ADDR` | the GDT (null, user data, user code 64, TSS) |
//! | `TSS_ADDR` | the 64-bit TSS (needed for VM entry, never used) |
//! | `PML4_ADDR`, `PDPT_ADDR`, `PD_ADDR..` | page tables built by the host |
//! | `IMAGE_ADDR` .. `IMAGE_ADDR + IMAGE_MAX` | the guest program (text, data, bss) |
//! | `STACKS_ADDR` .. `MAILBOXES_ADDR` | one `STACK_SIZE` stack per vCPU |
//! | `MAILBOXES_ADDR` .. `TOUCH_ADDR` | one `MAILBOX_SIZE` mailbox per vCPU |
//! | `TOUCH_ADDR` .. end of RAM | pages the `touch` command writes |
//!
//! # Mailbox protocol
//!
//! Each vCPU owns one mailbox. The guest writes a reply into it and executes
//! `out DOORBELL_PORT, eax` with `eax` = [`DOORBELL_READY`] (first time) or [`DOORBELL_REPLY`].
//! That exit hands control to the host, which reads the reply, waits for the next request,
//! writes it into the same mailbox and re-enters the vCPU; the guest then handles it. So each
//! command costs exactly one exit, and an idle vCPU is simply not running.
//!
//! Mailbox bytes (all integers little endian):
//!
//! | offset | size | field | written by |
//! |---|---|---|---|
//! | 0 | 4 | request sequence number | host |
//! | 4 | 4 | request length (≤ [`REQUEST_MAX`]) | host |
//! | 8 | 4 | reply sequence number (the request's, echoed) | guest |
//! | 12 | 4 | exit code (i32) | guest |
//! | 16 | 4 | stdout length (≤ [`STDOUT_MAX`]) | guest |
//! | 20 | 4 | stderr length (≤ [`STDERR_MAX`]) | guest |
//! | 24 | 4 | flags ([`FLAG_STDOUT_TRUNCATED`], [`FLAG_STDERR_TRUNCATED`]) | guest |
//! | [`REQUEST_OFFSET`] | [`REQUEST_MAX`] | request text (a command line) | host |
//! | [`STDOUT_OFFSET`] | [`STDOUT_MAX`] | stdout bytes | guest |
//! | [`STDERR_OFFSET`] | [`STDERR_MAX`] | stderr bytes | guest |
//!
//! The host treats every guest-written field as untrusted: [`decode_reply_header`] rejects
//! lengths beyond the areas, so a misbehaving guest can at worst produce a decode error.
#![no_std]
#![deny(missing_docs)]

/// Size of a guest page as the probe uses it for `touch` (the host's page size too).
pub const PAGE_SIZE: u64 = 4096;
/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the TSS.
pub const TSS_ADDR: u64 = 0x2000;
/// Guest-physical address of the PML4 table.
pub const PML4_ADDR: u64 = 0x3000;
/// Guest-physical address of the page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0x4000;
/// Guest-physical address of the first page directory (one per GiB follows).
pub const PD_ADDR: u64 = 0x5000;
/// How many page directories fit before [`IMAGE_ADDR`]: the most guest memory the probe maps.
pub const MAX_PD_PAGES: u64 = (IMAGE_ADDR - PD_ADDR) / PAGE_SIZE;
/// Where the guest program is loaded and linked.
pub const IMAGE_ADDR: u64 = 0x10_0000;
/// Most bytes the guest program may occupy (text, data and bss).
pub const IMAGE_MAX: u64 = 0x8_0000;
/// Start of the per-vCPU stacks.
pub const STACKS_ADDR: u64 = IMAGE_ADDR + IMAGE_MAX;
/// Stack bytes per vCPU.
pub const STACK_SIZE: u64 = 0x4000;
/// Most vCPUs a probe capsule may have.
pub const MAX_VCPUS: u64 = 32;
/// Start of the per-vCPU mailboxes.
pub const MAILBOXES_ADDR: u64 = 0x20_0000;
/// Bytes per mailbox.
pub const MAILBOX_SIZE: u64 = 0x1_0000;
/// First page that `touch` writes; everything from here to the end of RAM is touchable.
pub const TOUCH_ADDR: u64 = MAILBOXES_ADDR + MAX_VCPUS * MAILBOX_SIZE;
/// Smallest guest memory the probe runs in, in MiB.
pub const MIN_MEMORY_MIB: u64 = 8;

/// The I/O port the guest writes to signal the host.
pub const DOORBELL_PORT: u16 = 0x7c0;
/// Doorbell value: the vCPU finished initialising and waits for its first request.
pub const DOORBELL_READY: u32 = 0x5245_4459; // "READY" in spirit: 'R','E','D','Y'
/// Doorbell value: the reply to the current request is in the mailbox.
pub const DOORBELL_REPLY: u32 = 0x5250_4c59; // 'R','P','L','Y'

/// Offset of the request sequence number.
pub const REQ_SEQ_OFFSET: usize = 0;
/// Offset of the request length.
pub const REQ_LEN_OFFSET: usize = 4;
/// Offset of the reply header (sequence, exit code, lengths, flags).
pub const REPLY_HEADER_OFFSET: usize = 8;
/// Size of the reply header.
pub const REPLY_HEADER_SIZE: usize = 20;
/// Offset of the request text.
pub const REQUEST_OFFSET: usize = 0x40;
/// Most request bytes.
pub const REQUEST_MAX: usize = 0x1000 - REQUEST_OFFSET;
/// Offset of the stdout area.
pub const STDOUT_OFFSET: usize = 0x1000;
/// Most stdout bytes per reply.
pub const STDOUT_MAX: usize = 0xE000;
/// Offset of the stderr area.
pub const STDERR_OFFSET: usize = STDOUT_OFFSET + STDOUT_MAX;
/// Most stderr bytes per reply.
pub const STDERR_MAX: usize = MAILBOX_SIZE as usize - STDERR_OFFSET;
/// Reply flag: stdout was cut at [`STDOUT_MAX`].
pub const FLAG_STDOUT_TRUNCATED: u32 = 1;
/// Reply flag: stderr was cut at [`STDERR_MAX`].
pub const FLAG_STDERR_TRUNCATED: u32 = 2;

/// Guest-physical address of vCPU `index`'s mailbox.
pub const fn mailbox_addr(index: u64) -> u64 {
    MAILBOXES_ADDR + index * MAILBOX_SIZE
}

/// Guest-physical address of the top of vCPU `index`'s stack (16-byte aligned).
pub const fn stack_top(index: u64) -> u64 {
    STACKS_ADDR + (index + 1) * STACK_SIZE
}

/// How many pages `touch` can use in a guest of `mem_size` bytes.
pub const fn touch_capacity(mem_size: u64) -> u64 {
    if mem_size <= TOUCH_ADDR {
        0
    } else {
        (mem_size - TOUCH_ADDR) / PAGE_SIZE
    }
}

// The layout's regions do not overlap (checked at compile time, on both sides).
const _: () = {
    assert!(PD_ADDR + PAGE_SIZE <= IMAGE_ADDR);
    assert!(STACKS_ADDR + MAX_VCPUS * STACK_SIZE <= MAILBOXES_ADDR);
    assert!(TOUCH_ADDR < MIN_MEMORY_MIB << 20);
    assert!(STDERR_OFFSET + STDERR_MAX == MAILBOX_SIZE as usize);
    assert!(REPLY_HEADER_OFFSET + REPLY_HEADER_SIZE <= REQUEST_OFFSET);
};

/// The fixed-size header of a reply, as the guest wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    /// Sequence number of the request this answers.
    pub seq: u32,
    /// The command's exit code.
    pub exit_code: i32,
    /// Valid bytes in the stdout area.
    pub stdout_len: u32,
    /// Valid bytes in the stderr area.
    pub stderr_len: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
}

impl ReplyHeader {
    /// Serialises the header into its [`REPLY_HEADER_SIZE`] bytes.
    pub fn to_bytes(self) -> [u8; REPLY_HEADER_SIZE] {
        let mut out = [0u8; REPLY_HEADER_SIZE];
        out[0..4].copy_from_slice(&self.seq.to_le_bytes());
        out[4..8].copy_from_slice(&self.exit_code.to_le_bytes());
        out[8..12].copy_from_slice(&self.stdout_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.stderr_len.to_le_bytes());
        out[16..20].copy_from_slice(&self.flags.to_le_bytes());
        out
    }
}

/// Why a reply header from the guest was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Fewer than [`REPLY_HEADER_SIZE`] bytes were given.
    Short,
    /// The stdout length exceeds [`STDOUT_MAX`].
    StdoutTooLong(u32),
    /// The stderr length exceeds [`STDERR_MAX`].
    StderrTooLong(u32),
    /// Unknown flag bits are set.
    UnknownFlags(u32),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Short => {
                write!(f, "reply header is shorter than {REPLY_HEADER_SIZE} bytes")
            }
            DecodeError::StdoutTooLong(n) => write!(f, "stdout length {n} exceeds {STDOUT_MAX}"),
            DecodeError::StderrTooLong(n) => write!(f, "stderr length {n} exceeds {STDERR_MAX}"),
            DecodeError::UnknownFlags(b) => write!(f, "unknown reply flags {b:#x}"),
        }
    }
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

/// Decodes and validates a reply header (the [`REPLY_HEADER_SIZE`] bytes at
/// [`REPLY_HEADER_OFFSET`] of a mailbox). Never panics, whatever the bytes.
pub fn decode_reply_header(bytes: &[u8]) -> Result<ReplyHeader, DecodeError> {
    if bytes.len() < REPLY_HEADER_SIZE {
        return Err(DecodeError::Short);
    }
    let header = ReplyHeader {
        seq: le_u32(bytes, 0),
        exit_code: le_u32(bytes, 4) as i32,
        stdout_len: le_u32(bytes, 8),
        stderr_len: le_u32(bytes, 12),
        flags: le_u32(bytes, 16),
    };
    if header.stdout_len as usize > STDOUT_MAX {
        return Err(DecodeError::StdoutTooLong(header.stdout_len));
    }
    if header.stderr_len as usize > STDERR_MAX {
        return Err(DecodeError::StderrTooLong(header.stderr_len));
    }
    if header.flags & !(FLAG_STDOUT_TRUNCATED | FLAG_STDERR_TRUNCATED) != 0 {
        return Err(DecodeError::UnknownFlags(header.flags));
    }
    Ok(header)
}

/// A whole reply borrowed from a mailbox image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply<'a> {
    /// The validated header.
    pub header: ReplyHeader,
    /// The stdout bytes.
    pub stdout: &'a [u8],
    /// The stderr bytes.
    pub stderr: &'a [u8],
}

/// Decodes a reply from a whole mailbox image (`MAILBOX_SIZE` bytes). Never panics.
pub fn decode_reply(mailbox: &[u8]) -> Result<Reply<'_>, DecodeError> {
    if mailbox.len() < MAILBOX_SIZE as usize {
        return Err(DecodeError::Short);
    }
    let header = decode_reply_header(&mailbox[REPLY_HEADER_OFFSET..])?;
    let stdout = &mailbox[STDOUT_OFFSET..STDOUT_OFFSET + header.stdout_len as usize];
    let stderr = &mailbox[STDERR_OFFSET..STDERR_OFFSET + header.stderr_len as usize];
    Ok(Reply {
        header,
        stdout,
        stderr,
    })
}

/// The request header the host writes at offset 0 of a mailbox: sequence number and length.
/// Returns `None` when the request is longer than [`REQUEST_MAX`].
pub fn encode_request_header(seq: u32, request_len: usize) -> Option<[u8; 8]> {
    if request_len > REQUEST_MAX {
        return None;
    }
    let mut out = [0u8; 8];
    out[0..4].copy_from_slice(&seq.to_le_bytes());
    out[4..8].copy_from_slice(&(request_len as u32).to_le_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_round_trips() {
        let header = ReplyHeader {
            seq: 7,
            exit_code: -3,
            stdout_len: 5,
            stderr_len: 1,
            flags: FLAG_STDOUT_TRUNCATED,
        };
        let mut mailbox = [0u8; MAILBOX_SIZE as usize];
        mailbox[REPLY_HEADER_OFFSET..REPLY_HEADER_OFFSET + REPLY_HEADER_SIZE]
            .copy_from_slice(&header.to_bytes());
        mailbox[STDOUT_OFFSET..STDOUT_OFFSET + 5].copy_from_slice(b"hello");
        mailbox[STDERR_OFFSET] = b'!';
        let reply = decode_reply(&mailbox).unwrap();
        assert_eq!(reply.header, header);
        assert_eq!(reply.stdout, b"hello");
        assert_eq!(reply.stderr, b"!");
    }

    #[test]
    fn oversized_lengths_and_flags_are_rejected() {
        let mut h = ReplyHeader {
            seq: 0,
            exit_code: 0,
            stdout_len: STDOUT_MAX as u32 + 1,
            stderr_len: 0,
            flags: 0,
        };
        assert_eq!(
            decode_reply_header(&h.to_bytes()),
            Err(DecodeError::StdoutTooLong(STDOUT_MAX as u32 + 1))
        );
        h.stdout_len = 0;
        h.stderr_len = u32::MAX;
        assert_eq!(
            decode_reply_header(&h.to_bytes()),
            Err(DecodeError::StderrTooLong(u32::MAX))
        );
        h.stderr_len = 0;
        h.flags = 0x80;
        assert_eq!(
            decode_reply_header(&h.to_bytes()),
            Err(DecodeError::UnknownFlags(0x80))
        );
        assert_eq!(decode_reply_header(&[0u8; 3]), Err(DecodeError::Short));
        assert_eq!(decode_reply(&[0u8; 100]), Err(DecodeError::Short));
    }

    #[test]
    fn request_header_is_bounded() {
        assert!(encode_request_header(1, REQUEST_MAX + 1).is_none());
        let h = encode_request_header(9, 4).unwrap();
        assert_eq!(&h[0..4], &9u32.to_le_bytes());
        assert_eq!(&h[4..8], &4u32.to_le_bytes());
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small xorshift generator: deterministic, no dependencies.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut mailbox = [0u8; MAILBOX_SIZE as usize];
        for _ in 0..2000 {
            for byte in mailbox[..REQUEST_OFFSET].iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = (state >> 24) as u8;
            }
            // Bias lengths towards the edges of what is valid.
            if state & 1 == 0 {
                let len = (state >> 8) as u32 % (STDOUT_MAX as u32 + 2);
                mailbox[REPLY_HEADER_OFFSET + 8..REPLY_HEADER_OFFSET + 12]
                    .copy_from_slice(&len.to_le_bytes());
            }
            if let Ok(reply) = decode_reply(&mailbox) {
                assert!(reply.stdout.len() <= STDOUT_MAX);
                assert!(reply.stderr.len() <= STDERR_MAX);
            }
        }
    }
}
