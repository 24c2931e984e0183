//! Running commands in a capsule: to the end ([`run`]), or in the background behind a
//! [`Process`] that its handles share ([`spawn`], [`connect`]); and the guest's processes
//! ([`list`], [`kill`]).
//!
//! A probe command is a job for one of its vCPUs ([`Job`]); a Linux command is a request to
//! its agent, buffered (the agent collects the output and sends it with the exit) when run to
//! the end without callbacks and within the agent's buffer, streamed otherwise.

mod agent;
mod probe;
mod process;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use capsule_agent_protocol::MAX_BUFFERED_OUTPUT;

use crate::capsule_core::CapsuleCore;
use crate::config::RunOptions;
use crate::error::{Error, Result, TimeoutKind};
use crate::guest::linux::RunMode;
use crate::guest::{Job, JobControl, Runtime};
use crate::model::{Command, CommandOutput, ProcessInfo, PtySize};

pub(crate) use process::{Deadline, Process};

/// How much longer than a command's timeout the host waits for the guest to report it
/// killed (the guest enforces the timeout; under nested virtualization it can be slow).
const KILL_REPORT_GRACE: Duration = Duration::from_secs(30);

/// Refuses a command longer than the guest takes.
fn check_len(runtime: &dyn Runtime, command: &Command) -> Result<()> {
    let len = match command {
        Command::Shell(script) => script.len(),
        Command::Exec { program, args } => {
            program.len() + args.iter().map(|a| a.len() + 1).sum::<usize>()
        }
    };
    if len > runtime.max_command_len() {
        return Err(Error::InvalidArgument(format!(
            "the command is {len} bytes; this guest accepts at most {}",
            runtime.max_command_len()
        )));
    }
    Ok(())
}

/// Runs `command` in `capsule` with `options` to its end. The capsule counts as active from
/// the moment the command starts until it ends, so it is never auto-paused while a command
/// runs.
pub(crate) fn run(
    capsule: &Arc<CapsuleCore>,
    command: Command,
    options: &RunOptions,
) -> Result<CommandOutput> {
    let (runtime, activity) = capsule.begin_command()?;
    runtime.check_run(&command, options, false)?;
    check_len(&*runtime, &command)?;
    let streamed = options.has_callbacks() || options.output_limit > MAX_BUFFERED_OUTPUT as usize;
    if let (Some(link), true) = (runtime.agent(), streamed) {
        drop(runtime);
        let timeout = options.run_timeout();
        let mode = RunMode {
            timeout,
            streamed: true,
            stdin_pipe: false,
            pty: None,
        };
        let start = agent::Start::Run { command, mode };
        let process = agent::start(capsule, link, start, options, None)?;
        let host_wait = timeout.and_then(|t| Deadline::after(t.saturating_add(KILL_REPORT_GRACE)));
        let result = process.wait(host_wait);
        drop(activity);
        return match result {
            Err(Error::Timeout {
                kind: TimeoutKind::Wait,
                ..
            }) => {
                let _ = process.signal(crate::model::Signal::KILL);
                Err(Error::Timeout {
                    kind: TimeoutKind::Command,
                    after: timeout.unwrap_or_default(),
                })
            }
            other => other,
        };
    }
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    let control = Arc::new(JobControl::default());
    let probe = runtime.agent().is_none();
    let job = Job {
        command,
        reply: reply_tx,
        control: control.clone(),
        options: options.clone(),
    };
    if runtime.submit(job).is_err() {
        return Err(capsule.interrupted_error());
    }
    drop(runtime);
    let timeout = options.run_timeout();
    // A Linux command's timeout is the agent's, on the guest's clock (paused time does not
    // count), and the job itself waits for the agent's report with a grace: it always
    // answers, or is dropped when the guest goes away (a pause included). Only the probe's
    // timeout is enforced here.
    let result = match (timeout, probe) {
        (Some(limit), true) => reply_rx.recv_timeout(limit).map_err(|e| e.is_timeout()),
        _ => reply_rx.recv().map_err(|_| false),
    };
    match result {
        Ok(Ok(output)) if probe => Ok(honour_options(output, options)),
        Ok(output) => output,
        Err(true) => {
            control.cancel();
            Err(Error::Timeout {
                kind: TimeoutKind::Command,
                after: timeout.unwrap_or_default(),
            })
        }
        Err(false) => Err(capsule.interrupted_error()),
    }
}

/// The probe's whole output through the callbacks, and cut to the output limit.
fn honour_options(mut output: CommandOutput, options: &RunOptions) -> CommandOutput {
    for (bytes, callback) in [
        (&output.stdout, &options.on_stdout),
        (&output.stderr, &options.on_stderr),
    ] {
        if let (false, Some(callback)) = (bytes.is_empty(), callback) {
            callback(bytes);
        }
    }
    let limit = options.output_limit;
    for (bytes, truncated) in [
        (&mut output.stdout, &mut output.stdout_truncated),
        (&mut output.stderr, &mut output.stderr_truncated),
    ] {
        if bytes.len() > limit {
            bytes.truncate(limit);
            *truncated = true;
        }
    }
    output
}

/// Starts `command` in `capsule` (on a terminal of `pty`'s size if given) and returns once
/// it started. It counts as activity of the capsule until it ends or its last handle is
/// dropped.
pub(crate) fn spawn(
    capsule: &Arc<CapsuleCore>,
    command: Command,
    options: &RunOptions,
    pty: Option<PtySize>,
) -> Result<Arc<Process>> {
    let (runtime, activity) = capsule.begin_command_owned()?;
    runtime.check_run(&command, options, pty.is_some())?;
    check_len(&*runtime, &command)?;
    match runtime.agent() {
        Some(link) => {
            let mode = RunMode {
                timeout: options.spawn_timeout(),
                streamed: true,
                stdin_pipe: true,
                pty,
            };
            let start = agent::Start::Run { command, mode };
            agent::start(capsule, link, start, options, Some(activity))
        }
        None => probe::start(capsule, &*runtime, command, options, activity),
    }
}

/// The agent link of a Linux capsule, for `operation` on its processes.
fn agent_of(
    capsule: &CapsuleCore,
    operation: &'static str,
) -> Result<Arc<crate::guest::agent_link::AgentLink>> {
    capsule.runtime(operation)?.agent().ok_or_else(|| {
        Error::Unsupported(format!(
            "the probe guest has no processes to {operation} (only Linux capsules do)"
        ))
    })
}

/// A new [`Process`] for process `pid` of `capsule`'s guest: it receives its output from
/// now on and its exit (any earlier handle to it is detached).
pub(crate) fn connect(capsule: &Arc<CapsuleCore>, pid: u32, pty: bool) -> Result<Arc<Process>> {
    let link = agent_of(capsule, "connect to")?;
    let (_, activity) = capsule.begin_command_owned()?;
    let start = agent::Start::Attach { pid, pty };
    agent::start(capsule, link, start, &RunOptions::new(), Some(activity))
}

/// The processes `capsule`'s agent started that it still tracks.
pub(crate) fn list(capsule: &CapsuleCore) -> Result<Vec<ProcessInfo>> {
    let link = agent_of(capsule, "list")?;
    agent::list(capsule, &link)
}

/// SIGKILL to process `pid`'s group in `capsule`'s guest.
pub(crate) fn kill(capsule: &CapsuleCore, pid: u32) -> Result<()> {
    let link = agent_of(capsule, "kill")?;
    agent::kill(capsule, &link, pid)
}
