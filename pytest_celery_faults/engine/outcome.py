"""``Outcome``: one task's fate, and the timeline that tells how it came about."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..vocabulary import RETURNED, Ending


def safe_repr(value: Any) -> str:
    """``repr(value)``, or a stand-in naming its type when the task's own ``__repr__`` raises."""
    try:
        return repr(value)
    except Exception as exc:  # a task's exception class may break its repr: report, not crash
        return f"<{type(value).__name__} (its repr raised {type(exc).__name__})>"


@dataclass(slots=True)
class TimelineEntry:
    """One line of a story: when (virtual seconds since the harness began), what, how deep.

    ``render`` may be a function of ``subject`` (an effect, a ledger event),
    called when the text is first read: most timelines are never printed, and
    a sweep keeps thousands. A module-level function and the subject cost
    less to keep than a closure per line.
    """

    time: float
    render: str | Callable[[Any], str]
    task_id: str | None = None
    depth: int = 0
    subject: Any = None

    @property
    def text(self) -> str:
        if callable(self.render):
            self.render = self.render(self.subject)
            self.subject = None
        return self.render

    def __str__(self) -> str:
        return f"+{self.time:8.3f}s  {'  ' * self.depth}{self.text}"


class Timeline:
    """Entries in the order they happened; ``str()`` reads as a story.

    A task's timeline (:meth:`for_task`) is picked out of the whole one when
    first read: every outcome carries one, and most are never read.
    """

    __slots__ = ("_entries", "_picking")

    def __init__(self, entries: list[TimelineEntry] | None = None) -> None:
        self._entries = entries if entries is not None else []
        #: (every entry, at the time of asking; the task id) while not picked out yet.
        self._picking: tuple[list[TimelineEntry], str] | None = None

    @property
    def entries(self) -> list[TimelineEntry]:
        if self._picking is not None:
            every, task_id = self._picking
            self._entries = [entry for entry in every if entry.task_id == task_id]
            self._picking = None
        return self._entries

    def add(self, entry: TimelineEntry) -> None:
        (self._entries if self._picking is None else self.entries).append(entry)

    def clear(self) -> None:
        self.entries.clear()

    def for_task(self, task_id: str) -> Timeline:
        """The entries about ``task_id``, in order (as they stand now)."""
        picked = Timeline()
        picked._picking = (list(self.entries), task_id)
        return picked

    def texts(self) -> list[str]:
        return [entry.text for entry in self.entries]

    def __iter__(self) -> Iterator[TimelineEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Timeline) and self.entries == other.entries

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        return "\n".join(str(entry) for entry in self.entries)

    def __repr__(self) -> str:
        # pytest shows `assert ..., timeline` through repr(): make that the story.
        return f"timeline:\n{self}"


@dataclass
class Outcome:
    """What happened to one task id: its messages, deliveries, executions and result.

    ``rejected`` is the last reject Celery decided for it (``"requeue"`` or
    ``"drop"``), even when a later delivery was acked. ``lost`` means the broker
    holds no copy any more while the last execution was cut short by a fault
    and nothing ran it to an end afterwards.

    ``ended`` is what the worker saw of the last execution: ``"returned"``,
    ``"raised"`` (an exception, a retry or a reject), ``"child killed"``,
    ``"exit"``, ``"power lost"``, ``"cold shutdown"``, or ``""`` when nothing
    ran it. Fates are compared on it, not on ``state``: a task with
    ``ignore_result=True`` stores nothing and reads ``PENDING`` whatever happened.
    """

    task_id: str
    name: str
    deliveries: int
    executions: int
    acked: bool
    rejected: str | None
    lost: bool
    state: str
    result: Any
    exception: BaseException | None
    retries: int
    timeline: Timeline
    faults: list[str] = field(default_factory=list)
    ended: Ending = ""

    @property
    def succeeded(self) -> bool:
        """The task's last execution returned (whether or not its result was stored)."""
        return self.ended == RETURNED or self.state == "SUCCESS"

    @property
    def story(self) -> str:
        """Summary and timeline as one string: ``assert ..., outcome.story`` shows it whole."""
        return str(self)

    def summary(self) -> str:
        if self.lost:
            fate = "lost"
        elif self.acked:
            fate = "acked"
        else:
            fate = f"rejected ({self.rejected})" if self.rejected else "unacked"
        shown = self.exception if self.exception is not None else self.result
        return (
            f"{self.name}[{self.task_id}]: {self.ended or 'never ran'}, "
            f"state={self.state} ({safe_repr(shown)}), {fate}, "
            f"deliveries={self.deliveries}, executions={self.executions}, retries={self.retries}"
        )

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.timeline}"

    def __repr__(self) -> str:
        return f"<Outcome {self}>"
