//! `capsule.pty`: shells (or other commands) on pseudo-terminals in a Linux capsule.

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::commands::{command_arg, run_options, CommandResult};
use crate::errors::{seconds, IntoPy};
use crate::output::{data_arg, poll, signal_arg, Callbacks};

/// Terminals in one capsule (`capsule.pty`): `create` starts an interactive shell (or a
/// command) on a new pseudo-terminal, `connect` takes over one after a pause. Linux capsules
/// (`UnsupportedError` for the probe).
#[pyclass(module = "capsule", name = "Pty", frozen)]
pub(crate) struct Pty {
    pub(crate) capsule: capsule::Capsule,
}

#[pymethods]
impl Pty {
    /// Starts `cmd` on a new terminal of `rows` by `cols` and returns its `PtyHandle` once it
    /// started. `cmd`: None for an interactive shell (`/bin/sh -i`), a str (a shell script)
    /// or a sequence of str (a program and its arguments). `env`, `cwd`, `user` and
    /// `clear_env` as for `commands.run` (`TERM` is `xterm-256color` unless set); `timeout`
    /// in seconds kills it after that long (None or 0: never). `on_data` is called with what
    /// the terminal shows, in `bytes` chunks as they come (on a thread of the terminal's own,
    /// with the GIL held); without it, iterate over the handle. Releases the GIL.
    #[pyo3(signature = (
        rows=24,
        cols=80,
        cmd=None,
        env=None,
        cwd=None,
        user=None,
        timeout=None,
        on_data=None,
        *,
        clear_env=false,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn create(
        &self,
        py: Python<'_>,
        rows: u16,
        cols: u16,
        cmd: Option<&Bound<'_, PyAny>>,
        env: Option<&Bound<'_, PyDict>>,
        cwd: Option<String>,
        user: Option<String>,
        timeout: Option<f64>,
        on_data: Option<&Bound<'_, PyAny>>,
        clear_env: bool,
    ) -> PyResult<PtyHandle> {
        let command = cmd.map(command_arg).transpose()?;
        let mut options = run_options(env, cwd, user, clear_env)?;
        if let Some(t) = timeout.filter(|t| *t != 0.0) {
            options = options.timeout(seconds("timeout", t)?);
        }
        let callbacks = Callbacks::new(on_data, "on_data", None, false)?;
        let options = callbacks.install(options);
        let size = capsule::PtySize::new(rows, cols);
        let capsule = &self.capsule;
        let inner = py
            .detach(|| match command {
                None => capsule.pty().create(size, options),
                Some(command) => capsule.pty().create_with(command, size, options),
            })
            .into_py(py)?;
        Ok(PtyHandle { inner, callbacks })
    }

    /// A new `PtyHandle` to the terminal session led by process `pid` (after a pause, say);
    /// see `commands.connect`.
    fn connect(&self, py: Python<'_>, pid: u32) -> PyResult<PtyHandle> {
        let capsule = &self.capsule;
        let inner = py.detach(|| capsule.pty().connect(pid)).into_py(py)?;
        Ok(PtyHandle {
            inner,
            callbacks: Callbacks::default(),
        })
    }

    fn __repr__(&self) -> String {
        format!("Pty(capsule_id={:?})", self.capsule.id().as_str())
    }
}

/// A shell (or command) on a pseudo-terminal, from `pty.create`: it believes a person types
/// into it. What it prints (stdout and stderr, with the terminal's line endings and escape
/// codes) comes as `bytes` chunks: to `on_data`, or by iterating over the handle (or
/// `next_chunk()`). Buffering, dropping the handle and pauses are as for `CommandHandle`.
#[pyclass(module = "capsule", name = "PtyHandle", frozen)]
pub(crate) struct PtyHandle {
    inner: capsule::PtyHandle,
    callbacks: Callbacks,
}

#[pymethods]
impl PtyHandle {
    /// The pid of the terminal's session leader (the shell) in the guest.
    #[getter]
    fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// Types `data` (bytes, or str as UTF-8) into the terminal: `b"ls\n"`, `b"\x03"` for
    /// Ctrl-C, `b"\x04"` for Ctrl-D...
    fn write(&self, py: Python<'_>, data: &Bound<'_, PyAny>) -> PyResult<()> {
        let data = data_arg("data", data)?;
        let inner = &self.inner;
        py.detach(|| inner.write(&data)).into_py(py)
    }

    /// Changes the terminal's size; its foreground programs get SIGWINCH.
    fn resize(&self, py: Python<'_>, rows: u16, cols: u16) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.resize(capsule::PtySize::new(rows, cols)))
            .into_py(py)
    }

    /// SIGKILL to the session's process group.
    fn kill(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.kill()).into_py(py)
    }

    /// Sends the signal numbered `signum` to the session's process group.
    fn signal(&self, py: Python<'_>, signum: i32) -> PyResult<()> {
        let signal = signal_arg(signum)?;
        let inner = &self.inner;
        py.detach(|| inner.signal(signal)).into_py(py)
    }

    /// Waits until the shell (or command) ends; its `CommandResult` (what the terminal
    /// showed that no iteration took is its `stdout`). With `timeout` (seconds),
    /// `capsule.TimeoutError` ("wait") if it has not ended by then. As `CommandHandle.wait`.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<CommandResult> {
        let timeout = timeout.map(|t| seconds("timeout", t)).transpose()?;
        let inner = &self.inner;
        let result = poll(py, timeout, |slice| inner.wait_timeout(slice))?;
        Ok(CommandResult::from(self.callbacks.settle(py, result)?))
    }

    /// The next chunk of what the terminal shows (bytes), waiting for one; None once it
    /// ended and every chunk was taken. With `timeout` (seconds), `capsule.TimeoutError`
    /// ("wait") if none came in time. Iterating over the handle does the same.
    #[pyo3(signature = (timeout=None))]
    fn next_chunk<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let timeout = timeout.map(|t| seconds("timeout", t)).transpose()?;
        let inner = &self.inner;
        let chunk = poll(py, timeout, |slice| inner.output().recv_timeout(slice))?.into_py(py)?;
        Ok(chunk.map(|c| PyBytes::new(py, c.bytes())))
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyBytes>>> {
        self.next_chunk(py, None)
    }

    fn __repr__(&self) -> String {
        format!("PtyHandle(pid={})", self.inner.pid())
    }
}
