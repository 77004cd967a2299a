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
import math
import operator
import selectors
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import time_machine

from .. import speedups


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


#: The longest sleep ``time.sleep`` takes: its argument in nanoseconds fits a C int64.
_LONGEST_SLEEP = 2**63 / 1e9


def _refused_at_once(seconds: Any) -> bool:
    """Whether ``time.sleep`` raises at once for ``seconds`` (NaN, inf, negative, not a number)."""
    if isinstance(seconds, float):
        return math.isnan(seconds) or not 0 <= seconds < _LONGEST_SLEEP
    try:
        whole = operator.index(seconds)
    except TypeError:
        return True
    return not 0 <= whole < _LONGEST_SLEEP


def _waits_only_for_its_loop(selector: selectors.BaseSelector) -> bool:
    """Whether ``selector`` is an asyncio loop's with nothing but the loop's own wake-up
    pipe registered and no thread pool to wait for: its wait is only for timers."""
    keys = list(selector.get_map().values())
    if len(keys) != 1:
        return False
    data = keys[0].data
    callback = getattr(data[0], "_callback", None) if isinstance(data, tuple) and data else None
    loop = getattr(callback, "__self__", None)
    return (
        getattr(callback, "__name__", "") == "_read_from_self"
        and getattr(loop, "_default_executor", None) is None
    )


def _virtual_time_selector(sleep: Callable[[float], bool]) -> type[selectors.BaseSelector]:
    """``selectors.DefaultSelector`` whose asyncio timer waits in a task body are virtual.

    An event loop (``asyncio.run``) computes its timers from ``time.monotonic``,
    which is virtual in a body, and then waits for them in its selector: in real
    time, so the clock never reaches them. Here a loop that waits only for its
    timers waits on the virtual clock instead; one that waits for I/O or a thread
    waits in real time, and the virtual clock then moves by the time waited.
    Selectors of anything but an asyncio loop are the real ones.
    """
    base: type[selectors.BaseSelector] = selectors.DefaultSelector

    class VirtualTimeSelector(base):  # type: ignore[valid-type,misc]
        def select(self, timeout: float | None = None) -> list[tuple[Any, int]]:
            if timeout is None or timeout <= 0 or not self._in_asyncio_loop():
                return super().select(timeout)  # type: ignore[no-any-return]
            ready = super().select(0)
            if ready:
                return ready  # type: ignore[no-any-return]
            if _waits_only_for_its_loop(self):
                if sleep(timeout):  # virtual: the loop's timers come due on the clock
                    return super().select(0)  # type: ignore[no-any-return]
                return super().select(timeout)  # type: ignore[no-any-return]
            started = _real_monotonic()
            ready = super().select(timeout)
            if not ready:
                sleep(_real_monotonic() - started)  # virtual: the time waited in real time
            return ready  # type: ignore[no-any-return]

        def _in_asyncio_loop(self) -> bool:
            return any(
                getattr(getattr(key.data[0], "_callback", None), "__name__", "")
                == "_read_from_self"
                for key in self.get_map().values()
                if isinstance(key.data, tuple) and key.data
            )

    VirtualTimeSelector.__name__ = VirtualTimeSelector.__qualname__ = base.__name__
    return VirtualTimeSelector


_real_monotonic = time.monotonic


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
        self._saved: tuple[Any, Any, Any] | None = None
        clock.on_move.append(self._moved)
        base = self._monotonic_base

        def virtual_monotonic() -> float:
            return base + clock.elapsed

        def virtual_sleep(seconds: float) -> None:  # virtual: the clock's, in a body
            real_sleep = self._saved[0] if self._saved is not None else time.sleep
            if _refused_at_once(seconds):
                real_sleep(seconds)  # raises Python's own error at once: no wait, real or virtual
            if not sleep(seconds):  # virtual
                real_sleep(seconds)  # virtual only in bodies: this is the caller's own

        self._virtual = (virtual_sleep, virtual_monotonic)
        self._selector = _virtual_time_selector(sleep)
        #: A speed-up (:mod:`..speedups`): one ``travel`` made once and pointed at the
        #: clock's time at each drain, instead of one made per drain (about 9,000
        #: instructions, most of them its check of what kind of destination it was given).
        self._reused: Any = None
        if speedups.enabled():
            reused = time_machine.travel(clock.time(), tick=False)
            if hasattr(reused, "destination_timestamp_ns"):
                self._reused = reused

    def _to_now(self) -> Any:
        """``time_machine.travel(now, tick=False)``, ``now`` the virtual clock's time."""
        now = self.clock.time()
        reused = self._reused
        if reused is not None and type(now) is float and reused.destination_tzname is None:
            reused.destination_timestamp_ns = round(now * 1_000_000_000)  # as travel(now) does
            return reused
        return time_machine.travel(now, tick=False)

    def __enter__(self) -> TimeInBodies:
        self._depth += 1
        if self._depth == 1:
            self._travel = self._to_now()
            self._traveller = self._travel.start()
            self._saved = (time.sleep, time.monotonic, selectors.DefaultSelector)
            time.sleep, time.monotonic = self._virtual  # type: ignore[assignment]
            selectors.DefaultSelector = self._selector  # type: ignore[misc,assignment]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self._saved is not None:
                time.sleep, time.monotonic, selectors.DefaultSelector = self._saved  # type: ignore[misc]
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
