//! A capsule's status, and the status machine: the one table of which event may move a
//! capsule from which status to which.

use std::fmt;
use std::str::FromStr;

/// Where a capsule is in its life.
///
/// ```text
/// Pending ─start→ Starting ─ready→ Running ⇄ Paused        (pause / resume)
///    any status that can still run ─crash→ Error, ─exit→ Stopped
///    any status ─destroy→ Stopped
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
#[non_exhaustive]
pub enum Status {
    /// Accepted but not started yet (for instance waiting behind the engine's limit on
    /// concurrent starts).
    Pending,
    /// The VM is built and the guest is booting.
    Starting,
    /// The guest said it is ready; commands run.
    Running,
    /// Paused: its state is on disk and it uses no CPU.
    Paused,
    /// The guest exited or the capsule was destroyed.
    Stopped,
    /// Unrecoverable failure (guest crash, triple fault, KVM error); see
    /// [`crate::CapsuleInfo::error`].
    Error,
}

impl Status {
    /// Every status, in life order.
    pub const ALL: [Status; 6] = [
        Status::Pending,
        Status::Starting,
        Status::Running,
        Status::Paused,
        Status::Stopped,
        Status::Error,
    ];

    /// The lowercase name used in logs and text output (what [`Status::from_str`] reads).
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
            Status::Error => "error",
        }
    }

    /// Whether the capsule can never run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Stopped | Status::Error)
    }

    /// The status after `event`, or `None` if the event is illegal in this status. Every
    /// status change of a capsule goes through this table.
    pub(crate) fn after(self, event: Transition) -> Option<Status> {
        use Status::*;
        use Transition as T;
        match (self, event) {
            (Pending, T::Start) => Some(Starting),
            (Starting, T::Ready) => Some(Running),
            (Running, T::Pause) => Some(Paused),
            (Paused, T::Resume) => Some(Running),
            (Pending | Starting | Running, T::Crash) => Some(Error),
            (Pending | Starting | Running, T::Exit) => Some(Stopped),
            // A crashed capsule that is destroyed is stopped too; its error stays readable.
            (_, T::Destroy) => Some(Stopped),
            _ => None,
        }
    }

    /// Whether one event of the status machine ([`Status::after`], the one table) moves a
    /// capsule from `self` to `to`. For the soak (`cargo xtask soak`), which checks the
    /// statuses it observes against that table; only with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn can_change_to(self, to: Status) -> bool {
        Transition::ALL
            .into_iter()
            .any(|event| self.after(event) == Some(to))
    }
}

/// What happens to a capsule, as the status machine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transition {
    /// Its boot begins (it got a start slot).
    Start,
    /// Its guest became ready (booted, or restored from a template).
    Ready,
    /// Its state was written to disk and its VM released.
    Pause,
    /// It was restored from its pause.
    Resume,
    /// Its guest crashed.
    Crash,
    /// Its guest shut itself down.
    Exit,
    /// It was destroyed.
    Destroy,
}

impl Transition {
    /// Every event.
    #[cfg_attr(not(any(test, feature = "testing")), allow(dead_code))]
    pub(crate) const ALL: [Transition; 7] = [
        Transition::Start,
        Transition::Ready,
        Transition::Pause,
        Transition::Resume,
        Transition::Crash,
        Transition::Exit,
        Transition::Destroy,
    ];
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text is not a status name ([`Status::as_str`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a capsule status (pending, starting, running, paused, stopped, error)")]
pub struct ParseStatusError(pub String);

impl FromStr for Status {
    type Err = ParseStatusError;

    /// Reads the lowercase names [`Status::as_str`] writes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| ParseStatusError(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENTS: [Transition; 7] = Transition::ALL;

    #[test]
    fn statuses_read_back_their_names() {
        for status in Status::ALL {
            assert_eq!(status.as_str().parse::<Status>(), Ok(status));
            assert_eq!(status.to_string(), status.as_str());
        }
        assert!("Running".parse::<Status>().is_err());
        assert!("".parse::<Status>().is_err());
    }

    #[test]
    fn the_transition_table_allows_exactly_the_lifecycle() {
        use Status::*;
        use Transition as T;
        let legal = [
            (Pending, T::Start, Starting),
            (Starting, T::Ready, Running),
            (Running, T::Pause, Paused),
            (Paused, T::Resume, Running),
            (Pending, T::Crash, Error),
            (Starting, T::Crash, Error),
            (Running, T::Crash, Error),
            (Pending, T::Exit, Stopped),
            (Starting, T::Exit, Stopped),
            (Running, T::Exit, Stopped),
        ];
        for from in Status::ALL {
            for event in EVENTS {
                let expected = if event == T::Destroy {
                    Some(Stopped)
                } else {
                    legal
                        .iter()
                        .find(|(f, e, _)| *f == from && *e == event)
                        .map(|(_, _, to)| *to)
                };
                assert_eq!(from.after(event), expected, "{from} on {event:?}");
            }
        }
        // Nothing leaves a terminal status but destroy, and a paused capsule cannot be
        // paused again or crash (it has no guest).
        assert_eq!(Paused.after(T::Pause), None);
        assert_eq!(Paused.after(T::Crash), None);
        assert_eq!(Error.after(T::Resume), None);
        assert_eq!(Stopped.after(T::Start), None);
    }
}
