"""Blocking calls release the GIL: Python threads use capsules in parallel."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

import capsule
from capsule import Capsule

ProbeFactory = Callable[..., Capsule]

THREADS = 8


def run_all(capsules: list[Capsule], job: Callable[[Capsule], None]) -> float:
    """Runs ``job`` on every capsule, each in its own thread, all released together; the
    wall time from release to the last one done."""
    barrier = threading.Barrier(len(capsules) + 1)
    errors: list[BaseException] = []

    def work(c: Capsule) -> None:
        barrier.wait()
        try:
            job(c)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(c,)) for c in capsules]
    for t in threads:
        t.start()
    barrier.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    took = time.perf_counter() - started
    assert not errors, errors
    return took


def test_eight_threads_on_eight_capsules_take_the_time_of_one(probe: ProbeFactory) -> None:
    # Each command takes 0.3 s of wall time whatever the host's core count: it spins until
    # its timeout kills it (the capsule carries on). Serially eight take 2.4 s; in parallel
    # about 0.3 s, unless something (the GIL) serializes them.
    capsules = [probe() for _ in range(THREADS)]

    def job(c: Capsule) -> None:
        with pytest.raises(capsule.TimeoutError):
            c.commands.run("spin 100000000000000", timeout=0.3)
        assert c.commands.run("echo after").stdout == "after\n"

    serial_started = time.perf_counter()
    for c in capsules:
        job(c)
    serial = time.perf_counter() - serial_started
    parallel = run_all(capsules, job)
    assert serial >= THREADS * 0.3
    assert parallel < 0.6 * serial, (parallel, serial)
    assert parallel < 3 * 0.3 + 0.5, (parallel, serial)  # about the time of one


@pytest.mark.skipif(
    (os.cpu_count() or 1) < THREADS,
    reason="eight busy vCPUs need eight host cores to run at once",
)
def test_eight_busy_commands_run_at_once_on_enough_cores(probe: ProbeFactory) -> None:
    capsules = [probe() for _ in range(THREADS)]
    n = spin_for(capsules[0], 0.2)
    serial_started = time.perf_counter()
    for c in capsules:
        c.commands.run(f"spin {n}", timeout=0)
    serial = time.perf_counter() - serial_started
    parallel = run_all(capsules, lambda c: c.commands.run(f"spin {n}", timeout=0) and None)
    assert parallel < 0.6 * serial, (parallel, serial)


def spin_for(c: Capsule, seconds: float) -> int:
    """A ``spin`` count that keeps a probe vCPU busy for about ``seconds``."""
    n = 1_000_000
    while True:
        started = time.perf_counter()
        c.commands.run(f"spin {n}", timeout=0)
        took = time.perf_counter() - started
        if took >= 0.05 or n >= 1 << 40:
            return int(n * seconds / took)
        n *= 4


def test_python_threads_run_while_a_command_runs(probe: ProbeFactory) -> None:
    # A thread counting in pure Python keeps counting while the main thread waits in a
    # command: the command does not hold the GIL.
    c = probe()
    stop = threading.Event()
    ticks = [0]

    def count() -> None:
        while not stop.is_set():
            ticks[0] += 1

    counter = threading.Thread(target=count)
    counter.start()
    try:
        time.sleep(0.05)
        before = ticks[0]
        with pytest.raises(capsule.TimeoutError):
            c.commands.run("spin 100000000000000", timeout=0.3)
        during = ticks[0] - before
    finally:
        stop.set()
        counter.join()
    assert during > 1000, during


def test_lifecycle_calls_from_many_threads(engine: capsule.Engine) -> None:
    # Creates, pauses, resumes and destroys from eight threads at once.
    def job(_: object) -> None:
        c = engine.create("probe", memory_mb=32, wait=True)
        for _ in range(3):
            c.commands.run("count")
            c.pause()
            c.resume()
        assert c.commands.run("count").stdout == "4\n"
        c.destroy()

    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []

    def work() -> None:
        barrier.wait()
        try:
            job(None)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert engine.list() == []
