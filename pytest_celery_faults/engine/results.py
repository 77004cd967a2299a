"""An in-memory result backend, one per harness, that never waits.

Chords complete the way the backend the app configures completes them, since
that decides how often a chord's body runs when header tasks run twice:

- ``redis``: Celery's native chord support. Header results are counted in the
  backend and the body is dispatched once, by the header task that completes
  the set; a duplicate result of a header task is ignored where the installed
  Celery's Lua script ignores it (5.7), counted where it counts (earlier).
  No ``celery.chord_unlock`` task.
- ``incr`` (memcached, DynamoDB, GCS: key/value backends with ``incr``):
  Celery's own counting code, run here over the dict; every result counts,
  duplicates included.
- ``unlock`` (every other backend, and no backend): Celery's fallback, a
  ``celery.chord_unlock`` task that polls the header until it is ready.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import states
from celery.backends.base import KeyValueStoreBackend
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import GroupResult, allow_join_result

from .. import _celery_internals as internals


@dataclass
class _NativeChord:
    """What Redis keeps for one chord: its size, the distinct header results, a done marker."""

    size: int | None = None
    added: int = 0  # header tasks added by Task.add_to_chord
    parts: list[tuple[tuple[str, float], int, bytes]] = field(default_factory=list)
    members: set[tuple[str, float]] = field(default_factory=set)
    done: bool = False
    header: Any = None  # a header holding groups, saved whole to be joined at the end


class InMemoryResultBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """Celery's key/value backend over a dict.

    ``AsyncResult.get()`` on a result that is not ready runs the harness's
    ``drain()`` once instead of polling, and raises Celery's ``TimeoutError``
    at once if the task is still not done: a test never sleeps on a result.
    """

    def __init__(
        self,
        app: Any,
        on_wait: Callable[[], None] | None = None,
        refuse_writes: Callable[[], bool] | None = None,
        **kwargs: Any,
    ) -> None:
        self.chords = internals.chord_semantics(app)
        self.implements_incr = self.chords == "incr"  # Celery's counting, read in __init__
        super().__init__(app=app, **kwargs)
        # Shared by every execution's stack: only one of them ever runs at a time.
        self.thread_safe = True
        self.store: dict[bytes, Any] = {}
        self._native_chords: dict[str, _NativeChord] = {}
        self.on_wait = on_wait
        #: True while a dead child is unwinding: a dead process stores nothing.
        self.refuse_writes = refuse_writes or (lambda: False)

    def clear(self) -> None:
        """Forget every stored result: a fresh scenario."""
        self.store.clear()
        self._cache.clear()
        self._native_chords.clear()

    def get(self, key: bytes) -> Any:
        return self.store.get(key)

    def mget(self, keys: list[bytes]) -> list[Any]:
        return [self.store.get(key) for key in keys]

    def set(self, key: bytes, value: Any) -> None:
        if not self.refuse_writes():
            self.store[key] = value

    def delete(self, key: bytes) -> None:
        self.store.pop(key, None)

    def incr(self, key: bytes) -> int:
        value = int(self.store.get(key) or 0) + 1
        self.store[key] = value
        return value

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = 0.5,
        no_ack: bool = True,
        on_interval: Callable[[], None] | None = None,
    ) -> Any:
        meta = self.get_task_meta(task_id)
        if meta["status"] not in self.READY_STATES and self.on_wait is not None:
            self.on_wait()
            meta = self.get_task_meta(task_id, cache=False)
        if meta["status"] in self.READY_STATES:
            return meta
        raise CeleryTimeoutError(
            f"task {task_id} is {meta['status']} after draining the emulated worker; "
            "nothing left to run would finish it"
        )

    def as_uri(self, include_password: bool = False) -> str:
        return "celery-faults-results://"

    # -- chords ---------------------------------------------------------------------

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        if self.chords == "redis":  # a chord applied again is a new run of it
            self._native_chords[group_id] = _NativeChord(size=chord_size)

    def add_to_chord(self, group_id: str, result: Any) -> None:
        if self.chords != "redis":
            super().add_to_chord(group_id, result)
            return
        self._native_chords.setdefault(group_id, _NativeChord()).added += 1

    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> Any:
        if self.chords != "redis":
            return super().apply_chord(header_result_args, body, **kwargs)
        header = self.app.GroupResult(*header_result_args)
        if any(isinstance(result, GroupResult) for result in header.results):
            self._native_chords.setdefault(header.id, _NativeChord()).header = header
        return None

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> Any:
        if self.chords != "redis":
            return super().on_chord_part_return(request, state, result, **kwargs)
        task_id, group_id, index = request.id, request.group, request.group_index
        if not group_id or not task_id:
            return None
        chord = self._native_chords.setdefault(group_id, _NativeChord())
        if chord.done:  # a late duplicate after the body was dispatched
            return None
        member = (task_id, math.inf if index is None else float(index))
        if member not in chord.members or not internals.redis_chords_ignore_duplicates():
            encoded = self.encode([1, task_id, state, self.encode_result(result, state)])
            chord.parts.append((member, len(chord.parts), encoded))
            chord.members.add(member)
        if chord.size is None or len(chord.parts) != chord.size + chord.added:
            return None
        chord.done = True  # the dispatch claim: one body, whoever completes the set
        callback = maybe_signature(request.chord, app=self.app)
        try:
            values = self._header_values(chord)
        except ChordError as exc:
            chord.size = None
            return self.chord_error_from_stack(callback, exc)
        try:
            callback.delay(values)
        except Exception as exc:
            return self.chord_error_from_stack(callback, ChordError(f"Callback error: {exc!r}"))
        return None

    def _header_values(self, chord: _NativeChord) -> list[Any]:
        """The header's results in header order; ``ChordError`` if one of them failed."""
        if chord.header is not None:
            chord.header.on_ready()
            with allow_join_result():
                return list(chord.header.join(propagate=True))
        values = []
        for _, _, encoded in sorted(chord.parts, key=lambda part: (part[0][1], part[1])):
            _, task_id, state, value = self.decode(encoded)
            if state in states.EXCEPTION_STATES:
                value = self.exception_to_python(value)
            if state in states.PROPAGATE_STATES:
                error = ChordError(f"Dependency {task_id} raised {value!r}")
                if isinstance(value, Exception):
                    error.__cause__ = value
                raise error
            values.append(value)
        return values
