"""The armed plan: which fault spec applies to which message and delivery, and what fired.

The grammar (:mod:`pytest_celery_faults.grammar`) says what a spec means; the plan
holds the specs a harness armed, binds each to the message it applies to, and
records the steps that fired.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..grammar import FaultSpec, Step, parse_spec


@dataclass
class ArmedSpec:
    """A spec armed in a harness, the message it is bound to, and the steps that fired."""

    spec: FaultSpec
    explicit: bool = True  # asked for by the test itself (not suite-wide)
    task_id: str | None = None  # bound to this task id (its first matching message)
    fired: list[tuple[str, int, Step]] = field(default_factory=list)
    redeliveries: int = 0
    publishes: int = 0  # a publish fault: the publishes it applied to so far

    @property
    def unfired_steps(self) -> list[tuple[int, Step]]:
        done = {(delivery, str(step)) for _, delivery, step in self.fired}
        return [
            (number, step)
            for number, step in enumerate(self.spec.steps, start=1)
            if step.kind != "ok" and (number, str(step)) not in done
        ]

    @property
    def has_fired(self) -> bool:
        if self.spec.redeliver:
            return self.redeliveries > 0
        return not self.unfired_steps


class FaultPlan:
    """Which armed spec applies to which message and delivery.

    A step spec binds to the first message published after it was armed whose
    task matches (or to the task id it was armed for); step *i* then applies to
    the *i*-th delivery of that task id, whichever message carries it (a retry
    is a new message with the same id). A ``redeliver`` spec applies to every
    matching message.
    """

    def __init__(self) -> None:
        self.armed: list[ArmedSpec] = []
        self.deliveries: dict[str, int] = {}
        self._waiting: list[ArmedSpec] = []  # step specs not bound to a task id yet
        self._redelivering: list[ArmedSpec] = []
        self._bound: dict[str, list[ArmedSpec]] = {}
        self.publishing: list[ArmedSpec] = []  # publish faults (see engine/publishing.py)

    def clear(self) -> None:
        """Disarm everything: a fresh scenario."""
        self.armed.clear()
        self.deliveries.clear()
        self._waiting.clear()
        self._redelivering.clear()
        self._bound.clear()
        self.publishing.clear()

    def arm(
        self, spec: FaultSpec | str, *, task_id: str | None = None, explicit: bool = True
    ) -> ArmedSpec:
        parsed = parse_spec(spec)
        parsed.import_exceptions()  # refuse an unimportable exception now, not mid-task
        armed = ArmedSpec(parsed, explicit=explicit)
        self.armed.append(armed)
        if parsed.publish is not None:
            armed.task_id = task_id
            self.publishing.append(armed)
        elif parsed.redeliver:
            self._redelivering.append(armed)
        elif task_id is not None:
            self.bind(armed, task_id)
        else:
            self._waiting.append(armed)
        return armed

    def disarm(self, armed: ArmedSpec) -> None:
        """Take back a spec armed earlier (a suite-wide one that a test's own specs replace)."""
        held_lists = (self.armed, self._waiting, self._redelivering, self.publishing)
        for held in (*held_lists, *self._bound.values()):
            held[:] = [other for other in held if other is not armed]

    def bind(self, armed: ArmedSpec, task_id: str) -> None:
        """Tie a step spec to ``task_id``."""
        if armed in self._waiting:
            self._waiting.remove(armed)
        armed.task_id = task_id
        self._bound.setdefault(task_id, []).append(armed)

    def redeliveries_for(self, task_id: str, task_name: str) -> int:
        """Bind waiting step specs to a newly published message; its redelivery count."""
        if self._waiting and task_id not in self.deliveries:
            for armed in [a for a in self._waiting if a.spec.matches(task_name)]:
                self.bind(armed, task_id)
        self.deliveries.setdefault(task_id, 0)
        return max(
            (a.spec.redeliver for a in self._redelivering if a.spec.matches(task_name)),
            default=0,
        )

    def next_delivery(self, task_id: str, task_name: str) -> tuple[int, Step | None]:
        """Count a delivery of ``task_id``; the step that applies to it."""
        number = self.deliveries.get(task_id, 0) + 1
        self.deliveries[task_id] = number
        for armed in self._bound.get(task_id, ()):
            step = armed.spec.step_for(number)
            if step is not None and step.kind != "ok":
                return number, step
        return number, None

    def fired(self, task_id: str, delivery: int, step: Step) -> None:
        for armed in self._bound.get(task_id, ()):
            if armed.spec.step_for(delivery) == step:
                armed.fired.append((task_id, delivery, step))
                return

    def redelivered(self, task_name: str) -> None:
        for armed in self._redelivering:
            if armed.spec.matches(task_name):
                armed.redeliveries += 1

    def unfired(self, *, explicit_only: bool = True) -> list[ArmedSpec]:
        return [
            armed
            for armed in self.armed
            if (armed.explicit or not explicit_only) and not armed.has_fired
        ]


def unfired_message(
    missing: list[ArmedSpec], plan: FaultPlan, reached: Callable[[str], int]
) -> str:
    """Why each of the ``missing`` specs never fired; ``reached``: a task id's side effects."""
    lines = []
    for armed in missing:
        if armed.spec.redeliver:
            why = "no message matching it completed, so nothing was redelivered"
        elif armed.spec.publish is not None:
            target = (
                f"task id {armed.task_id}"
                if armed.task_id
                else (f"task {armed.spec.task!r}" if armed.spec.task else "any task")
            )
            why = (
                f"it applies to publish {armed.spec.publish.publish_number} of {target}, "
                f"but only {armed.publishes} such publish(es) happened after it was armed"
            )
        elif armed.task_id is None:
            target = f"task {armed.spec.task!r}" if armed.spec.task else "any task"
            why = f"no message for {target} was published after it was armed"
        else:
            deliveries = plan.deliveries.get(armed.task_id, 0)
            effects = reached(armed.task_id)
            steps = ", ".join(f"{step} (delivery {n})" for n, step in armed.unfired_steps)
            why = (
                f"{steps} never fired: the task was delivered {deliveries} time(s) "
                f"and reached at most {effects} side effect(s) in a delivery"
            )
        lines.append(f"  {armed.spec}: {why}")
    return (
        "celery_faults: fault spec(s) never fired, so the test proved nothing about them:\n"
        + "\n".join(lines)
        + "\n(opt out with @pytest.mark.celery_faults(..., allow_unfired=True)"
        " or CeleryFaults(check_unfired=False))"
    )
