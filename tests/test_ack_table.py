"""The ack table, pinned for Celery 5.7.

Every row is Celery's own decision (``celery.worker.request.Request`` driven
through the plugin's pool); the table pins it so that a change in the pool,
the broker or the fault machinery that alters what Celery decides fails here.
Each non-obvious row names the Celery code path that produces it.

Columns: the first broker settlement of delivery 1, then the task's final
state, the exception type stored, deliveries, executions, and Outcome's
acked / rejected / lost.
"""

from __future__ import annotations

import itertools
from typing import Any

import celery
import pytest
from celery import Celery
from celery.exceptions import Ignore, Reject

from pytest_celery_faults import CeleryFaults

pytestmark = pytest.mark.skipif(
    celery.VERSION[:2] != (5, 7),
    reason=f"the ack table is pinned for Celery 5.7; this is {celery.__version__}",
)


def effect() -> None:
    """A tracked side effect: faults fire at its boundaries."""


def body(kind: str, task: Any) -> str:
    effect()
    redelivered = task.request.delivery_info.get("redelivered")
    if kind == "exception":
        raise ValueError("boom")
    if kind == "retry" and task.request.retries == 0:
        raise task.retry(countdown=10)
    if kind == "reject_requeue" and not redelivered:
        raise Reject("again", requeue=True)
    if kind == "reject_drop":
        raise Reject("never", requeue=False)
    if kind == "ignore":
        raise Ignore()
    effect()
    return "ok"


OK = ("SUCCESS", None, 1, 1, True, None, False)
RERUN = ("SUCCESS", None, 2, 2, True, None, False)  # delivered again and then succeeded
REQUEUED = ("SUCCESS", None, 2, 2, True, "requeue", False)
DUPLICATE = ("SUCCESS", None, 2, 2, True, None, False)
KILLED_ACKED = ("FAILURE", "WorkerLostError", 1, 1, True, None, True)
KILLED_DROPPED = ("FAILURE", "WorkerLostError", 1, 1, False, "drop", True)
RETRIED = ("SUCCESS", None, 2, 2, True, None, False)

# Early ack (acks_late=False): Request.on_accepted acks before the task runs,
# whatever happens next; reject() after that is a no-op (acknowledged is set).
EARLY: dict[str, tuple[str, tuple[Any, ...]]] = {
    "success": ("acked", OK),
    "exception": ("acked", ("FAILURE", "ValueError", 1, 1, True, None, False)),
    "retry": ("acked", RETRIED),
    # trace stores nothing for REJECTED; the requeue is a no-op: the task is gone
    "reject_requeue": ("acked", ("PENDING", None, 1, 1, True, None, False)),
    # on_failure marks a non-requeued Reject as FAILURE (Celery #4222)
    "reject_drop": ("acked", ("FAILURE", "Reject", 1, 1, True, None, False)),
    "ignore": ("acked", ("PENDING", None, 1, 1, True, None, False)),
    "soft_timeout@1": ("acked", ("FAILURE", "SoftTimeLimitExceeded", 1, 1, True, None, False)),
    "timeout@1": ("acked", ("FAILURE", "TimeLimitExceeded", 1, 1, True, None, True)),
    "exit(3)@1": ("acked", KILLED_ACKED),
    "sigkill@1": ("acked", KILLED_ACKED),
    "sigterm@1": ("acked", KILLED_ACKED),
    # early-acked, then the worker died: nothing stored, nothing redelivered
    "power_loss@1": ("acked", ("PENDING", None, 1, 1, True, None, True)),
    # the ack was lost and the connection dropped: RabbitMQ redelivers, the body runs twice
    "ack_lost": ("ack_lost", DUPLICATE),
}


def late(reject_on_worker_lost: bool, acks_on_failure: bool) -> dict[str, Any]:
    """acks_late=True: on_success acks; on_failure decides from the task's flags."""
    failed = ("acked", None) if acks_on_failure else ("rejected:drop", "drop")
    failure_acked = failed[1] is None
    table: dict[str, tuple[str, tuple[Any, ...]]] = {
        "success": ("acked", OK),
        "exception": (failed[0], ("FAILURE", "ValueError", 1, 1, failure_acked, failed[1], False)),
        "retry": ("acked", RETRIED),  # on_retry acks; the retry is a new message
        "reject_requeue": ("rejected:requeue", REQUEUED),
        "reject_drop": ("rejected:drop", ("FAILURE", "Reject", 1, 1, False, "drop", False)),
        "ignore": ("acked", ("PENDING", None, 1, 1, True, None, False)),
        "soft_timeout@1": (
            failed[0],
            ("FAILURE", "SoftTimeLimitExceeded", 1, 1, failure_acked, failed[1], False),
        ),
        # is_timeout: ack when acks_on_timeout, else reject(requeue=True)
        "timeout@1": (
            ("acked", ("FAILURE", "TimeLimitExceeded", 1, 1, True, None, True))
            if acks_on_failure
            else ("rejected:requeue", REQUEUED)
        ),
        # the connection dropped with the message unacked: restored, redelivered
        "power_loss@1": ("restored", RERUN),
        "ack_lost": ("ack_lost", DUPLICATE),
    }
    for death in ("exit(3)@1", "sigkill@1", "sigterm@1"):
        if reject_on_worker_lost:
            table[death] = ("rejected:requeue", REQUEUED)
        elif acks_on_failure:
            table[death] = ("acked", KILLED_ACKED)
        else:
            table[death] = ("rejected:drop", KILLED_DROPPED)
    return table


CONFIGS = list(itertools.product([False, True], [False, True], [True, False]))


def expected(acks_late: bool, reject_on_worker_lost: bool, acks_on_failure: bool) -> Any:
    return EARLY if not acks_late else late(reject_on_worker_lost, acks_on_failure)


CASES = [
    pytest.param(
        config,
        kind,
        id=f"acks_late={config[0]}-reject_on_worker_lost={config[1]}-"
        f"acks_on_failure_or_timeout={config[2]}-{kind}",
    )
    for config in CONFIGS
    for kind in EARLY
]


def make_task(app: Celery, kind: str, **options: Any) -> Any:
    def scenario(self: Any) -> str:
        return body(kind, self)

    return app.task(
        bind=True,
        shared=False,
        name=f"table.{kind}",
        max_retries=3,
        time_limit=30,
        soft_time_limit=20,
        **options,
    )(scenario)


def settle_and_fate(faults: CeleryFaults, task: Any, kind: str) -> tuple[str, tuple[Any, ...]]:
    spec = [kind] if "@" in kind or kind == "ack_lost" else []
    outcome = faults.run(task.s(), *spec)
    settlements = [
        event.kind + (f":{event.detail}" if event.kind == "rejected" else "")
        for event in faults.ledger.for_task(outcome.task_id)
        if event.kind in ("acked", "rejected", "restored", "ack_lost")
    ]
    exception = type(outcome.exception).__name__ if outcome.exception is not None else None
    fate = (
        outcome.state,
        exception,
        outcome.deliveries,
        outcome.executions,
        outcome.acked,
        outcome.rejected,
        outcome.lost,
    )
    return settlements[0], fate


@pytest.mark.parametrize(("config", "kind"), CASES)
def test_ack_table(app: Celery, config: tuple[bool, bool, bool], kind: str) -> None:
    acks_late, reject_on_worker_lost, acks_on_failure = config
    task = make_task(
        app,
        kind,
        acks_late=acks_late,
        reject_on_worker_lost=reject_on_worker_lost,
        acks_on_failure_or_timeout=acks_on_failure,
    )
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        assert settle_and_fate(faults, task, kind) == expected(*config)[kind]


@pytest.mark.parametrize("acks_late", [False, True])
def test_retry_on_worker_lost_retries_instead_of_failing(app: Celery, acks_late: bool) -> None:
    # Request._retry_worker_lost: a new message with retries+1, RETRY stored, ack if acks_late
    task = make_task(app, "success", acks_late=acks_late, retry_on_worker_lost=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(), "sigkill@1")
        assert faults.clock.elapsed == pytest.approx(task.default_retry_delay, abs=1)
    assert (outcome.state, outcome.retries, outcome.executions, outcome.lost) == (
        "SUCCESS",
        1,
        2,
        False,
    )


def test_retry_on_worker_lost_gives_up_after_max_retries(app: Celery) -> None:
    task = make_task(
        app, "success", acks_late=True, retry_on_worker_lost=True, reject_on_worker_lost=True
    )
    task.max_retries = 0
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(), "sigkill@1")
    # max_retries exceeded: falls through, and reject_on_worker_lost no longer requeues
    assert (outcome.state, outcome.retries) == ("FAILURE", 0)
    assert type(outcome.exception).__name__ == "WorkerLostError"


@pytest.mark.parametrize(
    ("acks_on_failure", "acks_on_timeout", "exception_fate", "timeout_fate"),
    [
        (True, False, "acked", "rejected:requeue"),
        (False, True, "rejected:drop", "acked"),
    ],
)
def test_split_acks_on_failure_and_on_timeout(
    app: Celery,
    acks_on_failure: bool,
    acks_on_timeout: bool,
    exception_fate: str,
    timeout_fate: str,
) -> None:
    options = {
        "acks_late": True,
        "acks_on_failure": acks_on_failure,
        "acks_on_timeout": acks_on_timeout,
    }
    failing = make_task(app, "exception", **options)
    timing_out = make_task(app, "success", **options)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        assert settle_and_fate(faults, failing, "exception")[0] == exception_fate
        assert settle_and_fate(faults, timing_out, "timeout@1")[0] == timeout_fate


def test_deduplicate_successful_tasks_skips_the_body_of_a_redelivered_success(
    app: Celery,
) -> None:
    app.conf.worker_deduplicate_successful_tasks = True
    task = make_task(app, "success", acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(), "ack_lost")
        bodies = [effect for effect in faults.effects if effect.index == 1]
    # delivered twice (the ack was lost), but the second delivery is recognised
    # as already successful (redelivered=True, SUCCESS in the backend)
    assert (outcome.deliveries, outcome.state) == (2, "SUCCESS")
    assert len(bodies) == 1
