"""Overlapping copies of a task on a real database (#19.10a).

A copy parked at a switch point inside its transaction holds the database's
lock (SQLite's write lock, a PostgreSQL row lock); the other copy then blocks
inside the driver, where no switch point is. The parked copy must run on, as
it would in production where it commits in milliseconds: never a hang
(PostgreSQL), never the driver's "database is locked" after five seconds read
as the task's own outcome (SQLite).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery, signals

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults.integrations.sqlalchemy import engine_workers

POSTGRESQL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgresql_engine() -> sa.Engine:
    pytest.importorskip("psycopg", reason="psycopg is not installed (the [test] extra has it)")
    engine = sa.create_engine(POSTGRESQL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            pass
    except sa.exc.OperationalError as exc:
        engine.dispose()
        pytest.skip(reason=f"no PostgreSQL at {POSTGRESQL}: {exc.orig}")
    return engine


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        made = sa.create_engine(f"sqlite:///{tmp_path / 'shop.sqlite'}")
    else:
        made = postgresql_engine()
    yield made
    made.dispose()


class Shop:
    """A payment row and the charges made for it, in tables of this test's own."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        suffix = uuid.uuid4().hex[:8]
        self.metadata = sa.MetaData()
        self.payments = sa.Table(
            f"payments_{suffix}",
            self.metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("status", sa.String(10)),
        )
        self.charges = sa.Table(
            f"charges_{suffix}",
            self.metadata,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("payment", sa.Integer),
        )
        self.metadata.create_all(engine)
        self.reset()

    def reset(self) -> None:
        with self.engine.begin() as connection:
            connection.execute(sa.delete(self.charges))
            connection.execute(sa.delete(self.payments))
            connection.execute(sa.insert(self.payments).values(id=1, status="pending"))

    def observe(self) -> dict[str, Any]:
        with self.engine.connect() as connection:
            status = connection.scalar(sa.select(self.payments.c.status))
            charged = connection.scalar(sa.select(sa.func.count()).select_from(self.charges))
        return {"status": status, "charges": charged}

    def drop(self) -> None:
        self.metadata.drop_all(self.engine)


@pytest.fixture
def shop(engine: sa.Engine) -> Iterator[Shop]:
    made = Shop(engine)
    yield made
    made.drop()


def check_then_act(app: Celery, shop: Shop) -> Any:
    """Reads the status, then charges and marks it paid: two copies both read 'pending'."""

    @app.task(name="shop.pay_checked", shared=False, acks_late=True)
    def pay_checked(payment: int) -> str:
        with shop.engine.begin() as connection:
            status = connection.scalar(
                sa.select(shop.payments.c.status).where(shop.payments.c.id == payment)
            )
            if status != "pending":
                return "already paid"
            connection.execute(sa.insert(shop.charges).values(payment=payment))
            connection.execute(
                sa.update(shop.payments).where(shop.payments.c.id == payment).values(status="paid")
            )
        return "paid"

    return pay_checked


def conditional_update(app: Celery, shop: Shop) -> Any:
    """Marks it paid only if still pending, and charges only then: safe in production."""

    @app.task(name="shop.pay_guarded", shared=False, acks_late=True)
    def pay_guarded(payment: int) -> str:
        with shop.engine.begin() as connection:
            won = connection.execute(
                sa.update(shop.payments)
                .where(shop.payments.c.id == payment, shop.payments.c.status == "pending")
                .values(status="paid")
            ).rowcount
            if not won:
                return "already paid"
            connection.execute(sa.insert(shop.charges).values(payment=payment))
        return "paid"

    return pay_guarded


def harness(app: Celery, shop: Shop, each: str = "commits") -> CeleryFaults:
    """Each COMMIT a side effect: a copy parks before it, holding the transaction's locks."""
    faults = CeleryFaults(app)
    faults.start()
    engine_workers(faults, shop.engine).count_writes(each)
    return faults


def scenarios(faults: CeleryFaults, task: Any, shop: Shop) -> Callable[[], Any]:
    return lambda: faults.assert_idempotent(
        task.s(1), observe=shop.observe, reset=shop.reset, specs=["overlap"]
    )


def test_a_check_then_act_charge_in_the_database_is_caught(app: Celery, shop: Shop) -> None:
    faults = harness(app, shop)
    try:
        with pytest.raises(AssertionError) as failed:
            scenarios(faults, check_then_act(app, shop), shop)()
    finally:
        faults.stop()
    message = str(failed.value)
    assert "shop.pay_checked is not idempotent" in message
    assert "duplicated" in message
    assert "'charges': 2" in message  # both copies charged: neither was refused by a lock
    assert "database is locked" not in message


def test_a_conditional_update_passes_every_interleaving(app: Celery, shop: Shop) -> None:
    failures: list[str] = []

    def failed(exception: BaseException | None = None, **_: Any) -> None:
        failures.append(repr(exception))

    faults = harness(app, shop)
    signals.task_failure.connect(failed, weak=False)
    try:
        found = scenarios(faults, conditional_update(app, shop), shop)()
    finally:
        signals.task_failure.disconnect(failed)
        faults.stop()
    assert all(not scenario.failed for scenario in found)
    assert failures == []  # no copy got the driver's "database is locked"


def test_a_blocked_copy_lets_the_parked_holder_commit_and_says_so(app: Celery, shop: Shop) -> None:
    task = conditional_update(app, shop)
    faults = harness(app, shop, "statements")
    try:
        # Copy 1 takes the lock with its UPDATE and parks before its INSERT; copy 2's
        # UPDATE then waits for that lock inside the driver, where no switch point is.
        runs = []
        for _ in range(2):  # the same replay string twice: the same schedule
            faults.reset()
            shop.reset()
            outcome = faults.run(task.s(1), "overlap(1122)")
            endings = [(record.delivery, record.ended) for record in faults.records]
            runs.append((list(faults.scheduler.choices), endings))
        world = shop.observe()
    finally:
        faults.stop()
    story = outcome.story
    assert runs[0] == runs[1]
    assert endings == [(1, "returned"), (2, "returned")], story
    assert "execution 2 blocked" in story
    assert "a schedule forced by real time" in story
    assert world == {"status": "paid", "charges": 1}
