//! Commands through a Linux guest's agent: starting one (`Run`) or taking over one
//! (`Attach`), the pump thread that feeds its [`Process`], and the agent's list of
//! processes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use capsule_agent_protocol::{ErrorCode, Message};

use super::process::{Backend, End, Failure, Process};
use crate::capsule_core::{CapsuleCore, OwnedActivity};
use crate::config::RunOptions;
use crate::error::{Error, Result, TimeoutKind};
use crate::guest::agent_link::{AgentLink, LinkError};
use crate::guest::linux::{agent_error, command_output, run_request, RunMode};
use crate::model::{Command, Output, ProcessInfo};

/// How long the agent may take to say a command started (or could not), to list its
/// processes, or to end a killed process.
const ANSWER_LIMIT: Duration = Duration::from_secs(60);

/// What a new request does.
pub(crate) enum Start {
    /// Runs `command`.
    Run { command: Command, mode: RunMode },
    /// Takes over process `pid`'s output and exit (on a terminal if `pty`).
    Attach { pid: u32, pty: bool },
}

/// The error for a link failure while starting or asking something.
fn link_error(capsule: &CapsuleCore, e: LinkError, pid: Option<u32>) -> Error {
    match e {
        LinkError::Closed(_) => capsule.interrupted_error(),
        LinkError::Timeout => Error::Timeout {
            kind: TimeoutKind::Wait,
            after: ANSWER_LIMIT,
        },
        LinkError::Refused(info) => agent_error(capsule.id(), &info, pid),
        e @ (LinkError::Agent(_) | LinkError::Protocol(_)) => Error::Agent {
            id: capsule.id().clone(),
            reason: e.to_string(),
        },
    }
}

/// Sends the request `start` asks for and returns its [`Process`] once the agent said it
/// started (or found the process); a pump thread feeds it from then on.
pub(crate) fn start(
    capsule: &Arc<CapsuleCore>,
    link: Arc<AgentLink>,
    start: Start,
    options: &RunOptions,
    activity: Option<OwnedActivity>,
) -> Result<Arc<Process>> {
    let (id, replies) = link
        .open_request()
        .map_err(|e| link_error(capsule, e, None))?;
    let (message, stdin, timeout, pty, asked) = match start {
        Start::Run { command, mode } => (
            Message::Run(run_request(&command, options, mode)),
            options.stdin.as_deref(),
            mode.timeout,
            mode.pty.is_some(),
            None,
        ),
        Start::Attach { pid, pty } => (Message::Attach { pid }, None, None, pty, Some(pid)),
    };
    let sent = link.send(&message, id).and_then(|()| match stdin {
        Some(data) => link.send_stdin(id, data, true),
        None => Ok(()),
    });
    let started = sent.and_then(|()| {
        let deadline = Some(Instant::now() + ANSWER_LIMIT);
        loop {
            match AgentLink::next_reply(&replies, deadline)? {
                Message::Started { pid } => return Ok(pid),
                Message::Error(e) if e.code.ends_request() => return Err(LinkError::Refused(e)),
                // Advisory errors (a refused stdin...): the request goes on.
                _ => {}
            }
        }
    });
    let pid = match started {
        Ok(pid) => pid,
        Err(e) => {
            link.close_request(id);
            return Err(link_error(capsule, e, asked));
        }
    };
    link.note_receiver(pid, id);
    let backend = Backend::Agent {
        link: link.clone(),
        id,
    };
    let process = Process::new(
        capsule.clone(),
        pid,
        pty,
        backend,
        options,
        timeout,
        activity,
    );
    let fed = process.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("capsule-cmd-{pid}"))
        .spawn(move || pump(fed, link, id, replies));
    if let Err(e) = spawned {
        // Nobody could take its output: do not leave it running blocked.
        if asked.is_none() {
            let _ = process.signal(crate::model::Signal::KILL);
        }
        return Err(Error::os("spawning a command thread", e));
    }
    Ok(process)
}

/// Feeds `process` with the replies of request `id` until it ends.
fn pump(process: Arc<Process>, link: Arc<AgentLink>, id: u32, replies: Receiver<Message>) {
    let end = loop {
        let Ok(message) = replies.recv() else {
            break End::Failed(Failure::LinkLost);
        };
        match message {
            Message::Stdout(data) => process.deliver(Output::Stdout(data)),
            Message::Stderr(data) => process.deliver(Output::Stderr(data)),
            Message::Exit(exit) if exit.timed_out => {
                break End::Failed(Failure::Timeout(process.timeout().unwrap_or_default()))
            }
            Message::Exit(mut exit) => {
                // Streamed requests have none; a buffered one would.
                for chunk in [
                    Output::Stdout(std::mem::take(&mut exit.stdout)),
                    Output::Stderr(std::mem::take(&mut exit.stderr)),
                ] {
                    if !chunk.bytes().is_empty() {
                        process.deliver(chunk);
                    }
                }
                break End::Exited(command_output(&exit, Vec::new(), Vec::new()));
            }
            Message::Error(e) if e.code == ErrorCode::DETACHED => {
                break End::Failed(Failure::Detached)
            }
            Message::Error(e) if e.code.ends_request() => break End::Failed(Failure::Agent(e)),
            Message::Error(e) => {
                tracing::debug!(pid = process.pid(), error = %e.message, "agent refused a message");
            }
            _ => {}
        }
    };
    link.close_request(id);
    link.forget_receiver(process.pid(), id);
    process.end(end);
}

/// The processes the agent of `link` tracks.
pub(crate) fn list(capsule: &CapsuleCore, link: &AgentLink) -> Result<Vec<ProcessInfo>> {
    let entries = link
        .list_processes(ANSWER_LIMIT)
        .map_err(|e| link_error(capsule, e, None))?;
    Ok(entries
        .into_iter()
        .map(|e| ProcessInfo {
            pid: e.pid,
            command: e.command,
            started_at: std::time::UNIX_EPOCH + Duration::from_millis(e.started_at_unix_ms),
        })
        .collect())
}

/// SIGKILL to process `pid`'s group. Through the request of this link that receives its
/// output, if one does (its handle reports the end); otherwise by attaching to it, and then
/// waiting (up to [`ANSWER_LIMIT`]) for its end, taking what output is left.
pub(crate) fn kill(capsule: &CapsuleCore, link: &AgentLink, pid: u32) -> Result<()> {
    let kill = Message::Signal {
        sig: crate::model::Signal::KILL.number(),
    };
    if let Some(id) = link.receiver_of(pid) {
        return link
            .send(&kill, id)
            .map_err(|e| link_error(capsule, e, Some(pid)));
    }
    let (id, replies) = link
        .open_request()
        .map_err(|e| link_error(capsule, e, Some(pid)))?;
    let result = link
        .send(&Message::Attach { pid }, id)
        .and_then(|()| link.send(&kill, id))
        .and_then(|()| {
            let deadline = Some(Instant::now() + ANSWER_LIMIT);
            loop {
                match AgentLink::next_reply(&replies, deadline)? {
                    Message::Exit(_) => return Ok(()),
                    Message::Error(e) if e.code.ends_request() => {
                        return Err(LinkError::Refused(e))
                    }
                    // Let what is left of its output through, so that it can end.
                    Message::Stdout(data) | Message::Stderr(data) => {
                        let bytes = u32::try_from(data.len()).unwrap_or(u32::MAX);
                        link.send(&Message::Credit { bytes }, id)?;
                    }
                    _ => {}
                }
            }
        });
    link.close_request(id);
    result.map_err(|e| link_error(capsule, e, Some(pid)))
}
