//! Linux guests: a real kernel booted by the VMM, with the project's agent as PID 1 running
//! commands through `/bin/sh`.
//!
//! Devices: an 8250 serial console (COM1, its output kept per capsule, see
//! [`crate::Capsule::console_log`]), the i8042 and HW-reduced ACPI sleep registers (so
//! `reboot` and `poweroff` end the capsule), and on virtio-mmio, described to the kernel
//! through ACPI: a virtio-console, the agent's channel (`/dev/hvc0`), and virtio-rng. Queue
//! notifications reach the device thread through ioeventfds and interrupts leave through
//! irqfds, so the agent's bytes never cost a vCPU exit each.
//!
//! Each vCPU has a thread running the exit loop; application processors wait in KVM for the
//! boot processor's INIT/SIPI. The capsule is running once the agent's `Hello` arrives.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{select, Receiver, Sender};
use serde::{Deserialize, Serialize};

use capsule_agent_protocol::{
    ErrorCode, ErrorInfo, ExitInfo, ExitStatus, Hello, RunRequest, SyncRequest, MAX_BUFFERED_OUTPUT,
};
use capsule_devices::serial::SerialLog;
use capsule_devices::Bus;
use capsule_snapshot::bitmap::PageBitmap;
use capsule_snapshot::PAGE_SIZE;
use capsule_vmm::machine::linux::LinuxDeviceState;
use capsule_vmm::machine::LinuxMachine;
use capsule_vmm::memory as vmm_memory;
use capsule_vmm::vcpu::VcpuState;
use capsule_vmm::{HostInfo, Kicker, Vcpu, VcpuEvent, Vm};

use super::agent_link::{AgentLink, LinkError, WritesHeld};
use super::start_phases::StartPhases;
use super::vcpu_set::VcpuSet;
use super::{
    BootContext, Frozen, GuestEvents, GuestState, Job, MachineState, MemoryImage, MemoryOrigin,
    Resources, Runtime,
};
use crate::config::RunOptions;
use crate::error::{Error, Result, TimeoutKind};
use crate::model::{CapsuleId, Command, CommandOutput, GuestKind, PtySize, Signal};
use crate::pool::{FileStamp, Shell, ShellShape};
use crate::sync::lock;

/// The template name of the Linux guest.
const TEMPLATE: &str = GuestKind::Linux.template();
/// The kernel and initramfs of the minimal template, in its image directory: the bzImage,
/// and (preferred when present) the same kernel as an uncompressed ELF booted through PVH,
/// which spares every boot the kernel's self-decompression.
pub(crate) const KERNEL_FILE: &str = "vmlinuz";
/// See [`KERNEL_FILE`].
pub(crate) const KERNEL_ELF_FILE: &str = "vmlinux";
/// See [`KERNEL_FILE`].
pub(crate) const INITRD_FILE: &str = "initrd.img";

const MIN_MEMORY_MB: u64 = 128;
const MAX_MEMORY_MB: u64 = 3072;
const MAX_VCPUS: u32 = 32;
/// Kernel command line. The console is the UART; the agent's channel is the virtio-console;
/// `reboot=k` resets through the i8042 and `panic=-1` turns a panic into that reset; `quiet`
/// keeps boot messages (one exit per byte on the UART) off the console, and `capsule.ready`
/// has the agent print its ready line there. Public as [`crate::LINUX_KERNEL_CMDLINE`] (the
/// benches boot other VMMs with the same line).
pub const CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet capsule.channel=/dev/hvc0 capsule.ready";
/// Most bytes of a shell command (the agent protocol bounds whole frames much higher).
const MAX_COMMAND: usize = 256 * 1024;
const VCPU_THREAD_STACK: usize = 512 * 1024;

/// Rejects resources (and hosts) Linux capsules cannot run with.
pub(crate) fn validate(resources: &Resources, host: &HostInfo) -> Result<()> {
    if !host.can_boot_linux() {
        return Err(Error::Unsupported(format!(
            "this host's KVM is {}: it cannot boot a Linux guest in useful time (the \
             \"probe\" template runs here; Linux needs hardware virtualization)",
            host.virtualization
        )));
    }
    let max_vcpus = MAX_VCPUS.min(host.max_vcpus as u32);
    if resources.vcpus == 0 || resources.vcpus > max_vcpus {
        return Err(Error::InvalidConfig(format!(
            "a Linux capsule runs with 1 to {max_vcpus} vCPUs, not {}",
            resources.vcpus
        )));
    }
    if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&resources.memory_mb) {
        return Err(Error::InvalidConfig(format!(
            "a Linux capsule needs {MIN_MEMORY_MB} to {MAX_MEMORY_MB} MiB of memory, not {}",
            resources.memory_mb
        )));
    }
    Ok(())
}

/// The kernel and initramfs of the minimal template in `images`.
pub(crate) fn image_files(images: &Path) -> Result<(PathBuf, PathBuf)> {
    let dir = images.join(TEMPLATE);
    let elf = dir.join(KERNEL_ELF_FILE);
    let kernel = if elf.is_file() {
        elf
    } else {
        dir.join(KERNEL_FILE)
    };
    let initrd = dir.join(INITRD_FILE);
    if !kernel.is_file() || !initrd.is_file() {
        return Err(Error::InvalidConfig(format!(
            "the \"{TEMPLATE}\" template is not built in {}: run `cargo xtask build-minimal` \
             (or point EngineConfig::linux_images at a directory with {TEMPLATE}/{KERNEL_FILE} \
             and {TEMPLATE}/{INITRD_FILE})",
            images.display()
        )));
    }
    Ok((kernel, initrd))
}

/// What a Linux guest keeps outside KVM and guest memory: its devices, and what the engine
/// knows of its agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LinuxGuestState {
    pub(crate) devices: LinuxDeviceState,
    pub(crate) agent: AgentState,
}

/// The agent of a frozen guest, as its link knew it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct AgentState {
    pub(crate) protocol_version: u32,
    pub(crate) agent_version: String,
    pub(crate) capabilities: u64,
    /// The next request id: ids below it may still be running in the guest.
    pub(crate) next_request_id: u32,
}

/// How the agent's link starts.
enum AgentStart {
    /// A booting guest: wait for its `Hello`.
    Boot,
    /// A restored guest: its agent runs on.
    Restored(AgentState),
}

/// Requests to a vCPU thread besides stopping.
enum Control {
    /// Complete the last exit, report the vCPU's state, and wait until `thaw` closes.
    Freeze {
        reply: Sender<capsule_vmm::Result<(u32, VcpuState)>>,
        thaw: Receiver<()>,
    },
}

/// A running Linux guest.
pub(crate) struct LinuxRuntime {
    id: CapsuleId,
    link: Arc<AgentLink>,
    console: SerialLog,
    vcpus: VcpuSet,
    /// Per vCPU thread: its control channel and its kicker.
    controls: Vec<(Sender<Control>, Kicker)>,
    /// Dropped to wake frozen vCPU threads when the guest shuts down.
    stop: Mutex<Option<Sender<()>>>,
    /// The devices and their thread, released (with the VM) at shutdown.
    machine: Mutex<Option<LinuxMachine>>,
    vm: Arc<Vm>,
    origin: MemoryOrigin,
    boot_timeout: Duration,
}

impl LinuxRuntime {
    /// Boots the kernel and waits for the agent's hello.
    pub(crate) fn boot(ctx: BootContext) -> Result<Arc<Self>> {
        let mut phases = StartPhases::begin("boot");
        validate(&ctx.config, ctx.hypervisor.info())?;
        let (kernel, initrd) = image_files(&ctx.linux_images)?;
        let options = LinuxMachine::vm_options();
        let shape = ShellShape {
            memory_mb: ctx.config.memory_mb,
            vcpus: ctx.config.vcpus,
            dirty_log: options.dirty_log,
            irqchip: options.irqchip,
            backing: None,
            linux: Some((FileStamp::of(&kernel)?, FileStamp::of(&initrd)?)),
            linux_layout: true,
        };
        let config = LinuxMachine::boot_config(
            kernel,
            Some(initrd.into()),
            CMDLINE,
            ctx.config.vcpus,
            ctx.config.memory_mb,
        )?;
        // A pre-built shell has the kernel and initramfs in memory already (see pool).
        let Shell {
            vm, vcpus, loaded, ..
        } = ctx.shells.take(shape, None, Some(&config))?;
        phases.mark(if loaded.is_some() {
            "shell(loaded)"
        } else {
            "shell"
        });
        let machine =
            LinuxMachine::assemble(&ctx.id.to_string(), vm, vcpus, &config, loaded, ctx.seccomp)?;
        phases.mark("machine");
        Self::start(ctx, machine, AgentStart::Boot, MemoryOrigin::Fresh, phases)
    }

    /// Rebuilds a Linux guest from `machine` over the memory in `image`: its processes, open
    /// files and agent run on from where they were frozen.
    pub(crate) fn restore(
        ctx: BootContext,
        machine: &MachineState,
        image: &MemoryImage,
        origin: MemoryOrigin,
    ) -> Result<Arc<Self>> {
        let mut phases = StartPhases::begin("restore");
        validate(&ctx.config, ctx.hypervisor.info())?;
        let GuestState::Linux(state) = &machine.guest else {
            return Err(Error::SnapshotMismatch(
                "the snapshot is not of a Linux guest".into(),
            ));
        };
        if machine.vcpus.len() != ctx.config.vcpus as usize {
            return Err(Error::SnapshotMismatch(format!(
                "the snapshot has {} vCPUs, the capsule {}",
                machine.vcpus.len(),
                ctx.config.vcpus
            )));
        }
        let options = LinuxMachine::vm_options();
        let shape = ShellShape {
            memory_mb: ctx.config.memory_mb,
            vcpus: ctx.config.vcpus,
            dirty_log: options.dirty_log,
            irqchip: options.irqchip,
            backing: image.base_id,
            linux: None,
            linux_layout: true,
        };
        // A template's capsules get shells whose memory already maps its base layer.
        let shell = ctx.shells.take(shape, image.base.as_ref(), None)?;
        let premapped = image.base_id.is_some() && image.base_id == shell.backing;
        phases.mark(if premapped {
            "shell(premapped)"
        } else {
            "shell"
        });
        // SAFETY: a shell's vCPUs have never run, and the shell is ours alone until it is
        // handed to the machine below.
        unsafe { super::memory::restore(shell.vm.memory(), image, premapped) }?;
        phases.mark("memory");
        let restored = LinuxMachine::restore(
            &ctx.id.to_string(),
            shell.vm,
            shell.vcpus,
            &state.devices,
            &machine.vm,
            &machine.vcpus,
            ctx.seccomp,
        )?;
        phases.mark("machine");
        Self::start(
            ctx,
            restored,
            AgentStart::Restored(state.agent.clone()),
            origin,
            phases,
        )
    }

    /// Starts the vCPU threads, connects to the agent and syncs it (wall clock, entropy, the
    /// capsule's id); returns once the agent answered.
    fn start(
        ctx: BootContext,
        mut machine: LinuxMachine,
        agent: AgentStart,
        origin: MemoryOrigin,
        mut phases: StartPhases,
    ) -> Result<Arc<Self>> {
        let vm = machine.vm().clone();
        let console_log = machine.console_log().clone();
        let host_end = machine.take_agent_channel().ok_or_else(|| {
            Error::os(
                "taking the agent channel",
                std::io::Error::other("a new machine's channel was taken already"),
            )
        })?;
        let msrs = ctx.hypervisor.msrs_to_save(vm.options().irqchip)?.to_vec();
        let vcpu_set = VcpuSet::new();
        let events = super::event_relay::for_vcpu_threads(&ctx)?;
        let positions = Arc::new(Mutex::new(Vec::new()));
        // A vCPU whose guest ended closes the agent's channel, so nobody waits for an agent
        // that is gone (a boot that crashed fails at once rather than at its timeout).
        let channel = Arc::new(
            host_end
                .try_clone()
                .map_err(|e| Error::os("cloning the agent channel", e))?,
        );
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut controls = Vec::new();
        for vcpu in machine.take_vcpus() {
            let kicker = vcpu.kicker();
            let (control_tx, control_rx) = crossbeam_channel::unbounded();
            controls.push((control_tx, kicker.clone()));
            let worker = VcpuLoop {
                id: ctx.id.clone(),
                vcpu,
                vm: vm.clone(),
                pio: machine.pio().clone(),
                mmio: machine.mmio().clone(),
                stopping: vcpu_set.stop_flag(),
                control: control_rx,
                stop: stop_rx.clone(),
                msrs: msrs.clone(),
                events: events.clone(),
                console: console_log.clone(),
                positions: positions.clone(),
                channel: channel.clone(),
            };
            let index = worker.vcpu.index();
            // On failure the set is dropped, which stops the threads started so far.
            vcpu_set.spawn(
                &format!("{}-vcpu{index}", ctx.id),
                VCPU_THREAD_STACK,
                kicker,
                ctx.seccomp,
                move || worker.run(),
            )?;
        }
        phases.mark("vcpu_threads");
        let reader = host_end
            .try_clone()
            .map_err(|e| Error::os("cloning the agent channel", e))?;
        let linked = match agent {
            AgentStart::Boot => {
                AgentLink::connect(Box::new(reader), Box::new(host_end), ctx.boot_timeout)
            }
            AgentStart::Restored(agent) => AgentLink::restored(
                Box::new(reader),
                Box::new(host_end),
                Hello {
                    protocol_version: agent.protocol_version,
                    agent_version: agent.agent_version,
                    capabilities: agent.capabilities,
                },
                agent.next_request_id,
            ),
        };
        let synced = linked.and_then(|link| {
            link.sync(sync_request(&ctx.id), ctx.boot_timeout)
                .map(|()| link)
        });
        let link = match synced {
            Ok(link) => {
                // A link that ends (the framing lost, the stream closed) shuts the channel,
                // so that a write blocked on a guest that no longer reads fails at once.
                let channel = channel.clone();
                link.on_end(move || {
                    let _ = channel.shutdown(std::net::Shutdown::Both);
                });
                link
            }
            Err(e) => {
                let tail = console_tail(&console_log);
                drop(stop_tx);
                vcpu_set.stop();
                let mut state = std::mem::take(&mut *lock(&positions));
                state.sort();
                state.extend(machine.describe_devices());
                return Err(match e {
                    LinkError::Timeout => Error::BootTimeout {
                        id: ctx.id.clone(),
                        after: ctx.boot_timeout,
                        console: tail,
                        state,
                    },
                    LinkError::Agent(reason) => Error::Agent {
                        id: ctx.id.clone(),
                        reason: format!("the agent refused the start-up sync: {reason}"),
                    },
                    other => Error::GuestCrashed {
                        id: ctx.id.clone(),
                        reason: format!(
                            "the guest ended before its agent was ready ({other}; {}); console:\n{tail}",
                            state.join("; ")
                        ),
                    },
                });
            }
        };
        phases.mark("agent");
        phases.log(&ctx.id);
        tracing::debug!(capsule = %ctx.id, agent = %link.hello().agent_version, "agent ready");
        Ok(Arc::new(LinuxRuntime {
            id: ctx.id.clone(),
            link,
            console: console_log,
            vcpus: vcpu_set,
            controls,
            stop: Mutex::new(Some(stop_tx)),
            machine: Mutex::new(Some(machine)),
            vm,
            origin,
            boot_timeout: ctx.boot_timeout,
        }))
    }

    /// Why a vCPU thread could not be frozen: it ended, which only a crash does while the
    /// capsule's lifecycle lock is held.
    fn ended_error(&self) -> Error {
        Error::GuestCrashed {
            id: self.id.clone(),
            reason: "a vCPU thread ended while the capsule was being frozen".into(),
        }
    }

    /// Has the agent hold its processes' reports before the guest is frozen, so that a
    /// process ending in the instant a restored copy resumes, before that copy's `Sync`,
    /// keeps its exit for a `connect` rather than sending it to a request of the old link.
    /// `None` if the agent predates holding or did not answer (logged; the freeze goes on).
    fn hold_reports(&self) -> Option<ReportsHeld> {
        match self.link.hold_reports(REPORT_HOLD_LIMIT) {
            Ok(true) => Some(ReportsHeld(self.link.clone())),
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(capsule = %self.id, error = %e, "the agent did not hold its processes' reports for the snapshot");
                // A late `Ack` may still hold them: release whatever it held.
                drop(ReportsHeld(self.link.clone()));
                None
            }
        }
    }

    /// Stops every vCPU at a consistent point; returns their states (by index) and the
    /// sender whose drop lets them run on.
    fn freeze_vcpus(&self) -> Result<(Vec<VcpuState>, Sender<()>)> {
        let (thaw_tx, thaw_rx) = crossbeam_channel::bounded::<()>(0);
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        for (control, kicker) in &self.controls {
            let request = Control::Freeze {
                reply: reply_tx.clone(),
                thaw: thaw_rx.clone(),
            };
            if control.send(request).is_err() {
                return Err(self.ended_error());
            }
            kicker.kick();
        }
        drop(reply_tx);
        let mut states = Vec::with_capacity(self.controls.len());
        for _ in 0..self.controls.len() {
            match reply_rx.recv() {
                Ok(Ok(frozen)) => states.push(frozen),
                Ok(Err(e)) => return Err(Error::Hypervisor(e)),
                Err(_) => return Err(self.ended_error()),
            }
        }
        states.sort_by_key(|(index, _)| *index);
        Ok((states.into_iter().map(|(_, s)| s).collect(), thaw_tx))
    }

    /// With the vCPUs and devices stopped: holds the agent link's writes, moves every byte
    /// it wrote into the console, and waits until its reader has taken every byte the
    /// console wrote; returns the hold and the start of a frame the agent was sending (it
    /// belongs in front of the console's output in a snapshot).
    fn quiesce_agent_channel(&self, machine: &LinuxMachine) -> Result<(WritesHeld, Vec<u8>)> {
        let deadline = Instant::now() + CHANNEL_QUIESCE_LIMIT;
        let held = loop {
            // A write blocked on a full socket finishes once the console has read it.
            machine.absorb_agent_input();
            if let Some(held) = self.link.try_hold_writes() {
                break held;
            }
            if Instant::now() > deadline {
                return Err(self.channel_stuck("a write to the agent did not finish"));
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        machine.absorb_agent_input();
        let sent = machine.agent_output_bytes();
        while self.link.received_bytes() < sent {
            if self.link.is_closed() || Instant::now() > deadline {
                return Err(self.channel_stuck("the agent's output was not all read"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok((held, self.link.undecoded()))
    }

    fn channel_stuck(&self, what: &str) -> Error {
        Error::Agent {
            id: self.id.clone(),
            reason: format!(
                "the agent channel could not be quiesced for a snapshot within {CHANNEL_QUIESCE_LIMIT:?}: {what}"
            ),
        }
    }

    /// The pages written since the memory's origin: without a dirty log, the pages the
    /// process holds privately (see `capsule_vmm::memory::private_pages`).
    fn written_pages(&self) -> Result<PageBitmap> {
        let memory = self.vm.memory();
        let flat = vmm_memory::flatten_dirty(memory, &vmm_memory::private_pages(memory)?)?;
        let pages = vmm_memory::size_of(memory) / PAGE_SIZE;
        Ok(PageBitmap::from_kvm_words(&flat, pages)?)
    }
}

/// How long a freeze waits for the agent channel to settle (a write in progress, the reader
/// catching up): both take microseconds unless the host is starved.
const CHANNEL_QUIESCE_LIMIT: Duration = Duration::from_secs(10);

/// How long a freeze waits for the agent to hold its processes' reports; past it the
/// guest is frozen anyway (an agent that does not answer must not keep a capsule from being
/// paused), and only a process that ends in the instant a restored copy resumes may lose its
/// exit to the handle that existed before.
const REPORT_HOLD_LIMIT: Duration = Duration::from_secs(5);

/// While alive, the agent holds its processes' output and exits (the protocol's `Hold`); its
/// drop lets them through again on a guest that runs on. A snapshot's copy of the agent is
/// released by the `Sync` of its restore, which also detaches every process from the
/// requests of the old link.
struct ReportsHeld(Arc<AgentLink>);

impl Drop for ReportsHeld {
    fn drop(&mut self) {
        // A paused capsule's link is closed by now: nothing runs on to release.
        if !self.0.is_closed() {
            if let Err(e) = self.0.release_reports() {
                tracing::debug!(error = %e, "could not release the agent's held reports");
            }
        }
    }
}

/// What the agent is told whenever its guest starts or resumes: the host's wall clock, fresh
/// entropy for the kernel's CRNG (clones of one snapshot must not share randomness), and the
/// capsule's id for commands (`CAPSULE_ID`).
fn sync_request(id: &CapsuleId) -> SyncRequest {
    let mut entropy = vec![0u8; SYNC_ENTROPY_BYTES];
    if let Err(e) = getrandom::fill(&mut entropy) {
        // Without host entropy the guest's own pool still reseeds from its own sources.
        tracing::warn!(error = %e, "no host entropy for the guest's CRNG");
        entropy.clear();
    }
    let realtime_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    SyncRequest {
        realtime_ns,
        entropy,
        env: vec![(CAPSULE_ID_ENV.into(), id.to_string())],
    }
}

/// Bytes of host entropy sent at each sync (a full reseed of a ChaCha20 CRNG needs 32).
const SYNC_ENTROPY_BYTES: usize = 64;
/// The environment variable that holds the capsule's id in every command.
pub(crate) const CAPSULE_ID_ENV: &str = "CAPSULE_ID";

/// The last lines of the console, for error reports.
fn console_tail(log: &SerialLog) -> String {
    let text = String::from_utf8_lossy(&log.console_log()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// One vCPU thread.
struct VcpuLoop {
    id: CapsuleId,
    vcpu: Vcpu,
    /// Its VM: kept alive while the thread runs, and its memory read for reports.
    vm: Arc<Vm>,
    pio: Bus,
    mmio: Bus,
    stopping: Arc<AtomicBool>,
    control: Receiver<Control>,
    /// Disconnected when the guest shuts down (wakes a frozen thread).
    stop: Receiver<()>,
    /// MSRs to save when frozen.
    msrs: Vec<u32>,
    events: Arc<dyn GuestEvents>,
    console: SerialLog,
    /// Where each vCPU was when it was stopped (or how it ended), for a boot that timed out.
    positions: Arc<Mutex<Vec<String>>>,
    /// The host end of the agent's channel, shut down when the guest ends.
    channel: Arc<UnixStream>,
}

impl VcpuLoop {
    fn run(mut self) {
        let end = self.run_until_stopped();
        if !self.stopping.load(Ordering::SeqCst) {
            // The guest ended by itself: whoever waits on its agent learns it now.
            let _ = self.channel.shutdown(std::net::Shutdown::Both);
        }
        lock(&self.positions).push(end);
    }

    /// Runs the exit loop until the capsule stops or the guest ends; returns where the vCPU
    /// was, or how it ended.
    fn run_until_stopped(&mut self) -> String {
        let index = self.vcpu.index();
        loop {
            match self.vcpu.run(&self.pio, &self.mmio) {
                Ok(VcpuEvent::Kicked) | Ok(VcpuEvent::Yield(_)) | Ok(VcpuEvent::Halted) => {
                    while let Ok(control) = self.control.try_recv() {
                        self.handle_control(control);
                    }
                    if self.stopping.load(Ordering::SeqCst) {
                        return self.position();
                    }
                }
                Ok(VcpuEvent::Shutdown) => {
                    // A triple fault ends the same way as a reset: where the vCPU was tells
                    // them apart.
                    let position = self.position();
                    let registers = self
                        .vcpu
                        .fault_registers()
                        .unwrap_or_else(|e| format!("registers unreadable: {e}"));
                    let log = String::from_utf8_lossy(&self.console.console_log()).into_owned();
                    if log.contains("Kernel panic") {
                        self.events.crashed(format!(
                            "the guest kernel panicked; console:\n{}",
                            console_tail(&self.console)
                        ));
                    } else {
                        tracing::info!(
                            capsule = %self.id,
                            %position,
                            %registers,
                            "guest powered off or rebooted"
                        );
                        self.events.exited(format!(
                            "shutdown exit (power-off, reboot or triple fault) on {position}; \
                             {registers}"
                        ));
                    }
                    // Also in the reason of a start that this ends.
                    return format!(
                        "vCPU{index}: ended by a shutdown exit ({position}; {registers})"
                    );
                }
                Ok(VcpuEvent::Failed(reason)) => {
                    let end = format!("vCPU{index}: failed: {reason}");
                    self.events.crashed(format!(
                        "{reason}; console:\n{}",
                        console_tail(&self.console)
                    ));
                    return end;
                }
                Err(e) => {
                    if !self.stopping.load(Ordering::SeqCst) {
                        self.events.crashed(e.to_string());
                    }
                    return format!("vCPU{index}: ended: {e}");
                }
            }
        }
    }

    /// Serves a freeze: completes the last exit (KVM finishes it only at the next entry),
    /// reports the state, and waits for the thaw or the guest's end.
    fn handle_control(&mut self, control: Control) {
        match control {
            Control::Freeze { reply, thaw } => {
                let state = self
                    .vcpu
                    .complete_pending_exit()
                    .and_then(|()| self.vcpu.save_state(&self.msrs))
                    .map(|state| (self.vcpu.index(), state));
                let _ = reply.send(state);
                select! {
                    recv(thaw) -> _ => {}
                    recv(self.stop) -> _ => {}
                }
            }
        }
    }

    /// The vCPU's instruction pointer, stack pointer and multiprocessing state, and the code
    /// and stack there (what places a hang without symbols), in words.
    fn position(&self) -> String {
        let position = match self.vcpu.position() {
            Ok(position) => position.to_string(),
            Err(e) => return format!("vCPU{}: position unreadable: {e}", self.vcpu.index()),
        };
        match self.vcpu.context(self.vm.memory()) {
            Ok(context) => format!("{position}; {context}"),
            Err(e) => format!("{position}; code and stack unreadable: {e}"),
        }
    }
}

impl Runtime for LinuxRuntime {
    fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        if self.vcpus.is_stopping() || self.link.is_closed() {
            return Err(job);
        }
        let (link, id, grace) = (self.link.clone(), self.id.clone(), self.boot_timeout);
        let reply = job.reply.clone();
        let spawned = std::thread::Builder::new()
            .name("capsule-linux-cmd".into())
            .spawn(move || run_job(&link, &id, job, grace));
        if let Err(e) = spawned {
            let _ = reply.send(Err(Error::os("spawning a command thread", e)));
        }
        Ok(())
    }

    fn max_command_len(&self) -> usize {
        MAX_COMMAND
    }

    /// Stops the vCPUs (not waiting for commands: their processes are frozen with the rest),
    /// then the devices, settles the agent channel, and reads every state.
    fn freeze(&self) -> Result<Frozen> {
        let reports_held = self.hold_reports();
        let (vcpus, thaw) = self.freeze_vcpus()?;
        let machine = lock(&self.machine);
        let Some(machine) = machine.as_ref() else {
            return Err(self.ended_error());
        };
        let devices_paused = machine.pause_devices()?;
        let (writes_held, undecoded) = self.quiesce_agent_channel(machine)?;
        let mut devices = machine.save_devices();
        // The start of a frame the agent was sending: the restored guest's link must read
        // it again from the beginning.
        devices.console.to_host = [undecoded, devices.console.to_host].concat();
        let mut vm = self.vm.save_state()?;
        // The guest's monotonic clocks count only time it ran; its wall clock is set by
        // the sync at every start.
        vm.clear_clock_advance();
        let dirty = self.written_pages()?;
        let hello = self.link.hello();
        let guest = GuestState::Linux(Box::new(LinuxGuestState {
            devices,
            agent: AgentState {
                protocol_version: hello.protocol_version,
                agent_version: hello.agent_version.clone(),
                capabilities: hello.capabilities,
                next_request_id: self.link.next_id(),
            },
        }));
        Ok(Frozen {
            machine: MachineState { vm, vcpus, guest },
            vm: self.vm.clone(),
            dirty,
            origin: self.origin.for_snapshot(),
            _thaw: thaw,
            // Dropped in this order after the vCPUs thaw: the release is written once the
            // link's writes are no longer held.
            _hold: Some(Box::new((devices_paused, writes_held, reports_held))),
        })
    }

    fn console(&self) -> Option<SerialLog> {
        Some(self.console.clone())
    }

    fn agent(&self) -> Option<Arc<AgentLink>> {
        Some(self.link.clone())
    }

    fn shutdown(&self) {
        self.link.close();
        self.vcpus.mark_stopping();
        lock(&self.stop).take();
        self.vcpus.stop();
        if let Some(mut machine) = lock(&self.machine).take() {
            let _ = machine.stop_devices();
        }
    }
}

impl Drop for LinuxRuntime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// How a [`RunRequest`] is to run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunMode {
    /// Killed by the agent after this long.
    pub(crate) timeout: Option<Duration>,
    /// Output as chunks (flow-controlled, no limit) rather than in the `Exit`.
    pub(crate) streamed: bool,
    /// A stdin pipe (otherwise `/dev/null`, unless the options give stdin bytes).
    pub(crate) stdin_pipe: bool,
    /// On a terminal of this size.
    pub(crate) pty: Option<PtySize>,
}

/// The agent request that runs `command` with `options` as `mode` says.
pub(crate) fn run_request(command: &Command, options: &RunOptions, mode: RunMode) -> RunRequest {
    let command = match command {
        Command::Shell(script) => capsule_agent_protocol::Command::Shell(script.clone()),
        Command::Exec { program, args } => capsule_agent_protocol::Command::Exec {
            program: program.clone(),
            args: args.clone(),
        },
    };
    let limit = if mode.streamed {
        u32::MAX
    } else {
        u32::try_from(options.output_limit)
            .unwrap_or(u32::MAX)
            .min(MAX_BUFFERED_OUTPUT)
    };
    RunRequest {
        command,
        env: options.envs.clone(),
        clear_env: options.clear_env,
        cwd: options.cwd.clone(),
        timeout_ms: mode.timeout.map_or(0, |t| {
            u64::try_from(t.as_millis().max(1)).unwrap_or(u64::MAX)
        }),
        stdout_limit: limit,
        stderr_limit: limit,
        stream: mode.streamed,
        stdin: mode.stdin_pipe || options.stdin.is_some(),
        user: options.user.clone(),
        pty: mode.pty.map(super::window_size),
    }
}

/// What a finished command reports, from its `Exit` and the output kept of it.
pub(crate) fn command_output(exit: &ExitInfo, stdout: Vec<u8>, stderr: Vec<u8>) -> CommandOutput {
    let (exit_code, signal) = match exit.status {
        ExitStatus::Code(code) => (Some(code), None),
        ExitStatus::Signal(sig) => (None, Signal::new(sig)),
    };
    CommandOutput {
        stdout,
        stderr,
        exit_code,
        signal,
        duration: Duration::from_micros(exit.duration_us),
        stdout_truncated: exit.stdout_truncated,
        stderr_truncated: exit.stderr_truncated,
    }
}

/// The error for an agent's `Error` that ended a request about process `pid` (if known).
pub(crate) fn agent_error(id: &CapsuleId, error: &ErrorInfo, pid: Option<u32>) -> Error {
    match (error.code, pid) {
        (ErrorCode::UNKNOWN_USER, _) => Error::InvalidArgument(error.message.clone()),
        (ErrorCode::NO_SUCH_PROCESS, Some(pid)) => Error::ProcessNotFound {
            id: id.clone(),
            pid,
        },
        (ErrorCode::DETACHED, Some(pid)) => Error::ProcessDetached {
            id: id.clone(),
            pid,
            reason: "another handle connected to the process".into(),
        },
        _ => Error::Agent {
            id: id.clone(),
            reason: format!("the agent reported: {}", error.message),
        },
    }
}

/// Runs one command through the agent (its output collected by the agent and sent at the
/// end) and answers the job.
fn run_job(link: &AgentLink, id: &CapsuleId, job: Job, grace: Duration) {
    let timeout = job.options.run_timeout();
    let mode = RunMode {
        timeout,
        streamed: false,
        stdin_pipe: false,
        pty: None,
    };
    let request = run_request(&job.command, &job.options, mode);
    // The agent enforces the timeout (killing the process group); the host waits a little
    // longer for its answer.
    let host_wait = timeout.map(|t| t.saturating_add(grace));
    let result = match link.run(request, job.options.stdin.as_deref(), host_wait) {
        Ok(exit) if exit.timed_out => Err(Error::Timeout {
            kind: TimeoutKind::Command,
            after: timeout.unwrap_or_default(),
        }),
        Ok(mut exit) => {
            let (stdout, stderr) = (
                std::mem::take(&mut exit.stdout),
                std::mem::take(&mut exit.stderr),
            );
            Ok(command_output(&exit, stdout, stderr))
        }
        Err(LinkError::Timeout) => Err(Error::Timeout {
            kind: TimeoutKind::Command,
            after: timeout.unwrap_or_default(),
        }),
        Err(LinkError::Closed(_)) => return, // the guest went away: the caller sees the state
        Err(LinkError::Refused(e)) => Err(agent_error(id, &e, None)),
        Err(e @ (LinkError::Agent(_) | LinkError::Protocol(_))) => Err(Error::Agent {
            id: id.clone(),
            reason: e.to_string(),
        }),
    };
    let _ = job.reply.send(result);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{agent_link, JobControl};

    /// Runs `command` with `options` through `run_job` against the real agent.
    fn run(command: &str, options: RunOptions) -> Result<CommandOutput> {
        let link = agent_link::real_agent();
        let (reply, result) = crossbeam_channel::bounded(1);
        let job = Job {
            command: command.into(),
            reply,
            control: Arc::new(JobControl::default()),
            options,
        };
        let id: CapsuleId = "cl-test".parse().unwrap();
        run_job(&link, &id, job, Duration::from_secs(5));
        result.recv().unwrap()
    }

    #[test]
    fn commands_run_and_an_agent_refusal_is_an_agent_error() {
        let out = run("echo hi; exit 3", RunOptions::new()).unwrap();
        assert_eq!((&*out.stdout_str(), out.exit_code), ("hi\n", Some(3)));
        match run("true", RunOptions::new().cwd("/no/such/directory")) {
            Err(Error::Agent { id, reason }) => {
                assert_eq!(id.as_str(), "cl-test");
                // The agent could not start the command: it says so, with the OS error.
                assert!(reason.contains("spawn"), "{reason}");
            }
            other => panic!("expected an agent error, got {other:?}"),
        }
    }
}
