//! The engine: owns the hypervisor handle and every capsule, and is the entry point of the API.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use capsule_vmm::{HostInfo, Hypervisor};

use crate::capsule::{Capsule, CapsuleShared};
use crate::config::{CapsuleConfig, EngineConfig};
use crate::error::{Error, Result};
use crate::guest::{BootContext, GuestEvents, GuestKind};
use crate::id::CapsuleId;
use crate::limiter::StartLimiter;
use crate::status::CapsuleInfo;

/// Creates, finds and destroys capsules. `Send + Sync` and cheap to clone: share it between
/// threads freely. Dropping the last clone (and every [`Capsule`] handle) stops all capsules.
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

pub(crate) struct EngineInner {
    config: EngineConfig,
    hypervisor: Hypervisor,
    capsules: RwLock<HashMap<CapsuleId, Arc<CapsuleShared>>>,
    starts: Arc<StartLimiter>,
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
    /// Opens KVM and the data directory.
    ///
    /// Errors: [`Error::KvmUnavailable`] (with whether the device is missing or not
    /// permitted), [`Error::Io`] if the data directory cannot be created.
    pub fn new(config: EngineConfig) -> Result<Engine> {
        let hypervisor = Hypervisor::open_path(&config.kvm_path)?;
        capsule_vmm::vcpu::install_kick_handler()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::Io {
            op: "creating the data directory",
            path: config.data_dir.clone(),
            source,
        })?;
        tracing::info!(host = %hypervisor.info().virtualization, data_dir = %config.data_dir.display(), "engine ready");
        Ok(Engine {
            inner: Arc::new(EngineInner {
                starts: Arc::new(StartLimiter::new(config.max_concurrent_starts)),
                config,
                hypervisor,
                capsules: RwLock::new(HashMap::new()),
            }),
        })
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

    /// Creates a capsule. With [`CapsuleConfig::wait`] (the default) this returns once the
    /// capsule is running; if it fails to start, the error is returned and nothing is left
    /// behind. Without `wait` it returns at once ([`crate::Status::Pending`] or `Starting`)
    /// and a failure shows as [`crate::Status::Error`].
    ///
    /// Errors: [`Error::InvalidConfig`] for an unknown template, 0 vCPUs or memory outside
    /// the template's range; start failures ([`Error::GuestCrashed`], [`Error::Timeout`],
    /// [`Error::Hypervisor`]).
    pub fn create(&self, config: CapsuleConfig) -> Result<Capsule> {
        let kind = GuestKind::for_template(&config.template)?;
        kind.validate(&config, self.host().max_vcpus)?;
        let shared = CapsuleShared::new(CapsuleId::generate(), config);
        self.inner.write().insert(shared.id.clone(), shared.clone());
        let capsule = Capsule {
            shared: shared.clone(),
            engine: self.inner.clone(),
        };
        if shared.config.wait {
            if let Err(e) = self.inner.boot(kind, &shared) {
                self.inner.remove(&shared.id);
                shared.stop();
                return Err(e);
            }
        } else {
            let inner = self.inner.clone();
            let background = shared.clone();
            std::thread::Builder::new()
                .name(format!("{}-boot", shared.id))
                .spawn(move || {
                    if let Err(e) = inner.boot(kind, &background) {
                        background.fail(e.to_string());
                    }
                })
                .map_err(|e| {
                    self.inner.remove(&shared.id);
                    Error::Hypervisor(capsule_vmm::Error::Os {
                        op: "spawning a boot thread",
                        source: e,
                    })
                })?;
        }
        Ok(capsule)
    }

    /// A handle to the capsule `id`. Errors: [`Error::NotFound`].
    pub fn get(&self, id: &CapsuleId) -> Result<Capsule> {
        let shared = self
            .inner
            .read()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        Ok(Capsule {
            shared,
            engine: self.inner.clone(),
        })
    }

    /// Destroys the capsule `id` (see [`Capsule::destroy`]). Errors: [`Error::NotFound`].
    pub fn destroy(&self, id: &CapsuleId) -> Result<()> {
        let shared = self
            .inner
            .remove(id)
            .ok_or_else(|| Error::NotFound(id.clone()))?;
        shared.stop();
        Ok(())
    }

    /// Test hook: occupies one start slot until the returned guard drops, so tests can hold
    /// capsules in [`crate::Status::Pending`] deterministically. Not part of the stable API.
    #[doc(hidden)]
    pub fn hold_start_slot(&self) -> impl Drop + std::fmt::Debug {
        self.inner.starts.acquire()
    }

    /// Information about every capsule, oldest first.
    pub fn list(&self) -> Vec<CapsuleInfo> {
        let mut infos: Vec<_> = self.inner.read().values().map(|c| c.info()).collect();
        infos.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        infos
    }
}

impl EngineInner {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<CapsuleId, Arc<CapsuleShared>>> {
        self.capsules.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<CapsuleId, Arc<CapsuleShared>>> {
        self.capsules.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn remove(&self, id: &CapsuleId) -> Option<Arc<CapsuleShared>> {
        self.write().remove(id)
    }

    /// Pending → Starting → Running, within the concurrent-start limit.
    fn boot(&self, kind: GuestKind, shared: &Arc<CapsuleShared>) -> Result<()> {
        let _permit = self.starts.acquire();
        if !shared.mark_starting() {
            return Err(Error::InvalidState {
                id: shared.id.clone(),
                status: shared.status(),
                operation: "start",
            });
        }
        let events: Arc<dyn GuestEvents> = shared.clone();
        let runtime = kind.boot(BootContext {
            id: shared.id.clone(),
            hypervisor: self.hypervisor.clone(),
            config: shared.config.clone(),
            boot_timeout: self.config.boot_timeout,
            events,
        })?;
        shared.mark_running(runtime);
        tracing::debug!(capsule = %shared.id, "running");
        Ok(())
    }
}

impl Drop for EngineInner {
    fn drop(&mut self) {
        let capsules: Vec<_> = self.write().drain().map(|(_, c)| c).collect();
        for capsule in capsules {
            capsule.stop();
        }
    }
}
