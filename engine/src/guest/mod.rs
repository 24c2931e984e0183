//! Kinds of guest a capsule can run, and the contract between a running guest and the engine.
//!
//! A guest kind knows how to build its VM and serve commands; the engine only sees a
//! [`Runtime`]: hand it [`Job`]s, shut it down. A guest reports crashes through
//! [`GuestEvents`]. Two kinds: [`probe`] and [`linux`] (a kernel with virtio devices and the
//! agent); the machines themselves are built by `capsule_vmm::machine`. Both keep their vCPU
//! threads in a [`vcpu_set::VcpuSet`] (threads from [`vcpu_thread`], each under its seccomp
//! filter by default, reporting crashes through [`event_relay`]); a snapshot's memory is put
//! under a new VM by [`memory::restore`].

pub(crate) mod agent_files;
pub(crate) mod agent_link;
pub(crate) mod event_relay;
pub(crate) mod linux;
pub(crate) mod memory;
pub(crate) mod probe;
pub(crate) mod start_phases;
pub(crate) mod vcpu_set;
pub(crate) mod vcpu_thread;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use capsule_devices::serial::SerialLog;
use capsule_snapshot::bitmap::PageBitmap;
use capsule_snapshot::chain::MemoryChain;
use capsule_vmm::vcpu::VcpuState;
use capsule_vmm::vm::VmState;
use capsule_vmm::{HostInfo, Hypervisor, Kicker, Vm};

use crate::config::RunOptions;
#[cfg(feature = "testing")]
use crate::error::Error;
use crate::error::Result;
use crate::model::{CapsuleId, Command, CommandOutput, GuestKind, PtySize};
use crate::pool::ShellPool;
use crate::sync::lock;

pub(crate) use memory::MemoryImage;

/// Rejects resources `kind` cannot run with (or a host it cannot run on).
pub(crate) fn validate(kind: GuestKind, resources: &Resources, host: &HostInfo) -> Result<()> {
    match kind {
        GuestKind::Probe => probe::validate(resources, host.max_vcpus),
        GuestKind::Linux => linux::validate(resources, host),
    }
}

/// Builds a VM of `kind` and starts its vCPUs; returns once the guest is ready.
pub(crate) fn boot(kind: GuestKind, ctx: BootContext) -> Result<Arc<dyn Runtime>> {
    match kind {
        GuestKind::Probe => Ok(probe::ProbeRuntime::boot(ctx)?),
        GuestKind::Linux => Ok(linux::LinuxRuntime::boot(ctx)?),
    }
}

/// Rebuilds a VM of `kind` from saved state over the memory of `image`; the guest continues
/// exactly where it was frozen.
pub(crate) fn restore(
    kind: GuestKind,
    ctx: BootContext,
    machine: &MachineState,
    image: &MemoryImage,
    origin: MemoryOrigin,
) -> Result<Arc<dyn Runtime>> {
    match kind {
        GuestKind::Probe => Ok(probe::ProbeRuntime::restore(ctx, machine, image, origin)?),
        GuestKind::Linux => Ok(linux::LinuxRuntime::restore(ctx, machine, image, origin)?),
    }
}

/// Keeps something alive for as long as a guest uses it (a template's files).
pub(crate) type Pin = Arc<dyn std::any::Any + Send + Sync>;

/// Where a running guest's memory came from, which decides what a snapshot of it writes.
/// Not `Clone`: a copy would carry the pin and count as another user of the template; a
/// snapshot takes [`MemoryOrigin::for_snapshot`].
pub(crate) enum MemoryOrigin {
    /// Fresh anonymous memory: a snapshot writes every page written since boot.
    Fresh,
    /// Mapped copy-on-write from the layer chain in `dir`: a snapshot writes only the pages
    /// dirtied since, as a new layer over that chain.
    Chain {
        /// The directory holding the layer files.
        dir: PathBuf,
        /// The chain as it was mapped.
        chain: MemoryChain,
        /// Marks the chain's owner (a template) as in use while the guest runs; only held,
        /// never read.
        _pin: Option<Pin>,
    },
}

impl MemoryOrigin {
    /// The origin as a snapshot of the running guest (a [`Frozen`]) needs it: without the
    /// pin, which the guest's own origin holds for as long as the snapshot can exist, so that
    /// a template's count of users counts running guests, not their snapshots in progress.
    pub(crate) fn for_snapshot(&self) -> MemoryOrigin {
        match self {
            MemoryOrigin::Fresh => MemoryOrigin::Fresh,
            MemoryOrigin::Chain { dir, chain, .. } => MemoryOrigin::Chain {
                dir: dir.clone(),
                chain: chain.clone(),
                _pin: None,
            },
        }
    }
}

/// All state of a frozen machine except memory: what a snapshot's state file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct MachineState {
    pub(crate) vm: VmState,
    pub(crate) vcpus: Vec<VcpuState>,
    pub(crate) guest: GuestState,
}

/// What a guest kind keeps outside KVM and guest memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum GuestState {
    /// The probe: the last request sequence number of each vCPU's mailbox.
    Probe { seqs: Vec<u32> },
    /// A Linux guest: its devices and agent.
    Linux(Box<linux::LinuxGuestState>),
}

/// A guest stopped at a consistent point (every vCPU between commands, its last exit
/// completed). The vCPUs continue when this is dropped.
pub(crate) struct Frozen {
    pub(crate) machine: MachineState,
    /// The VM, for reading its memory while frozen.
    pub(crate) vm: Arc<Vm>,
    /// Pages written since the memory's origin (KVM's dirty log OR the VMM's own writes).
    pub(crate) dirty: PageBitmap,
    pub(crate) origin: MemoryOrigin,
    /// Dropping this sender releases the frozen vCPU threads.
    pub(crate) _thaw: Sender<()>,
    /// Whatever else the guest kind holds still while frozen (its device thread, its agent
    /// link's writes), released on drop.
    pub(crate) _hold: Option<Box<dyn std::any::Any + Send>>,
}

/// The resources a capsule runs with, resolved from its config and template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resources {
    pub(crate) vcpus: u32,
    pub(crate) memory_mb: u64,
}

/// What a guest needs to boot.
pub(crate) struct BootContext {
    pub(crate) id: CapsuleId,
    pub(crate) hypervisor: Hypervisor,
    pub(crate) config: Resources,
    pub(crate) boot_timeout: Duration,
    pub(crate) events: Arc<dyn GuestEvents>,
    /// Where to get a fresh VM.
    pub(crate) shells: Arc<ShellPool>,
    /// Where the Linux templates' kernel and initramfs are.
    pub(crate) linux_images: PathBuf,
    /// Whether vCPU and device threads install their seccomp filters.
    pub(crate) seccomp: bool,
}

/// How a running guest tells the engine about things it did not ask for.
pub(crate) trait GuestEvents: Send + Sync {
    /// The guest crashed; the capsule must go to error and its VM be released.
    fn crashed(&self, reason: String);
    /// The guest shut itself down (power-off, reboot or triple fault: `how` says which
    /// exit and where the vCPU was); the capsule is stopped.
    fn exited(&self, how: String);
}

/// A running guest, as the engine drives it.
pub(crate) trait Runtime: Send + Sync {
    /// Queues a command; the job comes back if the guest is no longer taking work.
    // The job is returned to the caller that built it, once, on a path that already failed:
    // boxing it would cost an allocation on every command instead.
    #[allow(clippy::result_large_err)]
    fn submit(&self, job: Job) -> std::result::Result<(), Job>;
    /// The longest command line the guest accepts, in bytes.
    fn max_command_len(&self) -> usize;
    /// Refuses, with [`crate::Error::Unsupported`], a command this guest cannot run as asked
    /// (on a terminal when `pty` is set), rather than running it without what it asked for.
    fn check_run(&self, command: &Command, options: &RunOptions, pty: bool) -> Result<()> {
        let _ = (command, options, pty);
        Ok(())
    }
    /// Stops every vCPU between commands (waiting for running ones to finish) and returns
    /// the machine's state; the vCPUs stay stopped until the result is dropped.
    fn freeze(&self) -> Result<Frozen>;
    /// The guest's serial console output, if it has one.
    fn console(&self) -> Option<SerialLog> {
        None
    }
    /// The link to the guest's agent, for requests beyond plain commands (streams, stdin,
    /// signals, files); `None` for a guest without an agent (the probe). A link lasts as long
    /// as this runtime: after a pause and resume the capsule has a new one.
    fn agent(&self) -> Option<Arc<agent_link::AgentLink>> {
        None
    }
    /// Stops every vCPU, waits for their threads and releases the VM. Idempotent. Must not be
    /// called from one of this runtime's own vCPU threads.
    fn shutdown(&self);
    /// Runs `f` on one of the guest's vCPU threads, between commands (tests check what those
    /// threads may do); returns once it is handed over.
    #[cfg(feature = "testing")]
    fn run_on_vcpu_thread(&self, f: Box<dyn FnOnce() + Send>) -> Result<()> {
        drop(f);
        Err(Error::Unsupported(
            "this guest kind does not run test code on its vCPU threads".into(),
        ))
    }
}

/// One command on its way to the guest.
pub(crate) struct Job {
    /// What to run.
    pub(crate) command: Command,
    /// Where the result goes; dropped unanswered if the capsule stops first.
    pub(crate) reply: Sender<Result<CommandOutput>>,
    /// Lets the caller cancel it (after a timeout).
    pub(crate) control: Arc<JobControl>,
    /// Timeout, environment, working directory...
    pub(crate) options: RunOptions,
}

/// The size of a terminal as the agent protocol has it.
pub(crate) fn window_size(size: PtySize) -> capsule_agent_protocol::WindowSize {
    capsule_agent_protocol::WindowSize {
        rows: size.rows,
        cols: size.cols,
    }
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
        let mut state = lock(&self.state);
        state.cancelled = true;
        if let Some(kicker) = &state.runner {
            kicker.kick();
        }
    }

    /// Called by a vCPU taking the job: `false` if it was already cancelled. Registering and
    /// cancelling are serialised, so a cancel either sees the runner or the runner sees it.
    pub(crate) fn start(&self, runner: Kicker) -> bool {
        let mut state = lock(&self.state);
        if state.cancelled {
            return false;
        }
        state.runner = Some(runner);
        true
    }

    /// Whether the caller gave up on the job.
    pub(crate) fn is_cancelled(&self) -> bool {
        lock(&self.state).cancelled
    }
}
