"""Compare an emulated outcome with what a real worker did under the same faults.

A view is what both sides can observe: the fate (state, exception, lost), the
result, the retries, the executions, each delivery's side effects, and the
faults that fired. :class:`RealComparison` runs the real worker first, gives
the test a chance to put its state back (so neither run sees the other's),
then the emulation, and fails on any difference, naming it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from ..engine.outcome import Outcome
from ..grammar import FaultSpec, parse_spec
from .plan import RealModeRefused, refusal, task_settings
from .runner import RealBrokerRunner, RealOutcome, exception_text

READY = ("SUCCESS", "FAILURE", "REVOKED")

#: Saves the state a run changes; returns what puts it back (a test's isolation hook).
Isolation = Callable[[], Callable[[], object]]


def _plain(value: Any) -> Any:
    """A result as JSON sees it: a tuple and a list are the same result on a real backend."""
    try:
        return json.loads(json.dumps(value, default=repr))
    except (TypeError, ValueError):
        return repr(value)


def _effect_label(kind: str, label: str) -> str:
    if kind == "publish":
        return f"publish {label.split(' to ')[0]}"
    return label


def emulated_view(outcome: Outcome, harness: Any = None) -> dict[str, Any]:
    """The emulation's side; with its harness, per-delivery executions and side effects too."""
    view: dict[str, Any] = {
        "executions": outcome.executions,
        "state": outcome.state,
        "exception": exception_text(outcome.exception),
        "lost": outcome.lost and outcome.state not in READY,
        "result": _plain(outcome.result),
        "retries": outcome.retries,
        "faults": list(outcome.faults),
    }
    if harness is not None:
        effects = harness.effects.for_task(outcome.task_id)
        view["deliveries"] = [
            (
                record.started,
                [_effect_label(e.kind, e.label) for e in effects if e.delivery == record.delivery],
            )
            for record in harness.records
            if record.task_id == outcome.task_id
        ]
    return view


def real_view(real: RealOutcome, *, deliveries: bool = True) -> dict[str, Any]:
    view: dict[str, Any] = {
        "executions": real.executions,
        "state": real.state,
        "exception": real.exception,
        "lost": real.lost,
        "result": _plain(real.result),
        "retries": real.retries,
        "faults": list(real.faults),
    }
    if deliveries:
        view["deliveries"] = [(d.body, list(d.effects)) for d in real.deliveries]
    return view


def differences(real: dict[str, Any], emulated: dict[str, Any]) -> list[str]:
    """One line per differing field; unfired faults said as such."""
    lines = []
    for key in emulated:
        if real.get(key) == emulated[key]:
            continue
        if key == "faults":
            missing = [f for f in emulated[key] if f not in real[key]]
            if missing:
                lines.append(f"did not fire on the real worker: {', '.join(missing)}")
                continue
        lines.append(f"{key}: real {real.get(key)!r}, emulated {emulated[key]!r}")
    return lines


def pair(reals: list[RealOutcome], emulated: list[Outcome]) -> list[tuple[RealOutcome, Outcome]]:
    """Match task ids; ids made inside a body differ per run, so those pair by name in order."""
    by_id = {outcome.task_id: outcome for outcome in emulated}
    pairs, unmatched = [], [o for o in emulated if o.task_id not in {r.task_id for r in reals}]
    for real in reals:
        match = by_id.get(real.task_id)
        if match is None:
            match = next((o for o in unmatched if o.name == real.name), None)
            if match is None:
                continue
            unmatched.remove(match)
        pairs.append((real, match))
    return pairs


class RealComparison:
    """Makes every ``run()`` of a harness run on the real worker too, and compare."""

    def __init__(
        self, harness: Any, runner: RealBrokerRunner, isolation: Isolation | None = None
    ) -> None:
        self.harness = harness
        self.runner = runner
        self.isolation = isolation
        #: Called between the real run and the emulated one: a scenario's world reset
        #: (``assert_idempotent``, ``sweep``), so neither run sees the other's.
        self.between: Callable[[], Any] | None = None
        self._before: set[str] = set()  # the task ids the emulation had seen before a run
        self._reals: list[RealOutcome] = []
        self._texts: list[str] = []  # the run's specs and those armed waiting, as text
        self._restored = False
        #: Scenarios then each go through run(), never a copy, so each is compared.
        self.uninstall: Callable[[], None] = harness.observe_runs(self)

    def refuse(self, signature: Any, specs: Sequence[str]) -> None:
        """Raise :class:`RealModeRefused` (one line) when a real worker cannot run ``specs``."""
        __tracebackhide__ = True
        waiting = [str(armed.spec) for armed in self.harness.plan.armed if armed.task_id is None]
        why = refusal(self.harness.app, signature, [*specs, *waiting])
        if why is not None:
            raise RealModeRefused(f"real-broker mode cannot run this: {why}")

    def before_run(self, signature: Any, specs: Sequence[str | FaultSpec]) -> None:
        """Run ``signature`` on the real worker first, then put the world back as it was."""
        __tracebackhide__ = True
        harness = self.harness
        texts = [str(parse_spec(spec)) for spec in specs]
        waiting = [str(armed.spec) for armed in harness.plan.armed if armed.task_id is None]
        self.refuse(signature, texts)
        signature.freeze()
        self.runner.use_settings(task_settings(harness.app))
        self.runner.track = list(harness.tracked)
        restore = self.isolation() if self.isolation is not None else None
        self._reals = self.runner.run_signature(signature.clone(), texts, waiting=waiting)
        if self.between is not None:
            self.between()
        if restore is not None:
            restore()
        self._texts = texts + waiting
        self._restored = restore is not None or self.between is not None
        self._before = {outcome.task_id for outcome in harness.outcomes()}

    def after_run(
        self, signature: Any, specs: Sequence[str | FaultSpec], outcome: Outcome
    ) -> None:
        """Fail, naming each difference, when the real run did not do what the emulated one did."""
        __tracebackhide__ = True
        harness = self.harness
        emulated = [o for o in harness.outcomes() if o.task_id not in self._before]
        check(self.runner, harness, self._reals, emulated, self._texts, isolated=self._restored)


def check(
    runner: RealBrokerRunner,
    harness: Any,
    reals: list[RealOutcome],
    emulated_outcomes: list[Outcome],
    specs: list[str],
    *,
    isolated: bool = True,
) -> None:
    """Fail, naming each difference, when the real worker did not do what the emulation did."""
    __tracebackhide__ = True
    problems = []
    for real, emulated in pair(reals, emulated_outcomes):
        lines = differences(real_view(real), emulated_view(emulated, harness))
        if lines:
            problems.append(
                f"{emulated.name}[{real.task_id}]:\n    "
                + "\n    ".join(lines)
                + f"\n  real records:\n    {real.timeline().replace(chr(10), chr(10) + '    ')}"
                + f"\n  emulated timeline:\n{emulated.timeline}"
            )
    if problems:
        hint = (
            ""
            if isolated
            else "\n  (the emulated run started from the state the real run left: if the "
            "task reads external state, say how to put it back with the "
            "celery_faults_real_isolation fixture)"
        )
        raise AssertionError(
            f"the real worker on {runner.broker_url} disagrees with the emulation under "
            f"{'; '.join(specs) or 'no fault'!r}:\n  " + "\n  ".join(problems) + hint
        )
