//! What is reported about a capsule and a template.

use std::time::{Duration, SystemTime};

use super::id::CapsuleId;
use super::status::Status;

/// A snapshot of what is known about a capsule, from [`crate::Capsule::info`] or
/// [`crate::Engine::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
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
    /// How its guest ended, when the capsule stopped by itself rather than by
    /// [`crate::Capsule::destroy`]: the kind of exit and where the vCPU was. A power-off, a
    /// reboot and a triple fault all reach the host as one shutdown exit; the position (and
    /// the console, [`crate::Capsule::console_log`]) tell them apart. On AMD hosts KVM
    /// resets the vCPU before it reports a triple fault, so there the registers read as
    /// after a reset (`rip 0xfff0`, `cr0 0x10`): that state itself says "triple fault",
    /// where a power-off or reboot shows the guest's own position.
    pub ended: Option<String>,
}

/// A template, as listed by [`crate::Engine::templates`] and returned by
/// [`crate::Capsule::snapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct TemplateInfo {
    /// Its name (what [`crate::CapsuleConfig::new`] takes).
    pub name: String,
    /// vCPUs of capsules started from it.
    pub vcpus: u32,
    /// Memory of capsules started from it, in MiB.
    pub memory_mb: u64,
    /// Bytes its files occupy on disk (memory layers are sparse).
    pub disk_bytes: u64,
    /// When it was created (its directory's modification time: the moment it was
    /// published).
    pub created_at: SystemTime,
}
