//! The engine's data directory: one lock, capsule metadata, paused capsules' snapshots and
//! templates.
//!
//! ```text
//! DATA_DIR/
//!   lock                        flock()ed by the engine that has the directory open
//!   capsules/<id>/meta          CapsuleMeta (state file format)
//!   capsules/<id>/snapshot/     the capsule's snapshot while it is paused:
//!       state.bin               SnapshotState: VM, vCPU and guest state + the memory chain
//!       *.layer                 memory layers (the base may be a hard link to a template's)
//!   templates/<name>/           a template: the same files as a snapshot
//! ```
//!
//! Every file is written under a temporary name, fsynced and renamed into place (see
//! `capsule_snapshot::atomic`), except a running capsule's `meta`, which is written without
//! fsync to keep `create` fast: losing it in a power cut only forgets a capsule that could not
//! have survived anyway.

use std::fs::{self, File};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::id::CapsuleId;

/// What the data directory remembers about a capsule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CapsuleMeta {
    pub(crate) id: String,
    pub(crate) template: String,
    /// The guest kind (`"probe"`).
    pub(crate) kind: String,
    pub(crate) vcpus: u32,
    pub(crate) memory_mb: u64,
    pub(crate) timeout_ms: u64,
    pub(crate) created_at_ms: u64,
}

impl CapsuleMeta {
    pub(crate) fn created_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.created_at_ms)
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An open, locked data directory.
#[derive(Debug)]
pub(crate) struct Store {
    root: PathBuf,
    /// Holds the flock for as long as the engine lives.
    _lock: File,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn snapshot_err(e: capsule_snapshot::Error) -> Error {
    Error::Snapshot(e)
}

impl Store {
    /// Creates the layout if needed and takes the directory's lock.
    pub(crate) fn open(root: &Path) -> Result<Store> {
        for dir in [
            root.to_path_buf(),
            root.join("capsules"),
            root.join("templates"),
        ] {
            fs::create_dir_all(&dir).map_err(io_err("creating the data directory", &dir))?;
        }
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("opening the lock file", &lock_path))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::DataDirLocked(root.to_path_buf()));
            }
            return Err(Error::Io {
                op: "locking the data directory",
                path: lock_path,
                source,
            });
        }
        Ok(Store {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    pub(crate) fn capsule_dir(&self, id: &CapsuleId) -> PathBuf {
        self.root.join("capsules").join(id.as_str())
    }

    pub(crate) fn snapshot_dir(&self, id: &CapsuleId) -> PathBuf {
        self.capsule_dir(id).join("snapshot")
    }

    pub(crate) fn templates_dir(&self) -> PathBuf {
        self.root.join("templates")
    }

    /// Records a new capsule (fast path: no fsync, see the module docs).
    pub(crate) fn write_meta(&self, meta: &CapsuleMeta) -> Result<()> {
        let id: CapsuleId = meta.id.parse()?;
        let dir = self.capsule_dir(&id);
        fs::create_dir_all(&dir).map_err(io_err("creating the capsule directory", &dir))?;
        let bytes = capsule_snapshot::state_file::encode_state_bytes(meta).map_err(snapshot_err)?;
        let tmp = dir.join(".meta.tmp");
        fs::write(&tmp, bytes).map_err(io_err("writing capsule metadata", &tmp))?;
        let path = dir.join("meta");
        fs::rename(&tmp, &path).map_err(io_err("writing capsule metadata", &path))
    }

    /// Forgets a capsule and deletes its files.
    pub(crate) fn remove_capsule(&self, id: &CapsuleId) -> Result<()> {
        let dir = self.capsule_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("deleting the capsule's files", &dir)(e)),
        }
    }

    /// Every capsule recorded in the directory, with whether it has a snapshot (is paused).
    /// Entries that cannot be read are skipped with a warning.
    pub(crate) fn load_capsules(&self) -> Result<Vec<(CapsuleMeta, bool)>> {
        let dir = self.root.join("capsules");
        let mut found = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing capsules", &dir))? {
            let entry = entry.map_err(io_err("listing capsules", &dir))?;
            let path = entry.path().join("meta");
            let meta: CapsuleMeta = match fs::read(&path).map_err(|e| e.to_string()).and_then(|b| {
                capsule_snapshot::state_file::decode_state_bytes(&b).map_err(|e| e.to_string())
            }) {
                Ok(meta) => meta,
                Err(why) => {
                    tracing::warn!(path = %path.display(), %why, "skipping unreadable capsule metadata");
                    continue;
                }
            };
            if meta.id.parse::<CapsuleId>().is_err()
                || entry.file_name().to_str() != Some(meta.id.as_str())
            {
                tracing::warn!(path = %path.display(), "skipping capsule metadata with a foreign id");
                continue;
            }
            let paused = entry
                .path()
                .join("snapshot")
                .join(capsule_snapshot::STATE_FILE_NAME)
                .exists();
            found.push((meta, paused));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_has_one_engine_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(matches!(
            Store::open(dir.path()),
            Err(Error::DataDirLocked(_))
        ));
        drop(store);
        assert!(Store::open(dir.path()).is_ok());
    }

    #[test]
    fn metadata_round_trips_and_bad_entries_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = CapsuleId::generate();
        let meta = CapsuleMeta {
            id: id.to_string(),
            template: "probe".into(),
            kind: "probe".into(),
            vcpus: 2,
            memory_mb: 64,
            timeout_ms: 0,
            created_at_ms: 1234,
        };
        store.write_meta(&meta).unwrap();
        fs::create_dir_all(dir.path().join("capsules/cl-garbage")).unwrap();
        fs::write(
            dir.path().join("capsules/cl-garbage/meta"),
            b"not a state file",
        )
        .unwrap();
        let loaded = store.load_capsules().unwrap();
        assert_eq!(loaded, vec![(meta, false)]);
        store.remove_capsule(&id).unwrap();
        assert!(store.load_capsules().unwrap().is_empty());
        store.remove_capsule(&id).unwrap();
    }
}
