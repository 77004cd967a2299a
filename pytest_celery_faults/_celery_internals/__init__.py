"""Every use of Celery's, kombu's and billiard's private API, in one package.

A new Celery release is this package to read. Everything here is named after
what it does for the plugin; the public modules never reach into Celery
themselves. One module per part of Celery the plugin stands in for, each
adapter choosing from the installed code where releases differ:

- :mod:`.billiard`: child deaths, ``WorkerLostError`` info, signals, time limits, exits;
- :mod:`.app_state`: the app taken over (broker, backend, clock, settings), the
  worker process's and child's state, fresh tracers;
- :mod:`.messages`: task messages recorded and sent again, accepted content;
- :mod:`.backends`: chord semantics, Redis chords;
- :mod:`.consumer`: the strategy's request bookkeeping, qos and prefetch, cold
  shutdown, rate limits, the Redis restore cadence;
- :mod:`.shutdown`: what SIGTERM starts in a worker (warm, or cold and soft), and
  what a lost connection does to running tasks;
- :mod:`.control`: the control panel, revoked sets, a worker's view of its state,
  the ETA timer;
- :mod:`.speedups`: caches that exist only for speed, behind
  :mod:`pytest_celery_faults.speedups`'s one switch.

Everything is re-exported here: callers write ``internals.name``.
"""

from __future__ import annotations

from billiard.einfo import ExceptionInfo
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from kombu.utils.encoding import safe_repr

from .app_state import (
    CountedConnectionPool,
    app_behind_proxy,
    fresh_tracers,
    guard_run,
    in_worker_child,
    installed_app_state,
    jitter_drawn_from,
    producer_pool_replaced,
    takeover_problems,
    worker_process_state,
)
from .backends import (
    CHORD_UNLOCK,
    chord_semantics,
    chord_unlock_waits_forever,
    redis_chords_ignore_duplicates,
)
from .billiard import (
    HARD_TIMEOUT_TERM_GRACE,
    child_death_info,
    child_gone_info,
    child_initial_handler,
    child_memory_kb,
    child_signal_disposition,
    job_error_info,
    signal_number,
    soft_time_limit_signal,
    status_after_shutdown,
    terminated_info,
    time_limit_info,
    time_limits_applied,
)
from .consumer import (
    cancel_active_requests,
    consumer_qos,
    expire_on_virtual_clock,
    forget_worker_state,
    lose_ack_on_a_virtual_transport,
    node_requests_dropped,
    prefetch_disabled,
    rate_per_second,
    redis_restore_cadence,
    refuse_undecodable,
    refuse_unregistered,
    request_class_for,
    request_reserved,
    request_scheduled,
    requests_dropped,
    revoked_at_receipt,
)
from .control import (
    EtaTimer,
    control_leaves_the_worker,
    control_message_accept,
    control_panel,
    new_revoked_set,
    revoked_held_by,
    worker_view,
)
from .messages import (
    accept_content,
    send_task_message_again,
    task_message_for,
    task_messages_recorded,
    unpickled_exception,
)
from .shutdown import (
    Shutdown,
    cancel_on_connection_loss,
    sigterm_shutdown,
    soft_shutdown_seconds,
)
from .speedups import (
    caret_anchors_cached,
    code_summaries_cached,
    default_settings_snapshot,
)

__all__ = [
    "CHORD_UNLOCK",
    "CountedConnectionPool",
    "EtaTimer",
    "ExceptionInfo",
    "HARD_TIMEOUT_TERM_GRACE",
    "Shutdown",
    "SoftTimeLimitExceeded",
    "TimeLimitExceeded",
    "WorkerLostError",
    "accept_content",
    "app_behind_proxy",
    "cancel_active_requests",
    "cancel_on_connection_loss",
    "caret_anchors_cached",
    "child_death_info",
    "child_gone_info",
    "child_initial_handler",
    "child_memory_kb",
    "child_signal_disposition",
    "chord_semantics",
    "chord_unlock_waits_forever",
    "code_summaries_cached",
    "consumer_qos",
    "control_leaves_the_worker",
    "control_message_accept",
    "control_panel",
    "default_settings_snapshot",
    "expire_on_virtual_clock",
    "forget_worker_state",
    "fresh_tracers",
    "guard_run",
    "in_worker_child",
    "installed_app_state",
    "jitter_drawn_from",
    "job_error_info",
    "lose_ack_on_a_virtual_transport",
    "new_revoked_set",
    "node_requests_dropped",
    "prefetch_disabled",
    "producer_pool_replaced",
    "rate_per_second",
    "redis_chords_ignore_duplicates",
    "redis_restore_cadence",
    "refuse_undecodable",
    "refuse_unregistered",
    "request_class_for",
    "request_reserved",
    "request_scheduled",
    "requests_dropped",
    "revoked_at_receipt",
    "revoked_held_by",
    "safe_repr",
    "send_task_message_again",
    "sigterm_shutdown",
    "signal_number",
    "soft_shutdown_seconds",
    "soft_time_limit_signal",
    "status_after_shutdown",
    "takeover_problems",
    "task_message_for",
    "task_messages_recorded",
    "terminated_info",
    "time_limit_info",
    "time_limits_applied",
    "unpickled_exception",
    "worker_process_state",
    "worker_view",
]
