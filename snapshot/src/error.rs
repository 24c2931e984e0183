//! The crate's typed error.

use std::io;
use std::path::{Path, PathBuf};

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong reading or writing snapshot files.
///
/// The enum is `#[non_exhaustive]`: match with a wildcard arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The file does not start with the state-file magic `b"CAPSNAP\0"`.
    #[error("not a capsule state file (bad magic)")]
    BadMagic,

    /// The file was written in a format version this reader does not understand.
    #[error("unsupported state file format version {found} (this reader supports {supported})")]
    UnsupportedVersion {
        /// Version found in the header.
        found: u32,
        /// The only version this reader understands.
        supported: u32,
    },

    /// The header carries flag bits this reader does not know.
    #[error("unsupported state file flags {flags:#x}")]
    UnsupportedFlags {
        /// Raw flag word found in the header.
        flags: u32,
    },

    /// The file is shorter than its header says it is.
    #[error("state file truncated: need {expected} bytes, have {actual}")]
    Truncated {
        /// Bytes the header (or the header itself) requires.
        expected: u64,
        /// Bytes actually present.
        actual: u64,
    },

    /// The file holds bytes past the end of its declared payload.
    #[error("state file has {extra} unexpected trailing bytes")]
    TrailingData {
        /// Number of bytes after the declared payload.
        extra: u64,
    },

    /// The payload does not match the CRC-64 stored in the header.
    #[error("state file checksum mismatch: header says {expected:#018x}, payload hashes to {actual:#018x}")]
    ChecksumMismatch {
        /// Checksum stored in the header.
        expected: u64,
        /// Checksum computed over the payload.
        actual: u64,
    },

    /// The payload passed its checksum but could not be deserialized into the requested type.
    #[error("state payload could not be decoded: {0}")]
    Decode(#[source] CodecError),

    /// A value could not be serialized.
    #[error("state payload could not be encoded: {0}")]
    Encode(#[source] CodecError),

    /// An I/O operation on `path` failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// File or directory the operation was about.
        path: PathBuf,
        /// Underlying OS error.
        #[source]
        source: io::Error,
    },

    /// A system call not tied to a particular file failed.
    #[error("{call} failed: {source}")]
    Sys {
        /// Name of the failing call (e.g. `"mmap"`).
        call: &'static str,
        /// Underlying OS error.
        #[source]
        source: io::Error,
    },

    /// A page bitmap did not fit the memory it describes (wrong page count or out-of-range page).
    #[error("page bitmap mismatch: {reason}")]
    BitmapMismatch {
        /// Human readable description.
        reason: String,
    },

    /// A memory image or chain is inconsistent.
    #[error("invalid memory image: {reason}")]
    InvalidMemory {
        /// Human readable description.
        reason: String,
    },

    /// A stored memory chain describes a different amount of memory than the
    /// guest it is loaded for.
    #[error("memory chain of {stored} bytes for a guest of {expected} bytes")]
    MemorySizeMismatch {
        /// Memory size the chain records.
        stored: u64,
        /// Memory size of the guest.
        expected: u64,
    },

    /// An inline page lies outside guest memory or is not exactly one page long.
    #[error("inline page {page} is malformed: {len} bytes, memory has {pages} pages")]
    BadInlinePage {
        /// Flat page number the inline page claims.
        page: u64,
        /// Its length in bytes (must be [`crate::PAGE_SIZE`]).
        len: usize,
        /// Number of pages of guest memory.
        pages: u64,
    },

    /// A directory to be created already exists.
    #[error("{} already exists", path.display())]
    AlreadyExists {
        /// The existing path.
        path: PathBuf,
    },
}

/// Opaque wrapper around the binary serde codec's error, so that the codec
/// is not part of this crate's public API.
#[derive(Debug)]
pub struct CodecError(pub(crate) bincode::Error);

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for CodecError {}

impl Error {
    /// Builds an [`Error::Io`] for `path`.
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Builds an [`Error::Sys`] from `errno`.
    pub(crate) fn last_os(call: &'static str) -> Self {
        Error::Sys {
            call,
            source: io::Error::last_os_error(),
        }
    }

    /// Builds an [`Error::InvalidMemory`].
    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        Error::InvalidMemory {
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::BitmapMismatch`].
    pub(crate) fn bitmap(reason: impl Into<String>) -> Self {
        Error::BitmapMismatch {
            reason: reason.into(),
        }
    }
}

/// Extension to attach a path to `std::io::Result`.
pub(crate) trait IoContext<T> {
    /// Maps an `io::Error` to [`Error::Io`] naming `path`.
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
