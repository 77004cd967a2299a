"""Idempotency: run a task fault-free, then under faults, and compare what the world saw.

``observe()`` is the user's view of the world (rows in a table, e-mails sent,
charges made); ``reset()`` puts it back between scenarios. A scenario fails
when ``observe()`` differs from the fault-free baseline (a duplicated side
effect), or when the task's fate differs (lost, or FAILURE where the baseline
succeeded).
"""

from __future__ import annotations

import copy
import difflib
import pprint
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .faults import FaultSpec, parse_spec
from .outcome import Outcome

if TYPE_CHECKING:
    from .harness import CeleryFaults

#: The kinds a sweep tries at every boundary, unless told otherwise. A hard
#: time limit (``timeout``) is left out: Celery stores FAILURE for it by
#: design, so it would flag every task; pass it in ``hows`` to include it.
SWEEP_KINDS: tuple[str, ...] = ("sigkill", "sigterm", "exit", "power_loss", "cold_shutdown")
#: The kinds ``assert_idempotent`` tries at every boundary by default.
DEFAULT_KINDS: tuple[str, ...] = ("sigkill", "exit", "power_loss")
#: Specs without a boundary that every default set includes.
WHOLE_MESSAGE_SPECS: tuple[str, ...] = ("redeliver", "ack_lost")


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
    """One run under one spec, and how it compares with the baseline."""

    spec: str
    outcome: Outcome
    observed: Any
    verdict: str  # "ok", "duplicated", "fate", "unfired"
    problem: str = ""
    diff: str = ""

    @property
    def failed(self) -> bool:
        return self.verdict in ("duplicated", "fate")

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
    """Every scenario of a sweep; failures come simplest first."""

    baseline: Outcome
    baseline_observed: Any
    scenarios: list[Scenario] = field(default_factory=list)

    @property
    def failures(self) -> list[Scenario]:
        return sorted((s for s in self.scenarios if s.failed), key=_simplicity)

    @property
    def unfired(self) -> list[Scenario]:
        return [s for s in self.scenarios if s.verdict == "unfired"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` describing the simplest failure and listing the others."""
        __tracebackhide__ = True
        failures = self.failures
        if not failures:
            return
        raise AssertionError(failure_message(self.baseline, failures, len(self.scenarios)))

    def summary(self) -> str:
        return (
            f"{len(self.scenarios)} scenarios: {len(self.failures)} failed, "
            f"{len(self.unfired)} never reached their fault"
        )


def failure_message(baseline: Outcome, failures: Sequence[Scenario], total: int) -> str:
    first, rest = failures[0], failures[1:]
    head = (
        f"{baseline.name} is not idempotent: {len(failures)} of {total} fault scenario(s) "
        f"changed the outcome. The simplest:"
    )
    parts = [head, first.describe(baseline)]
    if rest:
        parts.append("Other failing specs (replay each with celery_faults.run):")
        parts.extend(f"  {s.spec!r}: {s.problem}" for s in rest[:50])
        if len(rest) > 50:
            parts.append(f"  ... and {len(rest) - 50} more")
    return "\n".join(parts)


def compare(
    spec: str,
    baseline: Outcome,
    baseline_observed: Any,
    outcome: Outcome,
    observed: Any,
    fired: bool,
) -> Scenario:
    """Judge one faulted run against the baseline."""
    if not fired:
        return Scenario(spec, outcome, observed, "unfired", "the fault never fired")
    if outcome.lost or (baseline.succeeded and not outcome.succeeded):
        fate = "lost" if outcome.lost else f"ended {outcome.state}"
        problem = (
            f"the task's fate changed: {fate} ({outcome.exception!r}) where the fault-free run "
            f"ended {baseline.state}"
        )
        return Scenario(
            spec, outcome, observed, "fate", problem, _diff(baseline_observed, observed)
        )
    if observed != baseline_observed:
        problem = (
            f"a side effect was duplicated or changed: the task ran {outcome.executions} "
            f"time(s) over {outcome.deliveries} deliveries"
        )
        return Scenario(
            spec, outcome, observed, "duplicated", problem, _diff(baseline_observed, observed)
        )
    return Scenario(spec, outcome, observed, "ok")


def _diff(expected: Any, actual: Any) -> str:
    before = pprint.pformat(expected, width=80, sort_dicts=True).splitlines()
    after = pprint.pformat(actual, width=80, sort_dicts=True).splitlines()
    if before == after:
        return ""
    lines = difflib.unified_diff(before, after, "baseline", "faulted", lineterm="", n=2)
    return "\n".join(list(lines)[2:])


class Idempotency:
    """Runs scenarios on an active harness, resetting it in place between them."""

    def __init__(
        self,
        harness: CeleryFaults,
        signature: Any,
        observe: Callable[[], Any],
        reset: Callable[[], Any] | None = None,
    ) -> None:
        self.harness = harness
        self.signature = signature
        self.observe = observe
        self.reset_world = reset

    def _fresh(self, *, final: bool = False) -> None:
        self.harness.reset(suite_wide=final)
        if self.reset_world is not None:
            self.reset_world()

    def baseline(self) -> tuple[Outcome, Any, int]:
        """The fault-free run: its outcome, what observe() saw, and its side-effect count."""
        self._fresh()
        outcome = self.harness.run(self.signature.clone())
        observed = copy.deepcopy(self.observe())  # a snapshot, whatever observe() shares
        boundaries = max(
            (r.effects for r in self.harness.records if r.task_id == outcome.task_id),
            default=0,
        )
        first = self.harness.records[0] if self.harness.records else None
        if first is not None and first.task_id != outcome.task_id:
            boundaries = max(boundaries, first.effects)  # a canvas: its first task's effects
        return outcome, observed, boundaries

    def scenario(
        self, spec: str | FaultSpec, baseline: Outcome, baseline_observed: Any
    ) -> Scenario:
        text = str(parse_spec(spec))
        self._fresh()
        outcome = self.harness.run(self.signature.clone(), text)
        observed = copy.deepcopy(self.observe())
        fired = not self.harness.unfired()
        return compare(text, baseline, baseline_observed, outcome, observed, fired)

    def finish(self) -> None:
        self._fresh(final=True)


def assert_idempotent(
    harness: CeleryFaults,
    signature: Any,
    observe: Callable[[], Any],
    reset: Callable[[], Any] | None = None,
    specs: Iterable[str | FaultSpec] | None = None,
) -> list[Scenario]:
    """Fail when any spec changes ``observe()`` or the task's fate; return the scenarios."""
    __tracebackhide__ = True
    runner = Idempotency(harness, signature, observe, reset)
    baseline, baseline_observed, boundaries = runner.baseline()
    chosen = list(specs) if specs is not None else default_specs(boundaries)
    scenarios = [runner.scenario(spec, baseline, baseline_observed) for spec in chosen]
    runner.finish()
    explicit_unfired = [s for s in scenarios if s.verdict == "unfired"] if specs else []
    failures = sorted((s for s in scenarios if s.failed), key=_simplicity)
    if failures:
        raise AssertionError(failure_message(baseline, failures, len(scenarios)))
    if explicit_unfired:
        names = ", ".join(repr(s.spec) for s in explicit_unfired)
        raise AssertionError(
            f"assert_idempotent: spec(s) {names} never fired against {baseline.name} "
            f"(the fault-free run reached {boundaries} side effect(s)), so they proved nothing"
        )
    return scenarios


def sweep(
    harness: CeleryFaults,
    signature: Any,
    observe: Callable[[], Any],
    reset: Callable[[], Any] | None = None,
    hows: Sequence[str] = SWEEP_KINDS,
    pairs: bool = True,
) -> SweepReport:
    """Every kind at every boundary, then every pair for two deliveries; a report."""
    runner = Idempotency(harness, signature, observe, reset)
    baseline, baseline_observed, boundaries = runner.baseline()
    report = SweepReport(baseline, baseline_observed)
    singles = boundary_specs(hows, boundaries)
    for spec in [*WHOLE_MESSAGE_SPECS, *singles]:
        report.scenarios.append(runner.scenario(spec, baseline, baseline_observed))
    if pairs:
        # Only a first fault that leads to a second delivery can pair with another.
        redelivering = [
            s.spec for s in report.scenarios if s.spec in singles and s.outcome.deliveries > 1
        ]
        for first in redelivering:
            for second in singles:
                pair = f"{first};{second}"
                report.scenarios.append(runner.scenario(pair, baseline, baseline_observed))
    runner.finish()
    return report
