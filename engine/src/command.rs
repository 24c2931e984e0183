//! Running one command in a capsule: hand it to the running guest as a [`Job`] and wait for
//! its result, its timeout, or the end of the guest.

use std::sync::Arc;

use crate::capsule_core::CapsuleCore;
use crate::config::RunOptions;
use crate::error::{Error, Result, TimeoutKind};
use crate::guest::{Job, JobControl};
use crate::model::CommandOutput;

/// Runs `command` in `capsule` with `options`. The capsule counts as active from the moment
/// the command starts until it ends, so it is never auto-paused while a command runs.
pub(crate) fn run(
    capsule: &CapsuleCore,
    command: &str,
    options: &RunOptions,
) -> Result<CommandOutput> {
    let bytes = command.as_bytes();
    let (runtime, _activity) = capsule.begin_command()?;
    if bytes.len() > runtime.max_command_len() {
        return Err(Error::InvalidArgument(format!(
            "the command is {} bytes; this guest accepts at most {}",
            bytes.len(),
            runtime.max_command_len()
        )));
    }
    let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
    let control = Arc::new(JobControl::default());
    let job = Job {
        command: bytes.to_vec(),
        reply: reply_tx,
        control: control.clone(),
        options: options.clone(),
    };
    if runtime.submit(job).is_err() {
        return Err(capsule.interrupted_error());
    }
    drop(runtime);
    let result = match options.timeout {
        Some(limit) => reply_rx.recv_timeout(limit).map_err(|e| e.is_timeout()),
        None => reply_rx.recv().map_err(|_| false),
    };
    match result {
        Ok(output) => output,
        Err(true) => {
            control.cancel();
            Err(Error::Timeout {
                kind: TimeoutKind::Command,
                after: options.timeout.unwrap_or_default(),
            })
        }
        Err(false) => Err(capsule.interrupted_error()),
    }
}
