//! [`Engine`]: the entry point of the API.

use std::sync::{Arc, Mutex};

use capsule_vmm::{HostInfo, Hypervisor};

use super::Capsule;
use crate::config::{CapsuleConfig, EngineConfig};
use crate::engine_core::{EngineCore, Owner};
use crate::error::Result;
use crate::limiter::StartLimiter;
use crate::model::{CapsuleId, CapsuleInfo, Status, TemplateInfo};
use crate::pool::ShellPool;
use crate::registry::Registry;
use crate::store::Store;
use crate::template::Templates;
use crate::{host_limits, idle_watch, lifecycle, recovery};

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
/// assert_eq!(out.stdout_str(), "hello\n");
/// capsule.destroy()?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Engine {
    // Before `core`: dropped first (see `Owner`).
    owner: Arc<Owner>,
    core: Arc<EngineCore>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.core.config.data_dir())
            .field("host", self.core.hypervisor.info())
            .field("capsules", &self.core.registry.len())
            .finish()
    }
}

impl Engine {
    /// Opens KVM and the data directory, and lists the capsules a previous engine left
    /// there: paused ones as [`Status::Paused`] (resumable), ones that were running when
    /// their process ended as [`Status::Stopped`]. Takes an [`EngineConfig`] or its builder.
    ///
    /// Errors: [`crate::Error::KvmUnavailable`] (with whether the device is missing or not
    /// permitted), [`crate::Error::DataDirLocked`] if another engine has the directory open,
    /// [`crate::Error::Io`] if it cannot be created.
    pub fn new(config: impl Into<EngineConfig>) -> Result<Engine> {
        let config = config.into();
        let hypervisor = Hypervisor::open_path(config.kvm_path())?;
        host_limits::raise_file_limit();
        capsule_vmm::vcpu::install_kick_handler()?;
        let store = Store::open(config.data_dir())?;
        let templates = Templates::new(store.templates_dir());
        templates.remove_stale_anonymous();
        let capsules = recovery::recover(&store)?;
        tracing::info!(
            host = %hypervisor.info().virtualization,
            data_dir = %config.data_dir().display(),
            restored = capsules.len(),
            "engine ready"
        );
        let core = Arc::new(EngineCore {
            starts: Arc::new(StartLimiter::new(config.max_concurrent_starts())),
            shells: Arc::new(ShellPool::new(
                hypervisor.clone(),
                config.shell_pool_size(),
            )?),
            config,
            hypervisor,
            store,
            templates,
            registry: Registry::new(capsules),
            admission: Default::default(),
            idle_watch: Mutex::new(None),
            pause_gate: Default::default(),
            write_fault: Mutex::new(None),
        });
        idle_watch::start(&core)?;
        Ok(Engine {
            owner: Owner::new(&core),
            core,
        })
    }

    /// What the host's KVM is: hardware virtualization or a software/paravirtual
    /// implementation such as PVM (see [`HostInfo::can_boot_linux`]).
    pub fn host(&self) -> &HostInfo {
        self.core.hypervisor.info()
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &EngineConfig {
        &self.core.config
    }

    fn handle(&self, core: Arc<crate::capsule_core::CapsuleCore>) -> Capsule {
        Capsule::new(core, self.owner.clone(), self.core.clone())
    }

    /// Creates a capsule from a built-in template (`"probe"`, `"minimal"`) or one made with
    /// [`Capsule::snapshot`]; takes a [`CapsuleConfig`], its builder, or a template name.
    /// With [`CapsuleConfig::wait`] (the default) this returns once the capsule is running;
    /// if it fails to start, the error is returned and nothing is left behind. Without
    /// `wait` it returns at once ([`Status::Pending`] or `Starting`) and a failure shows as
    /// [`Status::Error`].
    ///
    /// Errors: [`crate::Error::InvalidConfig`] for an unknown template, 0 vCPUs, memory
    /// outside the template's range, or resources that differ from a snapshot template's;
    /// [`crate::Error::Unsupported`] for a Linux capsule on a host that cannot boot Linux;
    /// start failures ([`crate::Error::GuestCrashed`], [`crate::Error::BootTimeout`],
    /// [`crate::Error::Snapshot`], [`crate::Error::Hypervisor`]).
    pub fn create(&self, config: impl Into<CapsuleConfig>) -> Result<Capsule> {
        let core = lifecycle::create(&self.core, &config.into())?;
        Ok(self.handle(core))
    }

    /// A handle to the capsule `id`, in whatever status it is. Errors:
    /// [`crate::Error::NotFound`].
    pub fn get(&self, id: &CapsuleId) -> Result<Capsule> {
        Ok(self.handle(self.core.registry.find(id)?))
    }

    /// A handle to the capsule `id`, resumed if it was paused (so it is running when this
    /// returns). Errors: [`crate::Error::NotFound`], and those of [`Capsule::resume`].
    pub fn connect(&self, id: &CapsuleId) -> Result<Capsule> {
        let capsule = self.get(id)?;
        if capsule.status() == Status::Paused {
            capsule.resume()?;
        }
        Ok(capsule)
    }

    /// Pauses the capsule `id` (see [`Capsule::pause`]).
    pub fn pause(&self, id: &CapsuleId) -> Result<()> {
        self.get(id)?.pause()
    }

    /// Resumes the capsule `id` (see [`Capsule::resume`]).
    pub fn resume(&self, id: &CapsuleId) -> Result<()> {
        self.get(id)?.resume()
    }

    /// Forks the capsule `id` into `n` new capsules (see [`Capsule::fork`]).
    pub fn fork(&self, id: &CapsuleId, n: usize) -> Result<Vec<Capsule>> {
        self.get(id)?.fork(n)
    }

    /// Destroys the capsule `id` (see [`Capsule::destroy`]). Errors:
    /// [`crate::Error::NotFound`].
    pub fn destroy(&self, id: &CapsuleId) -> Result<()> {
        lifecycle::destroy(&self.core, id)
    }

    /// Information about every capsule, oldest first.
    pub fn list(&self) -> Vec<CapsuleInfo> {
        let mut infos: Vec<_> = self.core.registry.all().iter().map(|c| c.info()).collect();
        infos.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        infos
    }

    /// Every template in the data directory (the built-in `"probe"` and `"minimal"` are not
    /// listed).
    pub fn templates(&self) -> Result<Vec<TemplateInfo>> {
        self.core.templates.list()
    }

    /// Deletes a template. Capsules already started from it are not affected: paused ones
    /// hold their own links to its files.
    ///
    /// Errors: [`crate::Error::TemplateInUse`] while running capsules map its memory (pause
    /// or destroy them first), [`crate::Error::TemplateNotFound`],
    /// [`crate::Error::InvalidArgument`] for a built-in or malformed name.
    pub fn delete_template(&self, name: &str) -> Result<()> {
        // A capsule shows as paused a moment before its pause has released its VM, and with
        // it the template it mapped: let pauses under way finish first.
        for capsule in self.core.registry.all() {
            if capsule.status() == Status::Paused {
                drop(capsule.lock_ops());
            }
        }
        // Pre-built shells map the template's memory: let them go first.
        if let Some(template) = self.core.templates.get(name)? {
            self.core.shells.forget_backing(template.base_id());
        }
        self.core.templates.delete(name)
    }
}

/// Hooks for the engine's own tests, benches and fuzz targets (the `testing` feature); not
/// part of the stable API.
#[cfg(feature = "testing")]
impl Engine {
    /// Occupies one start slot until the returned guard drops, so tests can hold capsules
    /// in [`Status::Pending`] deterministically.
    pub fn hold_start_slot(&self) -> impl Drop + std::fmt::Debug {
        self.core.starts.acquire()
    }

    /// How many pre-built VM shells wait in the pool, all shapes together, and how many
    /// starts took one so far.
    pub fn shell_pool_counts(&self) -> (usize, u64) {
        self.core.shells.counts()
    }

    /// Holds the inactivity watcher at `point` of its next auto-pause until the returned
    /// hold is dropped.
    pub fn hold_auto_pause(
        &self,
        point: crate::testing::AutoPausePoint,
    ) -> crate::testing::AutoPauseHold {
        self.core.pause_gate.arm(point)
    }

    /// The next snapshot memory write fails after `bytes` bytes (an injected I/O error, as
    /// from a full disk).
    pub fn inject_write_fault(&self, bytes: Option<u64>) {
        *crate::sync::lock(&self.core.write_fault) = bytes;
    }

    /// Runs `f` on a vCPU thread of the running probe capsule `id`, between two commands,
    /// under that thread's seccomp filter when filters are on; returns once `f` is handed
    /// over (it reports back itself, e.g. through a channel).
    pub fn run_on_vcpu_thread(
        &self,
        id: &CapsuleId,
        f: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
        self.core
            .registry
            .find(id)?
            .runtime("run code on a vCPU thread")?
            .run_on_vcpu_thread(Box::new(f))
    }
}
