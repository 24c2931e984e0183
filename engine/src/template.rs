//! Templates: named snapshots from which capsules start, sharing their memory copy-on-write.
//!
//! A template lives in `DATA_DIR/templates/<name>/` (one base layer + `state.bin`). The engine
//! keeps each template it has used loaded (parsed state and an open base layer), so a spawn
//! costs a `dup` and an `mmap`, not a file parse. Deleting a template that running capsules
//! still map is refused ([`crate::Error::TemplateInUse`]); paused capsules hold hard links to
//! the layers they need, so they never depend on a template.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::guest::GuestKind;
use crate::persist::{self, SnapshotState};
use crate::pool::BackingId;

/// A template, as listed by [`crate::Engine::templates`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TemplateInfo {
    /// Its name (what `CapsuleConfig::new` takes).
    pub name: String,
    /// vCPUs of capsules started from it.
    pub vcpus: u32,
    /// Memory of capsules started from it, in MiB.
    pub memory_mb: u64,
    /// Bytes its files occupy on disk (memory layers are sparse).
    pub disk_bytes: u64,
    /// When it was created.
    pub created_at: SystemTime,
}

/// A loaded template.
pub(crate) struct Template {
    pub(crate) dir: PathBuf,
    pub(crate) kind: GuestKind,
    pub(crate) state: SnapshotState,
    /// The base layer, open: each spawn maps a dup of it.
    pub(crate) base: File,
    /// `base`'s identity, for the VM shells pre-built with it mapped.
    pub(crate) base_id: BackingId,
}

/// Checks a template name: 1 to 64 of `[a-z0-9._-]`, starting with a letter or digit, and
/// not the name of a built-in template.
pub(crate) fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "{name:?} is not a valid template name (1 to 64 of a-z 0-9 . _ -, starting with a letter or digit)"
        )));
    }
    if GuestKind::builtin(name).is_some() {
        return Err(Error::InvalidArgument(format!(
            "{name:?} is a built-in template"
        )));
    }
    Ok(())
}

/// The templates of one data directory.
pub(crate) struct Templates {
    root: PathBuf,
    loaded: Mutex<HashMap<String, Arc<Template>>>,
    /// Serialises creating and deleting templates.
    pub(crate) writer: Mutex<()>,
}

impl Templates {
    pub(crate) fn new(root: PathBuf) -> Self {
        Templates {
            root,
            loaded: Mutex::new(HashMap::new()),
            writer: Mutex::new(()),
        }
    }

    pub(crate) fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn loaded(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Template>>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The template `name`, loading it on first use. `Ok(None)` if there is none.
    pub(crate) fn get(&self, name: &str) -> Result<Option<Arc<Template>>> {
        if validate_name(name).is_err() {
            return Ok(None);
        }
        if let Some(t) = self.loaded().get(name) {
            return Ok(Some(t.clone()));
        }
        let dir = self.dir(name);
        if !dir.join(capsule_snapshot::STATE_FILE_NAME).exists() {
            return Ok(None);
        }
        let state = persist::load(&dir)?;
        let kind = GuestKind::from_name(&state.kind)?;
        let base_name = state
            .memory
            .layers
            .first()
            .map(|l| l.file_name.clone())
            .unwrap_or_default();
        let base_path = dir.join(base_name);
        let base = File::open(&base_path).map_err(|source| Error::Io {
            op: "opening a template layer",
            path: base_path,
            source,
        })?;
        let base_id = BackingId::of(&base)?;
        let template = Arc::new(Template {
            dir,
            kind,
            state,
            base,
            base_id,
        });
        let mut loaded = self.loaded();
        Ok(Some(
            loaded.entry(name.to_owned()).or_insert(template).clone(),
        ))
    }

    /// Every template on disk.
    pub(crate) fn list(&self) -> Result<Vec<TemplateInfo>> {
        let entries = std::fs::read_dir(&self.root).map_err(|source| Error::Io {
            op: "listing templates",
            path: self.root.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if validate_name(&name).is_err() {
                continue; // temporaries and foreign files
            }
            match self.get(&name) {
                Ok(Some(t)) => out.push(TemplateInfo {
                    name,
                    vcpus: t.state.vcpus,
                    memory_mb: t.state.memory_mb,
                    disk_bytes: disk_bytes(&t.dir),
                    created_at: entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                }),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(template = %name, error = %e, "skipping unreadable template")
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes the template `name`, unless running capsules still map it.
    pub(crate) fn delete(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let dir = self.dir(name);
        {
            let mut loaded = self.loaded();
            if let Some(t) = loaded.get(name) {
                // One reference is the cache's; any other is a running capsule's.
                let users = Arc::strong_count(t) - 1;
                if users > 0 {
                    return Err(Error::TemplateInUse {
                        name: name.to_owned(),
                        capsules: users,
                    });
                }
                loaded.remove(name);
            }
        }
        if !dir.exists() {
            return Err(Error::TemplateNotFound(name.to_owned()));
        }
        std::fs::remove_dir_all(&dir).map_err(|source| Error::Io {
            op: "deleting a template",
            path: dir.clone(),
            source,
        })?;
        capsule_snapshot::atomic::sync_dir(&self.root).map_err(Error::Snapshot)
    }
}

fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_are_checked() {
        for good in ["a", "web-1", "py3.12_base", "0x"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".hidden",
            "UP",
            "a/b",
            "..",
            "probe",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }
}
