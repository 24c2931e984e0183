//! Spawned commands of the probe guest: a job on one of its vCPUs, whose output arrives
//! at its end; the only control is a kill (which restarts the vCPU).

use std::sync::Arc;

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::process::{Backend, End, Failure, Process};
use crate::capsule_core::{CapsuleCore, OwnedActivity};
use crate::config::RunOptions;
use crate::error::{Error, Result};
use crate::guest::{Job, JobControl, Runtime};
use crate::model::{Command, CommandOutput, Output, Signal};

/// Hands `command` to the probe and returns its [`Process`]; a pump thread waits for the
/// result.
pub(crate) fn start(
    capsule: &Arc<CapsuleCore>,
    runtime: &dyn Runtime,
    command: Command,
    options: &RunOptions,
    activity: OwnedActivity,
) -> Result<Arc<Process>> {
    let (reply, result) = crossbeam_channel::bounded(1);
    let control = Arc::new(JobControl::default());
    let job = Job {
        command,
        reply,
        control: control.clone(),
        options: options.clone(),
    };
    if runtime.submit(job).is_err() {
        return Err(capsule.interrupted_error());
    }
    let timeout = options.spawn_timeout();
    let backend = Backend::Probe {
        control: control.clone(),
    };
    let process = Process::new(
        capsule.clone(),
        0,
        false,
        backend,
        options,
        timeout,
        Some(activity),
    );
    let (fed, cancel) = (process.clone(), control.clone());
    std::thread::Builder::new()
        .name("capsule-probe-cmd".into())
        .spawn(move || pump(&fed, &result, &control))
        .map_err(|e| {
            cancel.cancel();
            Error::os("spawning a command thread", e)
        })?;
    Ok(process)
}

/// Waits for the job's result (or its timeout) and feeds it to `process`.
fn pump(process: &Process, result: &Receiver<Result<CommandOutput>>, control: &JobControl) {
    let received = match process.timeout() {
        Some(limit) => result.recv_timeout(limit),
        None => result.recv().map_err(|_| RecvTimeoutError::Disconnected),
    };
    let end = match received {
        Ok(Ok(mut output)) => {
            for chunk in [
                Output::Stdout(std::mem::take(&mut output.stdout)),
                Output::Stderr(std::mem::take(&mut output.stderr)),
            ] {
                if !chunk.bytes().is_empty() {
                    process.deliver(chunk);
                }
            }
            End::Exited(output)
        }
        Ok(Err(Error::GuestCrashed { reason, .. })) => End::Failed(Failure::Guest(reason)),
        Ok(Err(_)) => End::Failed(Failure::LinkLost),
        Err(RecvTimeoutError::Timeout) => {
            control.cancel();
            End::Failed(Failure::Timeout(process.timeout().unwrap_or_default()))
        }
        // A killed job is dropped unanswered when its vCPU restarts.
        Err(RecvTimeoutError::Disconnected) if process.kill_requested() => {
            End::Exited(CommandOutput {
                stdout: Vec::new(),
                stderr: Vec::new(),
                exit_code: None,
                signal: Some(Signal::KILL),
                duration: std::time::Duration::ZERO,
                stdout_truncated: false,
                stderr_truncated: false,
            })
        }
        Err(RecvTimeoutError::Disconnected) => End::Failed(Failure::LinkLost),
    };
    process.end(end);
}
