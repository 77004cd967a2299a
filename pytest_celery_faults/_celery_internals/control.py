"""Remote control: Celery's own ``Panel`` handlers behind each emulated worker.

Each emulated worker keeps its own revoked set and sees its own requests while
a handler runs, as a worker process would; the module globals Celery reads
(``state.revoked``, and ``request.revoked_tasks`` in Celery 5.3 to 5.7) point
at the acting worker's for that time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery
from celery.worker import request as _request_module
from celery.worker import state as worker_state
from celery.worker.pidbox import Pidbox

from .consumer import _request_buckets

#: ``celery.worker.request`` reads the revoked ids through its module global
#: ``revoked_tasks`` (bound to ``state.revoked`` at import, read at call time, Celery
#: 5.3-5.7); the control handlers through ``celery.worker.state.revoked``.
_REQUEST_READS_REVOKED = hasattr(_request_module, "revoked_tasks")


def new_revoked_set() -> Any:
    """An empty revoked set as a worker process starts with (``celery.worker.state.revoked``)."""
    from celery.utils.collections import LimitedSet

    return LimitedSet(maxlen=worker_state.REVOKES_MAX, expires=worker_state.REVOKE_EXPIRES)


class revoked_held_by:  # noqa: N801 - a context manager, entered on every delivery
    """While it is entered, Celery's worker code reads and writes ``revoked``.

    Each worker process has its revoked ids in its own memory; the emulated
    workers share one process, so the module globals Celery reads point at the
    acting worker's set while it acts, and back after. Re-entrant.
    """

    __slots__ = ("revoked", "previous", "previous_in_request")

    def __init__(self, revoked: Any) -> None:
        self.revoked = revoked

    def __enter__(self) -> None:
        self.previous = worker_state.revoked
        worker_state.revoked = self.revoked
        if _REQUEST_READS_REVOKED:
            self.previous_in_request = _request_module.revoked_tasks
            _request_module.revoked_tasks = self.revoked

    def __exit__(self, *exc_info: object) -> None:
        worker_state.revoked = self.previous
        if _REQUEST_READS_REVOKED:
            _request_module.revoked_tasks = self.previous_in_request


class worker_view:  # noqa: N801 - a context manager
    """``celery.worker.state`` as the worker ``hostname`` sees it: its requests, its revoked ids.

    A control handler runs in one worker process and sees that process's
    requests only; the other emulated workers' requests are set aside while
    it runs, and put back (those still held) after.
    """

    __slots__ = ("hostname", "revoked", "hidden", "hidden_ids")

    def __init__(self, hostname: str, revoked: Any) -> None:
        self.hostname = hostname
        self.revoked = revoked_held_by(revoked)

    def __enter__(self) -> None:
        self.revoked.__enter__()
        self.hidden: list[tuple[Any, list[Any]]] = []
        for bucket in _request_buckets():
            others = [r for r in bucket if getattr(r, "hostname", None) != self.hostname]
            for request in others:
                bucket.discard(request)
            self.hidden.append((bucket, others))
        requests = worker_state.requests
        self.hidden_ids = {
            task_id: request
            for task_id, request in requests.items()
            if getattr(request, "hostname", None) != self.hostname
        }
        for task_id in self.hidden_ids:
            del requests[task_id]

    def __exit__(self, *exc_info: object) -> None:
        for bucket, others in self.hidden:
            for request in others:
                bucket.add(request)
        for task_id, request in self.hidden_ids.items():
            worker_state.requests.setdefault(task_id, request)
        self.revoked.__exit__()


class _Entry:
    __slots__ = ("args",)

    def __init__(self, request: Any) -> None:
        self.args = (request,)


class _Waiting:
    """One item of ``kombu.asynchronous.timer.Timer.schedule.queue``, as the handlers read it."""

    __slots__ = ("eta", "priority", "entry")

    def __init__(self, eta: float, request: Any) -> None:
        self.eta = eta
        self.priority = 6  # the strategy's call_at(eta, apply_eta_task, (req,), priority=6)
        self.entry = _Entry(request)


class _Schedule:
    def __init__(self, held: Callable[[], Iterable[tuple[float, Any]]]) -> None:
        self._held = held

    @property
    def queue(self) -> list[_Waiting]:
        return [_Waiting(eta, request) for eta, request in self._held()]


class EtaTimer:
    """The consumer's timer as the ``scheduled`` handler reads it: ETA requests held."""

    def __init__(self, held: Callable[[], Iterable[tuple[float, Any]]]) -> None:
        self.schedule = _Schedule(held)


def control_panel(consumer: Any, channel: Any) -> Any:
    """Celery's worker mailbox (``celery.worker.pidbox.Pidbox``) for an emulated consumer.

    Its node dispatches to ``celery.worker.control.Panel``'s handlers with the
    state Celery builds; replies go out on ``channel``.
    """
    pidbox = Pidbox(consumer)
    pidbox.node.channel = channel
    return pidbox


def control_message_accept(app: Celery) -> set[str]:
    """The content types the worker's mailbox accepts (``app.control.mailbox.accept``)."""
    from kombu.serialization import prepare_accept_content

    return prepare_accept_content(app.control.mailbox.accept)  # type: ignore[no-any-return]


def control_leaves_the_worker(exc: BaseException) -> bool:
    """Whether a control handler asked the worker to shut down (``shutdown``)."""
    from celery.exceptions import WorkerShutdown, WorkerTerminate

    return isinstance(exc, WorkerShutdown | WorkerTerminate)
