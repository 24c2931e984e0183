//! File requests: `ReadFile`, `WriteFile`, `ListDir`, `Stat`, `Remove`, `MakeDir`, `Rename`
//! and `SetAttr`.
//!
//! Failures are answered with the [`ErrorCode`] of their `errno` family ([`error_code`]) and
//! the OS's message, prefixed with what was being done.

use std::fs::{self, DirBuilder, File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use capsule_agent_protocol::{
    finish_file_data, DirEntry, ErrorCode, FileInfo, FileType, Message, SetAttr, WriteFile,
    DATA_FRAME_PREFIX_LEN, MAX_CHUNK_LEN, MAX_PAYLOAD_LEN,
};

/// Encoded bytes of entries after which a `Stat` listing sends an `Entries` frame and goes on
/// in the next one.
const ENTRIES_FRAME_BYTES: usize = 256 * 1024;

/// An answer to a file request.
pub enum Reply {
    /// A message, to be encoded as a frame of the request.
    Message(Message),
    /// A whole frame of the request, already encoded (a `ReadFile`'s `FileData`, read straight
    /// into its frame).
    Encoded(Vec<u8>),
}

/// Answers file request `id` through `reply`: once, except a `Stat` listing, which may send
/// several `Entries` frames (and an `Error` after them if it fails). Anything else gets an
/// `UNEXPECTED` error. `WriteFile` is answered here too, but the serving loop hands those to
/// [`write`] in arrival order instead.
pub fn handle(id: u32, request: Message, reply: &mut dyn FnMut(Reply)) {
    let result = match request {
        Message::ReadFile { path, offset, len } => match read_file(id, &path, offset, len) {
            Ok(frame) => return reply(Reply::Encoded(frame)),
            Err(failure) => Err(failure),
        },
        Message::WriteFile(w) => Ok(write(&w)),
        Message::ListDir { path } => list_dir(&path),
        Message::Stat { path, depth } => stat(&path, depth, &mut |m| reply(Reply::Message(m))),
        Message::Remove { path, recursive } => remove(&path, recursive),
        Message::MakeDir {
            path,
            mode,
            parents,
        } => make_dir(&path, mode, parents),
        Message::Rename { from, to } => fs::rename(&from, &to)
            .map(|()| Message::Ack)
            .map_err(step("rename")),
        Message::SetAttr(attr) => set_attr(&attr),
        other => Ok(Message::error(
            ErrorCode::UNEXPECTED,
            format!("{:?} is not a file request", other.kind()),
        )),
    };
    reply(Reply::Message(result.unwrap_or_else(Failure::into_message)));
}

/// Carries out one `WriteFile` and returns its answer (`Ack` or `Error`).
pub fn write(w: &WriteFile) -> Message {
    write_file(w).unwrap_or_else(Failure::into_message)
}

/// The [`ErrorCode`] for an OS error: the file-system codes callers tell apart, or
/// [`ErrorCode::IO`].
pub fn error_code(e: &io::Error) -> ErrorCode {
    match e.raw_os_error() {
        Some(libc::ENOENT) => ErrorCode::NOT_FOUND,
        Some(libc::EISDIR) => ErrorCode::IS_A_DIRECTORY,
        Some(libc::ENOTDIR) => ErrorCode::NOT_A_DIRECTORY,
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => ErrorCode::PERMISSION_DENIED,
        Some(libc::ENOSPC | libc::EDQUOT) => ErrorCode::NO_SPACE,
        Some(libc::EEXIST) => ErrorCode::ALREADY_EXISTS,
        Some(libc::ENOTEMPTY) => ErrorCode::DIRECTORY_NOT_EMPTY,
        Some(_) => ErrorCode::IO,
        None => match e.kind() {
            io::ErrorKind::NotFound => ErrorCode::NOT_FOUND,
            io::ErrorKind::PermissionDenied => ErrorCode::PERMISSION_DENIED,
            io::ErrorKind::AlreadyExists => ErrorCode::ALREADY_EXISTS,
            _ => ErrorCode::IO,
        },
    }
}

/// A failed step: what was being done, and the OS error.
struct Failure {
    what: &'static str,
    error: io::Error,
}

impl Failure {
    fn new(what: &'static str, error: io::Error) -> Failure {
        Failure { what, error }
    }

    fn into_message(self) -> Message {
        Message::error(
            error_code(&self.error),
            format!("{}: {}", self.what, self.error),
        )
    }
}

/// `map_err` helper: the step's name on an OS error.
fn step(what: &'static str) -> impl FnOnce(io::Error) -> Failure {
    move |e| Failure::new(what, e)
}

/// The `FileData` frame of request `id` with up to `len` bytes of `path` from `offset`. The
/// bytes are read straight into the frame: under nested virtualization every copy of a chunk
/// in the guest is dear.
fn read_file(id: u32, path: &str, offset: u64, len: u32) -> Result<Vec<u8>, Failure> {
    let want = usize::try_from(len)
        .unwrap_or(usize::MAX)
        .min(MAX_CHUNK_LEN);
    let mut f = File::open(path).map_err(step("open"))?;
    if offset > 0 {
        f.seek(SeekFrom::Start(offset)).map_err(step("seek"))?;
    }
    // What is left of a regular file, so a small file does not cost a whole chunk; files of
    // /proc and /sys say 0 and grow the buffer as they are read.
    let left = f
        .metadata()
        .map(|m| m.len().saturating_sub(offset))
        .unwrap_or(0);
    let capacity = usize::try_from(left.saturating_add(1))
        .unwrap_or(usize::MAX)
        .max(64 * 1024)
        .min(want);
    // Room for the prefix, the data and the end flag.
    let mut frame = Vec::with_capacity(DATA_FRAME_PREFIX_LEN + capacity + 1);
    frame.resize(DATA_FRAME_PREFIX_LEN, 0);
    let got = Read::by_ref(&mut f)
        .take(want as u64)
        .read_to_end(&mut frame)
        .map_err(step("read"))?;
    // Fewer bytes than asked means EOF; exactly as many: probe one more.
    let eof = got < want || f.read(&mut [0u8; 1]).map_err(step("read"))? == 0;
    finish_file_data(&mut frame, id, eof)
        .map_err(|e| Failure::new("frame", io::Error::new(io::ErrorKind::InvalidData, e)))?;
    Ok(frame)
}

fn write_file(w: &WriteFile) -> Result<Message, Failure> {
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(w.truncate && !w.append)
        .append(w.append)
        .mode(w.mode)
        .open(&w.path)
        .map_err(step("open for writing"))?;
    f.write_all(&w.data).map_err(step("write"))?;
    Ok(Message::Ack)
}

fn file_type(md: &Metadata) -> FileType {
    let ft = md.file_type();
    if ft.is_file() {
        FileType::File
    } else if ft.is_dir() {
        FileType::Dir
    } else if ft.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Other
    }
}

fn list_dir(path: &str) -> Result<Message, Failure> {
    let mut entries = Vec::new();
    // 4 (count) + 1 (truncated) + slack for the frame around it.
    let mut size = 4 + 1 + 64;
    let mut truncated = false;
    for entry in fs::read_dir(path).map_err(step("read directory"))? {
        let entry = entry.map_err(step("read directory"))?;
        let md = entry.metadata().map_err(step("stat"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let item = 4 + name.len() + 1 + 8 + 4;
        if size + item > MAX_PAYLOAD_LEN {
            truncated = true;
            break;
        }
        size += item;
        entries.push(DirEntry {
            name,
            file_type: file_type(&md),
            size: md.len(),
            mode: md.mode(),
        });
    }
    Ok(Message::DirListing { entries, truncated })
}

/// What `lstat` says about `full`, as an entry named `rel`.
fn info(full: &Path, rel: String, md: &Metadata) -> FileInfo {
    let millis = md
        .mtime()
        .saturating_mul(1000)
        .saturating_add(md.mtime_nsec() / 1_000_000);
    let file_type = file_type(md);
    let symlink_target = (file_type == FileType::Symlink)
        .then(|| fs::read_link(full).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    FileInfo {
        path: rel,
        file_type,
        size: md.len(),
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        modified_ms: millis,
        symlink_target,
    }
}

/// Bytes an entry takes in an `Entries` payload.
fn encoded_len(info: &FileInfo) -> usize {
    4 + info.path.len()
        + 1
        + 8
        + 12
        + 8
        + 1
        + info.symlink_target.as_ref().map_or(0, |t| 4 + t.len())
}

/// Entries collected for `Entries` frames, sent whenever they fill one.
struct Batch<'r> {
    entries: Vec<FileInfo>,
    bytes: usize,
    reply: &'r mut dyn FnMut(Message),
}

impl Batch<'_> {
    fn push(&mut self, info: FileInfo) {
        self.bytes += encoded_len(&info);
        self.entries.push(info);
        if self.bytes >= ENTRIES_FRAME_BYTES {
            let entries = std::mem::take(&mut self.entries);
            self.bytes = 0;
            (self.reply)(Message::Entries {
                entries,
                more: true,
            });
        }
    }
}

fn stat(path: &str, depth: u32, reply: &mut dyn FnMut(Message)) -> Result<Message, Failure> {
    if depth == 0 {
        let md = fs::symlink_metadata(path).map_err(step("stat"))?;
        return Ok(Message::Entries {
            entries: vec![info(Path::new(path), String::new(), &md)],
            more: false,
        });
    }
    let root = Path::new(path);
    // The listed directory itself must be readable (a final symbolic link is followed);
    // what lies below it is listed as far as it can be.
    let children = sorted_children(root).map_err(step("read directory"))?;
    let mut batch = Batch {
        entries: Vec::new(),
        bytes: 0,
        reply,
    };
    walk(root, "", children, depth, &mut batch);
    Ok(Message::Entries {
        entries: batch.entries,
        more: false,
    })
}

/// The names in `dir`, sorted bytewise.
fn sorted_children(dir: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    let mut names = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect::<Vec<_>>();
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Adds the entries of `dir` (whose names are `children`), `rel` relative to the listing's
/// root, and of its subdirectories down to `depth` levels; each directory before its
/// contents. Entries that vanish or cannot be read are left out.
fn walk(
    dir: &Path,
    rel: &str,
    children: Vec<std::ffi::OsString>,
    depth: u32,
    batch: &mut Batch<'_>,
) {
    for name in children {
        let full = dir.join(&name);
        let Ok(md) = fs::symlink_metadata(&full) else {
            continue;
        };
        let name = name.to_string_lossy();
        let child_rel = if rel.is_empty() {
            name.into_owned()
        } else {
            format!("{rel}/{name}")
        };
        let is_dir = md.is_dir();
        batch.push(info(&full, child_rel.clone(), &md));
        if is_dir && depth > 1 {
            if let Ok(grandchildren) = sorted_children(&full) {
                walk(&full, &child_rel, grandchildren, depth - 1, batch);
            }
        }
    }
}

fn remove(path: &str, recursive: bool) -> Result<Message, Failure> {
    let md = fs::symlink_metadata(path).map_err(step("stat"))?;
    if md.is_dir() {
        if recursive {
            fs::remove_dir_all(path).map_err(step("remove directory tree"))?;
        } else {
            fs::remove_dir(path).map_err(step("remove directory"))?;
        }
    } else {
        fs::remove_file(path).map_err(step("remove"))?;
    }
    Ok(Message::Ack)
}

fn make_dir(path: &str, mode: u32, parents: bool) -> Result<Message, Failure> {
    DirBuilder::new()
        .recursive(parents)
        .mode(mode)
        .create(path)
        .map_err(step("make directory"))?;
    // `create_dir_all` accepts a path that exists as a directory; anything else there stays
    // an error.
    Ok(Message::Ack)
}

fn set_attr(attr: &SetAttr) -> Result<Message, Failure> {
    if attr.uid.is_some() || attr.gid.is_some() {
        std::os::unix::fs::chown(&attr.path, attr.uid, attr.gid).map_err(step("chown"))?;
    }
    if let Some(mode) = attr.mode {
        fs::set_permissions(&attr.path, fs::Permissions::from_mode(mode & 0o7777))
            .map_err(step("chmod"))?;
    }
    Ok(Message::Ack)
}
