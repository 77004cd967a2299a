"""Broker profiles: when a broker gives unacked messages back, and to whom."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from pytest_celery_faults import CeleryFaults

seen: list[tuple[int, bool]] = []


def effect() -> None:
    """A tracked side effect."""


def make_task(app: Celery, **options: Any) -> Any:
    @app.task(name="profiles.job", bind=True, shared=False, **options)
    def job(self: Any, n: int) -> int:
        seen.append((n, bool(self.request.delivery_info.get("redelivered"))))
        effect()
        return n

    return job


@pytest.fixture(autouse=True)
def _clear() -> None:
    seen.clear()


@pytest.mark.parametrize(("profile", "timeout"), [("redis", 45.0), ("sqs", 90.0)])
def test_visibility_timeout_profiles_restore_only_after_it(
    app: Celery, profile: str, timeout: float
) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": timeout}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(1), "power_loss@1")
        assert faults.clock.elapsed == pytest.approx(timeout)
    assert seen == [(1, False), (1, True)]
    assert outcome.deliveries == 2


def test_rabbitmq_restores_at_once(app: Celery) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        faults.run(task.s(1), "power_loss@1")
        assert faults.clock.elapsed == 0
    assert seen == [(1, False), (1, True)]


@pytest.mark.parametrize(("profile", "elapsed"), [("rabbitmq", 0.0), ("redis", 20.0)])
def test_ack_lost_redelivers_per_profile(app: Celery, profile: str, elapsed: float) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 20}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(1), "ack_lost")
        assert faults.clock.elapsed == pytest.approx(elapsed)
    assert seen == [(1, False), (1, True)]
    assert (outcome.deliveries, outcome.acked) == (2, True)


def test_redis_runs_an_eta_beyond_the_visibility_timeout_twice(app: Celery) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 10}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile="redis") as faults:
        result = task.apply_async((7,), countdown=25)
        faults.drain()
        outcome = faults.outcome(result.id)
    # delivered at t=0 and held for its ETA; restored at t=10 and t=20 while held
    assert outcome.executions == outcome.deliveries == 3
    assert seen[0] == (7, False) and all(redelivered for _, redelivered in seen[1:])


def test_rabbitmq_holds_an_eta_without_duplicating_it(app: Celery) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        result = task.apply_async((7,), countdown=25)
        faults.drain()
        assert faults.outcome(result.id).executions == 1
    assert seen == [(7, False)]


def test_a_redelivered_message_goes_to_a_live_worker(app: Celery) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, workers=2, seed=3) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(1), "power_loss@1")
        first, second = (record.worker for record in faults.records)
        assert sum(worker.alive for worker in faults.workers) == 1
    assert first != second
    assert first.split("#")[0] != second.split("#")[0]  # another worker, not a restart
    assert outcome.deliveries == 2


def test_prefetched_messages_of_a_dead_worker_come_back_redelivered(app: Celery) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        faults.inject("profiles.job:power_loss@0")
        results = [task.delay(n) for n in range(3)]
        faults.drain()
        outcomes = [faults.outcome(result.id) for result in results]
    # the worker held all three (prefetch 4) when it lost power on the first
    assert [o.deliveries for o in outcomes] == [2, 2, 2]
    assert sorted(seen) == [(0, True), (1, True), (2, True)]
    assert all(o.state == "SUCCESS" for o in outcomes)


def test_early_acked_message_is_lost_with_power_but_prefetched_ones_are_not(app: Celery) -> None:
    task = make_task(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        faults.inject("profiles.job:power_loss@0")
        first, second = task.delay(1), task.delay(2)
        faults.drain()
        lost, kept = faults.outcome(first.id), faults.outcome(second.id)
    assert (lost.lost, lost.state) == (True, "PENDING")
    assert (kept.state, kept.deliveries) == ("SUCCESS", 2)
