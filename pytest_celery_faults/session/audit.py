"""The audit: every task's effective settings, checked for combinations that lose or repeat work.

A rule (:mod:`.audit_rules`) looks at what Celery resolved for a task (its own
options over the app's) and at the broker profile, and names a risk. A risk is
reported only when its proof runs: the audit plays the rule's fault scenario on
the emulated worker and keeps the finding when the outcome shows the loss or
the repeat the rule predicts. Each finding carries a stable rule id and the replay spec of its
proof, so ``--celery-faults=SPEC`` (or ``run(sig, SPEC)``) shows it again.

Findings are suppressed by rule id, for every task or one, always with a
reason: in the ini (``celery_faults_audit_suppress``) or on the task itself
(``@app.task(celery_faults_suppress={"CF002": "why"})``).

Usable without pytest: :func:`audit_app` returns an :class:`AuditReport`.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from ..engine.broker import BrokerProfile
from ..harness import CeleryFaults
from .audit_rules import RULE_IDS, RULES, Proof, Rule, effective_settings

#: The task option that suppresses rules on one task: ``{rule id: reason}``.
TASK_SUPPRESS_OPTION = "celery_faults_suppress"


@dataclass(frozen=True)
class Suppression:
    rule: str
    reason: str
    task: str | None = None  # None: every task

    @classmethod
    def parse(cls, line: str) -> Suppression:
        """``RULE[:TASK] REASON``, as the ini option holds it."""
        head, _, reason = line.strip().partition(" ")
        rule, _, task = head.partition(":")
        if rule not in RULE_IDS:
            raise ValueError(
                f"celery_faults_audit_suppress: {line.strip()!r}: unknown rule {rule!r} "
                f"(rules: {', '.join(sorted(RULE_IDS))})"
            )
        if not reason.strip():
            raise ValueError(
                f"celery_faults_audit_suppress: {line.strip()!r}: give a reason after the "
                f"rule, as in '{head} the task only reads'"
            )
        return cls(rule, reason.strip(), task or None)


@dataclass(frozen=True)
class Finding:
    rule: Rule
    task: str
    why: str
    replay: str
    countdown: float | None
    source: tuple[str, int] | None  # (path, line) of the task's function

    @property
    def location(self) -> str:
        return f"{self.source[0]}:{self.source[1]}" if self.source else "?"

    def line(self) -> str:
        countdown = (
            "" if self.countdown is None else f" (published with countdown={self.countdown:g})"
        )
        return (
            f"{self.rule.id} {self.rule.name}: {self.task} ({self.location}): {self.why}; "
            f"proof: --celery-faults='{self.replay}'{countdown}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule.id,
            "name": self.rule.name,
            "task": self.task,
            "why": self.why,
            "replay": self.replay,
            "countdown": self.countdown,
            "location": self.location,
        }


@dataclass
class AuditReport:
    findings: list[Finding] = field(default_factory=list)
    #: (rule id, task, reason) of each finding a suppression removed.
    suppressed: list[tuple[str, str, str]] = field(default_factory=list)
    #: (rule id, task) of each rule that applied but whose proof did not reproduce.
    unproven: list[tuple[str, str]] = field(default_factory=list)
    tasks: int = 0

    def summary_lines(self) -> list[str]:
        lines = [finding.line() for finding in self.findings]
        lines.append(
            f"audit: {self.tasks} task(s), {len(self.findings)} finding(s), "
            f"{len(self.suppressed)} suppressed, {len(self.unproven)} not reproduced"
        )
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "findings": [finding.to_json() for finding in self.findings],
            "suppressed": [
                {"rule": rule, "task": task, "reason": reason}
                for rule, task, reason in self.suppressed
            ],
            "unproven": [{"rule": rule, "task": task} for rule, task in self.unproven],
        }

    def to_sarif(self, root: str | None = None) -> str:
        """SARIF 2.1.0, so code scanning shows each finding on its task's line."""
        rules = [
            {
                "id": rule.id,
                "name": rule.name,
                "shortDescription": {"text": rule.name.replace("-", " ")},
                "defaultConfiguration": {"level": rule.level},
            }
            for rule in RULES
        ]
        results = []
        for finding in self.findings:
            result: dict[str, Any] = {
                "ruleId": finding.rule.id,
                "level": finding.rule.level,
                "message": {
                    "text": f"{finding.task}: {finding.why}. "
                    f"Proof: --celery-faults='{finding.replay}'"
                },
            }
            if finding.source is not None:
                path, line = finding.source
                if root and path.startswith(root.rstrip("/") + "/"):
                    path = path[len(root.rstrip("/")) + 1 :]
                result["locations"] = [
                    {
                        "physicalLocation": {
                            "artifactLocation": {"uri": path},
                            "region": {"startLine": line},
                        }
                    }
                ]
            results.append(result)
        document = {
            "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
            "version": "2.1.0",
            "runs": [
                {
                    "tool": {"driver": {"name": "pytest-celery-faults", "rules": rules}},
                    "results": results,
                }
            ],
        }
        return json.dumps(document, indent=2, sort_keys=True)


def _source(task: Any) -> tuple[str, int] | None:
    run = getattr(task, "run", None)
    if run is None:
        return None
    function = inspect.unwrap(getattr(run, "__func__", run))
    try:
        path = inspect.getsourcefile(function)
        _, line = inspect.getsourcelines(function)
    except (OSError, TypeError):
        return None
    if not path:
        return None
    here = os.getcwd() + os.sep
    return (path[len(here) :] if path.startswith(here) else path), line


def _task_suppressions(task: Any) -> dict[str, str]:
    declared = getattr(task, TASK_SUPPRESS_OPTION, None) or {}
    if not isinstance(declared, Mapping):
        raise ValueError(
            f"task {task.name}: {TASK_SUPPRESS_OPTION} must be a mapping of rule id to "
            f"reason, got {declared!r}"
        )
    for rule, reason in declared.items():
        if rule not in RULE_IDS:
            raise ValueError(
                f"task {task.name}: {TASK_SUPPRESS_OPTION} names unknown rule {rule!r}"
            )
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"task {task.name}: {TASK_SUPPRESS_OPTION}[{rule!r}] needs a reason")
    return dict(declared)


def _suppressed_by(rule: Rule, task: Any, suppressions: Iterable[Suppression]) -> str | None:
    own = _task_suppressions(task).get(rule.id)
    if own is not None:
        return own
    for suppression in suppressions:
        if suppression.rule == rule.id and suppression.task in (None, task.name):
            return suppression.reason
    return None


@contextlib.contextmanager
def _quiet_workers() -> Iterator[None]:
    """The proofs fail tasks on purpose: keep the worker's error logs out of the output."""
    loggers = [logging.getLogger(name) for name in ("celery", "celery.worker", "celery.app.trace")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _proven(app: Celery, profile_name: str, task_name: str, proof: Proof) -> bool:
    """Play the proof on a fresh harness: does its outcome show the risk?"""
    with _quiet_workers(), CeleryFaults(app, profile=profile_name, check_unfired=False) as faults:
        faults.inject(proof.spec)
        options = {} if proof.countdown is None else {"countdown": proof.countdown}
        # send_task: the proof needs no arguments (it fires before the body, or only
        # counts deliveries), and the task's own argument check would refuse none.
        result = app.send_task(task_name, **options)
        faults.drain()
        return proof.shows(faults.outcome(result.id))


def audit_app(
    app: Celery,
    profile: str = "rabbitmq",
    suppressions: Iterable[Suppression] = (),
    rules: Iterable[Rule] = RULES,
) -> AuditReport:
    """Check every task ``app`` registered (not Celery's own) against ``rules``."""
    app.finalize(auto=True)
    broker = BrokerProfile.named(profile, app.conf.broker_transport_options or {})
    suppressions = list(suppressions)
    report = AuditReport()
    for name in sorted(app.tasks):
        if name.startswith("celery."):
            continue
        task = app.tasks[name]
        report.tasks += 1
        settings = effective_settings(app, task, broker)
        for rule in rules:
            why = rule.applies(settings)
            if why is None:
                continue
            reason = _suppressed_by(rule, task, suppressions)
            if reason is not None:
                report.suppressed.append((rule.id, name, reason))
                continue
            proof = rule.proof(settings)
            if not _proven(app, profile, name, proof):
                report.unproven.append((rule.id, name))
                continue
            report.findings.append(
                Finding(rule, name, why, proof.spec, proof.countdown, _source(task))
            )
    return report


def profile_of(app: Celery) -> str:
    """The broker profile the app's own broker URL names (RabbitMQ when it names none)."""
    url = str(app.conf.broker_url or "")
    scheme = url.partition("://")[0].partition("+")[0]
    if scheme in ("redis", "rediss", "sentinel"):
        return "redis"
    if scheme == "sqs":
        return "sqs"
    return "rabbitmq"
