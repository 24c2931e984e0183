"""A capsule's lifecycle through the Python API: create (with and without wait),
wait_ready, is_running, get_info, pause, resume, ping, auto-pause, destroy, context
managers."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

import pytest

import capsule
from capsule import Capsule, Engine

ProbeFactory = Callable[..., Capsule]


def test_create_wait_runs_at_once(probe: ProbeFactory) -> None:
    c = probe(vcpus=2, memory_mb=64)
    assert re.fullmatch(r"cl-[a-z0-9]+", c.capsule_id)
    assert c.is_running()
    assert c.status == "running"
    info = c.get_info()
    assert isinstance(info, capsule.CapsuleInfo)
    assert (info.capsule_id, info.status, info.template) == (c.capsule_id, "running", "probe")
    assert (info.vcpus, info.memory_mb, info.timeout, info.error, info.ended) == (2, 64, 0.0, None, None)
    assert isinstance(info.created_at, datetime)
    assert info.created_at.tzinfo == timezone.utc
    assert info.created_at <= info.last_activity <= datetime.now(timezone.utc)
    assert "cl-" in repr(c) and "running" in repr(info)


def test_create_without_wait_then_wait_ready(engine: Engine) -> None:
    c = engine.create("probe", memory_mb=32)  # wait=False is the default
    assert c.get_info().status in ("pending", "starting", "running")
    c.wait_ready(timeout=30, interval=0.01)
    assert c.is_running()
    assert c.commands.run("echo up").stdout == "up\n"


def test_wait_ready_times_out_as_a_builtin_timeout_error(
    make_engine: Callable[..., Engine],
) -> None:
    # One start slot: capsules created in a burst wait behind each other's boots, so a
    # wait_ready with no time to spare on the last one finds it pending or starting.
    engine = make_engine(max_concurrent_starts=1, shell_pool_size=0)
    timeouts = 0
    for _ in range(10):
        burst = [engine.create("probe", memory_mb=32) for _ in range(8)]
        try:
            burst[-1].wait_ready(timeout=0, interval=0.001)
        except TimeoutError as e:  # the builtin
            assert isinstance(e, capsule.TimeoutError)
            assert isinstance(e, capsule.CapsuleError)
            assert (e.timeout_kind, e.after) == ("wait_ready", 0.0)
            timeouts += 1
        for c in burst:
            c.wait_ready()
            c.destroy()
        if timeouts:
            break
    assert timeouts > 0


def test_wait_ready_raises_runtime_error_when_paused_stopped_or_crashed(
    probe: ProbeFactory,
) -> None:
    paused = probe()
    paused.pause()
    with pytest.raises(RuntimeError) as e:
        paused.wait_ready(timeout=1)
    assert isinstance(e.value, capsule.InvalidStateError)
    assert (e.value.status, e.value.capsule_id) == ("paused", paused.capsule_id)

    stopped = probe()
    stopped.destroy()
    with pytest.raises(RuntimeError):
        stopped.wait_ready(timeout=1)

    crashed = probe()
    with pytest.raises(capsule.GuestCrashedError):
        crashed.commands.run("crash")
    with pytest.raises(RuntimeError) as e:
        crashed.wait_ready(timeout=1)
    assert isinstance(e.value, capsule.GuestCrashedError)
    assert "triple fault" in e.value.reason
    assert crashed.get_info().status == "error"
    assert "triple fault" in (crashed.get_info().error or "")


def test_wait_ready_wakes_when_a_waiting_capsule_is_destroyed(engine: Engine) -> None:
    # Whether the destroy lands before or during the wait, the wait ends in RuntimeError (or
    # returns, if the capsule was already running when waiting began and destroyed after).
    c = engine.create("probe", memory_mb=32)
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            c.wait_ready(timeout=10)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    t = threading.Thread(target=wait)
    t.start()
    c.destroy()
    t.join(timeout=10)
    assert not t.is_alive()
    assert outcome[0] is None or isinstance(outcome[0], RuntimeError)


def test_pause_resume_keeps_guest_state(probe: ProbeFactory) -> None:
    c = probe()
    assert c.commands.run("count").stdout == "1\n"
    c.pause()
    c.pause()  # pausing a paused capsule does nothing
    info = c.get_info()
    assert info.status == "paused" and not c.is_running()
    with pytest.raises(capsule.InvalidStateError):
        c.commands.run("echo no")
    c.resume()
    c.wait_ready()
    assert c.commands.run("count").stdout == "2\n"
    c.resume()  # resuming a running capsule does nothing


def test_destroy_is_final_and_idempotent(engine: Engine, probe: ProbeFactory) -> None:
    c = probe()
    c.destroy()
    assert c.status == "stopped"
    c.destroy()  # the same outcome: nothing to do
    assert engine.list() == []
    with pytest.raises(capsule.NotFoundError):
        engine.get(c.capsule_id)
    with pytest.raises(capsule.NotFoundError):
        engine.destroy(c.capsule_id)


def test_context_manager_destroys_on_exit(engine: Engine) -> None:
    with engine.create("probe", memory_mb=32, wait=True) as c:
        assert c.commands.run("echo in").stdout == "in\n"
    assert c.status == "stopped"
    assert engine.list() == []

    with pytest.raises(ZeroDivisionError):
        with engine.create("probe", memory_mb=32, wait=True) as d:
            1 / 0
    assert d.status == "stopped"


def test_ping_and_auto_pause(probe: ProbeFactory) -> None:
    c = probe(timeout=0.3)
    assert c.get_info().timeout == pytest.approx(0.3)
    # Pinging (like running commands) keeps it running past its timeout...
    until = time.monotonic() + 0.9
    while time.monotonic() < until:
        c.ping()
        assert c.is_running()
        time.sleep(0.05)
    # ...and idleness pauses it.
    deadline = time.monotonic() + 10
    while c.status != "paused" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert c.status == "paused"
    with pytest.raises(capsule.InvalidStateError):
        c.ping()
    c.resume()
    assert c.commands.run("echo back").stdout == "back\n"


def test_zero_timeout_never_auto_pauses(probe: ProbeFactory) -> None:
    c = probe(timeout=0)
    time.sleep(0.2)
    assert c.is_running()


def test_console_log_is_empty_for_the_probe(probe: ProbeFactory) -> None:
    # The probe has no serial console; Linux capsules return theirs.
    assert probe().console_log() == ""
