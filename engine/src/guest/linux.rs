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
use std::time::Duration;

use capsule_agent_protocol::{ExitStatus, RunRequest};
use capsule_devices::serial::SerialLog;
use capsule_devices::Bus;
use capsule_vmm::machine::LinuxMachine;
use capsule_vmm::{HostInfo, Vcpu, VcpuEvent, Vm};

use super::agent_link::{AgentLink, LinkError};
use super::vcpu_set::VcpuSet;
use super::{BootContext, Frozen, GuestEvents, Job, Resources, Runtime};
use crate::error::{Error, Result, TimeoutKind};
use crate::model::{CapsuleId, CommandOutput, GuestKind};
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

/// A running Linux guest.
pub(crate) struct LinuxRuntime {
    id: CapsuleId,
    link: Arc<AgentLink>,
    console: SerialLog,
    vcpus: VcpuSet,
    /// The devices and their thread, released (with the VM) at shutdown.
    machine: Mutex<Option<LinuxMachine>>,
    boot_timeout: Duration,
}

impl LinuxRuntime {
    /// Boots the kernel and waits for the agent's hello.
    pub(crate) fn boot(ctx: BootContext) -> Result<Arc<Self>> {
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
        let mut machine =
            LinuxMachine::assemble(&ctx.id.to_string(), vm, vcpus, &config, loaded, ctx.seccomp)?;

        let vm = machine.vm().clone();
        let console_log = machine.console_log().clone();
        let host_end = machine.take_agent_channel().ok_or_else(|| {
            Error::os(
                "taking the agent channel",
                std::io::Error::other("a new machine's channel was taken already"),
            )
        })?;
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
        for vcpu in machine.take_vcpus() {
            let kicker = vcpu.kicker();
            let worker = VcpuLoop {
                id: ctx.id.clone(),
                vcpu,
                _vm: vm.clone(),
                pio: machine.pio().clone(),
                mmio: machine.mmio().clone(),
                stopping: vcpu_set.stop_flag(),
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
        let reader = host_end
            .try_clone()
            .map_err(|e| Error::os("cloning the agent channel", e))?;
        let link = match AgentLink::connect(Box::new(reader), Box::new(host_end), ctx.boot_timeout)
        {
            Ok(link) => link,
            Err(e) => {
                let tail = console_tail(&console_log);
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
        tracing::debug!(capsule = %ctx.id, agent = %link.hello().agent_version, "agent ready");
        Ok(Arc::new(LinuxRuntime {
            id: ctx.id.clone(),
            link,
            console: console_log,
            vcpus: vcpu_set,
            machine: Mutex::new(Some(machine)),
            boot_timeout: ctx.boot_timeout,
        }))
    }
}

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
    _vm: Arc<Vm>,
    pio: Bus,
    mmio: Bus,
    stopping: Arc<AtomicBool>,
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
                    if self.stopping.load(Ordering::SeqCst) {
                        return self.position();
                    }
                }
                Ok(VcpuEvent::Shutdown) => {
                    let log = String::from_utf8_lossy(&self.console.console_log()).into_owned();
                    if log.contains("Kernel panic") {
                        self.events.crashed(format!(
                            "the guest kernel panicked; console:\n{}",
                            console_tail(&self.console)
                        ));
                    } else {
                        tracing::info!(capsule = %self.id, "guest powered off or rebooted");
                        self.events.exited();
                    }
                    return format!("vCPU{index}: ended by a shutdown exit");
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
}

impl VcpuLoop {
    /// The vCPU's instruction pointer, stack pointer and multiprocessing state, in words.
    fn position(&self) -> String {
        match self.vcpu.position() {
            Ok(position) => position.to_string(),
            Err(e) => format!("vCPU{}: position unreadable: {e}", self.vcpu.index()),
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

    fn freeze(&self) -> Result<Frozen> {
        Err(Error::Unsupported(
            "pausing and snapshotting Linux capsules is not supported yet".into(),
        ))
    }

    fn console(&self) -> Option<SerialLog> {
        Some(self.console.clone())
    }

    fn shutdown(&self) {
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

/// Runs one command through the agent and answers the job.
fn run_job(link: &AgentLink, id: &CapsuleId, job: Job, grace: Duration) {
    let mut request = RunRequest::shell(String::from_utf8_lossy(&job.command).into_owned());
    request.env = job.options.envs.clone();
    request.cwd = job.options.cwd.clone();
    request.timeout_ms = job
        .options
        .timeout
        .map_or(0, |t| t.as_millis().max(1) as u64);
    // The agent enforces the timeout (killing the process group); the host waits a little
    // longer for its answer.
    let host_wait = job.options.timeout.map(|t| t + grace);
    let result = match link.run(request, host_wait) {
        Ok(exit) if exit.timed_out => Err(Error::Timeout {
            kind: TimeoutKind::Command,
            after: job.options.timeout.unwrap_or_default(),
        }),
        Ok(exit) => Ok(CommandOutput {
            stdout: String::from_utf8_lossy(&exit.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&exit.stderr).into_owned(),
            exit_code: match exit.status {
                ExitStatus::Code(code) => code,
                ExitStatus::Signal(sig) => 128 + sig,
            },
            duration: Duration::from_micros(exit.duration_us),
            stdout_truncated: exit.stdout_truncated,
            stderr_truncated: exit.stderr_truncated,
        }),
        Err(LinkError::Timeout) => Err(Error::Timeout {
            kind: TimeoutKind::Command,
            after: job.options.timeout.unwrap_or_default(),
        }),
        Err(LinkError::Closed(_)) => return, // the guest went away: the caller sees the state
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
    use crate::config::RunOptions;
    use crate::guest::{agent_link, JobControl};

    /// Runs `command` with `options` through `run_job` against the real agent.
    fn run(command: &str, options: RunOptions) -> Result<CommandOutput> {
        let link = agent_link::real_agent();
        let (reply, result) = crossbeam_channel::bounded(1);
        let job = Job {
            command: command.as_bytes().to_vec(),
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
        assert_eq!((out.stdout.as_str(), out.exit_code), ("hi\n", 3));
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
