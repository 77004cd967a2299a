"""Django under faults: each emulated execution gets a worker process's connection.

In production every worker child has a database connection of its own, in
autocommit mode. Its ``atomic()`` blocks are real transactions; when the child
is killed the database closes its connection and rolls back whatever
transaction it held; ``transaction.on_commit`` hooks run right after a commit
(or at once, outside a transaction).

A test has one connection per alias and thread, and pytest-django's ``db``
keeps it inside a transaction for the whole test. :class:`WorkerConnections`
lends the test's connection to each execution (on whatever thread runs it:
Django connections are thread-local, so it is bound into that thread and
marked shared; executions run one at a time, never two on it at once) and
makes it look like a fresh worker connection for the execution's duration:

* under ``db`` (the test's transaction is open) the execution sees autocommit
  and no atomic block; its outermost transaction becomes a savepoint in the
  test's transaction (``BEGIN`` -> ``SAVEPOINT``, ``COMMIT`` -> ``RELEASE``,
  ``ROLLBACK`` -> ``ROLLBACK TO``), so its commit is a commit for everything
  the test and later deliveries read, and ``on_commit`` hooks run at that
  commit as in production;
* under ``transactional_db`` (no transaction open) its transactions are real.

A kill freezes the execution's stack: nothing after the kill point runs, so
the execution cannot roll back its own transaction. The harness tells
:meth:`WorkerConnections.ended` from outside; it rolls back what the execution
left open (its savepoint, or its real transaction), drops the ``on_commit``
hooks it registered, and puts back the test's connection state, as the
database does for a dead process. The test's own transaction survives, and
the redelivery sees only what the killed execution committed.

:meth:`WorkerConnections.count_writes` makes database writes side effects, so
``crash_after``, ``sigkill@N`` and ``sweep`` land between real writes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.core import mail
from django.db import connections

from ..engine.effects import EffectLog, Execution
from ..engine.scheduler import ExecutionDiscarded
from ..engine.settings import worker_concurrency
from ..errors import RefusedError
from .statements import written_table

if TYPE_CHECKING:
    from ..harness import CeleryFaults

#: How writes are counted: each commit (a write outside a transaction commits by
#: itself), or each write statement.
COUNTS = ("commits", "statements")
#: The attributes of a Django connection that describe its transaction state.
_FRESH: dict[str, Any] = {
    "autocommit": True,
    "in_atomic_block": False,
    "commit_on_exit": True,
    "needs_rollback": False,
    "rollback_exc": None,
    "closed_in_transaction": False,
    "run_commit_hooks_on_set_autocommit_on": False,
}
_STATE = tuple(_FRESH)
#: The connection's stacks: savepoints and blocks of ``atomic()``, pending ``on_commit`` hooks.
_STACKS = ("savepoint_ids", "atomic_blocks", "run_on_commit")
_savepoint_names = itertools.count(1)


class _DeadConnection:
    """What a killed worker's frozen stack finds as its connection while it unwinds."""

    def __init__(self, alias: str) -> None:
        object.__setattr__(self, "alias", alias)

    def __getattr__(self, name: str) -> Any:
        raise ExecutionDiscarded()

    def __setattr__(self, name: str, value: Any) -> None:
        raise ExecutionDiscarded()


@dataclass
class _Lent:
    """One connection lent to one execution, and the test's state to give back."""

    connection: Any
    nested: bool  # the test's transaction is open: the execution's transactions are savepoints
    state: dict[str, Any] = field(default_factory=dict)
    stacks: dict[str, list[Any]] = field(default_factory=dict)
    outer: str | None = None  # the savepoint standing for the execution's open transaction
    patched: list[str] = field(default_factory=list)
    cursors: list[Any] = field(default_factory=list)  # the driver's cursors it opened

    def patch(self, name: str, replacement: Callable[..., Any]) -> None:
        """Shadow the connection's method ``name`` for this execution only."""
        setattr(self.connection, name, replacement)
        if name not in self.patched:
            self.patched.append(name)


class WorkerConnections:
    """An execution watcher giving each execution a worker process's Django connections."""

    def __init__(self, harness: CeleryFaults, using: Iterable[str] | None = None) -> None:
        if harness.concurrent:
            raise RefusedError(
                f"celery_faults: Django is configured and this harness runs executions at once "
                f"({harness.worker_count} worker(s) x worker_concurrency="
                f"{worker_concurrency(harness.app)}): they would share the test's one database "
                f"connection per alias, which worker processes never do; run the test with "
                f"workers=1 and app.conf.worker_concurrency=1"
            )
        self.harness = harness
        self.effects: EffectLog = harness.effects
        aliases = list(using) if using is not None else list(connections)
        # Taken on the test's thread: these are the connections pytest-django's fixtures use.
        self.connections = {alias: connections[alias] for alias in aliases}
        self._lent: dict[int, list[_Lent]] = {}
        self._counting: str | None = None
        self._wrappers: list[tuple[Any, Callable[..., Any]]] = []
        self.effects.watchers.append(self)
        harness.on_stop(self.close)

    # -- the watcher interface ----------------------------------------------------

    def started(self, execution: Execution) -> None:
        """On the execution's stack, before the body: lend each connection, made fresh."""
        if self._lent:
            # Interleaved executions (several workers, concurrency) would share the test's
            # one connection and transaction; real worker processes never do.
            raise RuntimeError(
                f"celery_faults: {execution.task_name}[{execution.task_id}] started while "
                f"another execution holds the test's Django connection; the Django "
                f"integration needs executions that do not interleave"
            )
        self._lent[id(execution)] = [
            self._lend(alias, connection) for alias, connection in self.connections.items()
        ]

    def ended(self, execution: Execution, how: str) -> None:
        """Give the connections back; what the execution left open is rolled back.

        After a kill this runs on the harness's side while the execution's stack
        is frozen: the rollback is the database's, for a connection whose
        process died. After a normal end the blocks have unwound; anything
        still open (a transaction begun by hand and never committed) is rolled
        back too, as Celery's Django fixup closes such a connection.
        """
        for lent in reversed(self._lent.pop(id(execution), [])):
            self._give_back(lent)

    def discarded(self, execution: Execution) -> None:
        """On a killed execution's frozen stack, as it unwinds at the scenario's end.

        Its process is dead, and so is its connection: what its ``finally``
        blocks and ``atomic()`` exits would do to the connection (the test's,
        given back by :meth:`ended`) fails instead of changing it.
        """
        for alias in self.connections:
            connections[alias] = _DeadConnection(alias)

    def _lend(self, alias: str, connection: Any) -> _Lent:
        if connections[alias] is not connection:  # another thread runs the body
            connections[alias] = connection
        # Shared for as long as the execution holds it: the body's thread may differ from
        # the test's, and the harness may give it back from a third (after a kill).
        connection.inc_thread_sharing()
        # Not open yet: opening it gives a fresh autocommit connection anyway.
        opened = connection.connection is not None
        nested = opened and (connection.in_atomic_block or not connection.autocommit)
        lent = _Lent(connection=connection, nested=nested)
        if opened:
            lent.state = {name: getattr(connection, name) for name in _STATE}
            lent.stacks = {name: getattr(connection, name) for name in _STACKS}
            # A fresh worker connection: autocommit on, no atomic block, no pending hooks.
            for name, value in _FRESH.items():
                setattr(connection, name, value)
            for name in _STACKS:
                setattr(connection, name, [])
        if nested:
            self._redirect_to_savepoints(lent)
        if self._counting == "commits":
            self._count_commits(lent)
        create_cursor = connection.create_cursor

        def recorded_cursor(*args: Any, **kwargs: Any) -> Any:
            cursor = create_cursor(*args, **kwargs)
            lent.cursors.append(cursor)
            return cursor

        lent.patch("create_cursor", recorded_cursor)
        return lent

    def _redirect_to_savepoints(self, lent: _Lent) -> None:
        """The execution's BEGIN, COMMIT, ROLLBACK act on a savepoint in the test's transaction."""
        connection = lent.connection

        def begin(*_: Any) -> None:
            if lent.outer is None:
                lent.outer = f"celery_faults_{next(_savepoint_names)}"
                connection._savepoint(lent.outer)

        def set_autocommit(autocommit: bool) -> None:
            if not autocommit:
                begin()

        def commit() -> None:
            if lent.outer is not None:
                outer, lent.outer = lent.outer, None
                connection._savepoint_commit(outer)

        def rollback() -> None:
            if lent.outer is not None:
                outer, lent.outer = lent.outer, None
                connection._savepoint_rollback(outer)
                connection._savepoint_commit(outer)

        replacements: dict[str, Callable[..., Any]] = {
            "_set_autocommit": set_autocommit,
            "_start_transaction_under_autocommit": begin,
            "_commit": commit,
            "_rollback": rollback,
        }
        for name, replacement in replacements.items():
            if hasattr(connection, name):  # SQLite alone starts transactions its own way
                lent.patch(name, replacement)

    def _count_commits(self, lent: _Lent) -> None:
        """Each commit of the execution's transaction is a side effect."""
        connection = lent.connection
        commit = connection._commit
        label = f"{connection.alias} COMMIT"
        lent.patch("_commit", lambda: self.effects.perform("db", label, commit))

    def _give_back(self, lent: _Lent) -> None:
        connection = lent.connection
        for cursor in lent.cursors:  # a killed body's statement still in progress ends with it
            with contextlib.suppress(Exception):
                cursor.close()
        try:
            if lent.nested:
                connection._rollback()  # the patched one: the execution's open savepoint, if any
            elif connection.connection is not None and (
                connection.in_atomic_block or not connection.autocommit
            ):
                connection._rollback()  # the real transaction the execution left open
                connection._set_autocommit(True)
        finally:
            for name in lent.patched:
                vars(connection).pop(name, None)
            for name, value in {**lent.state, **lent.stacks}.items():
                setattr(connection, name, value)
            if not lent.state and connection.connection is not None:
                for name, value in _FRESH.items():
                    setattr(connection, name, value)
                for name in _STACKS:
                    setattr(connection, name, [])
            connection.dec_thread_sharing()

    # -- counting writes --------------------------------------------------------

    def count_writes(self, each: str = "commits") -> WorkerConnections:
        """Make database writes side effects: each ``"commits"`` or each of the ``"statements"``.

        ``"commits"``: each commit of an execution's transaction, and each
        write outside a transaction (autocommit: it commits by itself).
        ``"statements"``: each INSERT, UPDATE or DELETE, in a transaction or not.
        """
        if each not in COUNTS:
            raise ValueError(f"count_writes(each={each!r}): expected one of {', '.join(COUNTS)}")
        if self._counting is not None:
            raise RuntimeError(f"count_writes() was already called (each={self._counting!r})")
        self._counting = each
        for connection in self.connections.values():
            wrapper = self._statement_wrapper(connection, each)
            connection.execute_wrappers.append(wrapper)
            self._wrappers.append((connection, wrapper))
        return self

    def _statement_wrapper(self, connection: Any, each: str) -> Callable[..., Any]:
        effects = self.effects

        def wrapper(
            execute: Callable[..., Any], sql: str, params: Any, many: bool, ctx: Any
        ) -> Any:
            written = written_table(sql) if effects.execution is not None else None
            if written is None or (each == "commits" and connection.in_atomic_block):
                return execute(sql, params, many, ctx)
            label = f"{connection.alias} {written}"
            return effects.perform("db", label, lambda: execute(sql, params, many, ctx))

        return wrapper

    # -- mail -------------------------------------------------------------------

    def count_mail(self) -> str:
        """Each ``send_messages`` of the configured e-mail backend is a side effect.

        ``send_mail``, ``EmailMessage.send`` and ``mail_admins`` all go through
        it; with the ``locmem`` backend the messages land in ``mail.outbox``.
        """
        backend = type(mail.get_connection())
        return self.harness.track((backend, "send_messages"), name="mail send_messages")

    # -- teardown ---------------------------------------------------------------

    def close(self) -> None:
        if self in self.effects.watchers:
            self.effects.watchers.remove(self)
        for connection, wrapper in self._wrappers:
            if wrapper in connection.execute_wrappers:
                connection.execute_wrappers.remove(wrapper)
        self._wrappers.clear()


def worker_connections(
    harness: CeleryFaults, using: Iterable[str] | None = None
) -> WorkerConnections:
    """Give each execution of ``harness`` a worker process's connections (default: every alias).

    The harness attaches them by itself when Django is configured; this returns
    those (for ``count_writes``, ``count_mail``), or puts ones for ``using`` in
    their place.
    """
    attached: WorkerConnections | None = harness.django_connections
    if attached is not None:
        if using is None or list(using) == list(attached.connections):
            return attached
        attached.close()
    harness.django_connections = WorkerConnections(harness, using)
    return harness.django_connections  # type: ignore[no-any-return]
