"""Type stubs of ``capsule._native``, the PyO3 extension behind the ``capsule`` package.

Import ``capsule`` rather than this module: ``capsule.Capsule`` and ``capsule.Engine`` wrap
the native ``Capsule`` and ``Engine`` below.
"""

import builtins
from collections.abc import Callable, Sequence
from datetime import datetime
from os import PathLike
from pathlib import Path
from typing import Literal, Protocol, final, overload

__version__: str
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
    "_bench_create",
    "_bench_echo",
    "_copy_file_objects",
    "_decode_utf8_chunks",
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

    @property
    def files(self) -> Files:
        """Its files (Linux capsules)."""

    @property
    def pty(self) -> Pty:
        """Terminals in the capsule (Linux capsules)."""

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

_Data = bytes | bytearray | str
_TextCallback = Callable[[str], object]
_Command = str | Sequence[str]

@final
class Commands:
    """Runs commands in one capsule: ``capsule.commands.run("echo hi")``, in the background
    with ``background=True``; ``list()``, ``connect(pid)``, ``kill(pid)`` reach the guest's
    processes."""

    @overload
    def run(
        self,
        cmd: _Command,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        user: str | None = None,
        *,
        background: Literal[True],
        on_stdout: _TextCallback | None = None,
        on_stderr: _TextCallback | None = None,
        stdin: _Data | None = None,
        clear_env: bool = False,
        output_limit: int | None = None,
    ) -> CommandHandle: ...
    @overload
    def run(
        self,
        cmd: _Command,
        env: dict[str, str] | None,
        cwd: str | None,
        timeout: float | None,
        user: str | None,
        background: Literal[True],
        on_stdout: _TextCallback | None = None,
        on_stderr: _TextCallback | None = None,
        stdin: _Data | None = None,
        *,
        clear_env: bool = False,
        output_limit: int | None = None,
    ) -> CommandHandle: ...
    @overload
    def run(
        self,
        cmd: _Command,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        user: str | None = None,
        background: Literal[False] = False,
        on_stdout: _TextCallback | None = None,
        on_stderr: _TextCallback | None = None,
        stdin: _Data | None = None,
        *,
        clear_env: bool = False,
        output_limit: int | None = None,
    ) -> CommandResult:
        """Runs ``cmd`` and returns its ``CommandResult`` once it has finished, or with
        ``background=True`` a ``CommandHandle`` once it started.

        ``cmd``: a shell script, or a program and its arguments (Linux capsules). ``env``,
        ``cwd``, ``user``, ``stdin`` and ``clear_env`` apply to Linux capsules; the probe
        raises ``UnsupportedError`` for each. ``timeout`` in seconds: None for 30 s in the
        foreground and none in the background, 0 for none. ``on_stdout``/``on_stderr``
        receive ``str`` chunks as they arrive, with the GIL held, on a thread of the
        command. The GIL is released while the command runs."""
    @overload
    def run(
        self,
        cmd: _Command,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        user: str | None = None,
        background: bool = False,
        on_stdout: _TextCallback | None = None,
        on_stderr: _TextCallback | None = None,
        stdin: _Data | None = None,
        *,
        clear_env: bool = False,
        output_limit: int | None = None,
    ) -> CommandResult | CommandHandle: ...
    def list(self) -> builtins.list[ProcessInfo]:
        """The processes the guest's agent tracks, by pid (Linux capsules)."""

    def connect(self, pid: int) -> CommandHandle:
        """A new handle to process ``pid``: its output from now on and its exit."""

    def kill(self, pid: int) -> None:
        """SIGKILL to process ``pid``'s whole process group."""

@final
class CommandHandle:
    """A command running in the background (``commands.run(..., background=True)``,
    ``commands.connect(pid)``). Iterating over it yields ``(stream, data)`` output chunks."""

    @property
    def pid(self) -> int:
        """The command's pid in the guest (0 for the probe)."""

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Waits until the command ends; its result. ``TimeoutError`` ("wait") past
        ``timeout`` seconds (the command runs on)."""

    def kill(self) -> None:
        """SIGKILL to the command's whole process group."""

    def signal(self, signum: int) -> None:
        """Sends signal ``signum`` to the command's process group."""

    def send_stdin(self, data: _Data) -> None:
        """Writes ``data`` (bytes, or str as UTF-8) to the command's stdin."""

    def close_stdin(self) -> None:
        """Closes the command's stdin (end of file)."""

    def next_chunk(self, timeout: float | None = None) -> tuple[str, bytes] | None:
        """The next output chunk, ``("stdout" | "stderr", data)``; None at the end."""

    def __iter__(self) -> CommandHandle: ...
    def __next__(self) -> tuple[str, bytes]: ...

@final
class ProcessInfo:
    """A process the guest's agent tracks."""

    @property
    def pid(self) -> int:
        """Its pid in the guest (also its process group id)."""

    @property
    def command(self) -> str:
        """What was run."""

    @property
    def started_at(self) -> datetime:
        """When it started, by the guest's clock (UTC)."""

@final
class CommandResult:
    """What a finished command produced."""

    @property
    def stdout(self) -> str:
        """Standard output as text (invalid UTF-8 replaced)."""

    @property
    def stderr(self) -> str:
        """Standard error as text (invalid UTF-8 replaced)."""

    @property
    def stdout_bytes(self) -> bytes:
        """Standard output as the command wrote it."""

    @property
    def stderr_bytes(self) -> bytes:
        """Standard error as the command wrote it."""

    @property
    def exit_code(self) -> int:
        """Exit code; 127 for an unknown command; minus the signal's number for a command
        a signal killed (as Python's ``subprocess`` reports it)."""

    @property
    def signal(self) -> int | None:
        """The signal that killed the command, if one did."""

    @property
    def duration(self) -> float:
        """Seconds the command ran."""

    @property
    def stdout_truncated(self) -> bool:
        """Whether stdout was cut at the output limit."""

    @property
    def stderr_truncated(self) -> bool:
        """Whether stderr was cut at the output limit."""

class _Writer(Protocol):
    """A binary file object to write to: ``open(path, "wb")``, ``io.BytesIO()``..."""

    def write(self, data: bytes, /) -> object: ...

class _Reader(Protocol):
    """A binary file object to read from: ``open(path, "rb")``, ``io.BytesIO(data)``..."""

    def read(self, size: int, /) -> bytes | bytearray: ...

@final
class Files:
    """Files in one capsule (Linux capsules; ``UnsupportedError`` in the probe). Guest
    paths are absolute. Each request waits 60 s at most for the guest's answer
    (``with_timeout`` sets another time)."""

    def with_timeout(self, seconds: float) -> Files:
        """A new ``Files`` for the same capsule whose every request (one chunk of a
        transfer) waits at most ``seconds`` for the guest; past it ``TimeoutError``
        ("file"). ``ValueError`` unless positive, finite and at most a year."""

    def read(self, path: str) -> bytes:
        """The whole file at ``path``."""

    def read_text(self, path: str) -> str:
        """The whole file at ``path`` as text (UTF-8)."""

    def write(
        self, path: str, data: _Data, mode: int | None = None, owner: tuple[int, int] | None = None
    ) -> None:
        """Writes ``data`` to ``path`` atomically, creating parent directories."""

    def read_into(self, path: str, fileobj: _Writer) -> int:
        """Streams the file at ``path`` into ``fileobj`` (``write`` called with chunks of
        at most 1 MiB); the bytes copied. An exception ``write`` raises is raised as is."""

    def write_from(
        self,
        path: str,
        fileobj: _Reader,
        mode: int | None = None,
        owner: tuple[int, int] | None = None,
    ) -> int:
        """Writes what ``fileobj.read(n)`` gives, until ``b""``, to ``path`` as ``write``
        does; the bytes written. An exception ``read`` raises is raised as is."""

    def list(self, path: str, depth: int = 1) -> builtins.list[EntryInfo]:
        """The entries below the directory ``path``, ``depth`` levels down."""

    def exists(self, path: str) -> bool:
        """Whether something exists at ``path``."""

    def stat(self, path: str) -> EntryInfo:
        """What is at ``path``."""

    def make_dir(self, path: str) -> None:
        """Creates the directory ``path`` and its parents."""

    def remove(self, path: str) -> None:
        """Removes the file or directory (recursively) at ``path``."""

    def rename(self, src: str, dst: str) -> None:
        """Renames ``src`` to ``dst``."""

    def upload(self, host_path: str | PathLike[str], guest_path: str) -> int:
        """Copies a host file into the guest; the bytes copied."""

    def download(self, guest_path: str, host_path: str | PathLike[str]) -> int:
        """Copies a guest file to the host; the bytes copied."""

@final
class EntryInfo:
    """A file, directory or link in a guest."""

    @property
    def name(self) -> str:
        """Its last path component."""

    @property
    def path(self) -> str:
        """Its absolute path in the guest."""

    @property
    def type(self) -> str:
        """ "file", "directory", "symlink" or "other"."""

    @property
    def size(self) -> int:
        """Size in bytes."""

    @property
    def mode(self) -> int:
        """Permission bits."""

    @property
    def uid(self) -> int:
        """The owner's user id."""

    @property
    def gid(self) -> int:
        """The owner's group id."""

    @property
    def modified(self) -> datetime:
        """When its contents last changed (UTC)."""

    @property
    def symlink_target(self) -> str | None:
        """Where a symbolic link points."""

    def is_dir(self) -> bool:
        """Whether it is a directory."""

    def is_file(self) -> bool:
        """Whether it is a regular file."""

@final
class Pty:
    """Terminals in one capsule (Linux capsules)."""

    def create(
        self,
        rows: int = 24,
        cols: int = 80,
        cmd: _Command | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,
        on_data: Callable[[bytes], object] | None = None,
        *,
        clear_env: bool = False,
    ) -> PtyHandle:
        """Starts a shell (or ``cmd``) on a new terminal of ``rows`` by ``cols``."""

    def connect(self, pid: int) -> PtyHandle:
        """A new handle to the terminal session led by ``pid``."""

@final
class PtyHandle:
    """A shell (or command) on a pseudo-terminal. Iterating over it yields what the
    terminal shows, in bytes chunks."""

    @property
    def pid(self) -> int:
        """The pid of the session leader in the guest."""

    def write(self, data: _Data) -> None:
        """Types ``data`` into the terminal."""

    def resize(self, rows: int, cols: int) -> None:
        """Changes the terminal's size."""

    def kill(self) -> None:
        """SIGKILL to the session's process group."""

    def signal(self, signum: int) -> None:
        """Sends signal ``signum`` to the session's process group."""

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Waits until the shell ends; its result."""

    def next_chunk(self, timeout: float | None = None) -> bytes | None:
        """The next chunk the terminal shows; None at the end."""

    def __iter__(self) -> PtyHandle: ...
    def __next__(self) -> bytes: ...

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

    @property
    def ended(self) -> str | None:
        """How its guest ended, when it stopped by itself (power-off, reboot or triple fault)."""

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
    """A command, a wait or a file request did not finish in time."""

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

class FileError(CapsuleError, builtins.OSError):
    """A file operation in a Linux capsule failed in the guest."""

    path: str
    kind: str
    message: str

class FileNotFoundError(FileError, builtins.FileNotFoundError):
    """No such guest file or directory."""

class IsADirectoryError(FileError, builtins.IsADirectoryError):
    """A guest directory where a file was expected."""

class NotADirectoryError(FileError, builtins.NotADirectoryError):
    """A guest path component that is not a directory."""

class FileExistsError(FileError, builtins.FileExistsError):
    """Something is in the way in the guest."""

class PermissionError(FileError, builtins.PermissionError):
    """The guest refused access."""

class ProcessDetachedError(CapsuleError, RuntimeError):
    """A handle no longer receives its process's output: reconnect with
    ``commands.connect(pid)``."""

    capsule_id: str
    pid: int
    reason: str

class ProcessNotFoundError(NotFoundError, builtins.ProcessLookupError):
    """The guest's agent tracks no process with this pid."""

    pid: int

def _decode_utf8_chunks(chunks: list[bytes]) -> list[str]:
    """Private, for the tests: what a text callback receives for these chunks."""

def _copy_file_objects(src: _Reader, dst: _Writer) -> int:
    """Private, for the tests: ``src`` copied to ``dst`` through the file object adapters
    of ``write_from`` and ``read_into``, as the engine streams; the bytes copied."""

def _bench_echo(capsule: Capsule, n: int) -> list[float]:
    """Private, for ``bench.py``: ``n`` runs of ``echo hi`` timed in Rust (microseconds)."""

def _bench_create(
    engine: Engine, template: str, n: int, memory_mb: int | None = None, echo: bool = False
) -> list[float]:
    """Private, for ``bench.py``: ``n`` creates timed in Rust (microseconds)."""
