//! `capsule.commands`: running a command in a capsule, to its end or in the background, and
//! reaching the processes its guest runs; what a finished command returns.

use std::time::SystemTime;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

use crate::errors::{seconds, IntoPy};
use crate::output::{data_arg, poll, signal_arg, Callbacks};

/// A command from Python: a `str` is a shell script, a sequence of `str` a program and its
/// arguments (run without a shell).
pub(crate) fn command_arg(cmd: &Bound<'_, PyAny>) -> PyResult<capsule::Command> {
    if let Ok(script) = cmd.cast::<PyString>() {
        return Ok(capsule::Command::shell(script.to_str()?));
    }
    let argv: Vec<String> = cmd.extract().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(
            "cmd must be a str (a shell script) or a sequence of str (a program and its \
             arguments)",
        )
    })?;
    let mut argv = argv.into_iter();
    let program = argv
        .next()
        .ok_or_else(|| PyValueError::new_err("cmd is an empty sequence: no program to run"))?;
    Ok(capsule::Command::exec(program, argv))
}

/// The options of a command from Python arguments (those `run` and `pty.create` share).
pub(crate) fn run_options(
    env: Option<&Bound<'_, PyDict>>,
    cwd: Option<String>,
    user: Option<String>,
    clear_env: bool,
) -> PyResult<capsule::RunOptions> {
    let mut options = capsule::RunOptions::new();
    if let Some(env) = env {
        for (key, value) in env.iter() {
            options = options.env(key.extract::<String>()?, value.extract::<String>()?);
        }
    }
    if clear_env {
        options = options.clear_env();
    }
    if let Some(cwd) = cwd {
        options = options.cwd(cwd);
    }
    if let Some(user) = user {
        options = options.user(user);
    }
    Ok(options)
}

/// Runs commands in one capsule (`capsule.commands`): `run` to the end or in the background,
/// and the guest's processes: `list`, `connect`, `kill`.
#[pyclass(module = "capsule", name = "Commands", frozen)]
pub(crate) struct Commands {
    pub(crate) capsule: capsule::Capsule,
}

#[pymethods]
impl Commands {
    /// Runs `cmd` in the capsule: returns its `CommandResult` once it has finished, or with
    /// `background=True` a `CommandHandle` as soon as it started.
    ///
    /// `cmd` is a shell script (`/bin/sh -c cmd` in a Linux capsule; a verb line for the
    /// probe) or a sequence of str: a program and its arguments, run without a shell (Linux
    /// capsules). For a Linux capsule: `env` (a dict of environment variables; with
    /// `clear_env=True` the command starts from an empty environment), `cwd` (its working
    /// directory), `user` (a guest user to run as: its uid, groups and HOME), `stdin` (bytes
    /// or str fed to the command, then closed; without it a foreground command reads
    /// /dev/null). The probe guest refuses every one of these with `UnsupportedError` and
    /// understands `echo TEXT`, `exit N`, `count`, `touch N`, `sum`, `spin N` and `crash`.
    ///
    /// `timeout` in seconds: a command that outlives it is killed (its whole process group;
    /// the capsule stays usable) and `capsule.TimeoutError` ("command") raised, by `run` or
    /// by the handle's `wait`. None: 30 s for a foreground command, no limit in the
    /// background; 0: no limit. A non-zero exit code is not an error: read `exit_code`.
    ///
    /// `on_stdout` and `on_stderr` are called with the output as it arrives, in `str`
    /// chunks (decoded incrementally: a character cut by a chunk boundary is not lost;
    /// invalid UTF-8 becomes U+FFFD), on a thread of the command's own with the GIL held,
    /// never inside an engine lock; the probe calls them once, at the end. What they receive
    /// is also in the result. If a callback raises, it is not called again and `run` (or
    /// `wait`) raises its exception once the command ended. A slow callback slows its
    /// command down (its output waits in the guest), never the engine.
    ///
    /// `output_limit`: the most bytes of stdout, and of stderr, kept in the result (default
    /// 1 MiB; the rest is discarded and `stdout_truncated` set).
    ///
    /// The GIL is released while the command runs.
    #[pyo3(signature = (
        cmd,
        env=None,
        cwd=None,
        timeout=None,
        user=None,
        background=false,
        on_stdout=None,
        on_stderr=None,
        stdin=None,
        *,
        clear_env=false,
        output_limit=None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        py: Python<'_>,
        cmd: &Bound<'_, PyAny>,
        env: Option<&Bound<'_, PyDict>>,
        cwd: Option<String>,
        timeout: Option<f64>,
        user: Option<String>,
        background: bool,
        on_stdout: Option<&Bound<'_, PyAny>>,
        on_stderr: Option<&Bound<'_, PyAny>>,
        stdin: Option<&Bound<'_, PyAny>>,
        clear_env: bool,
        output_limit: Option<usize>,
    ) -> PyResult<Py<PyAny>> {
        let command = command_arg(cmd)?;
        let mut options = run_options(env, cwd, user, clear_env)?;
        match timeout {
            None => {}
            Some(0.0) => options = options.no_timeout(),
            Some(t) => options = options.timeout(seconds("timeout", t)?),
        }
        if let Some(data) = stdin {
            options = options.stdin(data_arg("stdin", data)?.into_owned());
        }
        if let Some(limit) = output_limit {
            options = options.output_limit(limit);
        }
        let callbacks = Callbacks::new(on_stdout, "on_stdout", on_stderr, true)?;
        let options = callbacks.install(options);
        let capsule = &self.capsule;
        if background {
            let handle = py
                .detach(|| capsule.commands().spawn(command, options))
                .into_py(py)?;
            let handle = CommandHandle {
                inner: handle,
                callbacks,
            };
            return Ok(handle.into_pyobject(py)?.into_any().unbind());
        }
        let result = py.detach(|| capsule.commands().run_with(command, options));
        let output = callbacks.settle(py, result)?;
        Ok(CommandResult::from(output)
            .into_pyobject(py)?
            .into_any()
            .unbind())
    }

    /// The processes the guest's agent started (by `run`, background commands and
    /// terminals, from any handle or engine) that it still tracks: those running, and those
    /// that ended while no handle received their exit (after a pause, say), until a
    /// `connect` takes it. A list of `ProcessInfo`, by pid. Linux capsules
    /// (`UnsupportedError` for the probe).
    fn list(&self, py: Python<'_>) -> PyResult<Vec<ProcessInfo>> {
        let capsule = &self.capsule;
        let processes = py.detach(|| capsule.commands().list()).into_py(py)?;
        Ok(processes.into_iter().map(ProcessInfo::from).collect())
    }

    /// A new `CommandHandle` to process `pid` (one of `list()`): it receives the process's
    /// output from now on and its exit; `send_stdin` and signals act on the process. Any
    /// other handle to it is detached (`ProcessDetachedError`). Use it after a pause and
    /// resume, whose handles are detached. Raises `ProcessNotFoundError` for a pid the agent
    /// does not track, `UnsupportedError` for the probe.
    fn connect(&self, py: Python<'_>, pid: u32) -> PyResult<CommandHandle> {
        let capsule = &self.capsule;
        let inner = py.detach(|| capsule.commands().connect(pid)).into_py(py)?;
        Ok(CommandHandle {
            inner,
            callbacks: Callbacks::default(),
        })
    }

    /// Kills process `pid` (one of `list()`): SIGKILL to its whole process group. A handle
    /// to it reports the kill; without one, this returns once the process ended. Raises
    /// `ProcessNotFoundError`, `UnsupportedError` for the probe.
    fn kill(&self, py: Python<'_>, pid: u32) -> PyResult<()> {
        let capsule = &self.capsule;
        py.detach(|| capsule.commands().kill(pid)).into_py(py)
    }

    fn __repr__(&self) -> String {
        format!("Commands(capsule_id={:?})", self.capsule.id().as_str())
    }
}

/// The name of a chunk's stream, as iteration yields it.
fn stream_name(chunk: &capsule::Output) -> &'static str {
    if chunk.is_stderr() {
        "stderr"
    } else {
        "stdout"
    }
}

/// A command running in the background, from `commands.run(..., background=True)` or
/// `commands.connect(pid)`.
///
/// Its output arrives in chunks as the command writes it. Each chunk goes to one place: to
/// the `on_stdout`/`on_stderr` callback if one was given (and into `wait()`'s result);
/// otherwise it waits in the handle until iteration (`for stream, data in handle:`, or
/// `next_chunk()`) takes it, or until `wait()` gathers it into the result. The handle buffers
/// at most 1 MiB: past it the guest process blocks on its next write until the output is
/// taken, so read it, wait, or give callbacks to a command that writes a lot.
///
/// The probe runs its verbs in the background too (its pid is 0; output arrives at the end;
/// only `kill()` controls it). Dropping the handle leaves the command running, detached
/// (`commands.connect(pid)` gives a new handle). After a pause, a handle's calls raise
/// `ProcessDetachedError`: reconnect once the capsule runs.
#[pyclass(module = "capsule", name = "CommandHandle", frozen)]
pub(crate) struct CommandHandle {
    inner: capsule::CommandHandle,
    callbacks: Callbacks,
}

#[pymethods]
impl CommandHandle {
    /// The command's pid in the guest, also its process group id (0 for the probe).
    #[getter]
    fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// Waits until the command ends and returns its `CommandResult` (the output no
    /// iteration took, up to the output limit). With `timeout` (seconds), raises
    /// `capsule.TimeoutError` ("wait") if it has not ended by then; the command runs on.
    /// Raises `capsule.TimeoutError` ("command") if the command's own timeout killed it,
    /// `ProcessDetachedError` after a pause, or the exception an output callback raised.
    /// Releases the GIL; Ctrl-C interrupts the wait, not the command.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<CommandResult> {
        let timeout = timeout.map(|t| seconds("timeout", t)).transpose()?;
        let inner = &self.inner;
        let result = poll(py, timeout, |slice| inner.wait_timeout(slice))?;
        Ok(CommandResult::from(self.callbacks.settle(py, result)?))
    }

    /// Kills the command: SIGKILL to its whole process group. Returns once sent; `wait()`
    /// then reports `signal` 9 (`exit_code` -9).
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.kill()).into_py(py)
    }

    /// Sends the signal numbered `signum` (an int or a `signal.Signals`) to the command's
    /// process group; nothing once it ended. The probe only knows 9 (SIGKILL):
    /// `UnsupportedError` for others.
    fn signal(&self, py: Python<'_>, signum: i32) -> PyResult<()> {
        let signal = signal_arg(signum)?;
        let inner = &self.inner;
        py.detach(|| inner.signal(signal)).into_py(py)
    }

    /// Writes `data` (bytes, or str as UTF-8) to the command's stdin; returns once sent.
    /// Raises `InvalidArgumentError` once stdin is closed (or was given to `run`) or the
    /// command ended, `UnsupportedError` for the probe.
    fn send_stdin(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = data_arg("data", data)?;
        let inner = &self.inner;
        py.detach(|| inner.write_stdin(&data)).into_py(py)
    }

    /// Closes the command's stdin: it reads end of file. Closing it again does nothing.
    /// `UnsupportedError` for the probe.
    fn close_stdin(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.close_stdin()).into_py(py)
    }

    /// The next chunk of output as `(stream, data)`: `stream` is "stdout" or "stderr",
    /// `data` bytes. Waits for one; None once the command ended and every chunk was taken.
    /// With `timeout` (seconds), raises `capsule.TimeoutError` ("wait") if none came in
    /// time. Iterating over the handle does the same without a timeout.
    #[pyo3(signature = (timeout=None))]
    fn next_chunk<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<(&'static str, Bound<'py, PyBytes>)>> {
        let timeout = timeout.map(|t| seconds("timeout", t)).transpose()?;
        let inner = &self.inner;
        let chunk = poll(py, timeout, |slice| inner.output().recv_timeout(slice))?.into_py(py)?;
        Ok(chunk.map(|c| (stream_name(&c), PyBytes::new(py, c.bytes()))))
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Option<(&'static str, Bound<'py, PyBytes>)>> {
        self.next_chunk(py, None)
    }

    fn __repr__(&self) -> String {
        format!("CommandHandle(pid={})", self.inner.pid())
    }
}

/// A process the guest's agent tracks, from `commands.list()`.
#[pyclass(module = "capsule", name = "ProcessInfo", frozen)]
pub(crate) struct ProcessInfo {
    /// Its pid in the guest (also its process group id), for `commands.connect` and
    /// `commands.kill`.
    #[pyo3(get)]
    pid: u32,
    /// What was run (a script, or a program and its arguments joined by spaces).
    #[pyo3(get)]
    command: String,
    started: SystemTime,
}

impl From<capsule::ProcessInfo> for ProcessInfo {
    fn from(p: capsule::ProcessInfo) -> Self {
        ProcessInfo {
            pid: p.pid,
            command: p.command,
            started: p.started_at,
        }
    }
}

#[pymethods]
impl ProcessInfo {
    /// When it started, by the guest's clock (set to the host's at every start and resume),
    /// as a UTC datetime.
    #[getter]
    fn started_at(&self) -> SystemTime {
        self.started
    }

    fn __repr__(&self) -> String {
        format!("ProcessInfo(pid={}, command={:?})", self.pid, self.command)
    }
}

/// What a finished command produced.
#[pyclass(module = "capsule", name = "CommandResult", frozen)]
pub(crate) struct CommandResult {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Exit code; 127 for an unknown command; minus the signal's number for a command a
    /// signal killed (as Python's `subprocess` reports it).
    #[pyo3(get)]
    exit_code: i32,
    /// The signal that killed the command, if one did.
    #[pyo3(get)]
    signal: Option<i32>,
    /// Seconds the command ran, as the engine measured it.
    #[pyo3(get)]
    duration: f64,
    /// Whether stdout was cut at the output limit.
    #[pyo3(get)]
    stdout_truncated: bool,
    /// Whether stderr was cut at the output limit.
    #[pyo3(get)]
    stderr_truncated: bool,
}

impl From<capsule::CommandOutput> for CommandResult {
    fn from(out: capsule::CommandOutput) -> Self {
        CommandResult {
            exit_code: match (out.exit_code, out.signal) {
                (Some(code), _) => code,
                (None, Some(signal)) => -signal.number(),
                (None, None) => -1,
            },
            signal: out.signal.map(|s| s.number()),
            duration: out.duration.as_secs_f64(),
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
            stdout: out.stdout,
            stderr: out.stderr,
        }
    }
}

#[pymethods]
impl CommandResult {
    /// Standard output as text (invalid UTF-8 replaced by U+FFFD).
    #[getter]
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text (invalid UTF-8 replaced by U+FFFD).
    #[getter]
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Standard output as the command wrote it (bytes).
    #[getter]
    fn stdout_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.stdout)
    }

    /// Standard error as the command wrote it (bytes).
    #[getter]
    fn stderr_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.stderr)
    }

    fn __repr__(&self) -> String {
        format!(
            "CommandResult(exit_code={}, stdout={:?}, stderr={:?}, duration={:.6})",
            self.exit_code,
            String::from_utf8_lossy(&self.stdout),
            String::from_utf8_lossy(&self.stderr),
            self.duration
        )
    }
}
