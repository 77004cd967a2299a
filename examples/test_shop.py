"""Each bug class: the buggy task is caught (with the exact failure text), the fix passes.

The buggy tests assert the failure text itself, so an example cannot silently
start passing: if the plugin stopped catching the bug, these tests would fail.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from shop import services, tasks
from shop.fakes import World

from pytest_celery_faults import CeleryFaults


def test_charge_without_idempotency_key_is_caught(celery_faults: Any, world: World) -> None:
    with pytest.raises(AssertionError) as caught:
        celery_faults.assert_idempotent(
            tasks.charge_buggy.s(1), world.observe, world.reset, specs=["redeliver"]
        )
    message = str(caught.value)
    assert "shop.charge_buggy is not idempotent: 1 of 1 fault scenario(s)" in message
    assert "+ 'charges': [(1, 1999), (1, 1999)]," in message.replace("+{", "+ ")


def test_charge_with_idempotency_key_is_idempotent(celery_faults: Any, world: World) -> None:
    celery_faults.assert_idempotent(tasks.charge.s(1), world.observe, world.reset)


def test_email_before_mark_is_sent_twice_after_a_power_loss(
    celery_faults: Any, world: World
) -> None:
    with pytest.raises(AssertionError, match=r"under 'power_loss@1'") as caught:
        celery_faults.assert_idempotent(
            tasks.confirm_buggy.s(1), world.observe, world.reset, specs=["power_loss@1"]
        )
    assert "'emails': ['Order 1 confirmed', 'Order 1 confirmed']" in str(caught.value)


def test_email_with_a_message_id_survives_every_crash(celery_faults: Any, world: World) -> None:
    celery_faults.assert_idempotent(tasks.confirm.s(1), world.observe, world.reset)


def test_decremented_counter_is_caught(celery_faults: Any, world: World) -> None:
    with pytest.raises(AssertionError, match=r"shop\.reserve_buggy is not idempotent") as caught:
        celery_faults.assert_idempotent(
            tasks.reserve_buggy.s(1, "mug"), world.observe, world.reset
        )
    assert "'stock': [('mug', 8)]" in str(caught.value)


def test_reservation_row_is_idempotent(celery_faults: Any, world: World) -> None:
    celery_faults.assert_idempotent(tasks.reserve.s(1, "mug"), world.observe, world.reset)


def test_child_task_published_twice_ships_twice(celery_faults: Any, world: World) -> None:
    # sigkill@2: after the charge (1) and the publish of the child (2), before the update
    with pytest.raises(AssertionError, match=r"under 'sigkill@2'") as caught:
        celery_faults.assert_idempotent(
            tasks.checkout_buggy.s(1), world.observe, world.reset, specs=["sigkill@2"]
        )
    assert "'shipments': [(1,), (1,)]" in str(caught.value)


def test_idempotent_child_absorbs_the_second_publish(celery_faults: Any, world: World) -> None:
    celery_faults.assert_idempotent(tasks.checkout.s(1), world.observe, world.reset)
    outcome = celery_faults.run(tasks.checkout.s(1), "shop.checkout:sigkill@2")
    publishes = [e for e in celery_faults.effects if e.kind == "publish"]
    assert outcome.state == "SUCCESS" and len(publishes) == 2  # published twice, shipped once


def test_early_ack_loses_the_order_on_power_loss(celery_faults: Any, world: World) -> None:
    world.reset()
    services.execute("DELETE FROM orders")
    outcome = celery_faults.run(tasks.record_order_buggy.s(2), "power_loss@0")
    assert (outcome.lost, outcome.state, outcome.deliveries) == (True, "PENDING", 1)
    assert services.query("SELECT id FROM orders") == []


def test_acks_late_redelivers_the_order_after_power_loss(celery_faults: Any, world: World) -> None:
    services.execute("DELETE FROM orders")
    outcome = celery_faults.run(tasks.record_order.s(2), "power_loss@0")
    assert (outcome.lost, outcome.state, outcome.deliveries) == (False, "SUCCESS", 2)
    assert services.query("SELECT id FROM orders") == [(2,)]


def test_acks_late_alone_acks_a_message_whose_child_exited(
    celery_faults: Any, world: World
) -> None:
    outcome = celery_faults.run(tasks.import_order_buggy.s(3), "exit(1)@1")
    assert (outcome.acked, outcome.lost, outcome.state) == (True, True, "FAILURE")
    assert str(outcome.exception).startswith("Worker exited prematurely: exitcode 1")
    assert services.query("SELECT status FROM orders WHERE id = 3") == [("new",)]


def test_reject_on_worker_lost_requeues_it(celery_faults: Any, world: World) -> None:
    outcome = celery_faults.run(tasks.import_order.s(3), "exit(1)@1")
    assert (outcome.rejected, outcome.deliveries, outcome.state) == ("requeue", 2, "SUCCESS")
    assert services.query("SELECT status FROM orders WHERE id = 3") == [("imported",)]


def test_retry_with_backoff_runs_on_the_virtual_clock(celery_faults: Any, database: Any) -> None:
    world = World()  # the task writes nothing: only the payment service is faked
    world.payment_failures_left = 2
    celery_faults.http.add_callback("POST", services.PAYMENTS, callback=world.payments)
    outcome = celery_faults.run(tasks.charge_with_retries.s(1))
    assert (outcome.state, outcome.retries) == ("SUCCESS", 2)
    assert celery_faults.clock.elapsed == pytest.approx(2 + 4)  # backoff 2 s, then 4 s
    assert [c["order"] for c in world.charges] == [1]


@pytest.mark.parametrize(("task", "emails"), [("remind_buggy", 6), ("remind", 1)])
def test_long_countdown_on_redis_runs_again_every_visibility_timeout(
    celery_faults_app: Celery, database: Any, task: str, emails: int
) -> None:
    world = World()
    # visibility_timeout is 600 s in the app's settings; the reminder is 3,500 s away
    with CeleryFaults(celery_faults_app, profile="redis") as faults:
        faults.http.add_callback("POST", services.MAIL, callback=world.mail)
        result = getattr(tasks, task).apply_async((1,), countdown=3500)
        faults.drain()
        outcome = faults.outcome(result.id)
    assert outcome.executions == 6  # delivered at 0, 600, ..., 3000 s: all run at the ETA
    assert len(world.emails) == emails
