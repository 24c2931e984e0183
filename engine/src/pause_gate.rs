//! A test gate on the inactivity watcher's path: tests hold the watcher at a chosen point of
//! an auto-pause (after it decided a capsule is idle, or after it froze it) to make the races
//! around that point deterministic. Unarmed (always, outside tests) it costs one lock on the
//! auto-pause path, which runs at most once per idle capsule.

use std::sync::Mutex;

use crossbeam_channel::{Receiver, Sender};

use crate::sync::lock;

/// Where an auto-pause can be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AutoPausePoint {
    /// The watcher found the capsule idle, under its lifecycle lock, before freezing it.
    Decided,
    /// The capsule's vCPUs are frozen, its snapshot not yet written.
    Frozen,
    /// Its snapshot is written; the pause is not committed yet.
    Written,
    /// The pause is committed (the capsule shows as paused); its VM is not released yet.
    Committed,
}

struct Armed {
    point: AutoPausePoint,
    reached: Sender<()>,
    release: Receiver<()>,
}

/// The gate the watcher passes through.
#[derive(Default)]
pub(crate) struct PauseGate {
    armed: Mutex<Option<Armed>>,
}

impl PauseGate {
    /// Called by the watcher at `point`: if a test armed the gate there, signals it and
    /// waits until the test releases (or drops) its hold. The gate disarms itself.
    pub(crate) fn pass(&self, point: AutoPausePoint) {
        let armed = {
            let mut armed = lock(&self.armed);
            match armed.as_ref() {
                Some(a) if a.point == point => armed.take(),
                _ => None,
            }
        };
        if let Some(armed) = armed {
            let _ = armed.reached.send(());
            let _ = armed.release.recv();
        }
    }

    /// Arms the gate at `point` (replacing any earlier arming).
    #[cfg(feature = "testing")]
    pub(crate) fn arm(&self, point: AutoPausePoint) -> AutoPauseHold {
        let (reached_tx, reached_rx) = crossbeam_channel::bounded(1);
        let (release_tx, release_rx) = crossbeam_channel::bounded(0);
        *lock(&self.armed) = Some(Armed {
            point,
            reached: reached_tx,
            release: release_rx,
        });
        AutoPauseHold {
            reached: reached_rx,
            _release: release_tx,
        }
    }
}

/// A test's hold on the inactivity watcher (see [`AutoPausePoint`]); dropping it lets the
/// watcher go on.
#[cfg(feature = "testing")]
#[derive(Debug)]
pub struct AutoPauseHold {
    reached: Receiver<()>,
    /// Dropping it wakes the held watcher.
    _release: Sender<()>,
}

#[cfg(feature = "testing")]
impl AutoPauseHold {
    /// Waits up to `timeout` for the watcher to reach the point; `true` once it is held there.
    pub fn wait_reached(&self, timeout: std::time::Duration) -> bool {
        self.reached.recv_timeout(timeout).is_ok()
    }
}
