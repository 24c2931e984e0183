//! The native engine. The Python class `capsule.Engine` wraps it so that what it returns are
//! `capsule.Capsule` objects; the process-wide default engine lives in `capsule`'s Python
//! code.

use std::path::PathBuf;

use pyo3::prelude::*;

use crate::capsule::Capsule;
use crate::errors::{seconds, to_py, IntoPy};
use crate::info::{CapsuleInfo, HostInfo, TemplateInfo};

/// An engine: KVM plus a data directory of capsules and templates (the native half of
/// `capsule.Engine`). Every blocking call releases the GIL.
#[pyclass(module = "capsule._native", name = "Engine", frozen)]
pub(crate) struct Engine {
    pub(crate) inner: capsule::Engine,
}

/// A capsule id from text, or `InvalidIdError`.
fn parse_id(py: Python<'_>, id: &str) -> PyResult<capsule::CapsuleId> {
    id.parse::<capsule::CapsuleId>()
        .map_err(|e| to_py(py, e.into()))
}

#[pymethods]
impl Engine {
    /// Opens KVM and the data directory `data_dir` (default: `$XDG_DATA_HOME/capsule`, or
    /// `~/.local/share/capsule`), and lists the capsules a previous engine left there. One
    /// engine at a time may hold a data directory (`DataDirLockedError`).
    ///
    /// Keyword settings (None keeps the engine's default): `max_capsules` and
    /// `max_memory_mb` (admission limits), `max_concurrent_starts`, `boot_timeout` and
    /// `idle_check_interval` (seconds), `shell_pool_size`, `linux_images` (folder of the
    /// Linux images), `kvm_path`, and `seccomp` (filters on the engine's vCPU threads).
    #[new]
    #[pyo3(signature = (
        data_dir=None,
        *,
        max_capsules=None,
        max_memory_mb=None,
        max_concurrent_starts=None,
        boot_timeout=None,
        idle_check_interval=None,
        shell_pool_size=None,
        linux_images=None,
        kvm_path=None,
        seccomp=None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        data_dir: Option<PathBuf>,
        max_capsules: Option<usize>,
        max_memory_mb: Option<u64>,
        max_concurrent_starts: Option<usize>,
        boot_timeout: Option<f64>,
        idle_check_interval: Option<f64>,
        shell_pool_size: Option<usize>,
        linux_images: Option<PathBuf>,
        kvm_path: Option<PathBuf>,
        seccomp: Option<bool>,
    ) -> PyResult<Self> {
        let mut config = capsule::EngineConfig::builder();
        if let Some(dir) = data_dir {
            config = config.data_dir(dir);
        }
        if let Some(n) = max_capsules {
            config = config.max_capsules(n);
        }
        if let Some(mb) = max_memory_mb {
            config = config.max_memory_mb(mb);
        }
        if let Some(n) = max_concurrent_starts {
            config = config.max_concurrent_starts(n);
        }
        if let Some(t) = boot_timeout {
            config = config.boot_timeout(seconds("boot_timeout", t)?);
        }
        if let Some(t) = idle_check_interval {
            config = config.idle_check_interval(seconds("idle_check_interval", t)?);
        }
        if let Some(n) = shell_pool_size {
            config = config.shell_pool_size(n);
        }
        if let Some(dir) = linux_images {
            config = config.linux_images(dir);
        }
        if let Some(path) = kvm_path {
            config = config.kvm_path(path);
        }
        if let Some(on) = seccomp {
            config = config.seccomp(on);
        }
        let inner = py.detach(|| capsule::Engine::new(config)).into_py(py)?;
        Ok(Engine { inner })
    }

    /// Creates a capsule from `template` ("probe", "minimal", or a template made with
    /// `snapshot`). `timeout`: seconds without activity after which it is paused (None or
    /// 0: never). With `wait` this returns once it is running (or raises why it did not
    /// start, leaving nothing behind); without, it returns at once and the capsule boots in
    /// the background (see `wait_ready`). `vcpus` and `memory_mb` default to the template's.
    #[pyo3(signature = (template="minimal", timeout=None, wait=false, vcpus=None, memory_mb=None))]
    fn create(
        &self,
        py: Python<'_>,
        template: &str,
        timeout: Option<f64>,
        wait: bool,
        vcpus: Option<u32>,
        memory_mb: Option<u64>,
    ) -> PyResult<Capsule> {
        let mut config = capsule::CapsuleConfig::builder(template).wait(wait);
        if let Some(t) = timeout {
            config = config.timeout(seconds("timeout", t)?);
        }
        if let Some(n) = vcpus {
            config = config.vcpus(n);
        }
        if let Some(mb) = memory_mb {
            config = config.memory_mb(mb);
        }
        let inner = &self.inner;
        let capsule = py.detach(|| inner.create(config)).into_py(py)?;
        Ok(Capsule::new(capsule))
    }

    /// A handle to the capsule `capsule_id`, in whatever status it is. Raises
    /// `NotFoundError` (or `InvalidIdError` for text that is not an id).
    fn get(&self, py: Python<'_>, capsule_id: &str) -> PyResult<Capsule> {
        let id = parse_id(py, capsule_id)?;
        let inner = &self.inner;
        Ok(Capsule::new(py.detach(|| inner.get(&id)).into_py(py)?))
    }

    /// A handle to the capsule `capsule_id`, resumed first if it was paused.
    fn connect(&self, py: Python<'_>, capsule_id: &str) -> PyResult<Capsule> {
        let id = parse_id(py, capsule_id)?;
        let inner = &self.inner;
        Ok(Capsule::new(py.detach(|| inner.connect(&id)).into_py(py)?))
    }

    /// Pauses the capsule `capsule_id` (see `Capsule.pause`).
    fn pause(&self, py: Python<'_>, capsule_id: &str) -> PyResult<()> {
        let id = parse_id(py, capsule_id)?;
        let inner = &self.inner;
        py.detach(|| inner.pause(&id)).into_py(py)
    }

    /// Resumes the capsule `capsule_id` (see `Capsule.resume`).
    fn resume(&self, py: Python<'_>, capsule_id: &str) -> PyResult<()> {
        let id = parse_id(py, capsule_id)?;
        let inner = &self.inner;
        py.detach(|| inner.resume(&id)).into_py(py)
    }

    /// Destroys the capsule `capsule_id`. Raises `NotFoundError` if there is none.
    fn destroy(&self, py: Python<'_>, capsule_id: &str) -> PyResult<()> {
        let id = parse_id(py, capsule_id)?;
        let inner = &self.inner;
        py.detach(|| inner.destroy(&id)).into_py(py)
    }

    /// Forks the capsule `capsule_id` into `n` new running capsules (see `Capsule.fork`).
    fn fork(&self, py: Python<'_>, capsule_id: &str, n: usize) -> PyResult<Vec<Capsule>> {
        let id = parse_id(py, capsule_id)?;
        let inner = &self.inner;
        let forks = py.detach(|| inner.fork(&id, n)).into_py(py)?;
        Ok(forks.into_iter().map(Capsule::new).collect())
    }

    /// A `CapsuleInfo` for every capsule of the engine, oldest first.
    fn list(&self, py: Python<'_>) -> Vec<CapsuleInfo> {
        let inner = &self.inner;
        let infos = py.detach(|| inner.list());
        infos.into_iter().map(CapsuleInfo::from).collect()
    }

    /// A `TemplateInfo` for every template in the data directory (the built-in "probe"
    /// and "minimal" are not listed).
    fn templates(&self, py: Python<'_>) -> PyResult<Vec<TemplateInfo>> {
        let inner = &self.inner;
        let templates = py.detach(|| inner.templates()).into_py(py)?;
        Ok(templates.into_iter().map(TemplateInfo::from).collect())
    }

    /// Deletes the template `name`. Raises `TemplateInUseError` while running capsules map
    /// it, `TemplateNotFoundError` if there is none.
    fn delete_template(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        let inner = &self.inner;
        py.detach(|| inner.delete_template(name)).into_py(py)
    }

    /// The engine's data directory.
    #[getter]
    fn data_dir(&self) -> PathBuf {
        self.inner.config().data_dir().to_path_buf()
    }

    /// What the host's KVM is (`HostInfo`).
    #[getter]
    fn host(&self) -> HostInfo {
        HostInfo::from(self.inner.host())
    }

    fn __repr__(&self) -> String {
        format!(
            "Engine(data_dir={:?})",
            self.inner.config().data_dir().display().to_string()
        )
    }
}
