"""Benchmark: ``fault_sweep`` cases spread over pytest-xdist workers.

    python bench/xdist_sweep.py              # 20 sweeps of a 10-effect task, 1 and 2 workers
    python bench/xdist_sweep.py --tests 5    # a smaller suite

Writes a small project (an app, a task with 10 side effects, N tests marked
``fault_sweep(max_effects=10)`` with every kind: 55 cases each) to a temporary
directory, runs it with pytest in one process and with ``-n 2``, and prints
the wall time of each and its speed-up. On a shared machine the workers may
not get a core each, so it also prints the CPU time of every process (the
pytest process, or each xdist worker): the busiest worker's CPU time is the
wall time of the run on a machine with a free core per worker, and the CPU
speed-up compares it with the single process's. It reports; it gates nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = """
from celery import Celery

app = Celery("sweepbench", set_as_current=False)
rows = {}


def upsert(key, value):
    rows[key] = value


@app.task(name="sweepbench.ten", acks_late=True, reject_on_worker_lost=True, shared=False)
def ten(order):
    for n in range(10):
        upsert((order, n), n)
"""

CONFTEST = """
import os, time

def pytest_sessionfinish(session):
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["SWEEP_BENCH_CPU"], name), "w") as out:
        out.write(str(time.process_time()))
"""

TEST = """
import pytest
import sweepbench

HOWS = ("sigkill", "sigterm", "exit", "power_loss", "cold_shutdown")


@pytest.mark.fault_sweep(max_effects=10, hows=HOWS)
def test_sweep_{n}(celery_faults):
    sweepbench.rows.clear()
    celery_faults.track("sweepbench.upsert")
    outcome = celery_faults.run(sweepbench.ten.s({n}))
    assert outcome.state == "SUCCESS"
    assert sweepbench.rows == {{({n}, i): i for i in range(10)}}
"""


def run(directory: Path, workers: int | None) -> tuple[float, dict[str, float], str]:
    """Wall seconds, CPU seconds of each pytest process (by xdist worker), the summary."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider"]
    if workers:
        command += ["-n", str(workers)]
    with tempfile.TemporaryDirectory() as cpu_dir:
        start = time.perf_counter()
        done = subprocess.run(
            command,
            cwd=directory,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "SWEEP_BENCH_CPU": cpu_dir},
        )
        wall = time.perf_counter() - start
        cpu = {path.name: float(path.read_text()) for path in Path(cpu_dir).iterdir()}
    last = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    if done.returncode != 0:
        raise SystemExit(f"pytest failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return wall, cpu, last


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=20, help="sweep tests (55 cases each)")
    options = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        (directory / "sweepbench.py").write_text(PROJECT)
        (directory / "conftest.py").write_text(CONFTEST)
        (directory / "pytest.ini").write_text("[pytest]\ncelery_faults_app = sweepbench:app\n")
        (directory / "test_sweeps.py").write_text(
            "".join(TEST.format(n=n) for n in range(options.tests))
        )
        serial = run(directory, None)
        parallel = run(directory, 2)
    print(f"fault_sweep over pytest-xdist: {options.tests} tests x 55 cases")
    for label, (wall, cpu, last) in (("1 process", serial), ("-n 2", parallel)):
        each = ", ".join(f"{name} {seconds:.1f}" for name, seconds in sorted(cpu.items()))
        print(f"  {label:<10} wall {wall:6.1f} s   cpu s: {each}   ({last})")
    busiest = max(parallel[1].values())
    print(
        f"  speed-up on 2 workers: {serial[0] / parallel[0]:.2f}x wall, "
        f"{serial[1]['main'] / busiest:.2f}x CPU (single process / busiest worker)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
