"""One run of a workload under a schedule: publish, drain, observe, check.

The schedule's choices come from a :class:`Source`: a replay string
(:class:`ReplaySource`, also the fault-free run) or a search that draws each
choice as the run reaches it (:mod:`.search`). Whichever it is, the run
records the schedule it actually followed, so every run can be printed as a
replay string and replayed exactly.

The harness is driven through what a test uses (``reset``, ``drain``,
``outcomes``, ``effects``, ``timeline``) plus four hooks: the broker's
``publish_fault`` (a message is numbered at its first publish attempt and a
publisher fault drawn for it is armed on its task id before the broker decides
the attempt's fate), the broker's ``after_publish`` (a message gets its
delivery faults once queued), the effect log's observers (a stall on the
virtual clock after a side effect), and the scheduler's choice of which
execution runs next.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..engine.broker import PublishFate
from ..engine.effects import Effect
from ..grammar import FaultSpec
from .checker import TaskCounts, tally
from .schedule import MessageRef, Pause, Schedule

if TYPE_CHECKING:
    from ..harness import CeleryFaults

Workload = Callable[[], Any] | Sequence[Any]
_CONNECTION_COUNT = re.compile(r"(@faults-[0-9]+)#[0-9]+")


class Source(Protocol):
    """Where a run's choices come from."""

    def messages(self, count: int) -> tuple[int, ...] | None: ...

    def prepare(self, order: Sequence[str]) -> None: ...

    def fault(self, ref: MessageRef, overall: int) -> FaultSpec | None: ...

    def pause(self, ref: MessageRef, overall: int, delivery: int, at: int) -> int: ...

    def choose(self, options: int) -> int: ...

    @property
    def interleave(self) -> str | None: ...

    @property
    def aborted(self) -> BaseException | None: ...


class ReplaySource:
    """The choices a schedule names; past its interleaving, the first option (no switch)."""

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self._pauses = {(p.ref, p.delivery, p.at): p.seconds for p in schedule.pauses}

    def messages(self, count: int) -> tuple[int, ...] | None:
        return self.schedule.messages

    def prepare(self, order: Sequence[str]) -> None:
        pass

    def fault(self, ref: MessageRef, overall: int) -> FaultSpec | None:
        return self.schedule.fault_for(ref, overall)

    def pause(self, ref: MessageRef, overall: int, delivery: int, at: int) -> int:
        return self._pauses.get((ref, delivery, at), 0)

    def choose(self, options: int) -> int:  # pragma: no cover - the scheduler follows instead
        return 0

    @property
    def interleave(self) -> str | None:
        return self.schedule.interleave

    @property
    def aborted(self) -> BaseException | None:
        return None


class _Chooser(random.Random):
    """Stands in for the scheduler's random source: each choice is the source's."""

    def __init__(self, source: Source) -> None:
        super().__init__(0)
        self.source = source

    def randrange(self, start: int, stop: int | None = None, step: int = 1) -> int:
        options = start if stop is None else stop - start
        return self.source.choose(options) + (0 if stop is None else start)


@dataclass
class RunResult:
    """What one run did and whether it broke something."""

    schedule: Schedule
    observed: Any
    counts: dict[str, TaskCounts]
    problem: str | None = None
    timeline: str = ""
    #: Task ids this run published, by the name the replay string gives them.
    refs: dict[str, MessageRef] = field(default_factory=dict)
    #: The task names of the messages published, in order.
    order: list[str] = field(default_factory=list)
    #: The scheduler's choices: (label chosen, labels that could run), in order.
    choices: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.problem is not None


class Runner:
    """Runs a workload on one harness, again and again, each time from a fresh state."""

    def __init__(
        self,
        harness: CeleryFaults,
        workload: Workload,
        observe: Callable[[], Any],
        reset: Callable[[], Any] | None,
        invariant: Callable[[Any], Any] | None,
    ) -> None:
        self.harness = harness
        self.workload = workload
        self.observe = observe
        self.user_reset = reset
        self.invariant = invariant
        self.signatures: list[Any] | None = None if callable(workload) else list(workload)
        self._baselines: dict[tuple[int, ...] | None, RunResult] = {}
        #: Most side effects one delivery of each task did in a fault-free run.
        self.reach: dict[str, int] = {}
        self.runs = 0
        # Per run:
        self._source: Source = ReplaySource(Schedule())
        self._ids: dict[str, MessageRef] = {}
        self._per_task: dict[str, int] = {}
        self._faults: dict[MessageRef, FaultSpec] = {}
        self._pending: dict[str, FaultSpec] = {}  # task id -> delivery faults, armed once queued
        self._pauses: list[Pause] = []
        self._order: list[str] = []  # task ids in publish order
        self._publish_fault: Callable[[str, dict[str, Any]], tuple[PublishFate, str]] | None = None

    # -- hooks ------------------------------------------------------------------

    def __enter__(self) -> Runner:
        harness = self.harness
        harness.broker.after_publish.append(self._published)
        harness.effects.observers.append(self._effect)
        self._seeded_random = harness.scheduler.random  # the harness's own, put back after
        self._publish_fault = harness.broker.publish_fault  # the engine's, put back after
        harness.broker.publish_fault = self._attempt
        return self

    def __exit__(self, *exc_info: object) -> None:
        harness = self.harness
        harness.broker.publish_fault = self._publish_fault
        harness.broker.after_publish.remove(self._published)
        harness.effects.observers.remove(self._effect)
        harness.scheduler.random = self._seeded_random
        harness.reset()

    def _attempt(self, queue: str, payload: dict[str, Any]) -> tuple[PublishFate, str]:
        """Before the broker decides a publish attempt's fate: number a new message."""
        headers = payload.get("headers") or {}
        task_id = str(headers.get("id", "?"))
        if task_id not in self._ids:
            self._number(task_id, str(headers.get("task", "?")))
        return self._publish_fault(queue, payload) if self._publish_fault else ("", "")

    def _number(self, task_id: str, name: str) -> None:
        """The message's name in the replay string, and the fault the source has for it.

        A publisher fault is armed on the task id at once (the broker applies it to
        this very attempt); delivery faults wait until the message is queued.
        """
        k = self._per_task[name] = self._per_task.get(name, 0) + 1
        ref = self._ids[task_id] = MessageRef(name, k)
        self._order.append(task_id)
        spec = self._source.fault(ref, len(self._ids))
        if spec is None:
            return
        self._faults[ref] = spec
        if spec.publish is not None:
            self.harness.plan.arm(FaultSpec(spec.steps), task_id=task_id, explicit=False)
        else:
            self._pending[task_id] = spec

    def _published(self, message: Any) -> None:
        task_id = message.task_id
        if task_id not in self._ids:  # published past the hook (not through the broker's fate)
            self._number(task_id, message.task_name)
        spec = self._pending.pop(task_id, None)
        if spec is None:
            return  # no delivery fault, or a retry whose faults are already bound
        if spec.redeliver:
            message.redeliveries_left = spec.redeliver
        else:
            self.harness.plan.arm(FaultSpec(spec.steps), task_id=task_id, explicit=False)

    def _effect(self, effect: Effect) -> None:
        if effect.task_id is None or effect.delivery is None or effect.index is None:
            return
        ref = self._ids.get(effect.task_id)
        if ref is None:
            return
        overall = self._order.index(effect.task_id) + 1
        seconds = self._source.pause(ref, overall, effect.delivery, effect.index)
        if seconds:
            self._pauses.append(Pause(ref, effect.delivery, effect.index, seconds))
            self.harness.effects.sleep(float(seconds))  # virtual: others run meanwhile

    # -- runs -------------------------------------------------------------------

    def baseline(self, messages: tuple[int, ...] | None) -> RunResult:
        """The fault-free run of these messages, one execution after another."""
        found = self._baselines.get(messages)
        if found is None:
            found = self._run(ReplaySource(Schedule(messages=messages)), None, messages)
            if found.problem is not None:
                raise AssertionError(
                    f"explore: the fault-free run of the workload already fails: "
                    f"{found.problem}\n{found.timeline}"
                )
            self._baselines[messages] = found
        return found

    def run(self, source: Source) -> RunResult:
        """One run under ``source``'s choices, checked against its fault-free run."""
        messages = source.messages(len(self.signatures)) if self.signatures else None
        if self.signatures is not None and messages == tuple(range(1, len(self.signatures) + 1)):
            messages = None  # every signature: the replay string need not say so
        reference = self.baseline(messages)
        return self._run(source, reference, messages)

    def _run(
        self, source: Source, reference: RunResult | None, messages: tuple[int, ...] | None
    ) -> RunResult:
        harness = self.harness
        self.runs += 1
        harness.reset(suite_wide=False)
        if self.user_reset is not None:
            self.user_reset()
        self._source = source
        self._ids, self._per_task, self._faults, self._pauses = {}, {}, {}, []
        self._pending = {}
        self._order = []
        source.prepare(reference.order if reference is not None else [])
        scheduler = harness.scheduler
        interleave = source.interleave
        if interleave is not None:
            scheduler.follow(interleave)
        else:
            scheduler.random = _Chooser(source)
        raised: str | None = None
        try:
            try:
                self._publish(messages)
            except Exception as exc:  # a refused publish reaches the caller of .delay()
                raised = f"the workload raised {type(exc).__name__}: {exc}"
            harness.drain()  # what it did publish still runs
        finally:
            scheduler.random = self._seeded_random
        if source.aborted is not None:
            raise source.aborted
        observed = self.observe()
        effects = list(harness.effects.effects)
        counts = tally(harness.outcomes(), effects)
        if reference is None:
            for effect in effects:
                if effect.task_name is not None and effect.index is not None:
                    name = effect.task_name
                    self.reach[name] = max(self.reach.get(name, 0), effect.index)
        schedule = Schedule(
            faults=tuple(sorted(self._faults.items())),
            interleave=_trimmed(scheduler.choices),
            pauses=tuple(self._pauses),
            messages=messages,
        )
        problem = self._named(raised) if raised else self._problem(observed, reference)
        timeline = self._story() if problem is not None or reference is None else ""
        refs = dict(self._ids)
        order = [self._ids[task_id].task for task_id in self._order]
        choices = list(scheduler.choices)
        return RunResult(schedule, observed, counts, problem, timeline, refs, order, choices)

    def _publish(self, messages: tuple[int, ...] | None) -> None:
        if self.signatures is None:
            assert callable(self.workload)
            self.workload()
            return
        for number, signature in enumerate(self.signatures, start=1):
            if messages is None or number in messages:
                signature.apply_async()

    def _problem(self, observed: Any, reference: RunResult | None) -> str | None:
        if self.invariant is not None:
            try:
                verdict = self.invariant(observed)
            except AssertionError as failure:
                return f"invariant failed: {failure}"
            if verdict is not None and not verdict:
                return f"invariant returned {verdict!r} for {observed!r}"
        if reference is not None and observed != reference.observed:
            return (
                f"observe() differs from the fault-free run: {reference.observed!r} "
                f"became {observed!r}"
            )
        return None

    def _named(self, text: str) -> str:
        """``text`` with task ids replaced by the names the replay string uses."""
        for task_id, ref in self._ids.items():
            text = text.replace(task_id, str(ref)).replace(task_id[:8], str(ref))
        return text

    def _story(self) -> str:
        """The run's timeline, task ids replaced by the names the replay string uses."""
        text = self._named(str(self.harness.timeline))
        # A consumer's connection count grows over the runs of a harness: not the run's.
        return _CONNECTION_COUNT.sub(r"\1", text)


def _trimmed(choices: Sequence[tuple[str, tuple[str, ...]]]) -> str:
    """The labels chosen, without the tail where the first option ran (a replay's default)."""
    labels = [chosen for chosen, _ in choices]
    end = len(choices)
    while end and choices[end - 1][0] == choices[end - 1][1][0]:
        end -= 1
    return "".join(labels[:end])
