//! Where a guest's start spends its time: named phases, logged as one `debug` event.
//!
//! A start (boot or restore) marks the end of each phase; [`StartPhases::log`] emits
//! `start phases` with `phases = "shell=0.41ms memory=0.12ms ..."` (each phase's own time,
//! in order) and `total`, under the target `capsule::start_phases`, so a subscriber can
//! break a resume or a template spawn down without a profiler. A pause is timed the same
//! way and logged as `pause phases` under `capsule::pause_phases` ([`StartPhases::log_pause`]).

use std::time::{Duration, Instant};

use crate::model::CapsuleId;

/// The phases of one start, as they end.
pub(crate) struct StartPhases {
    what: &'static str,
    started: Instant,
    last: Instant,
    phases: Vec<(&'static str, Duration)>,
}

impl StartPhases {
    /// Starts the clock for a start of kind `what` (`boot`, `restore`).
    pub(crate) fn begin(what: &'static str) -> Self {
        let now = Instant::now();
        StartPhases {
            what,
            started: now,
            last: now,
            phases: Vec::new(),
        }
    }

    /// Ends phase `name`: the time since the previous mark (or the start).
    pub(crate) fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.phases.push((name, now - self.last));
        self.last = now;
    }

    /// The phases as `name=1.23ms` words.
    fn describe(&self) -> String {
        let words: Vec<String> = self
            .phases
            .iter()
            .map(|(name, took)| format!("{name}={:.3}ms", took.as_secs_f64() * 1e3))
            .collect();
        words.join(" ")
    }

    /// Emits the `pause phases` event for capsule `id` (target `capsule::pause_phases`).
    pub(crate) fn log_pause(&self, id: &CapsuleId) {
        tracing::debug!(
            target: "capsule::pause_phases",
            capsule = %id,
            phases = %self.describe(),
            total_ms = (self.last - self.started).as_secs_f64() * 1e3,
            "pause phases"
        );
    }

    /// Emits the `start phases` event for capsule `id`.
    pub(crate) fn log(&self, id: &CapsuleId) {
        tracing::debug!(
            target: "capsule::start_phases",
            capsule = %id,
            start = self.what,
            phases = %self.describe(),
            total_ms = (self.last - self.started).as_secs_f64() * 1e3,
            "start phases"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_listed_in_order_with_their_own_times() {
        let mut phases = StartPhases::begin("restore");
        phases.mark("shell");
        std::thread::sleep(Duration::from_millis(2));
        phases.mark("memory");
        let text = phases.describe();
        let words: Vec<&str> = text.split(' ').collect();
        assert_eq!(words.len(), 2);
        assert!(words[0].starts_with("shell="), "{text}");
        let memory: f64 = words[1]
            .strip_prefix("memory=")
            .and_then(|w| w.strip_suffix("ms"))
            .unwrap()
            .parse()
            .unwrap();
        assert!(memory >= 2.0, "{text}");
    }
}
