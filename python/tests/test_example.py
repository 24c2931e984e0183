"""The examples, each run in a fresh interpreter on the default engine with the template from
``CAPSULE_TEST_TEMPLATE`` ("probe" unless set; "minimal" where Linux capsules boot): the
issue's lifecycle example as written (``examples/lifecycle.py``), and the guest I/O example
(``examples/guest_io.py``; its Linux lines are checked by ``engine/tests/linux_python.rs``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("SKIPPED: /dev/kvm does not exist on this host")
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(tmp_path)  # the default engine's data directory
    env.setdefault("CAPSULE_TEST_TEMPLATE", "probe")
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_lifecycle_example_runs_as_written(tmp_path: Path) -> None:
    done = run_example("lifecycle.py", tmp_path)
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    assert re.fullmatch(r"cl-[a-z0-9]+", lines[0])
    assert lines[1:] == ["True", "paused"]
    # The capsule was destroyed: nothing is left in the default engine's data directory.
    assert not any((tmp_path / "capsule" / "capsules").glob("cl-*"))


def test_guest_io_example_runs(tmp_path: Path) -> None:
    done = run_example("guest_io.py", tmp_path)
    if os.environ.get("CAPSULE_TEST_TEMPLATE", "probe") != "probe":
        assert done.stdout.endswith("done\n"), done.stdout
        return
    assert done.stdout.splitlines() == [
        "background: pid 0, exit 0, callback 'streamed\\n'",
        "kill: wait timed out (wait), then signal 9",
        "unsupported: stdin,user,argv,list,files,pty",
        "done",
    ]
    assert not any((tmp_path / "capsule" / "capsules").glob("cl-*"))
