"""``Outcome``: one task's fate, and the timeline that tells how it came about."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..vocabulary import RETURNED, Ending
from .effects import Effect


def safe_repr(value: Any) -> str:
    """``repr(value)``, or a stand-in naming its type when the task's own ``__repr__`` raises."""
    try:
        return repr(value)
    except Exception as exc:  # a task's exception class may break its repr: report, not crash
        return f"<{type(value).__name__} (its repr raised {type(exc).__name__})>"


@dataclass(slots=True, eq=False)
class TimelineEntry:
    """One line of a story: when (virtual seconds since the harness began), what, how deep.

    ``render`` may be a function of ``subject`` (an effect, a ledger event),
    called when the text is first read: most timelines are never printed, and
    a sweep keeps thousands. A module-level function and the subject cost
    less to keep than a closure per line. Two entries are equal when they
    read the same (rendered or not).
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

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TimelineEntry):
            return NotImplemented
        return (self.time, self.text, self.task_id, self.depth) == (
            other.time,
            other.text,
            other.task_id,
            other.depth,
        )

    __hash__ = None  # type: ignore[assignment]

    def __str__(self) -> str:
        return f"+{self.time:8.3f}s  {'  ' * self.depth}{self.text}"


#: A line not built yet: ``TimelineEntry``'s fields as a tuple, built into one when read.
Row = tuple[float, str | Callable[[Any], str], str | None, int, Any]
#: A line as it came: an entry, a row, or a side effect (its own line, one level deep).
Line = TimelineEntry | Row | Effect


def effect_text(effect: Effect) -> str:
    """A side effect's line in a timeline."""
    return f"side effect {effect.index}: {effect}"


class Timeline:
    """Entries in the order they happened; ``str()`` reads as a story.

    Lines are kept as they came (an entry, a :data:`Row` of its fields, or an
    :class:`Effect`, placed at its time from ``origin``) and built into entries
    when first read: every outcome carries a timeline, and most are never read.
    A timeline may also be a view of the first lines of another's list, taken
    (and filtered to one task) when first read; the lists viewed only ever grow
    (:meth:`clear` starts a new one).
    """

    __slots__ = ("lines", "origin", "_built", "_pending")

    def __init__(self, entries: list[TimelineEntry] | None = None, origin: float = 0.0) -> None:
        #: The lines as they came; append a line here to add it unbuilt.
        self.lines: list[Line] = entries if entries is not None else []  # type: ignore[assignment]
        self.origin = origin  # the virtual instant an effect's line is timed from
        self._built = 0  # lines before this one are entries
        #: (a list of lines, how many of them, the task id to keep or None) while not taken.
        self._pending: tuple[list[Line], int, str | None] | None = None

    @classmethod
    def view(cls, lines: list[Line], task_id: str | None = None, origin: float = 0.0) -> Timeline:
        """The lines of ``lines`` as they stand now (about ``task_id`` only, if given)."""
        viewed = cls(origin=origin)
        viewed._pending = (lines, len(lines), task_id)
        return viewed

    @property
    def entries(self) -> list[TimelineEntry]:
        if self._pending is not None:
            source, length, task_id = self._pending
            self._pending = None
            taken = source[:length]
            if task_id is not None:
                taken = [line for line in taken if _task_of(line) == task_id]
            self.lines, self._built = taken, 0
        lines = self.lines
        for position in range(self._built, len(lines)):
            line = lines[position]
            if type(line) is tuple:
                lines[position] = TimelineEntry(*line)
            elif type(line) is Effect:
                lines[position] = TimelineEntry(
                    line.time - self.origin, effect_text, line.task_id, 1, line
                )
        self._built = len(lines)
        return lines  # type: ignore[return-value]  # every line is an entry now

    def add(self, entry: TimelineEntry) -> None:
        self.add_line(entry)

    def add_line(self, line: Line) -> None:
        """Append an entry, a row of its fields or an effect (built when read)."""
        if self._pending is not None:
            self.entries  # noqa: B018 - take the view before it grows
        self.lines.append(line)

    def clear(self) -> None:
        """Empty (a new list: views of the old one keep what they saw)."""
        self.lines, self._built, self._pending = [], 0, None

    def for_task(self, task_id: str) -> Timeline:
        """The entries about ``task_id``, in order (as they stand now)."""
        if self._pending is not None:
            self.entries  # noqa: B018
        return Timeline.view(self.lines, task_id, self.origin)

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


def _task_of(line: Line) -> str | None:
    if isinstance(line, TimelineEntry | Effect):
        return line.task_id
    return line[2]


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
