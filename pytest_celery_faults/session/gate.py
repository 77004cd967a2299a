"""The eager gate: tasks a suite runs eagerly go through the emulated worker, under faults.

Most suites never publish a message: they run tasks with ``task_always_eager``
(``.delay()``/``.apply_async()``) or ``.apply()``. While a gate is open,
``Task.apply`` (where Celery's ``apply_async`` goes under ``task_always_eager``)
publishes the task instead, with real serialization, to a harness of its own
armed with the gate's specs, drains it before returning, and returns an
``EagerResult`` built from what Celery's tracer returned. The test's own
assertions then check the task under the faults (``redeliver*1``: every
message twice). With ``catch_async`` (suites built on ``celery.contrib.pytest``'s
``celery_worker``) ``apply_async`` is caught even when the app is not eager.

A call made while a gated task runs (a task body calling ``.apply()``, or
``.delay()`` on a child) is not gated again: the child is published to the
same harness and drained with its parent, as a worker would run it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import signals
from celery.app.task import Task
from celery.result import EagerResult

from ..engine.effects import Patch
from ..engine.history import Tally
from ..engine.outcome import Outcome
from ..harness import CeleryFaults

#: What ``Task.apply`` takes that ``apply_async`` does not.
_APPLY_ONLY = ("retries", "throw", "logfile", "loglevel")


@dataclass
class GateTally:
    """What the gate ran in one test."""

    calls: int = 0  # eager calls sent through the emulated worker
    work: Tally = field(default_factory=Tally)
    fired: set[str] = field(default_factory=set)  # specs that fired in some call
    warnings: list[str] = field(default_factory=list)
    #: The fate of every task id each call published (the report's and a failure's story).
    outcomes: list[Outcome] = field(default_factory=list)


class EagerGate:
    """Sends eager task runs through a harness armed with ``specs``. A context manager."""

    def __init__(
        self,
        specs: Sequence[str],
        *,
        suite_wide: Sequence[str] | None = None,
        seed: int = 0,
        profile: str = "rabbitmq",
        catch_async: bool = False,
    ) -> None:
        self.specs = list(specs)
        #: Which of ``specs`` come from ``--celery-faults`` (the rest are the test's own).
        self.suite_wide = list(specs if suite_wide is None else suite_wide)
        self.seed = seed
        self.profile = profile
        self.catch_async = catch_async
        self.tally = GateTally()
        self._busy = False

    @contextlib.contextmanager
    def open(self) -> Iterator[EagerGate]:
        """Gate eager runs until the block ends."""
        original_apply = Task.apply
        original_async = Task.apply_async
        gate = self

        def apply(task: Task, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
            if gate._busy:
                return original_apply(task, args, kwargs, **options)
            return gate.run(task, args, kwargs, options, original_async)

        def apply_async(task: Task, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
            if gate._busy or task.app.conf.task_always_eager:
                return original_async(task, args, kwargs, **options)
            return gate.run(task, args, kwargs, options, original_async)

        patches = [Patch(Task, "apply", apply)]
        if self.catch_async:
            patches.append(Patch(Task, "apply_async", apply_async))
        try:
            yield self
        finally:
            for patch in reversed(patches):
                patch.undo()

    @property
    def unfired(self) -> list[str]:
        """The gate's specs that fired in none of its calls."""
        return (
            [spec for spec in self.specs if spec not in self.tally.fired]
            if self.tally.calls
            else []
        )

    def run(
        self,
        task: Task,
        args: Any,
        kwargs: Any,
        options: dict[str, Any],
        publish: Callable[..., Any],
    ) -> EagerResult:
        """Publish ``task`` to a fresh harness under the specs, drain it, return its result."""
        app = task.app
        throw = options.get("throw")
        propagate = app.either("task_eager_propagates", throw)
        sent = {key: value for key, value in options.items() if key not in _APPLY_ONLY}
        traced: dict[str, tuple[str, Any]] = {}

        def on_postrun(
            task_id: str | None = None, state: str = "", retval: Any = None, **_: Any
        ) -> None:
            if task_id is not None:
                traced[task_id] = (state, retval)

        harness = CeleryFaults(app, profile=self.profile, seed=self.seed, check_unfired=False)
        self._busy = True
        signals.task_postrun.connect(on_postrun, weak=False)
        try:
            harness.start()
            harness.http.stop(allow_assert=False)  # the test's own HTTP stays as it was
            armed = {spec: harness.arm_suite_wide(spec) for spec in self.specs}
            result = publish(task, args, kwargs, **sent)
            harness.drain()
            outcome = harness.outcome(result.id)
            self._count(harness, armed)
        finally:
            signals.task_postrun.disconnect(on_postrun)
            harness.stop()  # nothing to undo when it did not start
            self._busy = False
        state, value = traced.get(result.id, (None, None))
        if not state:  # the tracer gave no state (a BaseException escaped it): the worker's
            state, value = outcome.state, outcome.exception or outcome.result
        value = _plain(value)
        if propagate and isinstance(value, BaseException) and state == "FAILURE":
            raise value
        return EagerResult(result.id, value, state, name=task.name)

    def _count(self, harness: CeleryFaults, armed: dict[str, Any]) -> None:
        tally = self.tally
        tally.calls += 1
        tally.work.add(harness.history.totals())
        tally.fired |= {spec for spec, spec_armed in armed.items() if spec_armed.has_fired}
        tally.warnings.extend(w for w in harness.warnings if w not in tally.warnings)
        tally.outcomes.extend(harness.outcomes())

    def story(self) -> str:
        """What the emulated worker did with each task the test ran eagerly, in order."""
        return "\n\n".join(str(outcome) for outcome in self.tally.outcomes)


def _plain(value: Any) -> Any:
    """The exception itself, from the wrappers Celery's tracer hands to signals."""
    if not isinstance(value, BaseException) and isinstance(
        getattr(value, "exception", None), BaseException
    ):
        value = value.exception  # an ExceptionInfo
    inner = getattr(value, "exc", None)
    if isinstance(value, BaseException) and isinstance(inner, BaseException):
        value = inner  # an ExceptionWithTraceback
    return value
