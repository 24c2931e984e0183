"""``capsule.commands.run`` in the foreground: results, options, timeouts, and what the probe
refuses (background commands and callbacks: ``test_background.py``)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

import pytest

import capsule
from capsule import Capsule

ProbeFactory = Callable[..., Capsule]


def test_run_returns_stdout_stderr_exit_code_and_duration(probe: ProbeFactory) -> None:
    c = probe()
    started = time.perf_counter()
    r = c.commands.run("echo hello world")
    took = time.perf_counter() - started
    assert isinstance(r, capsule.CommandResult)
    assert (r.stdout, r.stderr, r.exit_code) == ("hello world\n", "", 0)
    assert 0 < r.duration <= took
    assert (r.stdout_truncated, r.stderr_truncated) == (False, False)
    assert "exit_code=0" in repr(r)

    assert c.commands.run("exit 42").exit_code == 42  # a non-zero exit is not an error
    unknown = c.commands.run("frobnicate now")
    assert (unknown.exit_code, unknown.stdout) == (127, "")
    assert unknown.stderr == "probe: unknown command: frobnicate\n"
    assert [c.commands.run("count").stdout for _ in range(3)] == ["1\n", "2\n", "3\n"]


def test_env_and_cwd_are_refused_by_the_probe(probe: ProbeFactory) -> None:
    # The probe has no environment or directories: asking for them is an error, never
    # silently ignored (Linux capsules use them).
    c = probe()
    with pytest.raises(capsule.UnsupportedError):
        c.commands.run("echo opts", env={"A": "1", "B": "two"}, timeout=5)
    with pytest.raises(capsule.UnsupportedError):
        c.commands.run("echo opts", cwd="/tmp", timeout=5)
    assert c.commands.run("echo opts", timeout=5).stdout == "opts\n"
    with pytest.raises(TypeError):
        c.commands.run("echo x", env={"A": 1})  # type: ignore[dict-item]


def test_timeout_kills_the_command_not_the_capsule(probe: ProbeFactory) -> None:
    c = probe()
    assert c.commands.run("count").stdout == "1\n"
    started = time.monotonic()
    with pytest.raises(capsule.TimeoutError) as e:
        c.commands.run("spin 100000000000000", timeout=0.2)
    assert time.monotonic() - started < 5
    assert isinstance(e.value, TimeoutError)
    assert e.value.timeout_kind == "command"
    assert e.value.after == pytest.approx(0.2)
    assert "timed out" in str(e.value)
    assert c.is_running()
    assert c.commands.run("count").stdout == "2\n"  # guest memory survives


def test_timeout_zero_means_no_limit(probe: ProbeFactory) -> None:
    c = probe()
    assert c.commands.run("spin 1000000", timeout=0).exit_code == 0


def test_bad_timeouts_are_value_errors(probe: ProbeFactory) -> None:
    c = probe()
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            c.commands.run("echo x", timeout=bad)
        with pytest.raises(ValueError):
            c.wait_ready(timeout=bad)


def test_what_the_probe_cannot_do_is_unsupported(probe: ProbeFactory) -> None:
    # The probe runs its own verbs only: every option it cannot honour is refused, in the
    # foreground and in the background, and nothing runs.
    c = probe()
    refused: list[dict[str, object]] = [
        {"env": {"A": "1"}},
        {"cwd": "/tmp"},
        {"user": "root"},
        {"stdin": "input"},
        {"stdin": b"input"},
        {"clear_env": True},
    ]
    for options in refused:
        for background in (False, True):
            with pytest.raises(capsule.UnsupportedError) as e:
                c.commands.run("echo x", background=background, **options)  # type: ignore[call-overload]
            assert "probe" in str(e.value), options
    with pytest.raises(capsule.UnsupportedError):
        c.commands.run(["echo", "x"])  # argv form: Linux capsules
    with pytest.raises(capsule.UnsupportedError):
        c.commands.list()
    with pytest.raises(capsule.UnsupportedError):
        c.commands.connect(1)
    with pytest.raises(capsule.UnsupportedError):
        c.commands.kill(1)
    assert c.commands.run("count").stdout == "1\n"  # nothing ran before


def test_bad_arguments_are_type_and_value_errors(probe: ProbeFactory) -> None:
    c = probe()
    with pytest.raises(TypeError):
        c.commands.run("echo x", stdin=1)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        c.commands.run("echo x", on_stdout="not callable")  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        c.commands.run(42)  # type: ignore[call-overload]
    with pytest.raises(ValueError):
        c.commands.run([])
    h = c.commands.run("spin 100000000000", background=True)
    for bad in (0, 65, -1):
        with pytest.raises(ValueError):
            h.signal(bad)
    with pytest.raises(ValueError):
        h.wait(timeout=-1)
    h.kill()
    h.wait(timeout=10)


def test_output_limit_and_bytes(probe: ProbeFactory) -> None:
    c = probe()
    r = c.commands.run("echo callback", output_limit=4)
    assert (r.stdout, r.stdout_bytes, r.stdout_truncated) == ("call", b"call", True)
    r = c.commands.run("echo h\u00e9")
    assert r.stdout_bytes == "h\u00e9\n".encode() and r.stdout == "h\u00e9\n"
    assert r.stderr_bytes == b""
    assert c.commands.run("frobnicate").stderr_bytes.startswith(b"probe: unknown command")


def test_run_takes_the_parameters_of_the_issue() -> None:
    params = inspect.signature(capsule.Commands.run).parameters
    assert list(params)[:10] == [
        "self",
        "cmd",
        "env",
        "cwd",
        "timeout",
        "user",
        "background",
        "on_stdout",
        "on_stderr",
        "stdin",
    ]
    assert params["background"].default is False
    assert [params[k].kind for k in ("clear_env", "output_limit")] == [
        inspect.Parameter.KEYWORD_ONLY
    ] * 2
