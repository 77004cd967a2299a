"""The package's words for its ideas, typed once: fault kinds, endings, verdicts.

Each vocabulary is a ``Literal`` type with a constant per word, so a
misspelt word is a type error rather than a branch that never runs; the
modules that use a word import it from here.
"""

from __future__ import annotations

from typing import Final, Literal

# -- how an execution ended, as the worker saw it ------------------------------

#: How one execution of a task ended; ``""`` while it has not.
Ending = Literal[
    "",
    "returned",
    "raised",
    "child killed",
    "exit",
    "power lost",
    "cold shutdown",
    "publish lost",
    "publish refused",
]
RETURNED: Final = "returned"
RAISED: Final = "raised"  # an exception, a retry or a reject
CHILD_KILLED: Final = "child killed"  # a fatal signal, a hard time limit
EXITED: Final = "exit"  # sys.exit, os._exit
POWER_LOST: Final = "power lost"
COLD_SHUTDOWN: Final = "cold shutdown"
#: The endings where the process running the execution went away before the task ended.
CUT_SHORT: Final[frozenset[Ending]] = frozenset({CHILD_KILLED, EXITED, POWER_LOST, COLD_SHUTDOWN})
PUBLISH_LOST: Final = "publish lost"  # the broker never queued the message (no confirm)
PUBLISH_REFUSED: Final = "publish refused"  # the broker refused it; the caller got the error
#: The endings where no execution ran: the message never reached a queue.
NEVER_QUEUED: Final[frozenset[Ending]] = frozenset({PUBLISH_LOST, PUBLISH_REFUSED})
#: The endings that lose the task when the broker holds no copy of it.
LOSING: Final[frozenset[Ending]] = CUT_SHORT | NEVER_QUEUED
#: The endings where the task ran to an end of its own.
FINISHED: Final[frozenset[Ending]] = frozenset({RETURNED, RAISED})

# -- the verdict classes -------------------------------------------------------

#: The class a judged scenario gets (see :mod:`pytest_celery_faults.verdicts.classify`).
Verdict = Literal["duplicated", "diverged", "lost", "partial", "ended_otherwise", "ok"]
DUPLICATED: Final = "duplicated"
DIVERGED: Final = "diverged"
LOST: Final = "lost"
PARTIAL: Final = "partial"
ENDED_OTHERWISE: Final = "ended_otherwise"
OK: Final = "ok"

# -- the fault kinds -----------------------------------------------------------

#: A step's kind: what happens to one delivery (see :mod:`pytest_celery_faults.grammar`).
FaultKind = Literal[
    "sigkill",
    "sigterm",
    "exit",
    "power_loss",
    "raise",
    "timeout",
    "soft_timeout",
    "warm_shutdown",
    "cold_shutdown",
    "rollout",
    "broker_restart",
    "ack_lost",
    "ok",
    "overlap",
    "publish_refused",
    "publish_twice",
    "publish_lost",
]
#: The kinds that kill the process running the task without unwinding it.
FREEZING_KINDS: Final[frozenset[FaultKind]] = frozenset(
    {"sigkill", "timeout", "power_loss", "cold_shutdown"}
)
#: The kinds a sweep tries at every boundary, unless told otherwise. A hard
#: time limit (``timeout``) is left out: Celery stores FAILURE for it by
#: design, so it would flag every task; pass it in ``hows`` to include it.
SWEEP_KINDS: Final[tuple[FaultKind, ...]] = (
    "sigkill",
    "sigterm",
    "exit",
    "power_loss",
    "cold_shutdown",
)
#: The kinds ``assert_idempotent`` and ``assert_no_loss`` try at every boundary by default.
DEFAULT_KINDS: Final[tuple[FaultKind, ...]] = ("sigkill", "exit", "power_loss")
#: The kinds the ``fault_sweep`` marker parametrizes by default: the sweep's
#: without ``cold_shutdown`` (a whole-worker stop is a test of its own).
MARKER_SWEEP_KINDS: Final[tuple[FaultKind, ...]] = ("sigkill", "sigterm", "exit", "power_loss")
#: Specs without a boundary that every default set includes.
WHOLE_MESSAGE_SPECS: Final[tuple[str, ...]] = ("redeliver", "ack_lost")

# -- the broker's ledger -------------------------------------------------------

#: What a ledger line says happened to a message at the broker.
LedgerEventKind = Literal[
    "published",
    "delivered",
    "acked",
    "rejected",
    "restored",
    "ack_lost",
    "orphaned",
    "channel_closed",
    "ack_ignored",
    "reject_ignored",
    "publish_refused",
    "publish_lost",
    "confirm_lost",
]
PUBLISHED: Final = "published"
DELIVERED: Final = "delivered"
ACKED: Final = "acked"
REJECTED: Final = "rejected"
RESTORED: Final = "restored"
ACK_LOST: Final = "ack_lost"
ORPHANED: Final = "orphaned"
CHANNEL_CLOSED: Final = "channel_closed"
#: The events that settle a delivery, one way or the other.
SETTLING: Final[frozenset[LedgerEventKind]] = frozenset({ACKED, REJECTED, RESTORED, ACK_LOST})
#: How a delivery was settled, once it was (``Delivery.settlement``); "" while it is not.
Settlement = Literal["", "ack", "reject", "restore"]

# -- side effects --------------------------------------------------------------

#: What kind of side effect a task performed: a tracked callable, an HTTP request,
#: a task it published, a database commit or statement, a Redis command, a mail.
EffectKind = Literal["call", "http", "publish", "db", "redis", "mail"]
