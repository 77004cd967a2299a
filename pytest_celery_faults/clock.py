"""The virtual clock: time moves only when the harness says so, and never sleeps.

While the worker side runs (a drain), task bodies read the clock too:
:class:`TimeInBodies` makes ``time.time``, ``datetime.now``/``utcnow`` and
``date.today`` (through time-machine, so ``from time import time`` and
Django's ``timezone.now`` follow as well), ``time.monotonic`` and
``time.sleep`` answer from it.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import time_machine


@dataclass(order=True)
class _Timer:
    due: float
    order: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)


class VirtualClock:
    """Seconds since the epoch, as a float, that advance only by :meth:`advance_to`.

    It starts at the wall-clock time it was created at, so ETAs and countdowns
    that Celery computes from ``app.now()`` (which the harness points here)
    land on this clock. Timers fire in due order when the clock passes them.
    """

    def __init__(self, start: float | None = None) -> None:
        # A whole second: ETAs (datetimes, whole microseconds) and timers then meet
        # exactly at one instant, in the same order whatever the wall clock said.
        self.start = float(int(time.time())) if start is None else start
        self._now = self.start
        self._timers: list[_Timer] = []
        self._order = itertools.count()
        #: Called with the new time whenever the clock moves.
        self.on_move: list[Callable[[float], None]] = []

    def time(self) -> float:
        return self._now

    @property
    def elapsed(self) -> float:
        """Virtual seconds since the clock was created."""
        return self._now - self.start

    def now(self) -> datetime:
        """The current virtual time as an aware UTC datetime (what ``app.now()`` returns)."""
        return datetime.fromtimestamp(self._now, tz=UTC)

    def call_at(self, due: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(due, next(self._order), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def next_due(self) -> float | None:
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        return self._timers[0].due if self._timers else None

    def advance_to(self, moment: float) -> None:
        """Move to ``moment`` (never backwards), firing every timer due by then."""
        while True:
            due = self.next_due()
            if due is None or due > moment:
                break
            timer = heapq.heappop(self._timers)
            self._move(timer.due)
            timer.callback()
        self._move(moment)

    def _move(self, moment: float) -> None:
        if moment > self._now:
            self._now = moment
            for listener in self.on_move:
                listener(moment)

    def reset(self) -> None:
        """Back to the start, with no timers: a fresh scenario on the same clock."""
        self._now = self.start
        self._timers.clear()
        for listener in self.on_move:
            listener(self._now)

    def cancel(self, timer: _Timer) -> None:
        timer.cancelled = True

    def __repr__(self) -> str:
        return f"<VirtualClock t=+{self.elapsed:.3f}s>"


class TimeInBodies:
    """While active, the process's clocks read the virtual clock; ``time.sleep`` waits on it.

    Wall-clock reads go through time-machine (patched at C level, so every
    import style follows). time-machine leaves ``time.monotonic`` and
    ``time.sleep`` alone, so those two module attributes are replaced here:
    ``monotonic`` is the real value at the harness's start plus the virtual
    seconds elapsed, and ``sleep`` calls the ``sleep`` given here (virtual), which
    returns ``False`` when the caller is not a task body (the real sleep runs).
    Entered and left once per drain, re-entrant.
    """

    def __init__(self, clock: VirtualClock, sleep: Callable[[float], bool]) -> None:
        self.clock = clock
        self.sleep = sleep
        self._depth = 0
        self._travel: Any = None
        self._traveller: Any = None
        self._monotonic_base = time.monotonic() - clock.elapsed
        self._saved: tuple[Any, Any] | None = None
        clock.on_move.append(self._moved)
        base = self._monotonic_base

        def virtual_monotonic() -> float:
            return base + clock.elapsed

        def virtual_sleep(seconds: float) -> None:  # virtual: the clock's, in a body
            if not sleep(seconds):  # virtual
                real_sleep = self._saved[0] if self._saved is not None else time.sleep
                real_sleep(seconds)  # virtual only in bodies: this is the caller's own

        self._virtual = (virtual_sleep, virtual_monotonic)

    def __enter__(self) -> TimeInBodies:
        self._depth += 1
        if self._depth == 1:
            self._travel = time_machine.travel(self.clock.time(), tick=False)
            self._traveller = self._travel.start()
            self._saved = (time.sleep, time.monotonic)
            time.sleep, time.monotonic = self._virtual  # type: ignore[assignment]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self._saved is not None:
                time.sleep, time.monotonic = self._saved
                self._saved = None
            self._travel.stop()
            self._travel = self._traveller = None

    def _moved(self, moment: float) -> None:
        if self._traveller is not None:
            self._traveller.move_to(moment)

    def close(self) -> None:
        while self._depth:
            self.__exit__(None, None, None)
        if self._moved in self.clock.on_move:
            self.clock.on_move.remove(self._moved)
