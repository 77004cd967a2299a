"""The shop's tasks: a payment with a bug that only faults show, and its fix."""

from __future__ import annotations

from celery import Celery
from django.core.mail import send_mail
from django.db import transaction

from .models import Order, Payment, Receipt

app = Celery("djangoshop", set_as_current=False)
app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True)


# The bug: two autocommit writes. A worker killed between them leaves a payment
# with an unpaid order; the redelivery takes a second payment.
@app.task(name="djangoshop.pay_buggy")
def pay_buggy(order_id: int) -> str:
    order = Order.objects.get(id=order_id)
    if order.status == "paid":
        return "already paid"
    Payment.objects.create(order=order, amount=order.total)
    order.status = "paid"
    order.save()
    return "paid"


# The fix: one transaction that checks and writes; the receipt is published after
# the commit on every delivery (a kill right after the commit must not lose it) and
# the receipt task is idempotent.
@app.task(name="djangoshop.pay")
def pay(order_id: int) -> str:
    with transaction.atomic():
        order = Order.objects.select_for_update().get(id=order_id)
        paid_now = order.status != "paid"
        if paid_now:
            Payment.objects.create(order=order, amount=order.total)
            order.status = "paid"
            order.save()
    send_receipt.delay(order_id)
    return "paid" if paid_now else "already paid"


@app.task(name="djangoshop.send_receipt")
def send_receipt(order_id: int) -> None:
    with transaction.atomic():
        _, created = Receipt.objects.get_or_create(order_id=order_id)
        if created:  # mailed once the receipt row commits, never twice
            transaction.on_commit(
                lambda: send_mail(
                    f"Receipt for order {order_id}",
                    "Thank you.",
                    "shop@example.com",
                    ["buyer@example.com"],
                )
            )
