//! Kinds of guest a capsule can run, and the contract between a running guest and the engine.
//!
//! A guest kind knows how to build its VM and serve commands; the engine only sees a
//! [`Runtime`]: hand it [`Job`]s, shut it down. A guest reports crashes through
//! [`GuestEvents`]. Today there is one kind, [`probe`]; a Linux kind with virtio devices plugs
//! in beside it.

pub(crate) mod probe;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;

use capsule_vmm::{Hypervisor, Kicker};

use crate::capsule::CommandOutput;
use crate::config::CapsuleConfig;
use crate::error::{Error, Result};
use crate::id::CapsuleId;

/// The guest kinds and the templates that name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuestKind {
    /// The built-in probe guest (`"probe"`).
    Probe,
}

impl GuestKind {
    /// The guest kind behind a template name.
    pub(crate) fn for_template(name: &str) -> Result<Self> {
        match name {
            probe::TEMPLATE => Ok(GuestKind::Probe),
            other => Err(Error::InvalidConfig(format!(
                "unknown template {other:?} (available: {:?})",
                [probe::TEMPLATE]
            ))),
        }
    }

    /// Rejects resources this kind cannot run with.
    pub(crate) fn validate(self, config: &CapsuleConfig, max_vcpus: usize) -> Result<()> {
        match self {
            GuestKind::Probe => probe::validate(config, max_vcpus),
        }
    }

    /// Builds the VM and starts its vCPUs; returns once the guest is ready.
    pub(crate) fn boot(self, ctx: BootContext) -> Result<Arc<dyn Runtime>> {
        match self {
            GuestKind::Probe => Ok(probe::ProbeRuntime::boot(ctx)?),
        }
    }
}

/// What a guest needs to boot.
pub(crate) struct BootContext {
    pub(crate) id: CapsuleId,
    pub(crate) hypervisor: Hypervisor,
    pub(crate) config: CapsuleConfig,
    pub(crate) boot_timeout: Duration,
    pub(crate) events: Arc<dyn GuestEvents>,
}

/// How a running guest tells the engine about things it did not ask for.
pub(crate) trait GuestEvents: Send + Sync {
    /// The guest crashed; the capsule must go to error and its VM be released.
    fn crashed(&self, reason: String);
}

/// A running guest, as the engine drives it.
pub(crate) trait Runtime: Send + Sync {
    /// Queues a command; the job comes back if the guest is no longer taking work.
    fn submit(&self, job: Job) -> std::result::Result<(), Job>;
    /// The longest command line the guest accepts, in bytes.
    fn max_command_len(&self) -> usize;
    /// Stops every vCPU, waits for their threads and releases the VM. Idempotent. Must not be
    /// called from one of this runtime's own vCPU threads.
    fn shutdown(&self);
}

/// One command on its way to the guest.
pub(crate) struct Job {
    /// The command line.
    pub(crate) command: Vec<u8>,
    /// Where the result goes; dropped unanswered if the capsule stops first.
    pub(crate) reply: Sender<Result<CommandOutput>>,
    /// Lets the caller cancel it (after a timeout).
    pub(crate) control: Arc<JobControl>,
}

/// Cancellation shared by a job's caller and the vCPU that runs it.
#[derive(Default)]
pub(crate) struct JobControl {
    state: Mutex<JobState>,
}

#[derive(Default)]
struct JobState {
    cancelled: bool,
    runner: Option<Kicker>,
}

impl JobControl {
    /// Called by the caller: marks the job cancelled and interrupts the vCPU running it.
    pub(crate) fn cancel(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.cancelled = true;
        if let Some(kicker) = &state.runner {
            kicker.kick();
        }
    }

    /// Called by a vCPU taking the job: `false` if it was already cancelled. Registering and
    /// cancelling are serialised, so a cancel either sees the runner or the runner sees it.
    pub(crate) fn start(&self, runner: Kicker) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.cancelled {
            return false;
        }
        state.runner = Some(runner);
        true
    }

    /// Whether the caller gave up on the job.
    pub(crate) fn is_cancelled(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .cancelled
    }
}
