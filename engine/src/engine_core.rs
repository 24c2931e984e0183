//! What one engine is made of: the hypervisor handle, the data directory, templates, VM
//! shells, the start limiter and the registry of capsules. Public handles
//! ([`crate::Engine`], [`crate::Capsule`]) hold it; dropping the last one stops every
//! running capsule (paused ones stay on disk for the next engine).

use std::sync::{Arc, Mutex, Weak};

use capsule_vmm::Hypervisor;

use crate::admission::Admission;
use crate::config::EngineConfig;
use crate::limiter::StartLimiter;
use crate::pause_gate::PauseGate;
use crate::periodic::Periodic;
use crate::pool::ShellPool;
use crate::registry::Registry;
use crate::store::Store;
use crate::sync::lock;
use crate::template::Templates;

pub(crate) struct EngineCore {
    pub(crate) config: EngineConfig,
    pub(crate) hypervisor: Hypervisor,
    pub(crate) store: Store,
    pub(crate) templates: Templates,
    pub(crate) registry: Registry,
    /// Admission control (the engine's limits).
    pub(crate) admission: Admission,
    pub(crate) starts: Arc<StartLimiter>,
    pub(crate) shells: Arc<ShellPool>,
    /// The inactivity watcher (started by the `idle_watch` module); stopped when the engine
    /// drops.
    pub(crate) idle_watch: Mutex<Option<Periodic>>,
    /// Where tests hold the inactivity watcher (see `pause_gate`).
    pub(crate) pause_gate: PauseGate,
    /// Test hook: make the next snapshot layer write fail after this many bytes.
    pub(crate) write_fault: Mutex<Option<u64>>,
}

impl EngineCore {
    /// What admission control needs: the limits and the capsules.
    pub(crate) fn admission_parts(&self) -> crate::admission::Parts<'_> {
        (&self.config, &self.registry)
    }

    /// Takes the pending injected write fault, if a test set one.
    pub(crate) fn take_write_fault(&self) -> Option<u64> {
        lock(&self.write_fault).take()
    }
}

/// The user-facing handles' share of an engine ([`crate::Engine`] and every
/// [`crate::Capsule`] hold one, declared before their reference to the core). When the last
/// goes, the inactivity watcher is stopped and joined first: it may hold the core for a
/// moment, and the core (with the data directory's lock) must go on the thread that dropped
/// the last handle, not later on the watcher's, while a new engine is refused the directory.
pub(crate) struct Owner {
    core: Weak<EngineCore>,
}

impl Owner {
    pub(crate) fn new(core: &Arc<EngineCore>) -> Arc<Self> {
        Arc::new(Owner {
            core: Arc::downgrade(core),
        })
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(core) = self.core.upgrade() {
            drop(lock(&core.idle_watch).take());
        }
    }
}

impl Drop for EngineCore {
    fn drop(&mut self) {
        drop(lock(&self.idle_watch).take());
        for capsule in self.registry.drain() {
            capsule.destroy();
        }
    }
}
