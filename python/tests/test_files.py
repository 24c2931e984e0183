"""``capsule.files`` and ``capsule.pty`` with the probe, which has neither: every call is
refused with ``UnsupportedError`` (never a silent no-op), after the checks that need no guest
(absolute paths, the host side of a transfer). Their behaviour in a Linux capsule:
``examples/guest_io.py`` in the nested harness."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import capsule
from capsule import Capsule

ProbeFactory = Callable[..., Capsule]


def test_every_file_call_is_unsupported_in_the_probe(probe: ProbeFactory, tmp_path: Path) -> None:
    c = probe()
    files = c.files
    assert isinstance(files, capsule.Files)
    tmp_path = tmp_path / "host"  # beside the engine's data directory
    tmp_path.mkdir()
    host = tmp_path / "host.bin"
    host.write_bytes(b"data")
    calls: dict[str, Callable[[], object]] = {
        "read": lambda: files.read("/etc/hostname"),
        "read_text": lambda: files.read_text("/etc/hostname"),
        "write": lambda: files.write("/tmp/f", b"data"),
        "write str": lambda: files.write("/tmp/f", "text", mode=0o600, owner=(1, 1)),
        "list": lambda: files.list("/tmp"),
        "list deep": lambda: files.list("/", depth=3),
        "exists": lambda: files.exists("/tmp"),
        "stat": lambda: files.stat("/tmp"),
        "make_dir": lambda: files.make_dir("/tmp/d"),
        "remove": lambda: files.remove("/tmp/d"),
        "rename": lambda: files.rename("/tmp/a", "/tmp/b"),
        "upload": lambda: files.upload(host, "/tmp/host.bin"),
        "upload str": lambda: files.upload(str(host), "/tmp/host.bin"),
        "download": lambda: files.download("/tmp/host.bin", tmp_path / "down.bin"),
    }
    for name, call in calls.items():
        with pytest.raises(capsule.UnsupportedError) as e:
            call()
        assert "probe" in str(e.value), name
    # A failed download leaves nothing on the host.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.bin"]
    assert c.commands.run("echo still").stdout == "still\n"


def test_arguments_are_checked_before_the_guest(probe: ProbeFactory, tmp_path: Path) -> None:
    c = probe()
    for call in (
        lambda: c.files.read("relative/path"),
        lambda: c.files.write("/tmp/", b"x"),  # names a directory
        lambda: c.files.list("/tmp", depth=0),
        lambda: c.files.upload(tmp_path, "/tmp/dir"),  # a host directory
    ):
        with pytest.raises(capsule.InvalidArgumentError):
            call()
    with pytest.raises(capsule.IoError) as e:
        c.files.upload(tmp_path / "missing", "/tmp/missing")
    assert e.value.path == tmp_path / "missing"
    with pytest.raises(TypeError):
        c.files.write("/tmp/f", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        c.files.write("/tmp/f", b"x", mode=0o10000)


def test_terminals_are_unsupported_in_the_probe(probe: ProbeFactory) -> None:
    c = probe()
    assert isinstance(c.pty, capsule.Pty)
    calls: list[Callable[[], object]] = [
        lambda: c.pty.create(),
        lambda: c.pty.create(rows=50, cols=132, cmd="top"),
        lambda: c.pty.create(cmd=["/bin/sh"], on_data=print),
        lambda: c.pty.connect(1),
    ]
    for call in calls:
        with pytest.raises(capsule.UnsupportedError):
            call()
    with pytest.raises(TypeError):
        c.pty.create(on_data=3)  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        c.pty.create(rows=70000)
