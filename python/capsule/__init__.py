"""capsule: in-process KVM sandboxes for Python.

A capsule is a KVM microVM whose vCPUs are threads of this process: no daemon. Create one,
run commands in it, pause it to disk and resume it, publish it as a template, fork it, and
destroy it::

    from capsule import Capsule

    capsule = Capsule(template="minimal", timeout=120, wait=True)
    capsule.commands.run("echo train")
    capsule.pause()
    capsule.resume()
    capsule.destroy()

Talk to what runs in it (Linux capsules): background commands with stdin, signals and
streamed output, files, terminals::

    build = capsule.commands.run("make", background=True,
                                 on_stdout=lambda text: print(text, end=""))
    build.wait()
    capsule.files.write("/work/in.txt", "hello")
    shell = capsule.pty.create(rows=24, cols=80)
    shell.write(b"ls\n")

``Capsule(...)`` uses the process-wide default engine (``default_engine()``);
``Engine(data_dir=...)`` opens another, whose ``create(...)`` and ``get(id)`` return capsules
bound to it. Blocking calls release the GIL; output callbacks are called with the GIL held,
on a thread of their command, never inside an engine lock. Errors are ``CapsuleError``
subclasses, one per kind of engine error (``NotFoundError``, ``TimeoutError``,
``InvalidStateError``, ``FileNotFoundError``...).

The Rust engine does the work (``capsule._native``, a PyO3 extension); this package adds the
Python-shaped layer (``capsule._api``).
"""

try:
    from . import _native  # noqa: F401
except ImportError as e:  # pragma: no cover - a source checkout without the extension
    raise ImportError(
        "capsule's native extension (capsule._native) is missing: this looks like the source "
        "folder python/capsule. Install the package with `pip install ./python` (from the "
        "repository root) and import it from outside the python/ folder."
    ) from e

from ._api import Capsule, Engine, default_engine
from ._native import (
    AgentError,
    BootTimeoutError,
    CapsuleError,
    CapsuleInfo,
    CommandHandle,
    CommandResult,
    Commands,
    DataDirLockedError,
    EntryInfo,
    FileError,
    FileExistsError,
    FileNotFoundError,
    Files,
    GuestCrashedError,
    HostInfo,
    HypervisorError,
    InvalidArgumentError,
    InvalidConfigError,
    InvalidIdError,
    InvalidStateError,
    IoError,
    IsADirectoryError,
    KvmUnavailableError,
    NotADirectoryError,
    NotFoundError,
    OsError,
    PermissionError,
    ProcessDetachedError,
    ProcessInfo,
    ProcessNotFoundError,
    Pty,
    PtyHandle,
    ResourceExhaustedError,
    SnapshotError,
    SnapshotMismatchError,
    SnapshotVersionError,
    TemplateInfo,
    TemplateInUseError,
    TemplateNotFoundError,
    TimeoutError,
    UnsupportedError,
    __version__,
)

__all__ = [
    "AgentError",
    "BootTimeoutError",
    "Capsule",
    "CapsuleError",
    "CapsuleInfo",
    "CommandHandle",
    "CommandResult",
    "Commands",
    "DataDirLockedError",
    "Engine",
    "EntryInfo",
    "FileError",
    "FileExistsError",
    "FileNotFoundError",
    "Files",
    "GuestCrashedError",
    "HostInfo",
    "HypervisorError",
    "InvalidArgumentError",
    "InvalidConfigError",
    "InvalidIdError",
    "InvalidStateError",
    "IoError",
    "IsADirectoryError",
    "KvmUnavailableError",
    "NotADirectoryError",
    "NotFoundError",
    "OsError",
    "PermissionError",
    "ProcessDetachedError",
    "ProcessInfo",
    "ProcessNotFoundError",
    "Pty",
    "PtyHandle",
    "ResourceExhaustedError",
    "SnapshotError",
    "SnapshotMismatchError",
    "SnapshotVersionError",
    "TemplateInUseError",
    "TemplateInfo",
    "TemplateNotFoundError",
    "TimeoutError",
    "UnsupportedError",
    "__version__",
    "default_engine",
]
