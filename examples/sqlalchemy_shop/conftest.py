"""The SQLAlchemy shop's test set-up: a real SQLite file per test, each commit a side effect."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sashop.db import Base, Product, Reservation, Session
from sashop.tasks import app
from sqlalchemy import Engine, create_engine, delete, select

from pytest_celery_faults.integrations.sqlalchemy import engine_workers


@pytest.fixture
def celery_faults_app() -> Celery:
    return app


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    # A file, not ":memory:": an in-memory SQLite database is one per connection.
    engine = create_engine(f"sqlite:///{tmp_path / 'sashop.sqlite3'}")
    Base.metadata.create_all(engine)
    Session.configure(bind=engine)
    yield engine
    Session.configure(bind=None)
    engine.dispose()


@pytest.fixture
def shop(celery_faults: Any, engine: Engine) -> Any:
    return engine_workers(celery_faults, engine).count_writes("commits")


@pytest.fixture
def reset(engine: Engine) -> Callable[[], None]:
    def restock() -> None:
        with Session.begin() as session:
            session.execute(delete(Reservation))
            session.execute(delete(Product))
            session.add(Product(sku="mug", stock=10))

    restock()
    return restock


@pytest.fixture
def observe(engine: Engine) -> Callable[[], dict[str, Any]]:
    """The stock and the reservations, read from the real database."""

    def read() -> dict[str, Any]:
        with Session() as session:
            return {
                "stock": dict(session.execute(select(Product.sku, Product.stock)).all()),
                "reservations": list(session.scalars(select(Reservation.order_id))),
            }

    return read
