"""What a test session did with faults: per-test records, the JSON report, the summary.

Deterministic: no wall-clock times, sorted keys, tests in run order, so the
same seed gives the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .harness import CeleryFaults
    from .outcome import Outcome


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
        }


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
        "retries": outcome.retries,
        "faults": outcome.faults,
        "exception": repr(outcome.exception) if outcome.exception is not None else None,
    }


def record_harness(
    nodeid: str, harness: CeleryFaults, specs: list[str], warnings: list[str]
) -> TestRecord:
    """What the harness of one test did, read after the test ran."""
    suite_wide = [str(spec) for spec in harness.suite_wide]
    unfired = [str(armed.spec) for armed in harness.unfired(explicit_only=True)]
    suite_unfired = [
        str(armed.spec) for armed in harness.unfired(explicit_only=False) if not armed.explicit
    ]
    outcomes = [outcome_json(outcome) for outcome in harness.outcomes()]
    return TestRecord(nodeid, specs, suite_wide, outcomes, unfired, suite_unfired, warnings)


@dataclass
class SessionReport:
    """Every test that used the harness, in run order."""

    seed: int
    records: list[TestRecord] = field(default_factory=list)

    def add(self, record: TestRecord) -> None:
        self.records.append(record)

    def to_json(self) -> str:
        document = {
            "seed": self.seed,
            "tests": {record.nodeid: record.to_json() for record in self.records},
            "totals": self.totals(),
        }
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    def totals(self) -> dict[str, int]:
        tasks = {o["name"] for r in self.records for o in r.outcomes}
        return {
            "tests": len(self.records),
            "tasks_exercised": len(tasks),
            "messages": sum(len(r.outcomes) for r in self.records),
            "faults_injected": sum(len(o["faults"]) for r in self.records for o in r.outcomes),
            "failed": sum(r.verdict == "failed" for r in self.records),
        }

    def summary_lines(self) -> list[str]:
        totals = self.totals()
        lines = [
            f"{totals['tests']} test(s) used the harness: {totals['tasks_exercised']} task(s) "
            f"exercised, {totals['messages']} message(s), "
            f"{totals['faults_injected']} fault(s) injected (seed {self.seed})"
        ]
        for record in self.records:
            if record.verdict == "failed":
                replay = " ".join(
                    f"--celery-faults={spec!r}" for spec in record.specs + record.suite_wide
                )
                how = f" (replay: pytest {record.nodeid!r} {replay})" if replay else ""
                lines.append(f"FAILED {record.nodeid}{how}")
        for record in self.records:
            for spec in record.suite_wide_unfired:
                lines.append(f"never fired: {spec} in {record.nodeid}")
            for warning in record.warnings:
                lines.append(f"warning: {record.nodeid}: {warning}")
        return lines
