"""Benchmark: the plugin's cost per scenario, side by side with task.apply() and start_worker.

    python bench/run.py            # the table (about a minute on a 2-core machine)
    python bench/run.py --quick    # fewer rounds, for a smoke run
    python bench/run.py --profile  # also the top of a cProfile of each scenario kind

Every figure is the median of several rounds measured in this one process, and
every ratio is computed within this run (the machine is noisy; compare ratios).
It reports; it gates nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import pstats
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from celery import Celery

from pytest_celery_faults import CeleryFaults

effects: list[int] = []


def side_effect(n: int) -> None:
    effects.append(n)


def make_app(name: str) -> tuple[Celery, Any, Any, Any]:
    app = Celery(name, set_as_current=False)

    @app.task(name="bench.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="bench.add_late", shared=False, acks_late=True, reject_on_worker_lost=True)
    def add_late(x: int, y: int) -> int:
        return x + y

    @app.task(name="bench.ten", shared=False, acks_late=True, reject_on_worker_lost=True)
    def ten() -> None:
        for n in range(10):
            side_effect(n)

    return app, add, add_late, ten


def per_call(function: Callable[[], object], calls: int, rounds: int) -> float:
    """Median seconds per call over ``rounds`` rounds of ``calls`` calls."""
    samples = []
    for _ in range(rounds):
        gc.collect()
        start = time.perf_counter()
        for _ in range(calls):
            function()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def start_worker_round_trip(calls: int, rounds: int) -> float:
    """celery.contrib.testing's start_worker on the memory transport, tuned (1 ms polling)."""
    from celery.contrib.testing.worker import start_worker

    app = Celery("bench-start-worker", set_as_current=False)
    app.conf.broker_url = "memory://"
    app.conf.broker_transport_options = {"polling_interval": 0.001}
    app.conf.result_backend = "cache+memory://"

    @app.task(name="bench.sw_add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        add.delay(1, 2).get(timeout=10, interval=0.001)  # warm up
        return per_call(lambda: add.delay(1, 2).get(timeout=10, interval=0.001), calls, rounds)


def sweep_rate(harness: CeleryFaults, task: Any, pairs: bool, rounds: int) -> tuple[float, int]:
    """Scenarios per second of a full sweep of ``task`` (every kind, every boundary)."""
    samples, count = [], 0
    for _ in range(rounds):
        start = time.perf_counter()
        report = harness.sweep(task.s(), lambda: len(effects), effects.clear, pairs=pairs)
        elapsed = time.perf_counter() - start
        count = len(report.scenarios) + 1  # and the baseline
        samples.append(count / elapsed)
    return statistics.median(samples), count


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_over(harness: CeleryFaults, task: Any, scenarios: int) -> tuple[float, float, float]:
    """Peak RSS before and after ``scenarios`` reset-and-run scenarios, and traced growth."""
    for _ in range(500):  # warm caches before measuring
        harness.reset()
        harness.run(task.s(1, 2), "power_loss@0")
    gc.collect()
    before = rss_mib()
    tracemalloc.start()
    first = tracemalloc.take_snapshot()
    for _ in range(scenarios):
        harness.reset()
        harness.run(task.s(1, 2), "power_loss@0")
    gc.collect()
    growth = sum(
        stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(first, "filename")
    )
    tracemalloc.stop()
    return before, rss_mib(), growth / 1024


def profile(label: str, function: Callable[[], object], calls: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        function()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(18)
    return f"--- {label}: cProfile, cumulative, {calls} calls ---\n{out.getvalue()}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (smoke run)")
    parser.add_argument("--profile", action="store_true", help="print cProfile tops too")
    options = parser.parse_args(argv)
    # Celery logs every WorkerLostError it handles; the scenarios cause thousands.
    logging.getLogger("celery").setLevel(logging.CRITICAL)
    calls, rounds = (200, 3) if options.quick else (1000, 7)
    memory_scenarios = 2000 if options.quick else 10_000

    app, add, add_late, ten = make_app("bench")
    rows: list[tuple[str, str, str]] = []
    floor = per_call(lambda: add.apply((1, 2)), calls, rounds)
    rows.append(("task.apply() of a trivial task (the floor)", f"{floor * 1e6:8.1f} us", "1.0x"))

    def ratio(seconds: float) -> str:
        return f"{seconds / floor:.1f}x"

    with CeleryFaults(app) as harness:
        harness.track(f"{__name__}.side_effect")
        run = per_call(lambda: harness.run(add.s(1, 2)), calls, rounds)
        rows.append(("fault-free run(), one active harness", f"{run * 1e6:8.1f} us", ratio(run)))

        # Where a fault-free run's time goes: Celery's own publish path (send_task,
        # as_task_v2, kombu's Producer) against everything after it.
        def publish_rounds() -> float:
            harness.reset()
            return per_call(lambda: add.apply_async((1, 2)), calls, 1)

        publish = statistics.median(publish_rounds() for _ in range(rounds))
        harness.reset()
        rows.append(
            ("  of which apply_async() publishing it", f"{publish * 1e6:8.1f} us", ratio(publish))
        )
        rows.append(
            (
                "  of which delivery, Request, trace, ack, result",
                f"{(run - publish) * 1e6:8.1f} us",
                ratio(run - publish),
            )
        )

        def reset_run(spec: str | None) -> Callable[[], object]:
            def scenario() -> object:
                harness.reset()
                return harness.run(add_late.s(1, 2), *([spec] if spec else []))

            return scenario

        for label, spec in (("fault-free", None), ("sigkill@0 + redelivery", "sigkill@0")):
            cost = per_call(reset_run(spec), calls, rounds)
            rows.append((f"{label}, reset() per scenario", f"{cost * 1e6:8.1f} us", ratio(cost)))
        power = per_call(reset_run("power_loss@0"), calls, rounds)
        rows.append(
            (
                "power_loss@0 + redelivery, reset() per scenario",
                f"{power * 1e6:8.1f} us",
                ratio(power),
            )
        )

    def fresh_harness() -> object:
        with CeleryFaults(app) as fresh:
            return fresh.run(add.s(1, 2))

    fresh = per_call(fresh_harness, calls // 4, rounds)
    rows.append(
        ("fault-free run(), fresh harness per scenario", f"{fresh * 1e6:8.1f} us", ratio(fresh))
    )

    worker = start_worker_round_trip(max(calls // 10, 20), rounds)
    rows.append(
        (
            "start_worker round trip, memory://, 1 ms polling",
            f"{worker * 1e6:8.1f} us",
            ratio(worker),
        )
    )
    rows.append(("  start_worker / fault-free run()", f"{worker / run:.1f}x faster", ""))

    with CeleryFaults(app) as harness:
        harness.track(f"{__name__}.side_effect")
        singles, single_count = sweep_rate(harness, ten, pairs=False, rounds=max(rounds // 2, 1))
        paired, pair_count = sweep_rate(harness, ten, pairs=True, rounds=1)
        rows.append(
            (f"sweep, 10 effects, singles ({single_count} scenarios)", f"{singles:8.0f} /s", "")
        )
        rows.append(
            (f"sweep, 10 effects, with pairs ({pair_count} scenarios)", f"{paired:8.0f} /s", "")
        )
        before, after, growth = memory_over(harness, add_late, memory_scenarios)
        rows.append(
            (
                f"peak RSS before / after {memory_scenarios} scenarios",
                f"{before:.0f} / {after:.0f} MiB",
                f"traced {growth:+.0f} KiB",
            )
        )

    width = max(len(label) for label, _, _ in rows)
    print(f"pytest-celery-faults benchmark ({rounds} rounds of {calls} calls, medians)")
    for label, value, note in rows:
        print(f"{label:<{width}}  {value:>16}  {note}")

    if options.profile:
        with CeleryFaults(app) as harness:
            print(profile("fault-free run()", lambda: harness.run(add.s(1, 2)), 2000))
            print(
                profile(
                    "power_loss@0", lambda: harness.run(add_late.s(1, 2), "power_loss@0"), 2000
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
