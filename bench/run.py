"""Benchmark: the plugin's cost per scenario, against task.apply() and the faithful floor.

    python bench/run.py                  # CPU time (process_time), the full table
    python bench/run.py --timer wall     # wall-clock time instead
    python bench/run.py --instructions   # instruction counts under valgrind (noise-free)
    python bench/run.py --quick          # fewer calls, for a smoke run
    python bench/run.py --profile        # also the top of a cProfile of each scenario kind

Two anchors are measured in the same run as everything else, and every cost is
reported as a ratio to both:

- ``task.apply()`` of a trivial task (the eager call, no message at all);
- the *floor*: Celery's own steps of one real delivery and nothing of ours:
  ``Task.apply_async`` to kombu's ``memory://`` transport, ``basic_get`` (a
  kombu ``Message``), Celery's ``Request``, an in-process pool that calls
  ``trace_task_ret`` (the trace and the result store), the ack, and reading the
  result back from the backend.

The machine is noisy: ``--timer cpu`` (the default) counts this process's CPU
time, and ``--instructions`` runs the benchmark under ``valgrind
--tool=callgrind``, counting the instructions between two markers (calls of
``os.getppid``, on which callgrind dumps its counters) around each row. Under
valgrind the threaded row (start_worker) and the memory rows are left out.
It reports; it gates nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import logging
import os
import pstats
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults import _celery_internals as internals

effects: list[int] = []


def side_effect(n: int) -> None:
    effects.append(n)


def plain_effect(n: int) -> None:
    """The same as ``side_effect``, never tracked: the anchor of a tracked effect's cost."""
    effects.append(n)


@dataclass
class Tasks:
    app: Celery
    add: Any
    add_late: Any
    ten: Any  # ten tracked side effects
    ten_plain: Any  # the same ten calls, untracked


def make_app(name: str) -> Tasks:
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

    @app.task(name="bench.ten_plain", shared=False, acks_late=True, reject_on_worker_lost=True)
    def ten_plain() -> None:
        for n in range(10):
            plain_effect(n)

    return Tasks(app, add, add_late, ten, ten_plain)


# -- the floor: Celery's own steps of one delivery, none of ours --------------------


class FloorPool:
    """billiard's ``apply_async`` contract, run inline: accept, run the target, callback."""

    limit = 1

    def apply_async(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[[int, float], Any] | None = None,
        **options: Any,
    ) -> None:
        if accept_callback is not None:
            accept_callback(os.getpid(), time.monotonic())
        value = target(*args, **(kwargs or {}))
        if callback is not None:
            callback(value)


def floor_pipeline() -> Callable[[], object]:
    """One scenario of the floor: publish, get, Request, trace, ack, read the result."""
    app = Celery("bench-floor", set_as_current=False)
    app.conf.broker_url = "memory://"
    app.conf.result_backend = "cache+memory://"
    app.conf.task_default_queue = "bench-floor"

    @app.task(name="bench.floor_add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    hostname = "celery@floor"
    pool = FloorPool()
    request_class = internals.request_class_for(add, pool, hostname, app)
    accept = internals.accept_content(app)
    channel = app.connection_for_read().default_channel
    utc = app.uses_utc_timezone()
    backend = app.backend

    def scenario() -> object:
        sent = add.apply_async((1, 2))
        message = channel.basic_get("bench-floor")
        message.accept = accept
        request = request_class(
            message,
            on_ack=message.ack_log_error,
            on_reject=message.reject_log_error,
            app=app,
            hostname=hostname,
            task=add,
            connection_errors=(),
            body=message.body,
            headers=message.headers,
            decoded=False,
            utc=utc,
        )
        with internals.in_worker_child(app, "celery@floor"):  # as in a worker's child
            request.execute_using_pool(pool)
        meta = backend.get_task_meta(sent.id, cache=False)
        if meta["result"] != 3:
            raise AssertionError(f"the floor pipeline stored {meta!r}")
        return meta

    scenario()  # declares the queue, builds the tracer
    return scenario


def start_worker_round_trip() -> tuple[Callable[[], object], Callable[[], None]]:
    """celery.contrib.testing's start_worker on the memory transport, tuned (1 ms polling)."""
    from celery.contrib.testing.worker import start_worker

    app = Celery("bench-start-worker", set_as_current=False)
    app.conf.broker_url = "memory://"
    app.conf.broker_transport_options = {"polling_interval": 0.001}
    app.conf.result_backend = "cache+memory://"

    @app.task(name="bench.sw_add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    worker = start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10)
    worker.__enter__()
    add.delay(1, 2).get(timeout=10, interval=0.001)  # warm up
    return (
        lambda: add.delay(1, 2).get(timeout=10, interval=0.001),
        lambda: worker.__exit__(None, None, None),
    )


class Carrier:
    """A thread that runs what it is handed and hands back, on bare locks, as a child's does.

    The engine runs every execution on a child's thread of its own, never the
    test's (``engine/scheduler.py``): a fault-free scenario pays one hand-over
    there and back. This measures that hand-over alone, outside the engine.
    """

    def __init__(self) -> None:
        self.go = threading.Lock()
        self.go.acquire()
        self.back = threading.Lock()
        self.back.acquire()
        self.work: Callable[[], object] | None = None
        self.thread = threading.Thread(target=self._loop, name="bench-carrier", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            self.go.acquire()
            work = self.work
            if work is None:
                return
            work()
            self.back.release()

    def run(self, work: Callable[[], object]) -> None:
        self.work = work
        self.go.release()
        self.back.acquire()

    def stop(self) -> None:
        self.work = None
        self.go.release()
        self.thread.join()


def hand_over_note(meter: Meter, floor: Callable[[], object]) -> str:
    """CPU time of the same work run inline and handed to a carrier thread and back."""
    carrier = Carrier()
    try:
        costs = []
        for work in (lambda: None, floor):
            inline = meter.per_call("inline", work)
            handed = meter.per_call("handed over", lambda work=work: carrier.run(work))
            costs.append((inline, handed))
    finally:
        carrier.stop()
    (empty, empty_handed), (full, full_handed) = costs
    return (
        f"hand-over to a thread and back ({meter.timer} time): nothing to run "
        f"{empty * 1e6:,.1f} us inline, {empty_handed * 1e6:,.1f} us handed over; the floor "
        f"pipeline {full * 1e6:,.0f} us inline, {full_handed * 1e6:,.0f} us handed over "
        f"(+{(full_handed - full) * 1e6:,.0f} us: the thread wake-ups, the GIL and the "
        f"caches the work refills on the other thread)"
    )


# -- measuring ------------------------------------------------------------------------


def marker() -> None:
    """Under ``--instructions``, callgrind dumps (and zeroes) its counters here."""
    os.getppid()


@dataclass
class Meter:
    """Cost per call of a callable: CPU or wall seconds, or instructions under valgrind."""

    timer: str
    calls: int
    rounds: int
    counting: bool = False  # inside valgrind: only mark phases, the parent reads counts
    phases: list[tuple[str, int]] = field(default_factory=list)

    def clock(self) -> float:
        return time.perf_counter() if self.timer == "wall" else time.process_time()

    def per_call(
        self,
        label: str,
        function: Callable[[], object],
        calls: int = 0,
        warmups: int | None = None,
    ) -> float:
        calls = calls or self.calls
        if self.counting:
            for _ in range(max(calls // 10, 3) if warmups is None else warmups):
                function()
            gc.collect()
            marker()
            for _ in range(calls):
                function()
            marker()
            self.phases.append((label, calls))
            return float("nan")
        samples = []
        for _ in range(self.rounds):
            gc.collect()
            start = self.clock()
            for _ in range(calls):
                function()
            samples.append((self.clock() - start) / calls)
        return statistics.median(samples)


@dataclass
class Table:
    meter: Meter
    only: list[str] = field(default_factory=list)  # --only: measure these rows alone
    rows: list[tuple[str, float, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def wanted(self, label: str) -> bool:
        return not self.only or label in (APPLY, FLOOR) or any(w in label for w in self.only)

    def cost(self, label: str, function: Callable[[], object], calls: int = 0) -> float:
        if not self.wanted(label):
            return float("nan")
        value = self.meter.per_call(label, function, calls)
        self.rows.append((label, value, "cost"))
        return value

    def note(self, text: str) -> None:
        self.notes.append(text)


def render(rows: list[tuple[str, float, str]], unit: str, notes: list[str]) -> str:
    """The table: each cost, and its ratio to task.apply() and to the floor."""
    costs = {label: value for label, value, kind in rows if kind == "cost"}
    if TEN_TRACKED in costs and TEN_PLAIN in costs:
        per_effect = (costs[TEN_TRACKED] - costs[TEN_PLAIN]) / 10
        rows = [*rows, (PER_EFFECT, per_effect, "cost")]
    apply_cost = costs.get(APPLY, float("nan"))
    floor_cost = costs.get(FLOOR, float("nan"))
    width = max(len(label) for label, _, _ in rows)
    scale = 1e6 if unit == "us" else 1.0
    lines = [f"{'':<{width}}  {unit + ' per call':>14}  {'x apply()':>9}  {'x floor':>7}"]
    for label, value, kind in rows:
        if kind == "cost":
            lines.append(
                f"{label:<{width}}  {value * scale:>14,.1f}  "
                f"{value / apply_cost:>8.2f}x  {value / floor_cost:>6.2f}x"
            )
        else:
            lines.append(f"{label:<{width}}  {kind}")
    return "\n".join([*lines, *notes])


APPLY = "task.apply() of a trivial task"
FLOOR = "floor: Celery's own delivery pipeline"
TEN_TRACKED = "10 tracked side effects: reset() + run()"
TEN_PLAIN = "  the same 10 calls untracked: reset() + run()"
PER_EFFECT = "  a tracked side effect, over the same call untracked"
FIRST_RUNS = "run() without reset(): runs 1-10 of one harness"
LATER_RUNS = "run() without reset(): runs 1,991-2,000 of it"


# -- the scenarios ----------------------------------------------------------------------


def sweep_once(
    harness: CeleryFaults, task: Any, pairs: bool, observe: Callable[[], Any] | None = None
) -> int:
    """One sweep; by default observing how many effects ran (so repeats are findings)."""
    watched = observe if observe is not None else lambda: len(effects)
    report = harness.sweep(task.s(), watched, effects.clear, pairs=pairs)
    return len(report.scenarios) + 1  # and the baseline


def memory_over(scenario: Callable[[], int], repeats: int, what: str) -> str:
    """Peak RSS before and after ``repeats`` calls, traced growth after them and peak during."""
    scenario()  # warm caches before measuring
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    first = tracemalloc.take_snapshot()
    start, _ = tracemalloc.get_traced_memory()
    count = sum(scenario() for _ in range(repeats))
    gc.collect()
    _, peak = tracemalloc.get_traced_memory()
    growth = sum(
        stat.size_diff for stat in tracemalloc.take_snapshot().compare_to(first, "filename")
    )
    tracemalloc.stop()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return (
        f"memory over {count:,} {what}: peak RSS {before:.0f} -> {after:.0f} MiB; traced: "
        f"{growth / 1024:+,.0f} KiB after, at most {(peak - start) / 2**20:+,.1f} MiB during"
    )


def measure(options: argparse.Namespace, meter: Meter) -> Table:
    table = Table(meter, only=options.only.split(",") if options.only else [])
    tasks = make_app("bench")
    app, add, add_late, ten = tasks.app, tasks.add, tasks.add_late, tasks.ten
    table.cost(APPLY, lambda: add.apply((1, 2)))
    floor = floor_pipeline()
    table.cost(FLOOR, floor)
    if not meter.counting and table.wanted("hand-over"):
        table.note(hand_over_note(meter, floor))

    with CeleryFaults(app) as harness:
        harness.track(f"{__name__}.side_effect")

        def scenario(
            task: Any, *specs: str, args: tuple[int, ...] = (1, 2)
        ) -> Callable[[], object]:
            def one() -> object:
                harness.reset()
                return harness.run(task.s(*args), *specs)

            return one

        table.cost("fault-free: reset() + run()", scenario(add))
        table.cost("fault-free, acks_late: reset() + run()", scenario(add_late))
        table.cost("sigkill@0 + redelivery (acks_late)", scenario(add_late, "sigkill@0"))
        table.cost("power_loss@0 + redelivery (acks_late)", scenario(add_late, "power_loss@0"))
        table.cost(TEN_TRACKED, scenario(ten, args=()))
        table.cost(TEN_PLAIN, scenario(tasks.ten_plain, args=()))

        def publish_only() -> object:
            if len(harness.broker.queues.get("celery", ())) > 100:
                harness.reset()
            return add.apply_async((1, 2))

        table.cost("  apply_async() alone, to the harness's broker", publish_only)
        harness.reset()
        if table.wanted(FIRST_RUNS) or table.wanted(LATER_RUNS):
            growth_rows(table, harness, add)

        sweep_calls = 2 if options.quick or meter.counting else 6
        if table.wanted("sweep of 10 effects, singles"):
            per_sweep = sweep_once(harness, ten, pairs=False)
            seconds = table.meter.per_call(
                "sweep", lambda: sweep_once(harness, ten, pairs=False), sweep_calls, warmups=1
            )
            table.rows.append(
                (f"sweep of 10 effects, per scenario ({per_sweep})", seconds / per_sweep, "cost")
            )
            if not meter.counting:
                rate = 1 / (seconds / per_sweep)
                table.note(f"sweep, 10 effects, singles: {rate:,.0f} scenarios/s")
        if not (meter.counting and options.quick) and table.wanted("sweep of 10 effects, pairs"):
            sizes: list[int] = []
            once = Meter(meter.timer, 1, 1, meter.counting, meter.phases)  # ~3,000 scenarios
            elapsed = once.per_call(
                "pairs", lambda: sizes.append(sweep_once(harness, ten, pairs=True)), 1, 0
            )
            paired = sizes[-1]
            table.rows.append(
                (
                    f"sweep of 10 effects with pairs, per scenario ({paired})",
                    elapsed / paired,
                    "cost",
                )
            )
            if not meter.counting:
                table.note(f"sweep, 10 effects, with pairs: {paired / elapsed:,.0f} scenarios/s")

    floor_app_publish = floor_publish_only()
    table.cost("  apply_async() alone, floor app to memory://", floor_app_publish)

    def fresh_harness() -> object:
        with CeleryFaults(app) as fresh:
            return fresh.run(add.s(1, 2))

    table.cost(
        "fault-free run(), fresh harness per scenario", fresh_harness, max(meter.calls // 4, 10)
    )

    if not meter.counting and table.wanted("start_worker"):
        # Wall time is what a round trip through a polling worker costs; CPU time
        # (all threads of this process) is shown too, since the machine may be busy.
        for timer in ("wall", "cpu"):
            round_trip, stop = start_worker_round_trip()
            try:
                timed = Meter(timer, max(meter.calls // 10, 20), meter.rounds)
                worker = timed.per_call("start_worker", round_trip)
            finally:
                stop()
            with CeleryFaults(app) as harness:
                ours = timed.per_call("ours", scenario_on(harness, add))
            table.note(
                f"start_worker round trip (memory://, 1 ms polling), {timer}: "
                f"{worker * 1e6:,.0f} us; fault-free reset()+run(): {ours * 1e6:,.0f} us: "
                f"{worker / ours:.1f}x faster"
            )
    if not meter.counting and table.wanted("memory"):
        memory_rows(options, table, app, add_late, ten)
    return table


def growth_rows(table: Table, harness: CeleryFaults, task: Any, runs: int = 2000) -> None:
    """A run's cost must not grow with the runs before it in the same harness.

    Runs 1-10 and the last 10 of ``runs`` fault-free ``run()``s in one harness
    without ``reset()`` (a test that publishes many tasks, a loop over orders).
    """
    meter = table.meter
    window = 10

    def run() -> object:
        return harness.run(task.s(1, 2))

    firsts: list[float] = []
    lasts: list[float] = []
    for _ in range(1 if meter.counting else 3):
        harness.reset()
        timed = Meter(meter.timer, window, 1, meter.counting, meter.phases)
        firsts.append(timed.per_call(FIRST_RUNS, run, window, warmups=0))
        for _ in range(runs - 2 * window):
            run()
        lasts.append(timed.per_call(LATER_RUNS, run, window, warmups=0))
    harness.reset()
    table.rows.append((FIRST_RUNS, statistics.median(firsts), "cost"))
    table.rows.append((LATER_RUNS, statistics.median(lasts), "cost"))
    if not meter.counting:
        grown = statistics.median(lasts) / statistics.median(firsts)
        table.note(
            f"run() without reset(): the last 10 of {runs:,} cost {grown:.2f}x the first 10"
        )


def scenario_on(harness: CeleryFaults, task: Any) -> Callable[[], object]:
    def one() -> object:
        harness.reset()
        return harness.run(task.s(1, 2))

    return one


def floor_publish_only() -> Callable[[], object]:
    app = Celery("bench-floor-publish", set_as_current=False)
    app.conf.broker_url = "memory://"
    app.conf.task_default_queue = "bench-floor-publish"

    @app.task(name="bench.floor_publish", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    channel = app.connection_for_read().default_channel
    add.apply_async((1, 2))

    def publish() -> object:
        sent = add.apply_async((1, 2))
        channel.queue_purge("bench-floor-publish")
        return sent

    return publish


def memory_rows(
    options: argparse.Namespace, table: Table, app: Celery, add_late: Any, ten: Any
) -> None:
    scenarios = 2000 if options.quick else 10_000
    with CeleryFaults(app) as harness:
        harness.track(f"{__name__}.side_effect")

        def crash() -> int:
            harness.reset()
            harness.run(add_late.s(1, 2), "power_loss@0")
            return 1

        table.note(memory_over(crash, scenarios, "power_loss@0 scenarios"))
        sweeps = 1 if options.quick else 3
        pairs = memory_over(
            lambda: sweep_once(harness, ten, pairs=True), sweeps, "sweep scenarios with pairs"
        )
        table.note(f"{pairs} (findings, each with its timeline, held by the report)")
        passing = memory_over(
            lambda: sweep_once(harness, ten, pairs=True, observe=lambda: sorted(set(effects))),
            sweeps,
            "sweep scenarios with pairs of a task that passes",
        )
        table.note(f"{passing} (no findings: outcomes without timelines)")


def profile(label: str, function: Callable[[], object], calls: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        function()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    return f"--- {label}: cProfile, internal time, {calls} calls ---\n{out.getvalue()}"


# -- under valgrind -----------------------------------------------------------------------


def count_instructions(argv: list[str]) -> int:
    """Run this benchmark under callgrind and print the table in instructions per call."""
    python = os.path.realpath(sys.executable)  # valgrind does not follow shell shims
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "cg.out"
        phases_file = Path(directory) / "phases.json"
        command = [
            "valgrind",
            "--tool=callgrind",
            "--dump-before=getppid",
            f"--callgrind-out-file={out}",
            python,
            __file__,
            *[arg for arg in argv if arg != "--instructions"],
            "--counting",
            str(phases_file),
        ]
        # The base interpreter does not run the venv's .pth hooks (an editable install's
        # finder among them): give it the project's root and this sys.path instead.
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *sys.path])}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.stderr.write(done.stderr[-4000:])
            return done.returncode
        phases = json.loads(phases_file.read_text())
        totals = {}
        for dump in Path(directory).glob("cg.out.*"):
            match = re.search(r"^totals:\s+(\d+)", dump.read_text(), re.MULTILINE)
            totals[int(dump.name.rsplit(".", 1)[1])] = int(match.group(1)) if match else 0
    rows = [
        (label, totals[2 * (index + 1)] / calls, "cost")
        for index, (label, calls) in enumerate(phases["rows"])
    ]
    rows = [relabel(row, phases["sizes"]) for row in rows]
    print(
        "pytest-celery-faults benchmark: instructions per call under callgrind "
        f"({sys.version.split()[0]})"
    )
    print(render(rows, "Ir", []))
    return 0


def relabel(row: tuple[str, float, str], sizes: dict[str, int]) -> tuple[str, float, str]:
    """A sweep's cost per call is per sweep: make it per scenario, as the table shows it."""
    label, value, kind = row
    if label in sizes:
        what = "with pairs, " if label == "pairs" else ""
        return (
            f"sweep of 10 effects {what}per scenario ({sizes[label]})",
            value / sizes[label],
            kind,
        )
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (smoke run)")
    parser.add_argument("--timer", choices=("cpu", "wall"), default="cpu")
    parser.add_argument(
        "--instructions", action="store_true", help="instruction counts under valgrind"
    )
    parser.add_argument("--counting", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="print cProfile tops too")
    parser.add_argument(
        "--only",
        metavar="WORDS",
        help="measure only the rows whose label holds one of these comma-separated words "
        "(the two anchors always)",
    )
    options = parser.parse_args(argv)
    if options.instructions:
        return count_instructions(argv)
    # Celery logs every WorkerLostError it handles; the scenarios cause thousands.
    logging.getLogger("celery").setLevel(logging.CRITICAL)
    calls, rounds = (200, 3) if options.quick else (1000, 7)
    if options.counting:
        calls, rounds = (100, 1) if options.quick else (300, 1)
    meter = Meter(options.timer, calls, rounds, counting=bool(options.counting))
    table = measure(options, meter)
    if options.counting:
        sizes = {
            ("pairs" if "pairs" in label else "sweep"): int(label.rsplit("(", 1)[1].rstrip(")"))
            for label, _, _ in table.rows
            if label.startswith("sweep of 10 effects")
        }
        Path(options.counting).write_text(json.dumps({"rows": meter.phases, "sizes": sizes}))
        return 0
    print(
        f"pytest-celery-faults benchmark: {options.timer} time, median of {rounds} rounds "
        f"of {calls} calls ({sys.version.split()[0]})"
    )
    print(render(table.rows, "us", table.notes))
    if options.profile:
        tasks = make_app("bench-profile")
        with CeleryFaults(tasks.app) as harness:
            print(profile("fault-free reset() + run()", scenario_on(harness, tasks.add), 2000))
            print(profile("floor", floor_pipeline(), 2000))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
