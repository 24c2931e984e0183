//! What a command produced: the chunks of its output as they come, and what a finished
//! command reports.

use std::borrow::Cow;
use std::time::Duration;

use super::process::Signal;

/// What a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandOutput {
    /// Standard output, as bytes (see [`CommandOutput::stdout_str`]), at most the run's
    /// output limit ([`crate::RunOptions::output_limit`]). For a spawned command, what no
    /// [`crate::OutputStream`] took.
    pub stdout: Vec<u8>,
    /// Standard error, as for `stdout`.
    pub stderr: Vec<u8>,
    /// The exit code, if the command exited; `None` if a signal killed it (see `signal`).
    /// 127 for an unknown command.
    pub exit_code: Option<i32>,
    /// The signal that killed the command, if one did (a `kill()`, or `SIGKILL` from the
    /// kernel's OOM killer...); never reported as `128 + n`.
    pub signal: Option<Signal>,
    /// How long the command ran (as the guest measured it, where it can).
    pub duration: Duration,
    /// Whether stdout went past the output limit (the rest was discarded).
    pub stdout_truncated: bool,
    /// Whether stderr went past the output limit (the rest was discarded).
    pub stderr_truncated: bool,
}

impl CommandOutput {
    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }

    /// Standard output as text, invalid UTF-8 replaced by `U+FFFD`.
    pub fn stdout_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stdout)
    }

    /// Standard error as text, invalid UTF-8 replaced by `U+FFFD`.
    pub fn stderr_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.stderr)
    }
}

/// A chunk of a running command's output, in the order the guest read it (see
/// [`crate::CommandHandle::output`]). A command on a terminal has only `Stdout`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bytes the command wrote to its standard output.
    Stdout(Vec<u8>),
    /// Bytes the command wrote to its standard error.
    Stderr(Vec<u8>),
}

impl Output {
    /// The bytes of the chunk.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Output::Stdout(b) | Output::Stderr(b) => b,
        }
    }

    /// The bytes of the chunk, taken.
    pub fn into_bytes(self) -> Vec<u8> {
        match self {
            Output::Stdout(b) | Output::Stderr(b) => b,
        }
    }

    /// Whether the chunk is from standard error.
    pub fn is_stderr(&self) -> bool {
        matches!(self, Output::Stderr(_))
    }
}
