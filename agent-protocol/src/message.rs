//! Message types.

use alloc::string::String;
use alloc::vec::Vec;

/// Message kind byte (offset 4 of a frame). See the crate docs for the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// [`Message::Hello`].
    Hello = 0x01,
    /// [`Message::Ping`].
    Ping = 0x02,
    /// [`Message::Pong`].
    Pong = 0x03,
    /// [`Message::Error`].
    Error = 0x04,
    /// [`Message::Ack`].
    Ack = 0x05,
    /// [`Message::Sync`].
    Sync = 0x06,
    /// [`Message::Hold`].
    Hold = 0x07,
    /// [`Message::Release`].
    Release = 0x08,
    /// [`Message::Run`].
    Run = 0x10,
    /// [`Message::Stdin`].
    Stdin = 0x11,
    /// [`Message::CloseStdin`].
    CloseStdin = 0x12,
    /// [`Message::Signal`].
    Signal = 0x13,
    /// [`Message::Resize`].
    Resize = 0x14,
    /// [`Message::ListProcesses`].
    ListProcesses = 0x15,
    /// [`Message::Attach`].
    Attach = 0x16,
    /// [`Message::Credit`].
    Credit = 0x17,
    /// [`Message::Started`].
    Started = 0x18,
    /// [`Message::Stdout`].
    Stdout = 0x19,
    /// [`Message::Stderr`].
    Stderr = 0x1a,
    /// [`Message::Exit`].
    Exit = 0x1b,
    /// [`Message::ProcessList`].
    ProcessList = 0x1c,
    /// [`Message::ReadFile`].
    ReadFile = 0x20,
    /// [`Message::WriteFile`].
    WriteFile = 0x21,
    /// [`Message::ListDir`].
    ListDir = 0x22,
    /// [`Message::Stat`].
    Stat = 0x23,
    /// [`Message::Remove`].
    Remove = 0x24,
    /// [`Message::MakeDir`].
    MakeDir = 0x25,
    /// [`Message::Rename`].
    Rename = 0x26,
    /// [`Message::SetAttr`].
    SetAttr = 0x27,
    /// [`Message::FileData`].
    FileData = 0x28,
    /// [`Message::DirListing`].
    DirListing = 0x29,
    /// [`Message::Entries`].
    Entries = 0x2a,
    /// [`Message::ChannelTest`] (experimental: measuring the channel).
    ChannelTest = 0x80,
}

impl Kind {
    /// The kind for a byte, if it names one.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            0x01 => Kind::Hello,
            0x02 => Kind::Ping,
            0x03 => Kind::Pong,
            0x04 => Kind::Error,
            0x05 => Kind::Ack,
            0x06 => Kind::Sync,
            0x07 => Kind::Hold,
            0x08 => Kind::Release,
            0x10 => Kind::Run,
            0x11 => Kind::Stdin,
            0x12 => Kind::CloseStdin,
            0x13 => Kind::Signal,
            0x14 => Kind::Resize,
            0x15 => Kind::ListProcesses,
            0x16 => Kind::Attach,
            0x17 => Kind::Credit,
            0x18 => Kind::Started,
            0x19 => Kind::Stdout,
            0x1a => Kind::Stderr,
            0x1b => Kind::Exit,
            0x1c => Kind::ProcessList,
            0x20 => Kind::ReadFile,
            0x21 => Kind::WriteFile,
            0x22 => Kind::ListDir,
            0x23 => Kind::Stat,
            0x24 => Kind::Remove,
            0x25 => Kind::MakeDir,
            0x26 => Kind::Rename,
            0x27 => Kind::SetAttr,
            0x28 => Kind::FileData,
            0x29 => Kind::DirListing,
            0x2a => Kind::Entries,
            0x80 => Kind::ChannelTest,
            _ => return None,
        })
    }
}

/// Every message of the protocol. Direction and reply rules are in the crate docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Agent → host on connect, on id 0.
    Hello(Hello),
    /// Either way: liveness check; answered with [`Message::Pong`] echoing the data.
    Ping(Vec<u8>),
    /// Answer to [`Message::Ping`].
    Pong(Vec<u8>),
    /// A request failed, or (on id 0) the connection has a problem.
    Error(ErrorInfo),
    /// Success of a request that has no other reply ([`Message::WriteFile`],
    /// [`Message::Sync`]).
    Ack,
    /// Host → agent, on a request id: after a boot or a snapshot restore, set
    /// the guest clock, reseed its kernel CRNG and set the environment of
    /// later commands. Answered by [`Message::Ack`] or an [`Message::Error`].
    Sync(SyncRequest),
    /// Host → agent, on a request id, before the guest is frozen for a
    /// snapshot: from the [`Message::Ack`] on, the agent sends nothing about
    /// any process (output, exit) until a [`Message::Release`] or a
    /// [`Message::Sync`]. See "Holding processes for a snapshot" in the crate
    /// docs.
    Hold,
    /// Host → agent, on a request id: the snapshot is written and the guest
    /// runs on; processes report to their requests again, as before the
    /// [`Message::Hold`]. Answered by [`Message::Ack`].
    Release,
    /// Host → agent: run a command.
    Run(RunRequest),
    /// Host → agent: bytes for the command's stdin.
    Stdin(Vec<u8>),
    /// Host → agent: close the command's stdin (EOF).
    CloseStdin,
    /// Host → agent: send a signal to the command's process group.
    Signal {
        /// The signal number (Linux numbering, e.g. 15 for SIGTERM).
        sig: i32,
    },
    /// Host → agent, on a PTY command's id: set the terminal's window size
    /// (`TIOCSWINSZ`; the process gets `SIGWINCH`).
    Resize(WindowSize),
    /// Host → agent: list the processes the agent started that it still
    /// tracks. Answered by [`Message::ProcessList`].
    ListProcesses,
    /// Host → agent, on a fresh id: from now on the output and the exit of
    /// process `pid` go to this request, and only to it. Answered by
    /// [`Message::Started`], then streamed output and [`Message::Exit`], as
    /// for a streamed `Run`; see the crate docs.
    Attach {
        /// The process, as [`Message::Started`] or [`Message::ProcessList`] named it.
        pid: u32,
    },
    /// Host → agent, on a streamed request's id: the host took `bytes` more
    /// bytes of output; the agent may send that many more (see the crate docs
    /// on flow control).
    Credit {
        /// Bytes of `Stdout`/`Stderr` data the window grows by.
        bytes: u32,
    },
    /// Agent → host: the command was spawned (or, for [`Message::Attach`],
    /// the process was found).
    Started {
        /// Pid (and process group id) of the command in the guest.
        pid: u32,
    },
    /// Agent → host: a chunk of stdout (streamed commands only).
    Stdout(Vec<u8>),
    /// Agent → host: a chunk of stderr (streamed commands only).
    Stderr(Vec<u8>),
    /// Agent → host: the command finished; last message of its request.
    Exit(ExitInfo),
    /// Agent → host: answer to [`Message::ListProcesses`].
    ProcessList(Vec<ProcessEntry>),
    /// Host → agent: read up to `len` bytes of a file from `offset`.
    ReadFile {
        /// Absolute path in the guest.
        path: String,
        /// Byte offset to start at.
        offset: u64,
        /// Most bytes to return (the agent may return fewer; at most [`crate::MAX_CHUNK_LEN`]).
        len: u32,
    },
    /// Host → agent: write a chunk of a file.
    WriteFile(WriteFile),
    /// Host → agent: list a directory (names, types, sizes and modes; see
    /// [`Message::Stat`] for whole entries and trees).
    ListDir {
        /// Absolute path in the guest.
        path: String,
    },
    /// Host → agent: information about a path (`depth` 0) or about the tree
    /// below a directory, down to `depth` levels; answered by one or more
    /// [`Message::Entries`].
    Stat {
        /// Absolute path in the guest. A final symbolic link is not followed.
        path: String,
        /// 0: the path itself; n > 0: the entries below the directory, down to
        /// n levels (1 = its children).
        depth: u32,
    },
    /// Host → agent: remove a file, symbolic link or directory; answered by
    /// [`Message::Ack`].
    Remove {
        /// Absolute path in the guest. A symbolic link is removed, not followed.
        path: String,
        /// Remove a directory with everything in it (otherwise only an empty one).
        recursive: bool,
    },
    /// Host → agent: create a directory; answered by [`Message::Ack`].
    MakeDir {
        /// Absolute path in the guest.
        path: String,
        /// Permission bits of the directories created (before the umask).
        mode: u32,
        /// Create missing parents too, and accept a directory that exists.
        parents: bool,
    },
    /// Host → agent: `rename(2)`; answered by [`Message::Ack`].
    Rename {
        /// Absolute path of what to rename.
        from: String,
        /// Absolute new path; a file (or empty directory) there is replaced.
        to: String,
    },
    /// Host → agent: change the owner and permission bits of a path
    /// (following a final symbolic link); answered by [`Message::Ack`].
    SetAttr(SetAttr),
    /// Agent → host: answer to [`Message::ReadFile`].
    FileData {
        /// The bytes read.
        data: Vec<u8>,
        /// Whether the end of the file was reached.
        eof: bool,
    },
    /// Agent → host: answer to [`Message::ListDir`].
    DirListing {
        /// The entries, without `.` and `..`, in no particular order.
        entries: Vec<DirEntry>,
        /// Whether entries were left out to fit one frame.
        truncated: bool,
    },
    /// Agent → host: (part of) the answer to [`Message::Stat`].
    Entries {
        /// The entries of this frame.
        entries: Vec<FileInfo>,
        /// Whether more `Entries` frames follow for the same request.
        more: bool,
    },
    /// Either way, experimental, for measuring the channel itself (benchmarks): `len` raw
    /// bytes, not frames, go through the stream right after this frame. Host → agent with
    /// `to_agent: true`: `len` raw bytes follow this frame; the agent reads and discards
    /// them, then answers [`Message::Ack`]. Host → agent with `to_agent: false`: the agent
    /// answers with this message (same `len`, `to_agent: false`) followed at once by `len`
    /// raw bytes, and writes no other frame in between. See "Channel tests" in the crate
    /// docs.
    ChannelTest {
        /// How many raw bytes follow.
        len: u64,
        /// Which way they go: `true` host → agent, `false` agent → host.
        to_agent: bool,
    },
}

impl Message {
    /// This message's kind byte.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Ping(_) => Kind::Ping,
            Message::Pong(_) => Kind::Pong,
            Message::Error(_) => Kind::Error,
            Message::Ack => Kind::Ack,
            Message::Sync(_) => Kind::Sync,
            Message::Hold => Kind::Hold,
            Message::Release => Kind::Release,
            Message::Run(_) => Kind::Run,
            Message::Stdin(_) => Kind::Stdin,
            Message::CloseStdin => Kind::CloseStdin,
            Message::Signal { .. } => Kind::Signal,
            Message::Resize(_) => Kind::Resize,
            Message::ListProcesses => Kind::ListProcesses,
            Message::Attach { .. } => Kind::Attach,
            Message::Credit { .. } => Kind::Credit,
            Message::Started { .. } => Kind::Started,
            Message::Stdout(_) => Kind::Stdout,
            Message::Stderr(_) => Kind::Stderr,
            Message::Exit(_) => Kind::Exit,
            Message::ProcessList(_) => Kind::ProcessList,
            Message::ReadFile { .. } => Kind::ReadFile,
            Message::WriteFile(_) => Kind::WriteFile,
            Message::ListDir { .. } => Kind::ListDir,
            Message::Stat { .. } => Kind::Stat,
            Message::Remove { .. } => Kind::Remove,
            Message::MakeDir { .. } => Kind::MakeDir,
            Message::Rename { .. } => Kind::Rename,
            Message::SetAttr(_) => Kind::SetAttr,
            Message::FileData { .. } => Kind::FileData,
            Message::DirListing { .. } => Kind::DirListing,
            Message::Entries { .. } => Kind::Entries,
            Message::ChannelTest { .. } => Kind::ChannelTest,
        }
    }

    /// Shorthand for an [`Message::Error`].
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error(ErrorInfo {
            code,
            message: message.into(),
        })
    }
}

/// Payload of [`Message::Hello`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The agent's [`crate::PROTOCOL_VERSION`].
    pub protocol_version: u32,
    /// Free-form agent version (e.g. the crate version).
    pub agent_version: String,
    /// Bitset of [`crate::caps`].
    pub capabilities: u64,
}

/// Payload of [`Message::Sync`]. The agent applies the fields in this order
/// and stops at the first that fails (see the crate docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncRequest {
    /// The host's `CLOCK_REALTIME` when it sent the message, in nanoseconds
    /// since the Unix epoch; the agent sets the guest's clock to it. 0 leaves
    /// the guest clock alone.
    pub realtime_ns: u64,
    /// Fresh random bytes from the host, mixed into the guest kernel's
    /// entropy pool (credited as `8 * len` bits) before a forced CRNG reseed.
    /// Empty = none. At most [`crate::MAX_SYNC_ENTROPY`] bytes: a longer field
    /// does not decode (the encoder does not check; the receiver refuses it).
    pub entropy: Vec<u8>,
    /// Variables set for every command the agent runs from now on, replacing
    /// those of an earlier `Sync`: applied after [`RunRequest::clear_env`]
    /// and before [`RunRequest::env`], which overrides them.
    pub env: Vec<(String, String)>,
}

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `/bin/sh -c SCRIPT`.
    Shell(String),
    /// Execute `program` (looked up in `PATH` if it has no `/`) with `args`
    /// (not including argv\[0\]).
    Exec {
        /// The program.
        program: String,
        /// The arguments after argv\[0\].
        args: Vec<String>,
    },
}

/// Payload of [`Message::Run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRequest {
    /// What to run.
    pub command: Command,
    /// Variables to set (after clearing, if `clear_env`).
    pub env: Vec<(String, String)>,
    /// Start from an empty environment instead of the agent's.
    pub clear_env: bool,
    /// Working directory; the agent's (`/` as PID 1) if none.
    pub cwd: Option<String>,
    /// Kill the whole process group after this many milliseconds; 0 = never.
    pub timeout_ms: u64,
    /// Most stdout bytes to return (buffered: clamped to
    /// [`crate::MAX_BUFFERED_OUTPUT`]); the rest is read and discarded.
    /// Streamed, `u32::MAX` means no limit.
    pub stdout_limit: u32,
    /// Most stderr bytes to return, as for `stdout_limit`.
    pub stderr_limit: u32,
    /// Send output as [`Message::Stdout`]/[`Message::Stderr`] chunks as it
    /// comes instead of in [`ExitInfo`].
    pub stream: bool,
    /// Give the command a stdin pipe fed by [`Message::Stdin`]; otherwise its
    /// stdin is `/dev/null`. (A PTY command always has its terminal as stdin.)
    pub stdin: bool,
    /// Run as this guest user (a name in the guest's `/etc/passwd`): its uid,
    /// primary gid and supplementary groups (from `/etc/group`), with `HOME`,
    /// `USER` and `LOGNAME` set from its passwd entry. `None` = as the agent
    /// (root). An unknown user fails the request with
    /// [`ErrorCode::UNKNOWN_USER`].
    pub user: Option<String>,
    /// Run on a new pseudo-terminal of this size instead of pipes: the
    /// process leads a new session with the terminal as its controlling
    /// terminal and as stdin, stdout and stderr; everything it prints comes as
    /// [`Message::Stdout`]. `None` = pipes.
    pub pty: Option<WindowSize>,
}

impl RunRequest {
    /// A buffered shell command with no timeout, 1 MiB limits, no stdin.
    pub fn shell(script: impl Into<String>) -> RunRequest {
        RunRequest {
            command: Command::Shell(script.into()),
            env: Vec::new(),
            clear_env: false,
            cwd: None,
            timeout_ms: 0,
            stdout_limit: 1024 * 1024,
            stderr_limit: 1024 * 1024,
            stream: false,
            stdin: false,
            user: None,
            pty: None,
        }
    }
}

/// A terminal's size, in character cells ([`RunRequest::pty`], [`Message::Resize`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WindowSize {
    /// Rows (lines).
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// One process of [`Message::ProcessList`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessEntry {
    /// Its pid (and process group id) in the guest.
    pub pid: u32,
    /// What was run: the shell script, or the program and its arguments
    /// joined by spaces.
    pub command: String,
    /// When the agent started it, by the guest's wall clock, in milliseconds
    /// since the Unix epoch.
    pub started_at_unix_ms: u64,
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
}

/// Payload of [`Message::Exit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// How the command's main process ended.
    pub status: ExitStatus,
    /// Microseconds from spawn to the end of output collection.
    pub duration_us: u64,
    /// Whether the agent killed it because `timeout_ms` passed.
    pub timed_out: bool,
    /// Whether stdout went past its limit (the excess was discarded).
    pub stdout_truncated: bool,
    /// Whether stderr went past its limit (the excess was discarded).
    pub stderr_truncated: bool,
    /// Buffered stdout (empty when streamed).
    pub stdout: Vec<u8>,
    /// Buffered stderr (empty when streamed).
    pub stderr: Vec<u8>,
}

/// Error code of [`Message::Error`]. Unknown codes are kept as they are, so
/// newer peers can add codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// A frame's payload did not decode, or the stream lost framing (id 0).
    pub const MALFORMED: ErrorCode = ErrorCode(1);
    /// A frame's kind is unknown to the receiver.
    pub const UNKNOWN_KIND: ErrorCode = ErrorCode(2);
    /// A message that the receiver does not accept in this direction or state.
    pub const UNEXPECTED: ErrorCode = ErrorCode(3);
    /// The id names no running request.
    pub const UNKNOWN_REQUEST: ErrorCode = ErrorCode(4);
    /// The id is already used by a running request.
    pub const DUPLICATE_REQUEST: ErrorCode = ErrorCode(5);
    /// The command could not be spawned.
    pub const SPAWN_FAILED: ErrorCode = ErrorCode(6);
    /// An I/O operation failed (file requests, signal delivery).
    pub const IO: ErrorCode = ErrorCode(7);
    /// The host refuses the agent's protocol version (sent on id 0).
    pub const VERSION_MISMATCH: ErrorCode = ErrorCode(8);
    /// An argument is out of range (bad signal number, oversized read).
    pub const INVALID_ARGUMENT: ErrorCode = ErrorCode(9);
    /// The feature is not supported by this peer.
    pub const UNSUPPORTED: ErrorCode = ErrorCode(10);
    /// A bug or resource exhaustion in the peer.
    pub const INTERNAL: ErrorCode = ErrorCode(11);
    /// A signal could not be delivered to the command's process group.
    pub const SIGNAL_FAILED: ErrorCode = ErrorCode(12);
    /// [`Message::Attach`] named a process the agent does not track.
    pub const NO_SUCH_PROCESS: ErrorCode = ErrorCode(13);
    /// The process of this request was attached by another request
    /// ([`Message::Attach`]), which receives its output and exit from now on.
    pub const DETACHED: ErrorCode = ErrorCode(14);
    /// [`RunRequest::user`] names no user of the guest.
    pub const UNKNOWN_USER: ErrorCode = ErrorCode(15);

    // File-system errors of file requests: 32..=47, one per `errno` family
    // that callers tell apart; any other failure is [`ErrorCode::IO`].

    /// No such file or directory (`ENOENT`).
    pub const NOT_FOUND: ErrorCode = ErrorCode(32);
    /// A directory where a file was expected (`EISDIR`).
    pub const IS_A_DIRECTORY: ErrorCode = ErrorCode(33);
    /// A path component that is not a directory (`ENOTDIR`).
    pub const NOT_A_DIRECTORY: ErrorCode = ErrorCode(34);
    /// Permission denied or read-only file system (`EACCES`, `EPERM`, `EROFS`).
    pub const PERMISSION_DENIED: ErrorCode = ErrorCode(35);
    /// No space or quota left on the file system (`ENOSPC`, `EDQUOT`).
    pub const NO_SPACE: ErrorCode = ErrorCode(36);
    /// The path exists already (`EEXIST`).
    pub const ALREADY_EXISTS: ErrorCode = ErrorCode(37);
    /// A directory that is not empty (`ENOTEMPTY`).
    pub const DIRECTORY_NOT_EMPTY: ErrorCode = ErrorCode(38);

    /// Whether an `Error` with this code ends the request it is sent on.
    ///
    /// Advisory codes ([`ErrorCode::UNEXPECTED`],
    /// [`ErrorCode::UNKNOWN_REQUEST`], [`ErrorCode::DUPLICATE_REQUEST`],
    /// [`ErrorCode::INVALID_ARGUMENT`], [`ErrorCode::SIGNAL_FAILED`]) only
    /// refuse one message (a `Stdin`, a `Signal`, a second `Run` on a busy id)
    /// while the request, if any, goes on to its own end. Every other code,
    /// unknown codes included, ends the request.
    pub fn ends_request(self) -> bool {
        !matches!(
            self,
            ErrorCode::UNEXPECTED
                | ErrorCode::UNKNOWN_REQUEST
                | ErrorCode::DUPLICATE_REQUEST
                | ErrorCode::INVALID_ARGUMENT
                | ErrorCode::SIGNAL_FAILED
        )
    }
}

/// Payload of [`Message::Error`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

/// Payload of [`Message::WriteFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFile {
    /// Absolute path in the guest; created if missing.
    pub path: String,
    /// Permission bits used when the file is created (e.g. `0o644`).
    pub mode: u32,
    /// Truncate the file before writing (first chunk of a whole-file write).
    pub truncate: bool,
    /// Append instead of writing at offset 0 (later chunks).
    pub append: bool,
    /// The bytes to write.
    pub data: Vec<u8>,
}

/// Type of a [`DirEntry`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FileType {
    /// Regular file.
    File = 0,
    /// Directory.
    Dir = 1,
    /// Symbolic link (not followed).
    Symlink = 2,
    /// Anything else (device, fifo, socket).
    Other = 3,
}

/// Payload of [`Message::SetAttr`]. The owner is changed first (which may
/// clear set-user-id bits), then the mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAttr {
    /// Absolute path in the guest.
    pub path: String,
    /// New permission bits (`0o7777` at most), if any.
    pub mode: Option<u32>,
    /// New owner user id, if any.
    pub uid: Option<u32>,
    /// New owner group id, if any.
    pub gid: Option<u32>,
}

/// One entry of [`Message::Entries`]: what `lstat(2)` says about a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// The entry's path relative to the [`Message::Stat`] request's path,
    /// components separated by `/` (lossily converted to UTF-8); empty for
    /// the request's path itself (depth 0).
    pub path: String,
    /// Entry type (a symbolic link is not followed).
    pub file_type: FileType,
    /// Size in bytes (of the link itself for symlinks).
    pub size: u64,
    /// `st_mode`: permission and type bits.
    pub mode: u32,
    /// Owner user id.
    pub uid: u32,
    /// Owner group id.
    pub gid: u32,
    /// Last modification, milliseconds since the Unix epoch (negative before it).
    pub modified_ms: i64,
    /// Where a symbolic link points (lossily converted to UTF-8); `None` for
    /// anything else.
    pub symlink_target: Option<String>,
}

/// One entry of [`Message::DirListing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// File name (lossily converted to UTF-8).
    pub name: String,
    /// Entry type.
    pub file_type: FileType,
    /// Size in bytes (of the link itself for symlinks).
    pub size: u64,
    /// `st_mode` permission and type bits.
    pub mode: u32,
}
