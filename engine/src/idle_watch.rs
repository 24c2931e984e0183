//! The inactivity watcher: a background thread that pauses every running capsule idle for
//! longer than its timeout ([`crate::CapsuleConfigBuilder::timeout`]).

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use crate::capsule_core::CapsuleCore;
use crate::engine_core::EngineCore;
use crate::error::Result;
use crate::lifecycle;
use crate::model::Status;
use crate::periodic::Periodic;
use crate::sync::lock;

/// Starts `engine`'s watcher, checking every [`crate::EngineConfig::idle_check_interval`].
/// It holds the engine weakly and ends with it.
pub(crate) fn start(engine: &Arc<EngineCore>) -> Result<()> {
    let weak: Weak<EngineCore> = Arc::downgrade(engine);
    let watcher = Periodic::start(
        "capsule-idle-watch",
        engine.config.idle_check_interval(),
        move || match weak.upgrade() {
            Some(engine) => {
                pause_idle(&engine);
                true
            }
            None => false,
        },
    )?;
    *lock(&engine.idle_watch) = Some(watcher);
    Ok(())
}

/// Whether `capsule` is running and has been idle for at least its timeout.
fn is_idle(capsule: &CapsuleCore, now: SystemTime) -> bool {
    let timeout = capsule.record().timeout;
    !timeout.is_zero()
        && capsule.status() == Status::Running
        && now
            .duration_since(capsule.last_activity())
            .is_ok_and(|idle| idle >= timeout)
}

/// Pauses every running capsule whose inactivity timeout has passed.
fn pause_idle(engine: &EngineCore) {
    let now = SystemTime::now();
    for capsule in engine.registry.all() {
        if !is_idle(&capsule, now) {
            continue;
        }
        tracing::debug!(capsule = %capsule.id(), "pausing after inactivity");
        if let Err(e) = lifecycle::pause(engine, &capsule) {
            tracing::warn!(capsule = %capsule.id(), error = %e, "auto-pause failed");
        }
    }
}
