"""The app the conformance suite runs on a real worker and in the emulation alike."""

from __future__ import annotations

from celery import Celery

app = Celery("realapp", set_as_current=False)
app.conf.worker_prefetch_multiplier = 1


def effect(n: int) -> None:
    """A tracked side effect: faults fire after it."""


def _two_effects() -> str:
    effect(1)
    effect(2)
    return "done"


@app.task(name="realapp.early", shared=False)
def early() -> str:
    return _two_effects()


@app.task(name="realapp.late", acks_late=True, shared=False)
def late() -> str:
    return _two_effects()


@app.task(name="realapp.late_requeue", acks_late=True, reject_on_worker_lost=True, shared=False)
def late_requeue() -> str:
    return _two_effects()


@app.task(
    name="realapp.late_drop",
    acks_late=True,
    acks_on_failure_or_timeout=False,
    shared=False,
)
def late_drop() -> str:
    return _two_effects()


@app.task(name="realapp.failing", acks_late=True, shared=False)
def failing() -> str:
    effect(1)
    raise ValueError("boom")
