//! Interrupting a running vCPU from another thread.
//!
//! A kick sets a flag and sends a real-time signal (`SIGRTMIN + KICK_SIGNAL_OFFSET`) to the
//! vCPU's thread. The signal handler sets `immediate_exit` in that thread's `kvm_run`, so
//! `KVM_RUN` returns at once whether the signal lands inside the guest or just before entry;
//! the run loop then sees the flag and returns [`super::VcpuEvent::Kicked`].
//!
//! The engine installs the handler once per process. A program embedding capsule must leave
//! that signal to it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use kvm_bindings::kvm_run;

use crate::error::{Error, Result};

/// Which real-time signal kicks vCPUs: `SIGRTMIN() + KICK_SIGNAL_OFFSET`.
pub const KICK_SIGNAL_OFFSET: i32 = 0;

thread_local! {
    /// The `kvm_run` of the vCPU this thread is running, while it runs one.
    static ARMED_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = ARMED_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is set only while this thread's `Vcpu::run` holds the vCPU's
        // kvm_run mapping alive (see `Armed`), and signal handlers run on that same thread.
        unsafe { (*run).immediate_exit = 1 };
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick signal handler (idempotent).
pub fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), i32>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick_signal)
                .map_err(|e| e.errno())
        })
        .map_err(|errno| Error::Os {
            op: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(errno),
        })
}

#[derive(Debug, Default)]
struct KickState {
    requested: AtomicBool,
    /// `pthread_t` of the thread inside `Vcpu::run`, 0 when none.
    thread: AtomicU64,
}

/// Interrupts a vCPU's [`super::Vcpu::run`] from any thread. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Kicker {
    state: Arc<KickState>,
}

impl Kicker {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Makes the vCPU's current or next `run` return [`super::VcpuEvent::Kicked`] promptly.
    pub fn kick(&self) {
        self.state.requested.store(true, Ordering::SeqCst);
        let thread = self.state.thread.load(Ordering::SeqCst);
        if thread != 0 {
            // SAFETY: `thread` is the pthread_t of a thread currently inside `Vcpu::run` (it
            // is cleared before `run` returns); a thread that returned in between is still
            // alive, since it owns the Vcpu, so the signal reaches a valid thread.
            unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) };
        }
    }

    /// Consumes a pending kick.
    pub(crate) fn take(&self) -> bool {
        self.state.requested.swap(false, Ordering::SeqCst)
    }

    /// Marks the calling thread as running this vCPU until the guard drops.
    pub(crate) fn arm(&self, run: &mut kvm_run) -> Armed<'_> {
        run.immediate_exit = 0;
        ARMED_RUN.with(|cell| cell.set(run as *mut kvm_run));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.state.thread.store(me as u64, Ordering::SeqCst);
        Armed { kicker: self }
    }

    /// Clears `immediate_exit` after a kick interrupted `KVM_RUN`.
    pub(crate) fn disarm_immediate_exit(&self, run: &mut kvm_run) {
        run.immediate_exit = 0;
    }
}

/// While alive, kicks signal the current thread and its handler may touch its `kvm_run`.
pub(crate) struct Armed<'a> {
    kicker: &'a Kicker,
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.kicker.state.thread.store(0, Ordering::SeqCst);
        ARMED_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }
}
