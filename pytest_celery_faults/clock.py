"""The virtual clock: time moves only when the harness says so, and never sleeps."""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime


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
            self._now = max(self._now, timer.due)
            timer.callback()
        self._now = max(self._now, moment)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"cannot move the clock back: advance({seconds!r})")
        self.advance_to(self._now + seconds)

    def reset(self) -> None:
        """Back to the start, with no timers: a fresh scenario on the same clock."""
        self._now = self.start
        self._timers.clear()

    def cancel(self, timer: _Timer) -> None:
        timer.cancelled = True

    def __repr__(self) -> str:
        return f"<VirtualClock t=+{self.elapsed:.3f}s>"
