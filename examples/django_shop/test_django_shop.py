"""The Django shop under faults, with pytest-django's ``db``: the bug is caught, the fix passes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def test_two_autocommit_writes_pay_twice_after_a_crash_between_them(
    celery_faults: Any, order_id: int, observe: Callable[[], Any], reset: Callable[[], None]
) -> None:
    from djangoshop.tasks import pay_buggy

    with pytest.raises(AssertionError, match=r"pay_buggy is not idempotent") as caught:
        celery_faults.assert_idempotent(pay_buggy.s(order_id), observe, reset)
    message = str(caught.value)
    assert f"'payments': [({order_id}, 1999), ({order_id}, 1999)]," in message
    assert "'sigkill@1'" in message and "duplicated" in message


def test_one_transaction_and_an_idempotent_receipt_survive_every_crash(
    celery_faults: Any,
    shop: Any,
    order_id: int,
    observe: Callable[[], Any],
    reset: Callable[[], None],
) -> None:
    from djangoshop.tasks import pay

    shop.count_mail()  # each mail sent is a side effect too

    scenarios = celery_faults.assert_idempotent(pay.s(order_id), observe, reset)
    assert len(scenarios) >= 8  # crashes at each commit, publish and mail, and redelivery
    reset()
    celery_faults.run(pay.s(order_id), "sigkill@1")  # killed right after the payment's commit
    assert observe()["mails"] == [f"Receipt for order {order_id}"]


def test_a_crash_inside_the_transaction_leaves_nothing_and_the_test_transaction_works(
    celery_faults: Any, order_id: int, observe: Callable[[], Any]
) -> None:
    from djangoshop.models import Order
    from djangoshop.tasks import pay

    outcome = celery_faults.run(pay.s(order_id), "raise(django.db.OperationalError)@0")
    assert outcome.state == "FAILURE"
    assert observe()["payments"] == []
    Order.objects.create()  # pytest-django's transaction was not poisoned
    assert Order.objects.count() == 2
