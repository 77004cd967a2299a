"""Runs inside the real worker's pool child: counts side effects and fires real faults.

The plan arrives through a JSON file named in the environment, never through
the message. Every start, side effect and fault is appended to a record file
as one JSON line, which the runner reads to observe what really happened.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from celery import signals

from ..effects import Patch, resolve_target
from ..faults import Step, parse_spec
from .waiting import polls

PLAN_ENV = "CELERY_FAULTS_PLAN"
#: How long a whole-worker kill waits for the parent's early ack of the delivery.
ACK_WAIT_SECONDS = 5.0
#: The ack usually lands within milliseconds; look often, the task is waiting.
ACK_POLL_SECONDS = 0.005


class ChildFaults:
    """The fault plan as the child applies it: steps per delivery of one task id."""

    def __init__(self, plan_path: str, plan: dict[str, Any]) -> None:
        self.plan_path = plan_path
        self.record_path: str = plan["record"]
        self.tracked: set[str] = set()
        self.current: str | None = None
        self.delivery = 0
        self.acks_early = False
        self.step: Step | None = None
        self.effects = 0
        self.patches: list[Patch] = []
        self.track(plan.get("track", []))

    def track(self, targets: list[str]) -> None:
        """Count calls of each dotted target as side effects (once per target)."""
        for target in targets:
            if target in self.tracked:
                continue
            owner, attribute, name = resolve_target(target)
            self.patches.append(
                Patch(owner, attribute, self._wrap(getattr(owner, attribute), name))
            )
            self.tracked.add(target)

    def record(self, **fields: Any) -> None:
        line = json.dumps(fields, sort_keys=True) + "\n"
        with open(self.record_path, "a", encoding="utf-8") as handle:
            handle.write(line)

    def count(self, event: str, task_id: str) -> int:
        """How many ``event`` lines the record holds for ``task_id``."""
        wanted = {"event": event, "task_id": task_id}
        with open(self.record_path, encoding="utf-8") as handle:
            records = (json.loads(line) for line in handle if f'"{event}"' in line)
            return sum(wanted.items() <= record.items() for record in records)

    def deliveries_so_far(self, task_id: str) -> int:
        return self.count("start", task_id)

    def await_early_ack(self, timeout: float = ACK_WAIT_SECONDS) -> None:
        """Wait until the parent has acked this delivery (an early-ack task only).

        In prefork the parent acks when the child reports the job accepted, while
        the child already runs the body: a whole-worker kill in the body's first
        milliseconds can beat the ack, and the message comes back. The emulation
        acks as the pool accepts, before the body; this puts the real kill after
        the ack too. No ack within ``timeout`` and the fault fires anyway.
        """
        if not self.acks_early or self.current is None:
            return
        for _ in polls(timeout, interval=ACK_POLL_SECONDS):
            if self.count("acked", self.current) >= self.delivery:
                return

    def scenario(self) -> tuple[str | None, tuple[Step, ...]]:
        """The scenario now running: the runner rewrites the plan before each one."""
        with open(self.plan_path, encoding="utf-8") as handle:
            plan = json.load(handle)
        self.track(plan.get("track", []))
        spec = plan.get("spec")
        return plan.get("task_id"), parse_spec(spec).steps if spec else ()

    def on_prerun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        number = self.deliveries_so_far(task_id or "") + 1
        target, steps = self.scenario()
        self.current, self.effects, self.delivery = task_id, 0, number
        self.acks_early = task is not None and not task.acks_late
        step = steps[number - 1] if task_id == target and number <= len(steps) else None
        self.step = step if step is not None and step.kind != "ok" else None
        if self.step is not None and self.step.at == 0:
            # Boundary 0 is before the body: the delivery counts, the execution does not.
            self.record(event="start", task_id=task_id, delivery=number, body=False)
            self.fire()
        info = task.request.delivery_info or {} if task is not None else {}
        self.record(
            event="start",
            task_id=task_id,
            delivery=number,
            redelivered=bool(info.get("redelivered")),
            retries=task.request.retries if task is not None else 0,
            body=True,
        )

    def _wrap(self, original: Any, name: str) -> Any:
        def tracked(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            self.effects += 1
            self.record(event="effect", task_id=self.current, index=self.effects, label=name)
            if self.step is not None and self.step.at == self.effects:
                self.fire()
            return result

        return tracked

    def fire(self) -> None:
        """The fault, for real: this process, or the whole worker, dies."""
        step, self.step = self.step, None
        if step is None:
            return
        if step.kind == "power_loss":
            self.await_early_ack()
        self.record(event="fault", task_id=self.current, spec=str(step), after=self.effects)
        if step.kind == "exit":
            sys.exit(step.code)
        if step.kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if step.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if step.kind == "power_loss":
            # The runner started the worker as the leader of its own process group.
            os.killpg(os.getpgid(0), signal.SIGKILL)
        raise RuntimeError(f"real-broker mode cannot inject {step} (not supported yet)")


def install() -> ChildFaults | None:
    """Called in each pool child (worker_process_init): read the plan, hook the task."""
    path = os.environ.get(PLAN_ENV)
    if not path:
        return None
    with open(path, encoding="utf-8") as handle:
        faults = ChildFaults(path, json.load(handle))
    signals.task_prerun.connect(faults.on_prerun, weak=False)
    return faults
