"""SQLAlchemy under faults: commits counted in every style, a killed transaction rolled back."""

from __future__ import annotations

from collections.abc import Callable

import pytest

MODELS = """
from celery import Celery
from sqlalchemy import Integer, String, create_engine, func, insert, select, update
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

app = Celery("sastore", set_as_current=False)
app.conf.task_acks_late = True
app.conf.task_reject_on_worker_lost = True
engine = None
Sessions = sessionmaker()


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    status: Mapped[str] = mapped_column(String(10), default="new")


class Payment(Base):
    __tablename__ = "payments"
    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(Integer)


def count_payments():
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(Payment))


@app.task
def pay_with_session_commit(order_id):
    session = Sessions()
    session.add(Payment(order_id=order_id))
    session.commit()
    session.get(Order, order_id).status = "paid"
    session.commit()


@app.task
def pay_with_session_begin(order_id):
    with Sessions.begin() as session:
        session.add(Payment(order_id=order_id))
    with Sessions.begin() as session:
        session.get(Order, order_id).status = "paid"


@app.task
def pay_with_engine_begin(order_id):
    with engine.begin() as connection:
        connection.execute(insert(Payment).values(order_id=order_id))
    with engine.begin() as connection:
        connection.execute(update(Order).where(Order.id == order_id).values(status="paid"))


@app.task
def pay_in_one_transaction(order_id):
    session = Sessions()
    order = session.get(Order, order_id)
    if order.status == "paid":
        return "already paid"
    session.add(Payment(order_id=order_id))
    session.flush()
    order.status = "paid"
    session.commit()
    return "paid"
"""

CONFTEST = """
import pytest
from sqlalchemy import create_engine

import sastore
from pytest_celery_faults.integrations.sqlalchemy import engine_workers


@pytest.fixture
def celery_faults_app():
    return sastore.app


@pytest.fixture
def db(tmp_path, monkeypatch):
    engine = create_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    sastore.Base.metadata.create_all(engine)
    monkeypatch.setattr(sastore, "engine", engine)
    sastore.Sessions.configure(bind=engine)
    with sastore.Session(engine) as session, session.begin():
        session.add(sastore.Order(id=1))
    yield engine
    engine.dispose()


@pytest.fixture
def workers(celery_faults, db):
    return engine_workers(celery_faults, db)
"""


@pytest.fixture
def store(project: Callable[..., pytest.Pytester]) -> pytest.Pytester:
    return project(CONFTEST, sastore=MODELS)


def test_commits_are_counted_in_every_style_and_a_crash_between_duplicates(
    store: pytest.Pytester,
) -> None:
    store.makepyfile(
        """
        import pytest
        import sastore

        @pytest.mark.parametrize(
            "task", ["pay_with_session_commit", "pay_with_session_begin", "pay_with_engine_begin"]
        )
        def test_two_commits(task, celery_faults, workers):
            workers.count_writes("commits")
            outcome = celery_faults.run(getattr(sastore, task).s(1), "sigkill@1")
            assert outcome.deliveries == 2
            assert sastore.count_payments() == 2  # the first commit stayed; the rerun paid again
            labels = [str(effect) for effect in celery_faults.effects]
            assert labels == ["db store.sqlite3 COMMIT"] * 3
        """
    )
    result = store.runpytest_subprocess("-v")
    result.assert_outcomes(passed=3)


def test_a_killed_transaction_is_rolled_back_and_statements_count(store: pytest.Pytester) -> None:
    store.makepyfile(
        """
        import threading

        import pytest
        import sastore

        def test_crash_after_the_flush(celery_faults, workers, db):
            workers.count_writes("statements")
            outcome = celery_faults.run(sastore.pay_in_one_transaction.s(1), "sigkill@1")
            assert (outcome.deliveries, outcome.result) == (2, "paid")
            assert sastore.count_payments() == 1
            labels = [str(effect) for effect in celery_faults.effects]
            assert labels[0] == "db store.sqlite3 INSERT payments"
            assert db.pool.checkedout() == 0  # the killed execution's connection went back

        @pytest.mark.parametrize("where", ["test thread", "own thread"])
        def test_a_frozen_session_is_rolled_back_from_outside(where, celery_faults, workers, db):
            class Frozen:
                task_id, task_name, delivery, effect_count, dead = "t", "pay", 1, 0, False

            execution = Frozen()

            def body():
                # The execution running on this thread, as the worker sets it per stack.
                celery_faults.effects.execution = execution
                try:
                    workers.started(execution)
                    session = sastore.Sessions()  # never closed, never rolled back: frozen
                    session.add(sastore.Payment(order_id=1))
                    session.flush()
                    frozen.append(session)
                finally:
                    celery_faults.effects.execution = None

            frozen = []
            if where == "own thread":
                thread = threading.Thread(target=body)
                thread.start()
                thread.join()
            else:
                body()
            workers.ended(execution, "child killed")  # from the harness's side
            assert sastore.count_payments() == 0
            assert db.pool.checkedout() == 0

        def test_a_bad_count_is_refused(workers):
            expected = r"count_writes\\(each='rows'\\): expected one of commits, statements"
            with pytest.raises(ValueError, match=expected):
                workers.count_writes("rows")
        """
    )
    result = store.runpytest_subprocess("-v")
    result.assert_outcomes(passed=4)
