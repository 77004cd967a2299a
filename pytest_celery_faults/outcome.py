"""``Outcome``: one task's fate, and the timeline that tells how it came about."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
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
            object.__setattr__(self, "render", self.render(self.subject))
            object.__setattr__(self, "subject", None)
        return self.render  # type: ignore[return-value]

    def __str__(self) -> str:
        return f"+{self.time:8.3f}s  {'  ' * self.depth}{self.text}"


@dataclass
class Timeline:
    """Entries in the order they happened; ``str()`` reads as a story."""

    entries: list[TimelineEntry] = field(default_factory=list)
    #: Entries by task id, built when first asked for (outcomes keep a timeline each).
    _by_task: dict[str | None, list[TimelineEntry]] | None = field(default=None, repr=False)

    def add(self, entry: TimelineEntry) -> None:
        self.entries.append(entry)
        if self._by_task is not None:
            self._by_task.setdefault(entry.task_id, []).append(entry)

    def clear(self) -> None:
        self.entries.clear()
        self._by_task = None

    def for_task(self, task_id: str) -> Timeline:
        """The entries about ``task_id``, in order."""
        by_task = self._by_task
        if by_task is None:
            by_task = self._by_task = {}
            for entry in self.entries:
                by_task.setdefault(entry.task_id, []).append(entry)
        return Timeline(list(by_task.get(task_id, ())))

    def texts(self) -> list[str]:
        return [entry.text for entry in self.entries]

    def __iter__(self) -> Any:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

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
    ended: str = ""

    @property
    def succeeded(self) -> bool:
        """The task's last execution returned (whether or not its result was stored)."""
        return self.ended == "returned" or self.state == "SUCCESS"

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
            f"state={self.state} ({shown!r}), {fate}, "
            f"deliveries={self.deliveries}, executions={self.executions}, retries={self.retries}"
        )

    def __str__(self) -> str:
        return f"{self.summary()}\n{self.timeline}"

    def __repr__(self) -> str:
        return f"<Outcome {self}>"
