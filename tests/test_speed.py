"""What the harness caches for speed changes nothing Celery, kombu or Python would do.

The speed-ups sit behind one switch (:mod:`pytest_celery_faults.speedups`); the last
tests run the same scenarios with it on and off and compare everything they show.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import random
import re
import threading
import time
import traceback
from datetime import UTC, datetime
from traceback import format_tb
from typing import Any

import billiard.einfo
import pytest
from celery import Celery, chord, signals
from kombu.pools import ProducerPool
from kombu.serialization import dumps, loads

from pytest_celery_faults import CeleryFaults, speedups
from pytest_celery_faults import _celery_internals as internals
from pytest_celery_faults.engine.checks import comes_back_unchanged, round_trip_problem
from pytest_celery_faults.engine.core import SeededRandom
from pytest_celery_faults.engine.effects import EffectLog
from pytest_celery_faults.session.report import SessionReport, record_harness

#: Fields that differ between any two publishes of one signature.
PER_MESSAGE = {"id", "root_id", "correlation_id", "delivery_tag"}


def _without_ids(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k not in PER_MESSAGE}
    return value


def _add(app: Celery, **options: Any) -> Any:
    @app.task(name="tests.add", shared=False, **options)
    def add(x: int, y: int) -> int:
        return x + y

    return add


def test_the_bound_producer_publishes_what_kombus_own_pool_publishes(app: Celery) -> None:
    add = _add(app)
    options: dict[str, Any] = {
        "countdown": 5,
        "expires": 60,
        "priority": 3,
        "queue": "other",
        "headers": {"tenant": "t1"},
    }
    with CeleryFaults(app) as faults:
        add.apply_async((1, 2), **options)
        with ProducerPool(app.pool, limit=1).acquire(block=True) as stock:
            add.apply_async((1, 2), producer=stock, **options)
        bound, pooled = (message.payload for message in faults.broker.queues["other"])
        assert bound["headers"]["id"] != pooled["headers"]["id"]
        assert _without_ids(bound) == _without_ids(pooled)
        assert bound["body"] == pooled["body"]


def test_a_new_queue_is_declared_once_and_each_message_lands(app: Celery) -> None:
    add = _add(app)
    with CeleryFaults(app) as faults:
        for queue in ("first", "second", "first"):
            add.apply_async((1, 2), queue=queue)
        assert {q: len(m) for q, m in faults.broker.queues.items()} == {"first": 2, "second": 1}


def test_a_message_taken_with_basic_get_is_acked_through_kombu(app: Celery) -> None:
    add = _add(app)
    with CeleryFaults(app) as faults:
        add.apply_async((1, 2))
        with app.connection_for_read() as connection:
            message = connection.default_channel.basic_get("celery")
            assert message.delivery_tag.startswith("published.")
            message.ack()
        assert [event.kind for event in faults.ledger] == ["published"]


def test_a_setting_set_while_the_harness_runs_is_read_at_once(app: Celery) -> None:
    add = _add(app)
    settings_class = type(app.conf)
    with CeleryFaults(app) as faults:
        assert faults.run(add.s(1, 2)).acked
        assert app.conf.task_acks_late is False  # Celery's default, now from the snapshot
        app.conf.task_acks_late = True
        assert app.conf.task_acks_late is True
        app.conf.changes["result_extended"] = True  # written past the view
        assert app.conf.result_extended is True
        outcome = faults.run(add.s(1, 2), "sigkill@0")
        assert (outcome.deliveries, outcome.lost) == (1, True)  # acks late, not requeued
    assert type(app.conf) is settings_class
    assert app.conf.task_acks_late is False  # the harness restores the app's configuration


def test_a_default_is_the_same_object_from_the_snapshot(app: Celery) -> None:
    before = app.conf.task_publish_retry_policy
    with internals.default_settings_snapshot(app):
        first = app.conf.task_publish_retry_policy
        again = app.conf["task_publish_retry_policy"]
    assert first is before and again is before


def _raise_with_carets() -> None:
    values: dict[str, Any] = {"a": [1]}
    values["a"][0] + values["b"][1]  # noqa: B018


def test_tracebacks_read_the_same_with_carets_cached() -> None:
    original = traceback._extract_caret_anchors_from_line_segment  # type: ignore[attr-defined]
    try:
        _raise_with_carets()
    except KeyError as exc:
        error = exc
    plain = "".join(traceback.format_exception(error))
    with internals.caret_anchors_cached():
        cached = ["".join(traceback.format_exception(error)) for _ in range(2)]
    assert "^^^^" in plain
    assert cached == [plain, plain]
    assert traceback._extract_caret_anchors_from_line_segment is original  # type: ignore[attr-defined]


class Color(enum.IntEnum):
    RED = 1


@pytest.mark.parametrize(
    "value", ["", "é\U0001f600", "\ud800", 0, -(2**63), 2**64 - 1, True, False, None]
)
@pytest.mark.parametrize("serializer", ["json", "pickle"])
def test_values_the_checks_skip_do_come_back_unchanged(value: Any, serializer: str) -> None:
    assert comes_back_unchanged(value, serializer)
    content_type, encoding, data = dumps(value, serializer=serializer)
    back = loads(data, content_type, encoding, accept={content_type})
    assert back == value and type(back) is type(value)


@pytest.mark.parametrize("value", [Color.RED, 2**65, 1.5, (1,), b"x"])
def test_other_values_still_go_through_the_round_trip(value: Any) -> None:
    assert not comes_back_unchanged(value, "json")
    assert not comes_back_unchanged("text", "yaml")
    if isinstance(value, Color):
        problem = round_trip_problem(value, "json", "argument 0", "tests.add")
        assert problem is not None and "(Color) comes back" in problem


# -- the one switch: every speed-up off changes nothing a test sees ----------------------

#: A task id, whole or as the timeline shortens it; a memory address in a repr.
_IDS = re.compile(r"\b[0-9a-f]{8}(?:-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?\b")
_ADDRESSES = re.compile(r"0x[0-9a-f]+")


def _same_ids(text: str) -> str:
    """``text`` with each task id numbered in order of appearance (ids are random per run)."""
    names: dict[str, str] = {}

    def name(match: re.Match[str]) -> str:
        return names.setdefault(match[0][:8], f"<id{len(names) + 1}>")

    return _ADDRESSES.sub("0x?", _IDS.sub(name, text))


class Shop:
    """What the scenario tasks change: e-mails sent and orders marked sent."""

    def __init__(self) -> None:
        self.emails: list[Any] = []
        self.marks: set[Any] = set()

    def send_email(self, order: Any) -> None:
        self.emails.append(order)

    def reset(self) -> None:
        self.emails.clear()
        self.marks.clear()

    def observe(self) -> dict[str, Any]:
        return {"emails": list(self.emails), "marks": sorted(self.marks)}


def _scenarios() -> str:
    """A sweep (its findings, timelines and report JSON), a kill and its redelivery, a child
    lost for good, a task that raises, and a chord: everything they show, as one text."""
    shop = Shop()
    app = Celery("speed", set_as_current=False)
    app.conf.broker_url = "memory://"
    late = {"acks_late": True, "reject_on_worker_lost": True, "shared": False}

    @app.task(name="speed.email_first", **late)
    def email_first(order: int) -> None:
        if order not in shop.marks:
            shop.send_email(order)
            shop.marks.add(order)

    @app.task(name="speed.charge", acks_late=True, shared=False)
    def charge(order: int) -> None:
        shop.send_email(("charged", order))

    @app.task(name="speed.fails", shared=False)
    def fails() -> int:
        values: dict[str, Any] = {"a": [1]}
        return values["a"][0] + values["b"][1]  # type: ignore[no-any-return]

    @app.task(name="speed.line", **late)
    def line(amount: int) -> int:
        shop.send_email(("line", amount))
        return amount

    @app.task(name="speed.total", **late)
    def total(amounts: list[int]) -> int:
        shop.send_email(("total", sum(amounts)))
        return sum(amounts)

    shown: list[str] = []

    def on_failure(**sent: Any) -> None:
        """What a receiver of ``task_failure`` (Sentry, a logger) formats."""
        einfo = sent["einfo"]
        shown.append("".join(format_tb(sent["traceback"])))
        shown.append("".join(format_tb(einfo.tb)))  # billiard's picklable copy of the frames
        shown.append(str(einfo.traceback))

    signals.task_failure.connect(on_failure, weak=False)
    try:
        with CeleryFaults(app) as faults:
            faults.track((shop, "send_email"))
            report = faults.sweep(email_first.s(1), shop.observe, shop.reset)
            shown.append(report.summary())
            for scenario in report.scenarios:
                shown += [scenario.spec, scenario.verdict, scenario.problem, scenario.diff]
                shown += scenario.outcome.timeline.texts()
            shown += [found.describe(report.baseline) for found in report.failures]
            for signature, specs in [
                (email_first.s(2), ("sigkill@0",)),
                (email_first.s(3), ("sigkill@1",)),
                (charge.s(4), ("sigkill@1",)),
                (fails.s(), ()),
                (chord([line.s(1), line.s(2)], total.s()), ("sigkill@1",)),
                (chord([line.s(3), line.s(4)], total.s()), ()),
            ]:
                outcome = faults.run(signature, *specs)
                meta = faults.backend.get_task_meta(outcome.task_id)
                shown += [outcome.summary(), str(outcome.timeline), repr(outcome.exception)]
                shown += [str(meta.get("status")), str(meta.get("traceback"))]
            shown.append(str(faults.timeline))
            shown.append(repr(shop.observe()))
            # Every effect as recorded (its time from the clock's start: the clock starts
            # at the wall-clock second), and outcomes read after later runs without reset().
            start = faults.clock.start
            shown += [
                repr((*effect[:2], effect.time - start, *effect[3:])) for effect in faults.effects
            ]
            early = faults.run(email_first.s(5))
            late = faults.run(email_first.s(6), "sigkill@1")
            shown += [str(early.timeline), str(late.timeline)]
            shown.append(str(faults.outcome(early.task_id).timeline))
            shown.append(str(early.timeline == faults.outcome(early.task_id).timeline))
            faults.reset()
            shown += [str(late.timeline), str(len(faults.timeline)), str(len(faults.effects))]
            document = SessionReport(seed=0)
            document.add(record_harness("test_speed.py::scenarios", faults, [], faults.warnings))
            shown.append(document.to_json())
    finally:
        signals.task_failure.disconnect(on_failure)
        app.close()
    return _same_ids("\n".join(shown))


def test_the_switch_reads_the_environment_and_the_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(speedups.ENVIRONMENT_VARIABLE, raising=False)
    assert speedups.enabled()
    with speedups.disabled():
        with speedups.disabled():
            assert not speedups.enabled()
        assert not speedups.enabled()
    assert speedups.enabled()
    monkeypatch.setenv(speedups.ENVIRONMENT_VARIABLE, "0")
    assert speedups.enabled()
    monkeypatch.setenv(speedups.ENVIRONMENT_VARIABLE, "1")
    assert not speedups.enabled()


def test_switched_off_no_speed_up_touches_celery_billiard_or_python(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(speedups.ENVIRONMENT_VARIABLE, raising=False)
    frame_code = billiard.einfo._Frame.Code
    anchors = traceback._extract_caret_anchors_from_line_segment  # type: ignore[attr-defined]
    settings_class = type(app.conf)
    with (
        speedups.disabled(),
        internals.code_summaries_cached(),
        internals.caret_anchors_cached(),
        internals.default_settings_snapshot(app),
    ):
        assert billiard.einfo._Frame.Code is frame_code
        assert traceback._extract_caret_anchors_from_line_segment is anchors  # type: ignore[attr-defined]
        assert type(app.conf) is settings_class
    with (
        internals.code_summaries_cached(),
        internals.caret_anchors_cached(),
        internals.default_settings_snapshot(app),
    ):  # and switched on, each does take over (or the comparison below proves nothing)
        assert billiard.einfo._Frame.Code is not frame_code
        assert traceback._extract_caret_anchors_from_line_segment is not anchors  # type: ignore[attr-defined]
        assert type(app.conf) is not settings_class


def test_switched_off_a_tracked_call_goes_through_the_log_s_perform(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(speedups.ENVIRONMENT_VARIABLE, raising=False)
    shop = Shop()

    @app.task(name="speed.send", shared=False)
    def send() -> None:
        shop.send_email(1)

    performed: list[str] = []
    perform = EffectLog.perform

    def spied(log: EffectLog, kind: Any, label: str, *args: Any, **kwargs: Any) -> Any:
        performed.append(label)
        return perform(log, kind, label, *args, **kwargs)

    monkeypatch.setattr(EffectLog, "perform", spied)
    counts = []
    for switch in (speedups.disabled, contextlib.nullcontext):
        with switch(), CeleryFaults(app) as faults:
            faults.track((shop, "send_email"))
            faults.run(send.s())
            counts.append(performed.count("Shop.send_email"))
            assert [str(effect) for effect in faults.effects] == ["call Shop.send_email"]
            assert faults._engine is not None
            assert faults._engine.calls == {"Shop.send_email": 1}  # counted: no warning at stop
            assert [line.text for line in faults.timeline][1:] == [
                "delivered to celery@faults-1#1",
                "acked",  # early: before the body runs
                "side effect 1: call Shop.send_email",
            ]
    assert counts == [1, 1]  # off: through perform; on: inlined, perform not called again


def test_a_task_s_effects_are_its_own_on_its_thread_and_context_not_on_others(
    app: Celery,
) -> None:
    """Which execution runs here is a context variable, with the speed-ups on or off: what
    the body runs in a copy of its context is its own (``asyncio.to_thread`` too, as in the
    worker's child), a thread it starts with a fresh context runs no task."""
    shop = Shop()

    async def in_a_thread_of_the_event_loop() -> None:
        await asyncio.to_thread(shop.send_email, "asyncio.to_thread")

    @app.task(name="speed.spread", shared=False)
    def spread() -> None:
        shop.send_email("body")
        contextvars.copy_context().run(shop.send_email, "copied context")
        asyncio.run(in_a_thread_of_the_event_loop())
        helper = threading.Thread(target=shop.send_email, args=("own thread",))
        helper.start()
        helper.join()

    seen = []
    for switch in (speedups.disabled, contextlib.nullcontext):
        with switch(), CeleryFaults(app) as faults:
            faults.track((shop, "send_email"))
            shop.send_email("test")
            faults.run(spread.s())
            seen.append([(effect.task_name, effect.index) for effect in faults.effects])
    assert (
        seen[0]
        == seen[1]
        == [
            (None, None),  # the test's own call
            ("speed.spread", 1),
            ("speed.spread", 2),  # a context copied in the body is still the body's
            ("speed.spread", 3),  # and so is asyncio's copy, on its executor's thread
            (None, None),  # a thread the body starts runs no task
        ]
    )


def test_a_body_reads_the_virtual_clock_at_each_drain_with_or_without_the_speed_up(
    app: Celery,
) -> None:
    """A drain points time-machine at the clock's time (a reused ``travel``, a speed-up)."""
    read: list[float] = []

    @app.task(name="speed.reads_time", shared=False)
    def reads_time() -> None:
        read.append(time.time())
        read.append(datetime.now(UTC).timestamp())

    seen = []
    for switch in (speedups.disabled, contextlib.nullcontext):
        read.clear()
        with switch(), CeleryFaults(app) as faults:
            faults.run(reads_time.s())
            reads_time.apply_async(countdown=10)
            faults.drain()
            faults.clock.advance_to(faults.clock.time() + 2.5)
            faults.run(reads_time.s())
            seen.append([moment - faults.clock.start for moment in read])
        # The test's own clock is real again: behind the virtual one, 12.5 s ahead.
        assert time.time() < faults.clock.time()
    assert seen[0] == seen[1] == [0.0, 0.0, 10.0, 10.0, 12.5, 12.5]


def test_a_reset_replays_the_seed_s_draws_whether_or_not_it_reseeds(app: Celery) -> None:
    """The scenario's random sources reseed only after a draw (a speed-up): the worker
    order and the retry jitter of each scenario are still those of a fresh harness."""

    @app.task(
        name="speed.flaky",
        shared=False,
        autoretry_for=(ConnectionError,),
        max_retries=3,
        retry_backoff=1000,
        retry_backoff_max=100_000,
        retry_jitter=True,
    )
    def flaky() -> None:
        raise ConnectionError("down")

    add = _add(app)

    def scenarios() -> list[tuple[float, str]]:
        seen = []
        with CeleryFaults(app, seed=3, workers=3) as faults:
            for signature in (flaky.s(), add.s(1, 2), add.s(1, 2), flaky.s(), flaky.s()):
                faults.reset()
                outcome = faults.run(signature)
                text = re.sub(r"#\d+", "#N", str(outcome.timeline))  # a reset's new connection
                seen.append((faults.clock.elapsed, _same_ids(text)))
            assert isinstance(faults.scheduler.random, random.Random)
        return seen

    fast = scenarios()
    with speedups.disabled():
        plain = scenarios()
    assert fast == plain
    assert fast[0] == fast[3] == fast[4] and fast[1] == fast[2]  # as in a fresh harness
    assert fast[0][0] > 1000  # the jitter drew: the backoff waited


def test_a_seeded_source_goes_back_to_its_seed_only_when_drawn_from() -> None:
    for start in (7, "7:retry_jitter"):
        source = SeededRandom(start)
        source.restart()
        assert not source.drawn  # nothing drawn: the reseed is skipped
        assert source.getstate() == random.Random(start).getstate()
        for draw in range(6):
            if draw == 0:
                source.shuffle(list(range(5)))
            elif draw == 1:
                source.randrange(10)
            elif draw == 2:
                source.random()
            elif draw == 3:
                source.randbytes(2)
            elif draw == 4:
                source.seed(1)
            else:
                source.setstate(random.Random(2).getstate())
            assert source.drawn
            source.restart()
            assert source.getstate() == random.Random(start).getstate()
            assert source.random() == random.Random(start).random()
            source.restart()


def test_every_speed_up_off_changes_no_outcome_timeline_traceback_or_report(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(speedups.ENVIRONMENT_VARIABLE, raising=False)
    fast = _scenarios()
    with speedups.disabled():
        plain = _scenarios()
    again = _scenarios()
    assert "duplicated" in fast and "child killed" in fast and "WorkerLostError" in fast
    assert "KeyError" in fast and "^^^^" in fast and "speed.total" in fast
    frames = 'in fails\n    return values["a"][0]'  # as a task_failure receiver formats them
    assert fast.count(frames) >= 3
    assert plain.splitlines() == fast.splitlines()
    assert again == fast
