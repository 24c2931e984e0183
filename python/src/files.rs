//! `capsule.files`: reading, writing and managing files in a Linux capsule, and what is
//! reported about them.

use std::io::{self, BufReader, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use pyo3::exceptions::{PyAttributeError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes};

use crate::errors::{to_py, IntoPy};
use crate::output::data_arg;

/// The engine's transfer chunk: what `write_from` asks a file object's `read` for at a time.
const CHUNK: usize = 1 << 20;

/// The longest per-request timeout `with_timeout` takes: the engine adds it to the time now,
/// which must not overflow (and a longer wait is no different in practice).
const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

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
/// counterpart); host-side ones (the local file of an upload or download) `IoError`, and an
/// exception a file object of `read_into`/`write_from` raises is raised as it is; a request
/// the guest does not answer within 60 s (or the time `with_timeout` set)
/// `capsule.TimeoutError` ("file"). Every call releases the GIL and counts as activity of the
/// capsule while it runs.
#[pyclass(module = "capsule", name = "Files", frozen)]
pub(crate) struct Files {
    capsule: capsule::Capsule,
    /// How long each request waits for the guest's answer; None: the engine's default.
    timeout: Option<Duration>,
}

impl Files {
    /// The files of `capsule`, with the engine's default timeout.
    pub(crate) fn new(capsule: capsule::Capsule) -> Self {
        Files {
            capsule,
            timeout: None,
        }
    }

    /// The engine's files of the capsule, with this object's timeout.
    fn files(&self) -> capsule::Files<'_> {
        let files = self.capsule.files();
        match self.timeout {
            Some(timeout) => files.timeout(timeout),
            None => files,
        }
    }
}

#[pymethods]
impl Files {
    /// A new `Files` for the same capsule whose every request waits at most `seconds` for
    /// the guest's answer (each request: one chunk of a transfer, not the whole transfer),
    /// instead of 60 s; past it the call raises `capsule.TimeoutError` ("file"). A
    /// `ValueError` unless `seconds` is positive, finite and at most a year.
    fn with_timeout(&self, seconds: f64) -> PyResult<Files> {
        let timeout = crate::errors::seconds("seconds", seconds)?;
        if timeout.is_zero() || timeout > MAX_TIMEOUT {
            return Err(PyValueError::new_err(format!(
                "seconds must be more than 0 and at most {} (a year), not {seconds}",
                MAX_TIMEOUT.as_secs()
            )));
        }
        Ok(Files {
            capsule: self.capsule.clone(),
            timeout: Some(timeout),
        })
    }

    /// The whole file at `path`, as bytes.
    fn read<'py>(&self, py: Python<'py>, path: &str) -> PyResult<Bound<'py, PyBytes>> {
        let data = py.detach(|| self.files().read(path)).into_py(py)?;
        Ok(PyBytes::new(py, &data))
    }

    /// The whole file at `path`, as text: `FileError` with `kind` "invalid_data" if it is not
    /// UTF-8.
    fn read_text(&self, py: Python<'_>, path: &str) -> PyResult<String> {
        py.detach(|| self.files().read_to_string(path)).into_py(py)
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
        let options = write_options(mode, owner)?;
        py.detach(|| self.files().write_with(path, &data, options))
            .into_py(py)
    }

    /// Streams the file at `path` into `fileobj`, a binary file object (anything with a
    /// `write(bytes)` method: a file opened with "wb", `io.BytesIO`...), one `write` call
    /// per chunk of at most 1 MiB; returns the bytes copied. The GIL is taken only around
    /// each `write`, and this process holds a few MiB of the file whatever its size. A
    /// `write` that returns a smaller count is called again with the rest (None counts as
    /// all); `fileobj` is neither flushed nor closed. An exception `write` raises (or a
    /// signal handler, such as Ctrl-C's, between chunks) ends the transfer and is raised as
    /// it is. A `TypeError` if `fileobj` has no `write` method.
    fn read_into(&self, py: Python<'_>, path: &str, fileobj: &Bound<'_, PyAny>) -> PyResult<u64> {
        let mut out = PyFile::new(fileobj, "write")?;
        let result = py.detach(|| self.files().read_into(path, &mut out));
        out.settle(py, result)
    }

    /// Writes everything `fileobj` gives to the file at `path`, as `write` does (atomically,
    /// with `mode` and `owner`): `fileobj.read(n)` is called for bytes (or bytearray, at
    /// most `n` of them) until it returns an empty one; returns the bytes written. The GIL is
    /// taken only around each `read`, which asks for 1 MiB, and this process holds a few MiB
    /// of the file whatever its size. An exception `read` raises (or a signal handler, such
    /// as Ctrl-C's, between chunks) ends the transfer, leaving the file as it was, and is
    /// raised as it is. A `TypeError` if `fileobj` has no `read` method or it returns
    /// something else than bytes.
    #[pyo3(signature = (path, fileobj, mode=None, owner=None))]
    fn write_from(
        &self,
        py: Python<'_>,
        path: &str,
        fileobj: &Bound<'_, PyAny>,
        mode: Option<u32>,
        owner: Option<(u32, u32)>,
    ) -> PyResult<u64> {
        let options = write_options(mode, owner)?;
        // The engine reads its chunks in growing pieces; one `read(1 MiB)` serves a chunk.
        let mut input = BufReader::with_capacity(CHUNK, PyFile::new(fileobj, "read")?);
        let result = py.detach(|| self.files().write_from_with(path, &mut input, options));
        input.into_inner().settle(py, result)
    }

    /// The entries below the directory `path`, down to `depth` levels (1: its own entries),
    /// as `EntryInfo`s: each directory before its contents, the entries of each directory
    /// by name. Symbolic links are listed, not followed; what cannot be read is left out.
    #[pyo3(signature = (path, depth=1))]
    fn list(&self, py: Python<'_>, path: &str, depth: u32) -> PyResult<Vec<EntryInfo>> {
        let entries = py.detach(|| self.files().list(path, depth)).into_py(py)?;
        Ok(entries.into_iter().map(EntryInfo::from).collect())
    }

    /// Whether something exists at `path` (a symbolic link counts, even a dangling one).
    fn exists(&self, py: Python<'_>, path: &str) -> PyResult<bool> {
        py.detach(|| self.files().exists(path)).into_py(py)
    }

    /// What is at `path`, as an `EntryInfo` (a final symbolic link is described, not
    /// followed). `FileNotFoundError` if nothing is.
    fn stat(&self, py: Python<'_>, path: &str) -> PyResult<EntryInfo> {
        Ok(py.detach(|| self.files().stat(path)).into_py(py)?.into())
    }

    /// Creates the directory `path` and its missing parents; one already there is fine.
    fn make_dir(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        py.detach(|| self.files().make_dir(path)).into_py(py)
    }

    /// Removes the file, symbolic link or directory (with everything in it) at `path`.
    fn remove(&self, py: Python<'_>, path: &str) -> PyResult<()> {
        py.detach(|| self.files().remove(path)).into_py(py)
    }

    /// Renames `src` to `dst` (atomic, within one guest file system), replacing a file or
    /// empty directory at `dst`.
    fn rename(&self, py: Python<'_>, src: &str, dst: &str) -> PyResult<()> {
        py.detach(|| self.files().rename(src, dst)).into_py(py)
    }

    /// Copies the host file `host_path` to `guest_path` (streamed, atomic, with the host
    /// file's permission bits); returns the bytes copied.
    fn upload(&self, py: Python<'_>, host_path: PathBuf, guest_path: &str) -> PyResult<u64> {
        py.detach(|| self.files().upload(&host_path, guest_path))
            .into_py(py)
    }

    /// Copies the guest file `guest_path` to `host_path`, replacing it (written under a
    /// temporary name and renamed at the end); returns the bytes copied.
    fn download(&self, py: Python<'_>, guest_path: &str, host_path: PathBuf) -> PyResult<u64> {
        py.detach(|| self.files().download(guest_path, &host_path))
            .into_py(py)
    }

    fn __repr__(&self) -> String {
        let id = self.capsule.id().as_str();
        match self.timeout {
            Some(t) => format!("Files(capsule_id={id:?}, timeout={:?})", t.as_secs_f64()),
            None => format!("Files(capsule_id={id:?})"),
        }
    }
}

/// The `mode` and `owner` arguments of a write as the engine's options; a `ValueError` for
/// mode bits beyond `0o7777`.
fn write_options(mode: Option<u32>, owner: Option<(u32, u32)>) -> PyResult<capsule::WriteOptions> {
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
    Ok(options)
}

/// A Python file object's `write` or `read` method as a Rust writer or reader, for the
/// engine to stream through while it runs without the GIL: each call takes the GIL for the
/// one Python call. The first exception is kept, and the engine gets an io error in its
/// place (which ends the transfer); [`PyFile::settle`] raises the exception itself.
struct PyFile {
    method: Py<PyAny>,
    error: Option<PyErr>,
}

impl PyFile {
    /// `fileobj`'s method `name`; a `TypeError` if it has none.
    fn new(fileobj: &Bound<'_, PyAny>, name: &str) -> PyResult<Self> {
        let method = match fileobj.getattr(name) {
            Ok(method) if method.is_callable() => method,
            Err(e) if !e.is_instance_of::<PyAttributeError>(fileobj.py()) => return Err(e),
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "fileobj must be a binary file object with a {name}() method, not {}",
                    fileobj.get_type().name()?
                )))
            }
        };
        Ok(PyFile {
            method: method.unbind(),
            error: None,
        })
    }

    /// Calls `f` on the method with the GIL held, after the pending signal handlers (so
    /// Ctrl-C ends a transfer between chunks); keeps the exception of either.
    fn call<T>(&mut self, f: impl FnOnce(&Bound<'_, PyAny>) -> PyResult<T>) -> io::Result<T> {
        let (method, error) = (&self.method, &mut self.error);
        Python::attach(|py| {
            py.check_signals()
                .and_then(|()| f(method.bind(py)))
                .map_err(|e| {
                    let io = io::Error::other(format!("the Python file object raised {e}"));
                    error.get_or_insert(e);
                    io
                })
        })
    }

    /// The engine's `result`, unless it failed because the file object raised: then that
    /// exception.
    fn settle<T>(self, py: Python<'_>, result: capsule::Result<T>) -> PyResult<T> {
        match (self.error, result) {
            (Some(e), Err(_)) => Err(e),
            (_, result) => result.map_err(|e| to_py(py, e)),
        }
    }
}

impl Write for PyFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.call(|write| {
            let written = write.call1((PyBytes::new(write.py(), buf),))?;
            // Raw files return how much they took, which may be less (`write_all` calls
            // again with the rest); most others return the length, or None.
            if written.is_none() {
                return Ok(buf.len());
            }
            let n: usize = written.extract()?;
            if n > buf.len() {
                return Err(PyValueError::new_err(format!(
                    "fileobj.write() took {n} bytes of {}",
                    buf.len()
                )));
            }
            Ok(n)
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for PyFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.call(|read| {
            let data = read.call1((buf.len(),))?;
            let owned;
            let bytes = if let Ok(bytes) = data.cast::<PyBytes>() {
                bytes.as_bytes()
            } else if let Ok(array) = data.cast::<PyByteArray>() {
                owned = array.to_vec();
                &owned
            } else {
                return Err(PyTypeError::new_err(format!(
                    "fileobj.read() must return bytes, not {}",
                    data.get_type().name()?
                )));
            };
            let Some(into) = buf.get_mut(..bytes.len()) else {
                return Err(PyValueError::new_err(format!(
                    "fileobj.read({}) returned {} bytes",
                    buf.len(),
                    bytes.len()
                )));
            };
            into.copy_from_slice(bytes);
            Ok(bytes.len())
        })
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

/// Private, for the tests: copies `src` (its `read`) to `dst` (its `write`) through the
/// adapters of `write_from` and `read_into`, without the GIL, in chunks of 1 MiB read as
/// the engine reads them (up to the first short one); returns the bytes copied. The
/// guest-free half of a transfer.
#[pyfunction(name = "_copy_file_objects")]
pub(crate) fn copy_file_objects(
    py: Python<'_>,
    src: &Bound<'_, PyAny>,
    dst: &Bound<'_, PyAny>,
) -> PyResult<u64> {
    let mut input = BufReader::with_capacity(CHUNK, PyFile::new(src, "read")?);
    let mut out = PyFile::new(dst, "write")?;
    let copied = py.detach(|| -> io::Result<u64> {
        let mut total = 0;
        loop {
            let mut chunk = Vec::new();
            (&mut input).take(CHUNK as u64).read_to_end(&mut chunk)?;
            out.write_all(&chunk)?;
            total += chunk.len() as u64;
            if chunk.len() < CHUNK {
                return Ok(total);
            }
        }
    });
    copied.map_err(|e| {
        input
            .into_inner()
            .error
            .or(out.error)
            .unwrap_or_else(|| PyOSError::new_err(e.to_string()))
    })
}
