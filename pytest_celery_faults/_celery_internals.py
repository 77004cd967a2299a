"""Every use of Celery's, kombu's and billiard's private API, in one place.

A new Celery release is this file to read. Everything here is named after what
it does for the plugin; the public modules never reach into Celery themselves.
"""

from __future__ import annotations

import contextlib
import signal
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import billiard.einfo
from billiard.common import human_status
from billiard.einfo import ExceptionInfo
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery import Celery
from celery._state import _set_current_app, get_current_app
from celery.app.trace import trace_task_ret
from celery.utils.serialization import get_pickled_exception
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls
from kombu.utils.encoding import safe_repr

__all__ = [
    "ExceptionInfo",
    "SoftTimeLimitExceeded",
    "TimeLimitExceeded",
    "WorkerLostError",
    "billiard_reports_exit_as",
    "cancel_active_requests",
    "child_death_info",
    "code_summaries_cached",
    "current_app_set_to",
    "forget_worker_state",
    "installed_app_state",
    "request_class_for",
    "safe_repr",
    "time_limit_info",
    "unpickled_exception",
]

#: The body that Celery's ``Request.execute_using_pool`` hands to the pool.
TRACE_TARGET = trace_task_ret


def _worker_lost_info(exitcode: int, job: int) -> ExceptionInfo:
    """What billiard's ``Pool.mark_as_worker_lost`` reports for a job whose child is gone."""
    try:
        raise WorkerLostError(f"Worker exited prematurely: {human_status(exitcode)} Job: {job}.")
    except WorkerLostError:
        return ExceptionInfo()


def child_death_info(signum: int, job: int) -> ExceptionInfo:
    """What billiard's pool reports for a child killed by ``signum``."""
    return _worker_lost_info(-signum, job)


def _exit_reported_as_itself(info: ExceptionInfo, job: int) -> ExceptionInfo:
    """billiard 4.3: the workloop catches the job's own ``SystemExit``, sends it as the
    job's result, then re-raises it to leave (``exit_exc`` in ``Worker.workloop``)."""
    return info


def _exit_reported_as_worker_lost(info: ExceptionInfo, job: int) -> ExceptionInfo:
    """billiard 4.2: the workloop catches only ``Exception``; the ``SystemExit`` ends the
    child with its code (``Worker.__call__``'s ``exit`` hook, then ``os._exit``) and no
    result, and the pool finds the job's process gone: ``mark_as_worker_lost``."""
    code = info.exception.exc.code  # ExceptionInfo.exception is an ExceptionWithTraceback
    exitcode = 0 if code is None else code if isinstance(code, int) else 1
    return _worker_lost_info(exitcode & 0xFF, job)


def _workloop_reports_exit() -> bool:
    from billiard.pool import Worker

    return "exit_exc" in Worker.workloop.__code__.co_varnames


#: What the pool hands Celery for a child whose task called ``sys.exit``, given the
#: ``ExceptionInfo`` of that ``SystemExit`` and the job number; read from the
#: installed billiard's ``Worker.workloop``.
billiard_reports_exit_as: Callable[[ExceptionInfo, int], ExceptionInfo] = (
    _exit_reported_as_itself if _workloop_reports_exit() else _exit_reported_as_worker_lost
)


def time_limit_info(timeout: float | None) -> ExceptionInfo:
    """What billiard's ``TimeoutHandler.on_hard_timeout`` hands to the error callback."""
    try:
        raise TimeLimitExceeded(timeout)
    except TimeLimitExceeded:
        return ExceptionInfo()


def current_exception_info() -> ExceptionInfo:
    """billiard's ``ExceptionInfo`` of the exception being handled (as the child builds it)."""
    return ExceptionInfo()


#: billiard's picklable stand-in for a code object, one per code object while cached.
_code_summaries: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_cache_users = 0


def _cached_code_summary(code: Any) -> Any:
    summary = _code_summaries.get(code)
    if summary is None:
        summary = _code_summaries[code] = billiard.einfo._Code(code)
    return summary


@contextlib.contextmanager
def code_summaries_cached() -> Iterator[None]:
    """Build billiard's ``_Code`` summary of each code object once, not per traceback.

    Every ``ExceptionInfo`` (a task that raises, a child that dies) copies each
    frame's code object, listing all of its ``co_positions()``: for Celery's
    ``trace_task`` that is most of the cost of a failure. The summary depends on
    the code object alone, so sharing it changes no traceback text.
    """
    global _cache_users
    frame_class = billiard.einfo._Frame
    if getattr(frame_class, "Code", None) is not billiard.einfo._Code and _cache_users == 0:
        yield  # another billiard, or someone else's hook: leave it alone
        return
    _cache_users += 1
    frame_class.Code = staticmethod(_cached_code_summary)
    try:
        yield
    finally:
        _cache_users -= 1
        if _cache_users == 0:
            frame_class.Code = billiard.einfo._Code
            _code_summaries.clear()


def unpickled_exception(exc: BaseException) -> BaseException:
    return get_pickled_exception(exc)  # type: ignore[no-any-return]


def request_class_for(task: Any, pool: Any, hostname: str, app: Celery) -> type[Any]:
    """The ``Request`` class Celery's default strategy builds for ``task``."""
    from celery.utils.imports import symbol_by_name

    base = symbol_by_name(task.Request)
    return create_request_cls(base, task, pool, hostname, None, app=app)  # type: ignore[no-any-return]


@contextlib.contextmanager
def current_app_set_to(app: Celery) -> Iterator[None]:
    """Make ``app`` Celery's current app, as it is in a worker child, then restore."""
    previous = get_current_app()
    if previous is app:
        yield
        return
    _set_current_app(app)
    try:
        yield
    finally:
        _set_current_app(previous)


#: The worker-global sets of request objects the installed Celery keeps
#: (``scheduled_requests`` is Celery 5.7's).
_REQUEST_SETS = tuple(
    name
    for name in ("reserved_requests", "active_requests", "scheduled_requests")
    if hasattr(worker_state, name)
)


def forget_worker_state(request_ids: Iterable[str]) -> None:
    """Drop what Celery's worker-global bookkeeping still holds of these requests.

    ``celery.worker.state`` is process-global; a request cut off by a fault
    never reaches ``task_ready``, so it would stay there and leak into the next
    test.
    """
    ids = set(request_ids)
    if not ids:
        return
    for task_id in ids:
        worker_state.requests.pop(task_id, None)
        with contextlib.suppress(KeyError):
            worker_state.successful_requests.discard(task_id)
        with contextlib.suppress(KeyError):
            worker_state.revoked.discard(task_id)
    for name in _REQUEST_SETS:
        bucket = getattr(worker_state, name)
        for request in list(bucket):
            if request.id in ids:
                bucket.discard(request)


#: ``app.amqp`` cached properties that hold a broker connection or settings.
_AMQP_CACHES = ("_event_dispatcher", "send_task_message")


class installed_app_state:  # noqa: N801 - used as a context manager, reads as one
    """Point ``app`` at a broker, a result backend and a clock; undo all of it on exit.

    Celery caches its broker connection pool, its producer pool and its result
    backend on the app; they are swapped here and the originals put back.
    """

    def __init__(
        self,
        app: Celery,
        *,
        broker_url: str,
        backend: Any,
        connection_factory: Callable[[], Any],
        now: Callable[[], Any],
        conf: dict[str, Any],
    ) -> None:
        self.app = app
        self.broker_url = broker_url
        self.backend = backend
        self.connection_factory = connection_factory
        self.now = now
        self.conf = conf
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> installed_app_state:
        app = self.app
        conf = app.conf
        amqp = app.amqp
        missing = object()
        cached = app.amqp.__dict__
        self._saved = {
            # Built on first publish from the broker URL and settings of that day.
            "amqp_cache": {key: cached.pop(key) for key in _AMQP_CACHES if key in cached},
            "conf": {key: conf.changes.get(key, missing) for key in (*self.conf, "broker_url")},
            "pool": app._pool,
            "producer_pool": amqp._producer_pool,
            "backend_cache": app._backend_cache,
            "local_backend": getattr(app._local, "backend", missing),
            "now": app.__dict__.get("now", missing),
            "missing": missing,
        }
        conf.update(self.conf, broker_url=self.broker_url)
        connection = self.connection_factory()
        limit = conf.broker_pool_limit or 10
        app._pool = connection.Pool(limit)
        from kombu.pools import ProducerPool

        amqp._producer_pool = ProducerPool(app._pool, limit=limit)
        app._backend_cache = None
        app._local.backend = self.backend
        if self.backend.thread_safe:
            app._backend_cache = self.backend
        app.now = self.now
        return self

    def __exit__(self, *exc_info: object) -> None:
        app = self.app
        saved = self._saved
        missing = saved["missing"]
        cached = app.amqp.__dict__
        for key in _AMQP_CACHES:
            cached.pop(key, None)
        cached.update(saved["amqp_cache"])
        with contextlib.suppress(Exception):
            app.amqp._producer_pool.force_close_all()
        with contextlib.suppress(Exception):
            app._pool.force_close_all()
        app._pool = saved["pool"]
        app.amqp._producer_pool = saved["producer_pool"]
        app._backend_cache = saved["backend_cache"]
        if saved["local_backend"] is missing:
            app._local.__dict__.pop("backend", None)
        else:
            app._local.backend = saved["local_backend"]
        if saved["now"] is missing:
            app.__dict__.pop("now", None)
        else:
            app.now = saved["now"]
        changes = app.conf.changes
        for key, value in saved["conf"].items():
            if value is missing:
                changes.pop(key, None)
            else:
                changes[key] = value


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def accept_content(app: Celery) -> set[str]:
    """The content types a worker of ``app`` accepts (what its consumer sets on messages)."""
    from kombu.serialization import prepare_accept_content

    return prepare_accept_content(app.conf.accept_content)  # type: ignore[no-any-return]


def expire_on_virtual_clock(request: Any, now: float) -> bool:
    """Revoke ``request`` the way Celery does when its ``expires`` has passed at ``now``.

    Celery compares ``expires`` with the wall clock; the harness's time is the
    virtual clock's, so the comparison is made here and Celery's own
    ``Request.revoked()`` announces it (state REVOKED, message acked).
    """
    expires = request.expires
    if expires is None or expires.timestamp() > now:
        return False
    worker_state.revoked.add(request.id)
    return bool(request.revoked())


@contextlib.contextmanager
def fresh_tracers(app: Celery) -> Iterator[None]:
    """Celery caches a tracer on each task, built with the backend and settings of its day.

    Drop them for the harness (so tracers see the harness's backend and
    ``worker_deduplicate_successful_tasks`` as configured now), and put the old
    ones back after.
    """
    saved = {name: task.__trace__ for name, task in app.tasks.items()}
    for task in app.tasks.values():
        task.__trace__ = None
    try:
        yield
    finally:
        for name, task in app.tasks.items():
            task.__trace__ = saved.get(name)


def _consumer_cancels(method: Callable[[Any], None]) -> Callable[[Any], None]:
    def cancel(pool: Any) -> None:
        from types import SimpleNamespace

        method(SimpleNamespace(pool=pool))

    cancel.__doc__ = f"Celery's own ``Consumer.{method.__name__}``: it picks the requests."
    return cancel


def _pool_terminated_only(pool: Any) -> None:
    """Celery 5.3 and 5.4: a cold shutdown is ``WorkController.terminate()``.

    ``state.should_terminate`` makes the consumer raise ``WorkerTerminate``; the
    blueprint stops with ``terminate=True`` and the pool kills its children with
    its result handler already stopped. The consumer has no step that cancels
    requests, so no ``Request`` method runs for the running task: it is neither
    acked nor rejected nor stored; the broker settles its message when the
    connection closes.
    """


def _cold_shutdown_cancel() -> Callable[[Any], None]:
    from celery.worker.consumer.consumer import Consumer

    for name in ("cancel_active_requests", "cancel_all_unacked_requests"):  # 5.6+, 5.5
        method = getattr(Consumer, name, None)
        if method is not None:
            return _consumer_cancels(method)
    return _pool_terminated_only


#: What a worker's consumer does to its running tasks on a cold shutdown, with the
#: pool running them: Celery 5.6's ``cancel_active_requests`` (5.5's
#: ``cancel_all_unacked_requests``) decides which requests to cancel and whether to
#: store RETRY; Celery 5.3 and 5.4 cancel none.
cancel_active_requests: Callable[[Any], None] = _cold_shutdown_cancel()
