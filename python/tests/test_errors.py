"""Engine errors arrive as Python exceptions that can be caught by kind, carry the engine's
message, and subclass the builtin a Python caller would expect."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest

import capsule
from capsule import Capsule, Engine

ProbeFactory = Callable[..., Capsule]

KINDS = {
    "NotFoundError": (capsule.CapsuleError,),
    "TemplateNotFoundError": (capsule.NotFoundError,),
    "TimeoutError": (capsule.CapsuleError, TimeoutError),
    "BootTimeoutError": (capsule.TimeoutError, TimeoutError),
    "InvalidStateError": (capsule.CapsuleError, RuntimeError),
    "GuestCrashedError": (capsule.CapsuleError, RuntimeError),
    "InvalidConfigError": (capsule.CapsuleError, ValueError),
    "InvalidArgumentError": (capsule.CapsuleError, ValueError),
    "InvalidIdError": (capsule.CapsuleError, ValueError),
    "UnsupportedError": (capsule.CapsuleError,),
    "ResourceExhaustedError": (capsule.CapsuleError,),
    "KvmUnavailableError": (capsule.CapsuleError,),
    "TemplateInUseError": (capsule.CapsuleError,),
    "DataDirLockedError": (capsule.CapsuleError,),
    "SnapshotError": (capsule.CapsuleError,),
    "SnapshotVersionError": (capsule.SnapshotError,),
    "SnapshotMismatchError": (capsule.SnapshotError,),
    "HypervisorError": (capsule.CapsuleError,),
    "AgentError": (capsule.CapsuleError,),
    "IoError": (capsule.CapsuleError,),
    "OsError": (capsule.CapsuleError,),
    "FileError": (capsule.CapsuleError, OSError),
    "FileNotFoundError": (capsule.FileError, FileNotFoundError),
    "IsADirectoryError": (capsule.FileError, IsADirectoryError),
    "NotADirectoryError": (capsule.FileError, NotADirectoryError),
    "FileExistsError": (capsule.FileError, FileExistsError),
    "PermissionError": (capsule.FileError, PermissionError),
    "ProcessDetachedError": (capsule.CapsuleError, RuntimeError),
    "ProcessNotFoundError": (capsule.NotFoundError, ProcessLookupError),
}


def test_the_hierarchy() -> None:
    assert issubclass(capsule.CapsuleError, Exception)
    for name, bases in KINDS.items():
        cls = getattr(capsule, name)
        assert cls.__module__ == "capsule" and cls.__name__ == name
        assert cls.__doc__
        for base in bases:
            assert issubclass(cls, base), (name, base)
    assert capsule.TimeoutError is not TimeoutError
    assert capsule.FileNotFoundError is not FileNotFoundError


def test_file_errors_behave_as_the_builtins() -> None:
    # Made as the engine makes them (the probe has no files to fail on): str() is the
    # message alone, as for every capsule error, and they pickle with their attributes.
    err = capsule.FileNotFoundError("guest file /x: not found: No such file")
    err.path, err.kind, err.message = "/x", "not_found", "No such file"
    assert str(err) == "guest file /x: not found: No such file"
    assert isinstance(err, OSError) and err.errno is None
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is capsule.FileNotFoundError
    assert (str(again), again.path, again.kind) == (str(err), "/x", "not_found")
    try:
        raise err
    except FileNotFoundError as caught:  # the builtin catches it
        assert caught is err


def test_not_found_and_invalid_id(engine: Engine) -> None:
    with pytest.raises(capsule.NotFoundError) as e:
        engine.get("cl-doesnotexist")
    assert str(e.value) == "capsule cl-doesnotexist not found"
    assert e.value.capsule_id == "cl-doesnotexist"
    for call in (engine.get, engine.connect, engine.pause, engine.resume, engine.destroy):
        with pytest.raises(capsule.NotFoundError):
            call("cl-doesnotexist")
    with pytest.raises(ValueError) as e2:
        engine.get("not an id")
    assert isinstance(e2.value, capsule.InvalidIdError)
    assert e2.value.capsule_id == "not an id"


def test_invalid_config(engine: Engine) -> None:
    with pytest.raises(capsule.InvalidConfigError) as e:
        engine.create("no-such-template", wait=True)
    assert "invalid configuration" in str(e.value)
    with pytest.raises(ValueError):
        engine.create("probe", vcpus=0, wait=True)
    with pytest.raises(capsule.InvalidConfigError):
        engine.create("probe", memory_mb=1, wait=True)
    assert engine.list() == []  # a failed create leaves nothing behind


def test_unsupported_linux_where_it_cannot_boot(engine: Engine) -> None:
    if engine.host.can_boot_linux:
        pytest.skip("this host boots Linux capsules")
    with pytest.raises(capsule.UnsupportedError) as e:
        engine.create("minimal", wait=True)
    assert "unsupported" in str(e.value)


def test_invalid_state_carries_the_facts(probe: ProbeFactory) -> None:
    c = probe()
    c.pause()
    with pytest.raises(capsule.InvalidStateError) as e:
        c.commands.run("echo x")
    err = e.value
    assert isinstance(err, RuntimeError)
    assert (err.capsule_id, err.status, err.operation) == (c.capsule_id, "paused", "run a command")
    assert str(err) == f"capsule {c.capsule_id} is paused: cannot run a command"


def test_guest_crash(probe: ProbeFactory) -> None:
    c = probe()
    with pytest.raises(capsule.GuestCrashedError) as e:
        c.commands.run("crash")
    assert e.value.capsule_id == c.capsule_id
    assert "triple fault" in e.value.reason
    with pytest.raises(capsule.GuestCrashedError):
        c.commands.run("echo after")


def test_invalid_argument(probe: ProbeFactory) -> None:
    c = probe()
    with pytest.raises(capsule.InvalidArgumentError):
        c.commands.run("y" * 100_000)
    with pytest.raises(capsule.InvalidArgumentError):
        c.snapshot("bad/name")


def test_resource_exhausted(make_engine: Callable[..., Engine]) -> None:
    engine = make_engine(max_capsules=1)
    engine.create("probe", memory_mb=32, wait=True)
    with pytest.raises(capsule.ResourceExhaustedError) as e:
        engine.create("probe", memory_mb=32, wait=True)
    assert (e.value.resource, e.value.in_use, e.value.limit) == ("capsules", 1, 1)
    assert len(engine.list()) == 1

    by_memory = make_engine(max_memory_mb=40)
    by_memory.create("probe", memory_mb=32, wait=True)
    with pytest.raises(capsule.ResourceExhaustedError) as e:
        by_memory.create("probe", memory_mb=32, wait=True)
    assert (e.value.resource, e.value.limit) == ("memory_mb", 40)


def test_data_dir_locked(engine: Engine) -> None:
    with pytest.raises(capsule.DataDirLockedError) as e:
        Engine(data_dir=engine.data_dir)
    assert e.value.path == engine.data_dir


def test_templates_not_found_and_in_use(engine: Engine, probe: ProbeFactory) -> None:
    with pytest.raises(capsule.TemplateNotFoundError) as e:
        engine.delete_template("nope")
    assert isinstance(e.value, capsule.NotFoundError)
    assert e.value.name == "nope"
    probe().snapshot("busy")
    clone = engine.create("busy", wait=True)
    with pytest.raises(capsule.TemplateInUseError) as e2:
        engine.delete_template("busy")
    assert (e2.value.name, e2.value.capsules) == ("busy", 1)
    clone.destroy()
    engine.delete_template("busy")


def test_kvm_unavailable(tmp_path: Path) -> None:
    with pytest.raises(capsule.KvmUnavailableError) as e:
        Engine(data_dir=tmp_path, kvm_path=tmp_path / "no-kvm")
    assert (e.value.reason, e.value.path) == ("missing", tmp_path / "no-kvm")


def test_exceptions_pickle_with_their_attributes(engine: Engine) -> None:
    with pytest.raises(capsule.NotFoundError) as e:
        engine.get("cl-gone")
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is capsule.NotFoundError
    assert (str(again), again.capsule_id) == (str(e.value), "cl-gone")


@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="no /dev/kvm")
def test_errors_are_catchable_as_capsule_error(engine: Engine) -> None:
    with pytest.raises(capsule.CapsuleError):
        engine.get("cl-missing")
