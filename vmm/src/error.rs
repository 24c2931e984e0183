//! The VMM layer's error type.

use std::io;
use std::path::PathBuf;

/// Why `/dev/kvm` could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmUnavailable {
    /// The device node does not exist (no KVM module loaded, or not a Linux host).
    Missing,
    /// The device exists but this process may not open it (add the user to the `kvm` group).
    PermissionDenied,
    /// The path opened, but what answers is not KVM (or a KVM with an unsupported API).
    NotKvm,
    /// Opening it failed for another reason.
    Other,
}

impl std::fmt::Display for KvmUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KvmUnavailable::Missing => "the device does not exist",
            KvmUnavailable::PermissionDenied => "permission denied",
            KvmUnavailable::NotKvm => "it is not a KVM device with API version 12",
            KvmUnavailable::Other => "it could not be opened",
        })
    }
}

/// Errors of the VMM layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `/dev/kvm` (or the configured path) cannot be used.
    #[error("KVM is unavailable at {}: {kind} ({source})", path.display())]
    KvmUnavailable {
        /// The path that was opened.
        path: PathBuf,
        /// What went wrong, in categories a caller can act on.
        kind: KvmUnavailable,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation, e.g. `KVM_CREATE_VM`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Guest memory could not be created or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A request the VMM cannot satisfy (too many vCPUs, too much memory...).
    #[error("invalid VM configuration: {0}")]
    InvalidConfig(String),
    /// `KVM_GET_MSRS` or `KVM_SET_MSRS` handled fewer MSRs than asked: KVM stopped at the
    /// first one it refused.
    #[error("{op} stopped at MSR {index:#x}: {done} of {total} MSRs handled")]
    MsrsIncomplete {
        /// `KVM_GET_MSRS` or `KVM_SET_MSRS`.
        op: &'static str,
        /// The MSR KVM refused.
        index: u32,
        /// How many MSRs KVM handled before it.
        done: usize,
        /// How many were asked for.
        total: usize,
    },
    /// Saved state does not fit the VM or vCPU it is restored into (an irqchip on one side
    /// only, an XSAVE area too large for the host...).
    #[error("incompatible state: {0}")]
    IncompatibleState(String),
    /// The vCPU's last exit (a [`crate::VcpuEvent::Yield`] from port I/O or MMIO) is only
    /// completed by KVM on the next `KVM_RUN`; saving now would record the instruction as not yet
    /// executed. Call [`crate::Vcpu::complete_pending_exit`] first.
    #[error(
        "the vCPU's last exit is not completed yet: call Vcpu::complete_pending_exit before saving"
    )]
    ExitNotCompleted,
    /// A file the boot needs (the kernel, the initramfs) cannot be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    BootFile {
        /// `"kernel"` or `"initramfs"`.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel image is not one this VMM can boot (not an ELF vmlinux or a 64-bit bzImage,
    /// truncated, no entry point for the protocol asked for).
    #[error("invalid kernel image: {0}")]
    InvalidKernel(String),
    /// The guest's RAM below the 32-bit MMIO gap cannot hold what the kernel needs.
    #[error("guest memory too small: the kernel needs RAM up to {needed:#x}, the guest has {available:#x} below the MMIO gap")]
    MemoryTooSmall {
        /// End (exclusive) of the memory the kernel needs.
        needed: u64,
        /// End (exclusive) of the guest's low RAM.
        available: u64,
    },
    /// The initramfs does not fit between the kernel and the top of low RAM.
    #[error(
        "the initramfs ({size} bytes) does not fit: {available} bytes are free above the kernel"
    )]
    InitrdTooLarge {
        /// Bytes of the initramfs.
        size: u64,
        /// Bytes free for it.
        available: u64,
    },
    /// The kernel command line is longer than the kernel accepts.
    #[error("the kernel command line is {len} bytes, the kernel accepts at most {max}")]
    CmdlineTooLong {
        /// Its length in bytes.
        len: usize,
        /// The most the kernel accepts (without the terminating NUL).
        max: usize,
    },
    /// A thread's seccomp filter could not be built or installed (see [`crate::seccomp`]).
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// Another OS call failed.
    #[error("{op}: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The VMM layer's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The OS error number behind this error, when an OS call failed (`EMFILE` when the
    /// process ran out of file descriptors, `ENOMEM`, ...).
    pub fn os_error(&self) -> Option<i32> {
        match self {
            Error::KvmUnavailable { source, .. }
            | Error::Kvm { source, .. }
            | Error::BootFile { source, .. }
            | Error::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// Wraps a failed `mmap` of guest memory: the OS error kept when there is one (so a
    /// caller can tell `ENOMEM` apart), the description otherwise.
    pub(crate) fn mmap(what: &str, e: vm_memory::mmap::MmapRegionError) -> Self {
        match e {
            vm_memory::mmap::MmapRegionError::Mmap(source) => Error::Os {
                op: "mapping guest memory",
                source,
            },
            other => Error::Memory(format!("{what}: {other}")),
        }
    }

    /// Wraps a failed KVM ioctl.
    pub(crate) fn kvm(op: &'static str, e: kvm_ioctls::Error) -> Self {
        Error::Kvm {
            op,
            source: io::Error::from_raw_os_error(e.errno()),
        }
    }
}
