"""The Python layer of the SDK: `Capsule`, `Engine` and the process-wide default engine.

Everything here is a thin shell over the native module (`capsule._native`), which does the
work with the GIL released. What this layer adds: `Capsule(...)` creating a capsule on the
default engine, lifecycle methods that work both on a capsule and on the class with an id
(`Capsule.pause("cl-...")`), context managers, and capsules that remember their engine.
"""

from __future__ import annotations

import builtins
import inspect
import threading
import types
from collections.abc import Callable
from os import PathLike
from typing import Any, Generic, TypeVar, overload

from pathlib import Path

from ._native import Capsule as _NativeCapsule
from ._native import CapsuleInfo, Commands, Files, HostInfo, Pty, TemplateInfo
from ._native import Engine as _NativeEngine

__all__ = ["Capsule", "Engine", "default_engine"]

_default_engine: Engine | None = None
_default_engine_lock = threading.Lock()


def default_engine() -> Engine:
    """The process-wide engine on the default data directory, created on first use.

    The default data directory is ``$XDG_DATA_HOME/capsule`` (or ``~/.local/share/capsule``).
    ``Capsule(...)`` and the class-level calls (``Capsule.pause(id)``, ``Capsule.connect(id)``,
    ``Capsule.list()``...) use this engine. It lives until the process ends. Raises what
    ``Engine()`` raises (``KvmUnavailableError``, ``DataDirLockedError`` when another engine
    holds the directory); a failed attempt is not remembered, the next call tries again.
    """
    global _default_engine
    engine = _default_engine
    if engine is None:
        with _default_engine_lock:
            if _default_engine is None:
                _default_engine = Engine()
            engine = _default_engine
    return engine


_R = TypeVar("_R")


class _CapsuleOrId(Generic[_R]):
    """A lifecycle method that works on a capsule, ``capsule.pause()``, and on the class with a
    capsule id, ``Capsule.pause("cl-...")`` (the latter on the default engine)."""

    def __init__(self, method: Callable[[Capsule], _R]) -> None:
        self._method = method
        self._name = method.__name__
        self.__doc__ = method.__doc__
        self.__wrapped__ = method
        name = self._name

        def by_id(capsule_id: str) -> _R:
            if isinstance(capsule_id, Capsule):
                return method(capsule_id)
            result: _R = getattr(default_engine()._native, name)(capsule_id)
            return result

        by_id.__name__ = name
        by_id.__qualname__ = f"Capsule.{name}"
        by_id.__annotations__ = {
            "capsule_id": "str",
            "return": method.__annotations__.get("return", "None"),
        }
        by_id.__doc__ = (
            f"``Capsule.{name}(capsule_id)``: the same on the capsule with this id, on the "
            f"default engine (``default_engine().{name}(capsule_id)``).\n\n"
            + inspect.cleandoc(method.__doc__ or "")
        )
        self._by_id = by_id

    @overload
    def __get__(self, obj: None, owner: type[Capsule]) -> Callable[[str], _R]: ...

    @overload
    def __get__(self, obj: Capsule, owner: type[Capsule] | None = None) -> Callable[[], _R]: ...

    def __get__(self, obj: Capsule | None, owner: type[Capsule] | None = None) -> Any:
        if obj is None:
            return self._by_id
        return types.MethodType(self._method, obj)


class Capsule:
    """A capsule: a KVM microVM run by this process, with its own id and lifecycle.

    ``Capsule(template="minimal", timeout=120, wait=True)`` creates one on the default engine
    (``default_engine()``); ``Engine(data_dir=...).create(...)`` creates one on another
    engine. ``template`` is "probe" (the built-in test guest), "minimal" (Linux; needs
    hardware virtualization and the image from ``cargo xtask build-minimal``) or a template
    made with ``snapshot``. ``timeout`` is the inactivity timeout in seconds after which the
    capsule is paused (None or 0: never). With ``wait`` the constructor returns once the
    capsule is running, and raises why it could not start (leaving nothing behind); without,
    it returns at once while the capsule boots (see ``wait_ready``). ``vcpus`` and
    ``memory_mb`` default to the template's.

    ``commands`` runs commands (to the end or in the background), ``files`` reads and writes
    its files and ``pty`` opens terminals in it (the last two in Linux capsules).

    ``with Capsule(...) as c:`` destroys the capsule when the block ends. Otherwise a capsule
    lives until ``destroy()`` (or until its engine is gone): dropping the object does not
    destroy it. ``pause``, ``resume`` and ``destroy`` also work on the class with an id.
    """

    __slots__ = ("_native", "_engine", "_capsule_id", "commands")

    _native: _NativeCapsule
    _engine: Engine
    _capsule_id: str
    commands: Commands
    """Runs commands in the capsule: ``capsule.commands.run("echo hi")``, in the background
    with ``background=True``; ``list()``, ``connect(pid)`` and ``kill(pid)`` reach its
    processes."""

    def __init__(
        self,
        template: str = "minimal",
        timeout: float | None = None,
        wait: bool = False,
        vcpus: int | None = None,
        memory_mb: int | None = None,
    ) -> None:
        engine = default_engine()
        self._bind(engine._native.create(template, timeout, wait, vcpus, memory_mb), engine)

    def _bind(self, native: _NativeCapsule, engine: Engine) -> None:
        self._native = native
        self._engine = engine
        self._capsule_id = native.capsule_id
        self.commands = native.commands

    @classmethod
    def _wrap(cls, native: _NativeCapsule, engine: Engine) -> Capsule:
        capsule = cls.__new__(cls)
        capsule._bind(native, engine)
        return capsule

    @property
    def capsule_id(self) -> str:
        """The capsule's id: ``"cl-"`` followed by lowercase letters and digits."""
        return self._capsule_id

    @property
    def files(self) -> Files:
        """Its files (Linux capsules): ``read``, ``read_text``, ``write``, ``read_into``,
        ``write_from``, ``list``, ``exists``, ``stat``, ``make_dir``, ``remove``,
        ``rename``, ``upload``, ``download``; ``with_timeout`` for another per-request
        timeout. In the probe every call raises ``UnsupportedError``."""
        return self._native.files

    @property
    def pty(self) -> Pty:
        """Terminals in the capsule (Linux capsules): ``pty.create(rows, cols)`` starts an
        interactive shell on a new pseudo-terminal and returns its ``PtyHandle``."""
        return self._native.pty

    @property
    def engine(self) -> Engine:
        """The engine that runs this capsule."""
        return self._engine

    @property
    def status(self) -> str:
        """Its status now: "pending", "starting", "running", "paused", "stopped" or "error"."""
        return self._native.status

    def wait_ready(self, timeout: float = 30, interval: float = 0.5) -> None:
        """Blocks until the capsule is running.

        Wakes as soon as its status changes, and checks at least every ``interval`` seconds.
        Raises ``capsule.TimeoutError`` (a builtin ``TimeoutError``) if it is not running
        within ``timeout`` seconds, and at once ``GuestCrashedError`` or
        ``InvalidStateError`` (both builtin ``RuntimeError``) if it is or becomes in error,
        stopped or paused.
        """
        self._native.wait_ready(timeout, interval)

    def is_running(self) -> bool:
        """Whether the capsule is running now."""
        return self._native.is_running()

    def get_info(self) -> CapsuleInfo:
        """Everything known about the capsule now (status, vcpus, memory_mb, template,
        created_at, last_activity, error...)."""
        return self._native.get_info()

    @_CapsuleOrId
    def pause(self) -> None:
        """Pauses the capsule: freezes it (a Linux capsule with its processes; a command
        running then returns ``InvalidStateError``, and its process goes on after
        ``resume``), writes its whole state to the engine's data directory and releases its
        VM (no CPU, no memory). Pausing a paused capsule does nothing. Raises
        ``InvalidStateError`` if it is stopped, ``GuestCrashedError`` if in error."""
        self._native.pause()

    @_CapsuleOrId
    def resume(self) -> None:
        """Resumes a paused capsule exactly where it was (memory, registers, guest state).
        Resuming a running capsule does nothing. Raises ``ResourceExhaustedError`` past the
        engine's limits, ``SnapshotError`` if its snapshot cannot be read (it then stays
        paused)."""
        self._native.resume()

    @_CapsuleOrId
    def destroy(self) -> None:
        """Stops the capsule and deletes everything it holds, its files included;
        irreversible. Works in every status; destroying a destroyed capsule does nothing.
        On the class, ``Capsule.destroy(id)`` raises ``NotFoundError`` for an unknown id."""
        self._native.destroy()

    @classmethod
    def connect(cls, capsule_id: str) -> Capsule:
        """The capsule ``capsule_id`` of the default engine, resumed first if it was paused
        (so it is running). Raises ``NotFoundError`` if there is none. For another engine:
        ``engine.connect(capsule_id)``."""
        engine = default_engine()
        return cls._wrap(engine._native.connect(capsule_id), engine)

    @classmethod
    def list(cls) -> builtins.list[CapsuleInfo]:
        """A ``CapsuleInfo`` for every capsule of the default engine, oldest first."""
        return default_engine()._native.list()

    def ping(self) -> None:
        """Counts as activity: resets the inactivity (auto-pause) timer, as every command
        does. Raises ``InvalidStateError`` unless the capsule is running."""
        self._native.ping()

    def snapshot(self, name: str) -> TemplateInfo:
        """Publishes the capsule's current state as the template ``name``; the capsule keeps
        running. ``Capsule(template=name)`` then starts capsules in that state, sharing its
        memory copy-on-write. Raises ``InvalidArgumentError`` for a bad or taken name,
        ``InvalidStateError`` unless running."""
        return self._native.snapshot(name)

    def fork(self, n: int) -> builtins.list[Capsule]:
        """``n`` new running capsules in this capsule's exact state (it must be running or
        paused, and is not changed), on the same engine. All or nothing; clones never share
        randomness (a Linux clone's kernel CRNG is reseeded before it runs)."""
        return [Capsule._wrap(native, self._engine) for native in self._native.fork(n)]

    def console_log(self) -> str:
        """The guest's serial console output so far, newest 64 KiB at most (Linux
        capsules; the probe has none and returns "")."""
        return self._native.console_log()

    def __enter__(self) -> Capsule:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._native.destroy()

    def __repr__(self) -> str:
        return f"Capsule(capsule_id={self._capsule_id!r}, status={self._native.status!r})"


class Engine:
    """An engine: KVM plus a data directory holding capsules, paused capsules and templates.

    ``Engine(data_dir=...)`` opens an explicit one; its ``create(...)`` and ``get(id)`` return
    capsules bound to it (``Capsule(...)`` uses ``default_engine()``). One engine at a time may
    hold a data directory (``DataDirLockedError``). Capsules paused by an earlier engine on the
    same directory are listed and can be resumed; running capsules stop when the engine and
    every capsule object of it are gone.

    Keyword settings (None keeps the engine's default): ``max_capsules`` and
    ``max_memory_mb`` (admission limits: past them create/resume/connect raise
    ``ResourceExhaustedError``), ``max_concurrent_starts``, ``boot_timeout`` and
    ``idle_check_interval`` (seconds), ``shell_pool_size`` (VMs kept ready per shape),
    ``linux_images`` (folder of the Linux images), ``kvm_path`` (default /dev/kvm) and
    ``seccomp`` (filters on the engine's vCPU threads; default on).
    """

    __slots__ = ("_native", "__weakref__")

    _native: _NativeEngine

    def __init__(
        self,
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
    ) -> None:
        self._native = _NativeEngine(
            data_dir,
            max_capsules=max_capsules,
            max_memory_mb=max_memory_mb,
            max_concurrent_starts=max_concurrent_starts,
            boot_timeout=boot_timeout,
            idle_check_interval=idle_check_interval,
            shell_pool_size=shell_pool_size,
            linux_images=linux_images,
            kvm_path=kvm_path,
            seccomp=seccomp,
        )

    def create(
        self,
        template: str = "minimal",
        timeout: float | None = None,
        wait: bool = False,
        vcpus: int | None = None,
        memory_mb: int | None = None,
    ) -> Capsule:
        """Creates a capsule on this engine; the arguments are ``Capsule``'s."""
        return Capsule._wrap(
            self._native.create(template, timeout, wait, vcpus, memory_mb), self
        )

    def get(self, capsule_id: str) -> Capsule:
        """The capsule ``capsule_id``, in whatever status it is. Raises ``NotFoundError``."""
        return Capsule._wrap(self._native.get(capsule_id), self)

    def connect(self, capsule_id: str) -> Capsule:
        """The capsule ``capsule_id``, resumed first if it was paused."""
        return Capsule._wrap(self._native.connect(capsule_id), self)

    def pause(self, capsule_id: str) -> None:
        """Pauses the capsule ``capsule_id`` (see ``Capsule.pause``)."""
        self._native.pause(capsule_id)

    def resume(self, capsule_id: str) -> None:
        """Resumes the capsule ``capsule_id`` (see ``Capsule.resume``)."""
        self._native.resume(capsule_id)

    def destroy(self, capsule_id: str) -> None:
        """Destroys the capsule ``capsule_id``. Raises ``NotFoundError`` if there is none."""
        self._native.destroy(capsule_id)

    def fork(self, capsule_id: str, n: int) -> builtins.list[Capsule]:
        """Forks the capsule ``capsule_id`` into ``n`` new running capsules."""
        return [Capsule._wrap(native, self) for native in self._native.fork(capsule_id, n)]

    def list(self) -> builtins.list[CapsuleInfo]:
        """A ``CapsuleInfo`` for every capsule of this engine, oldest first."""
        return self._native.list()

    def templates(self) -> builtins.list[TemplateInfo]:
        """A ``TemplateInfo`` for every template in the data directory (the built-in
        "probe" and "minimal" are not listed)."""
        return self._native.templates()

    def delete_template(self, name: str) -> None:
        """Deletes the template ``name``. Raises ``TemplateInUseError`` while running
        capsules map it, ``TemplateNotFoundError`` if there is none."""
        self._native.delete_template(name)

    @property
    def data_dir(self) -> Path:
        """The engine's data directory (a ``pathlib.Path``)."""
        return self._native.data_dir

    @property
    def host(self) -> HostInfo:
        """What the host's KVM is: ``host.virtualization``, ``host.can_boot_linux``..."""
        return self._native.host

    def __repr__(self) -> str:
        return repr(self._native)
