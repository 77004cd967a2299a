"""Sweeps publish once and send copies: each copy is the message Celery builds for its id.

The first test compares a copy with the message ``apply_async`` itself
publishes for the same task id, byte for byte, under the options that shape a
message; the second runs a sweep both ways and compares every verdict and
timeline; the last ones check that what a copy cannot reproduce publishes in
full.
"""

from __future__ import annotations

import copy
import datetime
import re
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, signals

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults.engine import copies
from pytest_celery_faults.engine.outcome import Outcome

effects: list[Any] = []


def record(value: Any) -> None:
    effects.append(value)


@pytest.fixture(autouse=True)
def _no_effects() -> None:
    effects.clear()


@pytest.fixture
def traced_headers() -> Iterator[list[dict[str, Any]]]:
    """A ``before_task_publish`` receiver adding a header, as tracing libraries do."""
    seen: list[dict[str, Any]] = []

    def add_trace(headers: dict[str, Any] | None = None, **_: Any) -> None:
        assert headers is not None
        headers["trace-id"] = f"trace-{len(seen)}"
        seen.append(copy.deepcopy(headers))

    signals.before_task_publish.connect(add_trace, weak=False)
    yield seen
    signals.before_task_publish.disconnect(add_trace)


def tasks(app: Celery) -> dict[str, Any]:
    @app.task(name="copied.charge", shared=False, acks_late=True)
    def charge(order: int, amount: float = 1.0, note: str = "") -> None:
        record((order, amount, note))

    @app.task(name="copied.pickled", shared=False, serializer="pickle")
    def pickled(when: datetime.date, tags: set[str]) -> None:
        record((when, tags))

    @app.task(name="copied.quiet", shared=False, ignore_result=True, time_limit=30)
    def quiet(order: int) -> None:
        record(order)

    return {"charge": charge, "pickled": pickled, "quiet": quiet}


SIGNATURES = {
    "args and kwargs": ("charge", (7,), {"amount": 2.5, "note": "é"}, {}),
    "countdown": ("charge", (7,), {}, {"countdown": 30}),
    "expires": ("charge", (7,), {}, {"expires": 120}),
    "priority": ("charge", (7,), {}, {"priority": 5}),
    "queue": ("charge", (7,), {}, {"queue": "payments"}),
    "headers": ("charge", (7,), {}, {"headers": {"tenant": "acme"}}),
    "pickle": ("pickled", (datetime.date(2026, 1, 2), {"a", "b"}), {}, {}),
    "ignore_result and a time limit": ("quiet", (3,), {}, {}),
}


def comparable(payload: dict[str, Any]) -> dict[str, Any]:
    """A stored message without its delivery tag (the broker's count of publishes).

    And without the header the receiver below numbers per publish.
    """
    payload = copy.deepcopy(payload)
    payload["properties"].pop("delivery_tag")
    payload["headers"].pop("trace-id")
    return payload


@pytest.mark.parametrize("case", list(SIGNATURES))
def test_a_copy_is_the_message_apply_async_builds_for_its_id(
    app: Celery, case: str, traced_headers: list[dict[str, Any]]
) -> None:
    name, args, kwargs, options = SIGNATURES[case]
    signature = tasks(app)[name].signature(args, kwargs, **options)
    with CeleryFaults(app) as faults:
        with copies.recording(app) as sent:
            baseline = faults.run(signature.clone())
        published = copies.copyable(app, signature, sent, baseline.task_id)
        assert published is not None
        faults.reset()
        signature.clone().apply_async(task_id="the-id")  # Celery's own message
        published.publish_copy("the-id")  # and the copy
        stored = [message for queue in faults.broker.queues.values() for message in queue]
        own, copy = stored
        assert comparable(copy.payload) == comparable(own.payload)
        assert own.payload["headers"]["trace-id"] == "trace-1"
        assert copy.payload["headers"]["trace-id"] == "trace-2"  # the receiver ran again
        assert traced_headers[1] == {**traced_headers[2], "trace-id": "trace-1"}
        faults.reset()


def story(outcome: Outcome) -> list[str]:
    """An outcome's summary and timeline, without its task id (each run makes its own).

    And without the counters that go on over the harness's life: the
    consumer's connection (``celery@faults-1#3``) and the pool's job number.
    """
    lines = [outcome.summary(), *outcome.timeline.texts()]
    ids = f"{re.escape(outcome.task_id)}|{re.escape(outcome.task_id[:8])}"
    counters = r"#\d+|Job: \d+"
    return [re.sub(counters, "#n", re.sub(ids, "<id>", line)) for line in lines]


def test_a_sweep_of_copies_gives_a_full_sweeps_verdicts_and_timelines(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    charge = tasks(app)["charge"]
    sweeps = []
    with CeleryFaults(app, seed=3) as faults:
        faults.track(f"{__name__}.record")
        for _ in ("copied", "in full"):
            report = faults.sweep(charge.s(1), lambda: list(effects), effects.clear)
            sweeps.append(
                [
                    (s.spec, s.verdict, s.problem, s.diff, story(s.outcome))
                    for s in report.scenarios
                ]
            )
            monkeypatch.setattr(copies, "copyable", lambda *_: None)
    copied, full = sweeps
    assert len(copied) > 40
    assert {verdict for _, verdict, *_ in copied} >= {"ok", "duplicated"}
    for mine, theirs in zip(copied, full, strict=True):
        assert mine == theirs


def test_sweeps_send_copies_and_publish_only_the_fault_free_run(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    charge = tasks(app)["charge"]
    built: list[str] = []
    published: list[str] = []
    create = app.amqp.create_task_message

    def counted(task_id: str, *args: Any, **kwargs: Any) -> Any:
        built.append(task_id)
        return create(task_id, *args, **kwargs)

    def count(headers: dict[str, Any] | None = None, **_: Any) -> None:
        published.append(headers["id"] if headers else "")

    monkeypatch.setattr(app.amqp, "create_task_message", counted)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.record")
        signals.before_task_publish.connect(count, weak=False)
        try:
            report = faults.sweep(charge.s(1), lambda: list(effects), effects.clear)
        finally:
            signals.before_task_publish.disconnect(count)
    assert len(built) == 1  # Celery built one message: the fault-free run's
    assert len(set(published)) == len(report.scenarios) + 1  # every scenario sent a copy


def chained(app: Celery) -> Any:
    charge = tasks(app)["charge"]
    return charge.s(1) | charge.si(2)


def linked(made: dict[str, Any]) -> Any:
    return made["charge"].s(1).set(link=made["quiet"].si(1))


def locked_once(app: Celery) -> Any:
    """celery-once's pattern: the task class takes a lock in its own apply_async."""

    class QueueOnce(app.Task):  # type: ignore[name-defined,misc]
        def apply_async(self, *args: Any, **kwargs: Any) -> Any:
            record("lock taken")
            return super().apply_async(*args, **kwargs)

    @app.task(name="copied.once", base=QueueOnce, shared=False)
    def once(order: int) -> None:
        record(order)

    return once.s(1)


NOT_REPLAYABLE = {
    "an apply_async of the task's class": (locked_once, {}),
    "a chain": (chained, {}),
    "a link": (lambda app: linked(tasks(app)), {}),
    "compression": (lambda app: tasks(app)["charge"].s(1), {"task_compression": "zlib"}),
    "a routing function": (
        lambda app: tasks(app)["charge"].s(1),
        {"task_routes": [lambda name, *_, **__: {"queue": f"q-{len(effects)}"}]},
    ),
    "protocol 1": (lambda app: tasks(app)["charge"].s(1), {"task_protocol": 1}),
}


def test_a_task_class_s_own_apply_async_runs_in_every_scenario(app: Celery) -> None:
    signature = locked_once(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.record")
        report = faults.sweep(signature, lambda: list(effects), effects.clear, pairs=False)
    assert report.baseline_observed == ["lock taken", 1]
    assert {str(s.observed[0]) for s in report.scenarios} == {"lock taken"}


@pytest.mark.parametrize("case", list(NOT_REPLAYABLE))
def test_what_a_copy_cannot_reproduce_publishes_in_full(app: Celery, case: str) -> None:
    make, conf = NOT_REPLAYABLE[case]
    app.conf.update(conf)
    signature = make(app)
    with CeleryFaults(app) as faults:
        with copies.recording(app) as sent:
            outcome = faults.run(signature.clone())
        frozen_id = outcome.task_id if getattr(signature, "subtask_type", None) is None else None
        assert copies.copyable(app, signature, sent, frozen_id or outcome.task_id) is None
