//! Crash-safe replacement of files and directories.
//!
//! # Files
//!
//! [`write_file`] / [`write_file_with`] write the new contents to a hidden
//! temporary `.<name>.tmp-<16 hex digits>` in the *same directory* (so the
//! final rename never crosses a file system), `fsync` it, `rename(2)` it over
//! the final name and finally `fsync` the parent directory so the rename
//! itself is durable. At every instant the final name holds either the
//! complete previous version or the complete new one. If the writer fails,
//! the temporary is removed; after a crash a stray temporary may remain, but
//! it never carries the final name and is deleted at the next layer cleanup
//! (`chain::remove_unreferenced_layers`).
//!
//! # Directories
//!
//! [`publish_new_dir`] builds a new directory under a hidden sibling name
//! `.<name>.tmp-<16 hex digits>`, fsyncs every file in it, the directory itself
//! and the parent, and then renames it to its final name with
//! `renameat2(RENAME_NOREPLACE)`, so an existing directory is never replaced
//! ([`Error::AlreadyExists`]). Readers never see a half-built directory under
//! the final name; after a crash a hidden `.<name>.tmp-<hex>` directory may
//! remain, never valid data.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};

/// Marker put between a file's name and the random suffix of its temporary.
const TMP_MARKER: &str = ".tmp-";
/// How many random names to try before giving up on creating a temporary.
const CREATE_ATTEMPTS: usize = 16;

/// Writes `contents` to `path` atomically and durably (see the module docs).
pub fn write_file(path: &Path, contents: &[u8]) -> Result<()> {
    write_file_with(path, |file, tmp| file.write_all(contents).at(tmp))
}

/// Creates a temporary beside `path`, lets `fill` write it, then fsyncs and
/// renames it over `path` and fsyncs the parent directory.
///
/// `fill` receives the open temporary file and its path (for error messages).
/// If `fill` (or any later step before the rename) fails, the temporary is
/// removed and `path` is left exactly as it was.
pub fn write_file_with<F>(path: &Path, fill: F) -> Result<()>
where
    F: FnOnce(&mut File, &Path) -> Result<()>,
{
    write_file_with_sync(path, true, fill)
}

/// [`write_file_with`], fsyncing the parent directory only if `sync_dir`. Without it the
/// new name is durable only once the caller fsyncs that directory (each fsync is a journal
/// commit and a disk flush: a caller that publishes another file there next, and fsyncs
/// the directory then, saves one).
pub fn write_file_with_sync<F>(path: &Path, sync_dir: bool, fill: F) -> Result<()>
where
    F: FnOnce(&mut File, &Path) -> Result<()>,
{
    let (parent, name) = split_path(path)?;
    let (tmp_path, mut file) = create_temp_file(&parent, &name)?;
    let guard = RemoveOnDrop::new(tmp_path.clone());

    fill(&mut file, &tmp_path)?;
    file.sync_all().at(&tmp_path)?;
    drop(file);

    fs::rename(&tmp_path, path).at(path)?;
    guard.disarm();
    if sync_dir {
        self::sync_dir(&parent)?;
    }
    tracing::debug!(path = %path.display(), "atomically replaced file");
    Ok(())
}

/// Builds a new directory with `build` and atomically publishes it at
/// `target`, which must not exist (see the module docs for the protocol).
///
/// `build` receives the path of the (empty) temporary directory to fill; its
/// value is returned once the directory is in place. If `build` or any later
/// step fails, the temporary directory is removed and nothing appears at
/// `target`. Fails with [`Error::AlreadyExists`] if `target` exists (checked
/// atomically by the final rename where the file system supports
/// `RENAME_NOREPLACE`).
pub fn publish_new_dir<T, F>(target: &Path, build: F) -> Result<T>
where
    F: FnOnce(&Path) -> Result<T>,
{
    let (parent, name) = split_path(target)?;
    let mut hidden = OsString::from(".");
    hidden.push(&name);
    let tmp = sibling(&parent, &hidden, TMP_MARKER);
    fs::create_dir(&tmp).at(&tmp)?;
    let guard = RemoveOnDrop::new(tmp.clone());

    let value = build(&tmp)?;
    sync_tree(&tmp)?;
    rename_no_replace(&tmp, target)?;
    guard.disarm();
    sync_dir(&parent)?;
    tracing::debug!(target = %target.display(), "published directory atomically");
    Ok(value)
}

/// Removes temporaries left in `dir` by interrupted [`write_file`] calls
/// (hidden files named `.<name>.tmp-<16 hex digits>`). Returns how many were removed.
pub(crate) fn remove_stale_temps(dir: &Path) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let name = entry.file_name();
        if is_file_temp_name(&name) && entry.file_type().at(&entry.path())?.is_file() {
            let path = entry.path();
            fs::remove_file(&path).at(&path)?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// `fsync`s a directory so that entries created, renamed or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Returns a fresh 64-bit value that differs between calls, processes and
/// runs; used for temporary names (uniqueness is enforced separately by
/// `O_EXCL` / `mkdir`, so this need not be cryptographic).
pub(crate) fn unique_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = u64::from(std::process::id());
    splitmix64(nanos ^ pid.rotate_left(32) ^ splitmix64(count))
}

/// The splitmix64 finalizer: a cheap, well-mixing 64-bit hash.
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Splits `path` into (parent directory, final component).
fn split_path(path: &Path) -> Result<(PathBuf, OsString)> {
    let name = path.file_name().ok_or_else(|| {
        Error::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"),
        )
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name.to_os_string()))
}

/// `<parent>/<name><marker><16 hex digits>`.
fn sibling(parent: &Path, name: &OsStr, marker: &str) -> PathBuf {
    let mut s = name.to_os_string();
    s.push(format!("{marker}{:016x}", unique_u64()));
    parent.join(s)
}

/// Creates `.<name>.tmp-<hex>` in `parent` with `O_EXCL`, retrying on collisions.
fn create_temp_file(parent: &Path, name: &OsStr) -> Result<(PathBuf, File)> {
    let mut hidden = OsString::from(".");
    hidden.push(name);
    let mut last_err = None;
    for _ in 0..CREATE_ATTEMPTS {
        let path = sibling(parent, &hidden, TMP_MARKER);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => return Ok((path, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
            Err(e) => return Err(Error::io(&path, e)),
        }
    }
    let e = last_err
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::AlreadyExists, "no free temporary name"));
    Err(Error::io(parent, e))
}

/// Whether `file_name` looks like `.<something>.tmp-<16 hex digits>`.
fn is_file_temp_name(file_name: &OsStr) -> bool {
    let bytes = file_name.as_bytes();
    let tail = TMP_MARKER.len() + 16;
    bytes.len() > tail + 1
        && bytes[0] == b'.'
        && &bytes[bytes.len() - tail..bytes.len() - 16] == TMP_MARKER.as_bytes()
        && bytes[bytes.len() - 16..].iter().all(u8::is_ascii_hexdigit)
}

/// Fsyncs every regular file and directory below (and including) `dir`.
/// Symbolic links are not followed.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path = entry.path();
        let kind = entry.file_type().at(&path)?;
        if kind.is_dir() {
            sync_tree(&path)?;
        } else if kind.is_file() {
            File::open(&path).and_then(|f| f.sync_all()).at(&path)?;
        }
    }
    sync_dir(dir)
}

/// Renames `from` to `to` unless `to` exists ([`Error::AlreadyExists`]).
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    match renameat2_noreplace(from, to) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(already_exists(to)),
        Err(e) if !noreplace_unsupported(&e) => return Err(Error::io(to, e)),
        Err(e) => tracing::debug!(error = %e, "RENAME_NOREPLACE unsupported, checking first"),
    }
    // Without kernel support the check and the rename are two steps; callers
    // serialise their writers, so only a foreign process could slip in between.
    match fs::symlink_metadata(to) {
        Ok(_) => Err(already_exists(to)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::rename(from, to).at(to),
        Err(e) => Err(Error::io(to, e)),
    }
}

fn already_exists(path: &Path) -> Error {
    Error::AlreadyExists {
        path: path.to_path_buf(),
    }
}

/// `renameat2(from, to, RENAME_NOREPLACE)`.
fn renameat2_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let from_c = CString::new(from.as_os_str().as_bytes())?;
    let to_c = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both pointers come from live, NUL-terminated `CString`s that
    // outlive the call; the syscall only reads them. AT_FDCWD makes relative
    // paths resolve like the rest of std::fs does.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Errors meaning "this kernel / file system cannot rename without replacing".
fn noreplace_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// Best-effort recursive removal, logging instead of failing.
fn remove_dir_logged(path: &Path) {
    let res = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    if let Err(e) = res {
        tracing::warn!(path = %path.display(), error = %e, "could not remove leftover");
    }
}

/// Removes a temporary file or directory when dropped, unless disarmed.
struct RemoveOnDrop {
    path: Option<PathBuf>,
}

impl RemoveOnDrop {
    fn new(path: PathBuf) -> Self {
        Self { path: Some(path) }
    }

    fn disarm(mut self) {
        self.path = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            remove_dir_logged(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files_in(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_file_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(files_in(dir.path()), vec!["a.bin"]);
    }

    #[test]
    fn failing_fill_keeps_previous_and_removes_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.bin");
        write_file(&p, b"good").unwrap();
        let err = write_file_with(&p, |f, tmp| {
            f.write_all(b"half").at(tmp)?;
            Err(Error::invalid("boom"))
        })
        .unwrap_err();
        assert!(matches!(err, Error::InvalidMemory { .. }));
        assert_eq!(fs::read(&p).unwrap(), b"good");
        assert_eq!(files_in(dir.path()), vec!["a.bin"]);
    }

    #[test]
    fn stale_temps_are_recognised_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(".a.bin.tmp-0123456789abcdef"), b"x").unwrap();
        fs::write(dir.path().join("a.bin"), b"keep").unwrap();
        fs::write(dir.path().join("a.tmp-notreally"), b"keep").unwrap();
        assert_eq!(remove_stale_temps(dir.path()).unwrap(), 1);
        assert_eq!(files_in(dir.path()), vec!["a.bin", "a.tmp-notreally"]);
    }

    #[test]
    fn publish_new_dir_builds_then_appears() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("tpl");
        let value = publish_new_dir(&target, |d| {
            fs::write(d.join("f"), b"v1").at(d)?;
            fs::create_dir(d.join("sub")).at(d)?;
            fs::write(d.join("sub/g"), b"v1").at(d)?;
            Ok(7)
        })
        .unwrap();
        assert_eq!(value, 7);
        assert_eq!(fs::read(target.join("sub/g")).unwrap(), b"v1");
        assert_eq!(files_in(root.path()), vec!["tpl"]);
    }

    #[test]
    fn publish_new_dir_never_replaces() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("tpl");
        // Even an empty directory, which plain rename(2) would replace, is kept.
        fs::create_dir(&target).unwrap();
        let err = publish_new_dir(&target, |d| fs::write(d.join("f"), b"new").at(d)).unwrap_err();
        assert!(
            matches!(err, Error::AlreadyExists { ref path } if path == &target),
            "{err:?}"
        );
        assert_eq!(files_in(root.path()), vec!["tpl"]);
        assert!(files_in(&target).is_empty());
    }

    #[test]
    fn failing_build_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let target = root.path().join("tpl");
        let err = publish_new_dir(&target, |d| {
            fs::write(d.join("f"), b"partial").at(d)?;
            Err::<(), _>(Error::invalid("injected"))
        })
        .unwrap_err();
        assert!(matches!(err, Error::InvalidMemory { .. }));
        assert!(files_in(root.path()).is_empty());
    }
}
