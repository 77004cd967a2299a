"""A scenario's history: what the broker, the worker and the side effects did, and faults.

One object keeps a scenario's record (broker events through the ledger,
execution records, side effects, the faults that fired, the messages
published); outcomes, timelines and failure classes are read from it. The
harness feeds it and resets it between scenarios; what every scenario of a
test added up to survives resets in ``tally``, and the class each judged
scenario got survives in ``judged``.

Failure classes, from the effects of each delivery, the task's fate as the
worker saw it and the ``observe()`` difference:

- ``duplicated``: the task ran again and repeated side effects, changing the world;
- ``diverged``: it ran again (or ended otherwise) and the world differs for another reason;
- ``lost``: it never completed and nothing ran it again;
- ``partial``: lost after some of its side effects, leaving the world half done;
- ``ended_otherwise``: its process went away and nothing ran it again, but only
  after its work was done: its result was stored (SUCCESS), or every side effect
  of the fault-free run had completed and ``observe()`` matches it. The task
  ended otherwise and the world is whole, so no assertion fails on it;
- ``ok``: the world and the task's fate are those of the fault-free run.

Loss is judged on the world and on what was stored, not on how the process ended.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .. import _celery_internals as internals
from ..grammar import Step
from ..vocabulary import CUT_SHORT
from .broker import BrokerEvent, Ledger
from .effects import Effect, EffectLog
from .execution import ExecutionRecord
from .outcome import Outcome, Timeline, TimelineEntry, safe_repr

DUPLICATED = "duplicated"
DIVERGED = "diverged"
LOST = "lost"
PARTIAL = "partial"
ENDED_OTHERWISE = "ended_otherwise"
OK = "ok"
#: The classes ``assert_idempotent`` fails on, and those ``assert_no_loss`` fails on.
NOT_IDEMPOTENT: tuple[str, ...] = (DUPLICATED, DIVERGED)
LOSSES: tuple[str, ...] = (LOST, PARTIAL)
#: The classes named in failures and summaries that no assertion fails on.
NAMED_ONLY: tuple[str, ...] = (ENDED_OTHERWISE,)
#: Every class, worst first (the order reports list them in).
CLASSES: tuple[str, ...] = (DUPLICATED, DIVERGED, PARTIAL, LOST, ENDED_OTHERWISE, OK)
#: What the worker saw of an execution that ran its task to an end.
FINISHED = frozenset({"returned", "raised"})

#: How the last execution of a lost task ended, in plain words.
_SAW = {
    "child killed": "its child process was killed",
    "exit": "its child process exited",
    "power lost": "the worker lost power",
    "cold shutdown": "the worker was shut down cold",
}

_LEDGER_TEXT = {
    "published": "published {name}[{short}] {detail}",
    "delivered": "delivered to {consumer}{redelivered}",
    "acked": "acked",
    "rejected": "rejected ({detail})",
    "restored": "back in the queue: {detail}",
    "ack_lost": "the ack never reached the broker",
    "orphaned": "unacked on a dead connection; {detail}",
    "channel_closed": "the broker closed {consumer}'s channel: {detail}",
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
    verdict: str
    problem: str


@dataclass(frozen=True)
class Evidence:
    """What one scenario left behind, for judging against another."""

    outcome: Outcome
    observed: Any
    effects: Counter[str]  # side effects completed, by label, over every delivery
    #: The other messages of the scenario (a canvas's members, children) that were lost.
    lost_members: tuple[Outcome, ...] = ()

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
        self.timeline = Timeline()
        self.records: list[ExecutionRecord] = []
        self.records_by_task: dict[str, list[ExecutionRecord]] = {}
        self.retries: dict[str, int] = {}
        self.faults: dict[str, list[str]] = {}  # task id -> the faults that hit it
        self.messages: dict[str, str] = {}  # task id -> task name, in publish order
        self.ends: dict[str, str] = {}  # task id -> what the worker saw of its last execution
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
        if ended == "returned" and traced not in (None, "SUCCESS"):
            ended = "raised"  # the tracer caught the body's exception, retry or reject
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
        if effect.task_id is not None:
            self.timeline.add(
                TimelineEntry(self.elapsed(), _effect_text, effect.task_id, 1, effect)
            )

    def on_ledger_event(self, event: BrokerEvent) -> None:
        self.timeline.add(
            TimelineEntry(event.time - self.start(), _ledger_text, event.task_id, 0, event)
        )

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
        settles = [e for e in events if e.kind in ("acked", "rejected", "restored", "ack_lost")]
        rejects = [e for e in events if e.kind == "rejected"]
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
            deliveries=sum(e.kind == "delivered" for e in events),
            executions=sum(record.started for record in records),
            acked=bool(settles) and settles[-1].kind == "acked",
            rejected=rejects[-1].detail if rejects else None,
            lost=ended in CUT_SHORT and not self.broker.holds(task_id),
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
            if task_id != outcome.task_id and ended in CUT_SHORT and not self.broker.holds(task_id)
        )
        return Evidence(outcome, observed, Counter(e.label for e in self.effects), lost)

    def judge(self, spec: str, baseline: Evidence, faulted: Evidence) -> Judged:
        """Class ``faulted`` against the fault-free ``baseline``; remembered in ``judged``."""
        verdict, problem = classify(baseline, faulted)
        judged = Judged(faulted.outcome.name, spec, verdict, problem)
        self.judged.append(judged)
        return judged


def classify(baseline: Evidence, faulted: Evidence) -> tuple[str, str]:
    """The failure class of a faulted run, and what happened in plain words."""
    outcome = faulted.outcome
    world_differs = faulted.observed != baseline.observed
    lost = outcome if outcome.lost else next(iter(faulted.lost_members), None)
    if lost is not None:
        saw = _SAW.get(lost.ended, f"the worker saw: {lost.ended}")
        who, then = "the task", ""
        if lost is not outcome:  # a member of the canvas (or a child it published)
            who = f"{lost.name}[{lost.task_id[:8]}]"
            then = _then(baseline.outcome.name, outcome)
        if not world_differs:
            done = _work_done(baseline, faulted)
            if done:
                whose = "" if lost is outcome else f" ({who})"
                return ENDED_OTHERWISE, (
                    f"ended otherwise: {saw}{whose} {done} and nothing ran it again, but "
                    f"nothing was lost: observe() matches the fault-free run"
                )
        if faulted.effect_count and world_differs:
            done = ", ".join(f"{label} x{n}" for label, n in sorted(faulted.effects.items()))
            if lost is not outcome:
                return PARTIAL, (
                    f"partial: {who} never completed and nothing ran it again ({saw}){then}; "
                    f"the {faulted.effect_count} side effect(s) done ({done}) leave the "
                    f"world half done"
                )
            return PARTIAL, (
                f"partial: the task was lost after {faulted.effect_count} side effect(s) "
                f"({done}) and nothing ran it again ({saw}), leaving the world half done"
            )
        return LOST, (
            f"lost: {who} never completed and nothing ran it again ({saw}; "
            f"the broker holds no copy){then}"
        )
    runs = f"the task ran {outcome.executions} time(s) over {outcome.deliveries} deliveries"
    if world_differs:
        repeated = {
            label: n for label, n in faulted.effects.items() if n > baseline.effects[label]
        }
        if outcome.executions > 1 and repeated:
            extra = ", ".join(
                f"{label} x{n} where the fault-free run had {baseline.effects[label]}"
                for label, n in sorted(repeated.items())
            )
            return DUPLICATED, (
                f"duplicated: {runs} and repeated side effects ({extra}), changing what "
                f"observe() sees"
            )
        why = (
            "no tracked side effect was repeated"
            if faulted.effects or baseline.effects
            else "no side effect is tracked, so repeats cannot be told apart"
        )
        return DIVERGED, f"diverged: {runs} and observe() differs from the fault-free run ({why})"
    if outcome.ended != baseline.outcome.ended and baseline.outcome.ended in FINISHED:
        shown = f" ({safe_repr(outcome.exception)})" if outcome.exception is not None else ""
        return DIVERGED, (
            f"diverged: {runs} and the worker saw it end {outcome.ended or 'never run'!r}"
            f"{shown} where the fault-free run {baseline.outcome.ended}"
        )
    return OK, f"ok: {runs}; the world and the task's fate match the fault-free run"


def _then(name: str, outcome: Outcome) -> str:
    """What became of the task a run stands for after another of its messages was lost."""
    if outcome.ended:
        return f", and {name} {outcome.ended}"
    failed = f", {type(outcome.exception).__name__}" if outcome.exception is not None else ""
    return f", so {name} never ran (state {outcome.state}{failed})"


def _work_done(baseline: Evidence, faulted: Evidence) -> str:
    """When a lost task had done its work already, in words (empty when it had not).

    Done means its result was stored (a child lost in ``on_success``, a
    ``task_postrun`` receiver or ``process_cleanup``: Celery keeps the SUCCESS),
    or every side effect of the fault-free run had completed.
    """
    if faulted.outcome.state == "SUCCESS":
        return "after its result was stored (SUCCESS)"
    if baseline.effect_count and all(
        faulted.effects[label] >= n for label, n in baseline.effects.items()
    ):
        state = faulted.outcome.state
        return f"after its last side effect ({faulted.effect_count} done, state {state})"
    return ""


def _effect_text(effect: Effect) -> str:
    return f"side effect {effect.index}: {effect}"


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
