"""Chords complete as the app's configured result backend completes them."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, chord

from pytest_celery_faults import CeleryFaults

REDIS = "redis://127.0.0.1:6379/15"  # named only: the harness never connects to it


class Ledger:
    """Rows keyed by order: writing one twice changes nothing (an idempotent task)."""

    def __init__(self) -> None:
        self.rows: dict[str, int] = {}
        self.totals: list[int] = []

    def write(self, key: str, value: int) -> None:
        self.rows[key] = value

    def record_total(self, value: int) -> None:
        self.totals.append(value)


ledger = Ledger()


@pytest.fixture(autouse=True)
def _fresh_ledger() -> None:
    ledger.rows.clear()
    ledger.totals.clear()


def chord_app(app: Celery, backend: str | None) -> tuple[Any, Any]:
    if backend:
        app.conf.result_backend = backend

    @app.task(name="shop.line", shared=False, acks_late=True, reject_on_worker_lost=True)
    def line(order: str, amount: int) -> int:
        ledger.write(order, amount)
        return amount

    @app.task(name="shop.total", shared=False, acks_late=True, reject_on_worker_lost=True)
    def total(amounts: list[int]) -> int:
        ledger.write("total", sum(amounts))
        return sum(amounts)

    return line, total


def run_two_line_chord(app: Celery, backend: str | None, *specs: str) -> tuple[Any, CeleryFaults]:
    """Run ``chord([line a=1, line b=2], total)`` under ``specs``: its outcome and harness."""
    line, total = chord_app(app, backend)
    with CeleryFaults(app) as faults:
        outcome = faults.run(chord([line.s("a", 1), line.s("b", 2)], total.s()), *specs)
    return outcome, faults


def names_published(faults: CeleryFaults) -> list[str]:
    return [event.task_name for event in faults.ledger if event.kind == "published"]


def test_redis_chord_counts_in_the_backend_and_ignores_duplicate_header_results(
    app: Celery,
) -> None:
    """Measured on Celery 5.7 with a Redis backend: under redelivery the body runs twice."""
    outcome, faults = run_two_line_chord(app, REDIS, "redeliver")
    assert (outcome.name, outcome.state, outcome.result) == ("shop.total", "SUCCESS", 3)
    # one body dispatch, delivered twice by the spec; never a chord_unlock
    assert names_published(faults) == ["shop.line", "shop.line", "shop.total"]
    assert (outcome.deliveries, outcome.executions) == (2, 2)


def test_redis_chord_body_gets_the_header_results_in_header_order(app: Celery) -> None:
    line, total = chord_app(app, REDIS)

    @app.task(name="shop.collect", shared=False)
    def collect(amounts: list[int]) -> list[int]:
        return amounts

    with CeleryFaults(app) as faults:
        header = [line.s(key, amount) for key, amount in (("a", 3), ("b", 1), ("c", 2))]
        outcome = faults.run(chord(header, collect.s()))
    assert outcome.result == [3, 1, 2]


def test_redis_chord_with_a_failed_header_task_fails_the_body_with_a_chord_error(
    app: Celery,
) -> None:
    line, total = chord_app(app, REDIS)

    @app.task(name="shop.broken", shared=False)
    def broken() -> int:
        raise ValueError("no stock")

    with CeleryFaults(app) as faults:
        outcome = faults.run(chord([line.s("a", 1), broken.s()], total.s()))
    assert outcome.state == "FAILURE"
    assert type(outcome.exception).__name__ == "ChordError"
    assert "raised ValueError('no stock')" in str(outcome.exception)
    assert "total" not in ledger.rows


def test_a_chord_of_idempotent_tasks_is_idempotent_on_redis_from_celery_5_7(app: Celery) -> None:
    """Before 5.7 Celery's Lua script counts a member's duplicate, and the body runs early."""
    from pytest_celery_faults import _celery_internals as internals

    line, total = chord_app(app, REDIS)
    signature = chord([line.s("a", 1), line.s("b", 2)], total.s())
    with CeleryFaults(app) as faults:
        faults.track((ledger, "write"))
        if internals.redis_chords_ignore_duplicates():
            scenarios = faults.assert_idempotent(
                signature, observe=lambda: dict(ledger.rows), reset=ledger.rows.clear
            )
            assert scenarios and all(not scenario.failed for scenario in scenarios)
            return
        with pytest.raises(AssertionError) as raised:
            faults.assert_idempotent(
                signature, observe=lambda: dict(ledger.rows), reset=ledger.rows.clear
            )
    # the lost ack redelivers line a, whose duplicate completes the count: total of [1, 1]
    assert "1 of 8 fault scenario(s) duplicated or diverged" in str(raised.value)
    assert "under 'ack_lost'" in str(raised.value)
    assert "+{'a': 1, 'b': 2, 'total': 2}" in str(raised.value)


def test_a_key_value_backend_with_incr_counts_with_celery_s_own_code(app: Celery) -> None:
    outcome, faults = run_two_line_chord(app, "cache+memory://")
    assert (outcome.state, outcome.result) == ("SUCCESS", 3)
    assert names_published(faults) == ["shop.line", "shop.line", "shop.total"]


def test_without_native_chords_celery_polls_with_chord_unlock_which_no_spec_binds(
    app: Celery,
) -> None:
    outcome, faults = run_two_line_chord(app, None, "redeliver")
    unlock = [o for o in faults.outcomes() if o.name == "celery.chord_unlock"]
    assert (outcome.state, outcome.result) == ("SUCCESS", 3)
    # the redelivery applies to the app's tasks, not to Celery's own poller
    assert [(o.deliveries, o.faults) for o in unlock] == [(1, [])]
    assert (outcome.deliveries, outcome.executions) == (2, 2)
    assert faults.warnings == []  # chord_unlock's arguments (ids, a signature) are not checked


def test_redis_chords_follow_the_installed_celery_on_duplicates(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before Celery 5.7 the Lua script counted a duplicate: an early one completes the set."""
    import celery.backends.redis

    from pytest_celery_faults import _celery_internals as internals

    ignores = "SISMEMBER" in getattr(celery.backends.redis, "CHORD_PART_RETURN_LUA", "")
    assert internals.redis_chords_ignore_duplicates() is ignores
    monkeypatch.setattr(internals, "redis_chords_ignore_duplicates", lambda: False)
    app.conf.worker_prefetch_multiplier = 1  # line a's second copy comes before line b
    outcome, _ = run_two_line_chord(app, REDIS, "shop.line:redeliver")
    # line a ran twice before line b: the count reached 2 with [1, 1]
    assert (outcome.state, outcome.result, outcome.executions) == ("SUCCESS", 2, 1)


@pytest.mark.parametrize("backend", [None, "cache+memory://"])
def test_a_chord_runs_without_redis_py_installed(
    app: Celery, backend: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(#19.17) Celery's Redis backend imports redis-py: only a Redis backend may need it."""
    import sys

    for name in [name for name in sys.modules if name.split(".")[0] == "redis"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "celery.backends.redis", raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)  # what `import redis` meets without it
    outcome, faults = run_two_line_chord(app, backend, "redeliver")
    assert (outcome.name, outcome.state, outcome.result) == ("shop.total", "SUCCESS", 3)
    assert "celery.backends.redis" not in sys.modules


@pytest.mark.parametrize("backend", [None, REDIS, "cache+memory://"])
def test_a_chord_whose_member_is_lost_is_a_loss_not_a_divergence(
    app: Celery, backend: str | None
) -> None:
    """Early ack: a killed header task fails the chord and the body never runs."""
    if backend:
        app.conf.result_backend = backend

    @app.task(name="shop.line", shared=False)
    def line(order: str, amount: int) -> int:
        ledger.write(order, amount)
        return amount

    @app.task(name="shop.total", shared=False)
    def total(amounts: list[int]) -> int:
        ledger.write("total", sum(amounts))
        return sum(amounts)

    signature = chord([line.s("a", 1), line.s("b", 2)], total.s())
    # power_loss@0 also loses line a's result for good: without native chords Celery's
    # chord_unlock then polls forever, and the drain stops instead of failing.
    specs = ["sigkill@0", "sigkill@1", "exit(1)@1", "power_loss@0"]
    with CeleryFaults(app) as faults:
        faults.track((ledger, "write"))
        scenarios = faults.assert_idempotent(
            signature, lambda: dict(ledger.rows), ledger.rows.clear, specs=specs
        )
        with pytest.raises(AssertionError, match=r"shop.total can be lost: 4 of 4 fault"):
            faults.assert_no_loss(
                signature, lambda: dict(ledger.rows), ledger.rows.clear, specs=specs
            )
    assert [s.verdict for s in scenarios] == ["partial"] * 4, [s.problem for s in scenarios]
    assert scenarios[0].problem.startswith("partial: shop.line[")
    assert scenarios[0].problem.endswith(
        "never completed and nothing ran it again (its child process was killed), so "
        "shop.total never ran (state FAILURE, ChordError); the 1 side effect(s) done "
        "(Ledger.write x1) leave the world half done"
    ), scenarios[0].problem


def test_a_chain_whose_first_task_is_lost_is_a_loss(app: Celery) -> None:
    """Early ack: the chain stops where its task was lost; its last task never runs."""
    from celery import chain

    @app.task(name="shop.line", shared=False)
    def line(order: str, amount: int) -> int:
        ledger.write(order, amount)
        return amount

    @app.task(name="shop.total", shared=False)
    def total(amount: int) -> int:
        ledger.write("total", amount)
        return amount

    with CeleryFaults(app) as faults:
        scenarios = faults.assert_idempotent(
            chain(line.s("a", 1), total.s()),
            lambda: dict(ledger.rows),
            ledger.rows.clear,
            specs=["power_loss@0"],
        )
    assert [s.verdict for s in scenarios] == ["lost"]
    assert scenarios[0].problem.endswith(
        "never completed and nothing ran it again (the worker lost power; the broker holds "
        "no copy), so shop.total never ran (state PENDING)"
    )
