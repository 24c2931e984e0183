"""What the Python binding costs: the same operations timed from Python and from Rust in
this one process, on the same engine and capsules, in alternating blocks, printed as JSON
lines like the Rust report's (``cargo run --release --bin report``).

    python python/bench.py            # with the SDK installed (pip install ./python)
    python python/bench.py --scale 0.2

Lines (microseconds, p50 and p99 over n samples):

- ``create_to_ready`` / ``py_create_to_ready``: creating a probe capsule (512 MiB) until it
  runs, from Rust (``Engine::create``) / from Python (``engine.create(..., wait=True)``).
- ``echo_roundtrip`` / ``py_echo_roundtrip``: ``commands().run("echo hi")`` /
  ``capsule.commands.run("echo hi")`` on one running probe.
- ``template_spawn_to_ready`` / ``py_template_spawn_to_ready``: creating a capsule from a
  template (4 MiB touched, 512 MiB) until it answers its first command.
- ``py_binding_overhead_<metric>``: the Python p50 minus the Rust p50 of that operation, the
  time the binding adds per call (the issue's target: at most 20 µs).

The Rust timings come from ``capsule._native._bench_echo`` and ``_bench_create``, private
helpers that run the loop in Rust with the GIL released.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Import the installed package, not the source tree beside this script.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import capsule  # noqa: E402
from capsule import _native  # noqa: E402

MEMORY_MB = 512


def summarize(samples: list[float]) -> dict[str, float]:
    """p50 and p99 the way the Rust report ranks them (nearest rank)."""
    ordered = sorted(samples)

    def rank(q: float) -> float:
        i = min(max(math.ceil(q * len(ordered)), 1), len(ordered)) - 1
        return ordered[i]

    return {"p50": rank(0.5), "p99": rank(0.99), "n": len(ordered)}


def line(metric: str, unit: str, summary: dict[str, float]) -> dict[str, object]:
    return {
        "metric": metric,
        "unit": unit,
        "p50": round(summary["p50"], 1),
        "p99": round(summary["p99"], 1),
        "n": int(summary["n"]),
    }


def emit(record: dict[str, object]) -> None:
    print(json.dumps(record), flush=True)


def alternate(
    blocks: int, per_block: int, python: Callable[[], float], rust: Callable[[int], list[float]]
) -> tuple[list[float], list[float]]:
    """``blocks`` rounds of ``per_block`` Python samples then ``per_block`` Rust samples, so
    both see the same host conditions."""
    py: list[float] = []
    rs: list[float] = []
    for _ in range(blocks):
        py.extend(python() for _ in range(per_block))
        rs.extend(rust(per_block))
    return py, rs


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every sample count (default 1)"
    )
    args = parser.parse_args()

    def count(n: int) -> int:
        return max(1, int(n * args.scale))

    with tempfile.TemporaryDirectory(prefix="capsule-bench-") as tmp:
        engine = capsule.Engine(data_dir=Path(tmp))
        native_engine = engine._native
        engine.create("probe", memory_mb=MEMORY_MB, wait=True).destroy()  # warm-up
        results: dict[str, tuple[list[float], list[float]]] = {}

        def create_py() -> float:
            t = time.perf_counter()
            c = engine.create("probe", memory_mb=MEMORY_MB, wait=True)
            took = (time.perf_counter() - t) * 1e6
            c.destroy()
            return took

        results["create_to_ready"] = alternate(
            10,
            count(20),
            create_py,
            lambda n: _native._bench_create(native_engine, "probe", n, memory_mb=MEMORY_MB),
        )

        c = engine.create("probe", memory_mb=MEMORY_MB, wait=True)
        run = c.commands.run
        for _ in range(100):
            run("echo hi")

        def echo_py() -> float:
            t = time.perf_counter()
            run("echo hi")
            return (time.perf_counter() - t) * 1e6

        results["echo_roundtrip"] = alternate(
            10, count(500), echo_py, lambda n: _native._bench_echo(c._native, n)
        )
        c.destroy()

        source = engine.create("probe", memory_mb=MEMORY_MB, wait=True)
        source.commands.run("touch 1024")
        source.snapshot("bench")
        source.destroy()

        def spawn_py() -> float:
            t = time.perf_counter()
            clone = engine.create("bench", wait=True)
            clone.commands.run("echo hi")
            took = (time.perf_counter() - t) * 1e6
            clone.destroy()
            return took

        results["template_spawn_to_ready"] = alternate(
            10,
            count(30),
            spawn_py,
            lambda n: _native._bench_create(native_engine, "bench", n, echo=True),
        )

    for metric, (py, rs) in results.items():
        rust_summary, py_summary = summarize(rs), summarize(py)
        emit(line(metric, "us", rust_summary))
        emit(line("py_" + metric, "us", py_summary))
        diff = py_summary["p50"] - rust_summary["p50"]
        emit(
            {
                "metric": "py_binding_overhead_" + metric,
                "unit": "us",
                "p50": round(diff, 1),
                "p99": round(diff, 1),
                "n": 1,
            }
        )


if __name__ == "__main__":
    main()
