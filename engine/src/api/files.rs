//! [`Files`]: reading, writing and managing files in a Linux capsule.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use crate::capsule_core::CapsuleCore;
use crate::error::{Error, Result};
use crate::guest::agent_files::{FilesError, FilesResult, GuestFiles};
use crate::model::{EntryInfo, FileErrorKind, WriteOptions};

/// How long a file operation waits for each answer of the guest's agent, by default.
pub(crate) const DEFAULT_FILE_TIMEOUT: Duration = Duration::from_secs(60);

/// Files in one capsule; see [`crate::Capsule::files`].
///
/// Paths are absolute guest paths (`/tmp/data.bin`). Every call needs a running Linux
/// capsule: in the probe it is [`Error::Unsupported`], in a capsule that is not running
/// [`Error::InvalidState`]. A call counts as activity for as long as it runs (the capsule is
/// not auto-paused in the middle of a transfer); if the capsule is paused, stopped or
/// crashes meanwhile, the call returns that state's error ([`Error::InvalidState`] with
/// [`crate::Status::Paused`], [`Error::GuestCrashed`]...).
///
/// **Large files.** Transfers stream in chunks of 1 MiB with at most four chunks in flight,
/// so [`Files::read_into`], [`Files::write_from`], [`Files::upload`] and
/// [`Files::download`] hold a few MiB of the host's memory whatever the file's size.
///
/// **Atomic writes.** A write goes to a temporary file in the same directory
/// (`.NAME.capsule-RANDOM.tmp`), which is then given its mode and owner and renamed over
/// the final name: readers in the guest, and a capsule paused at any moment, see the old
/// contents or the new, never a part. A failed write removes its temporary file; one cut
/// off by a pause (or a host crash) leaves it behind, hidden, and the final name untouched.
/// Where a temporary file cannot be created beside an existing file (a read-only directory,
/// `/proc`, `/sys`), or the path is a device, FIFO or socket, the file is written in place.
/// A replaced file keeps its mode and owner unless [`WriteOptions`] say otherwise; a
/// symbolic link is followed (its target is replaced; the link stays); hard links to the old
/// file keep the old contents. There is no `fsync`: a capsule's files live in its memory
/// (`/tmp` is a tmpfs), which a pause saves whole.
///
/// **Errors** are typed: [`Error::File`] with the guest path and a [`FileErrorKind`] (not
/// found, is a directory, not a directory, permission denied, no space, already exists...)
/// for what the guest's file system refused; [`Error::Io`] for the host side (the local
/// file of an upload or download, the reader or writer given); [`Error::Timeout`] with
/// [`crate::TimeoutKind::File`] when the agent does not answer a request within
/// [`Files::timeout`]; [`Error::InvalidArgument`] for a path that is not absolute.
#[derive(Clone, Copy)]
pub struct Files<'a> {
    core: &'a CapsuleCore,
    timeout: Duration,
}

impl std::fmt::Debug for Files<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Files")
            .field("capsule", self.core.id())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl<'a> Files<'a> {
    pub(crate) fn new(core: &'a CapsuleCore) -> Self {
        Files {
            core,
            timeout: DEFAULT_FILE_TIMEOUT,
        }
    }

    /// How long each request of an operation may wait for the guest's answer (one chunk of
    /// a transfer, not the whole transfer): past it the operation fails with
    /// [`Error::Timeout`] ([`crate::TimeoutKind::File`]). Default 60 s.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The whole file at `path`.
    ///
    /// Errors: [`Error::File`] ([`FileErrorKind::NotFound`], [`FileErrorKind::IsADirectory`],
    /// [`FileErrorKind::PermissionDenied`]...).
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.read_into(path, &mut out)?;
        Ok(out)
    }

    /// The whole file at `path`, as text.
    ///
    /// Errors: as [`Files::read`]; contents that are not UTF-8 are [`Error::File`] with
    /// [`FileErrorKind::InvalidData`].
    pub fn read_to_string(&self, path: &str) -> Result<String> {
        String::from_utf8(self.read(path)?).map_err(|e| Error::File {
            path: path.into(),
            kind: FileErrorKind::InvalidData,
            message: format!("not UTF-8: {}", e.utf8_error()),
        })
    }

    /// Streams the file at `path` into `out`, a chunk at a time; returns the bytes written.
    /// For files of any size: the host holds a few MiB of it at most.
    ///
    /// Errors: as [`Files::read`]; a failure of `out` is [`Error::Io`].
    pub fn read_into(&self, path: &str, mut out: impl Write) -> Result<u64> {
        check_path(path)?;
        self.with("read a file", |files| files.read_into(path, &mut out, None))
    }

    /// Writes `data` to the file at `path`, replacing it atomically (see the type's docs)
    /// and creating missing parent directories (mode `0o755`). A new file gets mode `0o644`
    /// (less the guest's umask); a replaced one keeps its mode and owner.
    ///
    /// Errors: [`Error::File`] ([`FileErrorKind::IsADirectory`] for a directory there,
    /// [`FileErrorKind::NotADirectory`] when a parent is a file,
    /// [`FileErrorKind::NoSpace`], [`FileErrorKind::PermissionDenied`]...).
    pub fn write(&self, path: &str, data: impl AsRef<[u8]>) -> Result<()> {
        self.write_with(path, data, WriteOptions::new())
    }

    /// [`Files::write`] with the file's mode and owner given by `options`.
    pub fn write_with(
        &self,
        path: &str,
        data: impl AsRef<[u8]>,
        options: WriteOptions,
    ) -> Result<()> {
        self.write_from_with(path, data.as_ref(), options).map(drop)
    }

    /// Writes everything `input` gives, until its end, to the file at `path`, as
    /// [`Files::write`] does, a chunk at a time; returns the bytes written. For files of any
    /// size: the host holds a few MiB of it at most.
    ///
    /// Errors: as [`Files::write`]; a failure of `input` is [`Error::Io`] (the file is then
    /// left as it was).
    pub fn write_from(&self, path: &str, input: impl Read) -> Result<u64> {
        self.write_from_with(path, input, WriteOptions::new())
    }

    /// [`Files::write_from`] with the file's mode and owner given by `options`.
    pub fn write_from_with(
        &self,
        path: &str,
        mut input: impl Read,
        options: WriteOptions,
    ) -> Result<u64> {
        check_file_path(path)?;
        self.with("write a file", |files| {
            files.write_from(path, &mut input, &options, None)
        })
    }

    /// The entries below the directory `path`, down to `depth` levels (1: its entries; 2:
    /// theirs too...), each directory before its contents and the entries of each
    /// directory sorted by name. Symbolic links are listed, not followed; what cannot be
    /// read below `path` is left out. A final symbolic link in `path` itself is followed.
    ///
    /// Errors: [`Error::InvalidArgument`] if `depth` is 0; [`Error::File`]
    /// ([`FileErrorKind::NotFound`], [`FileErrorKind::NotADirectory`] for a file...).
    pub fn list(&self, path: &str, depth: u32) -> Result<Vec<EntryInfo>> {
        check_path(path)?;
        if depth == 0 {
            return Err(Error::InvalidArgument(
                "a listing's depth is at least 1 (the directory's own entries)".into(),
            ));
        }
        self.with("list a directory", |files| files.list(path, depth))
    }

    /// Whether something exists at `path` (a symbolic link counts, even a dangling one).
    ///
    /// Errors: only when the answer is unknown ([`FileErrorKind::PermissionDenied`]...).
    pub fn exists(&self, path: &str) -> Result<bool> {
        check_path(path)?;
        self.with("look up a path", |files| files.exists(path))
    }

    /// What is at `path` (a final symbolic link is described, not followed).
    ///
    /// Errors: [`Error::File`] ([`FileErrorKind::NotFound`]...).
    pub fn stat(&self, path: &str) -> Result<EntryInfo> {
        check_path(path)?;
        self.with("look up a path", |files| files.stat(path))
    }

    /// Creates the directory `path` (mode `0o755`, less the guest's umask) and its missing
    /// parents; a directory already there is fine.
    ///
    /// Errors: [`Error::File`] ([`FileErrorKind::AlreadyExists`] when a file is there,
    /// [`FileErrorKind::NotADirectory`] when a parent is a file...).
    pub fn make_dir(&self, path: &str) -> Result<()> {
        check_path(path)?;
        self.with("make a directory", |files| files.make_dir(path))
    }

    /// Removes the file, symbolic link (not what it points to) or directory (with
    /// everything in it) at `path`.
    ///
    /// Errors: [`Error::File`] ([`FileErrorKind::NotFound`]...).
    pub fn remove(&self, path: &str) -> Result<()> {
        check_path(path)?;
        self.with("remove a path", |files| files.remove(path))
    }

    /// Renames `from` to `to` (`rename(2)`: atomic, within one file system), replacing a
    /// file or empty directory at `to`.
    ///
    /// Errors: [`Error::File`] about `from` ([`FileErrorKind::NotFound`],
    /// [`FileErrorKind::IsADirectory`] for a file over a directory,
    /// [`FileErrorKind::DirectoryNotEmpty`], [`FileErrorKind::Other`] across file
    /// systems...).
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        check_path(from)?;
        check_file_path(to)?;
        self.with("rename a path", |files| files.rename(from, to))
    }

    /// Copies the host file `host_path` to `guest_path` as [`Files::write_from`] does,
    /// with the host file's permission bits; returns the bytes copied.
    ///
    /// Errors: as [`Files::write`]; the host file's are [`Error::Io`].
    pub fn upload(&self, host_path: impl AsRef<Path>, guest_path: &str) -> Result<u64> {
        let host_path = host_path.as_ref();
        check_file_path(guest_path)?;
        let mut file = File::open(host_path).map_err(Error::io("open for upload", host_path))?;
        let metadata = file
            .metadata()
            .map_err(Error::io("read the metadata of", host_path))?;
        if metadata.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{} is a directory: upload copies one file",
                host_path.display()
            )));
        }
        let options = WriteOptions::new().mode(metadata.permissions().mode());
        self.with("upload a file", |files| {
            files.write_from(guest_path, &mut file, &options, Some(host_path))
        })
    }

    /// Copies the guest file `guest_path` to `host_path`, replacing it; returns the bytes
    /// copied. The copy is written to a temporary file beside `host_path` and renamed at the
    /// end, so `host_path` never holds a part (a failed download removes the temporary
    /// file).
    ///
    /// Errors: as [`Files::read`]; the host side's are [`Error::Io`]
    /// ([`Error::InvalidArgument`] for a `host_path` without a file name).
    pub fn download(&self, guest_path: &str, host_path: impl AsRef<Path>) -> Result<u64> {
        let host_path = host_path.as_ref();
        check_path(guest_path)?;
        let (Some(name), Some(dir)) = (host_path.file_name(), host_path.parent()) else {
            return Err(Error::InvalidArgument(format!(
                "{} names no file to download to",
                host_path.display()
            )));
        };
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| {
            Error::os(
                "drawing a temporary name",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let temp = dir.join(format!(
            ".{}.capsule-{:016x}.part",
            name.to_string_lossy(),
            u64::from_le_bytes(random)
        ));
        let copied = (|| -> Result<u64> {
            let mut file = File::create(&temp).map_err(Error::io("create", &temp))?;
            let n = self.with("download a file", |files| {
                files.read_into(guest_path, &mut file, Some(&temp))
            })?;
            drop(file);
            fs::rename(&temp, host_path).map_err(Error::io("rename the download to", host_path))?;
            Ok(n)
        })();
        if copied.is_err() {
            let _ = fs::remove_file(&temp);
        }
        copied
    }

    /// Runs `f` on the capsule's agent, counted as activity; maps a closed link to the
    /// capsule's state.
    fn with<T>(
        &self,
        operation: &'static str,
        f: impl FnOnce(&GuestFiles<'_>) -> FilesResult<T>,
    ) -> Result<T> {
        let (runtime, _activity) = self.core.begin_io(operation)?;
        let Some(link) = runtime.agent() else {
            return Err(Error::Unsupported(format!(
                "cannot {operation}: the {} guest has no files (files need a Linux capsule)",
                self.core.record().kind
            )));
        };
        // The link is all this needs; a pause meanwhile releases the guest, not waiting
        // for this call.
        drop(runtime);
        let files = GuestFiles::new(&link, self.core.id(), self.timeout);
        f(&files).map_err(|e| match e {
            FilesError::Closed => self.core.interrupted_io(operation),
            FilesError::Failed(e) => e,
        })
    }
}

/// A guest path must be absolute and free of NUL bytes.
fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "guest paths are absolute: {path:?}"
        )));
    }
    if path.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "a guest path has no NUL byte: {path:?}"
        )));
    }
    Ok(())
}

/// [`check_path`], and the path must name a file: not `/`, not ending in `/`, `.` or `..`.
fn check_file_path(path: &str) -> Result<()> {
    check_path(path)?;
    let name = path.rsplit('/').next().unwrap_or_default();
    if matches!(name, "" | "." | "..") {
        return Err(Error::InvalidArgument(format!(
            "{path:?} names a directory, not a file"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
