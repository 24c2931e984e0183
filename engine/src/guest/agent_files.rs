//! File operations over an [`AgentLink`]: the requests behind [`crate::Files`].
//!
//! - **Bounded transfers.** Reads and writes go in chunks of [`CHUNK`] bytes (the protocol's
//!   `MAX_CHUNK_LEN`), at most [`IN_FLIGHT`] requests at a time: the host holds a few chunks,
//!   never a whole file, whatever its size. A read starts with one request and opens the
//!   window once the file proves longer than a chunk, so small files cost one round trip.
//!   The agent applies `WriteFile`s in arrival order, so a file's chunks are pipelined
//!   (`truncate`, then `append`).
//! - **Atomic writes.** A file is written under a temporary name in its directory
//!   (`.NAME.capsule-RANDOM.tmp`), given its mode and owner, then renamed over the final
//!   name: the final name shows the old contents or the new, never a part (a capsule paused
//!   or a transfer failed midway leaves at most the temporary file, removed on failure when
//!   the guest is still reachable). A file that is replaced keeps its mode and owner unless
//!   the options say otherwise; a symbolic link is followed (its target is replaced, the
//!   link stays). Where a temporary file cannot be created beside an existing file (a
//!   read-only directory, `/proc`, `/sys`), or the path is a device, FIFO or socket, the
//!   file is written in place instead. No `fsync`: a capsule's state is its memory, page
//!   cache included, which a pause saves whole.
//! - **Errors** name the guest path the caller gave: the agent's file-system codes become
//!   [`Error::File`] with a [`FileErrorKind`]; a link that closes (the capsule was paused,
//!   stopped or crashed) is [`FilesError::Closed`], for the caller to explain with the
//!   capsule's status.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use capsule_agent_protocol::{
    ErrorCode, ErrorInfo, FileInfo, FileType, Message, SetAttr, WriteFile, MAX_CHUNK_LEN,
};
use crossbeam_channel::Receiver;

use super::agent_link::{AgentLink, LinkError};
use crate::error::{Error, TimeoutKind};
use crate::model::{CapsuleId, EntryInfo, EntryKind, FileErrorKind, WriteOptions};

/// Bytes per `ReadFile`/`WriteFile` request.
pub(crate) const CHUNK: usize = MAX_CHUNK_LEN;

/// Most chunk requests of one transfer in flight at once.
pub(crate) const IN_FLIGHT: usize = 4;

/// Mode of a new file when neither the options nor a replaced file give one.
const DEFAULT_FILE_MODE: u32 = 0o644;

/// Mode of the directories [`GuestFiles::make_dir`] and a write create.
const DIR_MODE: u32 = 0o755;

/// Symbolic links a write follows before giving up (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// Why a file operation failed.
#[derive(Debug)]
pub(crate) enum FilesError {
    /// The agent's link closed: the capsule was paused, stopped or crashed meanwhile.
    Closed,
    /// Anything else, as the error to report.
    Failed(Error),
}

impl From<Error> for FilesError {
    fn from(e: Error) -> Self {
        FilesError::Failed(e)
    }
}

/// A file operation's result.
pub(crate) type FilesResult<T> = std::result::Result<T, FilesError>;

/// One request in flight; its id is released when dropped (replies arriving later are
/// dropped by the link).
struct Pending<'a> {
    link: &'a AgentLink,
    id: u32,
    replies: Receiver<Message>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.link.close_request(self.id);
    }
}

/// Where the bytes of a write go.
enum Destination {
    /// A temporary file, renamed over `target` at the end.
    Temporary { temp: String, target: String },
    /// The file itself.
    InPlace(String),
}

impl Destination {
    fn path(&self) -> &str {
        match self {
            Destination::Temporary { temp, .. } => temp,
            Destination::InPlace(path) => path,
        }
    }
}

/// File operations on one capsule's agent.
pub(crate) struct GuestFiles<'a> {
    link: &'a AgentLink,
    capsule: &'a CapsuleId,
    /// How long to wait for each reply.
    timeout: Duration,
}

impl<'a> GuestFiles<'a> {
    pub(crate) fn new(link: &'a AgentLink, capsule: &'a CapsuleId, timeout: Duration) -> Self {
        GuestFiles {
            link,
            capsule,
            timeout,
        }
    }

    /// What `path` is (a final symbolic link is not followed).
    pub(crate) fn stat(&self, path: &str) -> FilesResult<EntryInfo> {
        let entries = self.entries(path, 0)?;
        match <[FileInfo; 1]>::try_from(entries) {
            Ok([info]) if info.path.is_empty() => Ok(entry(path, info)),
            Ok(_) | Err(_) => Err(self.protocol("a Stat of depth 0 must answer one entry")),
        }
    }

    /// Whether `path` exists (a dangling symbolic link does).
    pub(crate) fn exists(&self, path: &str) -> FilesResult<bool> {
        match self.stat(path) {
            Ok(_) => Ok(true),
            Err(FilesError::Failed(Error::File {
                kind: FileErrorKind::NotFound | FileErrorKind::NotADirectory,
                ..
            })) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The entries below the directory `path`, down to `depth` levels (at least 1).
    pub(crate) fn list(&self, path: &str, depth: u32) -> FilesResult<Vec<EntryInfo>> {
        Ok(self
            .entries(path, depth)?
            .into_iter()
            .map(|info| entry(path, info))
            .collect())
    }

    /// Creates the directory `path` and its missing parents (an existing one is fine).
    pub(crate) fn make_dir(&self, path: &str) -> FilesResult<()> {
        self.ack(
            &Message::MakeDir {
                path: path.into(),
                mode: DIR_MODE,
                parents: true,
            },
            path,
        )
    }

    /// Removes `path`: a file, a link (not what it points to), or a directory with
    /// everything in it.
    pub(crate) fn remove(&self, path: &str) -> FilesResult<()> {
        self.ack(
            &Message::Remove {
                path: path.into(),
                recursive: true,
            },
            path,
        )
    }

    /// Renames `from` to `to`, replacing a file (or empty directory) there.
    pub(crate) fn rename(&self, from: &str, to: &str) -> FilesResult<()> {
        self.ack(
            &Message::Rename {
                from: from.into(),
                to: to.into(),
            },
            from,
        )
    }

    /// Streams the file `path` into `out`; returns the bytes written. `sink` names `out` in
    /// an error writing to it (the guest path if `None`).
    pub(crate) fn read_into(
        &self,
        path: &str,
        out: &mut dyn Write,
        sink: Option<&Path>,
    ) -> FilesResult<u64> {
        let mut in_flight: VecDeque<(Pending<'a>, u64)> = VecDeque::new();
        let mut next_offset = 0u64;
        let mut window = 1;
        let mut total = 0u64;
        loop {
            while in_flight.len() < window {
                let request = Message::ReadFile {
                    path: path.into(),
                    offset: next_offset,
                    len: CHUNK as u32,
                };
                in_flight.push_back((self.start(&request)?, next_offset));
                next_offset += CHUNK as u64;
            }
            let Some((pending, offset)) = in_flight.pop_front() else {
                return Ok(total);
            };
            let reply = self.next(&pending, path)?;
            drop(pending);
            let Message::FileData { data, eof } = reply else {
                return Err(self.unexpected(&reply));
            };
            out.write_all(&data).map_err(|source| Error::Io {
                op: "write what was read from the guest",
                path: sink.map_or_else(|| PathBuf::from(path), Path::to_path_buf),
                source,
            })?;
            total += data.len() as u64;
            if eof || data.is_empty() {
                return Ok(total);
            }
            if data.len() < CHUNK {
                // A short read that is not the end (a file being written meanwhile): the
                // requests in flight asked for the wrong offsets.
                in_flight.clear();
                next_offset = offset + data.len() as u64;
            }
            window = IN_FLIGHT;
        }
    }

    /// Writes everything `input` gives to the file `path`, atomically where the guest
    /// allows (see the module docs), creating missing parent directories; returns the
    /// bytes written. `source` names `input` in an error reading it (the guest path if
    /// `None`).
    pub(crate) fn write_from(
        &self,
        path: &str,
        input: &mut dyn Read,
        options: &WriteOptions,
        source: Option<&Path>,
    ) -> FilesResult<u64> {
        let read_error = |e: std::io::Error| -> FilesError {
            FilesError::Failed(Error::Io {
                op: "read the bytes to write into the guest",
                path: source.map_or_else(|| PathBuf::from(path), Path::to_path_buf),
                source: e,
            })
        };
        let (target, existing) = self.resolve_for_write(path)?;
        let first = read_chunk(input).map_err(read_error)?;
        let mut at_end = first.len() < CHUNK;
        let mut total = first.len() as u64;
        let in_place = existing
            .as_ref()
            .is_some_and(|e| e.kind == EntryKind::Other);
        let mode = options
            .mode
            .or(existing.as_ref().map(|e| e.mode))
            .unwrap_or(DEFAULT_FILE_MODE);
        let destination = if in_place {
            Destination::InPlace(target.clone())
        } else {
            Destination::Temporary {
                temp: temporary_name(&target),
                target: target.clone(),
            }
        };
        let destination = self.create(path, destination, first, mode, existing.is_some())?;

        // Chunks sent and not yet acknowledged.
        let mut acks: VecDeque<Pending<'a>> = VecDeque::new();
        let streamed = (|| -> FilesResult<()> {
            while !at_end {
                let data = read_chunk(input).map_err(read_error)?;
                if data.is_empty() {
                    break;
                }
                at_end = data.len() < CHUNK;
                total += data.len() as u64;
                if acks.len() >= IN_FLIGHT {
                    if let Some(oldest) = acks.pop_front() {
                        self.expect_ack(&oldest, path)?;
                    }
                }
                let chunk = Message::WriteFile(WriteFile {
                    path: destination.path().into(),
                    mode,
                    truncate: false,
                    append: true,
                    data,
                });
                acks.push_back(self.start(&chunk)?);
            }
            while let Some(pending) = acks.pop_front() {
                self.expect_ack(&pending, path)?;
            }
            match &destination {
                Destination::Temporary { temp, target } => {
                    // The replaced file's mode and owner, unless the options say otherwise.
                    let attr = SetAttr {
                        path: temp.clone(),
                        mode: options.mode.or(existing.as_ref().map(|e| e.mode)),
                        uid: options.uid.or(existing.as_ref().map(|e| e.uid)),
                        gid: options.gid.or(existing.as_ref().map(|e| e.gid)),
                    };
                    self.set_attr(attr, path)?;
                    self.ack(
                        &Message::Rename {
                            from: temp.clone(),
                            to: target.clone(),
                        },
                        path,
                    )
                }
                Destination::InPlace(target) => {
                    let attr = SetAttr {
                        path: target.clone(),
                        mode: options.mode,
                        uid: options.uid,
                        gid: options.gid,
                    };
                    self.set_attr(attr, path)
                }
            }
        })();
        match streamed {
            Ok(()) => Ok(total),
            Err(e) => {
                if reachable(&e) {
                    // The chunks still queued in the agent are written first (they would
                    // create the temporary file again); then it is removed.
                    for pending in acks {
                        let _ = self.next(&pending, path);
                    }
                    self.discard(&destination);
                }
                Err(e)
            }
        }
    }

    /// Removes a write's temporary file, if it has one; best effort.
    fn discard(&self, destination: &Destination) {
        if let Destination::Temporary { temp, .. } = destination {
            let _ = self.ack(
                &Message::Remove {
                    path: temp.clone(),
                    recursive: false,
                },
                temp,
            );
        }
    }

    /// Sends the first chunk of a write to `destination`, creating the file: after making
    /// the missing parent directories if the directory does not exist, in place if a
    /// temporary file cannot be created beside an existing file. Returns where the rest goes.
    fn create(
        &self,
        path: &str,
        destination: Destination,
        data: Vec<u8>,
        mode: u32,
        exists: bool,
    ) -> FilesResult<Destination> {
        let mut message = Message::WriteFile(WriteFile {
            path: destination.path().into(),
            mode,
            truncate: true,
            append: false,
            data,
        });
        let failure = match self.ack(&message, path) {
            Ok(()) => return Ok(destination),
            Err(e) => e,
        };
        if reachable(&failure) {
            // It may have been created before the write failed (no space).
            self.discard(&destination);
        }
        let (Destination::Temporary { target, .. }, FilesError::Failed(Error::File { kind, .. })) =
            (&destination, &failure)
        else {
            return Err(failure);
        };
        let next = match kind {
            FileErrorKind::NotFound if !exists => {
                // The directory is missing: make it (and its parents), then try again.
                self.ack(
                    &Message::MakeDir {
                        path: parent(target).into(),
                        mode: DIR_MODE,
                        parents: true,
                    },
                    path,
                )?;
                destination
            }
            // The directory takes no new file (or is not a real one, as in /proc): write
            // the existing file in place.
            FileErrorKind::NotFound | FileErrorKind::PermissionDenied if exists => {
                Destination::InPlace(target.clone())
            }
            _ => return Err(failure),
        };
        if let Message::WriteFile(w) = &mut message {
            w.path = next.path().into();
        }
        self.ack(&message, path)?;
        Ok(next)
    }

    /// Where a write of `path` lands (the path, or what its symbolic links lead to) and
    /// what is there now; a directory there is [`FileErrorKind::IsADirectory`].
    fn resolve_for_write(&self, path: &str) -> FilesResult<(String, Option<EntryInfo>)> {
        let mut target = path.to_string();
        for _ in 0..MAX_LINKS {
            let info = match self.stat(&target) {
                Ok(info) => info,
                Err(FilesError::Failed(Error::File {
                    kind: FileErrorKind::NotFound,
                    ..
                })) => return Ok((target, None)),
                Err(e) => return Err(e),
            };
            match info.kind {
                EntryKind::Directory => {
                    return Err(file_error(
                        path,
                        FileErrorKind::IsADirectory,
                        format!("{target} is a directory"),
                    ))
                }
                EntryKind::Symlink => {
                    let link = info.symlink_target.unwrap_or_default();
                    target = if link.starts_with('/') {
                        link
                    } else {
                        join(parent(&target), &link)
                    };
                }
                _ => return Ok((target, Some(info))),
            }
        }
        Err(file_error(
            path,
            FileErrorKind::Other,
            format!("more than {MAX_LINKS} levels of symbolic links"),
        ))
    }

    fn set_attr(&self, attr: SetAttr, path: &str) -> FilesResult<()> {
        if attr.mode.is_none() && attr.uid.is_none() && attr.gid.is_none() {
            return Ok(());
        }
        self.ack(&Message::SetAttr(attr), path)
    }

    /// The entries of a `Stat` of `path` to `depth`, over as many frames as it takes.
    fn entries(&self, path: &str, depth: u32) -> FilesResult<Vec<FileInfo>> {
        let pending = self.start(&Message::Stat {
            path: path.into(),
            depth,
        })?;
        let mut out = Vec::new();
        loop {
            match self.next(&pending, path)? {
                Message::Entries { entries, more } => {
                    out.extend(entries);
                    if !more {
                        return Ok(out);
                    }
                }
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    /// Sends `message` as a new request.
    fn start(&self, message: &Message) -> FilesResult<Pending<'a>> {
        let (id, replies) = self.link.open_request().map_err(|e| self.link_error(e))?;
        let pending = Pending {
            link: self.link,
            id,
            replies,
        };
        self.link
            .send(message, id)
            .map_err(|e| self.link_error(e))?;
        Ok(pending)
    }

    /// The request's next reply (advisory errors skipped); an error reply becomes the error
    /// about `path`.
    fn next(&self, pending: &Pending<'_>, path: &str) -> FilesResult<Message> {
        // A timeout too long to add to the clock means no deadline.
        let deadline = Instant::now().checked_add(self.timeout);
        loop {
            match AgentLink::next_reply(&pending.replies, deadline) {
                Ok(Message::Error(e)) if e.code.ends_request() => return Err(self.refusal(path, e)),
                Ok(Message::Error(_)) => {}
                Ok(reply) => return Ok(reply),
                Err(e) => return Err(self.link_error(e)),
            }
        }
    }

    /// Sends `message` and expects an `Ack`.
    fn ack(&self, message: &Message, path: &str) -> FilesResult<()> {
        let pending = self.start(message)?;
        self.expect_ack(&pending, path)
    }

    fn expect_ack(&self, pending: &Pending<'_>, path: &str) -> FilesResult<()> {
        match self.next(pending, path)? {
            Message::Ack => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    fn link_error(&self, e: LinkError) -> FilesError {
        match e {
            LinkError::Closed(_) => FilesError::Closed,
            LinkError::Timeout => FilesError::Failed(Error::Timeout {
                kind: TimeoutKind::File,
                after: self.timeout,
            }),
            e @ (LinkError::Agent(_) | LinkError::Refused(_) | LinkError::Protocol(_)) => {
                FilesError::Failed(Error::Agent {
                    id: self.capsule.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// The error for the agent's `Error` reply to a request about `path`.
    fn refusal(&self, path: &str, e: ErrorInfo) -> FilesError {
        let kind = match e.code {
            ErrorCode::NOT_FOUND => FileErrorKind::NotFound,
            ErrorCode::IS_A_DIRECTORY => FileErrorKind::IsADirectory,
            ErrorCode::NOT_A_DIRECTORY => FileErrorKind::NotADirectory,
            ErrorCode::PERMISSION_DENIED => FileErrorKind::PermissionDenied,
            ErrorCode::NO_SPACE => FileErrorKind::NoSpace,
            ErrorCode::ALREADY_EXISTS => FileErrorKind::AlreadyExists,
            ErrorCode::DIRECTORY_NOT_EMPTY => FileErrorKind::DirectoryNotEmpty,
            ErrorCode::IO => FileErrorKind::Other,
            ErrorCode::UNKNOWN_KIND | ErrorCode::UNSUPPORTED => {
                return FilesError::Failed(Error::Unsupported(format!(
                    "the capsule's agent does not serve this file request (an image older than \
                     the engine?): {}",
                    e.message
                )))
            }
            _ => {
                return FilesError::Failed(Error::Agent {
                    id: self.capsule.clone(),
                    reason: format!("{path}: {}", e.message),
                })
            }
        };
        file_error(path, kind, e.message)
    }

    fn unexpected(&self, reply: &Message) -> FilesError {
        self.protocol(&format!(
            "unexpected {:?} in answer to a file request",
            reply.kind()
        ))
    }

    fn protocol(&self, what: &str) -> FilesError {
        FilesError::Failed(Error::Agent {
            id: self.capsule.clone(),
            reason: format!("the agent broke the protocol: {what}"),
        })
    }
}

/// Whether the agent may still be reachable after `e` (not a closed link, not a request
/// that went unanswered).
fn reachable(e: &FilesError) -> bool {
    !matches!(
        e,
        FilesError::Closed | FilesError::Failed(Error::Timeout { .. })
    )
}

fn file_error(path: &str, kind: FileErrorKind, message: String) -> FilesError {
    FilesError::Failed(Error::File {
        path: path.into(),
        kind,
        message,
    })
}

/// Reads up to [`CHUNK`] bytes: fewer only at the end of `input`.
fn read_chunk(input: &mut dyn Read) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    input.take(CHUNK as u64).read_to_end(&mut data)?;
    Ok(data)
}

/// The directory part of an absolute path (`/` for a name in the root).
pub(crate) fn parent(path: &str) -> &str {
    match path.trim_end_matches('/').rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// `rel` below `base`.
fn join(base: &str, rel: &str) -> String {
    if rel.is_empty() {
        base.to_string()
    } else if base.ends_with('/') {
        format!("{base}{rel}")
    } else {
        format!("{base}/{rel}")
    }
}

/// The last component of a path (`/` for the root).
fn name_of(path: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit('/').next() {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => "/".to_string(),
    }
}

/// A fresh temporary name beside `target`: `.NAME.capsule-RANDOM.tmp`, the name shortened
/// so that the whole stays within a file system's 255 bytes.
fn temporary_name(target: &str) -> String {
    let name = name_of(target);
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    let mut random = [0u8; 8];
    if getrandom::fill(&mut random).is_err() {
        // Unique enough without the OS's randomness: the time and a process-wide counter.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        random = (now ^ n.rotate_left(32)).to_le_bytes();
    }
    join(
        parent(target),
        &format!(
            ".{}.capsule-{:016x}.tmp",
            &name[..end],
            u64::from_le_bytes(random)
        ),
    )
}

/// The public description of an entry below (or at) `base`.
fn entry(base: &str, info: FileInfo) -> EntryInfo {
    let path = join(base, &info.path);
    let modified = if info.modified_ms >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_millis(info.modified_ms.unsigned_abs()))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_millis(info.modified_ms.unsigned_abs()))
    };
    EntryInfo {
        name: name_of(&path),
        path,
        kind: match info.file_type {
            FileType::File => EntryKind::File,
            FileType::Dir => EntryKind::Directory,
            FileType::Symlink => EntryKind::Symlink,
            FileType::Other => EntryKind::Other,
        },
        size: info.size,
        mode: info.mode & 0o7777,
        uid: info.uid,
        gid: info.gid,
        modified: modified.unwrap_or(UNIX_EPOCH),
        symlink_target: info.symlink_target,
    }
}
