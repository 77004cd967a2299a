"""Publisher faults meet Django's transactions: a publish inside atomic() or in on_commit."""

from __future__ import annotations

from collections.abc import Callable

import pytest

RunTests = Callable[..., pytest.RunResult]  # the django_tests fixture (conftest.py)


def test_a_refused_publish_before_the_commit_rolls_back_after_it_loses_the_task(
    django_tests: RunTests,
) -> None:
    django_tests(
        """
        import pytest
        from celery.exceptions import OperationalError
        from django.db import transaction
        from djshop.models import Order
        from djshop.tasks import receipt

        def refused(celery_faults):
            (event,) = {e.task_id: e for e in celery_faults.ledger
                        if e.kind == "publish_refused"}.values()
            return celery_faults.outcome(event.task_id)

        @pytest.mark.django_db(transaction=True)
        def test_inside_atomic_the_error_rolls_the_write_back(celery_faults):
            celery_faults.inject("publish_refused")
            with pytest.raises(OperationalError):
                with transaction.atomic():
                    order = Order.objects.create()
                    receipt.delay(order.id)  # kombu retries, then raises: the block unwinds
            assert Order.objects.count() == 0  # nothing committed: no half-done order
            assert refused(celery_faults).lost

        @pytest.mark.django_db(transaction=True)
        def test_on_commit_keeps_the_commit_and_loses_the_task(celery_faults):
            celery_faults.inject("publish_refused")
            with pytest.raises(OperationalError):
                with transaction.atomic():
                    order = Order.objects.create()
                    transaction.on_commit(lambda: receipt.delay(order.id))
            assert Order.objects.count() == 1  # the commit stands
            outcome = refused(celery_faults)
            assert (outcome.lost, outcome.ended) == (True, "publish refused")
            assert celery_faults.drain() == []  # nothing to run: the receipt is lost

        @pytest.mark.django_db(transaction=True)
        def test_a_robust_hook_swallows_it_silently(celery_faults):
            celery_faults.inject("publish_refused")
            with transaction.atomic():
                order = Order.objects.create()
                transaction.on_commit(lambda: receipt.delay(order.id), robust=True)
            assert Order.objects.count() == 1
            assert refused(celery_faults).lost  # no error anywhere, and no receipt

        @pytest.mark.django_db(transaction=True)
        def test_a_lost_publish_after_the_commit_is_silent_too(celery_faults):
            celery_faults.inject("publish_lost")
            with transaction.atomic():
                order = Order.objects.create()
                transaction.on_commit(lambda: receipt.delay(order.id))
            (outcome,) = celery_faults.outcomes()
            assert (outcome.lost, outcome.ended) == (True, "publish lost")
        """,
        passed=4,
    )


def test_a_tasks_on_commit_publish_lost_or_doubled(django_tests: RunTests) -> None:
    django_tests(
        """
        import pytest
        from django.core import mail
        from djshop.models import Order, Payment, Receipt
        from djshop.tasks import pay

        def world():
            return (Payment.objects.count(), Receipt.objects.count(), len(mail.outbox))

        def reset():
            Payment.objects.all().delete()
            Receipt.objects.all().delete()
            Order.objects.update(status="new")
            mail.outbox = []

        def test_the_receipt_is_lost_after_the_payment_committed(db, celery_faults, orm):
            orm.count_writes("commits")
            order = Order.objects.create()
            outcome = celery_faults.run(pay.s(order.id), "djshop.tasks.receipt:publish_lost")
            assert outcome.result == "paid"
            assert world() == (1, 0, 0)
            (lost,) = [o for o in celery_faults.outcomes() if o.lost]
            assert (lost.name, lost.ended) == ("djshop.tasks.receipt", "publish lost")

        def test_assert_no_loss_names_it(db, celery_faults, orm):
            orm.count_writes("commits")
            order = Order.objects.create()
            with pytest.raises(AssertionError) as raised:
                celery_faults.assert_no_loss(
                    pay.s(order.id), world, reset,
                    specs=["djshop.tasks.receipt:publish_lost"],
                )
            message = str(raised.value)
            assert "djshop.tasks.receipt:publish_lost" in message
            assert "its publish was lost: the broker never queued it" in message

        def test_a_doubled_receipt_publish_mails_twice(db, celery_faults, orm):
            orm.count_writes("commits")
            order = Order.objects.create()
            celery_faults.run(pay.s(order.id), "djshop.tasks.receipt:publish_twice")
            assert world() == (1, 2, 2)  # one payment, two receipts, two mails
        """,
        passed=3,
    )
