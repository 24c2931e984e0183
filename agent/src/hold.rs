//! Holding the processes' reports for a snapshot (`Hold` / `Release` in the
//! protocol crate's docs): while held, no process sends output or its exit.
//!
//! Every such send happens under [`ReportGate::open`]'s guard, and
//! [`ReportGate::hold`] takes the gate exclusively: a send in progress when
//! the hold arrives finishes before the hold's `Ack` is written, and none
//! starts after it until [`ReportGate::release`].

use std::sync::{Arc, RwLock, RwLockReadGuard};

/// Whether process reports may be sent (see the module docs). A cheap handle:
/// clones share one gate.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReportGate(Arc<RwLock<bool>>);

/// Proof that the gate was open when taken; the hold waits until it is dropped.
pub(crate) struct Open<'g>(#[allow(dead_code)] RwLockReadGuard<'g, bool>);

impl ReportGate {
    /// `Some` while reports may be sent: send under it, then drop it.
    pub(crate) fn open(&self) -> Option<Open<'_>> {
        let held = self.0.read().unwrap_or_else(|p| p.into_inner());
        (!*held).then_some(Open(held))
    }

    /// Whether reports are held now.
    pub(crate) fn is_held(&self) -> bool {
        *self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds reports once no send is in progress, then runs `then` (which
    /// answers the `Hold`) before anything else may pass the gate.
    pub(crate) fn hold(&self, then: impl FnOnce()) {
        let mut held = self.0.write().unwrap_or_else(|p| p.into_inner());
        *held = true;
        then();
    }

    /// Lets reports through again; whether they were held.
    pub(crate) fn release(&self) -> bool {
        std::mem::replace(
            &mut *self.0.write().unwrap_or_else(|p| p.into_inner()),
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn a_hold_waits_for_a_send_in_progress_and_stops_later_ones() {
        let gate = ReportGate::default();
        let open = gate.open().expect("open at first");
        let (tx, rx) = mpsc::channel();
        let g2 = gate.clone();
        let holder = std::thread::spawn(move || g2.hold(|| tx.send(()).unwrap()));
        // The hold cannot be answered while a send is in progress.
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(open);
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        holder.join().unwrap();
        assert!(gate.is_held());
        assert!(gate.open().is_none());
        assert!(gate.release());
        assert!(!gate.release());
        assert!(gate.open().is_some());
    }
}
