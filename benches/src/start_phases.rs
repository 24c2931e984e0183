//! The engine's `start phases` and `pause phases` events (targets `capsule::start_phases`
//! and `capsule::pause_phases`: where a boot, a restore or a pause spent its time),
//! collected by a minimal `tracing` subscriber so a report can break a resume, a template
//! spawn or a pause down by phase.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// The starts and pauses seen since the last [`take`], oldest first: when each event came,
/// and its phases, `(name, milliseconds)`.
static SEEN: Mutex<Vec<(Instant, Phases)>> = Mutex::new(Vec::new());

/// One start's or pause's phases: `(name, milliseconds)`, in order.
pub type Phases = Vec<(String, f64)>;

/// The last phase of a start: from its vCPU threads starting until the guest's agent
/// answered. Everything before it is the engine's own work.
const GUEST_PHASE: &str = "agent";

/// The events' targets.
const TARGETS: [&str; 2] = ["capsule::start_phases", "capsule::pause_phases"];

/// Installs the collector as this process's global subscriber (it sees nothing else).
/// Returns `false` when another subscriber was installed first.
pub fn install() -> bool {
    tracing::subscriber::set_global_default(Collector).is_ok()
}

/// The starts and pauses seen since the last call, oldest first.
pub fn take() -> Vec<Vec<(String, f64)>> {
    take_timed().into_iter().map(|(_, phases)| phases).collect()
}

/// [`take`], with when each event came (the end of its last phase).
pub fn take_timed() -> Vec<(Instant, Phases)> {
    std::mem::take(&mut *SEEN.lock().unwrap_or_else(|p| p.into_inner()))
}

/// When the guest began to run in a start whose event came `at`: the start of its last
/// phase, when that is the guest's (`agent`). What came after is the guest's own time.
pub fn guest_started(at: Instant, phases: &[(String, f64)]) -> Option<Instant> {
    match phases.last() {
        Some((name, ms)) if name == GUEST_PHASE => {
            at.checked_sub(Duration::from_secs_f64(ms.max(0.0) / 1e3))
        }
        _ => None,
    }
}

/// Parses `shell=0.412ms memory=1.5ms` into `(name, ms)` pairs.
pub fn parse(text: &str) -> Vec<(String, f64)> {
    text.split_whitespace()
        .filter_map(|word| {
            let (name, value) = word.split_once('=')?;
            let ms = value.strip_suffix("ms")?.parse().ok()?;
            Some((name.to_string(), ms))
        })
        .collect()
}

/// `name=1.23ms` words for `phases`.
pub fn describe(phases: &[(String, f64)]) -> String {
    let words: Vec<String> = phases
        .iter()
        .map(|(name, ms)| format!("{name}={ms:.2}ms"))
        .collect();
    words.join(" ")
}

/// Per phase name, the p50 over `starts` (in the order phases first appear) and the count.
pub fn medians(starts: &[Vec<(String, f64)>]) -> (Vec<(String, f64)>, usize) {
    let mut order = Vec::new();
    let mut by_name: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for start in starts {
        for (name, ms) in start {
            if !by_name.contains_key(name) {
                order.push(name.clone());
            }
            by_name.entry(name.clone()).or_default().push(*ms);
        }
    }
    let medians = order
        .into_iter()
        .map(|name| {
            let mut values = by_name.remove(&name).unwrap_or_default();
            values.sort_by(f64::total_cmp);
            let p50 = values.get(values.len() / 2).copied().unwrap_or(0.0);
            (name, p50)
        })
        .collect();
    (medians, starts.len())
}

/// Records `start phases` and `pause phases` events and ignores everything else.
struct Collector;

/// Finds the `phases` field of an event.
#[derive(Default)]
struct PhasesField(Option<String>);

impl Visit for PhasesField {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "phases" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() == "phases" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl Subscriber for Collector {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        TARGETS.contains(&metadata.target())
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut field = PhasesField::default();
        event.record(&mut field);
        if let Some(text) = field.0 {
            SEEN.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((Instant::now(), parse(&text)));
        }
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_and_summarize() {
        let a = parse("shell=1.0ms memory=2.5ms");
        let b = parse("shell=3.0ms memory=0.5ms agent=9ms bogus");
        assert_eq!(a, vec![("shell".into(), 1.0), ("memory".into(), 2.5)]);
        let (p50, n) = medians(&[a, b.clone(), b]);
        assert_eq!(n, 3);
        assert_eq!(
            p50,
            vec![
                ("shell".into(), 3.0),
                ("memory".into(), 0.5),
                ("agent".into(), 9.0)
            ]
        );
        assert_eq!(describe(&p50[..1]), "shell=3.00ms");
    }

    #[test]
    fn the_guest_starts_where_its_agent_phase_begins() {
        let at = Instant::now();
        let start = parse("shell=1.0ms machine=2.0ms vcpu_threads=0.5ms agent=250ms");
        assert_eq!(
            guest_started(at, &start),
            Some(at - Duration::from_millis(250))
        );
        // A start that ended before its guest phase (or a pause) has no guest start.
        assert_eq!(guest_started(at, &parse("shell=1.0ms machine=2.0ms")), None);
        assert_eq!(guest_started(at, &[]), None);
    }
}
