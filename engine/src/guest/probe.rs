//! The built-in probe guest: building its VM and serving commands on its vCPUs.
//!
//! Every vCPU gets a thread. All threads take jobs from one queue, so a capsule with N vCPUs
//! runs up to N commands at once. For each job the thread writes the request into its vCPU's
//! mailbox and enters the guest; the guest's doorbell exit means the reply is ready. An idle
//! thread blocks on the queue and its vCPU is not running, so idle capsules use no CPU.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{select, Receiver, Sender};

use capsule_devices::Bus;
use capsule_snapshot::bitmap::PageBitmap;
use capsule_vmm::machine::probe as probe_machine;
use capsule_vmm::vcpu::VcpuState;
use capsule_vmm::{memory, Vcpu, VcpuEvent, Vm};
use vm_memory::{Bytes, GuestAddress};

use super::vcpu_set::VcpuSet;
use super::{
    BootContext, Frozen, GuestEvents, GuestState, Job, MachineState, MemoryImage, MemoryOrigin,
    Resources, Runtime,
};
use crate::config::RunOptions;
use crate::error::{Error, Result};
use crate::model::{CapsuleId, Command, CommandOutput};
use crate::pool::{BackingId, ShellShape};
use crate::sync::lock;

/// Stack for each vCPU thread: the run loop is shallow and only touched pages count.
const VCPU_THREAD_STACK: usize = 256 * 1024;

/// Rejects vCPU counts and memory sizes the probe cannot run with.
pub(crate) fn validate(config: &Resources, host_max_vcpus: usize) -> Result<()> {
    let max_vcpus = (probe_abi::MAX_VCPUS as usize).min(host_max_vcpus.max(1));
    if config.vcpus == 0 || config.vcpus as usize > max_vcpus {
        return Err(Error::InvalidConfig(format!(
            "the probe runs with 1 to {max_vcpus} vCPUs, not {}",
            config.vcpus
        )));
    }
    let max_mb = probe_abi::MAX_PD_PAGES * 1024;
    if config.memory_mb < probe_abi::MIN_MEMORY_MIB || config.memory_mb > max_mb {
        return Err(Error::InvalidConfig(format!(
            "the probe needs {} to {max_mb} MiB of memory, not {}",
            probe_abi::MIN_MEMORY_MIB,
            config.memory_mb
        )));
    }
    Ok(())
}

/// A running probe VM.
pub(crate) struct ProbeRuntime {
    id: CapsuleId,
    vm: Arc<Vm>,
    jobs: Sender<Job>,
    /// One control channel per vCPU thread (freeze requests).
    controls: Vec<Sender<Control>>,
    /// Dropped to wake threads waiting for work or a thaw, when the guest shuts down.
    stop: Mutex<Option<Sender<()>>>,
    vcpus: VcpuSet,
    origin: MemoryOrigin,
    /// Pages written since the origin, accumulated over freezes (reading KVM's dirty log
    /// clears it, and a template snapshot must not make a later pause miss pages).
    dirty: Mutex<PageBitmap>,
}

/// What to do with a vCPU when its thread starts.
enum Start {
    /// Run it until the guest says it is ready.
    Boot,
    /// It is restored at its loop head: just wait for work.
    Restored { seq: u32 },
}

impl ProbeRuntime {
    /// Builds the VM, starts one thread per vCPU and waits until every vCPU is ready.
    pub(crate) fn boot(ctx: BootContext) -> Result<Arc<Self>> {
        let mem_size = ctx.config.memory_mb << 20;
        let shell = ctx.shells.take(shell_shape(&ctx, None), None, None)?;
        probe_machine::boot(&shell.vm, &shell.vcpus, mem_size)?;
        let vcpus = shell
            .vcpus
            .into_iter()
            .map(|vcpu| (vcpu, Start::Boot))
            .collect();
        Self::start(ctx, shell.vm, vcpus, MemoryOrigin::Fresh)
    }

    /// Rebuilds a probe VM from `machine` over the memory in `image`.
    pub(crate) fn restore(
        ctx: BootContext,
        machine: &MachineState,
        image: &MemoryImage,
        origin: MemoryOrigin,
    ) -> Result<Arc<Self>> {
        let GuestState::Probe { seqs } = &machine.guest else {
            return Err(Error::SnapshotMismatch(
                "the snapshot is not of a probe guest".into(),
            ));
        };
        if machine.vcpus.len() != ctx.config.vcpus as usize || seqs.len() != machine.vcpus.len() {
            return Err(Error::SnapshotMismatch(format!(
                "the snapshot has {} vCPUs ({} mailbox states), the capsule {}",
                machine.vcpus.len(),
                seqs.len(),
                ctx.config.vcpus
            )));
        }
        // A template's capsules get shells whose memory already maps its base layer.
        let shell = ctx
            .shells
            .take(shell_shape(&ctx, image.base_id), image.base.as_ref(), None)?;
        let premapped = image.base_id.is_some() && image.base_id == shell.backing;
        // SAFETY: a shell's vCPUs have never run, and the shell is ours alone until it is
        // handed to the runtime below.
        unsafe { super::memory::restore(shell.vm.memory(), image, premapped) }?;
        probe_machine::restore(&shell.vm, &shell.vcpus, &machine.vm, &machine.vcpus)?;
        let vcpus = shell
            .vcpus
            .into_iter()
            .zip(seqs)
            .map(|(vcpu, seq)| (vcpu, Start::Restored { seq: *seq }))
            .collect();
        Self::start(ctx, shell.vm, vcpus, origin)
    }

    fn start(
        ctx: BootContext,
        vm: Vm,
        vcpus: Vec<(Vcpu, Start)>,
        origin: MemoryOrigin,
    ) -> Result<Arc<Self>> {
        let mem_size = ctx.config.memory_mb << 20;
        let msrs = ctx
            .hypervisor
            .msrs_to_save(probe_machine::vm_options().irqchip)?
            .to_vec();
        let vm = Arc::new(vm);
        let pio = probe_machine::pio_bus()?;
        let events = super::event_relay::for_vcpu_threads(&ctx)?;

        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
        let mut controls = Vec::with_capacity(vcpus.len());
        let mut workers = Vec::with_capacity(vcpus.len());
        for _ in &vcpus {
            let (control_tx, control_rx) = crossbeam_channel::unbounded();
            controls.push(control_tx);
            workers.push(control_rx);
        }
        let runtime = Arc::new(ProbeRuntime {
            id: ctx.id.clone(),
            vm: vm.clone(),
            jobs: jobs_tx,
            controls,
            stop: Mutex::new(Some(stop_tx)),
            vcpus: VcpuSet::new(),
            origin,
            dirty: Mutex::new(PageBitmap::for_len(mem_size)),
        });
        let mut booting = 0;
        for ((vcpu, start), control) in vcpus.into_iter().zip(workers) {
            let index = vcpu.index();
            let kicker = vcpu.kicker();
            let seq = match start {
                Start::Boot => {
                    booting += 1;
                    None
                }
                Start::Restored { seq } => Some(seq),
            };
            let worker = VcpuWorker {
                id: ctx.id.clone(),
                mem_size,
                vcpu,
                vm: vm.clone(),
                pio: pio.clone(),
                mmio: Bus::new(),
                jobs: jobs_rx.clone(),
                control,
                stop: stop_rx.clone(),
                stopping: runtime.vcpus.stop_flag(),
                events: events.clone(),
                msrs: msrs.clone(),
                seq: seq.unwrap_or(0),
            };
            let ready = ready_tx.clone();
            let spawned = runtime.vcpus.spawn(
                &format!("{}-vcpu{index}", ctx.id),
                VCPU_THREAD_STACK,
                kicker,
                ctx.seccomp,
                move || worker.serve(seq.is_none(), ready),
            );
            if let Err(e) = spawned {
                runtime.shutdown();
                return Err(e);
            }
        }
        drop(ready_tx);

        // A timeout too long to add to the clock means no deadline.
        let deadline = Instant::now().checked_add(ctx.boot_timeout);
        for _ in 0..booting {
            let report = match deadline {
                Some(deadline) => ready_rx.recv_deadline(deadline).ok(),
                None => ready_rx.recv().ok(),
            };
            let outcome = report
                .ok_or_else(|| Error::BootTimeout {
                    id: ctx.id.clone(),
                    after: ctx.boot_timeout,
                    console: String::new(),
                    state: Vec::new(),
                })
                .and_then(|report| {
                    report.map_err(|reason| Error::GuestCrashed {
                        id: ctx.id.clone(),
                        reason,
                    })
                });
            if let Err(e) = outcome {
                runtime.shutdown();
                return Err(e);
            }
        }
        Ok(runtime)
    }

    /// Takes the pages written since the last call: KVM's log of guest writes OR the VMM's
    /// own writes (mailbox requests), added to the running total.
    fn collect_dirty(&self) -> Result<PageBitmap> {
        let mut total = lock(&self.dirty);
        let pages = total.page_count();
        let flat = memory::flatten_dirty(self.vm.memory(), &self.vm.take_dirty_pages()?)?;
        let written = PageBitmap::from_kvm_words(&flat, pages)?;
        total.or_assign(&written)?;
        Ok(total.clone())
    }

    /// Why a vCPU thread could not be frozen: it ended, which only a crash does while the
    /// capsule's lifecycle lock is held.
    fn ended_error(&self) -> Error {
        Error::GuestCrashed {
            id: self.id.clone(),
            reason: "a vCPU thread ended while the capsule was being frozen".into(),
        }
    }
}

fn shell_shape(ctx: &BootContext, backing: Option<BackingId>) -> ShellShape {
    let options = probe_machine::vm_options();
    ShellShape {
        memory_mb: ctx.config.memory_mb,
        vcpus: ctx.config.vcpus,
        dirty_log: options.dirty_log,
        irqchip: options.irqchip,
        backing,
        linux: None,
        linux_layout: false,
    }
}

/// Requests to a vCPU thread other than commands.
enum Control {
    /// Stop between commands, report the vCPU's state, and wait until `thaw` closes.
    Freeze {
        reply: Sender<capsule_vmm::Result<(u32, VcpuState, u32)>>,
        thaw: Receiver<()>,
    },
    /// Run test code on this thread (see [`Runtime::run_on_vcpu_thread`]).
    #[cfg(feature = "testing")]
    Call(Box<dyn FnOnce() + Send>),
}

impl Runtime for ProbeRuntime {
    fn submit(&self, job: Job) -> std::result::Result<(), Job> {
        if self.vcpus.is_stopping() {
            return Err(job);
        }
        self.jobs.send(job).map_err(|e| e.into_inner())
    }

    fn max_command_len(&self) -> usize {
        probe_abi::REQUEST_MAX
    }

    fn check_run(&self, command: &Command, options: &RunOptions, pty: bool) -> Result<()> {
        unsupported(command, options, pty).map_or(Ok(()), |what| {
            Err(Error::Unsupported(format!(
                "the probe guest has {what}: it runs its own verbs only (see the crate docs)"
            )))
        })
    }

    fn freeze(&self) -> Result<Frozen> {
        let (thaw_tx, thaw_rx) = crossbeam_channel::bounded::<()>(0);
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        for control in &self.controls {
            let request = Control::Freeze {
                reply: reply_tx.clone(),
                thaw: thaw_rx.clone(),
            };
            if control.send(request).is_err() {
                return Err(self.ended_error());
            }
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
        states.sort_by_key(|(index, _, _)| *index);
        let dirty = self.collect_dirty()?;
        let machine = MachineState {
            vm: self.vm.save_state()?,
            guest: GuestState::Probe {
                seqs: states.iter().map(|(_, _, seq)| *seq).collect(),
            },
            vcpus: states.into_iter().map(|(_, state, _)| state).collect(),
        };
        Ok(Frozen {
            machine,
            vm: self.vm.clone(),
            dirty,
            origin: self.origin.for_snapshot(),
            _thaw: thaw_tx,
            _hold: None,
        })
    }

    #[cfg(feature = "testing")]
    fn run_on_vcpu_thread(&self, f: Box<dyn FnOnce() + Send>) -> Result<()> {
        let sent = self
            .controls
            .first()
            .is_some_and(|control| control.send(Control::Call(f)).is_ok());
        if sent {
            Ok(())
        } else {
            Err(self.ended_error())
        }
    }

    fn shutdown(&self) {
        self.vcpus.mark_stopping();
        lock(&self.stop).take();
        self.vcpus.stop();
    }
}

impl Drop for ProbeRuntime {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What a command asks for that the probe does not have, if anything.
fn unsupported(command: &Command, options: &RunOptions, pty: bool) -> Option<&'static str> {
    Some(if matches!(command, Command::Exec { .. }) {
        "no programs to exec (use the verb line form)"
    } else if !options.envs.is_empty() || options.clear_env {
        "no environment"
    } else if options.cwd.is_some() {
        "no working directory"
    } else if options.user.is_some() {
        "no users"
    } else if options.stdin.is_some() {
        "no stdin"
    } else if pty {
        "no terminals"
    } else {
        return None;
    })
}

/// How one command ended, from the vCPU's side.
enum Outcome {
    Replied(CommandOutput),
    /// It was not run: why.
    Refused(Error),
    Cancelled,
    Stopped,
    Crashed(String),
}

/// Everything one vCPU thread owns.
struct VcpuWorker {
    id: CapsuleId,
    vcpu: Vcpu,
    /// The guest's memory size, to restart the vCPU at its entry after its command is killed.
    mem_size: u64,
    vm: Arc<Vm>,
    pio: Bus,
    mmio: Bus,
    jobs: Receiver<Job>,
    control: Receiver<Control>,
    stop: Receiver<()>,
    stopping: Arc<AtomicBool>,
    events: Arc<dyn GuestEvents>,
    /// MSRs to save when frozen.
    msrs: Vec<u32>,
    seq: u32,
}

impl VcpuWorker {
    fn serve(mut self, boot: bool, ready: Sender<std::result::Result<u32, String>>) {
        if boot {
            let booted = self.run_until_ready();
            let failed = booted.is_err();
            let _ = ready.send(booted.map(|()| self.vcpu.index()));
            if failed {
                return;
            }
        }
        drop(ready);
        loop {
            // Control requests go first, so a freeze is not starved by a busy job queue.
            if let Ok(control) = self.control.try_recv() {
                if !self.handle_control(control) {
                    return;
                }
                continue;
            }
            let job = select! {
                recv(self.control) -> control => match control {
                    Ok(control) => {
                        if !self.handle_control(control) {
                            return;
                        }
                        continue;
                    }
                    Err(_) => return,
                },
                recv(self.jobs) -> job => match job {
                    Ok(job) => job,
                    Err(_) => return,
                },
                recv(self.stop) -> _ => return,
            };
            if !job.control.start(self.vcpu.kicker()) {
                continue; // the caller already gave up on it
            }
            match self.run_job(&job) {
                Outcome::Replied(output) => {
                    let _ = job.reply.send(Ok(output));
                }
                Outcome::Refused(e) => {
                    let _ = job.reply.send(Err(e));
                }
                Outcome::Cancelled => {
                    // Kill the command: restart the vCPU at its entry point with a fresh stack.
                    if let Err(reason) = probe_machine::restart(&self.vcpu, self.mem_size)
                        .map_err(|e| e.to_string())
                        .and_then(|()| self.run_until_ready())
                    {
                        self.crash(&job, reason);
                        return;
                    }
                }
                Outcome::Stopped => return,
                Outcome::Crashed(reason) => {
                    self.crash(&job, reason);
                    return;
                }
            }
        }
    }

    /// Handles a control request; `false` when the thread must end.
    fn handle_control(&mut self, control: Control) -> bool {
        match control {
            Control::Freeze { reply, thaw } => {
                let state = self
                    .vcpu
                    .complete_pending_exit()
                    .and_then(|()| self.vcpu.save_state(&self.msrs))
                    .map(|state| (self.vcpu.index(), state, self.seq));
                let _ = reply.send(state);
                select! {
                    recv(thaw) -> _ => true,
                    recv(self.stop) -> _ => false,
                }
            }
            #[cfg(feature = "testing")]
            Control::Call(f) => {
                f();
                true
            }
        }
    }

    fn crash(&self, job: &Job, reason: String) {
        tracing::warn!(capsule = %self.id, vcpu = self.vcpu.index(), %reason, "guest crashed");
        self.events.crashed(reason.clone());
        let _ = job.reply.send(Err(Error::GuestCrashed {
            id: self.id.clone(),
            reason,
        }));
    }

    fn run_until_ready(&mut self) -> std::result::Result<(), String> {
        loop {
            match self.vcpu.run(&self.pio, &self.mmio) {
                Ok(VcpuEvent::Yield(v)) if v == u64::from(probe_abi::DOORBELL_READY) => {
                    return Ok(())
                }
                Ok(VcpuEvent::Kicked) if !self.stopping.load(Ordering::SeqCst) => {}
                Ok(VcpuEvent::Kicked) => return Err("stopped while starting".into()),
                Ok(event) => return Err(describe(event)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn run_job(&mut self, job: &Job) -> Outcome {
        let Command::Shell(line) = &job.command else {
            return Outcome::Refused(Error::Unsupported(
                "the probe guest has no programs to exec".into(),
            ));
        };
        self.seq = self.seq.wrapping_add(1);
        let started = Instant::now();
        if let Err(reason) = self.write_request(line.as_bytes()) {
            return Outcome::Crashed(reason);
        }
        loop {
            match self.vcpu.run(&self.pio, &self.mmio) {
                Ok(VcpuEvent::Yield(v)) if v == u64::from(probe_abi::DOORBELL_REPLY) => {
                    return match self.read_reply() {
                        Ok(mut output) => {
                            output.duration = started.elapsed();
                            Outcome::Replied(output)
                        }
                        Err(reason) => Outcome::Crashed(reason),
                    };
                }
                Ok(VcpuEvent::Kicked) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        return Outcome::Stopped;
                    }
                    if job.control.is_cancelled() {
                        return Outcome::Cancelled;
                    }
                }
                Ok(event) => return Outcome::Crashed(describe(event)),
                Err(e) => return Outcome::Crashed(e.to_string()),
            }
        }
    }

    fn mailbox(&self) -> u64 {
        probe_abi::mailbox_addr(u64::from(self.vcpu.index()))
    }

    fn write_request(&self, command: &[u8]) -> std::result::Result<(), String> {
        let header = probe_abi::encode_request_header(self.seq, command.len())
            .ok_or_else(|| format!("request of {} bytes is too long", command.len()))?;
        let memory = self.vm.memory();
        let mailbox = self.mailbox();
        memory
            .write_slice(
                command,
                GuestAddress(mailbox + probe_abi::REQUEST_OFFSET as u64),
            )
            .and_then(|()| memory.write_slice(&header, GuestAddress(mailbox)))
            .map_err(|e| format!("writing the request: {e}"))
    }

    /// Reads and validates the reply; anything malformed means the guest misbehaved.
    fn read_reply(&self) -> std::result::Result<CommandOutput, String> {
        let memory = self.vm.memory();
        let mailbox = self.mailbox();
        let mut raw = [0u8; probe_abi::REPLY_HEADER_SIZE];
        memory
            .read_slice(
                &mut raw,
                GuestAddress(mailbox + probe_abi::REPLY_HEADER_OFFSET as u64),
            )
            .map_err(|e| format!("reading the reply: {e}"))?;
        let header = probe_abi::decode_reply_header(&raw)
            .map_err(|e| format!("malformed reply from the guest: {e}"))?;
        if header.seq != self.seq {
            return Err(format!(
                "reply to request {} while {} was running",
                header.seq, self.seq
            ));
        }
        let read_area = |offset: usize, len: u32| {
            let mut bytes = vec![0u8; len as usize];
            memory
                .read_slice(&mut bytes, GuestAddress(mailbox + offset as u64))
                .map(|()| bytes)
                .map_err(|e| format!("reading the reply: {e}"))
        };
        Ok(CommandOutput {
            stdout: read_area(probe_abi::STDOUT_OFFSET, header.stdout_len)?,
            stderr: read_area(probe_abi::STDERR_OFFSET, header.stderr_len)?,
            exit_code: Some(header.exit_code),
            signal: None,
            duration: std::time::Duration::ZERO,
            stdout_truncated: header.flags & probe_abi::FLAG_STDOUT_TRUNCATED != 0,
            stderr_truncated: header.flags & probe_abi::FLAG_STDERR_TRUNCATED != 0,
        })
    }
}

fn describe(event: VcpuEvent) -> String {
    match event {
        VcpuEvent::Shutdown => "the guest shut down (triple fault)".into(),
        VcpuEvent::Halted => "the guest halted".into(),
        VcpuEvent::Failed(why) => why,
        VcpuEvent::Yield(v) => format!("protocol violation: unexpected doorbell value {v:#x}"),
        VcpuEvent::Kicked => "interrupted".into(),
    }
}
