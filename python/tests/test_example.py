"""The issue's lifecycle example, run as written (``examples/lifecycle.py``) in a fresh
interpreter on the default engine, with the template from ``CAPSULE_TEST_TEMPLATE``
("probe" unless set; "minimal" where Linux capsules boot)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "lifecycle.py"


def test_lifecycle_example_runs_as_written(tmp_path: Path) -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("SKIPPED: /dev/kvm does not exist on this host")
    env = dict(os.environ)
    env["XDG_DATA_HOME"] = str(tmp_path)  # the default engine's data directory
    env.setdefault("CAPSULE_TEST_TEMPLATE", "probe")
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    assert re.fullmatch(r"cl-[a-z0-9]+", lines[0])
    assert lines[1:] == ["True", "paused"]
    # The capsule was destroyed: nothing is left in the default engine's data directory.
    assert not any((tmp_path / "capsule" / "capsules").glob("cl-*"))
