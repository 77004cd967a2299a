"""The shop's world: a SQLite database and two HTTP services (payments, mail)."""

from __future__ import annotations

import sqlite3
from typing import Any

import requests

PAYMENTS = "https://payments.example/v1/charges"
MAIL = "https://mail.example/v1/messages"
TIMEOUT = (3.05, 10)

#: Set by the tests (a fresh file per test); production would read its settings.
DB_PATH = ":memory:"

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, status TEXT, emailed INTEGER);
CREATE TABLE IF NOT EXISTS stock (sku TEXT PRIMARY KEY, count INTEGER);
CREATE TABLE IF NOT EXISTS reservations (order_id INTEGER PRIMARY KEY, sku TEXT);
CREATE TABLE IF NOT EXISTS shipments (id INTEGER PRIMARY KEY AUTOINCREMENT, order_id INTEGER);
CREATE TABLE IF NOT EXISTS shipped (order_id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS reminders (order_id INTEGER PRIMARY KEY);
"""


def connect() -> sqlite3.Connection:
    connection = sqlite3.connect(DB_PATH)
    connection.executescript(SCHEMA)
    return connection


def execute(sql: str, *params: Any) -> None:
    """One write, committed: the unit of side effect the tests count."""
    with connect() as connection:
        connection.execute(sql, params)


def query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with connect() as connection:
        return connection.execute(sql, params).fetchall()


def charge_card(order_id: int, cents: int, key: str | None = None) -> str:
    headers = {"Idempotency-Key": key} if key else {}
    response = requests.post(
        PAYMENTS, json={"order": order_id, "amount": cents}, headers=headers, timeout=TIMEOUT
    )
    response.raise_for_status()
    return str(response.json()["id"])


def send_email(to: str, subject: str, message_id: str | None = None) -> None:
    body = {"to": to, "subject": subject, "message_id": message_id}
    requests.post(MAIL, json=body, timeout=TIMEOUT).raise_for_status()
