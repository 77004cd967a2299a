"""The shop's tasks: a stock reservation with a bug that only faults show, and its fix."""

from __future__ import annotations

from celery import Celery

from .db import Product, Reservation, Session

app = Celery("sashop", set_as_current=False)
app.conf.update(task_acks_late=True, task_reject_on_worker_lost=True)


# The bug: the stock is decremented in one commit and the reservation recorded in
# another. A worker killed between the two commits decrements the stock again
# when the message is redelivered.
@app.task(name="sashop.reserve_buggy")
def reserve_buggy(order_id: int, sku: str) -> None:
    session = Session()
    if session.get(Reservation, order_id) is not None:
        return
    session.get(Product, sku).stock -= 1
    session.commit()
    session.add(Reservation(order_id=order_id, sku=sku))
    session.commit()


# The fix: both writes in one transaction, behind the check.
@app.task(name="sashop.reserve")
def reserve(order_id: int, sku: str) -> None:
    with Session.begin() as session:
        if session.get(Reservation, order_id) is not None:
            return
        session.get(Product, sku).stock -= 1
        session.add(Reservation(order_id=order_id, sku=sku))
