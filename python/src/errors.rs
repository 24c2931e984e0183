//! The engine's errors as Python exceptions: one class per kind of [`capsule::Error`], all
//! under `capsule.CapsuleError`, each also under the builtin that Python code would catch for
//! that kind (`TimeoutError`, `RuntimeError`, `ValueError`, `OSError` and its
//! `FileNotFoundError`...). The message is the Rust error's own; the facts it carries (ids,
//! statuses, limits, guest paths) are attributes of the exception. A guest file error is a
//! `FileError` with its `kind`, raised as the subclass that mirrors the builtin for that kind
//! where there is one (`capsule.FileNotFoundError` is also a builtin `FileNotFoundError`).
//!
//! The classes are made with Python's `type()` when the module is first imported, because
//! `capsule.TimeoutError` needs two bases (`CapsuleError` and the builtin `TimeoutError`).

use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyTuple, PyType};

/// One exception class: its name, its bases (earlier classes of [`CLASSES`] or builtins) and
/// its docstring.
struct ClassDef {
    name: &'static str,
    bases: &'static [&'static str],
    doc: &'static str,
}

/// Indices into [`CLASSES`].
#[derive(Clone, Copy)]
enum Kind {
    Capsule = 0,
    NotFound,
    TemplateNotFound,
    Timeout,
    BootTimeout,
    InvalidState,
    GuestCrashed,
    InvalidConfig,
    InvalidArgument,
    InvalidId,
    Unsupported,
    ResourceExhausted,
    KvmUnavailable,
    TemplateInUse,
    DataDirLocked,
    Snapshot,
    SnapshotVersion,
    SnapshotMismatch,
    Hypervisor,
    Agent,
    Io,
    Os,
    File,
    FileNotFound,
    IsADirectory,
    NotADirectory,
    FileExists,
    Permission,
    ProcessDetached,
    ProcessNotFound,
}

/// Every exception class, in [`Kind`] order; bases come before the classes deriving from them.
const CLASSES: &[ClassDef] = &[
    ClassDef {
        name: "CapsuleError",
        bases: &["Exception"],
        doc: "Base class of every error the capsule engine reports. `str(e)` is the engine's \
              message.",
    },
    ClassDef {
        name: "NotFoundError",
        bases: &["CapsuleError"],
        doc: "No capsule has this id (it never existed, or it was destroyed). Attribute: \
              `capsule_id`.",
    },
    ClassDef {
        name: "TemplateNotFoundError",
        bases: &["NotFoundError"],
        doc: "No template has this name. Attribute: `name`.",
    },
    ClassDef {
        name: "TimeoutError",
        bases: &["CapsuleError", "TimeoutError"],
        doc: "A command or a wait did not finish in time; also a builtin `TimeoutError`. \
              Attributes: `timeout_kind` (\"command\": the command was killed and the capsule \
              is still usable; \"wait\": a wait for a background command or its output ran \
              out, the command runs on; \"file\": the guest did not answer a file request; \
              \"wait_ready\"; \"boot\" for a `BootTimeoutError`) and `after` (the limit, in \
              seconds).",
    },
    ClassDef {
        name: "BootTimeoutError",
        bases: &["TimeoutError"],
        doc: "The guest did not become ready within the engine's boot timeout; nothing is \
              left running. Attributes: `capsule_id`, `after`, `console` (the end of its \
              serial console) and `state` (where each vCPU and virtio queue was).",
    },
    ClassDef {
        name: "InvalidStateError",
        bases: &["CapsuleError", "RuntimeError"],
        doc: "The capsule is not in a status that allows the operation (for example running \
              a command in a paused capsule); also a builtin `RuntimeError`. Attributes: \
              `capsule_id`, `status`, `operation`.",
    },
    ClassDef {
        name: "GuestCrashedError",
        bases: &["CapsuleError", "RuntimeError"],
        doc: "The guest crashed (triple fault, KVM error...): the capsule is in \"error\" and \
              every call on it reports this; also a builtin `RuntimeError`. Attributes: \
              `capsule_id`, `reason`.",
    },
    ClassDef {
        name: "InvalidConfigError",
        bases: &["CapsuleError", "ValueError"],
        doc: "A configuration value is out of range or unknown (0 vCPUs, too little memory, \
              an unknown template...); also a builtin `ValueError`.",
    },
    ClassDef {
        name: "InvalidArgumentError",
        bases: &["CapsuleError", "ValueError"],
        doc: "An argument is unusable (a command longer than the guest accepts, a bad \
              template name...); also a builtin `ValueError`.",
    },
    ClassDef {
        name: "InvalidIdError",
        bases: &["CapsuleError", "ValueError"],
        doc: "The text is not a capsule id (`cl-` followed by lowercase letters and digits); \
              also a builtin `ValueError`. Attribute: `capsule_id`.",
    },
    ClassDef {
        name: "UnsupportedError",
        bases: &["CapsuleError"],
        doc: "The host or the guest kind cannot do this (booting Linux without hardware \
              virtualization, pausing or forking a Linux capsule).",
    },
    ClassDef {
        name: "ResourceExhaustedError",
        bases: &["CapsuleError"],
        doc: "An engine limit (`max_capsules`, `max_memory_mb`) or a host resource is used \
              up; nothing was left behind. Attributes: `resource` (\"capsules\", \
              \"memory_mb\", \"file_descriptors\", \"threads\", \"host_memory\"), `in_use`, \
              `limit` (or None).",
    },
    ClassDef {
        name: "KvmUnavailableError",
        bases: &["CapsuleError"],
        doc: "KVM cannot be used on this host. Attributes: `path`, `reason` (\"missing\", \
              \"permission_denied\", \"not_kvm\", \"other\").",
    },
    ClassDef {
        name: "TemplateInUseError",
        bases: &["CapsuleError"],
        doc: "The template cannot be deleted while running capsules map its memory. \
              Attributes: `name`, `capsules`.",
    },
    ClassDef {
        name: "DataDirLockedError",
        bases: &["CapsuleError"],
        doc: "Another engine (in this or another process) has the data directory open. \
              Attribute: `path`.",
    },
    ClassDef {
        name: "SnapshotError",
        bases: &["CapsuleError"],
        doc: "A snapshot or template on disk is missing, corrupt or could not be written; \
              nothing that was valid before is lost.",
    },
    ClassDef {
        name: "SnapshotVersionError",
        bases: &["SnapshotError"],
        doc: "A snapshot was written with a layout this engine does not read. Attributes: \
              `found`, `supported`.",
    },
    ClassDef {
        name: "SnapshotMismatchError",
        bases: &["SnapshotError"],
        doc: "A snapshot does not describe this capsule (another guest kind, vCPU count or \
              memory size); the capsule stays as it was.",
    },
    ClassDef {
        name: "HypervisorError",
        bases: &["CapsuleError"],
        doc: "The hypervisor layer failed (a KVM ioctl, guest memory, building the machine).",
    },
    ClassDef {
        name: "AgentError",
        bases: &["CapsuleError"],
        doc: "The in-guest agent of a Linux capsule refused a request or broke its protocol. \
              Attributes: `capsule_id`, `reason`.",
    },
    ClassDef {
        name: "IoError",
        bases: &["CapsuleError"],
        doc: "A file-system operation of the engine failed. Attributes: `operation`, `path`, \
              `errno` (or None).",
    },
    ClassDef {
        name: "OsError",
        bases: &["CapsuleError"],
        doc: "The host refused the engine a resource (a thread, a file descriptor...). \
              Attributes: `operation`, `errno` (or None).",
    },
    ClassDef {
        name: "FileError",
        bases: &["CapsuleError", "OSError"],
        doc: "A file operation in a Linux capsule (`capsule.files`) failed in the guest; also \
              a builtin `OSError`. Attributes: `path` (the guest path), `kind` (\"not_found\", \
              \"is_a_directory\", \"not_a_directory\", \"permission_denied\", \"no_space\", \
              \"already_exists\", \"directory_not_empty\", \"invalid_data\", \"other\") and \
              `message` (what the guest's OS reported). The kinds with a builtin counterpart \
              raise a subclass: `FileNotFoundError`, `IsADirectoryError`, \
              `NotADirectoryError`, `FileExistsError`, `PermissionError`.",
    },
    ClassDef {
        name: "FileNotFoundError",
        bases: &["FileError", "FileNotFoundError"],
        doc: "No such guest file or directory (`kind` \"not_found\"); also a builtin \
              `FileNotFoundError`.",
    },
    ClassDef {
        name: "IsADirectoryError",
        bases: &["FileError", "IsADirectoryError"],
        doc: "A guest directory where a file was expected (`kind` \"is_a_directory\"); also a \
              builtin `IsADirectoryError`.",
    },
    ClassDef {
        name: "NotADirectoryError",
        bases: &["FileError", "NotADirectoryError"],
        doc: "A guest path component that is not a directory, or a file listed as one \
              (`kind` \"not_a_directory\"); also a builtin `NotADirectoryError`.",
    },
    ClassDef {
        name: "FileExistsError",
        bases: &["FileError", "FileExistsError"],
        doc: "Something is in the way in the guest: a file where a directory was to be made \
              (`kind` \"already_exists\"); also a builtin `FileExistsError`.",
    },
    ClassDef {
        name: "PermissionError",
        bases: &["FileError", "PermissionError"],
        doc: "The guest refused access: permission denied or a read-only file system \
              (`kind` \"permission_denied\"); also a builtin `PermissionError`.",
    },
    ClassDef {
        name: "ProcessDetachedError",
        bases: &["CapsuleError", "RuntimeError"],
        doc: "A `CommandHandle` (or `PtyHandle`) no longer receives its process's output and \
              exit: the capsule was paused, or another handle connected to the process. The \
              process runs on: once the capsule runs, `commands.connect(pid)` gives a new \
              handle. Also a builtin `RuntimeError`. Attributes: `capsule_id`, `pid`, \
              `reason`.",
    },
    ClassDef {
        name: "ProcessNotFoundError",
        bases: &["NotFoundError", "ProcessLookupError"],
        doc: "The capsule's guest agent tracks no process with this pid (it never started \
              one, or the process ended and its exit was reported); also a builtin \
              `ProcessLookupError`. Attributes: `capsule_id`, `pid`.",
    },
];

static TYPES: PyOnceLock<Vec<Py<PyType>>> = PyOnceLock::new();

/// The exception classes, made on first use.
fn types(py: Python<'_>) -> PyResult<&Vec<Py<PyType>>> {
    TYPES.get_or_try_init(py, || {
        let builtins = py.import("builtins")?;
        let make_type = builtins.getattr("type")?;
        let mut made: Vec<Py<PyType>> = Vec::with_capacity(CLASSES.len());
        for class in CLASSES {
            let mut bases = Vec::with_capacity(class.bases.len());
            for base in class.bases {
                let ours = CLASSES[..made.len()].iter().position(|c| c.name == *base);
                bases.push(match ours {
                    Some(i) => made[i].bind(py).clone().into_any(),
                    None => builtins.getattr(*base)?,
                });
            }
            let namespace = PyDict::new(py);
            namespace.set_item("__module__", "capsule")?;
            namespace.set_item("__doc__", class.doc)?;
            let class = make_type
                .call1((class.name, PyTuple::new(py, bases)?, namespace))?
                .cast_into::<PyType>()?;
            made.push(class.unbind());
        }
        Ok(made)
    })
}

/// Adds every exception class to the module `m`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    for (class, ty) in CLASSES.iter().zip(types(m.py())?) {
        m.add(class.name, ty.bind(m.py()))?;
    }
    Ok(())
}

/// A `ValueError` for a number of seconds that is negative, infinite or not a number.
fn bad_seconds(what: &str, value: f64) -> PyErr {
    PyValueError::new_err(format!(
        "{what} must be a finite, non-negative number of seconds, not {value}"
    ))
}

/// `value` seconds as a [`Duration`], or a `ValueError` naming `what`.
pub(crate) fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value).map_err(|_| bad_seconds(what, value))
}

/// The Python exception for an engine error.
pub(crate) fn to_py(py: Python<'_>, error: capsule::Error) -> PyErr {
    match build(py, &error) {
        Ok(err) | Err(err) => err,
    }
}

/// Turns an engine result into a Python one (see [`to_py`]).
pub(crate) trait IntoPy<T> {
    /// The value, or the engine's error as its Python exception.
    fn into_py(self, py: Python<'_>) -> PyResult<T>;
}

impl<T> IntoPy<T> for capsule::Result<T> {
    fn into_py(self, py: Python<'_>) -> PyResult<T> {
        self.map_err(|e| to_py(py, e))
    }
}

/// The exception instance for `error`, with its attributes set.
fn build(py: Python<'_>, error: &capsule::Error) -> PyResult<PyErr> {
    use capsule::Error as E;
    let kind = match error {
        E::NotFound(_) => Kind::NotFound,
        E::TemplateNotFound(_) => Kind::TemplateNotFound,
        E::Timeout { .. } => Kind::Timeout,
        E::BootTimeout { .. } => Kind::BootTimeout,
        E::InvalidState { .. } => Kind::InvalidState,
        E::GuestCrashed { .. } => Kind::GuestCrashed,
        E::InvalidConfig(_) => Kind::InvalidConfig,
        E::InvalidArgument(_) => Kind::InvalidArgument,
        E::InvalidId(_) => Kind::InvalidId,
        E::Unsupported(_) => Kind::Unsupported,
        E::ResourceExhausted { .. } => Kind::ResourceExhausted,
        E::KvmUnavailable { .. } => Kind::KvmUnavailable,
        E::TemplateInUse { .. } => Kind::TemplateInUse,
        E::DataDirLocked(_) => Kind::DataDirLocked,
        E::Snapshot(_) => Kind::Snapshot,
        E::SnapshotVersion { .. } => Kind::SnapshotVersion,
        E::SnapshotMismatch(_) => Kind::SnapshotMismatch,
        E::Hypervisor(_) => Kind::Hypervisor,
        E::Agent { .. } => Kind::Agent,
        E::Io { .. } => Kind::Io,
        E::Os { .. } => Kind::Os,
        E::File { kind, .. } => match kind {
            capsule::FileErrorKind::NotFound => Kind::FileNotFound,
            capsule::FileErrorKind::IsADirectory => Kind::IsADirectory,
            capsule::FileErrorKind::NotADirectory => Kind::NotADirectory,
            capsule::FileErrorKind::AlreadyExists => Kind::FileExists,
            capsule::FileErrorKind::PermissionDenied => Kind::Permission,
            _ => Kind::File,
        },
        E::ProcessDetached { .. } => Kind::ProcessDetached,
        E::ProcessNotFound { .. } => Kind::ProcessNotFound,
        _ => Kind::Capsule,
    };
    let exc = types(py)?[kind as usize]
        .bind(py)
        .call1((error.to_string(),))?;
    let set = |name: &str, value: Bound<'_, PyAny>| exc.setattr(name, value);
    let any = |v: &dyn ToAny| v.to_any(py);
    match error {
        E::NotFound(id) => set("capsule_id", any(&id.as_str()))?,
        E::TemplateNotFound(name) => set("name", any(&name.as_str()))?,
        E::Timeout { kind, after } => {
            let kind = match kind {
                capsule::TimeoutKind::Command => "command",
                capsule::TimeoutKind::WaitReady => "wait_ready",
                capsule::TimeoutKind::Wait => "wait",
                capsule::TimeoutKind::File => "file",
                _ => "other",
            };
            set("timeout_kind", any(&kind))?;
            set("after", any(&after.as_secs_f64()))?;
        }
        E::BootTimeout {
            id,
            after,
            console,
            state,
        } => {
            set("timeout_kind", any(&"boot"))?;
            set("after", any(&after.as_secs_f64()))?;
            set("capsule_id", any(&id.as_str()))?;
            set("console", any(&console.as_str()))?;
            set("state", state.clone().into_pyobject(py)?.into_any())?;
        }
        E::InvalidState {
            id,
            status,
            operation,
        } => {
            set("capsule_id", any(&id.as_str()))?;
            set("status", any(&status.as_str()))?;
            set("operation", any(operation))?;
        }
        E::GuestCrashed { id, reason } | E::Agent { id, reason } => {
            set("capsule_id", any(&id.as_str()))?;
            set("reason", any(&reason.as_str()))?;
        }
        E::InvalidId(text) => set("capsule_id", any(&text.as_str()))?,
        E::ResourceExhausted {
            resource,
            in_use,
            limit,
            ..
        } => {
            let resource = match resource {
                capsule::Resource::Capsules => "capsules",
                capsule::Resource::MemoryMb => "memory_mb",
                capsule::Resource::FileDescriptors => "file_descriptors",
                capsule::Resource::Threads => "threads",
                capsule::Resource::HostMemory => "host_memory",
                _ => "other",
            };
            set("resource", any(&resource))?;
            set("in_use", any(in_use))?;
            set("limit", (*limit).into_pyobject(py)?.into_any())?;
        }
        E::KvmUnavailable { path, kind, .. } => {
            let reason = match kind {
                capsule::KvmUnavailable::Missing => "missing",
                capsule::KvmUnavailable::PermissionDenied => "permission_denied",
                capsule::KvmUnavailable::NotKvm => "not_kvm",
                _ => "other",
            };
            set("path", path.into_pyobject(py)?)?;
            set("reason", any(&reason))?;
        }
        E::TemplateInUse { name, capsules } => {
            set("name", any(&name.as_str()))?;
            set("capsules", any(capsules))?;
        }
        E::DataDirLocked(path) => set("path", path.into_pyobject(py)?)?,
        E::SnapshotVersion { found, supported } => {
            set("found", any(found))?;
            set("supported", any(supported))?;
        }
        E::Io {
            op, path, source, ..
        } => {
            set("operation", any(op))?;
            set("path", path.into_pyobject(py)?)?;
            set("errno", source.raw_os_error().into_pyobject(py)?.into_any())?;
        }
        E::Os { op, source } => {
            set("operation", any(op))?;
            set("errno", source.raw_os_error().into_pyobject(py)?.into_any())?;
        }
        E::File {
            path,
            kind,
            message,
        } => {
            set("path", any(&path.as_str()))?;
            set("kind", any(&file_error_kind(*kind)))?;
            set("message", any(&message.as_str()))?;
        }
        E::ProcessDetached { id, pid, reason } => {
            set("capsule_id", any(&id.as_str()))?;
            set("pid", any(pid))?;
            set("reason", any(&reason.as_str()))?;
        }
        E::ProcessNotFound { id, pid } => {
            set("capsule_id", any(&id.as_str()))?;
            set("pid", any(pid))?;
        }
        _ => {}
    }
    Ok(PyErr::from_value(exc))
}

/// The Python name of a file error's kind (`FileError.kind`).
fn file_error_kind(kind: capsule::FileErrorKind) -> &'static str {
    use capsule::FileErrorKind as K;
    match kind {
        K::NotFound => "not_found",
        K::IsADirectory => "is_a_directory",
        K::NotADirectory => "not_a_directory",
        K::PermissionDenied => "permission_denied",
        K::NoSpace => "no_space",
        K::AlreadyExists => "already_exists",
        K::DirectoryNotEmpty => "directory_not_empty",
        K::InvalidData => "invalid_data",
        _ => "other",
    }
}

/// Plain values that become Python objects (to keep [`build`] short).
trait ToAny {
    fn to_any<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny>;
}

macro_rules! to_any {
    ($($t:ty),*) => {$(
        impl ToAny for $t {
            fn to_any<'py>(&self, py: Python<'py>) -> Bound<'py, PyAny> {
                // These conversions cannot fail.
                match (*self).into_pyobject(py) {
                    Ok(v) => v.into_any(),
                    Err(never) => match never {},
                }
            }
        }
    )*};
}

to_any!(&str, f64, u64, u32, usize);
