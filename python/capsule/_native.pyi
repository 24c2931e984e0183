"""Type stubs of ``capsule._native``, the PyO3 extension behind the ``capsule`` package.

Import ``capsule`` rather than this module: ``capsule.Capsule`` and ``capsule.Engine`` wrap
the native ``Capsule`` and ``Engine`` below.
"""

import builtins
from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import final

__version__: str
__all__ = [
    "AgentError",
    "BootTimeoutError",
    "Capsule",
    "CapsuleError",
    "CapsuleInfo",
    "CommandResult",
    "Commands",
    "DataDirLockedError",
    "Engine",
    "GuestCrashedError",
    "HostInfo",
    "HypervisorError",
    "InvalidArgumentError",
    "InvalidConfigError",
    "InvalidIdError",
    "InvalidStateError",
    "IoError",
    "KvmUnavailableError",
    "NotFoundError",
    "OsError",
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
    "_bench_create",
    "_bench_echo",
]

@final
class Engine:
    """An engine: KVM plus a data directory of capsules and templates (the native half of
    ``capsule.Engine``). Every blocking call releases the GIL."""

    def __new__(
        cls,
        data_dir: str | PathLike[str] | None = None,
        *,
        max_capsules: int | None = None,
        max_memory_mb: int | None = None,
        max_concurrent_starts: int | None = None,
        boot_timeout: float | None = None,
        idle_check_interval: float | None = None,
        shell_pool_size: int | None = None,
        linux_images: str | PathLike[str] | None = None,
        kvm_path: str | PathLike[str] | None = None,
        seccomp: bool | None = None,
    ) -> Engine:
        """Opens KVM and the data directory (see ``capsule.Engine``)."""

    def create(
        self,
        template: str = "minimal",
        timeout: float | None = None,
        wait: bool = False,
        vcpus: int | None = None,
        memory_mb: int | None = None,
    ) -> Capsule:
        """Creates a capsule (see ``capsule.Capsule``)."""

    def get(self, capsule_id: str) -> Capsule:
        """A handle to the capsule ``capsule_id``; ``NotFoundError`` if there is none."""

    def connect(self, capsule_id: str) -> Capsule:
        """A handle to the capsule ``capsule_id``, resumed first if it was paused."""

    def pause(self, capsule_id: str) -> None:
        """Pauses the capsule ``capsule_id``."""

    def resume(self, capsule_id: str) -> None:
        """Resumes the capsule ``capsule_id``."""

    def destroy(self, capsule_id: str) -> None:
        """Destroys the capsule ``capsule_id``; ``NotFoundError`` if there is none."""

    def fork(self, capsule_id: str, n: int) -> builtins.list[Capsule]:
        """Forks the capsule ``capsule_id`` into ``n`` new running capsules."""

    def list(self) -> builtins.list[CapsuleInfo]:
        """A ``CapsuleInfo`` for every capsule, oldest first."""

    def templates(self) -> builtins.list[TemplateInfo]:
        """A ``TemplateInfo`` for every template in the data directory."""

    def delete_template(self, name: str) -> None:
        """Deletes the template ``name``."""

    @property
    def data_dir(self) -> Path:
        """The engine's data directory."""

    @property
    def host(self) -> HostInfo:
        """What the host's KVM is."""

@final
class Capsule:
    """A handle to one capsule (the native half of ``capsule.Capsule``)."""

    @property
    def capsule_id(self) -> str:
        """The capsule's id."""

    @property
    def status(self) -> str:
        """Its status now."""

    @property
    def commands(self) -> Commands:
        """Runs commands in the capsule."""

    def wait_ready(self, timeout: float = 30.0, interval: float = 0.5) -> None:
        """Blocks until the capsule is running (see ``capsule.Capsule.wait_ready``)."""

    def is_running(self) -> bool:
        """Whether the capsule is running now."""

    def get_info(self) -> CapsuleInfo:
        """Everything known about the capsule now."""

    def pause(self) -> None:
        """Pauses the capsule."""

    def resume(self) -> None:
        """Resumes the capsule."""

    def destroy(self) -> None:
        """Destroys the capsule."""

    def ping(self) -> None:
        """Resets the inactivity timer."""

    def snapshot(self, name: str) -> TemplateInfo:
        """Publishes the capsule's state as the template ``name``."""

    def fork(self, n: int) -> list[Capsule]:
        """``n`` new running capsules in this capsule's exact state."""

    def console_log(self) -> str:
        """The guest's serial console output so far."""

@final
class Commands:
    """Runs commands in one capsule: ``capsule.commands.run("echo hi")``.

    Background commands, streaming callbacks, stdin and ``user`` are not here yet: they
    arrive with the engine's guest I/O work."""

    def run(
        self,
        cmd: str,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Runs ``cmd`` and returns its result once it has finished.

        ``env`` and ``cwd`` apply to Linux capsules (``/bin/sh -c cmd``); the probe ignores
        them. ``timeout`` in seconds: None for the engine's default (30 s), 0 for none; a
        command that outlives it is killed and ``capsule.TimeoutError`` raised. The GIL is
        released while the command runs."""

@final
class CommandResult:
    """What a finished command produced."""

    @property
    def stdout(self) -> str:
        """Standard output (invalid UTF-8 replaced)."""

    @property
    def stderr(self) -> str:
        """Standard error (invalid UTF-8 replaced)."""

    @property
    def exit_code(self) -> int:
        """Exit code; 127 for an unknown command; minus the signal's number for a command
        a signal killed (as Python's ``subprocess`` reports it)."""

    @property
    def signal(self) -> int | None:
        """The signal that killed the command, if one did."""

    @property
    def duration(self) -> float:
        """Seconds from sending the command to receiving its result."""

    @property
    def stdout_truncated(self) -> bool:
        """Whether stdout was cut at the guest's output limit."""

    @property
    def stderr_truncated(self) -> bool:
        """Whether stderr was cut at the guest's output limit."""

@final
class CapsuleInfo:
    """Everything known about a capsule when it was taken."""

    @property
    def capsule_id(self) -> str:
        """The capsule's id."""

    @property
    def status(self) -> str:
        """ "pending", "starting", "running", "paused", "stopped" or "error"."""

    @property
    def template(self) -> str:
        """The template it was created from."""

    @property
    def vcpus(self) -> int:
        """Number of vCPUs."""

    @property
    def memory_mb(self) -> int:
        """Guest memory in MiB."""

    @property
    def timeout(self) -> float:
        """Inactivity timeout in seconds (0: never auto-paused)."""

    @property
    def created_at(self) -> datetime:
        """When it was created (UTC)."""

    @property
    def last_activity(self) -> datetime:
        """When it last ran a command or was pinged (UTC)."""

    @property
    def error(self) -> str | None:
        """Why it is in "error", when it is."""

@final
class TemplateInfo:
    """A template that capsules start from."""

    @property
    def name(self) -> str:
        """Its name."""

    @property
    def vcpus(self) -> int:
        """vCPUs of capsules started from it."""

    @property
    def memory_mb(self) -> int:
        """Memory of capsules started from it, in MiB."""

    @property
    def disk_bytes(self) -> int:
        """Bytes its files occupy on disk."""

    @property
    def created_at(self) -> datetime:
        """When it was published (UTC)."""

@final
class HostInfo:
    """What the host's KVM is."""

    @property
    def virtualization(self) -> str:
        """ "vmx", "svm", "pvm" or "unknown"."""

    @property
    def description(self) -> str:
        """The same in words."""

    @property
    def can_boot_linux(self) -> bool:
        """Whether Linux capsules ("minimal") can boot here."""

    @property
    def max_vcpus(self) -> int:
        """The most vCPUs KVM allows in one VM."""

class CapsuleError(Exception):
    """Base class of every error the engine reports; ``str(e)`` is its message."""

class NotFoundError(CapsuleError):
    """No capsule has this id."""

    capsule_id: str

class TemplateNotFoundError(NotFoundError):
    """No template has this name."""

    name: str

class TimeoutError(CapsuleError, builtins.TimeoutError):
    """A command or a wait did not finish in time."""

    timeout_kind: str
    after: float

class BootTimeoutError(TimeoutError):
    """The guest did not become ready within the boot timeout."""

    capsule_id: str
    console: str
    state: list[str]

class InvalidStateError(CapsuleError, RuntimeError):
    """The capsule's status does not allow the operation."""

    capsule_id: str
    status: str
    operation: str

class GuestCrashedError(CapsuleError, RuntimeError):
    """The guest crashed; the capsule is in "error"."""

    capsule_id: str
    reason: str

class InvalidConfigError(CapsuleError, ValueError):
    """A configuration value is out of range or unknown."""

class InvalidArgumentError(CapsuleError, ValueError):
    """An argument is unusable."""

class InvalidIdError(CapsuleError, ValueError):
    """The text is not a capsule id."""

    capsule_id: str

class UnsupportedError(CapsuleError):
    """The host or the guest kind cannot do this."""

class ResourceExhaustedError(CapsuleError):
    """An engine limit or a host resource is used up."""

    resource: str
    in_use: int
    limit: int | None

class KvmUnavailableError(CapsuleError):
    """KVM cannot be used on this host."""

    path: Path
    reason: str

class TemplateInUseError(CapsuleError):
    """The template is mapped by running capsules."""

    name: str
    capsules: int

class DataDirLockedError(CapsuleError):
    """Another engine holds the data directory."""

    path: Path

class SnapshotError(CapsuleError):
    """A snapshot or template on disk is unusable or could not be written."""

class SnapshotVersionError(SnapshotError):
    """A snapshot of a layout this engine does not read."""

    found: int
    supported: int

class SnapshotMismatchError(SnapshotError):
    """A snapshot that does not describe this capsule."""

class HypervisorError(CapsuleError):
    """The hypervisor layer failed."""

class AgentError(CapsuleError):
    """The agent of a Linux capsule refused a request or broke its protocol."""

    capsule_id: str
    reason: str

class IoError(CapsuleError):
    """A file-system operation of the engine failed."""

    operation: str
    path: Path
    errno: int | None

class OsError(CapsuleError):
    """The host refused the engine a resource."""

    operation: str
    errno: int | None

def _bench_echo(capsule: Capsule, n: int) -> list[float]:
    """Private, for ``bench.py``: ``n`` runs of ``echo hi`` timed in Rust (microseconds)."""

def _bench_create(
    engine: Engine, template: str, n: int, memory_mb: int | None = None, echo: bool = False
) -> list[float]:
    """Private, for ``bench.py``: ``n`` creates timed in Rust (microseconds)."""
