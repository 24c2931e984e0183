//! Seccomp filters for the threads that handle guest-controlled data: vCPU threads (VM exits,
//! port I/O and MMIO, guest memory) and the device thread (virtqueues).
//!
//! As in Firecracker, each such thread allows only the system calls (and, for `ioctl`, the
//! request numbers) it needs. A filter is installed by the thread itself, on itself only
//! ([`confine_current_thread`]; never with `SECCOMP_FILTER_FLAG_TSYNC`), so the embedding
//! program's other threads are never filtered. A filter cannot be removed, and threads the
//! filtered thread starts inherit it: a filtered thread must not start threads (the engine
//! hands crash and exit reports to an unfiltered thread).
//!
//! **Policy: a forbidden call fails with `EPERM`** ([`DENIED_ERRNO`], `SECCOMP_RET_ERRNO`); it
//! kills neither the process nor the thread. Killing the process is no default for a library
//! (one misbehaving capsule would take down the embedding program and every other capsule),
//! and killing only the thread (`SECCOMP_RET_KILL_THREAD`) could leave a lock held or a peer
//! waiting forever for an answer. With `EPERM` the call fails like any failing system call:
//! a needed call that is missing from a list makes its capsule end in `Error` with the failed
//! operation and "Operation not permitted" as the reason (and a log line), other capsules
//! carry on. What the filters stop is a compromised VMM thread (say, after a bug in device
//! emulation) opening files, sockets or processes, or issuing KVM ioctls that reshape its VM.
//!
//! The lists below were taken from `strace -f` of the test suites and from reading the code
//! that runs on these threads; each entry says why it is there. Refusals that are expected
//! and harmless: glibc's malloc reads `/proc/sys/vm/overcommit_memory` once per process and
//! `/sys/devices/system/cpu/online` once (when it first needs more arenas); if that first
//! time is on a filtered thread, the open fails and glibc falls back to its defaults (heap
//! shrinking as without strict overcommit, the CPU count from `sched_getaffinity`). A thread also runs code of
//! the embedding program: a `tracing` subscriber that does more than `write`, a debugger,
//! profiler or sanitizer making its own calls on these threads. That is the reason to switch
//! the filters off (the engine's `EngineConfig::seccomp(false)`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_regs,
    kvm_sregs, kvm_translation, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::error::{Error, Result};

/// What a system call outside a thread's list returns (`SECCOMP_RET_ERRNO`).
pub const DENIED_ERRNO: i32 = libc::EPERM;

/// Which kind of thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// A thread running a vCPU: `KVM_RUN` and the exits it handles, and (probe guests) the
    /// command queue, guest memory and saving the vCPU's state when frozen.
    Vcpu,
    /// The device thread: the event loop serving the virtqueues.
    Devices,
}

impl std::fmt::Display for ThreadRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ThreadRole::Vcpu => "vCPU",
            ThreadRole::Devices => "device",
        })
    }
}

/// Installs the filter of `role` on the calling thread, and on it alone. Irreversible; the
/// thread's future children inherit it. Fails (and the thread stays unfiltered) only if the
/// kernel refuses seccomp filters.
pub fn confine_current_thread(role: ThreadRole) -> Result<()> {
    let program = program(role)?;
    seccompiler::apply_filter(program)
        .map_err(|e| Error::Seccomp(format!("installing the {role} thread's filter: {e}")))
}

/// The compiled filter of `role`, built once per process.
fn program(role: ThreadRole) -> Result<&'static BpfProgram> {
    static VCPU: OnceLock<std::result::Result<BpfProgram, String>> = OnceLock::new();
    static DEVICES: OnceLock<std::result::Result<BpfProgram, String>> = OnceLock::new();
    let cell = match role {
        ThreadRole::Vcpu => &VCPU,
        ThreadRole::Devices => &DEVICES,
    };
    cell.get_or_init(|| compile(role))
        .as_ref()
        .map_err(|e| Error::Seccomp(format!("building the {role} thread's filter: {e}")))
}

fn compile(role: ThreadRole) -> std::result::Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules(role)?,
        SeccompAction::Errno(DENIED_ERRNO as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

/// The allowed calls of `role`: syscall number → conditions (none: any arguments).
fn rules(role: ThreadRole) -> std::result::Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let mut allow = |syscall: libc::c_long| {
        rules.insert(syscall, Vec::new());
    };
    // Both kinds of thread:
    // Locks, condition variables and channels (std, crossbeam) park and wake threads.
    allow(libc::SYS_futex);
    // Spinning backoff in crossbeam's channels and std's locks.
    allow(libc::SYS_sched_yield);
    // The allocator (glibc malloc creating, growing and trimming its arenas); glibc releases
    // an ending thread's stack pages with madvise; munmap also frees the vCPU's `kvm_run`
    // mapping when the thread drops its vCPU.
    allow(libc::SYS_mmap);
    allow(libc::SYS_munmap);
    allow(libc::SYS_mprotect);
    allow(libc::SYS_madvise);
    allow(libc::SYS_mremap);
    allow(libc::SYS_brk);
    // Eventfds (an interrupt through an irqfd, a queue notification written by the MMIO
    // transport, the device thread's wake-up) and stderr (panic messages, log lines).
    allow(libc::SYS_write);
    // Descriptors the thread drops: its vCPU's fd, the event loop's epoll fd.
    allow(libc::SYS_close);
    // Returning from a signal handler: the vCPU kick signal, or any signal the program takes.
    allow(libc::SYS_rt_sigreturn);
    // glibc blocks signals while a thread ends.
    allow(libc::SYS_rt_sigprocmask);
    // A thread ending (never `exit_group`).
    allow(libc::SYS_exit);
    // std's HashMap keys (seeded on first use in a thread); virtio-rng's entropy.
    allow(libc::SYS_getrandom);
    // `Instant::now` where the vDSO falls back to the system call (some clock sources).
    allow(libc::SYS_clock_gettime);
    // glibc counts the CPUs (to bound malloc's arenas) with it when reading
    // /sys/devices/system/cpu/online is refused (openat is not allowed).
    allow(libc::SYS_sched_getaffinity);
    // The virtio-console's host socket: std's UnixStream writes with send. A vCPU thread
    // writes to it when the guest's MMIO write activates the console with transmit buffers
    // already queued.
    allow(libc::SYS_sendto);
    match role {
        ThreadRole::Vcpu => {
            // A Linux guest that ended: its vCPU shuts the agent's socket down, so nobody
            // waits for an agent that is gone.
            allow(libc::SYS_shutdown);
        }
        ThreadRole::Devices => {
            // The event loop.
            allow(libc::SYS_epoll_wait);
            allow(libc::SYS_epoll_pwait);
            allow(libc::SYS_epoll_ctl);
            // Draining eventfds (queue notifications, the wake-up).
            allow(libc::SYS_read);
            // The virtio-console's host socket (std's UnixStream reads with recv).
            allow(libc::SYS_recvfrom);
            // A std::thread removes its signal stack when it ends.
            allow(libc::SYS_sigaltstack);
        }
    }
    // std (debug builds) checks that a descriptor is open, with F_GETFD, before closing it.
    rules.insert(
        libc::SYS_fcntl,
        vec![arg_is(1, libc::F_GETFD as u64, SeccompCmpArgLen::Dword)?],
    );
    if role == ThreadRole::Vcpu {
        let requests = VCPU_IOCTLS
            .iter()
            .map(|(request, _)| arg_is(1, u64::from(*request), SeccompCmpArgLen::Dword))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, requests);
    }
    Ok(rules)
}

/// A rule matching calls whose argument `index` equals `value`.
fn arg_is(
    index: u8,
    value: u64,
    len: SeccompCmpArgLen,
) -> std::result::Result<SeccompRule, String> {
    SeccompCondition::new(index, len, SeccompCmpOp::Eq, value)
        .and_then(|condition| SeccompRule::new(vec![condition]))
        .map_err(|e| e.to_string())
}

/// `KVMIO`, the KVM ioctls' type byte.
const KVMIO: u32 = 0xAE;

// The request numbers of KVM ioctls, encoded as kvm-ioctls encodes them (its constants are
// private) with vmm-sys-util's `_IOC`; every KVM request fits in 32 bits.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    vmm_sys_util::ioctl::ioctl_expr(dir, KVMIO, nr, size as u32) as u32
}
const fn io(nr: u32) -> u32 {
    ioc(vmm_sys_util::ioctl::_IOC_NONE, nr, 0)
}
const fn ior<T>(nr: u32) -> u32 {
    ioc(vmm_sys_util::ioctl::_IOC_READ, nr, std::mem::size_of::<T>())
}
const fn iow<T>(nr: u32) -> u32 {
    ioc(
        vmm_sys_util::ioctl::_IOC_WRITE,
        nr,
        std::mem::size_of::<T>(),
    )
}
const fn iowr<T>(nr: u32) -> u32 {
    let dir = vmm_sys_util::ioctl::_IOC_READ | vmm_sys_util::ioctl::_IOC_WRITE;
    ioc(dir, nr, std::mem::size_of::<T>())
}

/// Every ioctl a vCPU thread may issue, and why. Nothing on the VM or `/dev/kvm`: memory
/// slots, irqchip, vCPU creation and restoring state all happen before the thread starts.
pub const VCPU_IOCTLS: &[(u32, &str)] = &[
    (
        io(0x80),
        "KVM_RUN: running the guest (and completing an exit before a freeze)",
    ),
    (
        ior::<kvm_regs>(0x81),
        "KVM_GET_REGS: saving the vCPU; where a stopped vCPU is",
    ),
    (
        iow::<kvm_regs>(0x82),
        "KVM_SET_REGS: restarting a probe vCPU whose command was killed",
    ),
    (ior::<kvm_sregs>(0x83), "KVM_GET_SREGS: saving the vCPU"),
    (
        iowr::<kvm_translation>(0x85),
        "KVM_TRANSLATE: the code and stack where a stopped vCPU is (VcpuContext)",
    ),
    (iowr::<kvm_msrs>(0x88), "KVM_GET_MSRS: saving the vCPU"),
    (ior::<kvm_fpu>(0x8c), "KVM_GET_FPU: saving the vCPU"),
    (
        ior::<kvm_lapic_state>(0x8e),
        "KVM_GET_LAPIC: saving a vCPU with an in-kernel irqchip",
    ),
    (iowr::<kvm_cpuid2>(0x91), "KVM_GET_CPUID2: saving the vCPU"),
    (
        ior::<kvm_mp_state>(0x98),
        "KVM_GET_MP_STATE: saving the vCPU; where a stopped vCPU is",
    ),
    (
        ior::<kvm_vcpu_events>(0x9f),
        "KVM_GET_VCPU_EVENTS: saving the vCPU",
    ),
    (
        ior::<kvm_debugregs>(0xa1),
        "KVM_GET_DEBUGREGS: saving the vCPU",
    ),
    (io(0xa3), "KVM_GET_TSC_KHZ: saving the vCPU"),
    (ior::<kvm_xsave>(0xa4), "KVM_GET_XSAVE: saving the vCPU"),
    (ior::<kvm_xcrs>(0xa6), "KVM_GET_XCRS: saving the vCPU"),
    (
        ior::<kvm_xsave>(0xcf),
        "KVM_GET_XSAVE2: saving the vCPU (hosts with a larger XSAVE area)",
    ),
];
