"""The process-wide default engine: ``Capsule(...)`` and the class-level calls
``Capsule.pause(id)``, ``Capsule.resume(id)``, ``Capsule.destroy(id)``,
``Capsule.connect(id)`` and ``Capsule.list()``. (conftest.py points XDG_DATA_HOME at a
temporary folder, so the default data directory is one of the session's own.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import capsule
from capsule import Capsule


def test_default_engine_is_one_per_process(default_engine: capsule.Engine) -> None:
    assert default_engine.data_dir == Path(os.environ["XDG_DATA_HOME"]) / "capsule"
    engines: list[capsule.Engine] = []
    threads = [
        threading.Thread(target=lambda: engines.append(capsule.default_engine()))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(e is default_engine for e in engines)
    with pytest.raises(capsule.DataDirLockedError):
        capsule.Engine(data_dir=default_engine.data_dir)


def test_capsule_constructor_uses_the_default_engine(default_engine: capsule.Engine) -> None:
    c = Capsule(template="probe", wait=True, vcpus=1, memory_mb=32)
    try:
        assert c.engine is default_engine
        assert c.capsule_id in [i.capsule_id for i in Capsule.list()]
        assert c.commands.run("echo default").stdout == "default\n"
    finally:
        c.destroy()
    assert c.capsule_id not in [i.capsule_id for i in Capsule.list()]


def test_lifecycle_calls_on_the_class_with_an_id(default_engine: capsule.Engine) -> None:
    c = Capsule(template="probe", timeout=120, wait=True, memory_mb=32)
    cid = c.capsule_id
    c.commands.run("count")

    Capsule.pause(cid)
    assert c.get_info().status == "paused"
    assert {i.capsule_id: i.status for i in Capsule.list()}[cid] == "paused"
    Capsule.resume(cid)
    assert c.is_running()

    Capsule.pause(cid)
    connected = Capsule.connect(cid)  # resumes a paused capsule
    assert isinstance(connected, Capsule) and connected.engine is default_engine
    assert connected.is_running()
    assert connected.commands.run("count").stdout == "2\n"

    Capsule.destroy(cid)
    assert c.status == "stopped"
    with pytest.raises(capsule.NotFoundError):
        Capsule.destroy(cid)
    with pytest.raises(capsule.NotFoundError):
        Capsule.pause(cid)
    with pytest.raises(capsule.NotFoundError):
        Capsule.connect(cid)


def test_instance_and_class_forms_are_documented() -> None:
    for name in ("pause", "resume", "destroy"):
        on_class = getattr(Capsule, name)
        assert on_class.__doc__ and f"Capsule.{name}(capsule_id)" in on_class.__doc__
        assert on_class.__qualname__ == f"Capsule.{name}"


def test_the_default_engine_opens_on_first_use_in_a_fresh_process(tmp_path: Path) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("SKIPPED: /dev/kvm does not exist on this host")
    code = (
        "import capsule, pathlib\n"
        "c = capsule.Capsule(template='probe', wait=True, memory_mb=32)\n"
        "print(capsule.default_engine().data_dir)\n"
        "c.pause()\n"
        "print(c.capsule_id)\n"
    )
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    data_dir, cid = out.stdout.split()
    assert data_dir == str(tmp_path / "capsule")
    # The paused capsule is on disk for the next process's default engine.
    code2 = (
        "import capsule, sys\n"
        f"c = capsule.Capsule.connect({cid!r})\n"
        "print(c.commands.run('echo back').stdout, end='')\n"
        "c.destroy()\n"
    )
    out2 = subprocess.run(
        [sys.executable, "-c", code2], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out2.returncode == 0, out2.stderr
    assert out2.stdout == "back\n"
