"""What a test session did with faults: per-test records and the JSON report.

Deterministic: no wall-clock times, sorted keys, tests in run order, so the
same seed gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..engine.outcome import safe_repr
from ..errors import FaultSpecError
from ..grammar import parse_spec

if TYPE_CHECKING:
    from ..engine.outcome import Outcome
    from ..harness import CeleryFaults
    from .gate import EagerGate


@dataclass
class TestRecord:
    """One test's use of the harness."""

    nodeid: str
    specs: list[str]
    suite_wide: list[str]
    outcomes: list[dict[str, Any]]
    unfired: list[str]
    suite_wide_unfired: list[str]
    warnings: list[str]
    verdict: str = "passed"  # pytest's outcome of the call phase
    failure: str = ""
    tasks: list[str] = field(default_factory=list)  # every task name run, every scenario
    messages: int = 0  # task ids published, every scenario
    faults: int = 0  # faults that hit, every scenario
    scenarios: list[dict[str, str]] = field(default_factory=list)  # classes judged
    gated: int = 0  # eager task runs the gate sent through the emulated worker
    #: The suite-wide specs (as given on the command line) that fired in this test.
    suite_wide_fired: list[str] = field(default_factory=list)
    #: Each ``explore()`` of the test, in call order (see :func:`explore_json`).
    explore: list[dict[str, Any]] = field(default_factory=list)

    def findings(self) -> dict[str, list[str]]:
        """The specs of the judged scenarios of each class other than ok, in run order."""
        found: dict[str, list[str]] = {}
        for scenario in self.scenarios:
            if scenario["class"] not in ("ok", "unfired"):
                found.setdefault(scenario["class"], []).append(scenario["spec"])
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "specs": self.specs,
            "suite_wide_specs": self.suite_wide,
            "outcomes": self.outcomes,
            "unfired": self.unfired,
            "suite_wide_unfired": self.suite_wide_unfired,
            "warnings": self.warnings,
            "verdict": self.verdict,
            "replay": [*self.specs, *self.suite_wide],
            "tasks": self.tasks,
            "messages": self.messages,
            "faults": self.faults,
            "scenarios": self.scenarios,
            "gated": self.gated,
            "suite_wide_fired": self.suite_wide_fired,
            "explore": self.explore,
        }

    @classmethod
    def from_json(cls, nodeid: str, test: dict[str, Any]) -> TestRecord:
        return cls(
            nodeid,
            test["specs"],
            test["suite_wide_specs"],
            test["outcomes"],
            test["unfired"],
            test["suite_wide_unfired"],
            test["warnings"],
            test["verdict"],
            tasks=test["tasks"],
            messages=test["messages"],
            faults=test["faults"],
            scenarios=test["scenarios"],
            gated=test["gated"],
            suite_wide_fired=test.get("suite_wide_fired", []),
            explore=test.get("explore", []),
        )


def outcome_json(outcome: Outcome) -> dict[str, Any]:
    """An outcome without its task id: ids are random, and the report must not be."""
    return {
        "name": outcome.name,
        "state": outcome.state,
        "deliveries": outcome.deliveries,
        "executions": outcome.executions,
        "acked": outcome.acked,
        "rejected": outcome.rejected,
        "lost": outcome.lost,
        "ended": outcome.ended,
        "retries": outcome.retries,
        "faults": outcome.faults,
        "exception": safe_repr(outcome.exception) if outcome.exception is not None else None,
    }


def record_harness(
    nodeid: str, harness: CeleryFaults, specs: list[str], warnings: list[str]
) -> TestRecord:
    """What the harness of one test did, read after the test ran."""
    suite_wide = [str(spec) for spec in harness.suite_wide]
    unfired = [str(armed.spec) for armed in harness.unfired(explicit_only=True)]
    fired = harness.suite_wide_fired()  # in any scenario, also one a reset() ended
    suite_unfired = [
        str(armed.spec)
        for armed in harness.unfired(explicit_only=False)
        if not armed.explicit and str(armed.spec) not in fired
    ]
    outcomes = [outcome_json(outcome) for outcome in harness.outcomes()]
    record = TestRecord(nodeid, specs, suite_wide, outcomes, unfired, suite_unfired, warnings)
    record.suite_wide_fired = [spec for spec in suite_wide if _normal(spec) in fired]
    _add_scenarios(record, harness)
    defaults = getattr(harness, "explore_defaults", None)
    record.explore = [explore_json(summary) for summary in getattr(defaults, "reports", ())]
    return record


#: What the JSON report keeps of each explore() (its timeline is in the failure and the page).
EXPLORE_KEYS = ("seed", "budget", "runs", "found_at", "shrink_runs", "replayed", "replay")


def explore_json(summary: dict[str, Any]) -> dict[str, Any]:
    """One ``explore()`` in the JSON report: its budget, seed, runs, counts, smallest failure.

    From :meth:`ExploreReport.to_json`, without wall-clock time or task ids, so
    the same seed gives the same bytes. ``replay`` is the smallest failing
    schedule (None when none failed), ``problem`` what it broke; ``counts``
    has, per task, the messages published and the fate of each.
    """
    entry = {key: summary.get(key) for key in EXPLORE_KEYS}
    entry["failed"] = summary.get("replay") is not None
    entry["problem"] = summary.get("problem")
    entry["counts"] = summary.get("counts", {})
    return entry


def _normal(spec: str) -> str:
    """One spelling per spec (``redeliver*1`` and ``redeliver`` are one spec)."""
    try:
        return str(parse_spec(spec))
    except FaultSpecError:
        return spec


def _add_scenarios(record: TestRecord, harness: CeleryFaults) -> None:
    """Add what every scenario of ``harness`` ran, and the classes it judged, to ``record``."""
    history = harness.history
    totals = history.totals()
    record.tasks = sorted(set(record.tasks) | totals.tasks)
    record.messages += totals.messages
    record.faults += totals.faults
    record.scenarios.extend(
        {"task": j.task, "spec": j.spec, "class": j.verdict, "problem": j.problem}
        for j in history.judged
    )


def record_gate(nodeid: str, gate: EagerGate, verdict: str) -> TestRecord:
    """What the eager gate ran in one test that did not use the harness."""
    tally = gate.tally
    outcomes = [outcome_json(outcome) for outcome in tally.outcomes]
    own = [spec for spec in gate.specs if spec not in gate.suite_wide]
    suite_unfired = [spec for spec in gate.unfired if spec in gate.suite_wide]
    record = TestRecord(
        nodeid,
        own,
        list(gate.suite_wide),
        outcomes,
        [],
        suite_unfired,
        list(tally.warnings),
        verdict,
    )
    record.suite_wide_fired = [spec for spec in gate.suite_wide if spec in tally.fired]
    record.tasks = sorted(tally.work.tasks)
    record.messages = tally.work.messages
    record.faults = tally.work.faults
    record.gated = tally.calls
    return record


@dataclass
class SessionReport:
    """Every test that used the harness, in run order."""

    seed: int
    records: list[TestRecord] = field(default_factory=list)
    exempt: dict[str, str] = field(default_factory=dict)  # nodeid -> why it opted out
    audit: dict[str, Any] | None = None  # --celery-faults-audit's findings

    def add(self, record: TestRecord) -> None:
        self.records.append(record)

    def to_json(self) -> str:
        document = {
            "seed": self.seed,
            "tests": {record.nodeid: record.to_json() for record in self.records},
            "totals": self.totals(),
            "exempt": dict(sorted(self.exempt.items())),
        }
        if self.audit is not None:
            document["audit"] = self.audit
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    def totals(self) -> dict[str, int]:
        tasks = {name for r in self.records for name in r.tasks}
        gated = [r for r in self.records if r.gated]
        return {
            "tests": len(self.records),
            "tasks_exercised": len(tasks),
            "messages": sum(r.messages for r in self.records),
            "faults_injected": sum(r.faults for r in self.records),
            "failed": sum(r.verdict == "failed" for r in self.records),
            "scenarios": sum(len(r.scenarios) for r in self.records),
            "gated_tests": len(gated),
            "gated_runs": sum(r.gated for r in gated),
            "gated_tasks": len({name for r in gated for name in r.tasks}),
        }

    def fired_in(self, spec: str) -> tuple[int, int]:
        """In how many tests the suite-wide ``spec`` fired, and how many ran under it."""
        key = _normal(spec)
        under = [r for r in self.records if key in {_normal(s) for s in r.suite_wide}]
        fired = [r for r in under if key in {_normal(s) for s in r.suite_wide_fired}]
        return len(fired), len(under)

    def unfired_gate(self, gate_specs: list[str]) -> list[str]:
        """The suite-wide specs that fired in no test of the session."""
        return [spec for spec in gate_specs if not self.fired_in(spec)[0]]
