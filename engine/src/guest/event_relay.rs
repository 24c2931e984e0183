//! Crash and exit reports of guests whose vCPU threads run under seccomp filters.
//!
//! A guest reports that it crashed or shut down from one of its vCPU threads, and the engine
//! answers by moving the capsule to `Error` or `Stopped` and releasing its VM on a new thread.
//! A filtered thread cannot start threads (and should not run the engine's teardown anyway):
//! its filter would refuse the calls, and a thread it started would inherit the filter. So
//! with filters on, a guest's [`GuestEvents`] go through [`relayed`]: one process-wide relay
//! thread, started from an unfiltered thread, runs each report while the vCPU thread waits
//! for it, which keeps the order of events as it is without the relay (the capsule is in
//! `Error` before the command that saw the crash gets its answer).

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use crossbeam_channel::Sender;

use super::{BootContext, GuestEvents};
use crate::error::{Error, Result};
use crate::sync::lock;

/// One report and whom to tell that it ran (by dropping the sender).
type Report = (Box<dyn FnOnce() + Send>, Sender<()>);

/// The relay thread's queue; `None` until the first guest with filters starts.
static RELAY: Mutex<Option<Sender<Report>>> = Mutex::new(None);

/// The events a guest's vCPU threads report to: `ctx.events`, through the relay when the
/// threads are filtered.
pub(crate) fn for_vcpu_threads(ctx: &BootContext) -> Result<Arc<dyn GuestEvents>> {
    if ctx.seccomp {
        relayed(ctx.events.clone())
    } else {
        Ok(ctx.events.clone())
    }
}

/// `events`, reported from the relay thread. Starts the relay thread if it is not running
/// yet, so call it from an unfiltered thread (the one booting the guest).
pub(crate) fn relayed(events: Arc<dyn GuestEvents>) -> Result<Arc<dyn GuestEvents>> {
    let mut relay = lock(&RELAY);
    if relay.is_none() {
        let (tx, rx) = crossbeam_channel::unbounded::<Report>();
        std::thread::Builder::new()
            .name("capsule-relay".into())
            .spawn(move || {
                for (report, _done) in rx {
                    // A panicking report must not end the relay for every other capsule.
                    if std::panic::catch_unwind(AssertUnwindSafe(report)).is_err() {
                        tracing::error!("a guest event report panicked");
                    }
                }
            })
            .map_err(|e| Error::os("spawning the guest event relay thread", e))?;
        *relay = Some(tx);
    }
    Ok(Arc::new(Relayed { events }))
}

/// Runs `report` on the relay thread and waits until it ran. If the relay is gone (it never
/// ends, so this is only defensive) the report runs here.
fn relay(report: Box<dyn FnOnce() + Send>) {
    let sender = lock(&RELAY).clone();
    let Some(sender) = sender else {
        report();
        return;
    };
    let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(0);
    match sender.send((report, done_tx)) {
        // Disconnected once the report ran (or was dropped).
        Ok(()) => {
            let _ = done_rx.recv();
        }
        Err(returned) => (returned.into_inner().0)(),
    }
}

/// A guest's events, reported from the relay thread.
struct Relayed {
    events: Arc<dyn GuestEvents>,
}

impl GuestEvents for Relayed {
    fn crashed(&self, reason: String) {
        let reason = explain_refusal(reason);
        let events = self.events.clone();
        relay(Box::new(move || events.crashed(reason)));
    }

    fn exited(&self, how: String) {
        let events = self.events.clone();
        relay(Box::new(move || events.exited(how)));
    }
}

/// Adds to a crash reason that says a call was not permitted where that likely came from.
fn explain_refusal(reason: String) -> String {
    let refused = std::io::Error::from_raw_os_error(capsule_vmm::seccomp::DENIED_ERRNO);
    if !reason.contains(&refused.to_string()) {
        return reason;
    }
    tracing::warn!(%reason, "a call from a vCPU thread was not permitted: its seccomp filter may lack it");
    format!(
        "{reason} (the vCPU thread's seccomp filter refuses calls outside its list; \
         EngineConfig::seccomp(false) turns the filters off)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        seen: Mutex<Vec<(String, Option<String>)>>,
    }

    impl GuestEvents for Recorder {
        fn crashed(&self, reason: String) {
            let thread = std::thread::current().name().map(str::to_owned);
            lock(&self.seen).push((reason, thread));
        }
        fn exited(&self, how: String) {
            let thread = std::thread::current().name().map(str::to_owned);
            lock(&self.seen).push((how, thread));
        }
    }

    #[test]
    fn reports_run_on_the_relay_thread_before_the_reporter_goes_on() {
        let recorder = Arc::new(Recorder::default());
        let events = relayed(recorder.clone()).unwrap();
        events.crashed("KVM KVM_RUN failed: Operation not permitted (os error 1)".into());
        events.exited("exited".into());
        // Synchronous: both already ran, in order, on the relay thread.
        let seen = lock(&recorder.seen).clone();
        assert_eq!(seen.len(), 2);
        assert!(seen[0].0.contains("seccomp filter"), "{}", seen[0].0);
        assert_eq!(seen[1].0, "exited");
        for (_, thread) in &seen {
            assert_eq!(thread.as_deref(), Some("capsule-relay"));
        }
        // Other reasons are passed on as they are.
        events.crashed("the guest halted".into());
        assert_eq!(lock(&recorder.seen)[2].0, "the guest halted");
    }
}
