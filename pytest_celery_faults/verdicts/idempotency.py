"""Idempotency: run a task fault-free, then under faults, and class what the world saw.

``observe()`` is the user's view of the world (rows in a table, e-mails sent,
charges made); ``reset()`` puts it back between scenarios. Each faulted run
gets a failure class from its history (:mod:`.history`): ``duplicated``,
``diverged``, ``lost``, ``partial``, ``ended_otherwise`` or ``ok``.
``assert_idempotent`` fails on the first two and names the others;
``assert_no_loss`` fails on the losses and names the others (``ended_otherwise``,
a task whose process went away after its work was done, fails neither);
``sweep`` reports every class.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import pprint
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery import Celery

from ..engine import copies
from ..engine.copies import PublishedMessage
from ..engine.history import Evidence, History
from ..engine.outcome import Outcome, Timeline, TimelineEntry
from ..engine.plan import ArmedSpec
from ..engine.scheduler import Scheduler, every_schedule
from ..grammar import FaultSpec, parse_spec
from ..vocabulary import DEFAULT_KINDS, ENDED_OTHERWISE, OK, WHOLE_MESSAGE_SPECS
from ..vocabulary import SWEEP_KINDS as SWEEP_KINDS  # the harness's default ``hows``
from .classify import CLASSES, LOSSES, NAMED_ONLY, NOT_IDEMPOTENT, judge

#: In ``specs`` or ``hows``: every interleaving of two overlapping copies, each a scenario.
EVERY_OVERLAP = "overlap"
UNFIRED = "unfired"


class Compares(Protocol):
    """Real-broker mode, as scenarios need it: each run() is also run on a real worker."""

    #: Called between the real run and the emulated one (the scenario's world reset).
    between: Callable[[], Any] | None

    def refuse(self, signature: Any, specs: Sequence[str]) -> None:
        """Raise, in one line, when a real worker cannot run ``specs``."""


class Runs(Protocol):
    """What scenarios need of the harness: reset it, run a signature, read the history."""

    app: Celery
    history: History
    scheduler: Scheduler
    #: Real-broker mode's comparison of every run(), or ``None`` (see :class:`Compares`).
    comparison: Compares | None

    def reset(self, *, suite_wide: bool = True) -> None: ...

    def run(self, signature: Any, *specs: str | FaultSpec) -> Outcome: ...

    def _run_copy(self, published: PublishedMessage, *specs: str | FaultSpec) -> Outcome: ...

    def _disarm_own(self) -> None: ...

    def unfired(self, *, explicit_only: bool = True) -> list[ArmedSpec]: ...


def boundary_specs(kinds: Iterable[str], boundaries: int) -> list[str]:
    """``kind@n`` for every kind and every boundary ``0..boundaries``."""
    specs: list[str] = []
    for kind in kinds:
        head = "exit(1)" if kind == "exit" else kind
        specs.extend(f"{head}@{n}" for n in range(boundaries + 1))
    return specs


def default_specs(boundaries: int) -> list[str]:
    """Redelivery, a lost ack, and a crash of each default kind at every boundary."""
    return [*WHOLE_MESSAGE_SPECS, *boundary_specs(DEFAULT_KINDS, boundaries)]


@dataclass
class Scenario:
    """One run under one spec, and its class against the baseline."""

    spec: str
    outcome: Outcome
    observed: Any
    verdict: str  # a class of .classify.CLASSES, or "unfired"
    problem: str = ""
    #: What ``observe()`` returned in the fault-free run.
    baseline_observed: Any = field(default=None, repr=False, compare=False)

    @functools.cached_property
    def diff(self) -> str:
        """How ``observe()`` differs from the fault-free run, for a finding (made when read)."""
        return _diff(self.baseline_observed, self.observed) if self.failed else ""

    @property
    def failed(self) -> bool:
        """Whether the scenario is a finding: duplicated, diverged, lost or partial."""
        return self.verdict in NOT_IDEMPOTENT or self.verdict in LOSSES

    @property
    def replay(self) -> str:
        """The spec that reproduces this scenario exactly when passed to ``run()``."""
        return self.spec

    def describe(self, baseline: Outcome) -> str:
        lines = [f"under {self.spec!r} (replay: celery_faults.run(signature, {self.replay!r})):"]
        lines.append(f"  {self.problem}")
        if self.diff:
            lines.append("  observe() differs from the fault-free run (- baseline, + faulted):")
            lines.extend(f"    {line}" for line in self.diff.splitlines())
        lines.append(f"  baseline: {baseline.summary()}")
        lines.append(f"  faulted:  {self.outcome.summary()}")
        lines.append("  timeline:")
        lines.extend(f"    {entry}" for entry in self.outcome.timeline)
        return "\n".join(lines)


def _simplicity(scenario: Scenario) -> tuple[int, int, str]:
    spec = parse_spec(scenario.spec)
    boundaries = [step.at or 0 for step in spec.steps]
    return spec.fault_count, max(boundaries, default=0), scenario.spec


@dataclass
class SweepReport:
    """Every scenario of a sweep, each with its class; failures come simplest first."""

    baseline: Outcome
    baseline_observed: Any
    scenarios: list[Scenario] = field(default_factory=list)

    def of_class(self, *verdicts: str) -> list[Scenario]:
        """The scenarios of those classes, simplest first."""
        return sorted((s for s in self.scenarios if s.verdict in verdicts), key=_simplicity)

    @property
    def failures(self) -> list[Scenario]:
        """Duplicated and diverged scenarios: the task is not idempotent."""
        return self.of_class(*NOT_IDEMPOTENT)

    @property
    def losses(self) -> list[Scenario]:
        """Lost and partial scenarios: the task never completed."""
        return self.of_class(*LOSSES)

    @property
    def ended_otherwise(self) -> list[Scenario]:
        """Scenarios whose task went away after its work was done: nothing lost."""
        return self.of_class(ENDED_OTHERWISE)

    @property
    def unfired(self) -> list[Scenario]:
        return [s for s in self.scenarios if s.verdict == UNFIRED]

    def counts(self) -> dict[str, int]:
        """How many scenarios got each class (every class, zeros included)."""
        counted = Counter(s.verdict for s in self.scenarios)
        return {verdict: counted[verdict] for verdict in (*CLASSES, UNFIRED)}

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` describing the simplest duplicated or diverged scenario."""
        __tracebackhide__ = True
        _raise_for(self.baseline, self.scenarios, NOT_IDEMPOTENT)

    def assert_no_loss(self) -> None:
        """Raise ``AssertionError`` describing the simplest lost or partial scenario."""
        __tracebackhide__ = True
        _raise_for(self.baseline, self.scenarios, LOSSES)

    def summary(self) -> str:
        counts = self.counts()
        shown = ", ".join(f"{n} {verdict}" for verdict, n in counts.items() if n)
        return f"{len(self.scenarios)} scenarios: {shown or 'none'}"


def failure_message(
    baseline: Outcome, scenarios: Sequence[Scenario], failing: Sequence[str]
) -> str | None:
    """The message of an assertion failing on ``failing`` classes; ``None`` when none is."""
    failures = sorted((s for s in scenarios if s.verdict in failing), key=_simplicity)
    if not failures:
        return None
    first, rest = failures[0], failures[1:]
    if tuple(failing) == LOSSES:
        what = "lost its work (lost or partial)"
        head = f"{baseline.name} can be lost"
    else:
        what = "duplicated or diverged"
        head = f"{baseline.name} is not idempotent"
    parts = [
        f"{head}: {len(failures)} of {len(scenarios)} fault scenario(s) {what}. The simplest:",
        first.describe(baseline),
    ]
    if rest:
        parts.append("Other failing specs (replay each with celery_faults.run):")
        parts.extend(f"  {s.spec!r}: {s.problem}" for s in rest[:50])
        if len(rest) > 50:
            parts.append(f"  ... and {len(rest) - 50} more")
    others = _named_not_failed(scenarios, failing)
    if others:
        parts.append(others)
    return "\n".join(parts)


def _named_not_failed(scenarios: Sequence[Scenario], failing: Sequence[str]) -> str:
    """The findings an assertion does not fail on, named so they are not missed."""
    ordered = sorted(scenarios, key=_simplicity)
    other = "assert_idempotent" if tuple(failing) == LOSSES else "assert_no_loss"
    groups = (
        (
            f"Not failed here (the class of {other}):",
            [s for s in ordered if s.failed and s.verdict not in failing],
        ),
        (
            "Ended otherwise, nothing lost (no assertion fails on these):",
            [s for s in ordered if s.verdict in NAMED_ONLY],
        ),
    )
    lines: list[str] = []
    for title, rest in groups:
        if not rest:
            continue
        lines.append(title)
        lines.extend(f"  {s.spec!r}: {s.problem}" for s in rest[:20])
        if len(rest) > 20:
            lines.append(f"  ... and {len(rest) - 20} more")
    return "\n".join(lines)


def _raise_for(baseline: Outcome, scenarios: Sequence[Scenario], failing: Sequence[str]) -> None:
    __tracebackhide__ = True
    message = failure_message(baseline, scenarios, failing)
    if message is not None:
        raise AssertionError(message)


def _diff(expected: Any, actual: Any) -> str:
    before = pprint.pformat(expected, width=80, sort_dicts=True).splitlines()
    after = pprint.pformat(actual, width=80, sort_dicts=True).splitlines()
    if before == after:
        return ""
    lines = difflib.unified_diff(before, after, "baseline", "faulted", lineterm="", n=2)
    return "\n".join(list(lines)[2:])


#: The one line a scenario that found nothing keeps of its timeline.
NOT_KEPT = "(timeline not kept: this scenario found nothing; run() its spec to see it)"


def _forget_timeline(outcome: Outcome) -> None:
    """A scenario that found nothing keeps its outcome but not its story.

    A sweep runs thousands of scenarios; keeping every timeline made its
    memory grow with each. The spec replays the story exactly.
    """
    outcome.timeline = Timeline([TimelineEntry(0.0, NOT_KEPT, outcome.task_id)])


class Idempotency:
    """Runs scenarios on an active harness, resetting it in place between them."""

    def __init__(
        self,
        harness: Runs,
        signature: Any,
        observe: Callable[[], Any],
        reset: Callable[[], Any] | None = None,
    ) -> None:
        if not callable(observe):
            raise TypeError(
                f"observe={observe!r}: expected a function that returns what the task "
                f"changes, such as lambda: dict(db.rows)"
            )
        if reset is not None and not callable(reset):
            raise TypeError(
                f"reset={reset!r}: expected a function that puts the world back, or None"
            )
        self.harness = harness
        self.history = harness.history
        self.signature = signature
        self.observe = observe
        self.reset_world = reset
        #: The fault-free run's message, when scenarios can publish copies of it (.replay).
        self.published: PublishedMessage | None = None

    def refuse_in_real_mode(self, specs: Sequence[str]) -> None:
        """In real-broker mode, every scenario is compared: refuse, up front, what cannot be."""
        comparison = self.harness.comparison
        if comparison is not None:
            comparison.refuse(self.signature, specs)

    @contextlib.contextmanager
    def compared(self) -> Iterator[None]:
        """In real-broker mode, reset the world between each real run and its emulated twin."""
        comparison = self.harness.comparison
        if comparison is None:
            yield
            return
        comparison.between = self.reset_world  # neither run sees the other's world
        try:
            yield
        finally:
            comparison.between = None

    def _fresh(self, *, final: bool = False) -> None:
        self.harness.reset(suite_wide=final)
        if self.reset_world is not None:
            self.reset_world()

    def baseline(self) -> tuple[Evidence, int]:
        """The fault-free run's evidence, and its side-effect count."""
        self._fresh()
        signature = self.signature.clone()
        with copies.recording(self.harness.app) as sent:
            outcome = self.harness.run(signature)
        if self.harness.comparison is None:  # real-broker mode compares each run() instead
            self.published = copies.copyable(self.harness.app, signature, sent, outcome.task_id)
        observed = copy.deepcopy(self.observe())  # a snapshot, whatever observe() shares
        records = self.history.records
        boundaries = self.history.reached(outcome.task_id)
        if records and records[0].task_id != outcome.task_id:
            boundaries = max(boundaries, records[0].effects)  # a canvas: its first task's
        return self.history.evidence(outcome, observed), boundaries

    def scenario(self, spec: str | FaultSpec, baseline: Evidence) -> Scenario:
        text = str(parse_spec(spec))
        self._fresh()
        if self.published is not None:
            outcome = self.harness._run_copy(self.published, text)
        else:
            outcome = self.harness.run(self.signature.clone(), text)
        observed = copy.deepcopy(self.observe())
        if self.harness.unfired():
            _forget_timeline(outcome)
            return Scenario(text, outcome, observed, UNFIRED, "the fault never fired")
        judged = judge(self.history, text, baseline, self.history.evidence(outcome, observed))
        if judged.verdict == OK:
            _forget_timeline(outcome)
            return Scenario(text, outcome, observed, OK, judged.problem)
        return Scenario(text, outcome, observed, judged.verdict, judged.problem, baseline.observed)

    def interleavings(self, baseline: Evidence) -> list[Scenario]:
        """A scenario per interleaving of two overlapping copies, each with its replay spec."""
        scenarios: list[Scenario] = []

        def run(prefix: str) -> list[tuple[str, tuple[str, ...]]]:
            scenario = self.scenario(f"overlap({prefix or '1'})", baseline)
            choices = list(self.harness.scheduler.choices)
            scenario.spec = f"overlap({''.join(chosen for chosen, _ in choices) or '1'})"
            scenarios.append(scenario)
            return choices

        every_schedule(run)
        return scenarios

    def scenarios(self, specs: Iterable[str | FaultSpec], baseline: Evidence) -> list[Scenario]:
        """A scenario per spec; ``"overlap"`` stands for every interleaving."""
        done: list[Scenario] = []
        for spec in specs:
            if spec == EVERY_OVERLAP:
                done.extend(self.interleavings(baseline))
            else:
                done.append(self.scenario(spec, baseline))
        return done

    def finish(self) -> None:
        self._fresh(final=True)

    @contextlib.contextmanager
    def disarming(self) -> Iterator[None]:
        """Scenarios run inside: however they end, none of their specs stays armed.

        A run cut short (``observe()`` raised, the time limit passed, Ctrl-C)
        would otherwise leave its scenario's spec armed, and the test's
        teardown would blame the test for a fault the sweep chose.
        """
        try:
            yield
        finally:
            self.harness._disarm_own()


def check(
    harness: Runs,
    signature: Any,
    observe: Callable[[], Any],
    reset: Callable[[], Any] | None,
    specs: Iterable[str | FaultSpec] | None,
    failing: Sequence[str],
) -> list[Scenario]:
    """Run the scenarios; fail on the ``failing`` classes, naming the other findings."""
    __tracebackhide__ = True
    runner = Idempotency(harness, signature, observe, reset)
    given = list(specs) if specs is not None else None
    runner.refuse_in_real_mode([str(s) for s in given] if given is not None else default_specs(0))
    with runner.disarming(), runner.compared():
        baseline, boundaries = runner.baseline()
        chosen = given if given is not None else default_specs(boundaries)
        scenarios = runner.scenarios(chosen, baseline)
    runner.finish()
    _raise_for(baseline.outcome, scenarios, failing)
    explicit_unfired = [s for s in scenarios if s.verdict == UNFIRED] if specs else []
    if explicit_unfired:
        names = ", ".join(repr(s.spec) for s in explicit_unfired)
        raise AssertionError(
            f"celery_faults: spec(s) {names} never fired against {baseline.outcome.name} "
            f"(the fault-free run reached {boundaries} side effect(s)), so they proved nothing"
        )
    return scenarios


def sweep(
    harness: Runs,
    signature: Any,
    observe: Callable[[], Any],
    reset: Callable[[], Any] | None = None,
    hows: Sequence[str] = SWEEP_KINDS,
    pairs: bool = True,
) -> SweepReport:
    """Every kind at every boundary, then every pair for two deliveries; a report."""
    runner = Idempotency(harness, signature, observe, reset)
    kinds = [how for how in hows if how != EVERY_OVERLAP]
    every = [*WHOLE_MESSAGE_SPECS, *boundary_specs(kinds, 0)]
    runner.refuse_in_real_mode([*every, *([EVERY_OVERLAP] if EVERY_OVERLAP in hows else [])])
    with runner.disarming(), runner.compared():
        baseline, boundaries = runner.baseline()
        report = SweepReport(baseline.outcome, baseline.observed)
        singles = boundary_specs(kinds, boundaries)
        overlaps = [EVERY_OVERLAP] if EVERY_OVERLAP in hows else []
        specs = [*WHOLE_MESSAGE_SPECS, *singles, *overlaps]
        report.scenarios.extend(runner.scenarios(specs, baseline))
        if pairs:
            # Only a first fault that leads to a second delivery can pair with another.
            redelivering = [
                s.spec for s in report.scenarios if s.spec in singles and s.outcome.deliveries > 1
            ]
            for first in redelivering:
                for second in singles:
                    report.scenarios.append(runner.scenario(f"{first};{second}", baseline))
    runner.finish()
    return report
