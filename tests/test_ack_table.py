"""The ack table, pinned for each supported Celery minor release.

Every cell is decided by Celery's own ``Request`` driven through the plugin's
pool; the table below was derived independently, by reading Celery 5.7.0's
``celery/worker/request.py`` (``on_accepted``, ``on_success``, ``on_failure``,
``on_timeout``, ``on_retry``, ``_retry_worker_lost``), ``celery/app/trace.py``
and billiard 4.3's ``pool.py``, and then checked against the engine. A change
in the pool, the broker or the fault machinery that alters what Celery decides
fails here, row by row.

Celery 5.3 to 5.6 (with billiard 4.2, the pool they were released with) are
pinned as the rows that differ from 5.7, each read from that release's
``request.py`` (``OLDER``). ``retry_on_worker_lost`` and the split
``acks_on_failure`` / ``acks_on_timeout`` exist only in 5.7: before it their
parametrization is a single skipped case that says so. On a pair of releases
not pinned here (Celery 5.5 with billiard 4.3, say) the tables are skipped with
a reason; pinning it means adding its rows, not loosening these.

The Markdown table ``python -m pytest_celery_faults.ack_table`` prints is kept
per release in ``tests/ack_tables/``; ``test_the_generated_table_is_pinned``
compares the engine's output with the copy for the installed releases.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import billiard
import celery
import pytest
from celery import Celery
from celery.exceptions import Ignore, Reject
from releases import BILLIARD, CELERY

from pytest_celery_faults import CeleryFaults, Outcome
from pytest_celery_faults.ack_table import table as generated_table
from pytest_celery_faults.engine.broker import BrokerEvent

#: Celery minor release -> the billiard minor release its table was read with.
PINNED = {(5, 3): (4, 2), (5, 4): (4, 2), (5, 5): (4, 2), (5, 6): (4, 2), (5, 7): (4, 3)}
IS_PINNED = PINNED.get(CELERY) == BILLIARD
NOT_PINNED = (
    f"no ack table is pinned for Celery {celery.__version__} with billiard "
    f"{billiard.__version__}; pinned: "
    + ", ".join(f"{c[0]}.{c[1]} with {b[0]}.{b[1]}" for c, b in PINNED.items())
)
ONLY_57 = f"Celery 5.7's own options; this is Celery {celery.__version__}"
ACK_TABLES = Path(__file__).resolve().parent / "ack_tables"


def effect() -> None:
    """A tracked side effect: faults fire at its boundaries."""


# -- the table's columns ---------------------------------------------------------


@dataclass(frozen=True)
class Fate:
    """One row: what happened to the message and where the task ended up."""

    first: str  # delivery 1's settlement: acked, requeued, dropped, restored, ack_lost
    again: str  # what delivered the task id again: redelivered (same message), retry, -
    stored: str  # the state stored when delivery 1 was over (read as delivery 2 begins)
    state: str  # the final state
    deliveries: int
    executions: int
    acked: bool
    rejected: str | None
    lost: bool
    clock: float  # virtual seconds drain() moved the clock


FIRST = {"acked", "requeued", "dropped", "restored", "ack_lost"}
AGAIN = {"redelivered", "retry", "-"}
STATES = {"SUCCESS", "FAILURE", "RETRY", "PENDING"}
YES_NO = {"yes": True, "no": False}


def fate(text: str) -> Fate:
    """Read one row: ``first again stored state D E acked rejected lost clock``."""
    first, again, stored, state, d, e, acked, rejected, lost, clock = text.split()
    assert first in FIRST and again in AGAIN, text
    assert stored in STATES and state in STATES, text
    assert rejected in ("-", "requeue", "drop") and acked in YES_NO and lost in YES_NO, text
    return Fate(
        first,
        again,
        stored,
        state,
        int(d),
        int(e),
        YES_NO[acked],
        None if rejected == "-" else rejected,
        YES_NO[lost],
        float(clock),
    )


def rows(text: str) -> dict[str, Fate]:
    """Rows ``OUTCOME <fate columns>``; lines starting with ``#`` are comments."""
    found = {}
    for line in text.strip().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            outcome, _, rest = line.partition(" ")
            found[outcome] = fate(rest)
    return found


def table(text: str) -> dict[str, Fate]:
    """A full table: one row for every outcome, in order."""
    found = rows(text)
    assert list(found) == OUTCOMES, "every table lists every outcome, in order"
    return found


#: How the task ends. ``success`` .. ``ignore`` are the task body's doing; the rest are
#: fault specs injected after the first of the body's two side effects.
OUTCOMES = [
    "success",
    "exception",
    "retry",
    "reject_requeue",
    "reject_drop",
    "ignore",
    "soft_timeout@1",
    "timeout@1",
    "exit(3)@1",
    "sigkill@1",
    "sigterm@1",
    "power_loss@1",
    "ack_lost",
]

#: The exception stored with a final FAILURE, as (type, str() fullmatch). Read from
#: billiard: TimeLimitExceeded/SoftTimeLimitExceeded's __str__ prints their args; the
#: WorkerLostError texts are Request._worker_lost_info's (a child's SystemExit) and
#: Pool.mark_as_worker_lost's (a child killed by a signal; N is billiard's job number;
#: SIGTERM's handler, common._shutdown_cleanup, unwinds the child without a result and the
#: pool then reports the signal).
#: Reject has no __str__ of its own: str() shows its args (reason, requeue).
LOST = r"Worker exited prematurely: "
EXCEPTIONS = {
    "exception": ("ValueError", r"boom"),
    "reject_drop": ("Reject", r"\('never', False\)"),
    "soft_timeout@1": ("SoftTimeLimitExceeded", r"SoftTimeLimitExceeded\(\)"),
    "timeout@1": ("TimeLimitExceeded", r"TimeLimitExceeded\(30,\)"),  # the task's time_limit
    # billiard 4.2: no SystemExit reaches Celery; the child dies with exit code 3 and
    # Pool.mark_as_worker_lost reports it, naming the job.
    "exit(3)@1": (
        "WorkerLostError",
        LOST + r"exitcode 3" + (r"\." if BILLIARD >= (4, 3) else r" Job: \d+\."),
    ),
    "sigkill@1": ("WorkerLostError", LOST + r"signal 9 \(SIGKILL\) Job: \d+\."),
    "sigterm@1": ("WorkerLostError", LOST + r"signal 15 \(SIGTERM\) Job: \d+\."),
}

# -- the table -------------------------------------------------------------------
#
# Columns: delivery 1 = the first settlement of the message in the ledger (acked;
# requeued / dropped = rejected with / without requeue; restored = given back by the
# broker after the connection dropped; ack_lost = acked by Celery, never arrived).
# again = what delivered the task id a second time: the same message back
# (redelivered, with delivery_info['redelivered'] True) or a new message for the same id
# (retry). stored = the state in the backend when delivery 1 was over (read as delivery
# 2's body begins, else as delivery 2 arrives). final, D(eliveries), E(xecutions), acked,
# rejected, lost = the Outcome (lost: the broker holds no copy and the last execution was
# cut short). clock = virtual seconds drain() moved.
#
# acks_late=False. Request.on_accepted acks as soon as the pool accepts the job, before
# the body runs; Request.acknowledge() and reject() are no-ops from then on (they check
# Request.acknowledged), and on_failure's whole `if self.task.acks_late:` block is
# skipped. So reject_on_worker_lost and acks_on_failure_or_timeout change nothing: this
# block is the pin for all four of their combinations (each combination runs).
EARLY_ACK = table("""
#                 delivery 1  again        stored   final    D  E  acked  rejected  lost  clock
success           acked       -            SUCCESS  SUCCESS  1  1  yes    -         no    0
exception         acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
# trace's handle_retry stores RETRY; Task.retry publishes a new message (same id,
# retries=1, countdown 10) that succeeds.
retry             acked       retry        RETRY    SUCCESS  2  2  yes    -         no    10
# trace stores nothing for REJECTED; on_failure's reject(requeue=True) is a no-op after
# the early ack: the message is gone and the task stays PENDING.
reject_requeue    acked       -            PENDING  PENDING  1  1  yes    -         no    0
# on_failure stores FAILURE for a Reject that is not requeued (Celery #4222).
reject_drop       acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
ignore            acked       -            PENDING  PENDING  1  1  yes    -         no    0
# billiard calls on_timeout(soft=True) (a warning) and the task gets
# SoftTimeLimitExceeded: an ordinary exception, stored by trace.
soft_timeout@1    acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
# billiard's on_hard_timeout: error callback with TimeLimitExceeded (on_failure stores
# FAILURE), then on_timeout(soft=False) stores it again. The child is killed: cut short.
timeout@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
# A child's SystemExit: on_failure turns it into WorkerLostError (_worker_lost_info) and,
# the child having stored nothing, stores that FAILURE itself.
exit(3)@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
sigkill@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
sigterm@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
# The whole worker died after the early ack: nothing stored, nothing to redeliver.
power_loss@1      acked       -            PENDING  PENDING  1  1  yes    -         yes   0
# The ack sent at accept time was lost and the connection dropped: RabbitMQ gives the
# message back at once and the body runs again (no deduplication without acks_late).
ack_lost          ack_lost    redelivered  SUCCESS  SUCCESS  2  2  yes    -         no    0
""")

# acks_late=True, reject_on_worker_lost=False, acks_on_failure_or_timeout=True (Celery's
# defaults for the last two). on_failure: is_timeout=False for everything but the hard
# limit, so ack_flag = acks_on_failure = True: failures are acked.
LATE = table("""
#                 delivery 1  again        stored   final    D  E  acked  rejected  lost  clock
success           acked       -            SUCCESS  SUCCESS  1  1  yes    -         no    0
exception         acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
# on_failure -> on_retry acks; the retry is a new message.
retry             acked       retry        RETRY    SUCCESS  2  2  yes    -         no    10
# reject(requeue=True) puts the same message back; the broker redelivers it at once.
reject_requeue    requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
reject_drop       dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
# on_failure: Ignore -> acknowledge().
ignore            acked       -            PENDING  PENDING  1  1  yes    -         no    0
# SoftTimeLimitExceeded is not a TimeLimitExceeded: acks_on_failure decides, not
# acks_on_timeout.
soft_timeout@1    acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
# is_timeout: ack_flag = acks_on_timeout = True -> acknowledge().
timeout@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
# WorkerLostError without reject_on_worker_lost: acked anyway (acks_on_failure), FAILURE.
exit(3)@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
sigkill@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
sigterm@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
# No on_failure at all: the worker is gone with the message unacked; RabbitMQ restores
# it when the connection drops.
power_loss@1      restored    redelivered  PENDING  SUCCESS  2  2  yes    -         no    0
# on_success acked, the ack was lost: SUCCESS is stored and the body runs again.
ack_lost          ack_lost    redelivered  SUCCESS  SUCCESS  2  2  yes    -         no    0
""")

# acks_late=True, reject_on_worker_lost=False, acks_on_failure_or_timeout=False: a
# failure is rejected without requeue (on_failure's `else: self.reject(requeue=False)`),
# a hard time limit is requeued (`is_timeout and not ack_flag`).
LATE_NO_ACK_ON_FAILURE = table("""
#                 delivery 1  again        stored   final    D  E  acked  rejected  lost  clock
success           acked       -            SUCCESS  SUCCESS  1  1  yes    -         no    0
exception         dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
retry             acked       retry        RETRY    SUCCESS  2  2  yes    -         no    10
reject_requeue    requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
reject_drop       dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
ignore            acked       -            PENDING  PENDING  1  1  yes    -         no    0
soft_timeout@1    dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
# on_failure requeues (and, requeue being set, stores nothing), but on_timeout(soft=False)
# then stores FAILURE unconditionally: the redelivery starts with FAILURE in the backend.
timeout@1         requeued    redelivered  FAILURE  SUCCESS  2  2  yes    requeue   no    0
# rejected without requeue, and on_failure stores FAILURE (`not requeue and is_worker_lost`)
exit(3)@1         dropped     -            FAILURE  FAILURE  1  1  no     drop      yes   0
sigkill@1         dropped     -            FAILURE  FAILURE  1  1  no     drop      yes   0
sigterm@1         dropped     -            FAILURE  FAILURE  1  1  no     drop      yes   0
power_loss@1      restored    redelivered  PENDING  SUCCESS  2  2  yes    -         no    0
ack_lost          ack_lost    redelivered  SUCCESS  SUCCESS  2  2  yes    -         no    0
""")

# acks_late=True, reject_on_worker_lost=True, acks_on_failure_or_timeout=True: a lost
# worker is requeued (`reject_on_worker_lost and is_worker_lost`) and, requeue being set,
# no FAILURE is stored; everything else as LATE.
LATE_REQUEUE_LOST = table("""
#                 delivery 1  again        stored   final    D  E  acked  rejected  lost  clock
success           acked       -            SUCCESS  SUCCESS  1  1  yes    -         no    0
exception         acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
retry             acked       retry        RETRY    SUCCESS  2  2  yes    -         no    10
reject_requeue    requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
reject_drop       dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
ignore            acked       -            PENDING  PENDING  1  1  yes    -         no    0
soft_timeout@1    acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
# A hard time limit is no WorkerLostError: reject_on_worker_lost does not apply.
timeout@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
exit(3)@1         requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
sigkill@1         requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
sigterm@1         requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
power_loss@1      restored    redelivered  PENDING  SUCCESS  2  2  yes    -         no    0
ack_lost          ack_lost    redelivered  SUCCESS  SUCCESS  2  2  yes    -         no    0
""")

# acks_late=True, reject_on_worker_lost=True, acks_on_failure_or_timeout=False.
LATE_REQUEUE_LOST_NO_ACK_ON_FAILURE = table("""
#                 delivery 1  again        stored   final    D  E  acked  rejected  lost  clock
success           acked       -            SUCCESS  SUCCESS  1  1  yes    -         no    0
exception         dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
retry             acked       retry        RETRY    SUCCESS  2  2  yes    -         no    10
reject_requeue    requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
reject_drop       dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
ignore            acked       -            PENDING  PENDING  1  1  yes    -         no    0
soft_timeout@1    dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
timeout@1         requeued    redelivered  FAILURE  SUCCESS  2  2  yes    requeue   no    0
exit(3)@1         requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
sigkill@1         requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
sigterm@1         requeued    redelivered  PENDING  SUCCESS  2  2  yes    requeue   no    0
power_loss@1      restored    redelivered  PENDING  SUCCESS  2  2  yes    -         no    0
ack_lost          ack_lost    redelivered  SUCCESS  SUCCESS  2  2  yes    -         no    0
""")

Config = tuple[bool, bool, bool]  # acks_late, reject_on_worker_lost, acks_on_failure_or_timeout

TABLE: dict[Config, dict[str, Fate]] = {
    (False, False, True): EARLY_ACK,
    (False, False, False): EARLY_ACK,
    (False, True, True): EARLY_ACK,
    (False, True, False): EARLY_ACK,
    (True, False, True): LATE,
    (True, False, False): LATE_NO_ACK_ON_FAILURE,
    (True, True, True): LATE_REQUEUE_LOST,
    (True, True, False): LATE_REQUEUE_LOST_NO_ACK_ON_FAILURE,
}

# -- Celery 5.3 to 5.6 -----------------------------------------------------------
#
# The rows that differ before 5.7, applied over the tables above: (the Celery minor
# releases, the configurations (acks_late, reject_on_worker_lost,
# acks_on_failure_or_timeout) they apply to, rows). Every other row is the same in
# their request.py: with billiard 4.2 a child's sys.exit reaches on_failure as the
# pool's WorkerLostError, as a signal's does.
BEFORE_57 = {(5, 3), (5, 4), (5, 5), (5, 6)}
OLDER: list[
    tuple[set[tuple[int, int]], Callable[[tuple[bool, bool, bool]], bool], dict[str, Fate]]
] = [
    # on_failure before 5.7: `elif isinstance(exc, Reject): return self.reject(requeue=
    # exc.requeue)`, nothing stored (Celery #4222 is fixed in 5.7): the task stays PENDING.
    (
        BEFORE_57,
        lambda config: not config[0],
        rows("""
reject_drop       acked       -            PENDING  PENDING  1  1  yes    -         no    0
"""),
    ),
    (
        BEFORE_57,
        lambda config: config[0],
        rows("""
reject_drop       dropped     -            PENDING  PENDING  1  1  no     drop      no    0
"""),
    ),
    # on_failure in 5.3 and 5.4 rejects with requeue only for `reject_on_worker_lost and
    # is_worker_lost`; a hard time limit with acks_on_failure_or_timeout=False falls to
    # `else: self.reject(requeue=False)` and is stored FAILURE (5.5 added the
    # `isinstance(exc, TimeLimitExceeded) and not acks_on_failure_or_timeout` requeue).
    (
        {(5, 3), (5, 4)},
        lambda config: config[0] and not config[2],
        rows("""
timeout@1         dropped     -            FAILURE  FAILURE  1  1  no     drop      yes   0
"""),
    ),
]


def installed_table() -> dict[Config, dict[str, Fate]]:
    """The pinned table for the installed Celery: 5.7's with the older rows applied."""
    tables = {config: dict(fates) for config, fates in TABLE.items()}
    for releases, applies, changed in OLDER:
        if CELERY in releases:
            for config, fates in tables.items():
                if applies(config):
                    fates.update(changed)
    return tables


INSTALLED_TABLE = installed_table()

# -- Celery 5.7's additions ------------------------------------------------------
#
# A few rows each for the settings Celery 5.7 adds. Every task here has acks_late=True
# unless its options say otherwise; (task options, app settings, rows).
EXTRA: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Fate]]] = {
    # Split options. on_failure: `ack_flag = acks_on_timeout if is_timeout else
    # acks_on_failure`, so acks_on_failure governs exceptions, soft time limits and lost
    # workers, acks_on_timeout only the hard time limit (TimeLimitExceeded).
    "acks_on_failure=True,acks_on_timeout=False": (
        {"acks_on_failure": True, "acks_on_timeout": False},
        {},
        rows("""
exception         acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
soft_timeout@1    acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
timeout@1         requeued    redelivered  FAILURE  SUCCESS  2  2  yes    requeue   no    0
sigkill@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
"""),
    ),
    "acks_on_failure=False,acks_on_timeout=True": (
        {"acks_on_failure": False, "acks_on_timeout": True},
        {},
        rows("""
exception         dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
soft_timeout@1    dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
timeout@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
sigkill@1         dropped     -            FAILURE  FAILURE  1  1  no     drop      yes   0
"""),
    ),
    # Task.bind: a split option that is set wins over acks_on_failure_or_timeout; the one
    # left unset falls back to it.
    "acks_on_failure_or_timeout=False,acks_on_failure=True": (
        {"acks_on_failure_or_timeout": False, "acks_on_failure": True},
        {},
        rows("""
exception         acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
timeout@1         requeued    redelivered  FAILURE  SUCCESS  2  2  yes    requeue   no    0
"""),
    ),
    # The app settings behind them (Task.from_config).
    "task_acks_on_failure=False": (
        {},
        {"task_acks_on_failure": False},
        rows("""
exception         dropped     -            FAILURE  FAILURE  1  1  no     drop      no    0
timeout@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
"""),
    ),
    "task_acks_on_timeout=False": (
        {},
        {"task_acks_on_timeout": False},
        rows("""
exception         acked       -            FAILURE  FAILURE  1  1  yes    -         no    0
timeout@1         requeued    redelivered  FAILURE  SUCCESS  2  2  yes    requeue   no    0
"""),
    ),
    # retry_on_worker_lost: for a WorkerLostError while retries remain, on_failure calls
    # _retry_worker_lost: a new message for the same id (retries+1, countdown
    # default_retry_delay=180), RETRY stored, ack if acks_late. A hard time limit is no
    # WorkerLostError; a power loss calls no on_failure at all (the broker restores).
    "retry_on_worker_lost": (
        {"retry_on_worker_lost": True},
        {},
        rows("""
exit(3)@1         acked       retry        RETRY    SUCCESS  2  2  yes    -         no    180
sigkill@1         acked       retry        RETRY    SUCCESS  2  2  yes    -         no    180
sigterm@1         acked       retry        RETRY    SUCCESS  2  2  yes    -         no    180
timeout@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
power_loss@1      restored    redelivered  PENDING  SUCCESS  2  2  yes    -         no    0
"""),
    ),
    # Early ack: the message was acked at accept; the retry is still sent.
    "retry_on_worker_lost,acks_late=False": (
        {"retry_on_worker_lost": True, "acks_late": False},
        {},
        rows("""
sigkill@1         acked       retry        RETRY    SUCCESS  2  2  yes    -         no    180
"""),
    ),
    # It takes precedence over reject_on_worker_lost (on_failure returns after the retry).
    "retry_on_worker_lost,reject_on_worker_lost": (
        {"retry_on_worker_lost": True, "reject_on_worker_lost": True},
        {},
        rows("""
sigkill@1         acked       retry        RETRY    SUCCESS  2  2  yes    -         no    180
"""),
    ),
    "task_retry_on_worker_lost=True": (
        {},
        {"task_retry_on_worker_lost": True},
        rows("""
sigkill@1         acked       retry        RETRY    SUCCESS  2  2  yes    -         no    180
"""),
    ),
    # Retries exhausted (retries >= max_retries): no retry, and max_retries_exceeded also
    # switches reject_on_worker_lost off, so acks_on_failure decides.
    "retry_on_worker_lost,reject_on_worker_lost,max_retries=0": (
        {"retry_on_worker_lost": True, "reject_on_worker_lost": True, "max_retries": 0},
        {},
        rows("""
sigkill@1         acked       -            FAILURE  FAILURE  1  1  yes    -         yes   0
"""),
    ),
    "retry_on_worker_lost,reject_on_worker_lost,max_retries=0,acks_on_failure=False": (
        {
            "retry_on_worker_lost": True,
            "reject_on_worker_lost": True,
            "max_retries": 0,
            "acks_on_failure": False,
        },
        {},
        rows("""
sigkill@1         dropped     -            FAILURE  FAILURE  1  1  no     drop      yes   0
"""),
    ),
    # One retry allowed and the child killed on both deliveries: a retry, then FAILURE.
    "retry_on_worker_lost,max_retries=1": (
        {"retry_on_worker_lost": True, "max_retries": 1},
        {},
        rows("""
sigkill@1;sigkill@1  acked    retry        RETRY    FAILURE  2  2  yes    -         yes   180
"""),
    ),
}


# -- running one row -------------------------------------------------------------


def body(kind: str, task: Any) -> str:
    """The task: a side effect, then the ending ``kind`` asks for, then another."""
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


@dataclass
class Observed:
    fate: Fate
    outcome: Outcome
    seen: list[bool]  # delivery_info['redelivered'] as each execution's body saw it
    flags: list[bool]  # the broker's redelivered flag on each delivery


def run_row(app: Celery, outcome_kind: str, options: dict[str, Any]) -> Observed:
    options = {"max_retries": 3, **options}
    seen: list[bool] = []

    stored_at_second_start: list[str] = []

    def scenario(self: Any) -> str:
        if len(seen) == 1:  # delivery 1 is over: what it stored (see snapshot below)
            meta = self.backend.get_task_meta(self.request.id, cache=False)
            stored_at_second_start.append(meta["status"])
        seen.append(bool(self.request.delivery_info.get("redelivered")))
        return body(outcome_kind, self)

    task = app.task(
        bind=True,
        shared=False,
        name="table.task",
        time_limit=30,
        soft_time_limit=20,
        **options,
    )(scenario)
    is_spec = "@" in outcome_kind or outcome_kind == "ack_lost"
    stored_at_redelivery: list[str] = []
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")

        def snapshot(event: BrokerEvent) -> None:
            """The state delivery 1 left behind, read as delivery 2 arrives.

            A retry's message arrives while delivery 1 still runs (the consumer
            takes it at the publish, before the trace stores RETRY), so where
            delivery 2 runs a body, the state is read as that body begins.
            """
            if event.kind != "delivered":
                return
            delivered = [e for e in faults.ledger.for_task(event.task_id) if e.kind == event.kind]
            if len(delivered) == 2:
                meta = faults.backend.get_task_meta(event.task_id, cache=False)
                stored_at_redelivery.append(meta["status"])

        faults.ledger.observers.append(snapshot)
        outcome = faults.run(task.s(), *([outcome_kind] if is_spec else []))
        events = faults.ledger.for_task(outcome.task_id)
        elapsed = faults.clock.elapsed
    settles = [e for e in events if e.kind in ("acked", "rejected", "restored", "ack_lost")]
    first = settles[0]
    first_name = {"acked": "acked", "restored": "restored", "ack_lost": "ack_lost"}.get(
        first.kind, "requeued" if first.detail == "requeue" else "dropped"
    )
    delivered = [e for e in events if e.kind == "delivered"]
    again = "-"
    if len(delivered) > 1:
        again = "redelivered" if delivered[1].message == delivered[0].message else "retry"
    observed = Fate(
        first=first_name,
        again=again,
        stored=(stored_at_second_start or stored_at_redelivery or [outcome.state])[0],
        state=outcome.state,
        deliveries=outcome.deliveries,
        executions=outcome.executions,
        acked=outcome.acked,
        rejected=outcome.rejected,
        lost=outcome.lost,
        clock=round(elapsed, 3),  # an ETA travels as ISO text, to the microsecond
    )
    flags = [e.detail == "redelivered=True" for e in delivered]
    return Observed(observed, outcome, seen, flags)


def check(observed: Observed, expected: Fate, outcome_kind: str) -> None:
    outcome = observed.outcome
    assert observed.fate == expected, outcome.story
    # The redelivered flag reaches the task where Celery reads it, on every delivery.
    assert observed.seen == observed.flags[: len(observed.seen)], outcome.story
    assert len(observed.seen) == outcome.executions
    assert observed.flags == [False] + [expected.again == "redelivered"] * (
        expected.deliveries - 1
    )
    assert outcome.retries == (1 if expected.again == "retry" else 0)
    if outcome.state == "FAILURE":
        kind = outcome_kind.split(";")[0]
        type_name, text = EXCEPTIONS[kind]
        assert type(outcome.exception).__name__ == type_name, outcome.story
        assert re.fullmatch(text, str(outcome.exception)), str(outcome.exception)
    else:
        assert outcome.exception is None
    if outcome.state == "SUCCESS":
        assert outcome.result == "ok"


def config_id(config: Config) -> str:
    late, reject, acks = config
    return f"acks_late={late}-reject_on_worker_lost={reject}-acks_on_failure_or_timeout={acks}"


def pinned(cases: list[Any], *, only_57: bool = False) -> list[Any]:
    """The cases on a pinned pair of releases; a single skipped case saying why elsewhere."""
    reason = NOT_PINNED if not IS_PINNED else ONLY_57 if only_57 and CELERY != (5, 7) else ""
    if not reason:
        return cases
    arity = len(cases[0].values)
    skip = pytest.mark.skip(reason=reason)
    return [pytest.param(*[None] * arity, marks=skip, id="celery-version-not-pinned")]


CASES = pinned(
    [
        pytest.param(config, kind, id=f"{config_id(config)}-{kind}")
        for config in TABLE
        for kind in OUTCOMES
    ]
)


@pytest.mark.parametrize(("config", "kind"), CASES)
def test_ack_table(app: Celery, config: Config, kind: str) -> None:
    acks_late, reject_on_worker_lost, acks_on_failure_or_timeout = config
    options = {
        "acks_late": acks_late,
        "reject_on_worker_lost": reject_on_worker_lost,
        "acks_on_failure_or_timeout": acks_on_failure_or_timeout,
    }
    check(run_row(app, kind, options), INSTALLED_TABLE[config][kind], kind)


EXTRA_CASES = pinned(
    [
        pytest.param(options, settings, kind, expected, id=f"{name}-{kind}")
        for name, (options, settings, table_rows) in EXTRA.items()
        for kind, expected in table_rows.items()
    ],
    only_57=True,
)


@pytest.mark.parametrize(("options", "settings", "kind", "expected"), EXTRA_CASES)
def test_celery_57_options(
    app: Celery, options: dict[str, Any], settings: dict[str, Any], kind: str, expected: Fate
) -> None:
    app.conf.update(settings)
    check(run_row(app, kind, {"acks_late": True, **options}), expected, kind)


# -- worker_deduplicate_successful_tasks -----------------------------------------


def dedup_run(app: Celery, deduplicate: bool) -> tuple[Outcome, list[int], list[bool]]:
    app.conf.worker_deduplicate_successful_tasks = deduplicate
    seen: list[bool] = []

    @app.task(bind=True, shared=False, acks_late=True, name="table.dedup")
    def job(self: Any) -> str:
        seen.append(bool(self.request.delivery_info.get("redelivered")))
        effect()
        return "ok"

    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(job.s(), "ack_lost")
        per_delivery = [sum(e.delivery == n for e in faults.effects) for n in (1, 2)]
    return outcome, per_delivery, seen


@pytest.mark.skipif(not IS_PINNED, reason=NOT_PINNED)
@pytest.mark.parametrize(
    ("deduplicate", "bodies", "effects"), [(True, [False], [1, 0]), (False, [False, True], [1, 1])]
)
def test_deduplicate_successful_tasks_skips_the_body_of_a_redelivered_success(
    app: Celery, deduplicate: bool, bodies: list[bool], effects: list[int]
) -> None:
    # build_tracer: with acks_late and worker_deduplicate_successful_tasks (and a persistent
    # backend), trace_task sees delivery_info['redelivered'] and SUCCESS already stored for
    # the id, and returns without running the body. Without the setting the body runs again.
    outcome, per_delivery, seen = dedup_run(app, deduplicate)
    assert (outcome.deliveries, outcome.state, outcome.result) == (2, "SUCCESS", "ok")
    assert outcome.executions == len(bodies)  # a deduplicated redelivery runs no body
    assert (outcome.acked, outcome.rejected, outcome.lost) == (True, None, False)
    assert seen == bodies
    assert per_delivery == effects


# -- the generated Markdown table ------------------------------------------------


def test_generating_the_table_leaves_celerys_logging_as_it_was() -> None:
    # it silences the error logs of its scenarios; Celery's logger stayed at
    # CRITICAL after it, and a later test reading Celery's error log saw nothing
    celery_logger = logging.getLogger("celery")
    level = celery_logger.level
    celery_logger.setLevel(logging.INFO)
    try:
        generated_table()
        assert celery_logger.level == logging.INFO
    finally:
        celery_logger.setLevel(level)


@pytest.mark.skipif(not IS_PINNED, reason=NOT_PINNED)
def test_the_generated_table_is_pinned() -> None:
    pinned_copy = ACK_TABLES / (
        f"celery-{CELERY[0]}.{CELERY[1]}-billiard-{BILLIARD[0]}.{BILLIARD[1]}.md"
    )
    assert generated_table() == pinned_copy.read_text(encoding="utf-8"), (
        f"`python -m pytest_celery_faults.ack_table` differs from tests/ack_tables/"
        f"{pinned_copy.name}: a change altered what Celery decides"
    )
