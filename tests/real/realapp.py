"""The app the conformance suite runs on a real worker and in the emulation alike."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore, Reject

app = Celery("realapp", set_as_current=False)
app.conf.worker_prefetch_multiplier = 1


def effect(n: int) -> None:
    """A tracked side effect: faults fire after it."""


def _two_effects(task: Any, ending: str) -> str:
    """A side effect, then the ending asked for (the ack table's body endings), then another."""
    effect(1)
    redelivered = (task.request.delivery_info or {}).get("redelivered")
    if ending == "exception":
        raise ValueError("boom")
    if ending == "retry" and task.request.retries == 0:
        raise task.retry(countdown=1)  # real seconds on a real worker
    if ending == "reject_requeue" and not redelivered:
        raise Reject("again", requeue=True)
    if ending == "reject_drop":
        raise Reject("never", requeue=False)
    if ending == "ignore":
        raise Ignore()
    effect(2)
    return "done"


@app.task(name="realapp.early", bind=True, shared=False)
def early(self: Task, ending: str = "success") -> str:
    return _two_effects(self, ending)


@app.task(name="realapp.late", bind=True, acks_late=True, shared=False)
def late(self: Task, ending: str = "success") -> str:
    return _two_effects(self, ending)


@app.task(
    name="realapp.late_requeue",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    shared=False,
)
def late_requeue(self: Task, ending: str = "success") -> str:
    return _two_effects(self, ending)


@app.task(
    name="realapp.late_drop",
    bind=True,
    acks_late=True,
    acks_on_failure_or_timeout=False,
    shared=False,
)
def late_drop(self: Task, ending: str = "success") -> str:
    return _two_effects(self, ending)


@app.task(name="realapp.failing", acks_late=True, shared=False)
def failing() -> str:
    effect(1)
    raise ValueError("boom")
