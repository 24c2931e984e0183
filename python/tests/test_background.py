"""Background commands (``commands.run(..., background=True)`` and their ``CommandHandle``)
and output callbacks, with the probe: it runs its verbs in the background (their output
arrives at the end; only a kill controls them) and calls callbacks once, at the end. What
Linux capsules add (stdin, signals, streaming as it comes, list/connect): the nested
harness's ``examples/guest_io.py``."""

from __future__ import annotations

import _thread
import threading
import time
from collections.abc import Callable

import pytest

import capsule
from capsule import Capsule

ProbeFactory = Callable[..., Capsule]

SPIN = "spin 100000000000"  # minutes of busy loop: until killed


def test_background_returns_a_handle_and_wait_the_result(probe: ProbeFactory) -> None:
    c = probe()
    h = c.commands.run("echo spawned", background=True)
    assert isinstance(h, capsule.CommandHandle)
    assert h.pid == 0  # the probe has no processes
    r = h.wait()
    assert isinstance(r, capsule.CommandResult)
    assert (r.stdout, r.exit_code, r.signal) == ("spawned\n", 0, None)
    assert h.wait(timeout=5).exit_code == 0  # waiting again gives the same
    assert "pid=0" in repr(h)

    assert c.commands.run("exit 7", background=True).wait().exit_code == 7
    unknown = c.commands.run("frobnicate", background=True).wait(timeout=10)
    assert unknown.exit_code == 127 and "unknown command" in unknown.stderr
    # Counted by the guest like any command.
    c.commands.run("count", background=True).wait()
    assert c.commands.run("count").stdout == "2\n"


def test_iterating_takes_the_output_chunks(probe: ProbeFactory) -> None:
    c = probe()
    h = c.commands.run("echo chunk", background=True)
    assert list(h) == [("stdout", b"chunk\n")]
    assert h.wait().stdout == ""  # the iteration took it
    assert h.next_chunk() is None  # ended, nothing left

    h = c.commands.run("frobnicate", background=True)
    stream, data = next(iter(h))
    assert stream == "stderr" and data.startswith(b"probe: unknown command")
    assert h.next_chunk(timeout=5) is None

    spin = c.commands.run(SPIN, background=True)
    with pytest.raises(capsule.TimeoutError) as e:
        spin.next_chunk(timeout=0.1)
    assert e.value.timeout_kind == "wait"
    spin.kill()
    assert spin.next_chunk(timeout=10) is None


def test_wait_times_out_kill_ends_a_spin_and_the_capsule_carries_on(
    probe: ProbeFactory,
) -> None:
    c = probe()
    spin = c.commands.run(SPIN, background=True)
    started = time.monotonic()
    with pytest.raises(capsule.TimeoutError) as e:
        spin.wait(timeout=0.2)
    assert 0.15 < time.monotonic() - started < 5
    assert isinstance(e.value, TimeoutError)
    assert e.value.timeout_kind == "wait"
    assert e.value.after == pytest.approx(0.2)
    spin.kill()
    r = spin.wait(timeout=10)
    assert (r.exit_code, r.signal) == (-9, 9)
    # Only a kill: other signals, stdin are not the probe's.
    with pytest.raises(capsule.UnsupportedError):
        spin.signal(15)
    with pytest.raises(capsule.UnsupportedError):
        spin.send_stdin("x")
    with pytest.raises(capsule.UnsupportedError):
        spin.close_stdin()
    assert c.commands.run("echo usable").stdout == "usable\n"


def test_the_command_timeout_kills_a_background_command(probe: ProbeFactory) -> None:
    c = probe()
    h = c.commands.run(SPIN, background=True, timeout=0.2)
    started = time.monotonic()
    with pytest.raises(capsule.TimeoutError) as e:
        h.wait()
    assert e.value.timeout_kind == "command"
    assert time.monotonic() - started < 10
    # No timeout by default in the background (30 s in the foreground).
    h = c.commands.run(SPIN, background=True)
    with pytest.raises(capsule.TimeoutError):
        h.wait(timeout=0.3)
    h.kill()


def test_a_blocked_wait_lets_ctrl_c_through(probe: ProbeFactory) -> None:
    c = probe()
    spin = c.commands.run(SPIN, background=True)
    timer = threading.Timer(0.3, _thread.interrupt_main)
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        spin.wait()
    assert time.monotonic() - started < 5
    timer.join()
    spin.kill()  # the command ran on
    assert spin.wait(timeout=10).signal == 9


def test_waits_release_the_gil(probe: ProbeFactory) -> None:
    c = probe()
    spin = c.commands.run(SPIN, background=True)
    ticks = 0
    stop = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    with pytest.raises(capsule.TimeoutError):
        spin.wait(timeout=0.5)
    stop.set()
    ticker.join()
    assert ticks > 20
    spin.kill()


def test_callbacks_get_the_output_in_the_foreground(probe: ProbeFactory) -> None:
    c = probe()
    out: list[str] = []
    err: list[str] = []
    threads: list[int] = []

    def on_out(text: str) -> None:
        out.append(text)
        threads.append(threading.get_ident())

    r = c.commands.run("echo to the callback", on_stdout=on_out, on_stderr=err.append)
    assert out == ["to the callback\n"] and err == []
    assert r.stdout == "to the callback\n"  # kept in the result too
    # A probe command's callback runs on the calling thread, at the end.
    assert threads == [threading.get_ident()]
    c.commands.run("frobnicate", on_stdout=out.append, on_stderr=err.append)
    assert err == ["probe: unknown command: frobnicate\n"]
    # Non-ASCII text arrives whole.
    c.commands.run("echo h\u00e9 \u2713", on_stdout=out.append)
    assert out[-1] == "h\u00e9 \u2713\n"


def test_callbacks_of_a_background_command_run_on_its_own_thread(
    probe: ProbeFactory,
) -> None:
    c = probe()
    got: list[tuple[str, int]] = []
    h = c.commands.run(
        "echo background", background=True, on_stdout=lambda t: got.append((t, threading.get_ident()))
    )
    r = h.wait(timeout=10)
    assert r.stdout == "background\n"
    assert [t for t, _ in got] == ["background\n"]
    assert got[0][1] != threading.get_ident()
    # Chunks given to a callback never reach the iteration.
    h = c.commands.run("echo elsewhere", background=True, on_stdout=lambda t: None)
    assert list(h) == []


def test_a_callback_may_call_the_engine(probe: ProbeFactory) -> None:
    # No engine lock is held while a callback runs: it may run commands itself.
    c = probe()
    inner: list[str] = []

    def nested(text: str) -> None:
        inner.append(c.commands.run("count").stdout)
        inner.append(c.get_info().status)

    c.commands.run("echo outer", on_stdout=nested)
    c.commands.run("echo outer", background=True, on_stdout=nested).wait(timeout=10)
    assert inner == ["1\n", "running", "2\n", "running"]


def test_an_exception_in_a_callback_is_raised_by_run_or_wait(probe: ProbeFactory) -> None:
    c = probe()
    calls = 0

    def boom(text: str) -> None:
        nonlocal calls
        calls += 1
        raise ValueError(f"boom: {text.strip()}")

    with pytest.raises(ValueError, match="boom: foreground"):
        c.commands.run("echo foreground", on_stdout=boom)
    h = c.commands.run("echo background", background=True, on_stderr=boom, on_stdout=boom)
    with pytest.raises(ValueError, match="boom: background"):
        h.wait(timeout=10)
    with pytest.raises(ValueError):
        h.wait(timeout=10)  # the same, every time
    assert calls == 2
    assert c.commands.run("echo fine").stdout == "fine\n"  # the capsule carries on


def test_text_chunks_are_decoded_across_chunk_boundaries() -> None:
    # What a text callback receives for chunks that cut UTF-8 sequences (the probe sends its
    # output in one chunk; Linux commands stream it in many).
    decode = capsule._native._decode_utf8_chunks
    text = "h\u00e9llo w\u00f6rld \u2713 \U0001f600".encode()
    for cut in range(len(text) + 1):
        assert "".join(decode([text[:cut], text[cut:]])) == text.decode()
    assert decode([b"a\xc3", b"\xa9b"]) == ["a", "\u00e9b"]
    assert decode([b"a\xffb"]) == ["a\ufffdb"]  # invalid: replaced
    assert decode([b"end\xe2\x9c"]) == ["end", "\ufffd"]  # cut at the very end


def test_many_background_commands_at_once(make_engine: Callable[..., capsule.Engine]) -> None:
    engine = make_engine()
    c = engine.create("probe", vcpus=4, memory_mb=32, wait=True)
    handles = [c.commands.run(f"echo {i}", background=True) for i in range(16)]
    assert sorted(h.wait(timeout=30).stdout for h in handles) == sorted(
        f"{i}\n" for i in range(16)
    )
