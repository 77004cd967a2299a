"""A worker child's execution on its own: what a signal or a process call does to it.

The execution runs here without a stack of its own (nothing to freeze), so each
case reads what the child raised and how its record would end.
"""

from __future__ import annotations

import signal
from typing import Any

import pytest

from pytest_celery_faults import _celery_internals as internals
from pytest_celery_faults.engine.child import ChildExecution, ChildGone, TerminatedBySignal
from pytest_celery_faults.engine.clock import VirtualClock
from pytest_celery_faults.engine.execution import ExecutionRecord


def execution() -> ChildExecution:
    record = ExecutionRecord("t1", "shop.charge", 1, "celery@faults-0#1", None)
    return ChildExecution(
        task_id="t1",
        task_name="shop.charge",
        delivery=1,
        step=None,
        record=record,
        clock=VirtualClock(start=1_000_000.0),
        on_fired=lambda execution, step: None,
        request_stop=lambda: None,
        broker_delivery=None,  # type: ignore[arg-type]  # never read without a fault
    )


def test_sigkill_takes_the_child_at_once_whatever_the_task_installed() -> None:
    child = execution()
    child.set_handler(signal.SIGKILL, lambda signum, frame: None)
    with pytest.raises(ChildGone) as gone:
        child.receive(signal.SIGKILL)
    assert (gone.value.status, gone.value.ending) == (-signal.SIGKILL, "child killed")
    assert child.dead and child.died_status() == -signal.SIGKILL


def test_sigterm_runs_billiards_handler_which_unwinds_the_task() -> None:
    child = execution()
    with pytest.raises(TerminatedBySignal) as unwinding:
        child.receive(signal.SIGTERM)
    assert isinstance(unwinding.value, SystemExit)  # finally blocks run
    assert not child.dead
    assert child.died_status() == internals.status_after_shutdown(signal.SIGTERM)


def test_a_handler_the_task_installed_runs_and_the_child_goes_on() -> None:
    child = execution()
    heard: list[int] = []
    previous = child.set_handler(signal.SIGTERM, lambda signum, frame: heard.append(signum))
    assert previous is internals.child_initial_handler(signal.SIGTERM)
    child.receive(signal.SIGTERM)
    assert heard == [signal.SIGTERM] and child.died_status() is None


def test_putting_the_initial_handler_back_restores_billiards_behaviour() -> None:
    child = execution()
    initial = child.set_handler(signal.SIGTERM, signal.SIG_IGN)
    child.receive(signal.SIGTERM)  # ignored
    assert child.died_status() is None
    child.set_handler(signal.SIGTERM, initial)
    assert signal.SIGTERM not in child.handlers
    with pytest.raises(TerminatedBySignal):
        child.receive(signal.SIGTERM)


@pytest.mark.parametrize(
    ("call", "status", "ending"),
    [
        (lambda child: child.exit_process(3), 3, "exit"),
        (lambda child: child.exit_process(256 + 7), 7, "exit"),  # the low byte, as the OS keeps
        (lambda child: child.abort_process(), -signal.SIGABRT, "child killed"),
    ],
)
def test_the_task_ending_its_own_process(call: Any, status: int, ending: str) -> None:
    child = execution()
    notes: list[str] = []
    child.on_note = lambda task_id, text: notes.append(text)
    with pytest.raises(ChildGone) as gone:
        call(child)
    assert (gone.value.status, gone.value.ending) == (status, ending)
    assert child.died_status() == status and notes


def test_a_signal_whose_default_is_to_do_nothing_leaves_the_child_alone() -> None:
    child = execution()
    child.receive(signal.SIGCHLD)
    assert not child.dead and child.died_status() is None


def test_a_stopping_signal_is_refused_rather_than_hanging() -> None:
    child = execution()
    with pytest.raises(RuntimeError, match="SIGTSTP"):
        child.receive(signal.SIGTSTP)


def test_a_negative_sleep_is_refused_as_time_sleep_refuses_it() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        execution().sleep(-1)  # virtual: refused before any wait
