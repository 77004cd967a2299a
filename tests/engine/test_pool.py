"""The in-process pool on its own: billiard's ``apply_async`` contract, and its children.

A stand-in parent (the worker, as the pool sees it) and a stand-in request
(what Celery's ``Request.execute_using_pool`` passes) show what the pool
reports to each callback, in which order, and which child ran the job.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from billiard.exceptions import WorkerLostError
from celery import Celery

from pytest_celery_faults._celery_internals import billiard as billiard_adapter
from pytest_celery_faults.engine.child import ChildExecution
from pytest_celery_faults.engine.clock import VirtualClock
from pytest_celery_faults.engine.effects import EffectLog
from pytest_celery_faults.engine.execution import ExecutionRecord
from pytest_celery_faults.engine.pool import InProcessPool, Job
from pytest_celery_faults.engine.scheduler import Scheduler


@dataclass
class Parent:
    """The worker process as the pool sees it, recording what the pool tells it."""

    app: Celery
    clock: VirtualClock
    scheduler: Scheduler
    effects: EffectLog
    max_tasks_per_child: int | None = None
    hostname: str = "celery@faults-0"
    concurrency: int = 1
    max_memory_per_child: int | None = None
    callback_errors: list[BaseException] = field(default_factory=list)
    records: list[ExecutionRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ended: list[int] = field(default_factory=list)
    pids: Iterator[int] = field(default_factory=lambda: iter(range(101, 200)))

    def on_record(self, record: ExecutionRecord) -> None:
        self.records.append(record)

    def next_pid(self) -> int:
        return next(self.pids)

    def note(self, execution: ChildExecution, text: str) -> None:
        self.notes.append(text)

    def could_be_cut_off_or_overlap(self, execution: ChildExecution, hard_limit: object) -> bool:
        return False  # every job runs alone, to its end, inside apply_async

    def job_ended(self, job: Job) -> None:
        self.ended.append(job.number)

    def lose_power(self, *, graceful: bool, cause: Job) -> None:  # pragma: no cover
        raise AssertionError("no power loss in these tests")


@pytest.fixture
def parent(app: Celery) -> Iterator[Parent]:
    clock = VirtualClock(start=1_000_000.0)
    made = Parent(app, clock, Scheduler(random.Random(0)), EffectLog(clock))
    yield made
    made.scheduler.close()


def run(pool: InProcessPool, target: Callable[[], Any], heard: list[Any]) -> ExecutionRecord:
    """Submit ``target`` as Celery's request would; what billiard's callbacks heard."""
    record = ExecutionRecord("t1", "shop.charge", 1, "celery@faults-0#1", None)
    execution = ChildExecution(
        task_id="t1",
        task_name="shop.charge",
        delivery=1,
        step=None,
        record=record,
        clock=pool.worker.clock,
        on_fired=lambda execution, step: None,
        request_stop=lambda: None,
        broker_delivery=None,  # type: ignore[arg-type]  # never read without a fault
    )

    class Request:
        def execute_using_pool(self, pool: InProcessPool) -> None:
            pool.apply_async(
                target,
                accept_callback=lambda pid, when: heard.append(("accepted", pid)),
                callback=lambda value: heard.append(("result", value)),
                error_callback=lambda info: heard.append(("error", info.type)),
            )

    pool.execute(Request(), execution)
    return record


def test_the_child_takes_the_job_then_the_parent_gets_its_result(parent: Parent) -> None:
    pool = InProcessPool(parent)
    heard: list[Any] = []

    def body() -> int:
        heard.append("body")
        return 42

    record = run(pool, body, heard)
    assert heard == [("accepted", 101), "body", ("result", 42)]
    assert record.ended == "returned" and parent.records == [record]
    assert parent.ended == [0] and not pool.running
    heard.clear()
    run(pool, lambda: 43, heard)
    assert heard == [("accepted", 101), ("result", 43)]  # the same child, free again


def test_a_task_that_raises_fails_and_its_child_stays(parent: Parent) -> None:
    pool = InProcessPool(parent)
    heard: list[Any] = []

    def fails() -> None:
        raise ValueError("card declined")

    assert run(pool, fails, heard).ended == "raised"
    assert heard == [("accepted", 101), ("error", ValueError)]
    heard.clear()
    run(pool, lambda: 1, heard)
    assert heard[0] == ("accepted", 101)


def test_a_task_that_exits_takes_its_child_with_it(parent: Parent) -> None:
    pool = InProcessPool(parent)
    heard: list[Any] = []
    assert run(pool, lambda: sys.exit(3), heard).ended == "exit"
    # billiard 4.3's workloop reports the child's SystemExit; 4.2's, its WorkerLostError.
    reported = (
        SystemExit if billiard_adapter._WORKLOOP_REPORTS_BASE_EXCEPTIONS else WorkerLostError
    )
    assert heard == [("accepted", 101), ("error", reported)]
    heard.clear()
    run(pool, lambda: 1, heard)
    assert heard[0] == ("accepted", 102)  # billiard started a fresh child


def test_a_child_is_recycled_at_worker_max_tasks_per_child(parent: Parent) -> None:
    parent.max_tasks_per_child = 2
    pool = InProcessPool(parent)
    heard: list[Any] = []
    for _ in range(3):
        run(pool, lambda: None, heard)
    assert [pid for what, pid in heard if what == "accepted"] == [101, 101, 102]
    assert parent.notes == ["child recycled after 2 task(s) (worker_max_tasks_per_child=2)"]
