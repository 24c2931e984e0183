//! Encoding and decoding of frames and payloads.

use alloc::string::String;
use alloc::vec::Vec;

use crate::message::{
    Command, DirEntry, ErrorCode, ErrorInfo, ExitInfo, ExitStatus, FileInfo, FileType, Hello, Kind,
    Message, ProcessEntry, RunRequest, SetAttr, SyncRequest, WindowSize, WriteFile,
};
use crate::{
    DecodeError, EncodeError, Frame, PayloadError, HEADER_LEN, MAX_FRAME_LEN, MAX_PAYLOAD_LEN,
    MAX_SYNC_ENTROPY,
};

/// Encodes `message` as one frame with request id `id`.
///
/// The result is always a well-formed frame header, but a message whose payload
/// exceeds [`MAX_PAYLOAD_LEN`] produces a frame every decoder rejects as
/// [`DecodeError::BadLength`]. Use [`try_encode`] when the size is not known
/// to be bounded.
pub fn encode(message: &Message, id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    encode_unchecked(message, id, &mut out);
    out
}

/// Encodes `message` as one frame with request id `id`, failing if the payload
/// exceeds [`MAX_PAYLOAD_LEN`].
pub fn try_encode(message: &Message, id: u32) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(message, id, &mut out)?;
    Ok(out)
}

/// Appends the frame for `message` to `out`. On error `out` is left as it was.
pub fn encode_into(message: &Message, id: u32, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    let payload_len = encode_unchecked(message, id, out);
    if payload_len > MAX_PAYLOAD_LEN {
        out.truncate(start);
        return Err(EncodeError::TooLarge { len: payload_len });
    }
    Ok(())
}

/// Bytes in front of the data of a `Stdout`, `Stderr` or `FileData` frame: the header and
/// the data's length. See [`finish_output`] and [`finish_file_data`].
pub const DATA_FRAME_PREFIX_LEN: usize = HEADER_LEN + 4;

/// Turns `frame` into the [`Message::Stdout`] (or, with `stderr`, [`Message::Stderr`]) frame
/// of request `id`, in place: `frame` holds [`DATA_FRAME_PREFIX_LEN`] bytes of any value
/// (overwritten) and then the data. The result is the same bytes as [`encode`] of that
/// message, without copying the data (the agent reads a process's output straight into the
/// frame it sends).
///
/// Fails, leaving `frame` as it was, when `frame` is shorter than the prefix or its data is
/// longer than a payload may be.
pub fn finish_output(frame: &mut [u8], id: u32, stderr: bool) -> Result<(), EncodeError> {
    let kind = if stderr { Kind::Stderr } else { Kind::Stdout };
    write_data_prefix(frame, kind, id, 0)
}

/// Turns `frame` into the [`Message::FileData`] frame of request `id`, in place, as
/// [`finish_output`] does; the `eof` flag is appended.
pub fn finish_file_data(frame: &mut Vec<u8>, id: u32, eof: bool) -> Result<(), EncodeError> {
    write_data_prefix(frame, Kind::FileData, id, 1)?;
    frame.push(u8::from(eof));
    Ok(())
}

/// Writes the prefix of a frame of `kind` whose payload is the data after the prefix of
/// `frame` followed by `trailer` more bytes (not in `frame` yet).
fn write_data_prefix(
    frame: &mut [u8],
    kind: Kind,
    id: u32,
    trailer: usize,
) -> Result<(), EncodeError> {
    let Some(data_len) = frame.len().checked_sub(DATA_FRAME_PREFIX_LEN) else {
        return Err(EncodeError::NoPrefix { len: frame.len() });
    };
    // The data, its length field and the trailer.
    let payload_len = data_len + 4 + trailer;
    if payload_len > MAX_PAYLOAD_LEN {
        return Err(EncodeError::TooLarge { len: payload_len });
    }
    // Both fit in u32: the payload is at most MAX_PAYLOAD_LEN.
    let frame_len = (payload_len + 5) as u32;
    frame[..4].copy_from_slice(&frame_len.to_le_bytes());
    frame[4] = kind as u8;
    frame[5..HEADER_LEN].copy_from_slice(&id.to_le_bytes());
    frame[HEADER_LEN..DATA_FRAME_PREFIX_LEN].copy_from_slice(&(data_len as u32).to_le_bytes());
    Ok(())
}

/// Appends the frame and returns the payload length.
fn encode_unchecked(message: &Message, id: u32, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(message.kind() as u8);
    out.extend_from_slice(&id.to_le_bytes());
    encode_payload(message, &mut Enc(out));
    let payload_len = out.len() - start - HEADER_LEN;
    // Saturate: a payload over 4 GiB gets a length field every decoder rejects.
    let len = u32::try_from(payload_len + 5).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    payload_len
}

struct Enc<'a>(&'a mut Vec<u8>);

impl Enc<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    fn len(&mut self, n: usize) {
        // Lengths over u32::MAX cannot be represented; the payload is then
        // over MAX_PAYLOAD_LEN anyway and rejected by `encode_into`.
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn bytes(&mut self, v: &[u8]) {
        self.len(v.len());
        self.0.extend_from_slice(v);
    }
    fn str(&mut self, v: &str) {
        self.bytes(v.as_bytes());
    }
    fn window(&mut self, w: WindowSize) {
        self.u16(w.rows);
        self.u16(w.cols);
    }
    /// `option<u32>`.
    fn opt_u32(&mut self, v: Option<u32>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.u32(v);
            }
        }
    }
    /// `option<string>`.
    fn opt_str(&mut self, v: Option<&str>) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                self.str(v);
            }
        }
    }
    /// `list<(string, string)>`.
    fn env(&mut self, v: &[(String, String)]) {
        self.len(v.len());
        for (k, val) in v {
            self.str(k);
            self.str(val);
        }
    }
}

fn encode_payload(message: &Message, e: &mut Enc<'_>) {
    match message {
        Message::Hello(h) => {
            e.u32(h.protocol_version);
            e.str(&h.agent_version);
            e.u64(h.capabilities);
        }
        Message::Ping(d) | Message::Pong(d) | Message::Stdin(d) => e.bytes(d),
        Message::Stdout(d) | Message::Stderr(d) => e.bytes(d),
        Message::Error(err) => {
            e.u16(err.code.0);
            e.str(&err.message);
        }
        Message::Ack | Message::CloseStdin | Message::Hold | Message::Release => {}
        Message::Sync(s) => {
            e.u64(s.realtime_ns);
            e.bytes(&s.entropy);
            e.env(&s.env);
        }
        Message::Run(r) => {
            match &r.command {
                Command::Shell(s) => {
                    e.u8(0);
                    e.str(s);
                }
                Command::Exec { program, args } => {
                    e.u8(1);
                    e.str(program);
                    e.len(args.len());
                    for a in args {
                        e.str(a);
                    }
                }
            }
            e.env(&r.env);
            e.bool(r.clear_env);
            e.opt_str(r.cwd.as_deref());
            e.u64(r.timeout_ms);
            e.u32(r.stdout_limit);
            e.u32(r.stderr_limit);
            e.bool(r.stream);
            e.bool(r.stdin);
            e.opt_str(r.user.as_deref());
            match r.pty {
                None => e.u8(0),
                Some(w) => {
                    e.u8(1);
                    e.window(w);
                }
            }
        }
        Message::Signal { sig } => e.i32(*sig),
        Message::Resize(w) => e.window(*w),
        Message::ListProcesses => {}
        Message::Attach { pid } => e.u32(*pid),
        Message::Credit { bytes } => e.u32(*bytes),
        Message::ChannelTest { len, to_agent } => {
            e.u64(*len);
            e.bool(*to_agent);
        }
        Message::ProcessList(list) => {
            e.len(list.len());
            for p in list {
                e.u32(p.pid);
                e.str(&p.command);
                e.u64(p.started_at_unix_ms);
            }
        }
        Message::Started { pid } => e.u32(*pid),
        Message::Exit(x) => {
            match x.status {
                ExitStatus::Code(c) => {
                    e.u8(0);
                    e.i32(c);
                }
                ExitStatus::Signal(s) => {
                    e.u8(1);
                    e.i32(s);
                }
            }
            e.u64(x.duration_us);
            e.bool(x.timed_out);
            e.bool(x.stdout_truncated);
            e.bool(x.stderr_truncated);
            e.bytes(&x.stdout);
            e.bytes(&x.stderr);
        }
        Message::ReadFile { path, offset, len } => {
            e.str(path);
            e.u64(*offset);
            e.u32(*len);
        }
        Message::WriteFile(w) => {
            e.str(&w.path);
            e.u32(w.mode);
            e.bool(w.truncate);
            e.bool(w.append);
            e.bytes(&w.data);
        }
        Message::ListDir { path } => e.str(path),
        Message::FileData { data, eof } => {
            e.bytes(data);
            e.bool(*eof);
        }
        Message::DirListing { entries, truncated } => {
            e.len(entries.len());
            for d in entries {
                e.str(&d.name);
                e.u8(d.file_type as u8);
                e.u64(d.size);
                e.u32(d.mode);
            }
            e.bool(*truncated);
        }
        Message::Stat { path, depth } => {
            e.str(path);
            e.u32(*depth);
        }
        Message::Remove { path, recursive } => {
            e.str(path);
            e.bool(*recursive);
        }
        Message::MakeDir {
            path,
            mode,
            parents,
        } => {
            e.str(path);
            e.u32(*mode);
            e.bool(*parents);
        }
        Message::Rename { from, to } => {
            e.str(from);
            e.str(to);
        }
        Message::SetAttr(a) => {
            e.str(&a.path);
            e.opt_u32(a.mode);
            e.opt_u32(a.uid);
            e.opt_u32(a.gid);
        }
        Message::Entries { entries, more } => {
            e.len(entries.len());
            for f in entries {
                e.str(&f.path);
                e.u8(f.file_type as u8);
                e.u64(f.size);
                e.u32(f.mode);
                e.u32(f.uid);
                e.u32(f.gid);
                e.i64(f.modified_ms);
                e.opt_str(f.symlink_target.as_deref());
            }
            e.bool(*more);
        }
    }
}

/// Decodes one frame from the start of `bytes`.
///
/// Returns `Ok(None)` if `bytes` does not yet hold a whole frame, otherwise
/// the frame and the number of bytes it used. On a non-fatal error (unknown
/// kind, malformed payload) the frame's extent is still known: skip
/// `HEADER_LEN - 5 + len` bytes, as [`crate::FrameDecoder`] does.
pub fn decode_frame(bytes: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(len_bytes) = bytes.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let len_usize = usize::try_from(len).map_err(|_| DecodeError::BadLength { len })?;
    if !(5..=MAX_FRAME_LEN).contains(&len_usize) {
        return Err(DecodeError::BadLength { len });
    }
    let total = 4 + len_usize;
    let Some(frame) = bytes.get(..total) else {
        return Ok(None);
    };
    let kind = frame[4];
    let id = u32::from_le_bytes([frame[5], frame[6], frame[7], frame[8]]);
    let message = decode_payload(kind, id, &frame[HEADER_LEN..])?;
    Ok(Some((Frame { id, message }, total)))
}

/// Decodes the payload of a frame with kind byte `kind` and request id `id`
/// (the id is only used in errors).
pub fn decode_payload(kind: u8, id: u32, payload: &[u8]) -> Result<Message, DecodeError> {
    let Some(k) = Kind::from_u8(kind) else {
        return Err(DecodeError::UnknownKind { kind, id });
    };
    let mut d = Dec(payload);
    let message = decode_kind(k, &mut d).and_then(|m| {
        if d.0.is_empty() {
            Ok(m)
        } else {
            Err(PayloadError::TrailingBytes(d.0.len()))
        }
    });
    message.map_err(|reason| DecodeError::Malformed {
        kind: k,
        id,
        reason,
    })
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        if n > self.0.len() {
            return Err(PayloadError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], PayloadError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, PayloadError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, PayloadError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, PayloadError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, PayloadError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn i32(&mut self) -> Result<i32, PayloadError> {
        Ok(i32::from_le_bytes(self.array()?))
    }
    fn i64(&mut self) -> Result<i64, PayloadError> {
        Ok(i64::from_le_bytes(self.array()?))
    }
    /// `option<T>`: a tag byte, then `T` if it is 1.
    fn option<T>(
        &mut self,
        item: impl FnOnce(&mut Self) -> Result<T, PayloadError>,
    ) -> Result<Option<T>, PayloadError> {
        match self.u8()? {
            0 => Ok(None),
            1 => item(self).map(Some),
            t => Err(PayloadError::InvalidTag(t)),
        }
    }
    fn file_type(&mut self) -> Result<FileType, PayloadError> {
        Ok(match self.u8()? {
            0 => FileType::File,
            1 => FileType::Dir,
            2 => FileType::Symlink,
            3 => FileType::Other,
            t => return Err(PayloadError::InvalidTag(t)),
        })
    }
    fn bool(&mut self) -> Result<bool, PayloadError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(PayloadError::InvalidBool(b)),
        }
    }
    /// A `u32` count or length; never trusted for allocation beyond what the
    /// remaining payload can hold.
    fn count(&mut self) -> Result<usize, PayloadError> {
        usize::try_from(self.u32()?).map_err(|_| PayloadError::Truncated)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, PayloadError> {
        let n = self.count()?;
        Ok(self.take(n)?.to_vec())
    }
    /// `bytes` of at most `max` bytes; the length is checked before the
    /// bytes are taken.
    fn bytes_max(&mut self, max: usize) -> Result<Vec<u8>, PayloadError> {
        let n = self.count()?;
        if n > max {
            return Err(PayloadError::TooLong { len: n, max });
        }
        Ok(self.take(n)?.to_vec())
    }
    fn string(&mut self) -> Result<String, PayloadError> {
        let n = self.count()?;
        let raw = self.take(n)?;
        core::str::from_utf8(raw)
            .map(String::from)
            .map_err(|_| PayloadError::InvalidUtf8)
    }
    /// `option<string>`.
    fn opt_string(&mut self) -> Result<Option<String>, PayloadError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.string()?)),
            t => Err(PayloadError::InvalidTag(t)),
        }
    }
    fn window(&mut self) -> Result<WindowSize, PayloadError> {
        Ok(WindowSize {
            rows: self.u16()?,
            cols: self.u16()?,
        })
    }
    /// `list<(string, string)>`: each item is at least two empty strings.
    fn env(&mut self) -> Result<Vec<(String, String)>, PayloadError> {
        self.list(8, |d| Ok((d.string()?, d.string()?)))
    }
    /// Decodes a list whose items take at least `min_item` bytes each. The
    /// count is checked against the remaining bytes before anything is
    /// allocated, so a lying count cannot cause a large allocation.
    fn list<T>(
        &mut self,
        min_item: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, PayloadError>,
    ) -> Result<Vec<T>, PayloadError> {
        let n = self.count()?;
        if n > self.0.len() / min_item {
            return Err(PayloadError::Truncated);
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(item(self)?);
        }
        Ok(out)
    }
}

fn decode_kind(kind: Kind, d: &mut Dec<'_>) -> Result<Message, PayloadError> {
    Ok(match kind {
        Kind::Hello => Message::Hello(Hello {
            protocol_version: d.u32()?,
            agent_version: d.string()?,
            capabilities: d.u64()?,
        }),
        Kind::Ping => Message::Ping(d.bytes()?),
        Kind::Pong => Message::Pong(d.bytes()?),
        Kind::Error => Message::Error(ErrorInfo {
            code: ErrorCode(d.u16()?),
            message: d.string()?,
        }),
        Kind::Ack => Message::Ack,
        Kind::Hold => Message::Hold,
        Kind::Release => Message::Release,
        Kind::Sync => Message::Sync(SyncRequest {
            realtime_ns: d.u64()?,
            entropy: d.bytes_max(MAX_SYNC_ENTROPY)?,
            env: d.env()?,
        }),
        Kind::Run => {
            let command = match d.u8()? {
                0 => Command::Shell(d.string()?),
                1 => {
                    let program = d.string()?;
                    let args = d.list(4, Dec::string)?;
                    Command::Exec { program, args }
                }
                t => return Err(PayloadError::InvalidTag(t)),
            };
            Message::Run(RunRequest {
                command,
                env: d.env()?,
                clear_env: d.bool()?,
                cwd: d.opt_string()?,
                timeout_ms: d.u64()?,
                stdout_limit: d.u32()?,
                stderr_limit: d.u32()?,
                stream: d.bool()?,
                stdin: d.bool()?,
                user: d.opt_string()?,
                pty: match d.u8()? {
                    0 => None,
                    1 => Some(d.window()?),
                    t => return Err(PayloadError::InvalidTag(t)),
                },
            })
        }
        Kind::Stdin => Message::Stdin(d.bytes()?),
        Kind::CloseStdin => Message::CloseStdin,
        Kind::Signal => Message::Signal { sig: d.i32()? },
        Kind::Resize => Message::Resize(d.window()?),
        Kind::ListProcesses => Message::ListProcesses,
        Kind::Attach => Message::Attach { pid: d.u32()? },
        Kind::Credit => Message::Credit { bytes: d.u32()? },
        Kind::ChannelTest => Message::ChannelTest {
            len: d.u64()?,
            to_agent: d.bool()?,
        },
        // An entry is at least a pid, an empty command and a time: 16 bytes.
        Kind::ProcessList => Message::ProcessList(d.list(16, |d| {
            Ok(ProcessEntry {
                pid: d.u32()?,
                command: d.string()?,
                started_at_unix_ms: d.u64()?,
            })
        })?),
        Kind::Started => Message::Started { pid: d.u32()? },
        Kind::Stdout => Message::Stdout(d.bytes()?),
        Kind::Stderr => Message::Stderr(d.bytes()?),
        Kind::Exit => {
            let status = match d.u8()? {
                0 => ExitStatus::Code(d.i32()?),
                1 => ExitStatus::Signal(d.i32()?),
                t => return Err(PayloadError::InvalidTag(t)),
            };
            Message::Exit(ExitInfo {
                status,
                duration_us: d.u64()?,
                timed_out: d.bool()?,
                stdout_truncated: d.bool()?,
                stderr_truncated: d.bool()?,
                stdout: d.bytes()?,
                stderr: d.bytes()?,
            })
        }
        Kind::ReadFile => Message::ReadFile {
            path: d.string()?,
            offset: d.u64()?,
            len: d.u32()?,
        },
        Kind::WriteFile => Message::WriteFile(WriteFile {
            path: d.string()?,
            mode: d.u32()?,
            truncate: d.bool()?,
            append: d.bool()?,
            data: d.bytes()?,
        }),
        Kind::ListDir => Message::ListDir { path: d.string()? },
        Kind::FileData => Message::FileData {
            data: d.bytes()?,
            eof: d.bool()?,
        },
        Kind::DirListing => {
            let entries = d.list(17, |d| {
                Ok(DirEntry {
                    name: d.string()?,
                    file_type: d.file_type()?,
                    size: d.u64()?,
                    mode: d.u32()?,
                })
            })?;
            Message::DirListing {
                entries,
                truncated: d.bool()?,
            }
        }
        Kind::Stat => Message::Stat {
            path: d.string()?,
            depth: d.u32()?,
        },
        Kind::Remove => Message::Remove {
            path: d.string()?,
            recursive: d.bool()?,
        },
        Kind::MakeDir => Message::MakeDir {
            path: d.string()?,
            mode: d.u32()?,
            parents: d.bool()?,
        },
        Kind::Rename => Message::Rename {
            from: d.string()?,
            to: d.string()?,
        },
        Kind::SetAttr => Message::SetAttr(SetAttr {
            path: d.string()?,
            mode: d.option(Dec::u32)?,
            uid: d.option(Dec::u32)?,
            gid: d.option(Dec::u32)?,
        }),
        Kind::Entries => {
            // path (4) + type (1) + size (8) + mode, uid, gid (12) + modified (8) + tag (1)
            let entries = d.list(34, |d| {
                Ok(FileInfo {
                    path: d.string()?,
                    file_type: d.file_type()?,
                    size: d.u64()?,
                    mode: d.u32()?,
                    uid: d.u32()?,
                    gid: d.u32()?,
                    modified_ms: d.i64()?,
                    symlink_target: d.option(Dec::string)?,
                })
            })?;
            Message::Entries {
                entries,
                more: d.bool()?,
            }
        }
    })
}
