//! `capsule.files`: reading, writing and managing files in a Linux capsule, and what is
//! reported about them.

use std::path::PathBuf;
use std::time::SystemTime;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::errors::IntoPy;
use crate::output::data_arg;

/// Files in one capsule (`capsule.files`), through its guest's agent. Linux capsules: in the
/// probe every call raises `UnsupportedError`, in a capsule that is not running
/// `InvalidStateError`.
///
/// Paths in the guest are absolute (`InvalidArgumentError` otherwise). Transfers stream in
/// 1 MiB chunks, so `upload` and `download` hold a few MiB of this process's memory whatever
/// the file's size. Writes are atomic: a temporary file beside the target, renamed over it,
/// so a reader (or a pause) never sees half a file. Guest-side failures raise `FileError`
/// with the guest `path` and a `kind` (as `FileNotFoundError`, `IsADirectoryError`,
/// `NotADirectoryError`, `FileExistsError`, `PermissionError` where the kind has a builtin
/// counterpart); host-side ones (the local file of an upload or download) `IoError`; a
/// request the guest does not answer within 60 s `capsule.TimeoutError` ("file"). Every call
/// releases the GIL and counts as activity of the capsule while it runs.
#[pyclass(module = "capsule", name = "Files", frozen)]
pub(crate) struct Files {
    pub(crate) capsule: capsule::Capsule,
}

#[pymethods]
impl Files {
    /// The whole file at `path`, as bytes.
    fn read<'py>(&self, py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyBytes>> {
        let capsule = &self.capsule;
        let data = py.detach(|| capsule.files().read(path)).into_py(py)?;
        Ok(PyBytes::new(py, &data))
    }

    /// The whole file at `path`, as text: `FileError` with `kind` "invalid_data" if it is not
    /// UTF-8.
    fn read_text(&self, py: Python<'_>, path: &str) -> PyResult<String> {
        let capsule = &self.capsule;
        py.detach(|| capsule.files().read_to_string(path))
            .into_py(py)
    }

    /// Writes `data` (bytes, or str as UTF-8) to the file at `path`, replacing it atomically
    /// and creating missing parent directories. `mode` (e.g. `0o755`) sets its permission
    /// bits exactly, `owner` a `(uid, gid)` pair; by default a new file gets `0o644` (less
    /// the guest's umask) and root as owner, and a replaced file keeps its own.
    #[pyo3(signature = (path, data, mode=None, owner=None))]
    fn write(
        &self,
        py: Python<'_>,
        path: &str,
        data: &Bound<'_, PyAny>,
        mode: Option<u32>,
        owner: Option<(u32, u32)>,
    ) -> PyResult<()> {
        let data = data_arg("data", data)?;
        let mut options = capsule::WriteOptions::new();
        if let Some(mode) = mode {
            if mode > 0o7777 {
                return Err(PyValueError::new_err(format!(
                    "mode {mode:#o} has bits beyond 0o7777"
                )));
            }
            options = options.mode(mode);
        }
        if let Some((uid, gid)) = owner {
            options = options.owner(uid, gid);
        }
        let capsule = &self.capsule;
        py.detach(|| capsule.files().write_with(path, &data, options))
            .into_py(py)
    }

    /// The entries below the directory `path`, down to `depth` levels (1: its own entries),
    /// as `EntryInfo`s: each directory before its contents, the entries of each directory
    /// by name. Symbolic links are listed, not followed; what cannot be read is left out.
    #[pyo3(signature = (path, depth=1))]
    fn list(&self, py: Python<'_>, path: &str, depth: u32) -> PyResult<Vec<EntryInfo>> {
        let capsule = &self.capsule;
        let entries = py
            .detach(|| capsule.files().list(path, depth))
            .into_py(py)?;
        Ok(entries.into_iter().map(EntryInfo::from).collect())
    }

    /// Whether something exists at `path` (a symbolic link counts, even a dangling one).
    fn exists(&self, py: Python<'_>, path: &str) -> PyResult<bool> {
        let capsule = &self.capsule;
        py.detach(|| capsule.files().exists(path)).into_py(py)
    }

    /// What is at `path`, as an `EntryInfo` (a final symbolic link is described, not
    /// followed). `FileNotFoundError` if nothing is.
    fn stat(&self, py: Python<'_>, path: &str) -> PyResult<EntryInfo> {
        let capsule = &self.capsule;
        Ok(py.detach(|| capsule.files().stat(path)).into_py(py)?.into())
    }

    /// Creates the directory `path` and its missing parents; one already there is fine.
    fn make_dir(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        let capsule = &self.capsule;
        py.detach(|| capsule.files().make_dir(path)).into_py(py)
    }

    /// Removes the file, symbolic link or directory (with everything in it) at `path`.
    fn remove(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        let capsule = &self.capsule;
        py.detach(|| capsule.files().remove(path)).into_py(py)
    }

    /// Renames `src` to `dst` (atomic, within one guest file system), replacing a file or
    /// empty directory at `dst`.
    fn rename(&self, py: Python<'_>, src: &str, dst: &str) -> PyResult<()> {
        let capsule = &self.capsule;
        py.detach(|| capsule.files().rename(src, dst)).into_py(py)
    }

    /// Copies the host file `host_path` to `guest_path` (streamed, atomic, with the host
    /// file's permission bits); returns the bytes copied.
    fn upload(&self, py: Python<'_>, host_path: PathBuf, guest_path: &str) -> PyResult<u64> {
        let capsule = &self.capsule;
        py.detach(|| capsule.files().upload(&host_path, guest_path))
            .into_py(py)
    }

    /// Copies the guest file `guest_path` to `host_path`, replacing it (written under a
    /// temporary name and renamed at the end); returns the bytes copied.
    fn download(&self, py: Python<'_>, guest_path: &str, host_path: PathBuf) -> PyResult<u64> {
        let capsule = &self.capsule;
        py.detach(|| capsule.files().download(guest_path, &host_path))
            .into_py(py)
    }

    fn __repr__(&self) -> String {
        format!("Files(capsule_id={:?})", self.capsule.id().as_str())
    }
}

/// A file, directory or link in a guest, from `files.stat` or `files.list`: what `lstat(2)`
/// says about it.
#[pyclass(module = "capsule", name = "EntryInfo", frozen)]
pub(crate) struct EntryInfo {
    /// Its last path component ("/" for the root).
    #[pyo3(get)]
    name: String,
    /// Its absolute path in the guest.
    #[pyo3(get)]
    path: String,
    /// "file", "directory", "symlink" or "other" (a device, FIFO or socket).
    #[pyo3(get, name = "type")]
    kind: &'static str,
    /// Size in bytes (of the link itself for a symbolic link).
    #[pyo3(get)]
    size: u64,
    /// Permission bits (`st_mode & 0o7777`, e.g. `0o644`).
    #[pyo3(get)]
    mode: u32,
    /// The owner's user id.
    #[pyo3(get)]
    uid: u32,
    /// The owner's group id.
    #[pyo3(get)]
    gid: u32,
    /// Where a symbolic link points, as stored in the link; None for anything else.
    #[pyo3(get)]
    symlink_target: Option<String>,
    modified_at: SystemTime,
}

impl From<capsule::EntryInfo> for EntryInfo {
    fn from(e: capsule::EntryInfo) -> Self {
        use capsule::EntryKind as K;
        EntryInfo {
            kind: match e.kind {
                K::File => "file",
                K::Directory => "directory",
                K::Symlink => "symlink",
                _ => "other",
            },
            name: e.name,
            path: e.path,
            size: e.size,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            symlink_target: e.symlink_target,
            modified_at: e.modified,
        }
    }
}

#[pymethods]
impl EntryInfo {
    /// When its contents last changed (the guest's clock, to the millisecond), as a UTC
    /// datetime.
    #[getter]
    fn modified(&self) -> SystemTime {
        self.modified_at
    }

    /// Whether it is a directory.
    fn is_dir(&self) -> bool {
        self.kind == "directory"
    }

    /// Whether it is a regular file.
    fn is_file(&self) -> bool {
        self.kind == "file"
    }

    fn __repr__(&self) -> String {
        format!(
            "EntryInfo(path={:?}, type={:?}, size={}, mode={:#o})",
            self.path, self.kind, self.size, self.mode
        )
    }
}
