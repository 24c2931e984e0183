//! Wire protocol between the capsule host engine and the in-guest agent.
//!
//! This crate is the *one* definition of the format: the host engine and the
//! agent (PID 1 inside the microVM) both depend on it. It is `#![no_std]` and
//! only needs `alloc`.
//!
//! # Transport
//!
//! Any reliable, ordered byte stream (a virtio-console port, vsock, a Unix
//! socket in tests). The protocol is symmetric at the framing level; which
//! side may send which message is documented on [`Message`].
//!
//! # Frame layout
//!
//! Every frame is a 9-byte header followed by a payload. All integers are
//! little-endian.
//!
//! | offset | size | field                                                      |
//! |-------:|-----:|------------------------------------------------------------|
//! | 0      | 4    | `len`: u32, number of bytes that follow this field (`5 + payload length`) |
//! | 4      | 1    | `kind`: u8, the message kind (see [`Kind`])                  |
//! | 5      | 4    | `id`: u32, the request id                                  |
//! | 9      | len-5| payload, layout depends on `kind`                          |
//!
//! `len` must satisfy `5 <= len <= MAX_FRAME_LEN`; anything else is a fatal
//! framing error ([`DecodeError::BadLength`]): the stream cannot be
//! resynchronised and the receiver should report an [`Message::Error`] on id
//! [`CONTROL_ID`] and close the connection. A frame whose length is valid but
//! whose kind is unknown or whose payload is malformed is consumed whole and
//! reported as a non-fatal error that carries the request id, so the receiver
//! can answer with an [`Message::Error`] for that id and go on.
//!
//! # Request ids
//!
//! Id `0` ([`CONTROL_ID`]) is for connection-level messages: [`Message::Hello`]
//! and errors that concern the whole connection. The host picks a fresh
//! non-zero id for each request ([`Message::Run`], [`Message::Ping`],
//! [`Message::Sync`], file requests); every message about that request (output
//! chunks, stdin, signals, the final exit or error) carries the same id. Many
//! requests may be in flight at once; frames of different requests interleave
//! freely, frames of one request keep their order. An id may be reused once
//! its request finished.
//!
//! # Payload primitives
//!
//! Payloads are a sequence of fields, with no padding and no trailing bytes
//! (trailing bytes are an error, so the encoding is canonical):
//!
//! * `u8`, `u16`, `u32`, `u64`, `i32`, `i64`: fixed-size little-endian.
//! * `bool`: one byte, `0` or `1`; any other value is an error.
//! * `bytes`: `u32` length, then that many bytes.
//! * `string`: `bytes` that must be valid UTF-8.
//! * `option<T>`: one byte tag, `0` = none, `1` = some followed by `T`.
//! * `list<T>`: `u32` count, then that many `T`.
//!
//! # Messages
//!
//! | kind | name        | direction   | payload |
//! |-----:|-------------|-------------|---------|
//! | 0x00 | (invalid)   |             | never valid |
//! | 0x01 | Hello       | agent→host  | `protocol_version: u32, agent_version: string, capabilities: u64` |
//! | 0x02 | Ping        | either      | `data: bytes` |
//! | 0x03 | Pong        | either      | `data: bytes` (echo of the ping) |
//! | 0x04 | Error       | either      | `code: u16, message: string` |
//! | 0x05 | Ack         | agent→host  | empty (success of a request without other reply) |
//! | 0x06 | Sync        | host→agent  | `realtime_ns: u64, entropy: bytes, env: list<(string, string)>`; see [`SyncRequest`] |
//! | 0x07 | Hold        | host→agent  | empty |
//! | 0x08 | Release     | host→agent  | empty |
//! | 0x10 | Run         | host→agent  | see [`RunRequest`] below |
//! | 0x11 | Stdin       | host→agent  | `data: bytes` |
//! | 0x12 | CloseStdin  | host→agent  | empty |
//! | 0x13 | Signal      | host→agent  | `sig: i32` |
//! | 0x14 | Resize      | host→agent  | `rows: u16, cols: u16` (a PTY command's window size) |
//! | 0x15 | ListProcesses | host→agent | empty |
//! | 0x16 | Attach      | host→agent  | `pid: u32` |
//! | 0x17 | Credit      | host→agent  | `bytes: u32` (flow control of streamed output) |
//! | 0x18 | Started     | agent→host  | `pid: u32` |
//! | 0x19 | Stdout      | agent→host  | `data: bytes` |
//! | 0x1a | Stderr      | agent→host  | `data: bytes` |
//! | 0x1b | Exit        | agent→host  | see [`ExitInfo`] below |
//! | 0x1c | ProcessList | agent→host  | `list<entry>`; entry = `pid: u32, command: string, started_at_unix_ms: u64` |
//! | 0x20 | ReadFile    | host→agent  | `path: string, offset: u64, len: u32` |
//! | 0x21 | WriteFile   | host→agent  | `path: string, mode: u32, truncate: bool, append: bool, data: bytes` |
//! | 0x22 | ListDir     | host→agent  | `path: string` |
//! | 0x23 | Stat        | host→agent  | `path: string, depth: u32` |
//! | 0x24 | Remove      | host→agent  | `path: string, recursive: bool` |
//! | 0x25 | MakeDir     | host→agent  | `path: string, mode: u32, parents: bool` |
//! | 0x26 | Rename      | host→agent  | `from: string, to: string` |
//! | 0x27 | SetAttr     | host→agent  | `path: string, mode: option<u32>, uid: option<u32>, gid: option<u32>` |
//! | 0x28 | FileData    | agent→host  | `data: bytes, eof: bool` |
//! | 0x29 | DirListing  | agent→host  | `list<entry>, truncated: bool`; entry = `name: string, file_type: u8, size: u64, mode: u32` |
//! | 0x2a | Entries     | agent→host  | `list<info>, more: bool`; see [`FileInfo`] below |
//! | 0x80 | ChannelTest | either      | `len: u64, to_agent: bool` (experimental: raw bytes follow; see "Channel tests") |
//!
//! Reserved, not yet defined: `0x07..=0x0f` (connection control),
//! `0x1d..=0x1f` (more process events), `0x2b..=0x2f` (more file replies), `0x30..=0x7f`
//! (future core messages), `0x81..=0xff` (experimental extensions). A receiver
//! answers an unknown kind with an `Error` of code
//! [`ErrorCode::UNKNOWN_KIND`] on the frame's id.
//!
//! `Run` payload, in order: `command` (u8 tag: `0` = shell, followed by
//! `script: string`, run as `/bin/sh -c script`; `1` = exec, followed by
//! `program: string, args: list<string>`), `env: list<(string, string)>`,
//! `clear_env: bool`, `cwd: option<string>`, `timeout_ms: u64` (0 = none),
//! `stdout_limit: u32`, `stderr_limit: u32`, `stream: bool`, `stdin: bool`,
//! `user: option<string>`, `pty: option<(rows: u16, cols: u16)>` (the last two
//! since version 3).
//!
//! `Sync` payload, in order: `realtime_ns: u64` (the host's `CLOCK_REALTIME`
//! in nanoseconds since the Unix epoch when it sent the message; 0 = leave
//! the guest clock alone), `entropy: bytes` (at most [`MAX_SYNC_ENTROPY`]
//! bytes; a longer field is a malformed payload, [`PayloadError::TooLong`]),
//! `env: list<(string, string)>`.
//!
//! `Entries` item ([`FileInfo`]), in order: `path: string` (relative to the
//! request's path, `/`-separated; empty for the path itself), `file_type: u8`
//! (`0` file, `1` directory, `2` symbolic link, `3` other), `size: u64`,
//! `mode: u32` (`st_mode`), `uid: u32`, `gid: u32`, `modified_ms: i64`
//! (milliseconds since the Unix epoch), `symlink_target: option<string>`.
//!
//! `Exit` payload, in order: `status` (u8 tag: `0` = exited, followed by
//! `code: i32`; `1` = killed by a signal, followed by `signal: i32`),
//! `duration_us: u64`, `timed_out: bool`, `stdout_truncated: bool`,
//! `stderr_truncated: bool`, `stdout: bytes`, `stderr: bytes` (both empty when
//! the output was streamed).
//!
//! # Conversation
//!
//! 1. On connect the agent sends `Hello` on id 0 with [`PROTOCOL_VERSION`],
//!    its version string and a [`caps`] bitset. The host may refuse by sending
//!    `Error { code: VERSION_MISMATCH }` on id 0 (or by closing); the agent then
//!    drops the connection. The host does not have to wait for `Hello` before
//!    sending requests.
//! 2. `Run` → `Started { pid }` → zero or more `Stdout`/`Stderr` chunks (only
//!    with `stream`) → exactly one `Exit`; or, if it could not start, one
//!    `Error` whose code [ends the request](ErrorCode::ends_request) and no
//!    `Started`. While it runs the host may send `Stdin`, `CloseStdin` (only
//!    with `stdin` or `pty`), `Signal`, `Resize` (only with `pty`) and
//!    `Credit` (only with `stream`) on the same id; those get no reply on
//!    success and an advisory `Error` (one that does not end the request) when
//!    refused.
//!
//!    A `Run` with `pty` runs the command on a new pseudo-terminal of that
//!    size (the process leads a new session whose controlling terminal it is;
//!    it is the process's stdin, stdout and stderr): all its output comes as
//!    `Stdout`, `Stdin` is typed into the terminal, `CloseStdin` types the
//!    end-of-file character (Ctrl-D), and `Resize` changes the window size.
//!    A `Run` with `user` runs as that user of the guest's `/etc/passwd` (uid,
//!    primary gid, supplementary groups from `/etc/group`; `HOME`, `USER`,
//!    `LOGNAME` from its entry), or fails with
//!    [`ErrorCode::UNKNOWN_USER`].
//! 3. `Ping` → `Pong` with the same data.
//! 4. `ReadFile` → `FileData`; `WriteFile` → `Ack`; `ListDir` → `DirListing`;
//!    `Stat` → one or more `Entries`, the last with `more: false`; `Remove`,
//!    `MakeDir`, `Rename`, `SetAttr` → `Ack`; any of them → one `Error` on
//!    failure (after `Entries` frames with `more: true`, too), whose code
//!    names the file-system error where it is one of the codes 32..=47
//!    ([`ErrorCode::NOT_FOUND`], [`ErrorCode::IS_A_DIRECTORY`]...) and is
//!    [`ErrorCode::IO`] otherwise, with the OS's message. File requests run
//!    concurrently, except `WriteFile`s: the agent carries those out one at a
//!    time, in the order they arrive, so a host may send the chunks of one
//!    file (`truncate`, then `append`) without waiting for each `Ack`.
//!    `Stat` with `depth` 0 describes the path itself (`lstat`: a final
//!    symbolic link is not followed) in one entry with an empty `path`; with
//!    `depth` n > 0 the path must be a directory, and the entries are those
//!    below it down to n levels, each directory's entries sorted by name and
//!    each directory before its contents (symbolic links to directories are
//!    not entered; what cannot be read below the path is left out), in as
//!    many frames as needed, each well under [`MAX_CHUNK_LEN`] bytes.
//! 5. `Sync` → `Ack`, or one `Error` (which ends the request) naming the step
//!    that failed. The host sends it after a fresh boot and after every
//!    restore of a snapshot (a resumed or cloned guest), on a non-zero id.
//!    The agent (advertising [`caps::SYNC`]) applies it in order, stopping at
//!    the first step that fails: (a) unless `realtime_ns` is 0, it sets the
//!    guest's `CLOCK_REALTIME` to it; (b) unless `entropy` is empty, it mixes
//!    the bytes into the guest kernel's entropy pool, credited as `8 * len`
//!    bits, and forces a reseed of the kernel CRNG, so that clones of one
//!    snapshot stop sharing random state; (c) it replaces the environment of
//!    any earlier `Sync` with `env`: variables set for every command the agent
//!    runs from then on, after [`RunRequest::clear_env`] is applied and before
//!    the request's own [`RunRequest::env`], which overrides them. The agent
//!    applies a `Sync` before it handles the frames that follow it, so the
//!    host may send requests right after it without waiting for the `Ack`.
//!    (d) Since the host sends a `Sync` only when its side of the connection
//!    is new, nobody listens to the requests sent before it any more: every
//!    process the agent runs is *detached* (see below) until an `Attach`.
//! 6. `ListProcesses` → `ProcessList`: the processes the agent started (by
//!    `Run`, on this connection or an earlier one) that it still tracks: those
//!    running, and those that ended but whose `Exit` nobody received yet
//!    (detached). Ordered by pid.
//! 7. `Attach { pid }` on a fresh id → `Started { pid }`, then the process's
//!    output as `Stdout`/`Stderr` chunks (streamed and flow-controlled, even
//!    if its `Run` was buffered), then its `Exit` (with empty `stdout` and
//!    `stderr`); or one `Error` of code [`ErrorCode::NO_SUCH_PROCESS`].
//!    Output and exit go to the attaching request *only*: the request that
//!    received them before (if any) ends with an `Error` of code
//!    [`ErrorCode::DETACHED`]. `Stdin`, `CloseStdin`, `Signal`, `Resize` and
//!    `Credit` on the attaching id act on the process. The attaching request
//!    receives output from the moment of the attach: what was already sent
//!    to an earlier request is not repeated; what the agent had collected for
//!    a buffered `Run` and not sent comes first, as chunks.
//!
//! 8. `Hold` → `Ack`; `Release` → `Ack` (agents advertising [`caps::HOLD`];
//!    see below).
//!
//! # Holding processes for a snapshot
//!
//! A snapshot of a running guest is resumed (or cloned) on a new host side
//! of the connection, and the `Sync` that tells the agent so can only arrive
//! once the restored guest runs. Without more, a process that ends in that
//! instant would send its exit to a request nobody listens to any more, and
//! the exit would be lost. So the host sends `Hold` before it freezes the
//! guest: once the agent answers `Ack`, it sends no frame about any process
//! (no `Started` of an attach, no output, no `Exit`): it stops reading their
//! output and keeps the exits of processes that end meanwhile, as it does for
//! detached processes. It holds them until a `Release` (the snapshot is
//! written and the same guest runs on: every process reports to its request
//! again, nothing lost) or a `Sync` (a restored guest: every process is
//! detached, and those that ended meanwhile wait for an `Attach`). Replies to
//! the host's own requests (files, lists, pings) are not held. An agent
//! without [`caps::HOLD`] answers `Hold` with [`ErrorCode::UNKNOWN_KIND`].
//!
//! # Detached processes
//!
//! A process whose request has nobody listening (after a `Sync`, or after
//! its connection closed when the agent keeps processes across connections,
//! as PID 1 does) keeps running. The agent stops reading its output: what
//! the process writes waits in its pipe (64 KiB by default) and then the
//! process blocks on its next write, so nothing is lost and nothing grows
//! without bound. If it ends meanwhile, the agent keeps its exit status (and
//! the output still in its pipes, and a buffered request's collected output)
//! until an `Attach` takes them, for at most [`MAX_UNCLAIMED_EXITS`] such
//! processes (beyond that the oldest is forgotten). Output sent to the
//! previous request in the instant before it was detached (up to one window)
//! is lost with that request.
//!
//! # Flow control of streamed output
//!
//! A streamed request (`Run` with `stream`, or `Attach`) starts with a send
//! window of [`STREAM_WINDOW`] bytes. The agent sends `Stdout`/`Stderr` data
//! only while the window is open, takes each chunk's data length from it,
//! and reads the process's output pipes only while it is open (at most what
//! the window allows at a time): when the host stops taking output, the
//! process blocks once its pipe is full. `Credit { bytes }` on the request's
//! id grows the window by `bytes`; the host sends it as its consumer takes
//! output (in batches, so that the window never stays shut while the host
//! has taken everything). `Started`, `Exit` and `Error` do not count. A
//! `Credit` for an id with no streamed request is ignored without a reply
//! (it may cross the request's `Exit`). Buffered requests are not windowed
//! (their output is bounded by [`MAX_BUFFERED_OUTPUT`]). A streamed
//! request's `stdout_limit`/`stderr_limit` of `u32::MAX` means no limit.
//!
//! An `Error` on a request id ends that request unless
//! [`ErrorCode::ends_request`] says it is advisory.
//!
//! # Channel tests (experimental, for benchmarks)
//!
//! `ChannelTest` measures the channel itself: `len` raw bytes go through the
//! stream with no protocol work (no frames, no encoding or decoding, no
//! process, no flow control), the ceiling any request's throughput can reach.
//! Only a benchmark asks for it (the engine sends it only with its `testing`
//! feature); an agent that predates it answers `Error` with
//! [`ErrorCode::UNKNOWN_KIND`].
//!
//! * `ChannelTest { len, to_agent: false }` (host → agent, on a fresh id):
//!   the agent answers with `ChannelTest { len, to_agent: false }` on that
//!   id, followed immediately by `len` raw bytes (zeros, written 64 KiB at a
//!   time, as streamed output is), and writes no other frame until they are
//!   all written. A host that did not ask for it must not take such a frame
//!   as a raw block (it drops it and keeps decoding frames).
//! * `ChannelTest { len, to_agent: true }` (host → agent): `len` raw bytes
//!   follow this frame immediately; the agent reads and discards them, and
//!   answers `Ack` on the frame's id once it has read them all.
//!
//! The raw bytes are part of neither side's frames: a receiver takes them
//! out of its decoder ([`FrameDecoder::discard`]) and out of the stream before
//! decoding again.
#![no_std]
#![forbid(unsafe_code)]
#![warn(missing_docs)]

extern crate alloc;

mod codec;
mod decoder;
mod message;

pub use codec::{
    decode_frame, decode_payload, encode, encode_into, finish_file_data, finish_output, try_encode,
    DATA_FRAME_PREFIX_LEN,
};
pub use decoder::FrameDecoder;
pub use message::{
    Command, DirEntry, ErrorCode, ErrorInfo, ExitInfo, ExitStatus, FileInfo, FileType, Hello, Kind,
    Message, ProcessEntry, RunRequest, SetAttr, SyncRequest, WindowSize, WriteFile,
};

/// Version of the wire protocol described in this crate. Bumped on any
/// incompatible change; sent in [`Message::Hello`].
///
/// Version 2 added [`Message::Sync`] (kind 0x06) and [`caps::SYNC`].
/// Version 3 added [`RunRequest::user`] and [`RunRequest::pty`] (at the end of
/// the `Run` payload), `Resize` (0x14), `ListProcesses` (0x15) and its
/// `ProcessList` (0x1c), `Attach` (0x16), `Credit` (0x17) with the flow
/// control of streamed output, detaching by `Sync`, and [`caps::USER`],
/// [`caps::PTY`], [`caps::PROCESSES`].
pub const PROTOCOL_VERSION: u32 = 3;

/// Bytes in a frame header: length (4), kind (1), request id (4).
pub const HEADER_LEN: usize = 9;

/// Largest payload a frame may carry (4 MiB + 64 KiB), large enough for an
/// [`ExitInfo`] carrying [`MAX_BUFFERED_OUTPUT`] bytes of both stdout and stderr.
pub const MAX_PAYLOAD_LEN: usize = 4 * 1024 * 1024 + 64 * 1024;

/// Largest value of the frame length field: kind + id + [`MAX_PAYLOAD_LEN`].
pub const MAX_FRAME_LEN: usize = MAX_PAYLOAD_LEN + 5;

/// Largest amount of stdout (and, separately, stderr) the agent buffers for a
/// non-streamed command; larger `stdout_limit`/`stderr_limit` are clamped.
pub const MAX_BUFFERED_OUTPUT: u32 = 2 * 1024 * 1024;

/// Recommended largest data chunk for `Stdin`, `Stdout`, `Stderr`, `FileData`
/// and `WriteFile`, well inside [`MAX_PAYLOAD_LEN`].
pub const MAX_CHUNK_LEN: usize = 1024 * 1024;

/// The send window a streamed request starts with, in bytes of
/// `Stdout`/`Stderr` data (see "Flow control" in the crate docs).
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// Most processes that ended while detached whose exit the agent keeps for a
/// later `Attach` (see "Detached processes" in the crate docs).
pub const MAX_UNCLAIMED_EXITS: usize = 32;

/// Most bytes of [`SyncRequest::entropy`]; a longer field does not decode.
pub const MAX_SYNC_ENTROPY: usize = 512;

/// Request id reserved for connection-level messages ([`Message::Hello`],
/// connection errors).
pub const CONTROL_ID: u32 = 0;

/// Capability bits advertised in [`Hello::capabilities`].
pub mod caps {
    /// The agent runs commands ([`crate::Message::Run`]).
    pub const RUN: u64 = 1 << 0;
    /// The agent can stream output (`RunRequest::stream`).
    pub const STREAM: u64 = 1 << 1;
    /// The agent forwards stdin (`RunRequest::stdin`).
    pub const STDIN: u64 = 1 << 2;
    /// The agent forwards signals ([`crate::Message::Signal`]).
    pub const SIGNAL: u64 = 1 << 3;
    /// The agent serves `ReadFile`, `WriteFile` and `ListDir` (and, since
    /// kinds 0x23..=0x27 and 0x2a were defined, `Stat`, `Remove`, `MakeDir`,
    /// `Rename` and `SetAttr`; an older agent answers those with
    /// [`crate::ErrorCode::UNKNOWN_KIND`]).
    pub const FILES: u64 = 1 << 4;
    /// The agent runs as PID 1 (it set up the guest and reaps orphans).
    pub const PID1: u64 = 1 << 5;
    /// The agent handles [`crate::Message::Sync`] (clock, entropy, environment).
    pub const SYNC: u64 = 1 << 6;
    /// The agent runs commands as other users ([`crate::RunRequest::user`]).
    pub const USER: u64 = 1 << 7;
    /// The agent runs commands on pseudo-terminals ([`crate::RunRequest::pty`],
    /// [`crate::Message::Resize`]).
    pub const PTY: u64 = 1 << 8;
    /// The agent lists and attaches to its processes
    /// ([`crate::Message::ListProcesses`], [`crate::Message::Attach`]) and
    /// flow-controls streamed output ([`crate::Message::Credit`]).
    pub const PROCESSES: u64 = 1 << 9;
    /// The agent holds its processes' reports for a snapshot
    /// ([`crate::Message::Hold`], [`crate::Message::Release`]).
    pub const HOLD: u64 = 1 << 10;
}

/// One decoded frame: a request id and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The request id (see the crate docs; [`CONTROL_ID`] for connection-level messages).
    pub id: u32,
    /// The message.
    pub message: Message,
}

/// Why a payload could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    /// The payload ended in the middle of a field.
    #[error("payload truncated")]
    Truncated,
    /// Bytes were left after the last field.
    #[error("{0} trailing bytes after the payload")]
    TrailingBytes(usize),
    /// A `bool` byte other than 0 or 1.
    #[error("invalid bool byte {0}")]
    InvalidBool(u8),
    /// A tag byte (option, enum) with no meaning.
    #[error("invalid tag byte {0}")]
    InvalidTag(u8),
    /// A string that is not UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A length-limited field is longer than its limit (e.g.
    /// [`SyncRequest::entropy`] over [`MAX_SYNC_ENTROPY`]).
    #[error("field of {len} bytes exceeds its maximum of {max}")]
    TooLong {
        /// The length the payload gave.
        len: usize,
        /// The field's limit.
        max: usize,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length field is below 5 or above [`MAX_FRAME_LEN`]. Fatal: the
    /// stream cannot be resynchronised.
    #[error("frame length {len} out of range 5..={max}", max = MAX_FRAME_LEN)]
    BadLength {
        /// The offending length field.
        len: u32,
    },
    /// The kind byte names no known message. The frame was skipped.
    #[error("unknown message kind {kind:#04x} on request {id}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
        /// The frame's request id.
        id: u32,
    },
    /// The payload does not match its kind. The frame was skipped.
    #[error("malformed {kind:?} payload on request {id}: {reason}")]
    Malformed {
        /// The frame's kind.
        kind: Kind,
        /// The frame's request id.
        id: u32,
        /// What was wrong.
        reason: PayloadError,
    },
}

impl DecodeError {
    /// Whether the stream is unusable after this error (framing lost).
    pub fn is_fatal(&self) -> bool {
        matches!(self, DecodeError::BadLength { .. })
    }

    /// The request id of the skipped frame, for non-fatal errors.
    pub fn request_id(&self) -> Option<u32> {
        match self {
            DecodeError::BadLength { .. } => None,
            DecodeError::UnknownKind { id, .. } | DecodeError::Malformed { id, .. } => Some(*id),
        }
    }

    /// The [`ErrorCode`] a receiver should answer this error with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            DecodeError::UnknownKind { .. } => ErrorCode::UNKNOWN_KIND,
            DecodeError::BadLength { .. } | DecodeError::Malformed { .. } => ErrorCode::MALFORMED,
        }
    }
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The payload would exceed [`MAX_PAYLOAD_LEN`] (or a field its `u32` length).
    #[error("payload of {len} bytes exceeds the maximum of {max}", max = MAX_PAYLOAD_LEN)]
    TooLarge {
        /// The payload length that was produced.
        len: usize,
    },
    /// A buffer given to [`finish_output`] or [`finish_file_data`] is shorter than the
    /// [`DATA_FRAME_PREFIX_LEN`] bytes it must reserve for the header.
    #[error("a data frame of {len} bytes has no room for its {prefix}-byte prefix", prefix = DATA_FRAME_PREFIX_LEN)]
    NoPrefix {
        /// The buffer's length.
        len: usize,
    },
}
