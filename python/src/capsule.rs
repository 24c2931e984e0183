//! The native capsule handle. The Python class `capsule.Capsule` wraps it (its methods also
//! work on the class with an id); this one is what every call ends in.

use pyo3::prelude::*;

use crate::commands::Commands;
use crate::errors::{seconds, IntoPy};
use crate::files::Files;
use crate::info::{CapsuleInfo, TemplateInfo};
use crate::pty::Pty;

/// A handle to one capsule of an engine (the native half of `capsule.Capsule`). Every
/// blocking call releases the GIL. Dropping the handle does not destroy the capsule.
#[pyclass(module = "capsule._native", name = "Capsule", frozen)]
pub(crate) struct Capsule {
    pub(crate) inner: capsule::Capsule,
}

impl Capsule {
    pub(crate) fn new(inner: capsule::Capsule) -> Self {
        Capsule { inner }
    }
}

#[pymethods]
impl Capsule {
    /// The capsule's id, `"cl-"` followed by lowercase letters and digits.
    #[getter]
    fn capsule_id(&self) -> &str {
        self.inner.id().as_str()
    }

    /// Its status now: "pending", "starting", "running", "paused", "stopped" or "error".
    #[getter]
    fn status(&self, py: Python<'_>) -> &'static str {
        let inner = &self.inner;
        py.detach(|| inner.status().as_str())
    }

    /// Runs commands in the capsule (a new `Commands` bound to it).
    #[getter]
    fn commands(&self) -> Commands {
        Commands {
            capsule: self.inner.clone(),
        }
    }

    /// Reads, writes and manages files in the capsule (a new `Files` bound to it; Linux
    /// capsules).
    #[getter]
    fn files(&self) -> Files {
        Files::new(self.inner.clone())
    }

    /// Runs shells on pseudo-terminals in the capsule (a new `Pty` bound to it; Linux
    /// capsules).
    #[getter]
    fn pty(&self) -> Pty {
        Pty {
            capsule: self.inner.clone(),
        }
    }

    /// Blocks until the capsule is running, waking when its status changes and at least
    /// every `interval` seconds. Raises `capsule.TimeoutError` (a builtin `TimeoutError`)
    /// if it is not running within `timeout` seconds, and at once `GuestCrashedError` or
    /// `InvalidStateError` (both builtin `RuntimeError`s) if it is or becomes in error,
    /// stopped or paused.
    #[pyo3(signature = (timeout=30.0, interval=0.5))]
    fn wait_ready(&self, py: Python<'_>, timeout: f64, interval: f64) -> PyResult<()> {
        let timeout = seconds("timeout", timeout)?;
        let interval = seconds("interval", interval)?;
        let inner = &self.inner;
        py.detach(|| inner.wait_ready(timeout, interval))
            .into_py(py)
    }

    /// Whether the capsule is running now.
    fn is_running(&self, py: Python<'_>) -> bool {
        let inner = &self.inner;
        py.detach(|| inner.is_running())
    }

    /// Everything known about the capsule now, as a `CapsuleInfo`.
    fn get_info(&self, py: Python<'_>) -> CapsuleInfo {
        let inner = &self.inner;
        py.detach(|| inner.info()).into()
    }

    /// Pauses the capsule: waits for running commands, writes its whole state to the
    /// engine's data directory and releases its VM. Pausing a paused capsule does nothing.
    fn pause(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.pause()).into_py(py)
    }

    /// Resumes a paused capsule exactly where it was. Resuming a running one does nothing.
    fn resume(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.resume()).into_py(py)
    }

    /// Stops the capsule and deletes everything it holds; irreversible. Destroying a
    /// destroyed capsule does nothing.
    fn destroy(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.destroy()).into_py(py)
    }

    /// Counts as activity: resets the inactivity (auto-pause) timer. Raises
    /// `InvalidStateError` unless the capsule is running.
    fn ping(&self, py: Python<'_>) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.ping()).into_py(py)
    }

    /// Publishes the capsule's current state as the template `name`; the capsule keeps
    /// running. Returns the template's `TemplateInfo`.
    fn snapshot(&self, py: Python<'_>, name: &str) -> PyResult<TemplateInfo> {
        let inner = &self.inner;
        Ok(py.detach(|| inner.snapshot(name)).into_py(py)?.into())
    }

    /// `n` new running capsules in this capsule's exact state (it must be running or
    /// paused, and is not changed). All or nothing.
    fn fork(&self, py: Python<'_>, n: usize) -> PyResult<Vec<Capsule>> {
        let inner = &self.inner;
        let forks = py.detach(|| inner.fork(n)).into_py(py)?;
        Ok(forks.into_iter().map(Capsule::new).collect())
    }

    /// The guest's serial console output so far (Linux capsules; empty for the probe).
    fn console_log(&self, py: Python<'_>) -> String {
        let inner = &self.inner;
        py.detach(|| inner.console_log())
    }

    fn __repr__(&self) -> String {
        format!("Capsule(capsule_id={:?})", self.inner.id().as_str())
    }
}
