"""The type stubs agree with the compiled module (mypy's stubtest), and the package, these
tests and the examples type-check under ``mypy --strict``. Skipped where mypy is not
installed (CI installs it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def mypy(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy")
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_stubs_match_the_compiled_module(tmp_path: Path) -> None:
    # From a folder without the source package, so the installed one is checked.
    done = mypy("mypy.stubtest", "capsule._native", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_package_the_tests_and_the_examples_type_check(tmp_path: Path) -> None:
    examples = str(HERE.parent / "examples")
    done = mypy("mypy", "--strict", "--cache-dir", str(tmp_path), str(HERE), examples, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
