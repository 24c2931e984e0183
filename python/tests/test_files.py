"""``capsule.files`` and ``capsule.pty`` with the probe, which has neither: every call is
refused with ``UnsupportedError`` (never a silent no-op), after the checks that need no guest
(absolute paths, the host side of a transfer, file objects). The file object adapters of
``read_into``/``write_from`` through a private guest-free copy. Their behaviour in a Linux
capsule: ``examples/guest_io.py`` in the nested harness."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path

import pytest

import capsule
from capsule import Capsule

ProbeFactory = Callable[..., Capsule]


class Recorder(io.BytesIO):
    """A BytesIO that counts the calls of ``read`` and ``write``."""

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(data)
        self.calls = 0

    def read(self, size: int | None = -1, /) -> bytes:
        self.calls += 1
        return super().read(size)

    def write(self, data: object, /) -> int:
        self.calls += 1
        return super().write(data)  # type: ignore[arg-type]


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
        "read_into": lambda: files.read_into("/etc/hostname", sink),
        "write_from": lambda: files.write_from("/tmp/f", source),
        "write_from mode": lambda: files.write_from("/tmp/f", source, mode=0o600, owner=(1, 1)),
        "with_timeout read": lambda: files.with_timeout(30).read("/etc/hostname"),
        "with_timeout write_from": lambda: files.with_timeout(0.5).write_from("/tmp/f", source),
        "with_timeout download": lambda: files.with_timeout(5).download(
            "/tmp/host.bin", tmp_path / "down.bin"
        ),
    }
    sink = Recorder()
    source = Recorder(b"data")
    for name, call in calls.items():
        with pytest.raises(capsule.UnsupportedError) as e:
            call()
        assert "probe" in str(e.value), name
    # A failed download leaves nothing on the host; the file objects were never used.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["host.bin"]
    assert (sink.calls, sink.getvalue(), source.calls, source.tell()) == (0, b"", 0, 0)
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


def test_streaming_arguments_are_checked_before_the_guest(probe: ProbeFactory) -> None:
    c = probe()
    calls: list[Callable[[], object]] = [
        lambda: c.files.read_into("relative/path", io.BytesIO()),
        lambda: c.files.write_from("/tmp/", io.BytesIO(b"x")),  # names a directory
        lambda: c.files.with_timeout(30).write_from("tmp/f", io.BytesIO(b"x")),
    ]
    for call in calls:
        with pytest.raises(capsule.InvalidArgumentError):
            call()

    class NotCallable:
        write = read = 3

    for bad in (42, b"bytes", NotCallable()):
        with pytest.raises(TypeError, match="write"):
            c.files.read_into("/tmp/f", bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="read"):
            c.files.write_from("/tmp/f", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        c.files.write_from("/tmp/f", io.BytesIO(b"x"), mode=0o10000)


def test_with_timeout_makes_another_files_object(probe: ProbeFactory) -> None:
    c = probe()
    files = c.files
    quick = files.with_timeout(30)
    assert isinstance(quick, capsule.Files) and quick is not files
    assert repr(quick) == f'Files(capsule_id="{c.capsule_id}", timeout=30.0)'
    # The original keeps the default, and another timeout replaces the first.
    assert repr(files) == f'Files(capsule_id="{c.capsule_id}")'
    assert repr(quick.with_timeout(0.25)).endswith("timeout=0.25)")
    assert repr(files.with_timeout(365 * 24 * 3600)).endswith("timeout=31536000.0)")
    for bad in (-1, -0.001, 0, math.nan, math.inf, -math.inf, 365 * 24 * 3600 + 1, 1e30):
        with pytest.raises(ValueError, match="seconds"):
            files.with_timeout(bad)
    with pytest.raises(TypeError):
        files.with_timeout("30")  # type: ignore[arg-type]


def varied(n: int) -> bytes:
    """``n`` bytes that differ from chunk to chunk (a shifted copy would show)."""
    return bytes((i * 7 + i // 251) % 256 for i in range(n))


def test_file_objects_stream_whole() -> None:
    data = varied(3 * 1024 * 1024 + 17)
    src, dst = Recorder(data), Recorder()
    assert capsule._native._copy_file_objects(src, dst) == len(data)
    assert dst.getvalue() == data
    # One read per chunk (plus the empty one at the end), one write per chunk.
    assert (src.calls, dst.calls) == (5, 4)
    empty = io.BytesIO()
    assert capsule._native._copy_file_objects(io.BytesIO(), empty) == 0
    assert empty.getvalue() == b""


def test_file_objects_may_be_short_and_give_bytearrays() -> None:
    data = varied(300_000)

    class Trickle:
        """Reads give at most 1000 bytes, as bytearrays; writes take at most 777."""

        def __init__(self) -> None:
            self.pos = 0
            self.out = bytearray()

        def read(self, size: int, /) -> bytearray:
            piece = data[self.pos : self.pos + min(size, 1000)]
            self.pos += len(piece)
            return bytearray(piece)

        def write(self, chunk: bytes, /) -> int:
            assert isinstance(chunk, bytes)
            self.out += chunk[:777]
            return min(len(chunk), 777)

    t = Trickle()
    assert capsule._native._copy_file_objects(t, t) == len(data)
    assert t.out == data

    # A write that returns None took everything.
    parts: list[bytes] = []

    class Appender:
        def write(self, chunk: bytes, /) -> None:
            parts.append(chunk)

    assert capsule._native._copy_file_objects(io.BytesIO(data), Appender()) == len(data)
    assert b"".join(parts) == data


def test_exceptions_of_file_objects_are_raised_as_they_are() -> None:
    class Stop(Exception):
        pass

    class FailingWriter:
        def __init__(self) -> None:
            self.calls = 0

        def write(self, chunk: bytes, /) -> int:
            self.calls += 1
            raise Stop("no room")

    writer = FailingWriter()
    with pytest.raises(Stop, match="no room"):
        capsule._native._copy_file_objects(io.BytesIO(varied(3_000_000)), writer)
    assert writer.calls == 1  # the transfer ended at the first exception

    class FailingReader:
        def __init__(self) -> None:
            self.calls = 0

        def read(self, size: int, /) -> bytes:
            self.calls += 1
            if self.calls == 2:
                raise KeyError("gone")
            return b"x" * size

    with pytest.raises(KeyError, match="gone"):
        capsule._native._copy_file_objects(FailingReader(), io.BytesIO())

    class WrongType:
        def read(self, size: int, /) -> str:
            return "text"

    with pytest.raises(TypeError, match="bytes"):
        capsule._native._copy_file_objects(WrongType(), io.BytesIO())  # type: ignore[arg-type]

    class TooMuch:
        def read(self, size: int, /) -> bytes:
            return b"y" * (size + 1)

    with pytest.raises(ValueError, match="returned"):
        capsule._native._copy_file_objects(TooMuch(), io.BytesIO())

    class OverReporting:
        def write(self, chunk: bytes, /) -> int:
            return len(chunk) + 1

    with pytest.raises(ValueError, match="took"):
        capsule._native._copy_file_objects(io.BytesIO(b"abc"), OverReporting())

    # A text file's write refuses bytes: its own TypeError.
    with pytest.raises(TypeError):
        capsule._native._copy_file_objects(io.BytesIO(b"abc"), io.StringIO())  # type: ignore[arg-type]


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
