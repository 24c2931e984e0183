//! Plain data returned to Python: what is known about a capsule, a template and the host.
//! Immutable snapshots of the moment they were taken.

use std::time::SystemTime;

use pyo3::prelude::*;

/// Everything known about a capsule at the moment `get_info()` (or `list()`) was called.
#[pyclass(module = "capsule", name = "CapsuleInfo", frozen)]
pub(crate) struct CapsuleInfo {
    /// The capsule's id (`"cl-…"`).
    #[pyo3(get)]
    capsule_id: String,
    /// Its status: "pending", "starting", "running", "paused", "stopped" or "error".
    #[pyo3(get)]
    status: &'static str,
    /// The template it was created from.
    #[pyo3(get)]
    template: String,
    /// Number of vCPUs.
    #[pyo3(get)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[pyo3(get)]
    memory_mb: u64,
    /// Inactivity timeout in seconds after which it is paused (0: never).
    #[pyo3(get)]
    timeout: f64,
    /// Why it is in "error", when it is; otherwise None.
    #[pyo3(get)]
    error: Option<String>,
    /// How its guest ended, when it stopped by itself (a power-off, reboot or triple
    /// fault: one shutdown exit, with where the vCPU was); otherwise None.
    #[pyo3(get)]
    ended: Option<String>,
    created: SystemTime,
    last_active: SystemTime,
}

impl From<capsule::CapsuleInfo> for CapsuleInfo {
    fn from(info: capsule::CapsuleInfo) -> Self {
        CapsuleInfo {
            capsule_id: info.id.as_str().to_owned(),
            status: info.status.as_str(),
            template: info.template,
            vcpus: info.vcpus,
            memory_mb: info.memory_mb,
            timeout: info.timeout.as_secs_f64(),
            error: info.error,
            ended: info.ended,
            created: info.created_at,
            last_active: info.last_activity,
        }
    }
}

#[pymethods]
impl CapsuleInfo {
    /// When the capsule was created (a timezone-aware UTC datetime).
    #[getter]
    fn created_at(&self) -> SystemTime {
        self.created
    }

    /// When it last ran a command or was pinged (or was created), as a UTC datetime.
    #[getter]
    fn last_activity(&self) -> SystemTime {
        self.last_active
    }

    fn __repr__(&self) -> String {
        format!(
            "CapsuleInfo(capsule_id={:?}, status={:?}, template={:?}, vcpus={}, memory_mb={})",
            self.capsule_id, self.status, self.template, self.vcpus, self.memory_mb
        )
    }
}

/// A template: a frozen capsule that new capsules start from (`Capsule(template=name)`),
/// sharing its memory copy-on-write.
#[pyclass(module = "capsule", name = "TemplateInfo", frozen)]
pub(crate) struct TemplateInfo {
    /// Its name: what `Capsule(template=...)` takes.
    #[pyo3(get)]
    name: String,
    /// vCPUs of capsules started from it.
    #[pyo3(get)]
    vcpus: u32,
    /// Memory of capsules started from it, in MiB.
    #[pyo3(get)]
    memory_mb: u64,
    /// Bytes its files occupy on disk (memory layers are sparse).
    #[pyo3(get)]
    disk_bytes: u64,
    created: SystemTime,
}

impl From<capsule::TemplateInfo> for TemplateInfo {
    fn from(t: capsule::TemplateInfo) -> Self {
        TemplateInfo {
            name: t.name,
            vcpus: t.vcpus,
            memory_mb: t.memory_mb,
            disk_bytes: t.disk_bytes,
            created: t.created_at,
        }
    }
}

#[pymethods]
impl TemplateInfo {
    /// When it was published (a timezone-aware UTC datetime).
    #[getter]
    fn created_at(&self) -> SystemTime {
        self.created
    }

    fn __repr__(&self) -> String {
        format!(
            "TemplateInfo(name={:?}, vcpus={}, memory_mb={}, disk_bytes={})",
            self.name, self.vcpus, self.memory_mb, self.disk_bytes
        )
    }
}

/// What the host's KVM is, as `Engine.host` reports it.
#[pyclass(module = "capsule", name = "HostInfo", frozen)]
pub(crate) struct HostInfo {
    /// How guests run: "vmx" (Intel VT-x), "svm" (AMD-V), "pvm" (software KVM: only the
    /// probe runs at speed) or "unknown".
    #[pyo3(get)]
    virtualization: &'static str,
    /// The same in words.
    #[pyo3(get)]
    description: String,
    /// Whether a Linux capsule ("minimal") can boot here (hardware virtualization).
    #[pyo3(get)]
    can_boot_linux: bool,
    /// The most vCPUs KVM allows in one VM.
    #[pyo3(get)]
    max_vcpus: usize,
}

impl From<&capsule::HostInfo> for HostInfo {
    fn from(host: &capsule::HostInfo) -> Self {
        use capsule::Virtualization as V;
        HostInfo {
            virtualization: match host.virtualization {
                V::HardwareVmx => "vmx",
                V::HardwareSvm => "svm",
                V::Pvm => "pvm",
                _ => "unknown",
            },
            description: host.virtualization.to_string(),
            can_boot_linux: host.can_boot_linux(),
            max_vcpus: host.max_vcpus,
        }
    }
}

#[pymethods]
impl HostInfo {
    fn __repr__(&self) -> String {
        format!(
            "HostInfo(virtualization={:?}, can_boot_linux={}, max_vcpus={})",
            self.virtualization,
            if self.can_boot_linux { "True" } else { "False" },
            self.max_vcpus
        )
    }
}
