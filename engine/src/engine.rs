//! The engine: owns the hypervisor handle, the data directory and every capsule, and is the
//! entry point of the API. Lifecycle operations (start, pause, resume, snapshot, destroy)
//! live here; commands run in [`crate::capsule`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{RecvTimeoutError, Sender};

use capsule_snapshot::memory::WriteOptions;
use capsule_vmm::{HostInfo, Hypervisor};

use crate::capsule::{Capsule, CapsuleShared, CapsuleSpec};
use crate::config::{CapsuleConfig, EngineConfig};
use crate::error::{Error, Result};
use crate::guest::{BootContext, GuestEvents, GuestKind, MemoryOrigin, Pin, Resources, Runtime};
use crate::id::CapsuleId;
use crate::limiter::StartLimiter;
use crate::persist::{self, MemoryImage};
use crate::pool::ShellPool;
use crate::status::{CapsuleInfo, Status};
use crate::store::{CapsuleMeta, Store};
use crate::template::{validate_name, Template, TemplateInfo, Templates};

/// Creates, finds, pauses, resumes and destroys capsules. `Send + Sync` and cheap to clone:
/// share it between threads freely. Dropping the last clone (and every [`Capsule`] handle)
/// stops all running capsules; paused ones stay on disk for the next engine.
///
/// ```no_run
/// use capsule::{CapsuleConfig, Engine, EngineConfig};
/// # fn main() -> capsule::Result<()> {
/// let engine = Engine::new(EngineConfig::default())?;
/// let capsule = engine.create(CapsuleConfig::new("probe"))?;
/// let out = capsule.commands().run("echo hello")?;
/// assert_eq!(out.stdout, "hello\n");
/// capsule.destroy()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

type CapsuleMap = HashMap<CapsuleId, Arc<CapsuleShared>>;

pub(crate) struct EngineInner {
    config: EngineConfig,
    hypervisor: Hypervisor,
    store: Store,
    templates: Templates,
    capsules: RwLock<CapsuleMap>,
    starts: Arc<StartLimiter>,
    shells: Arc<ShellPool>,
    /// Stops the inactivity watcher when dropped.
    watcher: Mutex<Option<(Sender<()>, JoinHandle<()>)>>,
    /// Test hook: make the next snapshot layer write fail after this many bytes.
    write_fault: Mutex<Option<u64>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.inner.config.data_dir)
            .field("host", self.inner.hypervisor.info())
            .field("capsules", &self.inner.read().len())
            .finish()
    }
}

impl Engine {
    /// Opens KVM and the data directory, and lists the capsules a previous engine left
    /// there: paused ones as [`Status::Paused`] (resumable), ones that were running when
    /// their process ended as [`Status::Stopped`].
    ///
    /// Errors: [`Error::KvmUnavailable`] (with whether the device is missing or not
    /// permitted), [`Error::DataDirLocked`] if another engine has the directory open,
    /// [`Error::Io`] if it cannot be created.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        let hypervisor = Hypervisor::open_path(&config.kvm_path)?;
        capsule_vmm::vcpu::install_kick_handler()?;
        let store = Store::open(&config.data_dir)?;
        let templates = Templates::new(store.templates_dir());
        let mut capsules = HashMap::new();
        let mut live = Vec::new();
        let mut loaded = store.load()?;
        let mut found: Vec<(CapsuleMeta, Status)> = Vec::new();
        for id in &loaded.snapshots {
            let meta = match loaded.journal.remove(id.as_str()) {
                Some(meta) => Some(meta),
                // Not in the journal (its line was lost): the snapshot describes it.
                None => persist::load(&store.snapshot_dir(id))
                    .ok()
                    .and_then(|state| state.capsule),
            };
            match meta {
                Some(meta) => found.push((meta, Status::Paused)),
                None => tracing::warn!(capsule = %id, "skipping a snapshot without a description"),
            }
        }
        // In the journal without a snapshot: it was running when its process ended.
        found.extend(
            loaded
                .journal
                .into_values()
                .map(|meta| (meta, Status::Stopped)),
        );
        for (meta, status) in found {
            let Ok(id) = meta.id.parse::<CapsuleId>() else {
                continue;
            };
            let Some(kind) = GuestKind::builtin(&meta.kind) else {
                tracing::warn!(capsule = %id, kind = %meta.kind, "skipping a capsule of unknown kind");
                continue;
            };
            let shared = CapsuleShared::new(CapsuleSpec {
                id: id.clone(),
                template: meta.template.clone(),
                kind,
                resources: Resources {
                    vcpus: meta.vcpus,
                    memory_mb: meta.memory_mb,
                },
                timeout: Duration::from_millis(meta.timeout_ms),
                created_at: meta.created_at(),
                status,
            });
            capsules.insert(id, shared);
            live.push(meta);
        }
        store.compact(&live)?;
        tracing::info!(
            host = %hypervisor.info().virtualization,
            data_dir = %config.data_dir.display(),
            restored = capsules.len(),
            "engine ready"
        );
        let inner = Arc::new(EngineInner {
            starts: Arc::new(StartLimiter::new(config.max_concurrent_starts)),
            shells: Arc::new(ShellPool::new(hypervisor.clone(), config.shell_pool_size)?),
            config,
            hypervisor,
            store,
            templates,
            capsules: RwLock::new(capsules),
            watcher: Mutex::new(None),
            write_fault: Mutex::new(None),
        });
        inner.start_watcher()?;
        Ok(Engine { inner })
    }

    /// What the host's KVM is: hardware virtualization or a software/paravirtual
    /// implementation such as PVM (see [`HostInfo::can_boot_linux`]).
    pub fn host(&self) -> &HostInfo {
        self.inner.hypervisor.info()
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// Creates a capsule from a built-in template (`"probe"`) or one made with
    /// [`Capsule::snapshot`]. With [`CapsuleConfig::wait`] (the default) this returns once
    /// the capsule is running; if it fails to start, the error is returned and nothing is
    /// left behind. Without `wait` it returns at once ([`Status::Pending`] or `Starting`) and
    /// a failure shows as [`Status::Error`].
    ///
    /// Errors: [`Error::InvalidConfig`] for an unknown template, 0 vCPUs, memory outside the
    /// template's range, or resources that differ from a snapshot template's; start
    /// failures ([`Error::GuestCrashed`], [`Error::BootTimeout`], [`Error::Snapshot`],
    /// [`Error::Hypervisor`]).
    pub fn create(&self, config: CapsuleConfig) -> Result<Capsule> {
        let (kind, resources, template) = self.inner.resolve(&config)?;
        kind.validate(&resources, self.host())?;
        let shared = CapsuleShared::new(CapsuleSpec {
            id: CapsuleId::generate(),
            template: config.template.clone(),
            kind,
            resources,
            timeout: config.timeout,
            created_at: SystemTime::now(),
            status: Status::Pending,
        });
        self.inner.store.write_meta(&shared.meta())?;
        self.inner.write().insert(shared.id.clone(), shared.clone());
        let capsule = Capsule {
            shared: shared.clone(),
            engine: self.inner.clone(),
        };
        if config.wait {
            if let Err(e) = self.inner.boot(&shared, template) {
                let _ = self.inner.destroy(&shared.id);
                return Err(e);
            }
        } else {
            let inner = self.inner.clone();
            let background = shared.clone();
            std::thread::Builder::new()
                .name(format!("{}-boot", shared.id))
                .spawn(move || {
                    if let Err(e) = inner.boot(&background, template) {
                        background.fail(e.to_string());
                    }
                })
                .map_err(|e| {
                    let _ = self.inner.destroy(&shared.id);
                    Error::Hypervisor(capsule_vmm::Error::Os {
                        op: "spawning a boot thread",
                        source: e,
                    })
                })?;
        }
        Ok(capsule)
    }

    /// A handle to the capsule `id`, in whatever status it is. Errors: [`Error::NotFound`].
    pub fn get(&self, id: &CapsuleId) -> Result<Capsule> {
        let shared = self.inner.find(id)?;
        Ok(Capsule {
            shared,
            engine: self.inner.clone(),
        })
    }

    /// A handle to the capsule `id`, resumed if it was paused (so it is running when this
    /// returns). Errors: [`Error::NotFound`], and those of [`Capsule::resume`].
    pub fn connect(&self, id: &CapsuleId) -> Result<Capsule> {
        let capsule = self.get(id)?;
        if capsule.status() == Status::Paused {
            capsule.resume()?;
        }
        Ok(capsule)
    }

    /// Pauses the capsule `id` (see [`Capsule::pause`]).
    pub fn pause(&self, id: &CapsuleId) -> Result<()> {
        let shared = self.inner.find(id)?;
        self.inner.pause(&shared)
    }

    /// Resumes the capsule `id` (see [`Capsule::resume`]).
    pub fn resume(&self, id: &CapsuleId) -> Result<()> {
        let shared = self.inner.find(id)?;
        self.inner.resume(&shared)
    }

    /// Destroys the capsule `id` (see [`Capsule::destroy`]). Errors: [`Error::NotFound`].
    pub fn destroy(&self, id: &CapsuleId) -> Result<()> {
        self.inner.destroy(id)
    }

    /// Information about every capsule, oldest first.
    pub fn list(&self) -> Vec<CapsuleInfo> {
        let mut infos: Vec<_> = self.inner.read().values().map(|c| c.info()).collect();
        infos.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        infos
    }

    /// Every template in the data directory (the built-in `"probe"` is not listed).
    pub fn templates(&self) -> Result<Vec<TemplateInfo>> {
        self.inner.templates.list()
    }

    /// Deletes a template. Capsules already started from it are not affected: paused ones
    /// hold their own links to its files.
    ///
    /// Errors: [`Error::TemplateInUse`] while running capsules map its memory (pause or
    /// destroy them first), [`Error::TemplateNotFound`], [`Error::InvalidArgument`] for a
    /// built-in or malformed name.
    pub fn delete_template(&self, name: &str) -> Result<()> {
        // Pre-built shells map the template's memory: let them go first.
        if let Some(template) = self.inner.templates.get(name)? {
            self.inner.shells.forget_backing(template.base_id);
        }
        self.inner.templates.delete(name)
    }

    /// Test hook: occupies one start slot until the returned guard drops, so tests can hold
    /// capsules in [`Status::Pending`] deterministically. Not part of the stable API.
    #[doc(hidden)]
    pub fn hold_start_slot(&self) -> impl Drop + std::fmt::Debug {
        self.inner.starts.acquire()
    }

    /// Test hook: how many pre-built VM shells wait in the pool, all shapes together, and
    /// how many starts took one so far. Not part of the stable API.
    #[doc(hidden)]
    pub fn shell_pool_counts(&self) -> (usize, u64) {
        self.inner.shells.counts()
    }

    /// Test hook: the next snapshot memory write fails after `bytes` bytes (an injected I/O
    /// error, as from a full disk). Not part of the stable API.
    #[doc(hidden)]
    pub fn inject_write_fault(&self, bytes: Option<u64>) {
        *self
            .inner
            .write_fault
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = bytes;
    }
}

impl EngineInner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, CapsuleMap> {
        self.capsules.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, CapsuleMap> {
        self.capsules.write().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, id: &CapsuleId) -> Result<Arc<CapsuleShared>> {
        self.read()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.clone()))
    }

    /// The guest kind, resources and (for a snapshot template) template of a config.
    fn resolve(
        &self,
        config: &CapsuleConfig,
    ) -> Result<(GuestKind, Resources, Option<Arc<Template>>)> {
        if let Some(kind) = GuestKind::builtin(&config.template) {
            let (vcpus, memory_mb) = kind.defaults();
            let resources = Resources {
                vcpus: config.vcpus.unwrap_or(vcpus),
                memory_mb: config.memory_mb.unwrap_or(memory_mb),
            };
            return Ok((kind, resources, None));
        }
        let Some(template) = self.templates.get(&config.template)? else {
            return Err(Error::InvalidConfig(format!(
                "unknown template {:?}",
                config.template
            )));
        };
        let resources = Resources {
            vcpus: template.state.vcpus,
            memory_mb: template.state.memory_mb,
        };
        if config.vcpus.is_some_and(|v| v != resources.vcpus)
            || config.memory_mb.is_some_and(|m| m != resources.memory_mb)
        {
            return Err(Error::InvalidConfig(format!(
                "template {:?} has {} vCPUs and {} MiB; a capsule started from it cannot change them",
                config.template, resources.vcpus, resources.memory_mb
            )));
        }
        Ok((template.kind, resources, Some(template)))
    }

    fn context(&self, shared: &Arc<CapsuleShared>) -> BootContext {
        let events: Arc<dyn GuestEvents> = shared.clone();
        BootContext {
            id: shared.id.clone(),
            hypervisor: self.hypervisor.clone(),
            config: shared.resources,
            boot_timeout: self.config.boot_timeout,
            events,
            shells: self.shells.clone(),
            linux_images: self.config.get_linux_images(),
        }
    }

    /// Pending → Starting → Running, within the concurrent-start limit.
    fn boot(&self, shared: &Arc<CapsuleShared>, template: Option<Arc<Template>>) -> Result<()> {
        let _permit = self.starts.acquire();
        let _ops = shared.lock_ops();
        if !shared.mark_starting() {
            return Err(Error::InvalidState {
                id: shared.id.clone(),
                status: shared.status(),
                operation: "start",
            });
        }
        let ctx = self.context(shared);
        let runtime = match template {
            None => shared.kind.boot(ctx)?,
            Some(template) => {
                let base = template.base.try_clone().map_err(|source| Error::Io {
                    op: "opening a template layer",
                    path: template.dir.clone(),
                    source,
                })?;
                let image = MemoryImage {
                    dir: template.dir.clone(),
                    chain: template.state.memory.clone(),
                    base: Some(base),
                    base_id: Some(template.base_id),
                    patch: template.state.patch.clone(),
                };
                let origin = MemoryOrigin::Chain {
                    dir: template.dir.clone(),
                    chain: template.state.memory.clone(),
                    _pin: Some(template.clone() as Pin),
                };
                shared
                    .kind
                    .restore(ctx, &template.state.machine, &image, origin)?
            }
        };
        shared.mark_running(runtime);
        tracing::debug!(capsule = %shared.id, "running");
        Ok(())
    }

    pub(crate) fn destroy(&self, id: &CapsuleId) -> Result<()> {
        let shared = self
            .write()
            .remove(id)
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        let _ops = shared.lock_ops();
        shared.stop();
        self.store.remove_capsule(id)
    }

    fn write_options(&self) -> WriteOptions {
        let fault = self
            .write_fault
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Pauses write with O_DIRECT: faster than buffered writes + fsync on most disks,
        // and a paused capsule should not leave its memory behind in the page cache.
        match fault {
            Some(bytes) => WriteOptions::failing_after(bytes),
            None => WriteOptions::default(),
        }
        .with_direct_io(true)
    }

    pub(crate) fn pause(&self, shared: &Arc<CapsuleShared>) -> Result<()> {
        let _ops = shared.lock_ops();
        if shared.status() == Status::Paused {
            return Ok(());
        }
        let Some(runtime) = shared.running_runtime() else {
            return Err(shared.current_state_error("pause"));
        };
        let frozen = runtime.freeze()?;
        let dir = self.store.snapshot_dir(&shared.id);
        persist::write_snapshot(&dir, &frozen, &shared.meta(), &self.write_options())?;
        // Committed: release the VM. Frozen vCPU threads end on shutdown.
        if let Some(runtime) = shared.mark_paused() {
            runtime.shutdown();
        }
        drop(frozen);
        tracing::debug!(capsule = %shared.id, "paused");
        Ok(())
    }

    pub(crate) fn resume(&self, shared: &Arc<CapsuleShared>) -> Result<()> {
        let _ops = shared.lock_ops();
        match shared.status() {
            Status::Running => return Ok(()),
            Status::Paused => {}
            _ => return Err(shared.current_state_error("resume")),
        }
        let dir = self.store.snapshot_dir(&shared.id);
        let state = persist::load(&dir)?;
        if state.vcpus != shared.resources.vcpus
            || state.memory_mb != shared.resources.memory_mb
            || state.kind != shared.kind.name()
        {
            return Err(Error::Snapshot(capsule_snapshot::Error::InvalidMemory {
                reason: "the snapshot does not match the capsule's configuration".into(),
            }));
        }
        let image = MemoryImage {
            dir: dir.clone(),
            chain: state.memory.clone(),
            base: None,
            base_id: None,
            patch: state.patch,
        };
        let origin = MemoryOrigin::Chain {
            dir,
            chain: state.memory,
            _pin: None,
        };
        let runtime: Arc<dyn Runtime> =
            shared
                .kind
                .restore(self.context(shared), &state.machine, &image, origin)?;
        shared.mark_resumed(runtime);
        // The snapshot no longer describes the capsule, which runs on from it: if this process
        // dies now, a new engine must report it stopped, not roll it back to this state. Its
        // layers stay: the running capsule maps them and its next pause builds on them.
        let state_file = self
            .store
            .snapshot_dir(&shared.id)
            .join(capsule_snapshot::STATE_FILE_NAME);
        if let Err(e) = std::fs::remove_file(&state_file) {
            tracing::warn!(capsule = %shared.id, error = %e, "could not retire the snapshot");
        }
        tracing::debug!(capsule = %shared.id, "resumed");
        Ok(())
    }

    pub(crate) fn snapshot(&self, shared: &Arc<CapsuleShared>, name: &str) -> Result<TemplateInfo> {
        validate_name(name)?;
        let _ops = shared.lock_ops();
        let Some(runtime) = shared.running_runtime() else {
            return Err(shared.current_state_error("snapshot"));
        };
        let _writer = self
            .templates
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let dir = self.templates.dir(name);
        if dir.exists() {
            return Err(Error::InvalidArgument(format!(
                "a template named {name:?} already exists"
            )));
        }
        let frozen = runtime.freeze()?;
        persist::write_template(
            &dir,
            &frozen,
            shared.kind.name(),
            shared.resources.vcpus,
            shared.resources.memory_mb,
        )?;
        drop(frozen);
        Ok(TemplateInfo {
            name: name.to_owned(),
            vcpus: shared.resources.vcpus,
            memory_mb: shared.resources.memory_mb,
            disk_bytes: 0,
            created_at: SystemTime::now(),
        })
    }

    /// Starts the thread that pauses capsules idle for longer than their timeout.
    fn start_watcher(self: &Arc<Self>) -> Result<()> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let weak: Weak<EngineInner> = Arc::downgrade(self);
        let interval = self.config.idle_check_interval;
        let handle = std::thread::Builder::new()
            .name("capsule-idle-watch".into())
            .spawn(move || loop {
                match stop_rx.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                inner.pause_idle();
            })
            .map_err(|e| {
                Error::Hypervisor(capsule_vmm::Error::Os {
                    op: "spawning the inactivity watcher",
                    source: e,
                })
            })?;
        *self.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some((stop_tx, handle));
        Ok(())
    }

    /// Pauses every running capsule whose inactivity timeout has passed.
    fn pause_idle(&self) {
        let now = SystemTime::now();
        let idle = |c: &CapsuleShared| {
            !c.timeout.is_zero()
                && c.status() == Status::Running
                && now
                    .duration_since(c.last_activity())
                    .is_ok_and(|idle| idle >= c.timeout)
        };
        let due: Vec<_> = self.read().values().filter(|c| idle(c)).cloned().collect();
        for capsule in due {
            tracing::debug!(capsule = %capsule.id, "pausing after inactivity");
            if let Err(e) = self.pause(&capsule) {
                tracing::warn!(capsule = %capsule.id, error = %e, "auto-pause failed");
            }
        }
    }
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self
            .watcher
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            drop(stop);
            // The watcher may be the thread dropping us; never join it from itself.
            if handle.thread().id() != std::thread::current().id() {
                let _ = handle.join();
            }
        }
        let capsules: Vec<_> = self.write().drain().map(|(_, c)| c).collect();
        for capsule in capsules {
            capsule.stop();
        }
    }
}
