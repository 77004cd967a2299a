"""The audit: every task's effective settings, checked for combinations that lose or repeat work.

A rule looks at what Celery resolved for a task (its own options over the app's)
and at the broker profile, and names a risk. A risk is reported only when its
proof runs: the audit plays the rule's fault scenario on the emulated worker and
keeps the finding when the outcome shows the loss or the repeat the rule
predicts. Each finding carries a stable rule id and the replay spec of its
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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from ..engine.broker import BrokerProfile
from ..engine.outcome import Outcome
from ..harness import CeleryFaults

#: The task option that suppresses rules on one task: ``{rule id: reason}``.
TASK_SUPPRESS_OPTION = "celery_faults_suppress"


@dataclass(frozen=True)
class Settings:
    """What Celery resolved for one task, and the broker it is consumed from."""

    task: str
    acks_late: bool
    reject_on_worker_lost: bool
    time_limit: float | None
    retry_delay: float | None  # only for a task that says it retries
    profile: BrokerProfile

    @property
    def redelivery_after(self) -> tuple[float, str] | None:
        """When the broker hands an unacked message out again, and the setting that says so."""
        if self.profile.visibility_timeout is not None:
            return self.profile.visibility_timeout, "visibility_timeout"
        if self.profile.consumer_timeout is not None:
            return self.profile.consumer_timeout, "consumer_timeout"
        return None


@dataclass(frozen=True)
class Proof:
    """A scenario that shows the risk: a fault spec, and a countdown to publish with."""

    spec: str
    shows: Callable[[Outcome], bool]
    countdown: float | None = None


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    level: str  # SARIF: "warning" or "note"
    applies: Callable[[Settings], str | None]  # why it is a risk, or None
    proof: Callable[[Settings], Proof]


def _late_without_reject(settings: Settings) -> str | None:
    if settings.acks_late and not settings.reject_on_worker_lost:
        return (
            "acks_late without reject_on_worker_lost: a child killed while it runs the task "
            "(OOM killer, a hard time limit, SIGKILL) fails it with WorkerLostError and acks "
            "it, so the task is lost; set reject_on_worker_lost=True to requeue it"
        )
    return None


def _early_ack(settings: Settings) -> str | None:
    if not settings.acks_late:
        return (
            "early ack (acks_late off): the message is acked before the task runs, so a "
            "worker that dies while it runs loses the task; set acks_late=True (with "
            "reject_on_worker_lost=True) if the task must run to completion"
        )
    return None


def _runs_beyond_redelivery(settings: Settings) -> str | None:
    if not settings.acks_late or settings.profile.visibility_timeout is None:
        return None
    timeout = settings.profile.visibility_timeout
    if settings.time_limit is None:
        limit = "no time limit"
    elif settings.time_limit > timeout:
        limit = f"a time limit of {settings.time_limit:g} s"
    else:
        return None
    return (
        f"acks_late with {limit} on a broker with a visibility timeout of {timeout:g} s: "
        f"a run longer than the timeout is delivered again while it runs, and a second "
        f"copy runs beside the first; set time_limit below the visibility timeout"
    )


def _retry_beyond_redelivery(settings: Settings) -> str | None:
    after = settings.redelivery_after
    if settings.retry_delay is None or after is None or settings.retry_delay <= after[0]:
        return None
    seconds, name = after
    what = (
        "the broker delivers it again while the worker holds it, and it runs twice"
        if name == "visibility_timeout"
        else "the broker closes the worker's channel and delivers it again"
    )
    return (
        f"a retry delay of {settings.retry_delay:g} s beyond the broker's {name} of "
        f"{seconds:g} s: a retried message waits unacked in the worker for its countdown, "
        f"and {what}"
    )


def _killed_lost(settings: Settings) -> Proof:
    return Proof(f"{settings.task}:sigkill@0", lambda outcome: outcome.lost)


def _overlapped(settings: Settings) -> Proof:
    return Proof(f"{settings.task}:overlap", lambda outcome: outcome.executions > 1)


def _held_past_redelivery(settings: Settings) -> Proof:
    after = settings.redelivery_after
    assert after is not None
    if after[1] == "visibility_timeout":
        return Proof(
            f"{settings.task}:ok",
            lambda outcome: outcome.executions > 1,
            countdown=settings.retry_delay,
        )
    return Proof(
        f"{settings.task}:ok",
        lambda outcome: outcome.deliveries > 1,
        countdown=settings.retry_delay,
    )


RULES: tuple[Rule, ...] = (
    Rule(
        "CF001",
        "acks-late-without-reject-on-worker-lost",
        "warning",
        _late_without_reject,
        _killed_lost,
    ),
    Rule("CF002", "early-ack-loses-on-crash", "note", _early_ack, _killed_lost),
    Rule(
        "CF003", "runs-beyond-visibility-timeout", "warning", _runs_beyond_redelivery, _overlapped
    ),
    Rule(
        "CF004",
        "retry-delay-beyond-redelivery",
        "warning",
        _retry_beyond_redelivery,
        _held_past_redelivery,
    ),
)
RULE_IDS = frozenset(rule.id for rule in RULES)


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


def effective_settings(app: Celery, task: Any, profile: BrokerProfile) -> Settings:
    """What Celery resolved for ``task``: its own options, else the app's."""

    def seconds(value: Any) -> float | None:
        return None if value is None else float(value)

    return Settings(
        task=task.name,
        acks_late=bool(task.acks_late),
        reject_on_worker_lost=bool(task.reject_on_worker_lost),
        time_limit=seconds(
            task.time_limit if task.time_limit is not None else app.conf.task_time_limit
        ),
        retry_delay=seconds(task.default_retry_delay) if _retries(task) else None,
        profile=profile,
    )


def _retries(task: Any) -> bool:
    """Does the task say it retries (``autoretry_for``, or a retry delay of its own)?"""
    declared = {
        name
        for klass in type(task).__mro__[:-1]
        if klass.__name__ != "Task"
        for name in vars(klass)
    }
    return bool(getattr(task, "autoretry_for", ())) or "default_retry_delay" in declared


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
