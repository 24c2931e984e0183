"""``capsule.commands.run``: results, options, timeouts, and the parameters that are not
there yet."""

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


def test_commands_not_in_the_engine_yet_are_not_stubbed(probe: ProbeFactory) -> None:
    # Background commands, streaming callbacks, stdin and user arrive with the guest I/O
    # work; until then the parameters do not exist (no stubs that raise).
    c = probe()
    params = inspect.signature(capsule.Commands.run).parameters
    for missing in ("user", "background", "on_stdout", "on_stderr", "stdin"):
        assert missing not in params
        with pytest.raises(TypeError):
            c.commands.run("echo x", **{missing: None})
    assert not hasattr(c, "files") and not hasattr(c, "pty")
