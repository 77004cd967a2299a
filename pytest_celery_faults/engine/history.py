"""A scenario's history: what the broker, the worker and the side effects did, and faults.

One object keeps a scenario's record (broker events through the ledger,
execution records, side effects, the faults that fired, the messages
published); outcomes, timelines and the evidence a verdict is judged on
(:mod:`pytest_celery_faults.verdicts.classify`) are read from it. The
harness feeds it and resets it between scenarios; what every scenario of a
test added up to survives resets in ``tally``, and the class each judged
scenario got survives in ``judged``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import _celery_internals as internals
from .. import speedups
from ..grammar import Step
from ..vocabulary import (
    ACK_LOST,
    ACKED,
    CHANNEL_CLOSED,
    CUT_SHORT,
    DELIVERED,
    FINISHED,
    LOSING,
    NEVER_QUEUED,
    ORPHANED,
    PUBLISHED,
    RAISED,
    REJECTED,
    RESTORED,
    RETURNED,
    SETTLING,
    Ending,
    LedgerEventKind,
    Verdict,
)
from .broker import BrokerEvent, Ledger
from .effects import Effect, EffectLog
from .execution import ExecutionRecord
from .outcome import Outcome, Timeline, TimelineEntry, effect_text

_LEDGER_TEXT: dict[LedgerEventKind, str] = {
    PUBLISHED: "published {name}[{short}] {detail}",
    DELIVERED: "delivered to {consumer}{redelivered}",
    ACKED: "acked",
    REJECTED: "rejected ({detail})",
    RESTORED: "back in the queue: {detail}",
    ACK_LOST: "the ack never reached the broker",
    ORPHANED: "unacked on a dead connection; {detail}",
    CHANNEL_CLOSED: "the broker closed {consumer}'s channel: {detail}",
    "publish_refused": "the broker refused the publish of {name}[{short}] ({detail})",
    "publish_lost": "published {name}[{short}], but the broker never queued it ({detail})",
    "confirm_lost": "the connection dropped before the broker confirmed it ({detail})",
}


class Results(Protocol):
    """The result backend, as far as outcomes read it."""

    def get_task_meta(self, task_id: str, cache: bool = ...) -> dict[str, Any]: ...


class Holder(Protocol):
    """The broker, as far as outcomes read it."""

    def holds(self, task_id: str) -> bool: ...


@dataclass
class Tally:
    """What the scenarios of one test added up to, across resets."""

    scenarios: int = 0
    tasks: set[str] = field(default_factory=set)
    messages: int = 0
    faults: int = 0

    def add(self, other: Tally) -> None:
        self.scenarios += other.scenarios
        self.tasks |= other.tasks
        self.messages += other.messages
        self.faults += other.faults


@dataclass(frozen=True)
class Judged:
    """One scenario an idempotency assertion or a sweep judged."""

    task: str
    spec: str
    verdict: Verdict
    problem: str


@dataclass(frozen=True)
class Evidence:
    """What one scenario left behind, for judging against another."""

    outcome: Outcome
    observed: Any
    effects: Counter[str]  # side effects completed, by label, over every delivery
    #: The other messages of the scenario (a canvas's members, children) that were lost.
    lost_members: tuple[Outcome, ...] = ()
    #: The same side effects by (label, the task that did it; ``None``: the test).
    effects_by_task: Counter[tuple[str, str | None]] = field(default_factory=Counter)

    @property
    def effect_count(self) -> int:
        return sum(self.effects.values())


class History:
    """One scenario's record, from which outcomes and timelines are derived."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        effects: EffectLog,
        results: Results,
        broker: Holder,
        elapsed: Callable[[], float],
        start: Callable[[], float],
    ) -> None:
        self.ledger = ledger
        self.effects = effects
        self.results = results
        self.broker = broker
        self.elapsed = elapsed
        self.start = start
        #: The clock's start, which never moves: an effect's or event's line is
        #: placed from its own time, as ``elapsed()`` would place it then.
        self._start = start()
        #: A speed-up (:mod:`..speedups`): lines kept as rows of their fields, built when read.
        self.keeps_rows = speedups.enabled()
        self.timeline = Timeline(origin=self._start)
        self.records: list[ExecutionRecord] = []
        self.records_by_task: dict[str, list[ExecutionRecord]] = {}
        self.retries: dict[str, int] = {}
        self.faults: dict[str, list[str]] = {}  # task id -> the faults that hit it
        self.messages: dict[str, str] = {}  # task id -> task name, in publish order
        self.ends: dict[str, Ending] = {}  # task id -> what the worker saw of its last execution
        self._traced: dict[str, str] = {}  # task id -> the state Celery's tracer ended in
        self.tally = Tally()
        self.judged: list[Judged] = []

    def clear(self) -> None:
        """Fold this scenario into the tally and start an empty one."""
        self.fold()
        self.timeline.clear()
        self.records.clear()
        self.records_by_task.clear()
        self.retries.clear()
        self.faults.clear()
        self.messages.clear()
        self.ends.clear()
        self._traced.clear()

    def fold(self) -> None:
        self.tally.add(self.current())

    def current(self) -> Tally:
        """What the scenario in progress ran (nothing when it published nothing)."""
        if not self.messages:
            return Tally()
        faults = sum(len(hits) for hits in self.faults.values())
        return Tally(1, set(self.messages.values()), len(self.messages), faults)

    def totals(self) -> Tally:
        """The tally with the scenario in progress counted too."""
        total = Tally()
        total.add(self.tally)
        total.add(self.current())
        return total

    # -- what happened ----------------------------------------------------------

    def published(self, task_id: str, task_name: str, retries: int) -> None:
        self.messages.setdefault(task_id, task_name)
        self.retries[task_id] = max(self.retries.get(task_id, 0), retries)

    def traced(self, task_id: str, state: str) -> None:
        """Celery's ``task_postrun``: the tracer ended the body in ``state``, stored or not."""
        self._traced[task_id] = state

    def recorded(self, record: ExecutionRecord) -> None:
        ended = record.ended
        traced = self._traced.pop(record.task_id, None)
        if ended == RETURNED and traced not in (None, "SUCCESS"):
            ended = RAISED  # the tracer caught the body's exception, retry or reject
        if ended in FINISHED and self.ends.get(record.task_id) in NEVER_QUEUED:
            ended = self.ends[record.task_id]  # its retry's publish never reached a queue
        self.ends[record.task_id] = ended
        self.records.append(record)
        self.records_by_task.setdefault(record.task_id, []).append(record)
        if record.ended in CUT_SHORT:
            self.note(record.task_id, f"{record.ended} ({record.worker})", depth=1)

    def fired(self, record: ExecutionRecord, step: Step) -> None:
        self.faults.setdefault(record.task_id, []).append(str(step))
        after = f" after {record.effects} side effect(s)" if step.at is not None else ""
        self.note(record.task_id, f"FAULT {step}{after}", depth=1)

    def redelivered(self, task_id: str) -> None:
        self.faults.setdefault(task_id, []).append("redeliver")
        self.note(task_id, "FAULT redeliver: the broker delivers it again", depth=1)

    def on_effect(self, effect: Effect) -> None:
        task_id = effect.task_id
        if task_id is None:
            return
        if self.keeps_rows:  # its own line: its time is the clock's now, elapsed() from the origin
            self.timeline.lines.append(effect)
        else:
            self.timeline.add(TimelineEntry(self.elapsed(), effect_text, task_id, 1, effect))

    def on_ledger_event(self, event: BrokerEvent) -> None:
        line = (event.time - self._start, _ledger_text, event.task_id, 0, event)
        self.timeline.lines.append(line if self.keeps_rows else TimelineEntry(*line))

    def note(self, task_id: str, text: str, depth: int) -> None:
        self.timeline.add(TimelineEntry(self.elapsed(), text, task_id, depth))

    # -- what it adds up to -----------------------------------------------------

    def reached(self, task_id: str) -> int:
        """The most side effects one delivery of ``task_id`` completed."""
        return max((r.effects for r in self.records_by_task.get(task_id, ())), default=0)

    def outcome(self, task_id: str) -> Outcome:
        """The fate of ``task_id`` so far."""
        events = self.ledger.for_task(task_id)
        records = self.records_by_task.get(task_id, [])
        name = events[0].task_name if events else (records[0].task_name if records else "?")
        settles = [e for e in events if e.kind in SETTLING]
        rejects = [e for e in events if e.kind == REJECTED]
        meta = self.results.get_task_meta(task_id, cache=False)
        state = meta.get("status", "PENDING")
        value = meta.get("result")
        exception = value if isinstance(value, BaseException) else None
        if exception is not None:
            exception = internals.unpickled_exception(exception)
        ended = self.ends.get(task_id, "")
        return Outcome(
            task_id=task_id,
            name=name,
            deliveries=sum(e.kind == DELIVERED for e in events),
            executions=sum(record.started for record in records),
            acked=bool(settles) and settles[-1].kind == ACKED,
            rejected=rejects[-1].detail if rejects else None,
            lost=ended in LOSING and not self.broker.holds(task_id),
            state=state,
            result=value if state == "SUCCESS" else None,
            exception=exception,
            retries=self.retries.get(task_id, 0),
            timeline=self.timeline.for_task(task_id),
            faults=list(self.faults.get(task_id, ())),
            ended=ended,
        )

    def outcomes(self) -> list[Outcome]:
        """Every task id the broker has seen, in publish order."""
        return [self.outcome(task_id) for task_id in self.messages]

    def evidence(self, outcome: Outcome, observed: Any) -> Evidence:
        lost = tuple(
            self.outcome(task_id)
            for task_id, ended in self.ends.items()
            if task_id != outcome.task_id and ended in LOSING and not self.broker.holds(task_id)
        )
        by_task = Counter((e.label, e.task_name) for e in self.effects)
        effects: Counter[str] = Counter()
        for (label, _), count in by_task.items():
            effects[label] += count
        return Evidence(outcome, observed, effects, lost, by_task)


def _ledger_text(event: BrokerEvent) -> str:
    template = _LEDGER_TEXT.get(event.kind)
    if template is None:
        return f"{event.kind} {event.detail}".rstrip()
    return template.format(
        name=event.task_name,
        short=event.task_id[:8],
        detail=event.detail,
        consumer=event.consumer or "?",
        redelivered=" (redelivered=True)" if event.detail else "",
    ).rstrip()
