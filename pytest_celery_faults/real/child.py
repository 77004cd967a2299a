"""Runs inside the real worker's pool child: records what each delivery does and fires real faults.

The plan arrives through a JSON file named in the environment, never through
the message. Every start, side effect, end and fault is appended to the
scenario's record file as one JSON line, which the runner reads to observe
what really happened. Side effects are the tracked callables and the tasks the
body publishes, as in the emulation.

Each fault is the real thing: ``sys.exit``, a signal to this child, a SIGKILL
to the worker's whole process group (power loss), SIGTERM to the worker's
main process (``warm_shutdown``), or, for ``timeout``/``soft_timeout``, a wait
until the worker's own time-limit machinery ends the body. (``cold_shutdown``
is refused up front: ``plan.NOT_ON_A_REAL_WORKER``.)
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from celery import signals
from celery.exceptions import SoftTimeLimitExceeded

from .. import _celery_internals as internals
from ..engine.effects import Patch, resolve_target
from ..grammar import Step
from .plan import LONGEST_TIME_LIMIT, PLAN_ENV, Bindings, Plan, append_record, read_records
from .waiting import polls

#: How long a whole-worker kill waits for the parent's early ack of the delivery.
ACK_WAIT_SECONDS = 5.0
#: The ack usually lands within milliseconds; look often, the task is waiting.
ACK_POLL_SECONDS = 0.005
#: After signalling a warm shutdown, the body waits this long before going on.
SHUTDOWN_SETTLE_SECONDS = 0.5
#: Waiting for a time limit or a shutdown: longer than any limit a plan allows.
KILL_WAIT_SECONDS = LONGEST_TIME_LIMIT + 15.0


class ChildFaults:
    """The fault plan as the child applies it: steps per delivery of each task id."""

    def __init__(self, plan_path: str) -> None:
        self.plan_path = plan_path
        self.plan = Plan.read(plan_path)
        self.tracked: set[str] = set()
        self.patches: list[Patch] = []
        self.current: str | None = None
        self.delivery = 0
        self.acks_early = False
        self.step: Step | None = None
        self.effects = 0
        self.in_chord_return = False
        self.track(self.plan.track)

    @property
    def record_path(self) -> str:
        return self.plan.record

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
        append_record(self.record_path, **fields)

    def count(self, event: str, task_id: str) -> int:
        """How many ``event`` lines the scenario's record holds for ``task_id``."""
        return sum(
            r.get("event") == event and r.get("task_id") == task_id
            for r in read_records(self.record_path)
        )

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

    # -- signal handlers --------------------------------------------------------

    def on_prerun(self, task_id: str | None = None, task: Any = None, **_: Any) -> None:
        self.plan = Plan.read(self.plan_path)  # the runner rewrites it for each scenario
        self.track(self.plan.track)
        task_id = task_id or ""
        name = getattr(task, "name", "")
        number = self.count("start", task_id) + 1
        self.current, self.effects, self.delivery = task_id, 0, number
        self.acks_early = task is not None and not task.acks_late
        if task is not None:
            self.watch_chord_returns(task.backend)
        self.step = Bindings(self.plan).steps_for(task_id, name, number)
        if self.step is not None and self.step.kind == "ack_lost":
            self.step = None  # the parent loses the ack (worker_main)
        if self.step is not None and self.step.at == 0 and self.step.kind != "raise":
            # Boundary 0 is before the body: the delivery counts, the execution does not.
            self.record(event="start", task_id=task_id, delivery=number, body=False)
            self.fire()
        request = task.request if task is not None else None
        info = (request.delivery_info or {}) if request is not None else {}
        self.record(
            event="start",
            task_id=task_id,
            task=name,
            delivery=number,
            redelivered=bool(info.get("redelivered")),
            retries=request.retries if request is not None else 0,
            body=True,
        )

    def on_postrun(self, task_id: str | None = None, state: str | None = None, **_: Any) -> None:
        self.record(event="end", task_id=task_id, delivery=self.delivery, state=state)
        self.current, self.step = None, None

    def on_publish(self, sender: str | None = None, **_: Any) -> None:
        """A task the body published: a side effect, as the emulation counts it.

        Not a chord's body, which the result backend publishes once the last
        header task is stored: the emulation's backend does that outside the
        execution too.
        """
        if self.current is not None and not self.in_chord_return:
            self._after_effect(f"publish {sender}")

    def watch_chord_returns(self, backend: Any) -> None:
        """Know when ``backend`` is publishing a chord's body (once per backend object)."""
        if getattr(backend, "_celery_faults_watched", False):
            return
        original = backend.on_chord_part_return

        def on_chord_part_return(*args: Any, **kwargs: Any) -> Any:
            self.in_chord_return = True
            try:
                return original(*args, **kwargs)
            finally:
                self.in_chord_return = False

        backend.on_chord_part_return = on_chord_part_return
        backend._celery_faults_watched = True

    # -- side effects -----------------------------------------------------------

    def _wrap(self, original: Any, name: str) -> Any:
        def tracked(*args: Any, **kwargs: Any) -> Any:
            step = self.step
            if step is not None and step.kind == "raise" and step.at == self.effects:
                self.step = None
                self.record(event="fault", task_id=self.current, spec=str(step), after=step.at)
                raise step.exception_class()(f"injected by celery_faults: {step} before {name}")
            result = original(*args, **kwargs)
            if self.current is not None:
                self._after_effect(name)
            return result

        return tracked

    def _after_effect(self, label: str) -> None:
        self.effects += 1
        self.record(
            event="effect",
            task_id=self.current,
            delivery=self.delivery,
            index=self.effects,
            label=label,
        )
        step = self.step
        if step is not None and step.kind != "raise" and step.at == self.effects:
            self.fire()

    # -- faults -----------------------------------------------------------------

    def fire(self) -> None:
        """The fault, for real."""
        step, self.step = self.step, None
        if step is None:
            return
        kind = step.kind
        if kind in ("power_loss", "warm_shutdown"):
            self.await_early_ack()  # a stopping worker sends no ack it has not sent yet
        self.record(event="fault", task_id=self.current, spec=str(step), after=self.effects)
        if kind == "exit":
            sys.exit(step.code)
        if kind == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if kind == "power_loss":
            # The runner started the worker as the leader of its own process group.
            os.killpg(os.getpgid(0), signal.SIGKILL)
        if kind == "warm_shutdown":
            os.kill(os.getppid(), signal.SIGTERM)
            # The body goes on to its end once the worker has begun to stop, not in a
            # race with the signal handler (SHUTDOWN_SETTLE_SECONDS).
            time.sleep(SHUTDOWN_SETTLE_SECONDS)
            return
        if kind == "soft_timeout":
            self._wait_to_be_ended(soft_ends_it=True)
        if kind == "timeout":
            self._wait_to_be_ended(soft_ends_it=False)
        raise RuntimeError(f"the real worker did not end the body after {step}")

    def _wait_to_be_ended(self, *, soft_ends_it: bool) -> None:
        """Sleep until the worker ends this body (a hard time limit kills the child).

        A soft time limit raises SoftTimeLimitExceeded here: it ends the wait
        for ``soft_timeout``; for the others it is swallowed, as a body stuck
        where it cannot be interrupted would.
        """
        soft = internals.soft_time_limit_signal()
        ignored = not soft_ends_it and soft is not None
        previous = signal.signal(soft, signal.SIG_IGN) if ignored and soft else None
        # Stuck where no signal lands: the soft limit's signal does nothing here (it could
        # otherwise raise between two lines, outside the try below); the hard limit's
        # SIGKILL ends the child.
        try:
            deadline = time.monotonic() + KILL_WAIT_SECONDS
            while time.monotonic() < deadline:  # not polls(): the signal must land in the try
                try:
                    time.sleep(0.05)
                except SoftTimeLimitExceeded:
                    if soft_ends_it:
                        raise
        finally:
            if ignored and soft:
                signal.signal(soft, previous)


def install() -> ChildFaults | None:
    """Called in each pool child (worker_process_init): read the plan, hook the task."""
    path = os.environ.get(PLAN_ENV)
    if not path:
        return None
    faults = ChildFaults(path)
    signals.task_prerun.connect(faults.on_prerun, weak=False)
    signals.task_postrun.connect(faults.on_postrun, weak=False)
    signals.after_task_publish.connect(faults.on_publish, weak=False)
    return faults
