"""Publisher faults: which publish a ``publish_*`` spec hits, and what the broker then does.

A publish fault happens to a publish, not to a delivery (see
:mod:`pytest_celery_faults.grammar`): ``publish_refused``, ``publish_twice`` and
``publish_lost``, each applied to the P-th publish the spec covers. The broker
(:mod:`.broker`) asks :meth:`PublishFaults.fate` before each publish attempt
and does what a broker does with it: refuses it with a connection error,
queues it and drops the connection before the confirm, or takes it without
queuing it.

Every attempt reaches the broker through kombu's own ``Producer.publish``, so
the app's ``task_publish_retry`` and ``task_publish_retry_policy`` (or
``apply_async(retry=..., retry_policy=...)``) decide what a refused publish
becomes: kombu's ``Connection.ensure`` reconnects and publishes again, and
raises ``kombu.exceptions.OperationalError`` when the policy's retries are
spent (with ``retry=False``, the transport's error itself reaches the caller).
A retry of a publish under way is recognised by its task id and retry count,
so it is not counted as another publish.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..grammar import Step
from ..vocabulary import NEVER_QUEUED, PUBLISH_LOST, PUBLISH_REFUSED, Ending
from .broker import PublishFate
from .history import History
from .plan import ArmedSpec, FaultPlan

#: What each publish kind makes of the attempt it hits first.
_FATES: dict[str, PublishFate] = {
    "publish_refused": "refuse",
    "publish_twice": "twice",
    "publish_lost": "lose",
}


@dataclass
class _UnderWay:
    """A faulted publish whose next attempts are kombu's retries of it."""

    step: Step
    refusals_left: int | None  # None: every attempt is refused
    attempts: int = 1


class PublishFaults:
    """Decides each publish attempt's fate from the plan's armed publish faults."""

    def __init__(self, plan: FaultPlan, history: History) -> None:
        self.plan = plan
        self.history = history
        #: (task id, retries header) -> the faulted publish its next attempts retry.
        self._under_way: dict[tuple[str, int], _UnderWay] = {}

    def clear(self) -> None:
        self._under_way.clear()

    def fate(self, queue: str, payload: dict[str, Any]) -> tuple[PublishFate, str]:
        """What the broker does with this publish attempt, and why (for the ledger)."""
        headers = payload.get("headers") or {}
        task_id = str(headers.get("id", "?"))
        task_name = str(headers.get("task", "?"))
        key = (task_id, int(headers.get("retries") or 0))
        under_way = self._under_way.get(key)
        if under_way is not None:
            return self._retried(key, under_way, task_id, task_name)
        if not self.plan.publishing:
            return "", ""
        armed = self._hit(task_id, task_name)
        if armed is None:
            return "", ""
        step = armed.spec.publish
        assert step is not None  # only publish faults are in plan.publishing
        armed.fired.append((task_id, 1, step))
        self.history.faults.setdefault(task_id, []).append(str(step))
        fate = _FATES[step.kind]
        if fate == "refuse":
            left = None if step.times is None else step.times - 1
            self._under_way[key] = _UnderWay(step, left)
            self._ended(key, task_name, PUBLISH_REFUSED)
            self.history.note(task_id, f"FAULT {step}: the broker refuses the publish", 0)
            return fate, f"{step}: attempt 1"
        if fate == "twice":
            self._under_way[key] = _UnderWay(step, 0)
            self.history.note(
                task_id, f"FAULT {step}: queued, but the confirm is lost on the way back", 0
            )
            return fate, str(step)
        self._ended(key, task_name, PUBLISH_LOST)
        self.history.note(
            task_id, f"FAULT {step}: the caller is told it was published; it never is", 0
        )
        return fate, f"{step}: no publisher confirms"

    def _hit(self, task_id: str, task_name: str) -> ArmedSpec | None:
        """Count this publish for every armed publish fault it falls under; the one it fires."""
        hit: ArmedSpec | None = None
        for armed in self.plan.publishing:
            applies = (
                armed.task_id == task_id
                if armed.task_id is not None
                else armed.spec.matches(task_name)
            )
            if not applies or armed.fired:
                continue
            armed.publishes += 1
            step = armed.spec.publish
            if hit is None and step is not None and armed.publishes == step.publish_number:
                hit = armed
        return hit

    def _retried(
        self, key: tuple[str, int], under_way: _UnderWay, task_id: str, task_name: str
    ) -> tuple[PublishFate, str]:
        """kombu publishes again after the connection error: the same publish, retried."""
        under_way.attempts += 1
        step = under_way.step
        if under_way.refusals_left is None or under_way.refusals_left > 0:
            if under_way.refusals_left is not None:
                under_way.refusals_left -= 1
            self._ended(key, task_name, PUBLISH_REFUSED)
            return "refuse", f"{step}: attempt {under_way.attempts}, kombu's retry"
        del self._under_way[key]
        if self.history.ends.get(task_id) in NEVER_QUEUED:
            del self.history.ends[task_id]  # it reaches the queue after all
        what = "again" if step.kind == "publish_twice" else "at last"
        self.history.note(
            task_id, f"kombu's retry publishes it {what} (attempt {under_way.attempts})", 0
        )
        return "", ""

    def _ended(self, key: tuple[str, int], task_name: str, how: Ending) -> None:
        """Nothing queued it (yet): its outcome says so, and counts it as a message."""
        task_id, retries = key
        self.history.published(task_id, task_name, retries)
        self.history.ends[task_id] = how
