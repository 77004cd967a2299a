"""What a worker's main process does with SIGTERM, read from the installed Celery.

``celery.apps.worker`` installs the SIGTERM handler at import: a warm
shutdown, unless billiard's ``REMAP_SIGTERM`` (an environment variable
``billiard.common`` reads at its import) is ``"SIGQUIT"``, which makes it
Celery's cold shutdown; on Celery 5.5+ a cold shutdown first waits
``worker_soft_shutdown_timeout`` (``WorkController.wait_for_soft_shutdown``)
while tasks run, if any run or ``worker_enable_soft_shutdown_on_idle`` is set.
"""

from __future__ import annotations

from typing import Any, Literal

from celery import Celery

Shutdown = Literal["warm", "cold"]


def sigterm_shutdown() -> Shutdown:
    """Which shutdown SIGTERM starts in a worker's main process, as the installed Celery set it.

    Read from the handler ``celery.apps.worker`` installs for SIGTERM (a
    ``functools.partial`` of its ``_shutdown_handler`` with ``how='Warm'`` or
    ``'Cold'``); before that handler was a partial, from ``REMAP_SIGTERM``.
    """
    from celery.apps import worker as worker_app

    handler: Any = worker_app.install_worker_term_handler
    how = getattr(handler, "keywords", {}).get("how")
    if how is None:  # pragma: no cover - releases whose handler is not a partial
        from billiard import common

        how = "Cold" if common.REMAP_SIGTERM == "SIGQUIT" else "Warm"
    return "cold" if how == "Cold" else "warm"


def soft_shutdown_seconds(app: Celery, *, tasks_running: bool) -> float:
    """How long a cold shutdown waits before it cancels tasks (0: it does not wait).

    Celery 5.5+'s ``WorkController.wait_for_soft_shutdown``: it sleeps
    ``worker_soft_shutdown_timeout`` when the setting is above 0 and a request
    is active, or ``worker_enable_soft_shutdown_on_idle`` is set. Earlier
    releases have no soft shutdown.
    """
    from celery.worker.worker import WorkController

    if not hasattr(WorkController, "wait_for_soft_shutdown"):
        return 0.0
    conf = app.conf
    timeout = float(conf.get("worker_soft_shutdown_timeout") or 0.0)
    waits = tasks_running or bool(conf.get("worker_enable_soft_shutdown_on_idle"))
    return timeout if timeout > 0 and waits else 0.0


def cancel_on_connection_loss(app: Celery, pool: Any, hostname: str) -> list[str]:
    """What Celery's consumer does to running tasks when its connection is lost; their ids.

    ``Consumer.on_connection_error_after_connected`` (Celery 5.1+): with
    ``worker_cancel_long_running_tasks_on_connection_loss`` (off by default up
    to Celery 5.x) each active ``acks_late`` request not acknowledged yet is
    cancelled with Celery's own ``Request.cancel(pool)``: SIGTERM to its child,
    RETRY stored; the others run on, and a late ack they send later goes to a
    channel that is gone. Releases without the setting cancel nothing.
    """
    from celery.worker import state as worker_state

    if not app.conf.get("worker_cancel_long_running_tasks_on_connection_loss"):
        return []
    cancelled = []
    for request in tuple(worker_state.active_requests):
        if request.hostname != hostname:
            continue  # another emulated worker's: this process holds them all
        if request.task.acks_late and not request.acknowledged:
            request.cancel(pool)
            cancelled.append(str(request.id))
    return cancelled
