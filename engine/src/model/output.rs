//! What a finished command produced.

use std::time::Duration;

/// What a finished command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct CommandOutput {
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
    /// Exit code; 127 for an unknown command.
    pub exit_code: i32,
    /// Wall-clock time from sending the command to receiving its result.
    pub duration: Duration,
    /// Whether stdout was cut at the guest's output limit.
    pub stdout_truncated: bool,
    /// Whether stderr was cut at the guest's output limit.
    pub stderr_truncated: bool,
}

impl CommandOutput {
    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0
    }
}
