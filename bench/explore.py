"""Benchmark: ``explore()`` schedules per second, and how many runs a lost update takes to find.

    python bench/explore.py                 # 10-message workload, budget 200, one process
    python bench/explore.py --procs 2       # the same budget split by seed over 2 processes
    python bench/explore.py --find 20       # the lost update: runs to find it, over 20 seeds

The workload is ten messages of a task with three tracked side effects on a
worker of concurrency 2 that acks late (so kills and power losses redeliver,
and two executions interleave). Every run resets the harness, draws its
schedule, publishes the ten messages, drains and checks: what is counted is
whole runs (fault-free baselines included). With ``--procs N`` the budget is
split into N seed ranges run by N processes at once (as pytest-xdist workers
would); the rate is the total over the wall time. CPU time is printed too: on
a shared machine the wall time says little. It reports; it gates nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

from celery import Celery

from pytest_celery_faults import CeleryFaults

app = Celery("explorebench", set_as_current=False)
app.conf.broker_url = "memory://"
app.conf.worker_concurrency = 2
app.conf.task_acks_late = True
app.conf.task_reject_on_worker_lost = True
ROWS: dict[str, Any] = {"keys": set(), "log": []}
THIS = sys.modules[__name__]


def read() -> set[str]:
    return set(ROWS["keys"])


def write(keys: set[str]) -> None:
    ROWS["keys"] = keys


def add(key: str) -> None:
    ROWS["keys"].add(key)


def log(key: str) -> None:
    ROWS["log"].append(key)


@app.task(name="bench.three", shared=False)
def three(key: str) -> None:
    THIS.log(key)
    THIS.add(key)
    THIS.log(key)


@app.task(name="bench.rmw", shared=False)
def rmw(key: str) -> None:
    THIS.write(THIS.read() | {key})


def reset() -> None:
    ROWS["keys"] = set()
    ROWS["log"] = []


def observe() -> list[str]:
    return sorted(ROWS["keys"])


def rate(budget: int, seed: int) -> tuple[int, float, float]:
    """Runs, wall seconds and CPU seconds of one explore() of the 10-message workload."""
    with CeleryFaults(app, seed=seed) as faults:
        for name in ("log", "add"):
            faults.track((THIS, name))
        cpu, wall = time.process_time(), time.perf_counter()
        report = faults.explore(
            [three.s(f"k{n}") for n in range(10)], observe, reset, budget=budget, seed=seed
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report.assert_ok()
    return report.runs, wall, cpu


def runs_to_find(seeds: int, budget: int) -> list[int | None]:
    found: list[int | None] = []
    with CeleryFaults(app, seed=0) as faults:
        faults.track((THIS, "read"))
        faults.track((THIS, "write"))
        for seed in range(seeds):
            report = faults.explore(
                [rmw.s(key) for key in "abc"], observe, reset, budget=budget, seed=seed
            )
            found.append(report.found_at)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--procs", type=int, default=1)
    parser.add_argument("--find", type=int, default=10, metavar="SEEDS")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        runs, wall, cpu = rate(args.budget, args.child)
        print(runs, wall, cpu)
        return
    if args.procs == 1:
        runs, wall, cpu = rate(args.budget, 0)
        print(
            f"10-message workload, 1 process: {runs} runs in {wall:.2f}s wall "
            f"({cpu:.2f}s CPU): {runs / wall:.0f} schedules/s wall, {runs / cpu:.0f} per CPU s"
        )
    else:
        share = args.budget // args.procs
        command = [sys.executable, __file__, "--budget", str(share), "--child"]
        wall = time.perf_counter()
        children = [
            subprocess.Popen([*command, str(seed)], stdout=subprocess.PIPE, text=True)
            for seed in range(args.procs)
        ]
        outputs = [child.communicate()[0].split() for child in children]
        wall = time.perf_counter() - wall
        runs = sum(int(out[0]) for out in outputs)
        cpus = [float(out[2]) for out in outputs]
        print(
            f"10-message workload, {args.procs} processes (seed ranges): {runs} runs in "
            f"{wall:.2f}s wall (process start included): {runs / wall:.0f} schedules/s; "
            f"busiest process {max(cpus):.2f}s CPU: {runs / max(cpus):.0f} per CPU s"
        )
    if args.find:
        found = runs_to_find(args.find, budget=100)
        hits = [n for n in found if n is not None]
        print(
            f"lost update (3 read-modify-write adds, concurrency 2): found in {len(hits)} of "
            f"{len(found)} seeds within 100 runs; runs to find it: median "
            f"{statistics.median(hits) if hits else '-'}, max {max(hits) if hits else '-'} "
            f"({found})"
        )


if __name__ == "__main__":
    main()
