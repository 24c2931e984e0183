//! The one error type users of the engine see.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::model::{CapsuleId, FileErrorKind, InvalidId, Status};

pub use capsule_vmm::KvmUnavailable;

/// Everything that can go wrong, as one typed enum. Causes are kept as `source`s.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// KVM cannot be used on this host: no `/dev/kvm`, no permission, or another open failure.
    #[error("KVM is unavailable at {}: {kind}", path.display())]
    KvmUnavailable {
        /// The device path that was tried.
        path: PathBuf,
        /// Missing, permission denied, or other.
        kind: KvmUnavailable,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No capsule has this id (never existed, or destroyed).
    #[error("capsule {0} not found")]
    NotFound(CapsuleId),
    /// The text is not a capsule id (`cl-` followed by lowercase letters and digits).
    #[error("{0:?} is not a capsule id")]
    InvalidId(String),
    /// A configuration value is out of range or unknown (0 vCPUs, too little memory, unknown
    /// template...).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The host or the guest kind cannot do this (for example booting Linux on a host whose
    /// KVM is PVM, or pausing a Linux capsule).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An argument to an operation is unusable (for example a command longer than the
    /// guest accepts).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The capsule is not in a state that allows the operation.
    #[error("capsule {id} is {status}: cannot {operation}")]
    InvalidState {
        /// The capsule.
        id: CapsuleId,
        /// Its status when the operation was attempted.
        status: Status,
        /// What was attempted.
        operation: &'static str,
    },
    /// A command or a wait did not finish in time ([`TimeoutKind`] says which). A boot that
    /// runs out of time is [`Error::BootTimeout`].
    #[error("{kind} timed out after {after:?}")]
    Timeout {
        /// What timed out.
        kind: TimeoutKind,
        /// The limit that was exceeded.
        after: Duration,
    },
    /// The guest did not become ready within [`crate::EngineConfig::boot_timeout`]. Nothing
    /// is left running.
    #[error(
        "capsule {id} did not become ready within {after:?}{}{}",
        state_suffix(state),
        console_suffix(console)
    )]
    BootTimeout {
        /// The capsule.
        id: CapsuleId,
        /// The limit that was exceeded.
        after: Duration,
        /// The last lines its serial console printed (empty for guests without one), to
        /// tell a slow boot from a stuck one.
        console: String,
        /// Where the machine was when the boot was abandoned, when the guest kind can tell:
        /// each vCPU (instruction and stack pointers and multiprocessing state, or how its
        /// thread ended) and each virtio device (status and queue indices).
        state: Vec<String>,
    },
    /// The guest crashed (triple fault, KVM internal error, unexpected exit...). The capsule
    /// is now in [`Status::Error`] with the same reason.
    #[error("capsule {id} crashed: {reason}")]
    GuestCrashed {
        /// The capsule.
        id: CapsuleId,
        /// What happened.
        reason: String,
    },
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// No template has this name.
    #[error("template {0:?} not found")]
    TemplateNotFound(String),
    /// The template cannot be deleted while running capsules map its memory.
    #[error("template {name:?} is used by {capsules} running capsule(s)")]
    TemplateInUse {
        /// The template.
        name: String,
        /// How many running capsules use it.
        capsules: usize,
    },
    /// Another engine (in this or another process) has the data directory open.
    #[error("the data directory {} is in use by another engine", .0.display())]
    DataDirLocked(PathBuf),
    /// A snapshot or template on disk is missing, corrupt, of an unsupported format version,
    /// or could not be written (disk full, I/O error). Nothing that was valid before is lost.
    #[error("snapshot: {0}")]
    Snapshot(#[source] capsule_snapshot::Error),
    /// A snapshot was written by an engine whose snapshot layout this one does not read
    /// (`found`, where this engine reads `supported`). Nothing is changed.
    #[error("snapshot layout version {found} is not supported (this engine reads {supported})")]
    SnapshotVersion {
        /// The layout version in the file.
        found: u32,
        /// The version this engine reads.
        supported: u32,
    },
    /// A snapshot is readable but does not describe this capsule (another guest kind, vCPU
    /// count or memory size), or says something the engine cannot use. The capsule stays as
    /// it was.
    #[error("snapshot does not match: {0}")]
    SnapshotMismatch(String),
    /// The hypervisor layer failed (a KVM ioctl, guest memory, building the machine...).
    #[error("hypervisor: {0}")]
    Hypervisor(#[source] capsule_vmm::Error),
    /// A [`crate::CommandHandle`] (or [`crate::PtyHandle`]) no longer receives its
    /// process's output and exit: the capsule was paused (the link to its guest is new after
    /// a resume), or another handle connected to the process. The process itself runs on:
    /// when the capsule runs, [`crate::Commands::connect`]`(pid)` gives a new handle that
    /// receives the rest of its output and its exit.
    #[error(
        "capsule {id}: this handle to process {pid} was detached ({reason}); once the capsule \
         runs, reconnect with commands().connect({pid})"
    )]
    ProcessDetached {
        /// The capsule.
        id: CapsuleId,
        /// The process, in the guest.
        pid: u32,
        /// Why (paused, or another handle connected).
        reason: String,
    },
    /// The guest's agent tracks no process with this pid: it never started one, or the
    /// process ended and its exit was reported (see [`crate::Commands::list`]).
    #[error("capsule {id} has no process {pid} started by its agent")]
    ProcessNotFound {
        /// The capsule.
        id: CapsuleId,
        /// The pid asked for.
        pid: u32,
    },
    /// The in-guest agent of a Linux capsule refused a request or broke its protocol.
    #[error("capsule {id}: agent: {reason}")]
    Agent {
        /// The capsule.
        id: CapsuleId,
        /// What the agent said or did.
        reason: String,
    },
    /// A file operation in a Linux capsule ([`crate::Capsule::files`]) failed in the guest:
    /// `kind` says why, `message` is what the guest's OS reported.
    #[error("guest file {path}: {kind}: {message}")]
    File {
        /// The guest path the operation was about.
        path: String,
        /// Not found, is a directory, permission denied, no space...
        kind: FileErrorKind,
        /// The guest's own account (the failed step and its OS error).
        message: String,
    },
    /// An engine limit ([`crate::EngineConfigBuilder::max_capsules`],
    /// [`crate::EngineConfigBuilder::max_memory_mb`]) or a host resource (file descriptors,
    /// threads, memory) is used up. Nothing was left behind, and other capsules are as they
    /// were.
    #[error("{resource} exhausted: {in_use} in use{}", limit_suffix(*limit))]
    ResourceExhausted {
        /// Which limit or resource.
        resource: Resource,
        /// How much of it is in use (capsules, MiB, open descriptors, threads; MiB of
        /// resident memory for host memory).
        in_use: u64,
        /// The limit, where one is known.
        limit: Option<u64>,
        /// The failure that showed a host resource was used up (none for an engine limit).
        #[source]
        cause: Option<Box<Error>>,
    },
    /// The host refused the engine a resource for `op` (a thread, a file descriptor...).
    #[error("{op}: {source}")]
    Os {
        /// What the engine was doing.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// What an [`Error::ResourceExhausted`] ran out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Resource {
    /// Capsules holding a VM (pending, starting or running) reached
    /// [`crate::EngineConfig::max_capsules`].
    Capsules,
    /// Their guest memory reached [`crate::EngineConfig::max_memory_mb`] (MiB).
    MemoryMb,
    /// The process has no file descriptor left (`RLIMIT_NOFILE`, or the system's table).
    FileDescriptors,
    /// The process may not start another thread.
    Threads,
    /// The host could not give the memory asked for.
    HostMemory,
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resource::Capsules => "the engine's capsule limit",
            Resource::MemoryMb => "the engine's guest memory limit (MiB)",
            Resource::FileDescriptors => "file descriptors",
            Resource::Threads => "threads",
            Resource::HostMemory => "host memory",
        })
    }
}

fn limit_suffix(limit: Option<u64>) -> String {
    limit.map(|l| format!(" of {l}")).unwrap_or_default()
}

/// Which limit an [`Error::Timeout`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TimeoutKind {
    /// A command's own timeout ([`crate::RunOptions::timeout`]); the command was killed, the
    /// capsule is still usable.
    Command,
    /// [`crate::Capsule::wait_ready`]'s timeout; the capsule was not running in time.
    WaitReady,
    /// A wait for a spawned command ([`crate::CommandHandle::wait_timeout`],
    /// [`crate::OutputStream::recv_timeout`]) ran out; the command runs on.
    Wait,
    /// A file operation's agent did not answer one of its requests within
    /// [`crate::Files::timeout`]; the capsule is still usable.
    File,
}

impl std::fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimeoutKind::Command => "command",
            TimeoutKind::WaitReady => "waiting until ready",
            TimeoutKind::Wait => "waiting for a command",
            TimeoutKind::File => "file operation",
        })
    }
}

impl From<InvalidId> for Error {
    fn from(e: InvalidId) -> Self {
        Error::InvalidId(e.0)
    }
}

impl From<capsule_snapshot::Error> for Error {
    fn from(e: capsule_snapshot::Error) -> Self {
        Error::Snapshot(e)
    }
}

impl Error {
    /// The OS error number behind this error, if an OS call failed.
    pub(crate) fn os_error(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. }
            | Error::Io { source, .. }
            | Error::KvmUnavailable { source, .. } => source.raw_os_error(),
            Error::Hypervisor(e) => e.os_error(),
            _ => None,
        }
    }

    /// An [`Error::Os`] for `op`.
    pub(crate) fn os(op: &'static str, source: io::Error) -> Self {
        Error::Os { op, source }
    }

    /// An [`Error::Io`] for `op` on `path`, as a `map_err` argument.
    pub(crate) fn io<'a>(
        op: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(io::Error) -> Error + 'a {
        move |source| Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The engine's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl From<capsule_vmm::Error> for Error {
    fn from(e: capsule_vmm::Error) -> Self {
        match e {
            capsule_vmm::Error::KvmUnavailable { path, kind, source } => {
                Error::KvmUnavailable { path, kind, source }
            }
            capsule_vmm::Error::InvalidConfig(why) => Error::InvalidConfig(why),
            other => Error::Hypervisor(other),
        }
    }
}

fn state_suffix(state: &[String]) -> String {
    if state.is_empty() {
        String::new()
    } else {
        format!(" ({})", state.join("; "))
    }
}

fn console_suffix(console: &str) -> String {
    if console.is_empty() {
        String::new()
    } else {
        format!("; its console ends with:\n{console}")
    }
}
