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
use std::sync::{Arc, Mutex, OnceLock};

use capsule_vmm::memory::TouchedOnly;

use crate::error::{Error, Result};
use crate::guest::MemoryImage;
use crate::guest::{MachineState, MemoryOrigin, Resources};
use crate::model::{CapsuleId, GuestKind, TemplateInfo};
use crate::pool::BackingId;
use crate::snapshot_files::{self, SnapshotState};
use crate::sync::lock;

/// A loaded template.
pub(crate) struct Template {
    dir: PathBuf,
    state: SnapshotState,
    /// The base layer, open: each spawn maps a dup of it.
    base: File,
    /// `base`'s identity, for the VM shells pre-built with it mapped.
    base_id: BackingId,
    /// A fork's template, with no name: its files go when the last capsule mapping it does.
    anonymous: bool,
    /// The userfaultfd its clones' memory is registered with so that each maps only the
    /// pages it touches (opened with the first clone; `None` where the kernel refuses).
    /// Clones pin the template, so it outlives their registrations.
    touched_only: OnceLock<Option<Arc<TouchedOnly>>>,
}

impl Template {
    /// Loads the template in `dir`.
    fn load(dir: PathBuf, anonymous: bool) -> Result<Template> {
        let state = snapshot_files::load(&dir)?;
        let base = state.memory.chain.open_base(&dir)?;
        let base_id = BackingId::of(&base, &dir)?;
        Ok(Template {
            dir,
            state,
            base,
            base_id,
            anonymous,
            touched_only: OnceLock::new(),
        })
    }

    /// The guest kind of capsules started from it.
    pub(crate) fn kind(&self) -> GuestKind {
        self.state.of.shape().0
    }

    /// The vCPUs and memory capsules started from it have.
    pub(crate) fn resources(&self) -> Resources {
        let (_, vcpus, memory_mb) = self.state.of.shape();
        Resources { vcpus, memory_mb }
    }

    /// Its machine state (vCPUs, VM, guest), without memory.
    pub(crate) fn machine(&self) -> &MachineState {
        &self.state.machine
    }

    /// The userfaultfd for its clones' memory (see the field), opened on first use.
    fn touched_only(&self) -> Option<Arc<TouchedOnly>> {
        self.touched_only
            .get_or_init(|| match TouchedOnly::new() {
                Ok(t) => Some(Arc::new(t)),
                Err(e) => {
                    tracing::debug!(error = %e, "template clones keep the kernel's fault-around");
                    None
                }
            })
            .clone()
    }

    /// The identity of its base layer file.
    pub(crate) fn base_id(&self) -> BackingId {
        self.base_id
    }

    /// Its memory, ready to be put under a new VM, and the origin a capsule started from it
    /// records (which keeps the template marked in use while the capsule runs).
    pub(crate) fn memory(self: &Arc<Self>) -> Result<(MemoryImage, MemoryOrigin)> {
        let base = self
            .base
            .try_clone()
            .map_err(Error::io("opening a template layer", &self.dir))?;
        let image = MemoryImage {
            dir: self.dir.clone(),
            memory: self.state.memory.clone(),
            base: Some(base),
            base_id: Some(self.base_id),
            touched_only: self.touched_only(),
        };
        let origin = MemoryOrigin::Chain {
            dir: self.dir.clone(),
            chain: self.state.memory.chain.clone(),
            _pin: Some(self.clone()),
        };
        Ok((image, origin))
    }
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
    writer: Mutex<()>,
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
        lock(&self.loaded)
    }

    /// Serialises creating and deleting templates for as long as the guard lives.
    pub(crate) fn lock_writer(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.writer)
    }

    /// A new directory for an anonymous template (a fork's): hidden from listings, since its
    /// name is not a template name.
    pub(crate) fn anonymous_dir(&self) -> PathBuf {
        self.root
            .join(format!("{ANONYMOUS_PREFIX}{}", CapsuleId::generate()))
    }

    /// Loads the anonymous template in `dir`; its files are removed when the last capsule
    /// mapping it (and the returned handle) is gone.
    pub(crate) fn load_anonymous(&self, dir: PathBuf) -> Result<Arc<Template>> {
        match Template::load(dir.clone(), true) {
            Ok(template) => Ok(Arc::new(template)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Removes the anonymous templates a process that ended left behind: capsules forked
    /// from them that were paused hold their own links to the layers they need.
    pub(crate) fn remove_stale_anonymous(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(ANONYMOUS_PREFIX)
            {
                tracing::debug!(path = %entry.path().display(), "removing a stale fork template");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// The template `name` as [`crate::Engine::templates`] lists it.
    pub(crate) fn info(&self, name: &str) -> Result<TemplateInfo> {
        let template = self
            .get(name)?
            .ok_or_else(|| Error::TemplateNotFound(name.to_owned()))?;
        let created_at = std::fs::metadata(&template.dir)
            .and_then(|m| m.modified())
            .map_err(Error::io("reading a template's metadata", &template.dir))?;
        Ok(TemplateInfo {
            name: name.to_owned(),
            vcpus: template.resources().vcpus,
            memory_mb: template.resources().memory_mb,
            disk_bytes: disk_bytes(&template.dir),
            created_at,
        })
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
        let template = Arc::new(Template::load(dir, false)?);
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
            match self.info(&name) {
                Ok(info) => out.push(info),
                Err(Error::TemplateNotFound(_)) => {}
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
        let _writer = self.lock_writer();
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
        Ok(capsule_snapshot::atomic::sync_dir(&self.root)?)
    }
}

/// How the directories of anonymous templates begin.
const ANONYMOUS_PREFIX: &str = ".fork-";

impl Drop for Template {
    fn drop(&mut self) {
        if self.anonymous {
            if let Err(e) = std::fs::remove_dir_all(&self.dir) {
                tracing::warn!(path = %self.dir.display(), error = %e, "could not remove a fork's template");
            }
        }
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
