//! The one description of a capsule: what it was created as. The data directory's journal
//! and a paused capsule's snapshot store it; [`crate::CapsuleInfo`] reports it with the
//! capsule's live status.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::id::{self, CapsuleId};

/// The guest kinds a capsule can run. Built-in templates name them (`"probe"`,
/// `"minimal"`); a template made with [`crate::Capsule::snapshot`] runs its source's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) enum GuestKind {
    /// The built-in probe guest (`"probe"`).
    Probe,
    /// A Linux kernel with the agent as PID 1 (`"minimal"`).
    Linux,
}

impl GuestKind {
    /// Every kind.
    pub(crate) const ALL: [GuestKind; 2] = [GuestKind::Probe, GuestKind::Linux];

    /// The name of the built-in template that runs this kind.
    pub(crate) const fn template(self) -> &'static str {
        match self {
            GuestKind::Probe => "probe",
            GuestKind::Linux => "minimal",
        }
    }

    /// The built-in template with this name, if it is one.
    pub(crate) fn builtin(name: &str) -> Option<Self> {
        GuestKind::ALL.into_iter().find(|k| k.template() == name)
    }

    /// Default vCPUs and memory (MiB) of a capsule of this kind.
    pub(crate) fn defaults(self) -> (u32, u64) {
        match self {
            GuestKind::Probe => (1, 512),
            GuestKind::Linux => (1, 512),
        }
    }
}

impl fmt::Display for GuestKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.template())
    }
}

impl FromStr for GuestKind {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        GuestKind::builtin(s).ok_or(())
    }
}

/// What a capsule was created as; never changes during its life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CapsuleRecord {
    #[serde(with = "id::as_text")]
    pub(crate) id: CapsuleId,
    /// The template it was created from.
    pub(crate) template: String,
    pub(crate) kind: GuestKind,
    pub(crate) vcpus: u32,
    pub(crate) memory_mb: u64,
    /// Inactivity timeout (zero: never auto-pause).
    pub(crate) timeout: Duration,
    pub(crate) created_at: SystemTime,
}
