"""One real scenario's plan: which fault applies to which delivery, and what reaches the worker.

The runner writes it as JSON; the worker's parent (acks) and its pool children
(everything else) read it. Step specs are bound either to a task id (the
signature ``run()`` was given) or, by task name, to the first message of that
name the worker receives, exactly as the emulation binds them; the binding is
written to the scenario's record file so a replaced child keeps it.

What cannot happen on a real worker is refused here, before anything runs, by
:func:`refusal`: one line, never a disagreement.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from ..grammar import FaultSpec, Step, parse_spec

PLAN_ENV = "CELERY_FAULTS_PLAN"
#: kombu's Redis transport restores unacked messages in sweeps, about every 100 s
#: by default; a real run sweeps every second, and an emulation compared with it
#: must be given the same cadence.
RESTORE_SWEEP_EVERY_SECOND = {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
#: The longest time limit a ``timeout``/``soft_timeout`` step may wait for on a real worker.
LONGEST_TIME_LIMIT = 60.0

#: Task options that decide acks, limits and results: they reach the worker as the test left them.
TASK_SETTINGS = (
    "acks_late",
    "reject_on_worker_lost",
    "acks_on_failure_or_timeout",
    "time_limit",
    "soft_time_limit",
    "ignore_result",
    "max_retries",
    "default_retry_delay",
    "track_started",
    "serializer",
)
#: App settings of the same kind (the worker's own transport settings are the runner's).
APP_SETTINGS = (
    "task_acks_late",
    "task_reject_on_worker_lost",
    "task_acks_on_failure_or_timeout",
    "task_time_limit",
    "task_soft_time_limit",
    "task_ignore_result",
    "task_serializer",
    "result_serializer",
    "accept_content",
    "result_accept_content",
    "task_track_started",
    "task_default_retry_delay",
    "task_create_missing_queues",
    "worker_prefetch_multiplier",
    "task_publish_retry",
    "result_extended",
)


#: Fault kinds real-broker mode does not inject, and why (measured on Celery 5.7.0).
NOT_ON_A_REAL_WORKER = {
    "cold_shutdown": (
        "a real worker's cold shutdown (SIGQUIT to its main process) did not reliably cut "
        "off the running task (it hung for the whole run in measurements on Celery 5.7 and "
        "RabbitMQ), so real-broker mode does not inject it; the emulation alone covers it"
    ),
    "rollout": (
        "a rollout needs a second real worker started as the first stops and a SIGKILL of "
        "the first on the virtual clock's grace; real-broker mode runs one worker and does "
        "not inject it; the emulation alone covers it"
    ),
    "broker_restart": (
        "restarting the real broker under a real worker at a chosen side effect would stop "
        "it for every other test sharing it; real-broker mode does not inject it; the "
        "emulation alone covers it"
    ),
    "overlap": (
        "a real worker cannot be made to take a second copy of a message while the first "
        "runs, nor to interleave the two at chosen side effects; the emulation alone covers it"
    ),
    **dict.fromkeys(
        ("publish_refused", "publish_twice", "publish_lost"),
        "a real broker cannot be told to refuse, double or drop one chosen publish, and "
        "real-broker mode leaves the app's connections to it alone; the emulation alone "
        "covers publisher faults (through kombu's own retry path)",
    ),
}


class RealModeRefused(ValueError):
    """Something a test asked for cannot happen on a real worker (one line)."""


@dataclass(frozen=True)
class PlannedSpec:
    """One spec of the scenario, bound to a task id or waiting for a task name."""

    spec: str
    task_id: str | None = None

    @property
    def parsed(self) -> FaultSpec:
        return parse_spec(self.spec)


@dataclass
class Plan:
    """Everything the worker needs to know about the scenario now running."""

    record: str
    specs: list[PlannedSpec] = field(default_factory=list)
    track: list[str] = field(default_factory=list)

    def write(self, path: str) -> None:
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(asdict(self), handle)
        os.replace(temporary, path)  # a reader never sees half a plan

    @classmethod
    def read(cls, path: str) -> Plan:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        specs = [PlannedSpec(**item) for item in data.get("specs", [])]
        return cls(record=data["record"], specs=specs, track=list(data.get("track", [])))


def read_records(path: str) -> list[dict[str, Any]]:
    """The JSON lines of a record file (an unfinished last line is skipped)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        if line.endswith("\n"):
            records.append(json.loads(line))
    return records


def append_record(path: str, **fields: Any) -> None:
    fields["at"] = round(time.time(), 3)
    line = json.dumps(fields, sort_keys=True, default=repr) + "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line)  # one write of one line: appends from processes do not interleave


class Bindings:
    """Which planned step spec belongs to which task id, shared through the record file."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def steps_for(self, task_id: str, task_name: str, delivery: int) -> Step | None:
        """The step for ``delivery`` of ``task_id`` (binding waiting specs to it first)."""
        records = read_records(self.plan.record)
        bound = {r["spec_index"]: r["task_id"] for r in records if r.get("event") == "bound"}
        for index, planned in enumerate(self.plan.specs):
            parsed = planned.parsed
            if parsed.redeliver:
                continue
            owner = planned.task_id or bound.get(index)
            if owner is None and parsed.matches(task_name) and task_id not in bound.values():
                append_record(self.plan.record, event="bound", spec_index=index, task_id=task_id)
                bound[index] = owner = task_id
            if owner == task_id:
                step = parsed.step_for(delivery)
                if step is not None and step.kind != "ok":
                    return step
        return None

    def redeliveries_for(self, task_name: str) -> int:
        return max(
            (
                planned.parsed.redeliver
                for planned in self.plan.specs
                if planned.parsed.redeliver and planned.parsed.matches(task_name)
            ),
            default=0,
        )


def task_settings(app: Any) -> dict[str, Any]:
    """The app's and its tasks' settings as they are now (after the test's changes)."""
    conf = {key: app.conf.get(key) for key in APP_SETTINGS}
    tasks = {
        name: {option: getattr(task, option, None) for option in TASK_SETTINGS}
        for name, task in sorted(app.tasks.items())
        if not name.startswith("celery.")
    }
    settings = {"conf": conf, "tasks": tasks}
    try:
        return json.loads(json.dumps(settings))  # type: ignore[no-any-return]
    except TypeError as exc:
        raise RealModeRefused(
            f"real-broker mode passes the app's settings to the worker as JSON: {exc}"
        ) from None


def refusal(app: Any, signature: Any, specs: list[str]) -> str | None:
    """Why this run cannot be reproduced on a real worker, as one line; ``None`` if it can."""
    names = set(_task_names(signature))
    for text in specs:
        parsed = parse_spec(text)
        targets = [parsed.task] if parsed.task else sorted(names)
        for step in parsed.steps:
            if step.kind in NOT_ON_A_REAL_WORKER:
                return f"{text}: {NOT_ON_A_REAL_WORKER[step.kind]}"
            late = [name for name in targets if _acks_late(app, app.tasks.get(name))]
            if step.kind == "warm_shutdown" and late:
                return (
                    f"{text}: whether {late[0]}'s late ack gets out during a real warm "
                    "shutdown is a race (measured both ways on Celery 5.7), so a real worker "
                    "cannot check the emulation there"
                )
            if step.kind not in ("timeout", "soft_timeout"):
                continue
            for name in targets:
                task = app.tasks.get(name)
                limit = _limit(app, task, hard=step.kind == "timeout")
                what = "time_limit" if step.kind == "timeout" else "soft_time_limit"
                if limit is None:
                    return (
                        f"{text}: a real worker only times a task out under its {what}, "
                        f"and {name} has none (set {what}= on the task or task_{what})"
                    )
                if limit > LONGEST_TIME_LIMIT:
                    return (
                        f"{text}: {name}'s {what} is {limit:g}s; a real run waits at most "
                        f"{LONGEST_TIME_LIMIT:g}s for it"
                    )
    return None


def _acks_late(app: Any, task: Any) -> bool:
    own = getattr(task, "acks_late", None)
    return bool(own if own is not None else app.conf.get("task_acks_late"))


def _limit(app: Any, task: Any, *, hard: bool) -> float | None:
    own = getattr(task, "time_limit" if hard else "soft_time_limit", None)
    value = (
        own
        if own is not None
        else app.conf.get("task_time_limit" if hard else "task_soft_time_limit")
    )
    return float(value) if value else None


def leaves(signature: Any) -> list[Any]:
    """The plain signatures a canvas holds, in order (a plain signature: itself)."""
    found: list[Any] = []
    tasks = getattr(signature, "tasks", None) or ()
    if isinstance(tasks, dict):  # a frozen chord's header is a group
        tasks = [tasks]
    for task in tasks:
        found += leaves(task)
    body = getattr(signature, "body", None)
    if body is not None:
        found += leaves(body)
    return found or [signature]


def _task_names(signature: Any) -> list[str]:
    return [str(leaf["task"]) for leaf in leaves(signature) if leaf.get("task")]
