//! The engine's data directory: one lock, a journal of capsules, paused capsules' snapshots
//! and templates.
//!
//! ```text
//! DATA_DIR/
//!   lock                        flock()ed by the engine that has the directory open
//!   capsules.journal            one line per capsule created or destroyed (see below)
//!   capsules/<id>/snapshot/     the capsule's snapshot while it is paused:
//!       state.bin               SnapshotState: the capsule's description, VM, vCPU and guest
//!                               state, the memory chain and inline pages
//!       *.layer                 memory layers (the base may be a hard link to a template's)
//!   templates/<name>/           a template: the same files as a snapshot
//! ```
//!
//! The journal is a text file appended to without fsync, so that `create` costs one
//! `write(2)` rather than a directory and a file (on ext4, allocating inodes right after
//! many were deleted costs milliseconds). Lines are
//! `create ID TEMPLATE KIND VCPUS MEMORY_MB TIMEOUT_MS CREATED_MS` and `destroy ID`; a torn
//! last line is ignored. A new engine replays it, compacts it, and reports capsules that were
//! running when their process ended as stopped. A paused capsule does not depend on the
//! journal: its `state.bin` (fsynced) describes it fully.
//!
//! Snapshots and templates are written under temporary names, fsynced and renamed into place
//! (see `capsule_snapshot::atomic`).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::model::record::CapsuleRecord;
use crate::model::CapsuleId;
use crate::sync::lock;

/// The journal's first line; a journal without it is the same format from before the header
/// was written.
const JOURNAL_HEADER: &str = "capsule-journal 1";

/// Milliseconds since the Unix epoch.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The journal line recording `record`'s creation.
fn journal_line(record: &CapsuleRecord) -> String {
    format!(
        "create {} {} {} {} {} {} {}\n",
        record.id,
        record.template,
        record.kind,
        record.vcpus,
        record.memory_mb,
        record.timeout.as_millis(),
        unix_ms(record.created_at)
    )
}

/// Reads the fields after `create`; `None` for a torn or foreign line.
fn parse_create(fields: &[&str]) -> Option<CapsuleRecord> {
    let [id, template, kind, vcpus, memory_mb, timeout_ms, created_at_ms] = fields else {
        return None;
    };
    Some(CapsuleRecord {
        id: id.parse().ok()?,
        template: (*template).to_owned(),
        kind: kind.parse().ok()?,
        vcpus: vcpus.parse().ok()?,
        memory_mb: memory_mb.parse().ok()?,
        timeout: Duration::from_millis(timeout_ms.parse().ok()?),
        created_at: UNIX_EPOCH + Duration::from_millis(created_at_ms.parse().ok()?),
    })
}

/// What [`Store::load`] found.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Capsules the journal says exist, by id.
    pub(crate) journal: HashMap<CapsuleId, CapsuleRecord>,
    /// Capsules with a snapshot directory holding a `state.bin` (paused), by id.
    pub(crate) snapshots: Vec<CapsuleId>,
}

/// An open, locked data directory.
#[derive(Debug)]
pub(crate) struct Store {
    root: PathBuf,
    journal: Mutex<File>,
    /// Holds the flock for as long as the engine lives.
    _lock: File,
}

impl Store {
    /// Creates the layout if needed, takes the directory's lock and opens the journal.
    pub(crate) fn open(root: &Path) -> Result<Store> {
        for dir in [
            root.to_path_buf(),
            root.join("capsules"),
            root.join("templates"),
        ] {
            fs::create_dir_all(&dir).map_err(Error::io("creating the data directory", &dir))?;
        }
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(Error::io("opening the lock file", &lock_path))?;
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
        let journal_path = root.join(JOURNAL);
        let journal = File::options()
            .create(true)
            .append(true)
            .open(&journal_path)
            .map_err(Error::io("opening the capsule journal", &journal_path))?;
        Ok(Store {
            root: root.to_path_buf(),
            journal: Mutex::new(journal),
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

    fn append(&self, line: &str) -> Result<()> {
        let mut journal = lock(&self.journal);
        journal.write_all(line.as_bytes()).map_err(Error::io(
            "writing the capsule journal",
            &self.root.join(JOURNAL),
        ))
    }

    /// Records a new capsule (one append, no fsync: see the module docs).
    pub(crate) fn record(&self, record: &CapsuleRecord) -> Result<()> {
        self.append(&journal_line(record))
    }

    /// Forgets a capsule and deletes its files.
    pub(crate) fn remove_capsule(&self, id: &CapsuleId) -> Result<()> {
        self.append(&format!("destroy {id}\n"))?;
        let dir = self.capsule_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("deleting the capsule's files", &dir)(e)),
        }
    }

    /// Replays the journal and finds paused capsules' snapshots; directories of capsules
    /// that neither the journal nor a snapshot describe (left by a crash mid-destroy) are
    /// deleted.
    pub(crate) fn load(&self) -> Result<Loaded> {
        let mut loaded = Loaded::default();
        let journal_path = self.root.join(JOURNAL);
        let text = fs::read_to_string(&journal_path)
            .map_err(Error::io("reading the capsule journal", &journal_path))?;
        for line in text.lines() {
            if line == JOURNAL_HEADER {
                continue;
            }
            let fields: Vec<&str> = line.split(' ').collect();
            match fields.split_first() {
                Some((&"create", rest)) => match parse_create(rest) {
                    Some(record) => {
                        loaded.journal.insert(record.id.clone(), record);
                    }
                    None => tracing::warn!(%line, "skipping a malformed journal line"),
                },
                Some((&"destroy", [id])) => {
                    if let Ok(id) = id.parse::<CapsuleId>() {
                        loaded.journal.remove(&id);
                    }
                }
                _ => tracing::warn!(%line, "skipping a malformed journal line"),
            }
        }
        let dir = self.root.join("capsules");
        for entry in fs::read_dir(&dir).map_err(Error::io("listing capsules", &dir))? {
            let entry = entry.map_err(Error::io("listing capsules", &dir))?;
            let name = entry.file_name();
            let id = name.to_str().and_then(|n| n.parse::<CapsuleId>().ok());
            let has_snapshot = entry
                .path()
                .join("snapshot")
                .join(capsule_snapshot::STATE_FILE_NAME)
                .exists();
            match id {
                Some(id) if has_snapshot => loaded.snapshots.push(id),
                Some(id) if loaded.journal.contains_key(&id) => {}
                _ => {
                    tracing::warn!(path = %entry.path().display(), "removing a stale capsule directory");
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(loaded)
    }

    /// Rewrites the journal with exactly `live` (atomically, fsynced).
    pub(crate) fn compact<'a>(
        &self,
        live: impl IntoIterator<Item = &'a CapsuleRecord>,
    ) -> Result<()> {
        let mut text = format!("{JOURNAL_HEADER}\n");
        text.extend(live.into_iter().map(journal_line));
        let path = self.root.join(JOURNAL);
        let mut journal = lock(&self.journal);
        capsule_snapshot::atomic::write_file(&path, text.as_bytes())?;
        *journal = File::options()
            .append(true)
            .open(&path)
            .map_err(Error::io("opening the capsule journal", &path))?;
        Ok(())
    }
}

/// The journal's file name.
const JOURNAL: &str = "capsules.journal";

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
    fn the_journal_replays_compacts_and_skips_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let record = |n: u64| CapsuleRecord {
            id: CapsuleId::generate(),
            template: "probe".into(),
            kind: crate::model::GuestKind::Probe,
            vcpus: 2,
            memory_mb: 64,
            timeout: Duration::from_millis(n),
            created_at: UNIX_EPOCH + Duration::from_millis(1234),
        };
        let (a, b) = (record(1), record(2));
        store.record(&a).unwrap();
        store.record(&b).unwrap();
        store.remove_capsule(&a.id).unwrap();
        store.append("create cl-torn probe pro").unwrap();
        fs::create_dir_all(dir.path().join("capsules/cl-stale")).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.journal.len(), 1);
        assert_eq!(loaded.journal[&b.id], b);
        assert!(loaded.snapshots.is_empty());
        assert!(!dir.path().join("capsules/cl-stale").exists());
        store.compact([&b]).unwrap();
        store.record(&a).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.journal.len(), 2);
        assert_eq!(loaded.journal[&a.id], a);
    }
}
