"""The shop's tasks. Each bug class has its buggy version beside the fixed one."""

from __future__ import annotations

import requests

from . import services
from .celery_app import app

LATE = {"acks_late": True, "reject_on_worker_lost": True}


# 1. A charge without an idempotency key is made again when the message is redelivered.
@app.task(name="shop.charge_buggy", **LATE)
def charge_buggy(order_id: int) -> str:
    return services.charge_card(order_id, 1999)


@app.task(name="shop.charge", **LATE)
def charge(order_id: int) -> str:
    return services.charge_card(order_id, 1999, key=f"order-{order_id}-charge")


# 2. The e-mail is sent before the order is marked; a crash in between sends it twice.
@app.task(name="shop.confirm_buggy", **LATE)
def confirm_buggy(order_id: int) -> None:
    [(emailed,)] = services.query("SELECT emailed FROM orders WHERE id = ?", order_id)
    if not emailed:
        services.send_email("buyer@example.com", f"Order {order_id} confirmed")
        services.execute("UPDATE orders SET emailed = 1 WHERE id = ?", order_id)


@app.task(name="shop.confirm", **LATE)
def confirm(order_id: int) -> None:
    # The provider drops a message whose id it has already accepted.
    [(emailed,)] = services.query("SELECT emailed FROM orders WHERE id = ?", order_id)
    if not emailed:
        services.send_email(
            "buyer@example.com", f"Order {order_id} confirmed", f"order-{order_id}-confirmed"
        )
        services.execute("UPDATE orders SET emailed = 1 WHERE id = ?", order_id)


# 3. A counter decremented on every run, against a reservation that can only exist once.
@app.task(name="shop.reserve_buggy", **LATE)
def reserve_buggy(order_id: int, sku: str) -> None:
    services.execute("UPDATE stock SET count = count - 1 WHERE sku = ?", sku)


@app.task(name="shop.reserve", **LATE)
def reserve(order_id: int, sku: str) -> None:
    services.execute("INSERT OR IGNORE INTO reservations VALUES (?, ?)", order_id, sku)


# 4. The child task is published again when the parent is re-run after a crash.
@app.task(name="shop.ship_buggy", **LATE)
def ship_buggy(order_id: int) -> None:
    services.execute("INSERT INTO shipments (order_id) VALUES (?)", order_id)


@app.task(name="shop.ship", **LATE)
def ship(order_id: int) -> None:
    services.execute("INSERT OR IGNORE INTO shipped VALUES (?)", order_id)


@app.task(name="shop.checkout_buggy", **LATE)
def checkout_buggy(order_id: int) -> None:
    services.charge_card(order_id, 1999, key=f"order-{order_id}-charge")
    ship_buggy.delay(order_id)
    services.execute("UPDATE orders SET status = 'paid' WHERE id = ?", order_id)


@app.task(name="shop.checkout", **LATE)
def checkout(order_id: int) -> None:
    services.charge_card(order_id, 1999, key=f"order-{order_id}-charge")
    ship.delay(order_id)
    services.execute("UPDATE orders SET status = 'paid' WHERE id = ?", order_id)


# 5. Early ack: the message is gone before the work is done; a power loss loses the order.
@app.task(name="shop.record_order_buggy")
def record_order_buggy(order_id: int) -> None:
    services.execute("INSERT OR IGNORE INTO orders VALUES (?, 'new', 0)", order_id)


@app.task(name="shop.record_order", acks_late=True)
def record_order(order_id: int) -> None:
    services.execute("INSERT OR IGNORE INTO orders VALUES (?, 'new', 0)", order_id)


# 6. acks_late alone: a child that exits (sys.exit, OOM kill) still acks the message.
@app.task(name="shop.import_order_buggy", acks_late=True)
def import_order_buggy(order_id: int) -> None:
    services.execute("INSERT OR IGNORE INTO orders VALUES (?, 'new', 0)", order_id)
    services.execute("UPDATE orders SET status = 'imported' WHERE id = ?", order_id)


@app.task(name="shop.import_order", acks_late=True, reject_on_worker_lost=True)
def import_order(order_id: int) -> None:
    services.execute("INSERT OR IGNORE INTO orders VALUES (?, 'new', 0)", order_id)
    services.execute("UPDATE orders SET status = 'imported' WHERE id = ?", order_id)


# 7. A flaky payment service: retried with exponential backoff, on the virtual clock.
@app.task(
    name="shop.charge_with_retries",
    autoretry_for=(requests.HTTPError,),
    retry_backoff=2,
    retry_jitter=False,
    max_retries=5,
    **LATE,
)
def charge_with_retries(order_id: int) -> str:
    return services.charge_card(order_id, 1999, key=f"order-{order_id}-charge")


# 8. A reminder an hour away; Redis redelivers it every visibility_timeout meanwhile.
@app.task(name="shop.remind_buggy", **LATE)
def remind_buggy(order_id: int) -> None:
    services.send_email("buyer@example.com", f"Order {order_id}: still there?")


@app.task(name="shop.remind", **LATE)
def remind(order_id: int) -> None:
    services.send_email(
        "buyer@example.com", f"Order {order_id}: still there?", f"order-{order_id}-reminder"
    )
