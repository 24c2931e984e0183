"""Shared fixtures: an engine on a fresh temporary data directory per test, and a default
engine (the one ``Capsule(...)`` uses) confined to a temporary directory for the session.

Tests run against the installed package (``pip install ./python``); the KVM tests are
skipped, with a message, only when the host has no /dev/kvm at all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import capsule

# The default engine lives on $XDG_DATA_HOME/capsule: point it at a temporary folder before
# anything can create it, so the tests never touch the user's real data directory.
_DEFAULT_HOME = tempfile.mkdtemp(prefix="capsule-pytest-xdg-")
os.environ["XDG_DATA_HOME"] = _DEFAULT_HOME


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_DEFAULT_HOME, ignore_errors=True)


def _require_kvm() -> None:
    if not os.path.exists("/dev/kvm"):
        pytest.skip("SKIPPED: /dev/kvm does not exist on this host")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[capsule.Engine]:
    """An engine of its own on a fresh temporary data directory."""
    _require_kvm()
    eng = capsule.Engine(data_dir=tmp_path / "data", idle_check_interval=0.01)
    yield eng
    for info in eng.list():
        eng.destroy(info.capsule_id)


@pytest.fixture
def default_engine() -> capsule.Engine:
    """The process-wide default engine (on the session's temporary XDG_DATA_HOME)."""
    _require_kvm()
    return capsule.default_engine()


@pytest.fixture
def probe(engine: capsule.Engine) -> Callable[..., capsule.Capsule]:
    """Makes running probe capsules (32 MiB) on the test's engine."""

    def make(**kwargs: object) -> capsule.Capsule:
        kwargs.setdefault("memory_mb", 32)
        kwargs.setdefault("wait", True)
        return engine.create("probe", **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., capsule.Engine]]:
    """Opens engines with settings of the test's choosing, each on its own temporary data
    directory (or the one passed as ``data_dir``)."""
    _require_kvm()
    made: list[capsule.Engine] = []

    def make(**kwargs: object) -> capsule.Engine:
        kwargs.setdefault("data_dir", tmp_path / f"data-{len(made)}")
        eng = capsule.Engine(**kwargs)  # type: ignore[arg-type]
        made.append(eng)
        return eng

    yield make
    for eng in made:
        try:
            for info in eng.list():
                eng.destroy(info.capsule_id)
        except capsule.CapsuleError:
            pass
