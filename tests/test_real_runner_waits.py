"""When the real-broker runner takes a scenario as over: judged on records, no broker needed."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pytest_celery_faults.real.runner import RealBrokerRunner


def records(*events: str) -> list[dict[str, Any]]:
    """One task's records on its first delivery, one per event name."""
    return [{"event": event, "task_id": "t1", "task": "app.t", "delivery": 1} for event in events]


@pytest.mark.parametrize(
    ("events", "awaiting"),
    [
        # a body that waits (a second or three on a loaded machine) before its next
        # record is running: the scenario is not over after the short quiet time
        (("received", "start", "effect"), True),
        (("received", "start"), True),
        # received, waiting for a child
        (("received",), True),
        # ended: nothing more is coming from this body
        (("received", "start", "effect", "end"), False),
    ],
)
def test_a_running_body_keeps_the_scenario_open(events: tuple[str, ...], awaiting: bool) -> None:
    runner = RealBrokerRunner("realapp:app", "amqp://guest:guest@127.0.0.1:5672//")
    assert runner._awaiting_reaction(["t1"], records(*events)) is awaiting


def test_a_child_killed_under_a_task_keeps_the_scenario_open_while_nothing_is_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the child's last words come after the fault (an end without a state): its
    # worker has yet to store a failure or requeue the message
    runner = RealBrokerRunner("realapp:app", "amqp://guest:guest@127.0.0.1:5672//")
    stored: dict[str, str] = {"t1": "PENDING"}

    class Result:
        def __init__(self, task_id: str) -> None:
            self.state = stored[task_id]

    # the result backend, as the runner reads it (no broker, no backend here)
    monkeypatch.setattr(runner, "client", SimpleNamespace(AsyncResult=Result), raising=False)
    killed = records("received", "start", "effect")
    killed.insert(3, {"event": "fault", "spec": "sigterm@1", "task_id": "t1", "after": 1})
    killed.append({"event": "end", "state": None, "task_id": "t1", "delivery": 1})
    assert runner._awaiting_reaction(["t1"], killed)
    stored["t1"] = "FAILURE"
    assert not runner._awaiting_reaction(["t1"], killed)
