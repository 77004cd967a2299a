"""SQLAlchemy under faults: a worker process's connections, commits as side effects.

Whatever style the code uses (``session.commit()``, ``with Session.begin()``,
``with engine.begin()``, a ``Connection``'s own ``commit()``), every
transaction begins on a ``Connection`` and every commit reaches the dialect's
``do_commit``. :class:`EngineWorkers` listens to the engine's ``begin``,
``commit`` and ``rollback`` events to know which connections an execution holds
in a transaction, and counts writes either at ``do_commit`` (each commit) or
through the ``do_execute`` dialect event (each INSERT, UPDATE or DELETE).

A kill freezes the execution's stack, so its ``Session`` or ``Connection``
never rolls back by itself. When the harness reports the execution killed,
:meth:`EngineWorkers.ended` rolls back and closes each connection it still held
in a transaction (from outside, as the database does for a dead process's
connection, and so the pool gets the connection back).

Use a file-based SQLite database (or a server) in tests: an in-memory SQLite
database is one per connection, or per thread, so a task's execution would not
see the test's data.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from ..engine.effects import EffectLog, Execution, Patch
from .statements import written_table

if TYPE_CHECKING:
    from ..harness import CeleryFaults

#: How writes are counted: each commit, or each write statement.
COUNTS = ("commits", "statements")


class EngineWorkers:
    """An execution watcher for one engine: rolls back what a killed execution held open."""

    def __init__(self, harness: CeleryFaults, engine: Engine) -> None:
        self.harness = harness
        self.effects: EffectLog = harness.effects
        self.engine = engine
        self._running: dict[int, list[Connection]] = {}  # id(execution) -> its open connections
        self._listeners: list[tuple[str, Callable[..., Any]]] = [
            ("begin", self._on_begin),
            ("commit", self._on_end),
            ("rollback", self._on_end),
        ]
        for name, listener in self._listeners:
            event.listen(engine, name, listener)
        self._counting: str | None = None
        self.effects.watchers.append(self)
        harness.on_stop(self.close)

    # -- the watcher interface ----------------------------------------------------

    def started(self, execution: Execution) -> None:
        self._running[id(execution)] = []

    def ended(self, execution: Execution, how: str) -> None:
        """Roll back and close the connections the execution still held in a transaction."""
        for connection in self._running.pop(id(execution), []):
            if connection.in_transaction() or connection.in_nested_transaction():
                # The pool's reset-on-return rolls back too; closing hands the connection back.
                with contextlib.suppress(Exception):
                    connection.rollback()
                with contextlib.suppress(Exception):
                    connection.close()

    def _on_begin(self, connection: Connection) -> None:
        execution = self.effects.execution
        held = self._running.get(id(execution)) if execution is not None else None
        if held is not None and connection not in held:
            held.append(connection)

    def _on_end(self, connection: Connection) -> None:
        execution = self.effects.execution
        held = self._running.get(id(execution)) if execution is not None else None
        if held is not None and connection in held:
            held.remove(connection)

    # -- counting writes --------------------------------------------------------

    def count_writes(self, each: str = "commits") -> EngineWorkers:
        """Make database writes side effects: each of the ``"commits"`` or ``"statements"``."""
        if each not in COUNTS:
            raise ValueError(f"count_writes(each={each!r}): expected one of {', '.join(COUNTS)}")
        if self._counting is not None:
            raise RuntimeError(f"count_writes() was already called (each={self._counting!r})")
        self._counting = each
        dialect = self.engine.dialect
        effects = self.effects
        name = os.path.basename(self.engine.url.database or "") or self.engine.url.drivername
        if each == "commits":
            commit = dialect.do_commit

            def do_commit(dbapi_connection: Any) -> None:
                if effects.execution is None:
                    return commit(dbapi_connection)
                return effects.perform("db", f"{name} COMMIT", lambda: commit(dbapi_connection))

            self.harness.on_stop(Patch(dialect, "do_commit", do_commit).undo)
            return self
        for hook in ("do_execute", "do_executemany"):
            listener = self._statement_listener(getattr(dialect, hook), name)
            event.listen(self.engine, hook, listener)
            self._listeners.append((hook, listener))
        return self

    def _statement_listener(self, execute: Callable[..., Any], name: str) -> Callable[..., Any]:
        effects = self.effects

        def listener(cursor: Any, statement: str, parameters: Any, context: Any) -> bool:
            written = written_table(statement) if effects.execution is not None else None
            if written is None:
                return False  # the dialect executes it as usual
            effects.perform(
                "db", f"{name} {written}", lambda: execute(cursor, statement, parameters, context)
            )
            return True

        return listener

    def close(self) -> None:
        if self in self.effects.watchers:
            self.effects.watchers.remove(self)
        for name, listener in self._listeners:
            if event.contains(self.engine, name, listener):
                event.remove(self.engine, name, listener)
        self._listeners.clear()


def engine_workers(harness: CeleryFaults, engine: Engine) -> EngineWorkers:
    """Give each execution of ``harness`` a worker process's view of ``engine``."""
    return EngineWorkers(harness, engine)
