//! [`Capsule`]: a handle to one capsule, and [`Commands`], running commands in it.

use std::sync::Arc;
use std::time::Duration;

use super::handles::{CommandHandle, PtyHandle};
use crate::capsule_core::CapsuleCore;
use crate::config::RunOptions;
use crate::engine_core::{EngineCore, Owner};
use crate::error::{Error, Result};
use crate::model::{
    CapsuleId, CapsuleInfo, Command, CommandOutput, ProcessInfo, PtySize, Status, TemplateInfo,
};
use crate::{command, lifecycle};

use super::files::Files;

/// A handle to a capsule. Cheap to clone; every clone refers to the same capsule, and all are
/// `Send + Sync`. Dropping handles does not destroy the capsule: call [`Capsule::destroy`].
#[derive(Clone)]
pub struct Capsule {
    core: Arc<CapsuleCore>,
    // Before `engine`: dropped first (see `Owner`).
    owner: Arc<Owner>,
    engine: Arc<EngineCore>,
}

impl std::fmt::Debug for Capsule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capsule")
            .field("id", self.core.id())
            .field("status", &self.core.status())
            .finish()
    }
}

impl Capsule {
    pub(crate) fn new(core: Arc<CapsuleCore>, owner: Arc<Owner>, engine: Arc<EngineCore>) -> Self {
        Capsule {
            core,
            owner,
            engine,
        }
    }

    /// The capsule's id.
    pub fn id(&self) -> &CapsuleId {
        self.core.id()
    }

    /// Blocks until the capsule is running. Wakes as soon as the status changes and
    /// re-checks at least every `interval`.
    ///
    /// Errors: [`Error::Timeout`] ([`crate::TimeoutKind::WaitReady`]) if it is not running
    /// within `timeout`; at once [`Error::GuestCrashed`] (with the reason) if it is or
    /// becomes in error, [`Error::InvalidState`] if stopped or paused.
    pub fn wait_ready(&self, timeout: Duration, interval: Duration) -> Result<()> {
        self.core.wait_ready(timeout, interval)
    }

    /// Whether the capsule is running now.
    pub fn is_running(&self) -> bool {
        self.core.status() == Status::Running
    }

    /// Current status.
    pub fn status(&self) -> Status {
        self.core.status()
    }

    /// Everything known about the capsule now.
    pub fn info(&self) -> CapsuleInfo {
        self.core.info()
    }

    /// The guest's serial console output so far, newest 64 KiB at most (Linux capsules; the
    /// probe has no console and returns an empty string). Still readable after the capsule
    /// stopped or crashed.
    pub fn console_log(&self) -> String {
        self.core.console_log()
    }

    /// Runs commands in the capsule, and reaches the processes its guest runs.
    pub fn commands(&self) -> Commands<'_> {
        Commands { capsule: self }
    }

    /// Runs shells (or other commands) on pseudo-terminals in the capsule (Linux capsules).
    pub fn pty(&self) -> Ptys<'_> {
        Ptys { capsule: self }
    }

    /// Reads, writes and manages files in the capsule (Linux capsules; in the probe every
    /// call is [`Error::Unsupported`]). See [`Files`].
    pub fn files(&self) -> Files<'_> {
        Files::new(&self.core)
    }

    /// Stops the capsule and releases everything it holds, its files on disk included.
    /// Irreversible: afterwards the id is unknown to the engine and this handle reports
    /// [`Status::Stopped`]. Works in every status.
    pub fn destroy(&self) -> Result<()> {
        lifecycle::destroy(&self.engine, self.core.id()).or_else(|e| match e {
            // Another handle destroyed it first: the outcome is the same.
            Error::NotFound(_) => Ok(()),
            e => Err(e),
        })
    }

    /// Pauses the capsule: freezes it, writes its whole state (memory, vCPUs, devices) to
    /// the engine's data directory, and releases its VM (CPU, memory, threads). A capsule
    /// that came from a snapshot or template writes only the memory pages changed since.
    /// Pausing a paused capsule does nothing.
    ///
    /// A probe capsule stops its vCPUs between commands (waiting for running ones, which
    /// take microseconds). A Linux capsule is frozen wherever it is, processes and commands
    /// included (a Linux command may run for hours): a [`Commands::run`] blocked on a
    /// command at that moment returns at once with [`Error::InvalidState`] (status
    /// [`Status::Paused`]); the command's process is frozen with the rest and goes on after
    /// [`Capsule::resume`], but its output no longer reaches that caller. Handles of spawned
    /// commands ([`CommandHandle`]) likewise report [`Error::ProcessDetached`]. Such
    /// processes are listed by [`Commands::list`]; their output waits in the guest (one that
    /// writes more than a pipe holds blocks) and their exit is kept, until
    /// [`Commands::connect`] picks them up again after the resume. (Before freezing, the
    /// engine has the guest's agent hold every process's output and exit; the resumed agent
    /// detaches them before it reports anything, so a process that ends in the instant the
    /// capsule resumes is not lost to the handle from before. An agent that does not
    /// answer within 5 s is frozen anyway.) The guest's
    /// monotonic clocks do not count paused time (so neither does a command's timeout, which
    /// the guest's agent enforces), and its wall clock is set to the host's at every resume.
    ///
    /// Errors: [`Error::InvalidState`] if stopped, [`Error::GuestCrashed`] if in error;
    /// [`Error::Snapshot`] or [`Error::Io`] if the state cannot be written, in which case
    /// the capsule keeps running and any earlier snapshot is intact.
    pub fn pause(&self) -> Result<()> {
        lifecycle::pause(&self.engine, &self.core)
    }

    /// Resumes a paused capsule exactly where it was: memory is mapped back copy-on-write
    /// and every vCPU, device and guest state restored; a Linux guest's processes, open
    /// files and agent run on (no reboot, no second handshake), and its agent is told the
    /// host's wall clock and fresh entropy before the capsule is running. Resuming a
    /// running capsule does nothing.
    ///
    /// Errors: [`Error::InvalidState`] if stopped, [`Error::GuestCrashed`] if in error;
    /// [`Error::Snapshot`] if the snapshot is missing, corrupt or truncated and
    /// [`Error::SnapshotMismatch`] if it describes another machine (the capsule then stays
    /// paused).
    pub fn resume(&self) -> Result<()> {
        lifecycle::resume(&self.engine, &self.core)
    }

    /// Counts as activity: resets the inactivity timer (so does every command, for as long as
    /// it runs). Errors with [`Error::InvalidState`] unless the capsule is running.
    pub fn ping(&self) -> Result<()> {
        self.core.ping()
    }

    /// `n` new running capsules in this capsule's exact state (running or paused), which
    /// is not changed. They share its memory copy-on-write through an anonymous template,
    /// removed with the last capsule that maps it; each then diverges on its own. All or
    /// nothing: if one cannot start, none is left. `n == 0` returns no capsule.
    ///
    /// Clones never share randomness: before a Linux fork (or a capsule from a template) is
    /// running, its kernel's CRNG is reseeded with fresh host entropy (`RNDADDENTROPY` and
    /// `RNDRESEEDCRNG` through the agent), and its commands see its own id in `CAPSULE_ID`.
    ///
    /// Errors: [`Error::InvalidState`] unless running or paused, [`Error::GuestCrashed`] if
    /// in error, [`Error::ResourceExhausted`] past the engine's limits,
    /// [`Error::Snapshot`]/[`Error::Io`] if the state cannot be written or read.
    pub fn fork(&self, n: usize) -> Result<Vec<Capsule>> {
        Ok(lifecycle::fork(&self.engine, &self.core, n)?
            .into_iter()
            .map(|core| Capsule::new(core, self.owner.clone(), self.engine.clone()))
            .collect())
    }

    /// Creates a template named `name` from the capsule's current state; the capsule keeps
    /// running. New capsules start from it with `CapsuleConfig::new(name)`, sharing its
    /// memory copy-on-write. Returns the template as [`crate::Engine::templates`] lists it.
    ///
    /// Errors: [`Error::InvalidArgument`] for a bad or taken name, [`Error::InvalidState`]
    /// unless running, [`Error::Snapshot`]/[`Error::Io`] if it cannot be written.
    pub fn snapshot(&self, name: &str) -> Result<TemplateInfo> {
        lifecycle::snapshot(&self.engine, &self.core, name)
    }
}

/// Runs commands in one capsule; see [`Capsule::commands`].
///
/// A command is a shell script (`&str`, `String`, [`Command::shell`]) or, in a Linux
/// capsule, a program with arguments run without a shell ([`Command::exec`]). Run it to its
/// end ([`Commands::run`], [`Commands::run_with`]) or start it and keep a handle
/// ([`Commands::spawn`]); find the processes the guest's agent runs ([`Commands::list`]),
/// take one over ([`Commands::connect`]) or kill it ([`Commands::kill`]).
#[derive(Debug, Clone, Copy)]
pub struct Commands<'a> {
    capsule: &'a Capsule,
}

impl Commands<'_> {
    /// Runs `command` with the default [`RunOptions`] (30 s timeout).
    ///
    /// For the probe template the commands are `echo TEXT`, `exit N`, `count`, `touch N`,
    /// `sum`, `spin N` and `crash`; see the crate docs.
    pub fn run(&self, command: impl Into<Command>) -> Result<CommandOutput> {
        self.run_with(command, RunOptions::default())
    }

    /// Runs `command` with `options` and returns its result. A command that outlives its
    /// timeout (default 30 s) is killed and [`Error::Timeout`]
    /// ([`crate::TimeoutKind::Command`]) returned; the capsule stays usable. If the guest
    /// crashes meanwhile the result is [`Error::GuestCrashed`]. Output callbacks
    /// ([`RunOptions::on_stdout`]) see the output as it comes. Options the guest cannot honour
    /// (the probe has no environment, directory, user or stdin) fail with
    /// [`Error::Unsupported`]; a user the guest does not know is [`Error::InvalidArgument`].
    pub fn run_with(
        &self,
        command: impl Into<Command>,
        options: RunOptions,
    ) -> Result<CommandOutput> {
        command::run(&self.capsule.core, command.into(), &options)
    }

    /// Starts `command` with `options` and returns once it started, with a handle to it: its
    /// pid, its stdin, signals, its output as it comes, and its end ([`CommandHandle`]).
    ///
    /// A spawned command has a stdin pipe (write with [`CommandHandle::write_stdin`], or give
    /// [`RunOptions::stdin`] bytes, which are written and then the pipe closed), no timeout
    /// unless [`RunOptions::timeout`] sets one, and counts as activity of the capsule (no
    /// auto-pause) until it ends or its last handle is dropped. In the probe it runs on a
    /// vCPU like [`Commands::run`] and its output arrives at its end; its pid is 0 and only
    /// [`CommandHandle::kill`] controls it.
    pub fn spawn(&self, command: impl Into<Command>, options: RunOptions) -> Result<CommandHandle> {
        command::spawn(&self.capsule.core, command.into(), &options, None).map(CommandHandle::new)
    }

    /// The processes the guest's agent started (by [`Commands::run`], [`Commands::spawn`],
    /// [`Ptys::create`], from any handle or engine) that it still tracks: those running, and
    /// those that ended while no handle received their exit (after a pause, say), until a
    /// [`Commands::connect`] takes it (the agent keeps the last 32 of those). Ordered by pid.
    /// [`Error::Unsupported`] for the probe.
    pub fn list(&self) -> Result<Vec<ProcessInfo>> {
        command::list(&self.capsule.core)
    }

    /// A new handle to process `pid` (one of [`Commands::list`]): it receives the process's
    /// output from now on and its exit; its stdin and signals act on the process. Output
    /// the process wrote while no handle received it waits in the guest (the process blocks
    /// once its pipe is full), so nothing is lost between a pause and this call. Any other
    /// handle to the process is detached ([`Error::ProcessDetached`]). The process's own
    /// timeout, if it had one, still applies.
    ///
    /// Errors: [`Error::ProcessNotFound`] for a pid the agent does not track,
    /// [`Error::Unsupported`] for the probe.
    pub fn connect(&self, pid: u32) -> Result<CommandHandle> {
        command::connect(&self.capsule.core, pid, false).map(CommandHandle::new)
    }

    /// Kills process `pid` (one of [`Commands::list`]): `SIGKILL` to its whole process group.
    /// A handle to it reports the kill; without one, this waits until the process ended.
    ///
    /// Errors: [`Error::ProcessNotFound`], [`Error::Unsupported`] for the probe.
    pub fn kill(&self, pid: u32) -> Result<()> {
        command::kill(&self.capsule.core, pid)
    }
}

/// Runs commands on pseudo-terminals in one capsule; see [`Capsule::pty`]. Linux capsules
/// only ([`Error::Unsupported`] for the probe).
#[derive(Debug, Clone, Copy)]
pub struct Ptys<'a> {
    capsule: &'a Capsule,
}

/// The shell [`Ptys::create`] runs: an interactive `/bin/sh`.
const PTY_SHELL: &str = "/bin/sh";

impl Ptys<'_> {
    /// Starts an interactive shell (`/bin/sh -i`) on a new terminal of `size`, with
    /// `options` (environment, directory, user, timeout: none unless set; `TERM` is
    /// `xterm-256color` unless set), and returns once it started.
    pub fn create(&self, size: PtySize, options: RunOptions) -> Result<PtyHandle> {
        self.create_with(Command::exec(PTY_SHELL, ["-i"]), size, options)
    }

    /// Runs `command` on a new terminal of `size` (a full-screen program, a REPL...).
    pub fn create_with(
        &self,
        command: impl Into<Command>,
        size: PtySize,
        options: RunOptions,
    ) -> Result<PtyHandle> {
        command::spawn(&self.capsule.core, command.into(), &options, Some(size)).map(PtyHandle::new)
    }

    /// A new handle to the terminal session led by process `pid` (after a pause, say); see
    /// [`Commands::connect`].
    pub fn connect(&self, pid: u32) -> Result<PtyHandle> {
        command::connect(&self.capsule.core, pid, true).map(PtyHandle::new)
    }
}

/// Hooks for the engine's own tests and benches (the `testing` feature); not part of the
/// stable API.
#[cfg(feature = "testing")]
impl Capsule {
    /// Measures a Linux capsule's agent channel itself (its virtio-console): `len` raw bytes
    /// through it with no protocol work (no frames encoded or decoded, no process, no flow
    /// control), from the guest's agent to the host (`to_guest` false: the agent writes zeros
    /// to its channel 64 KiB at a time, the engine's reader drops them) or from the host to
    /// the agent (`to_guest` true: the agent reads and drops them). Returns the time from the
    /// request until the last byte was read on the host, or the agent's answer that it read
    /// the last. The ceiling that streamed output and file transfers, which go the same way,
    /// can reach. See "Channel tests" in the `capsule-agent-protocol` docs. Other requests
    /// wait for the channel meanwhile; do not pause the capsule during it.
    ///
    /// Errors: [`Error::Unsupported`] for a probe, or an image whose agent predates channel
    /// tests; [`Error::Agent`] when no answer came within `timeout`.
    pub fn channel_test(&self, len: u64, to_guest: bool, timeout: Duration) -> Result<Duration> {
        use crate::guest::agent_link::LinkError;
        const OPERATION: &str = "test the agent's channel";
        let (runtime, _activity) = self.core.begin_io(OPERATION)?;
        let Some(link) = runtime.agent() else {
            return Err(Error::Unsupported(format!(
                "cannot {OPERATION}: the {} guest has no agent",
                self.core.record().kind
            )));
        };
        drop(runtime);
        link.channel_test(len, to_guest, timeout)
            .map_err(|e| match e {
                LinkError::Closed(_) => self.core.interrupted_io(OPERATION),
                LinkError::Refused(e)
                    if e.code == capsule_agent_protocol::ErrorCode::UNKNOWN_KIND =>
                {
                    Error::Unsupported(format!(
                        "the capsule's agent predates channel tests (rebuild the image: \
                         `cargo xtask build-minimal`): {}",
                        e.message
                    ))
                }
                e => Error::Agent {
                    id: self.core.id().clone(),
                    reason: e.to_string(),
                },
            })
    }
}
