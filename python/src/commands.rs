//! `capsule.commands`: running a command in a capsule and what it returns.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::errors::{seconds, IntoPy};

/// Runs commands in one capsule: `capsule.commands.run("echo hi")`.
///
/// Background commands, streaming output callbacks, stdin and running as another user are not
/// here yet: they arrive with the engine's guest I/O work.
#[pyclass(module = "capsule", name = "Commands", frozen)]
pub(crate) struct Commands {
    pub(crate) capsule: capsule::Capsule,
}

#[pymethods]
impl Commands {
    /// Runs `cmd` in the capsule and returns its result once it has finished.
    ///
    /// In a Linux capsule `cmd` runs as `/bin/sh -c cmd`, with `env` (a dict of extra
    /// environment variables) and `cwd` (its working directory). The probe guest ignores
    /// both and understands `echo TEXT`, `exit N`, `count`, `touch N`, `sum`, `spin N` and
    /// `crash`.
    ///
    /// `timeout` is in seconds: None for the engine's default (30 s), 0 for no limit. A
    /// command that outlives it is killed (the capsule stays usable) and
    /// `capsule.TimeoutError` is raised. A non-zero exit code is not an error: read
    /// `exit_code`. The GIL is released while the command runs.
    #[pyo3(signature = (cmd, env=None, cwd=None, timeout=None))]
    fn run(
        &self,
        py: Python<'_>,
        cmd: &str,
        env: Option<&Bound<'_, PyDict>>,
        cwd: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<CommandResult> {
        let mut options = capsule::RunOptions::new();
        if let Some(env) = env {
            for (key, value) in env.iter() {
                options = options.env(key.extract::<String>()?, value.extract::<String>()?);
            }
        }
        if let Some(cwd) = cwd {
            options = options.cwd(cwd);
        }
        match timeout {
            None => {}
            Some(0.0) => options = options.no_timeout(),
            Some(t) => options = options.timeout(seconds("timeout", t)?),
        }
        let capsule = &self.capsule;
        let output = py
            .detach(|| capsule.commands().run_with(cmd, options))
            .into_py(py)?;
        Ok(CommandResult::from(output))
    }

    fn __repr__(&self) -> String {
        format!("Commands(capsule_id={:?})", self.capsule.id().as_str())
    }
}

/// What a finished command produced.
#[pyclass(module = "capsule", name = "CommandResult", frozen)]
pub(crate) struct CommandResult {
    /// Standard output (invalid UTF-8 replaced).
    #[pyo3(get)]
    stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    #[pyo3(get)]
    stderr: String,
    /// Exit code; 127 for an unknown command; minus the signal's number for a command a
    /// signal killed (as Python's `subprocess` reports it).
    #[pyo3(get)]
    exit_code: i32,
    /// The signal that killed the command, if one did.
    #[pyo3(get)]
    signal: Option<i32>,
    /// Seconds from sending the command to receiving its result, as the engine measured it.
    #[pyo3(get)]
    duration: f64,
    /// Whether stdout was cut at the guest's output limit.
    #[pyo3(get)]
    stdout_truncated: bool,
    /// Whether stderr was cut at the guest's output limit.
    #[pyo3(get)]
    stderr_truncated: bool,
}

impl From<capsule::CommandOutput> for CommandResult {
    fn from(out: capsule::CommandOutput) -> Self {
        CommandResult {
            stdout: out.stdout_str().into_owned(),
            stderr: out.stderr_str().into_owned(),
            exit_code: match (out.exit_code, out.signal) {
                (Some(code), _) => code,
                (None, Some(signal)) => -signal.number(),
                (None, None) => -1,
            },
            signal: out.signal.map(|s| s.number()),
            duration: out.duration.as_secs_f64(),
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
        }
    }
}

#[pymethods]
impl CommandResult {
    fn __repr__(&self) -> String {
        format!(
            "CommandResult(exit_code={}, stdout={:?}, stderr={:?}, duration={:.6})",
            self.exit_code, self.stdout, self.stderr, self.duration
        )
    }
}
