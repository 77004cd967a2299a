"""Fakes of the shop's outside world for its tests: the bank, the mail provider, the DB view."""

from __future__ import annotations

import json
from typing import Any

from . import services


class World:
    """What a buyer, the bank and the warehouse would see: the thing to keep idempotent."""

    def __init__(self) -> None:
        self.charges: list[dict[str, Any]] = []
        self.emails: list[dict[str, Any]] = []
        self.payment_failures_left = 0

    def reset(self) -> None:
        self.charges.clear()
        self.emails.clear()
        for table in ("orders", "stock", "reservations", "shipments", "shipped"):
            services.execute(f"DELETE FROM {table}")
        services.execute("INSERT INTO orders VALUES (1, 'new', 0)")
        services.execute("INSERT INTO stock VALUES ('mug', 10)")

    def observe(self) -> dict[str, Any]:
        return {
            "charges": [(c["order"], c["amount"]) for c in self.charges],
            "emails": [e["subject"] for e in self.emails],
            "orders": services.query("SELECT * FROM orders ORDER BY id"),
            "stock": services.query("SELECT * FROM stock"),
            "reservations": services.query("SELECT * FROM reservations"),
            "shipments": services.query("SELECT order_id FROM shipments"),
            "shipped": services.query("SELECT * FROM shipped"),
        }

    # The fake services honour idempotency as the real ones do.
    def payments(self, request: Any) -> tuple[int, dict[str, str], str]:
        if self.payment_failures_left:
            self.payment_failures_left -= 1
            return 503, {}, json.dumps({"error": "try again"})
        key = request.headers.get("Idempotency-Key")
        for charge in self.charges:
            if key and charge["key"] == key:
                return 200, {}, json.dumps({"id": charge["id"]})
        charge = {**json.loads(request.body), "key": key, "id": f"ch_{len(self.charges) + 1}"}
        self.charges.append(charge)
        return 201, {}, json.dumps({"id": charge["id"]})

    def mail(self, request: Any) -> tuple[int, dict[str, str], str]:
        message = json.loads(request.body)
        seen = [e["message_id"] for e in self.emails if e["message_id"]]
        if message["message_id"] is None or message["message_id"] not in seen:
            self.emails.append(message)
        return 202, {}, "{}"
