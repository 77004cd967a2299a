"""What the audit looks for: each rule, the settings it reads, the scenario that proves it.

A rule reads what Celery resolved for a task (:func:`effective_settings`: its
own options over the app's, and the broker profile) and names a risk, or
``None``; its proof is the fault scenario that shows the risk on the emulated
worker. :data:`RULES` is the list the audit runs; their ids are stable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery

from ..engine.broker import BrokerProfile
from ..engine.outcome import Outcome


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
