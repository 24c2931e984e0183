//! The inactivity watcher: a background thread that pauses every running capsule idle for
//! longer than its timeout ([`crate::CapsuleConfigBuilder::timeout`]).

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use crate::engine_core::EngineCore;
use crate::error::Result;
use crate::lifecycle;
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

/// Pauses every running capsule whose inactivity timeout has passed; each is checked again
/// under its own lock as it is paused ([`lifecycle::pause_if_idle`]).
fn pause_idle(engine: &EngineCore) {
    let now = SystemTime::now();
    for capsule in engine.registry.all() {
        if capsule.idle_stamp(now).is_none() {
            continue;
        }
        match lifecycle::pause_if_idle(engine, &capsule, now) {
            Ok(true) => {}
            Ok(false) => tracing::debug!(capsule = %capsule.id(), "in use again: not paused"),
            Err(e) => tracing::warn!(capsule = %capsule.id(), error = %e, "auto-pause failed"),
        }
    }
}
