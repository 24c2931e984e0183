//! What is reported about files in a guest ([`crate::Files`]), how a write is done, and the
//! kinds of file errors.

use std::fmt;
use std::time::SystemTime;

/// What a guest path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// A symbolic link (never followed in listings; see [`EntryInfo::symlink_target`]).
    Symlink,
    /// Anything else: a device, a FIFO, a socket.
    Other,
}

impl fmt::Display for EntryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EntryKind::File => "file",
            EntryKind::Directory => "directory",
            EntryKind::Symlink => "symbolic link",
            EntryKind::Other => "special file",
        })
    }
}

/// One file, directory or link in a guest, from [`crate::Files::stat`] or
/// [`crate::Files::list`]: what `lstat(2)` says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct EntryInfo {
    /// Its last path component (`/` for the root).
    pub name: String,
    /// Its absolute path in the guest: for [`crate::Files::stat`] the path asked about, for
    /// [`crate::Files::list`] the listed directory's path joined with the entry's path below it.
    pub path: String,
    /// File, directory, symbolic link or other.
    pub kind: EntryKind,
    /// Size in bytes (of the link itself for a symbolic link).
    pub size: u64,
    /// Permission bits, `st_mode & 0o7777` (e.g. `0o644`).
    pub mode: u32,
    /// The owner's user id.
    pub uid: u32,
    /// The owner's group id.
    pub gid: u32,
    /// When its contents last changed (the guest's clock, to the millisecond).
    pub modified: SystemTime,
    /// Where a symbolic link points, as stored in the link; `None` for anything else.
    pub symlink_target: Option<String>,
}

impl EntryInfo {
    /// Whether it is a directory.
    pub fn is_dir(&self) -> bool {
        self.kind == EntryKind::Directory
    }

    /// Whether it is a regular file.
    pub fn is_file(&self) -> bool {
        self.kind == EntryKind::File
    }
}

/// Why a file operation in a guest failed, in [`crate::Error::File`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileErrorKind {
    /// No such file or directory (`ENOENT`).
    NotFound,
    /// A directory where a file was expected (`EISDIR`): reading or writing a directory.
    IsADirectory,
    /// A path component that is not a directory (`ENOTDIR`), or listing a file.
    NotADirectory,
    /// Permission denied or a read-only file system (`EACCES`, `EPERM`, `EROFS`).
    PermissionDenied,
    /// The guest file system is full (`ENOSPC`, `EDQUOT`).
    NoSpace,
    /// Something is in the way (`EEXIST`): a file where a directory was to be made.
    AlreadyExists,
    /// A directory that is not empty (`ENOTEMPTY`): renaming over one.
    DirectoryNotEmpty,
    /// The contents are not what was asked for: [`crate::Files::read_to_string`] of a
    /// file that is not UTF-8.
    InvalidData,
    /// Any other failure; the message says what the guest reported.
    Other,
}

impl fmt::Display for FileErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileErrorKind::NotFound => "not found",
            FileErrorKind::IsADirectory => "is a directory",
            FileErrorKind::NotADirectory => "not a directory",
            FileErrorKind::PermissionDenied => "permission denied",
            FileErrorKind::NoSpace => "no space left",
            FileErrorKind::AlreadyExists => "already exists",
            FileErrorKind::DirectoryNotEmpty => "directory not empty",
            FileErrorKind::InvalidData => "invalid data",
            FileErrorKind::Other => "failed",
        })
    }
}

/// How [`crate::Files::write_with`] and [`crate::Files::write_from_with`] write a file:
/// its permission bits and owner. By default a new file gets mode `0o644` (less the guest's
/// umask) and the agent's owner (root), and a file that is replaced keeps its mode and owner.
///
/// ```
/// let options = capsule::WriteOptions::new().mode(0o755).owner(1000, 1000);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[must_use]
pub struct WriteOptions {
    pub(crate) mode: Option<u32>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
}

impl WriteOptions {
    /// The defaults (see the type's docs).
    pub fn new() -> Self {
        WriteOptions::default()
    }

    /// The file's permission bits, set exactly (the umask does not apply); bits beyond
    /// `0o7777` are ignored.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = Some(mode & 0o7777);
        self
    }

    /// The file's owner: user and group ids in the guest.
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.uid = Some(uid);
        self.gid = Some(gid);
        self
    }
}
