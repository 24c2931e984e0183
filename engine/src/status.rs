//! Capsule status and the information reported about a capsule.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::id::CapsuleId;

/// Where a capsule is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Unrecoverable failure (guest crash, triple fault, KVM error); see [`CapsuleInfo::error`].
    Error,
}

impl Status {
    /// The lowercase name used in logs and text output.
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
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of what is known about a capsule.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CapsuleInfo {
    /// Its id.
    pub id: CapsuleId,
    /// Its status when this was taken.
    pub status: Status,
    /// The template it was created from.
    pub template: String,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mb: u64,
    /// Inactivity timeout (zero: never).
    pub timeout: Duration,
    /// When it was created.
    pub created_at: SystemTime,
    /// When it last ran a command (or was created).
    pub last_activity: SystemTime,
    /// Why it is in [`Status::Error`], when it is.
    pub error: Option<String>,
}
