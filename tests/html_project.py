"""The small project both HTML report tests run: a sweep, a gated test and an explore."""

from __future__ import annotations

#: ``proj.py``: one task whose two tracked writes a crash between duplicates.
APP = """
from celery import Celery

app = Celery("proj", set_as_current=False)
rows = []


def write(row):
    rows.append(row)


@app.task(name="proj.append_row", acks_late=True, reject_on_worker_lost=True, shared=False)
def append_row(n):
    write(n)
    write(n + 1)
"""

#: ``test_suite.py``: a sweep that finds failures and a gated test.
SUITE = """
import proj


def reset():
    proj.rows.clear()


def test_sweep(celery_faults):
    celery_faults.track("proj.write")
    report = celery_faults.sweep(
        proj.append_row.s(1), lambda: list(proj.rows), reset, hows=("sigkill", "power_loss")
    )
    assert report.failures


def test_gate(celery_faults):
    celery_faults.track("proj.write")
    proj.append_row.delay(5)
    celery_faults.drain()
"""

#: ``test_explored.py``: an explore that finds a failing schedule (needs Hypothesis).
EXPLORE = """
import proj


def test_explore(celery_faults):
    celery_faults.track("proj.write")
    report = celery_faults.explore(
        [proj.append_row.s(1)], lambda: list(proj.rows), proj.rows.clear, budget=10,
        kinds=["redeliver"],
    )
    assert report.failure is not None
"""
