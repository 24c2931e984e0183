//! One spawned (or connected) command as the host sees it: the output received and not yet
//! taken, what `wait` keeps of it, how it ended, and the flow control that bounds the host's
//! side (see the agent protocol's docs: the host grows the agent's window only as output
//! leaves this buffer, so a consumer that stops reading stops the guest process, never the
//! link's reader thread, and this buffer never holds more than one window).
//!
//! Whoever feeds it (a pump thread per command: [`super::agent::pump`] or
//! [`super::probe::pump`]) calls [`Process::deliver`] and then [`Process::end`]; the handles
//! take chunks ([`Process::next_chunk`]) and wait ([`Process::wait`]).

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use capsule_agent_protocol::{Message, STREAM_WINDOW};

use crate::capsule_core::{CapsuleCore, OwnedActivity};
use crate::config::{OutputCallback, RunOptions};
use crate::error::{Error, Result, TimeoutKind};
use crate::guest::agent_link::{AgentLink, LinkError};
use crate::guest::JobControl;
use crate::model::{CommandOutput, Output, PtySize, Signal, Status};
use crate::sync::{lock, wait, wait_timeout};

/// Output taken from the buffer is given back to the agent's window in batches of this
/// many bytes (a quarter window: the window never stays shut while the host has taken
/// everything, and a credit costs one small frame per 256 KiB).
pub(crate) const CREDIT_BATCH: u64 = STREAM_WINDOW as u64 / 4;

/// Until when a wait may last, and how long that is (for its error).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) after: Duration,
}

impl Deadline {
    /// `after` from now; `None` (no deadline) when that is beyond what the clock can say.
    pub(crate) fn after(after: Duration) -> Option<Deadline> {
        Some(Deadline {
            at: Instant::now().checked_add(after)?,
            after,
        })
    }
}

/// How a command's guest side is reached.
pub(crate) enum Backend {
    /// Request `id` of a Linux guest's agent link.
    Agent { link: Arc<AgentLink>, id: u32 },
    /// A job of the probe guest (output at the end; only a kill).
    Probe { control: Arc<JobControl> },
}

/// Why a command's handle ended without an exit.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The command ran past its timeout and was killed.
    Timeout(Duration),
    /// The link to the guest closed: paused, stopped or crashed (the capsule's status says).
    LinkLost,
    /// Another request took the process's output.
    Detached,
    /// The agent ended the request with this error.
    Agent(capsule_agent_protocol::ErrorInfo),
    /// The guest (the probe) failed the command: the error's text.
    Guest(String),
}

/// How a command ended, as its handles report it.
#[derive(Debug, Clone)]
pub(crate) enum End {
    /// It exited or was killed by a signal: the result without its output (kept apart).
    Exited(CommandOutput),
    Failed(Failure),
}

/// What `wait` keeps of the output: up to the limit of each stream.
#[derive(Default)]
struct Kept {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_truncated: bool,
    stderr_truncated: bool,
}

impl Kept {
    /// Keeps what fits of `chunk`.
    fn keep(&mut self, chunk: &Output, limit: usize) {
        let (buf, truncated) = match chunk {
            Output::Stdout(_) => (&mut self.stdout, &mut self.stdout_truncated),
            Output::Stderr(_) => (&mut self.stderr, &mut self.stderr_truncated),
        };
        let bytes = chunk.bytes();
        let room = limit.saturating_sub(buf.len());
        if bytes.len() > room {
            *truncated = true;
        }
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

#[derive(Default)]
struct State {
    /// Chunks received and not taken yet, oldest first.
    queue: VecDeque<Output>,
    /// Bytes taken out of the buffer and not yet given back as window.
    uncredited: u64,
    kept: Kept,
    end: Option<End>,
    /// No handle is left: output is discarded as it comes.
    abandoned: bool,
    stdin_closed: bool,
    /// A kill was asked for (the probe reports a killed job as killed).
    killed: bool,
    /// The command counts as activity of its capsule until it ends or is abandoned.
    activity: Option<OwnedActivity>,
}

/// One command's host side; shared by its handles and its pump.
pub(crate) struct Process {
    capsule: Arc<CapsuleCore>,
    pid: u32,
    pty: bool,
    backend: Backend,
    timeout: Option<Duration>,
    output_limit: usize,
    on_stdout: Option<OutputCallback>,
    on_stderr: Option<OutputCallback>,
    state: Mutex<State>,
    changed: Condvar,
}

impl Process {
    /// A command's host side. `timeout` is the command's own (for its error), `activity`
    /// what keeps the capsule busy while it runs.
    pub(crate) fn new(
        capsule: Arc<CapsuleCore>,
        pid: u32,
        pty: bool,
        backend: Backend,
        options: &RunOptions,
        timeout: Option<Duration>,
        activity: Option<OwnedActivity>,
    ) -> Arc<Process> {
        Arc::new(Process {
            capsule,
            pid,
            pty,
            backend,
            timeout,
            output_limit: options.output_limit,
            on_stdout: options.on_stdout.clone(),
            on_stderr: options.on_stderr.clone(),
            state: Mutex::new(State {
                stdin_closed: options.stdin.is_some(),
                activity,
                ..State::default()
            }),
            changed: Condvar::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Bytes received and not taken yet (tests check the bound).
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.state().queue.iter().map(|c| c.bytes().len()).sum()
    }

    /// The process's pid in the guest (0 for the probe, which has no processes).
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// Gives `bytes` taken out of the buffer back to the agent's window, in batches.
    fn give_back(&self, bytes: usize) {
        let Backend::Agent { link, id } = &self.backend else {
            return;
        };
        let credit = {
            let mut state = self.state();
            if state.end.is_some() {
                return;
            }
            state.uncredited += bytes as u64;
            if state.uncredited < CREDIT_BATCH {
                return;
            }
            std::mem::take(&mut state.uncredited)
        };
        // A closed link shows up as the end of the request.
        let bytes = u32::try_from(credit).unwrap_or(u32::MAX);
        let _ = link.send(&Message::Credit { bytes }, *id);
    }

    /// A chunk of output arrived (on the pump's thread): to its callback (then kept for
    /// `wait`), or queued for the handles; discarded once no handle is left.
    pub(crate) fn deliver(&self, chunk: Output) {
        let len = chunk.bytes().len();
        let callback = match chunk {
            Output::Stdout(_) => self.on_stdout.as_ref(),
            Output::Stderr(_) => self.on_stderr.as_ref(),
        };
        if let Some(callback) = callback {
            // A panicking callback must not take the pump (and every waiter) down with it.
            let called =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| callback(chunk.bytes())));
            if called.is_err() {
                tracing::error!(pid = self.pid, "an output callback panicked");
            }
            self.state().kept.keep(&chunk, self.output_limit);
            self.give_back(len);
            return;
        }
        {
            let mut state = self.state();
            if !state.abandoned {
                state.queue.push_back(chunk);
                drop(state);
                self.changed.notify_all();
                return;
            }
        }
        self.give_back(len);
    }

    /// The command ended (the first end counts): wakes every waiter, and the capsule no
    /// longer counts it as activity.
    pub(crate) fn end(&self, end: End) {
        let activity = {
            let mut state = self.state();
            if state.end.is_none() {
                state.end = Some(end);
            }
            state.activity.take()
        };
        drop(activity);
        self.changed.notify_all();
    }

    /// Whether a kill was asked for.
    pub(crate) fn kill_requested(&self) -> bool {
        self.state().killed
    }

    /// No handle is left: discards what is queued and what comes, closes stdin (a process
    /// waiting for input would wait forever), and stops counting as activity. The process
    /// itself runs on (see [`crate::Commands::connect`]).
    pub(crate) fn abandon(&self) {
        let (discarded, close_stdin, activity) = {
            let mut state = self.state();
            state.abandoned = true;
            let discarded: usize = state.queue.drain(..).map(|c| c.bytes().len()).sum();
            let close = !std::mem::replace(&mut state.stdin_closed, true) && state.end.is_none();
            (discarded, close, state.activity.take())
        };
        drop(activity);
        self.give_back(discarded);
        if let (true, Backend::Agent { link, id }) = (close_stdin, &self.backend) {
            let _ = link.send(&Message::CloseStdin, *id);
        }
    }

    /// The next chunk of output: waits until one comes (`None` once the command ended and
    /// every chunk was taken), or until `deadline`.
    pub(crate) fn next_chunk(&self, deadline: Option<Deadline>) -> Result<Option<Output>> {
        let mut state = self.state();
        loop {
            if let Some(chunk) = state.queue.pop_front() {
                drop(state);
                self.give_back(chunk.bytes().len());
                return Ok(Some(chunk));
            }
            if state.end.is_some() {
                return Ok(None);
            }
            state = self.wait_until(state, deadline)?;
        }
    }

    /// Waits for `changed` until `deadline`; a timeout error once it passed.
    fn wait_until<'a>(
        &self,
        state: MutexGuard<'a, State>,
        deadline: Option<Deadline>,
    ) -> Result<MutexGuard<'a, State>> {
        match deadline {
            None => Ok(wait(&self.changed, state)),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline.at {
                    return Err(Error::Timeout {
                        kind: TimeoutKind::Wait,
                        after: deadline.after,
                    });
                }
                Ok(wait_timeout(&self.changed, state, deadline.at - now))
            }
        }
    }

    /// Waits until the command ends (or `deadline`), keeping the output no one took (up to
    /// the output limit); its result.
    pub(crate) fn wait(&self, deadline: Option<Deadline>) -> Result<CommandOutput> {
        let mut state = self.state();
        loop {
            let mut taken = 0;
            while let Some(chunk) = state.queue.pop_front() {
                taken += chunk.bytes().len();
                state.kept.keep(&chunk, self.output_limit);
            }
            if taken > 0 {
                drop(state);
                self.give_back(taken);
                state = self.state();
                continue;
            }
            match &state.end {
                Some(End::Exited(output)) => {
                    let mut output = output.clone();
                    let kept = &state.kept;
                    output.stdout = kept.stdout.clone();
                    output.stderr = kept.stderr.clone();
                    output.stdout_truncated |= kept.stdout_truncated;
                    output.stderr_truncated |= kept.stderr_truncated;
                    return Ok(output);
                }
                Some(End::Failed(failure)) => return Err(self.error(failure)),
                None => state = self.wait_until(state, deadline)?,
            }
        }
    }

    /// The error a handle reports for `failure`.
    pub(crate) fn error(&self, failure: &Failure) -> Error {
        let id = self.capsule.id().clone();
        match failure {
            Failure::Timeout(after) => Error::Timeout {
                kind: TimeoutKind::Command,
                after: *after,
            },
            Failure::LinkLost => match (&self.backend, self.capsule.status()) {
                (Backend::Agent { .. }, Status::Running | Status::Paused) => {
                    Error::ProcessDetached {
                        id,
                        pid: self.pid,
                        reason: "the capsule was paused; a resumed capsule has a new link to \
                                 its guest"
                            .into(),
                    }
                }
                (Backend::Agent { .. }, _) => self.capsule.state_error("wait for a command"),
                (Backend::Probe { .. }, _) => self.capsule.interrupted_error(),
            },
            Failure::Detached => Error::ProcessDetached {
                id,
                pid: self.pid,
                reason: "another handle connected to the process".into(),
            },
            Failure::Agent(e) => crate::guest::linux::agent_error(&id, e, Some(self.pid)),
            Failure::Guest(reason) => Error::GuestCrashed {
                id,
                reason: reason.clone(),
            },
        }
    }

    /// The command's timeout, for its error.
    pub(crate) fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Fails with the handle's end, if it ended without an exit; `what` if it exited.
    fn check_live(&self, what: &str) -> Result<()> {
        match &self.state().end {
            None => Ok(()),
            Some(End::Failed(failure)) => Err(self.error(failure)),
            Some(End::Exited(_)) => Err(Error::InvalidArgument(format!(
                "process {} has ended: cannot {what}",
                self.pid
            ))),
        }
    }

    /// Sends a message of the request; a closed link is the handle's end.
    fn send(&self, link: &AgentLink, id: u32, message: &Message) -> Result<()> {
        link.send(message, id).map_err(|e: LinkError| match e {
            LinkError::Closed(_) => self.error(&Failure::LinkLost),
            other => Error::Agent {
                id: self.capsule.id().clone(),
                reason: other.to_string(),
            },
        })
    }

    fn unsupported(what: &str) -> Error {
        Error::Unsupported(format!("the probe guest has no {what}"))
    }

    /// Writes `data` to the command's stdin (its terminal, on a terminal).
    pub(crate) fn write_stdin(&self, data: &[u8]) -> Result<()> {
        let Backend::Agent { link, id } = &self.backend else {
            return Err(Self::unsupported("stdin"));
        };
        self.check_live("write to its stdin")?;
        if self.state().stdin_closed {
            return Err(Error::InvalidArgument(format!(
                "the stdin of process {} is closed",
                self.pid
            )));
        }
        link.send_stdin(*id, data, false)
            .map_err(|_| self.error(&Failure::LinkLost))
    }

    /// Closes the command's stdin (end of file; on a terminal, types Ctrl-D). Closing it
    /// again does nothing.
    pub(crate) fn close_stdin(&self) -> Result<()> {
        let Backend::Agent { link, id } = &self.backend else {
            return Err(Self::unsupported("stdin"));
        };
        if std::mem::replace(&mut self.state().stdin_closed, true) {
            return Ok(());
        }
        self.check_live("close its stdin")?;
        self.send(link, *id, &Message::CloseStdin)
    }

    /// Sends `signal` to the command's process group. Nothing happens once it ended.
    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        match &self.backend {
            Backend::Agent { link, id } => {
                if self.state().end.is_some() {
                    return Ok(());
                }
                let sig = signal.number();
                self.send(link, *id, &Message::Signal { sig })
            }
            Backend::Probe { control } if signal == Signal::KILL => {
                self.state().killed = true;
                control.cancel();
                Ok(())
            }
            Backend::Probe { .. } => Err(Self::unsupported("signals but a kill")),
        }
    }

    /// Sets the terminal's size.
    pub(crate) fn resize(&self, size: PtySize) -> Result<()> {
        let Backend::Agent { link, id } = &self.backend else {
            return Err(Self::unsupported("terminals"));
        };
        if !self.pty {
            return Err(Error::InvalidArgument(format!(
                "process {} is not on a terminal",
                self.pid
            )));
        }
        self.check_live("resize its terminal")?;
        let size = crate::guest::window_size(size);
        self.send(link, *id, &Message::Resize(size))
    }
}
