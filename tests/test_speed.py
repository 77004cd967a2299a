"""What the harness caches for speed changes nothing Celery, kombu or Python would do."""

from __future__ import annotations

import enum
import traceback
from typing import Any

import pytest
from celery import Celery
from kombu.pools import ProducerPool
from kombu.serialization import dumps, loads

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults import _celery_internals as internals
from pytest_celery_faults.verdicts.checks import comes_back_unchanged, round_trip_problem

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
