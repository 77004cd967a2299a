"""The history checker: what became of every message of a run, counted per task.

Jepsen's total-queue checker is the model: each message published is either
done once, recovered (a fault hit it and it still completed, repeating
nothing), duplicated (it ran again and repeated side effects), lost (never
completed and nothing will run it again) or failed (its last execution
raised). Over a whole exploration the counts add up per task.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from ..engine.effects import Effect
from ..engine.outcome import Outcome

Fate = Literal["once", "recovered", "duplicated", "lost", "failed"]
FATES: Final[tuple[Fate, ...]] = ("once", "recovered", "duplicated", "lost", "failed")


def fate_of(outcome: Outcome, effects: Iterable[Effect]) -> Fate:
    """The fate of one message, from its outcome and the side effects its deliveries did.

    Lost is never completed: a message whose last delivery was cut short after an
    earlier one ran it to success (its ack lost with the connection) completed.
    """
    if outcome.lost and outcome.state != "SUCCESS":
        return "lost"
    seen: dict[tuple[str, str], int] = {}
    repeated = False
    for effect in effects:
        key = (effect.kind, effect.label)
        delivery = effect.delivery or 0
        first = seen.setdefault(key, delivery)
        if first != delivery:
            repeated = True
    if repeated and outcome.executions > 1:
        return "duplicated"
    if not outcome.succeeded:
        return "failed"
    if outcome.deliveries > 1 or outcome.executions > 1 or outcome.faults:
        return "recovered"
    return "once"


@dataclass
class TaskCounts:
    """How many messages of one task met each fate."""

    published: int = 0
    fates: dict[Fate, int] = field(default_factory=lambda: dict.fromkeys(FATES, 0))

    def add(self, other: TaskCounts) -> None:
        self.published += other.published
        for fate in FATES:
            self.fates[fate] += other.fates[fate]

    def line(self) -> str:
        parts = [f"published {self.published}"]
        for fate in FATES:
            count = self.fates[fate]
            share = f" ({count / self.published:.0%})" if self.published and count else ""
            parts.append(f"{fate} {count}{share}")
        return ", ".join(parts)


def tally(outcomes: Iterable[Outcome], effects: Iterable[Effect]) -> dict[str, TaskCounts]:
    """Per task name: messages published and their fates (one run)."""
    by_task: dict[str, list[Effect]] = {}
    for effect in effects:
        if effect.task_id is not None:
            by_task.setdefault(effect.task_id, []).append(effect)
    counts: dict[str, TaskCounts] = {}
    for outcome in outcomes:
        entry = counts.setdefault(outcome.name, TaskCounts())
        entry.published += 1
        entry.fates[fate_of(outcome, by_task.get(outcome.task_id, ()))] += 1
    return counts


def merge(into: dict[str, TaskCounts], counts: dict[str, TaskCounts]) -> None:
    for name, entry in counts.items():
        into.setdefault(name, TaskCounts()).add(entry)
