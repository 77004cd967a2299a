"""The in-memory broker on its own: how it settles, restores and records deliveries."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pytest_celery_faults.engine.broker import InMemoryBroker
from pytest_celery_faults.engine.clock import VirtualClock


@pytest.fixture
def broker() -> Iterator[InMemoryBroker]:
    made = InMemoryBroker(VirtualClock(start=1_000_000.0))  # RabbitMQ's profile
    yield made
    made.close()


def publish(broker: InMemoryBroker, task_id: str = "t1") -> None:
    broker.publish("celery", {"headers": {"id": task_id, "task": "shop.charge"}})


def test_an_ack_after_the_connection_dropped_is_ignored_and_recorded(
    broker: InMemoryBroker,
) -> None:
    publish(broker)
    first = broker.fetch(["celery"], "w#1")
    assert first is not None
    broker.connection_lost("w#1")  # RabbitMQ puts it back at once
    broker.ack(first.tag)  # the late ack of the gone connection
    assert broker.ledger.kinds("t1") == ["published", "delivered", "restored"]
    assert broker.ledger.kinds()[-1] == "ack_ignored"
    assert broker.holds("t1")
    again = broker.fetch(["celery"], "w#2")
    assert again is not None and again.redelivered


def test_a_reject_after_the_connection_dropped_is_ignored_and_recorded(
    broker: InMemoryBroker,
) -> None:
    publish(broker)
    first = broker.fetch(["celery"], "w#1")
    assert first is not None
    broker.connection_lost("w#1")
    broker.reject(first.tag, requeue=False)
    assert broker.ledger.kinds()[-1] == "reject_ignored"
    assert broker.holds("t1")  # the stale reject dropped nothing


def test_an_ack_settles_the_delivery_once(broker: InMemoryBroker) -> None:
    publish(broker)
    delivery = broker.fetch(["celery"], "w#1")
    assert delivery is not None
    broker.ack(delivery.tag)
    assert delivery.settled and delivery.settlement == "ack"
    assert not broker.holds("t1")
    broker.connection_lost("w#1")  # nothing unacked: nothing comes back
    assert broker.ledger.kinds("t1") == ["published", "delivered", "acked"]
    assert broker.fetch(["celery"], "w#2") is None


def test_a_requeued_reject_comes_back_and_a_dropped_one_does_not(
    broker: InMemoryBroker,
) -> None:
    publish(broker, "t1")
    publish(broker, "t2")
    one = broker.fetch(["celery"], "w#1")
    two = broker.fetch(["celery"], "w#1")
    assert one is not None and two is not None
    broker.reject(one.tag, requeue=True)
    broker.reject(two.tag, requeue=False)
    assert broker.holds("t1") and not broker.holds("t2")
    assert broker.ledger.kinds("t1")[-2:] == ["rejected", "restored"]
    assert broker.ledger.kinds("t2")[-1] == "rejected"
