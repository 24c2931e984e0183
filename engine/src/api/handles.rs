//! Handles to running commands: [`CommandHandle`], [`PtyHandle`], and the
//! [`OutputStream`] of their output.

use std::sync::Arc;
use std::time::Duration;

use crate::command::{Deadline, Process};
use crate::error::Result;
use crate::model::{CommandOutput, Output, PtySize, Signal};

/// Keeps a process wanted: when the last handle (or output stream) goes, its output is
/// discarded and its stdin closed.
struct Holder(Arc<Process>);

impl Drop for Holder {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// A command running in a capsule, from [`crate::Commands::spawn`] or
/// [`crate::Commands::connect`]. Cheap to clone; every clone refers to the same command,
/// and all are `Send + Sync`.
///
/// Its output arrives in chunks as the command writes it. Each chunk goes to exactly one
/// place: to the callback of its stream if [`crate::RunOptions::on_stdout`] (or
/// `on_stderr`) was set (and is then also kept for [`CommandHandle::wait`]'s result);
/// otherwise it waits in the handle's buffer until [`CommandHandle::output`] takes it, or
/// until [`CommandHandle::wait`] gathers it into its result (up to the output limit). The
/// buffer holds at most one flow-control window (1 MiB, `capsule_agent_protocol::STREAM_WINDOW`):
/// when it is full the guest stops reading the command's output, so a command whose output
/// nobody takes blocks on its next write instead of filling the host's memory. Call `wait`,
/// read `output`, set callbacks, or drop every handle (then the output is discarded).
///
/// Dropping the last handle (and stream) leaves the command running, detached: its output is
/// discarded, its stdin closed, and it no longer keeps the capsule from being auto-paused;
/// [`crate::Commands::connect`] gives a new handle.
///
/// **Across a pause.** A Linux capsule's processes keep running across
/// [`crate::Capsule::pause`] and [`crate::Capsule::resume`], but a handle does not follow:
/// after a pause its calls fail with [`crate::Error::ProcessDetached`] (which says to
/// reconnect). Once the capsule runs again, [`crate::Commands::list`] shows the process
/// (also if it ended meanwhile and its exit was not reported yet) and
/// [`crate::Commands::connect`]`(pid)` returns a handle that gets its remaining output and
/// its exit. Output the guest sent to the old handle just before the pause may be lost.
#[derive(Clone)]
pub struct CommandHandle {
    holder: Arc<Holder>,
}

impl std::fmt::Debug for CommandHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandHandle")
            .field("pid", &self.pid())
            .finish()
    }
}

impl CommandHandle {
    pub(crate) fn new(process: Arc<Process>) -> CommandHandle {
        CommandHandle {
            holder: Arc::new(Holder(process)),
        }
    }

    fn process(&self) -> &Process {
        &self.holder.0
    }

    /// The command's pid in the guest, which is also its process group id (0 for the probe,
    /// which has no processes).
    pub fn pid(&self) -> u32 {
        self.process().pid()
    }

    /// Writes `data` to the command's stdin (a pipe the command reads; for a terminal, what
    /// is typed). Returns once it is sent; the guest queues what the command has not read yet.
    ///
    /// Errors: [`crate::Error::InvalidArgument`] once stdin is closed or the command ended,
    /// [`crate::Error::ProcessDetached`] after a pause, [`crate::Error::Unsupported`] for the
    /// probe.
    pub fn write_stdin(&self, data: &[u8]) -> Result<()> {
        self.process().write_stdin(data)
    }

    /// Closes the command's stdin: it reads end of file (on a terminal: Ctrl-D is typed).
    /// Closing it again does nothing. [`crate::Error::Unsupported`] for the probe.
    pub fn close_stdin(&self) -> Result<()> {
        self.process().close_stdin()
    }

    /// Sends `signal` to the command's whole process group. Does nothing once the command
    /// ended. The probe only knows [`Signal::KILL`] ([`crate::Error::Unsupported`] for
    /// others).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.process().signal(signal)
    }

    /// Kills the command: `SIGKILL` to its whole process group (every process it started
    /// that did not leave the group). Returns once sent; [`CommandHandle::wait`] then
    /// reports [`CommandOutput::signal`] `Some(Signal::KILL)`.
    pub fn kill(&self) -> Result<()> {
        self.process().signal(Signal::KILL)
    }

    /// Waits until the command ends and returns its result: its exit code or signal, and
    /// the output no [`OutputStream`] took (up to the output limit).
    ///
    /// Errors: [`crate::Error::Timeout`] ([`crate::TimeoutKind::Command`]) if its own timeout
    /// killed it, [`crate::Error::ProcessDetached`] after a pause (or if another handle
    /// connected to it), [`crate::Error::GuestCrashed`] or [`crate::Error::InvalidState`]
    /// if the capsule crashed or was destroyed.
    pub fn wait(&self) -> Result<CommandOutput> {
        self.process().wait(None)
    }

    /// As [`CommandHandle::wait`], for at most `timeout`: past it,
    /// [`crate::Error::Timeout`] ([`crate::TimeoutKind::Wait`]) and the command runs on.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<CommandOutput> {
        self.process().wait(Deadline::after(timeout))
    }

    /// The command's output as it arrives: an iterator of chunks that blocks for the next
    /// one and ends once the command ended and every chunk was taken (see the type's docs
    /// for where chunks go). Streams of one command share its chunks: each goes to one.
    pub fn output(&self) -> OutputStream {
        OutputStream {
            holder: self.holder.clone(),
        }
    }
}

/// The output of a command as it arrives: see [`CommandHandle::output`]. Blocks in
/// [`Iterator::next`] for the next chunk; `None` once the command ended and every chunk was
/// taken (also when the handle was detached: [`CommandHandle::wait`] then says why).
pub struct OutputStream {
    holder: Arc<Holder>,
}

impl std::fmt::Debug for OutputStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputStream")
            .field("pid", &self.holder.0.pid())
            .finish()
    }
}

impl OutputStream {
    /// The next chunk, waiting at most `timeout`: `Ok(None)` once the command ended and every
    /// chunk was taken, [`crate::Error::Timeout`] ([`crate::TimeoutKind::Wait`]) if nothing
    /// came in time.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Output>> {
        self.holder.0.next_chunk(Deadline::after(timeout))
    }
}

impl Iterator for OutputStream {
    type Item = Output;

    fn next(&mut self) -> Option<Output> {
        self.holder.0.next_chunk(None).ok().flatten()
    }
}

/// A command on a pseudo-terminal in a capsule, from [`crate::Ptys::create`]: a shell (or
/// the given command) that believes a person types into it. What it prints (its stdout and
/// stderr, with the terminal's line endings and escape codes) comes as [`Output::Stdout`]
/// chunks. Cheap to clone, `Send + Sync`; everything said of [`CommandHandle`] (buffering,
/// dropping, pauses) holds.
#[derive(Clone, Debug)]
pub struct PtyHandle {
    command: CommandHandle,
}

impl PtyHandle {
    pub(crate) fn new(process: Arc<Process>) -> PtyHandle {
        PtyHandle {
            command: CommandHandle::new(process),
        }
    }

    /// The pid of the terminal's session leader (the shell) in the guest.
    pub fn pid(&self) -> u32 {
        self.command.pid()
    }

    /// Types `data` into the terminal (`b"ls\n"`, `b"\x03"` for Ctrl-C...).
    pub fn write(&self, data: &[u8]) -> Result<()> {
        self.command.write_stdin(data)
    }

    /// Changes the terminal's size; its foreground programs get `SIGWINCH`.
    pub fn resize(&self, size: PtySize) -> Result<()> {
        self.command.process().resize(size)
    }

    /// What the terminal shows, as it comes (see [`CommandHandle::output`]).
    pub fn output(&self) -> OutputStream {
        self.command.output()
    }

    /// Sends `signal` to the session's process group.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.command.signal(signal)
    }

    /// `SIGKILL` to the session's process group.
    pub fn kill(&self) -> Result<()> {
        self.command.kill()
    }

    /// Waits until the shell (or command) ends; see [`CommandHandle::wait`].
    pub fn wait(&self) -> Result<CommandOutput> {
        self.command.wait()
    }

    /// As [`PtyHandle::wait`], for at most `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<CommandOutput> {
        self.command.wait_timeout(timeout)
    }

    /// The same session as a [`CommandHandle`] (writing to it is typing).
    pub fn as_command(&self) -> &CommandHandle {
        &self.command
    }
}
