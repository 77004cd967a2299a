"""Every use of Celery's, kombu's and billiard's private API, in one place.

A new Celery release is this file to read. Everything here is named after what
it does for the plugin; the public modules never reach into Celery themselves.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import pickle
import signal
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import billiard.einfo
from billiard.common import human_status
from billiard.einfo import ExceptionInfo
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from billiard.pool import MaybeEncodingError
from celery import Celery
from celery import _state as celery_state
from celery._state import _set_current_app, get_current_app
from celery.app import trace as celery_trace
from celery.utils import time as celery_time
from celery.utils.serialization import get_pickled_exception
from celery.worker import request as _request_module
from celery.worker import state as worker_state
from celery.worker.pidbox import Pidbox
from celery.worker.request import create_request_cls
from kombu.connection import Connection, ConnectionPool
from kombu.exceptions import ConnectionLimitExceeded
from kombu.utils.encoding import safe_repr

from .errors import BrokerPoolExhausted

__all__ = [
    "ExceptionInfo",
    "SoftTimeLimitExceeded",
    "TimeLimitExceeded",
    "WorkerLostError",
    "app_behind_proxy",
    "cancel_active_requests",
    "child_death_info",
    "child_gone_info",
    "child_initial_handler",
    "child_signal_disposition",
    "code_summaries_cached",
    "in_worker_child",
    "worker_process_state",
    "forget_worker_state",
    "installed_app_state",
    "jitter_drawn_from",
    "request_class_for",
    "safe_repr",
    "takeover_problems",
    "status_after_shutdown",
    "time_limit_info",
    "unpickled_exception",
]


def _worker_lost_info(exitcode: int, job: int) -> ExceptionInfo:
    """What billiard's ``Pool.mark_as_worker_lost`` reports for a job whose child is gone."""
    try:
        raise WorkerLostError(f"Worker exited prematurely: {human_status(exitcode)} Job: {job}.")
    except WorkerLostError:
        return ExceptionInfo()


def child_death_info(signum: int, job: int) -> ExceptionInfo:
    """What billiard's pool reports for a child killed by ``signum``."""
    return _worker_lost_info(-signum, job)


def child_gone_info(status: int, job: int) -> ExceptionInfo:
    """What billiard's pool reports for a child that died with ``status``.

    ``status`` is what the pool reads from the dead process: its exit code
    (``os._exit(n)``), or minus the signal that killed it.
    """
    return _worker_lost_info(status, job)


#: What a prefork child does with a signal it receives, before any task code runs:
#: billiard's ``Worker.after_fork`` installs ``_shutdown_cleanup`` for its terminate
#: signals (``reset_signals``, the ``sigprotection`` set off as Celery runs it) and
#: the soft time limit's handler; Celery's ``process_initializer`` and billiard
#: ignore SIGINT. Read from the installed billiard and Celery.
@functools.cache
def child_signal_disposition(signum: int) -> str:
    """``"shutdown"``, ``"soft_timeout"``, ``"ignore"`` or ``"default"`` (the OS's action)."""
    from billiard import common
    from billiard.pool import SIG_SOFT_TIMEOUT
    from celery.concurrency.prefork import WORKER_SIGIGNORE

    if signum == SIG_SOFT_TIMEOUT:
        return "soft_timeout"
    names = {name for name in common.TERMSIGS_DEFAULT if name not in common.TERMSIGS_IGNORE}
    if signum in {getattr(signal, name, None) for name in names}:
        return "shutdown"
    ignored = {*WORKER_SIGIGNORE, *common.TERMSIGS_IGNORE, "SIGINT"}
    if signum in {getattr(signal, name, None) for name in ignored}:
        return "ignore"
    return "default"


@functools.cache
def child_initial_handler(signum: int) -> Any:
    """What ``signal.getsignal(signum)`` answers in a fresh prefork child."""
    from billiard import common
    from billiard.pool import soft_timeout_sighandler

    disposition = child_signal_disposition(signum)
    if disposition == "shutdown":
        return common._shutdown_cleanup
    if disposition == "soft_timeout":
        return soft_timeout_sighandler
    if disposition == "ignore":
        return signal.SIG_IGN
    return signal.SIG_DFL


def status_after_shutdown(signum: int) -> int:
    """How a child that ran ``_shutdown_cleanup`` for ``signum`` ends, as the pool reads it.

    The handler resets ``signum`` to its default action and raises
    ``SystemExit``; the child unwinds, tells the parent it is dying
    (``_do_exit``: DEATH, then a second's sleep), and the parent answers
    with its terminate signal (``on_death``). For the terminate signal
    itself that kills the child (``signal 15 (SIGTERM)``, measured); for
    another, the child's terminate handler runs a second time and leaves
    with ``os._exit(EX_SOFTWARE)``.
    """
    from billiard import common

    return -signum if signum == common.TERM_SIGNAL else int(common.EX_SOFTWARE)


def _workloop_reports_exit() -> bool:
    from billiard.pool import Worker

    return "exit_exc" in Worker.workloop.__code__.co_varnames


#: billiard 4.3's ``Worker.workloop`` catches what a job raises past ``Exception``
#: (``exit_exc``), sends it as the job's result, then leaves; billiard 4.2's catches
#: only ``Exception``. Read from the installed billiard.
_WORKLOOP_REPORTS_BASE_EXCEPTIONS = _workloop_reports_exit()


#: How long billiard's ``Pool._trywaitkill`` waits after SIGTERM before SIGKILL when a
#: hard time limit passes (``worker._popen.wait(timeout=0.1)``; billiard 4.2 and 4.3).
HARD_TIMEOUT_TERM_GRACE = 0.1


def time_limit_info(timeout: float | None) -> ExceptionInfo:
    """What billiard's ``TimeoutHandler.on_hard_timeout`` hands to the error callback."""
    try:
        raise TimeLimitExceeded(timeout)
    except TimeLimitExceeded:
        return ExceptionInfo()


def job_error_info(exc: BaseException, job: int) -> ExceptionInfo:
    """What the pool reports to the parent for job ``job``, whose task raised ``exc``.

    billiard 4.2: an exception past ``Exception`` (``sys.exit``, ``KeyboardInterrupt``,
    ``GeneratorExit``, a pytest outcome) escapes the workloop; the child exits
    with ``sys.exit``'s code, else 0 (``Worker.__call__``'s ``exit`` hook and
    ``_do_exit``), and sends no result: the pool's ``mark_as_worker_lost``.
    Otherwise (and always on billiard 4.3) the ``ExceptionInfo`` pickled
    through the result pipe; when the exception does not pickle (pytest's
    outcomes are classes pickle cannot find), the child sends
    ``MaybeEncodingError`` instead, as ``Worker.workloop`` does.
    """
    if not isinstance(exc, Exception) and not _WORKLOOP_REPORTS_BASE_EXCEPTIONS:
        code = exc.code if isinstance(exc, SystemExit) else 0
        exitcode = 0 if code is None else code if isinstance(code, int) else 1
        return _worker_lost_info(exitcode & 0xFF, job)
    info = ExceptionInfo()
    try:
        pickle.dumps(exc)
    except Exception as failure:
        wrapped = MaybeEncodingError(failure, info)
        try:
            raise wrapped from None
        except MaybeEncodingError:
            return ExceptionInfo()
    return info


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


def app_behind_proxy(value: Any) -> Any:
    """The object behind ``celery.current_app`` (a ``celery.local.Proxy``), else ``value``.

    A proxy passes ``isinstance(value, Celery)``; made the current app, it would
    point at itself and every lookup would recurse forever.
    """
    from celery.local import Proxy

    if issubclass(type(value), Proxy):  # type(), not isinstance(): a proxy fakes __class__
        return value._get_current_object()
    return value


#: The node name of the execution running on this thread (its worker's).
_child = threading.local()


def _node_name() -> str:
    hostname: str | None = getattr(_child, "hostname", None)
    return hostname if hostname is not None else _real_gethostname()


_real_gethostname = celery_trace.gethostname


class worker_process_state:
    """What Celery sets up process-wide in a prefork child, while the worker side runs.

    ``task_join_will_block`` is on, so ``AsyncResult.get()`` inside a task
    raises "Never call result.get() within a task!" (prefork's
    ``process_initializer``); ``self.request.hostname`` is the worker's node
    name (``fast_trace_task`` reads it from the child's ``_localized``; the
    ``trace_task_ret`` the emulated worker runs asks ``gethostname()``, which
    answers the node name of the execution on the asking thread). Re-entrant.
    A class rather than a generator: it is entered on every drain.
    """

    __slots__ = ("previous_blocks", "previous_gethostname")

    def __enter__(self) -> None:
        self.previous_blocks = celery_state.task_join_will_block()
        self.previous_gethostname = celery_trace.gethostname
        celery_state._set_task_join_will_block(True)
        celery_trace.gethostname = _node_name

    def __exit__(self, *exc_info: object) -> None:
        celery_trace.gethostname = self.previous_gethostname
        celery_state._set_task_join_will_block(self.previous_blocks)


class in_worker_child:
    """One execution's child: ``app`` is the current app and ``hostname`` the node name.

    Both are per thread (Celery keeps the current app in a thread-local), so
    executions on stacks of their own, and the harness's thread, never see
    each other's.
    """

    __slots__ = ("app", "hostname", "previous_app", "previous_hostname")

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname

    def __enter__(self) -> None:
        self.previous_app = get_current_app()
        self.previous_hostname = getattr(_child, "hostname", None)
        if self.previous_app is not self.app:
            _set_current_app(self.app)
        _child.hostname = self.hostname

    def __exit__(self, *exc_info: object) -> None:
        _child.hostname = self.previous_hostname
        if self.previous_app is not self.app:
            _set_current_app(self.previous_app)


@contextlib.contextmanager
def jitter_drawn_from(rng: Any) -> Iterator[None]:
    """``retry_jitter`` draws from ``rng`` (the seed's), not from the global ``random``.

    Celery's ``get_exponential_backoff_interval`` calls ``random.randrange`` of
    ``celery.utils.time``'s own ``random`` import; that name points at ``rng``
    while the harness is active.
    """
    previous = celery_time.random
    celery_time.random = rng
    try:
        yield
    finally:
        celery_time.random = previous


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
        for limited in (worker_state.successful_requests, worker_state.revoked):
            if task_id in limited:  # a LimitedSet: discard() would refresh its heap anyway
                limited.discard(task_id)
    for name in _REQUEST_SETS:
        bucket = getattr(worker_state, name)
        if bucket:  # weak sets, empty once every request ended: iterating costs
            for request in list(bucket):
                if request.id in ids:
                    bucket.discard(request)


class CountedConnectionPool(ConnectionPool):
    """kombu's connection pool for the app, counting, and never waiting for a connection.

    kombu's ``acquire(block=True)`` (what Celery's ``connection_or_acquire``
    asks for) waits until another thread releases a connection. In the
    emulation one execution runs at a time, so nothing could ever release one
    meanwhile: a pool with every connection taken is a leak, and waiting would
    hang the test. It raises :class:`BrokerPoolExhausted` instead, saying so.
    ``acquired`` and ``released`` count the connections handed out and given back.
    """

    def __init__(self, connection: Any, limit: int | None = None, **kwargs: Any) -> None:
        self.acquired = 0
        self.released = 0
        super().__init__(connection, limit=limit, **kwargs)  # type: ignore[no-untyped-call]

    def acquire(self, block: bool = False, timeout: float | None = None) -> Any:
        try:
            connection = super().acquire(block=False)  # type: ignore[no-untyped-call]
        except ConnectionLimitExceeded:
            raise BrokerPoolExhausted(
                f"celery_faults: all {self.limit} connections of the app's broker pool "
                f"(broker_pool_limit) are taken and none was given back: a connection taken "
                f"with app.pool.acquire() or app.connection_or_acquire() and never released "
                f"leaks; release it (use it as `with`). Waiting would hang: one execution "
                f"runs at a time here, so none could give one back"
            ) from None
        self.acquired += 1
        return connection

    def release(self, resource: Any) -> None:
        self.released += 1
        super().release(resource)  # type: ignore[no-untyped-call]


#: ``app.amqp`` cached properties that hold a broker connection or settings.
_AMQP_CACHES = ("_event_dispatcher", "send_task_message")


#: The apps a harness has taken over, and by which: two at once on one app cannot both hold it.
_apps_installed: weakref.WeakKeyDictionary[Celery, installed_app_state] = (
    weakref.WeakKeyDictionary()
)


class installed_app_state:
    """Point ``app`` at a broker, a result backend and a clock; undo all of it on exit.

    Celery caches its broker connection pool, its producer pool and its result
    backend on the app; they are swapped here and the originals put back. The
    app's configuration is put back whole (``app.conf.changes``): a task that
    sets ``app.conf.task_acks_late`` does not leak it into later tests. One
    app is taken over by one harness at a time.
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
        if app in _apps_installed:
            raise RuntimeError(
                f"celery_faults: the app {app.main or app!r} already runs under another "
                f"active harness; stop that one first (two harnesses on one app cannot overlap)"
            )
        conf = app.conf
        amqp = app.amqp
        missing = object()
        cached = app.amqp.__dict__
        self._saved = {
            # Built on first publish from the broker URL and settings of that day.
            "amqp_cache": {key: cached.pop(key) for key in _AMQP_CACHES if key in cached},
            "conf": dict(conf.changes),
            "pool": app._pool,
            "producer_pool": amqp._producer_pool,
            "backend_cache": app._backend_cache,
            "local_backend": getattr(app._local, "backend", missing),
            "now": app.__dict__.get("now", missing),
            "missing": missing,
        }
        conf.update(
            _spelt_as_read(
                conf,
                {
                    **self.conf,
                    "broker_url": self.broker_url,
                    # Unset, they read broker_url (Settings.broker_read_url/broker_write_url).
                    "broker_read_url": None,
                    "broker_write_url": None,
                },
            )
        )
        self._saved["class"] = type(conf)
        conf.__dict__[_HARNESS_BROKER] = self.broker_url
        object.__setattr__(conf, "__class__", _environment_blind_class(type(conf)))
        connection = self.connection_factory()
        limit = conf.broker_pool_limit or 10
        app._pool = CountedConnectionPool(connection, limit=limit)
        from kombu.pools import ProducerPool

        amqp._producer_pool = ProducerPool(app._pool, limit=limit)
        app._backend_cache = None
        app._local.backend = self.backend
        if self.backend.thread_safe:
            app._backend_cache = self.backend
        app.now = self.now
        _apps_installed[app] = self
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
        conf = app.conf
        if "class" in saved:
            object.__setattr__(conf, "__class__", saved["class"])
            conf.__dict__.pop(_HARNESS_BROKER, None)
        changes = conf.changes
        changes.clear()
        changes.update(saved["conf"])
        _apps_installed.pop(app, None)


#: Where the taken-over ``app.conf`` keeps the broker URL its broker properties answer.
_HARNESS_BROKER = "_celery_faults_broker_url"
_environment_blind_classes: dict[type[Any], type[Any]] = {}


def _spelt_as_read(conf: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` under every spelling the app reads before the plain key.

    An app configured with a namespace (``config_from_object(obj, namespace="CELERY")``,
    Celery's Django guide) reads ``CELERY_TASK_ALWAYS_EAGER`` before
    ``task_always_eager``: Celery 5.3 to 5.6 try the prefixed key in every map
    first (``ConfigurationView.__getitem__``), so the project's prefixed setting
    wins over an override written under the plain key; 5.7 looks in the changes
    map first. Writing both spellings makes the harness's value win on each.
    """
    prefix = conf.__dict__.get("prefix")
    if not prefix:
        return dict(settings)
    from celery.utils.text import match_case

    spelt = dict(settings)
    for key, value in settings.items():
        spelt[match_case(prefix + key, prefix)] = value
    return spelt


def _environment_blind_class(base: type[Any]) -> type[Any]:
    """``base`` (Celery's ``Settings``) whose broker URLs are the harness's, whatever the env says.

    ``Settings.broker_url``, ``broker_read_url`` and ``broker_write_url`` read
    ``CELERY_BROKER_URL`` (``_READ_URL``, ``_WRITE_URL``) from the environment
    before any setting, so no override reaches them; while the harness holds the
    app they answer its broker. ``result_backend`` still reads as the project
    configures it: the harness replaces the backend object, and the chord
    semantics follow the configured backend.
    """
    cached = _environment_blind_classes.get(base)
    if cached is not None:
        return cached

    def harness_broker(name: str) -> property:
        configured = getattr(base, name)

        def read(self: Any) -> Any:
            url = self.__dict__.get(_HARNESS_BROKER)  # absent on a copy of the view
            return configured.__get__(self) if url is None else url

        return property(read)

    names = ("broker_url", "broker_read_url", "broker_write_url")
    namespace: dict[str, Any] = {name: harness_broker(name) for name in names}
    namespace.update(__module__=base.__module__, __qualname__=base.__qualname__)
    cached = _environment_blind_classes[base] = type(base.__name__, (base,), namespace)
    return cached


def takeover_problems(app: Celery, broker_url: str, backend: Any) -> list[str]:
    """What still keeps ``app`` off the harness's broker, backend or worker (empty: nothing).

    Read back after the harness took the app over, the way Celery reads them
    when a task is called: ``Task.apply_async`` runs the task eagerly when
    ``task_always_eager`` reads true, publishes through
    ``app.amqp.producer_pool`` (whose pool clones ``connections.connection``),
    and stores results through ``app.backend``.
    """
    conf = app.conf
    problems = []
    eager = getattr(conf, "task_always_eager", None)  # as Task.apply_async reads it
    if eager:
        problems.append(f"task_always_eager reads {eager!r}")
    for name in ("broker_url", "broker_read_url", "broker_write_url"):
        value = getattr(conf, name, None)
        if value != broker_url:
            problems.append(f"{name} reads {value!r}")
    connections = getattr(app.amqp.producer_pool, "connections", None)
    connection = getattr(connections, "connection", None)
    target = None if connection is None else connection.as_uri()
    if target != Connection(broker_url).as_uri():  # as_uri() spells every URL its own way
        problems.append(f"the producer pool publishes to {target!r}")
    if app.backend is not backend:
        problems.append(f"results go to {type(app.backend).__name__}")
    return problems


def accept_content(app: Celery) -> set[str]:
    """The content types a worker of ``app`` accepts (what its consumer sets on messages)."""
    from kombu.serialization import prepare_accept_content

    return prepare_accept_content(app.conf.accept_content)  # type: ignore[no-any-return]


def chord_semantics(app: Celery) -> str:
    """How the result backend ``app`` configures completes chords: redis, incr or unlock.

    Read from the backend's class (imported, never connected): Redis's native
    chord support (its ``on_chord_part_return``), Celery's key/value counting
    for classes that implement ``incr``, else the ``celery.chord_unlock``
    fallback of ``Backend.apply_chord``.

    ``celery.backends.redis`` imports redis-py, which an app on another
    backend need not have installed: it is looked at only once the configured
    class was imported, which imported it when that class is Redis's.
    """
    import sys

    from celery.app.backends import by_url
    from celery.backends.base import KeyValueStoreBackend

    configured = app.conf.result_backend
    if not configured:
        return "unlock"
    try:
        backend_class, _ = by_url(configured, app.loader)
    except Exception:  # an unknown scheme fails the same way in production, elsewhere
        return "unlock"
    redis_backends = sys.modules.get("celery.backends.redis")
    redis_backend = getattr(redis_backends, "RedisBackend", None)
    if redis_backend is not None and issubclass(backend_class, redis_backend):
        return "redis"
    if issubclass(backend_class, KeyValueStoreBackend) and backend_class.implements_incr:
        return "incr"
    return "unlock"


@functools.cache
def redis_chords_ignore_duplicates() -> bool:
    """Whether the installed Redis backend ignores a header task's second result.

    Celery 5.7's chord Lua script keeps a set of (task id, index) members and
    adds each once; earlier releases push every result, so a duplicate counts.
    Read once from the installed Celery.
    """
    from celery.backends import redis

    return "SISMEMBER" in getattr(redis, "CHORD_PART_RETURN_LUA", "")


def time_limits_applied(request: Any, app: Celery) -> tuple[float | None, float | None]:
    """The (hard, soft) time limits a prefork worker applies to ``request``.

    ``Request.execute_using_pool`` passes the message's limits or the task's;
    billiard's pool falls back to its own, built from ``task_time_limit`` and
    ``task_soft_time_limit``.
    """
    hard, soft = request.time_limits
    task = request.task
    return (
        hard or task.time_limit or app.conf.task_time_limit,
        soft or task.soft_time_limit or app.conf.task_soft_time_limit,
    )


def expire_on_virtual_clock(request: Any, now: float) -> bool:
    """Revoke ``request`` the way Celery does when its ``expires`` has passed at ``now``.

    Celery compares ``expires`` with the wall clock in ``Request.maybe_expire``;
    the harness's time is the virtual clock's, so the comparison is made here,
    and the rest is what ``Request.revoked()`` does for an expired request:
    Celery's own ``_announce_revoked`` stores REVOKED with the reason
    ``'expired'``, acks, and sends ``task_revoked`` with ``expired=True``.
    """
    expires = request.expires
    if expires is None or expires.timestamp() > now:
        return False
    if request._already_revoked:
        return True
    worker_state.revoked.add(request.id)
    request._announce_revoked("expired", False, None, True)
    return True


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


def rate_per_second(limit: Any) -> float:
    """A task's ``rate_limit`` (``"10/m"``, a number per second, or ``None``) in starts/second."""
    return float(celery_time.rate(limit) or 0.0)


# -- caches a harness holds while it runs (each undone on exit) ----------------------


@contextlib.contextmanager
def producer_pool_replaced(app: Celery, pool: Any) -> Iterator[None]:
    """Make ``pool`` the app's ``amqp.producer_pool`` (what ``send_task`` acquires from)."""
    amqp = app.amqp
    previous = amqp._producer_pool
    amqp._producer_pool = pool
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            pool.force_close_all()
        amqp._producer_pool = previous


#: The view's methods that change a setting: each drops the snapshot.
_SETTING_WRITES = (
    "__setitem__",
    "__delitem__",
    "update",
    "setdefault",
    "pop",
    "popitem",
    "clear",
    "add_defaults",
    "swap_with",
)
_snapshot_classes: dict[type[Any], type[Any]] = {}
_SNAPSHOT = "_celery_faults_defaults"


def _snapshotting_class(base: type[Any]) -> type[Any]:
    """``base`` (Celery's ``Settings``) answering default-only settings from a dict."""
    cached = _snapshot_classes.get(base)
    if cached is not None:
        return cached
    lookup = base.__getitem__

    def __getitem__(self: Any, key: str) -> Any:
        snapshot = self.__dict__.get(_SNAPSHOT)
        if snapshot is None:  # a copy of the view (Settings.copy): answered as Celery does
            return lookup(self, key)
        changes = self.changes
        if key in changes:
            if self.prefix is None and self.key_t is None:
                return changes[key]  # the first place Celery looks, when it spells keys as given
        elif key in snapshot:
            return snapshot[key]
        value = lookup(self, key)
        if not any(variant in changes for variant in self._to_keys(key)):
            snapshot[key] = value  # found only in the defaults: the same object every time
        return value

    def writer(name: str) -> Callable[..., Any]:
        write = getattr(base, name)

        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            snapshot = self.__dict__.get(_SNAPSHOT)
            if snapshot:
                snapshot.clear()
            return write(self, *args, **kwargs)

        method.__name__ = name
        return method

    namespace: dict[str, Any] = {
        "__getitem__": __getitem__,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    }
    namespace.update({name: writer(name) for name in _SETTING_WRITES if hasattr(base, name)})
    cached = _snapshot_classes[base] = type(base.__name__, (base,), namespace)
    return cached


@contextlib.contextmanager
def default_settings_snapshot(app: Celery) -> Iterator[None]:
    """Answer the settings the app finds only in Celery's defaults from a dict.

    Each miss in ``app.conf`` costs a chain of ``KeyError``s over the key's old
    and new spellings in every map. A setting read once and found in no map the
    app writes to is kept; any write through the view drops them all, and a
    key the app sets directly in ``changes`` is read from there. Undone on exit.
    """
    conf = app.conf
    base = type(conf)
    if not hasattr(conf, "maps") or not hasattr(conf, "_to_keys") or _SNAPSHOT in conf.__dict__:
        yield  # not Celery's Settings as we know it, or already snapshotting
        return
    conf.__dict__[_SNAPSHOT] = {}
    object.__setattr__(conf, "__class__", _snapshotting_class(base))  # not a setting
    try:
        yield
    finally:
        object.__setattr__(conf, "__class__", base)
        conf.__dict__.pop(_SNAPSHOT, None)


#: Python's pure helpers that place a traceback's carets (3.11+; the second is 3.13's).
_CARET_ANCHORS = "_extract_caret_anchors_from_line_segment"
_SHOW_CARETS = "_should_show_carets"
_caret_users = 0
_caret_originals: dict[str, Any] = {}


def _cached_should_show_carets(show: Callable[..., bool]) -> Callable[..., bool]:
    cache: dict[tuple[Any, ...], bool] = {}

    def should_show(self: Any, start: int, end: int, lines: list[str], anchors: Any) -> bool:
        try:
            key = (start, end, tuple(lines), anchors)
            return cache[key]
        except KeyError:
            shown = cache[key] = show(self, start, end, lines, anchors)
            return shown
        except TypeError:  # arguments that cannot be hashed: compute as Python does
            return show(self, start, end, lines, anchors)

    return should_show


@contextlib.contextmanager
def caret_anchors_cached() -> Iterator[None]:
    """Compute Python's traceback caret anchors once per source segment, not per traceback.

    Formatting a traceback parses each frame's source segment (``ast.parse``)
    to place the ``~~~^^^`` carets; billiard's ``ExceptionInfo`` formats one for
    every failure and every killed child. The anchors are a pure function of
    the segment's text (on 3.13 also of the offsets and lines passed), so a
    cache keyed on those arguments leaves every traceback's text byte-identical.
    """
    global _caret_users
    import functools
    import traceback

    summary = traceback.StackSummary
    if _caret_users == 0:
        extract = getattr(traceback, _CARET_ANCHORS, None)
        if extract is not None:
            _caret_originals["extract"] = extract
            setattr(traceback, _CARET_ANCHORS, functools.lru_cache(4096)(extract))
        show = summary.__dict__.get(_SHOW_CARETS)
        if show is not None:
            _caret_originals["show"] = show
            setattr(summary, _SHOW_CARETS, _cached_should_show_carets(show))
    _caret_users += 1
    try:
        yield
    finally:
        _caret_users -= 1
        if _caret_users == 0:
            if "extract" in _caret_originals:
                setattr(traceback, _CARET_ANCHORS, _caret_originals.pop("extract"))
            if "show" in _caret_originals:
                setattr(summary, _SHOW_CARETS, _caret_originals.pop("show"))


def lose_ack_on_a_virtual_transport(message: Any) -> None:
    """The worker forgets a delivery as if it had acked it; the broker never hears of it.

    Real-broker mode's ``ack_lost`` on Redis (kombu's virtual transport): the
    channel's QoS drops the tag from its in-memory bookkeeping (the base
    ``virtual.QoS.ack``, which frees the prefetch slot), while Redis keeps the
    message in its unacked hash, to be restored once the visibility timeout
    has passed, as after a connection that died before the ack went out.
    """
    from kombu.transport import virtual

    virtual.QoS.ack(message.channel.qos, message.delivery_tag)


def soft_time_limit_signal() -> int | None:
    """The signal billiard's parent sends a child whose soft time limit passed."""
    from billiard.pool import SIG_SOFT_TIMEOUT

    return SIG_SOFT_TIMEOUT  # type: ignore[no-any-return]


# -- task messages: recorded as Celery sends them, and sent again -----------------------


@contextlib.contextmanager
def task_messages_recorded(
    app: Celery, record: Callable[[str, Any, dict[str, Any]], None]
) -> Iterator[None]:
    """Call ``record(name, message, options)`` for each message ``app.send_task`` sends.

    ``message`` is what ``amqp.create_task_message`` built (headers,
    properties, body, sent event), before any ``before_task_publish``
    receiver saw it; ``options`` are the routing and publish options that
    ``send_task`` passes on to ``amqp.send_task_message``.
    """
    amqp = app.amqp
    cached = vars(amqp)
    had = "send_task_message" in cached
    previous = cached.get("send_task_message")
    send = amqp.send_task_message

    def recording(producer: Any, name: str, message: Any, **options: Any) -> Any:
        record(name, copy.deepcopy(message), dict(options))  # sending changes the message
        return send(producer, name, message, **options)

    cached["send_task_message"] = recording
    try:
        yield
    finally:
        if had:
            cached["send_task_message"] = previous
        else:
            cached.pop("send_task_message", None)


def send_task_message_again(app: Celery, name: str, message: Any, options: dict[str, Any]) -> None:
    """What ``app.send_task`` does once it has built ``message``, done again (Celery 5.3-5.7).

    A producer from the app's pool, the result backend told of the call
    (unless the result is ignored), then ``amqp.send_task_message``: the
    ``before_task_publish`` and ``after_task_publish`` signals, the publish
    with the message's serializer, and the sent event.
    """
    task_id = message.headers["id"]
    with (
        app.producer_or_acquire(None) as producer,
        producer.connection._reraise_as_library_errors(),
    ):
        if not message.headers.get("ignore_result"):
            app.backend.on_task_call(producer, task_id)
        app.amqp.send_task_message(producer, name, message, **options)


def task_message_for(message: Any, task_id: str) -> Any:
    """A copy of ``message`` as ``create_task_message`` builds it for ``task_id``."""
    old_id = message.headers["id"]
    headers = copy.deepcopy(message.headers)
    properties = copy.deepcopy(message.properties)
    headers["id"] = properties["correlation_id"] = task_id
    if headers.get("root_id") == old_id:  # a top-level task is its own root
        headers["root_id"] = task_id
    sent_event = copy.deepcopy(message.sent_event)
    if sent_event is not None:
        sent_event["uuid"] = task_id
        if sent_event.get("root_id") == old_id:
            sent_event["root_id"] = task_id
    return type(message)(headers, properties, copy.deepcopy(message.body), sent_event)


def redis_restore_cadence(options: dict[str, Any]) -> tuple[float, int]:
    """kombu's Redis restore sweeps: (seconds between calls, calls per scan), as installed.

    A consumer calls ``QoS.restore_visible`` when its connection comes up and
    then every interval; one call in ``throttle`` scans. kombu 5.7 reads both
    from the transport options (``unacked_restore_interval``, 10, and
    ``unacked_restore_throttle``, 10); earlier releases fix them at 10 and 10.
    """
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    default_interval = getattr(channel, "unacked_restore_interval", None)
    if default_interval is None:  # before the options existed
        return 10.0, 10
    interval = options.get("unacked_restore_interval", default_interval)
    throttle = options.get("unacked_restore_throttle", channel.unacked_restore_throttle)
    for name, value in (
        ("unacked_restore_interval", interval),
        ("unacked_restore_throttle", throttle),
    ):
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise ValueError(
                f"broker_transport_options[{name!r}]={value!r}: expected a number of "
                f"{'seconds' if name.endswith('interval') else 'calls'}"
            )
    if interval <= 0:  # kombu falls back to its default
        interval = default_interval
    return float(interval), max(int(throttle), 1)  # a throttle of 0 scans on every call


# -- remote control: Celery's own Panel handlers behind each emulated worker ----------

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


def _request_buckets() -> list[Any]:
    return [getattr(worker_state, name) for name in _REQUEST_SETS]


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


def request_reserved(request: Any) -> None:
    """Celery's strategy takes a request: ``state.task_reserved`` (it waits for a child)."""
    worker_state.task_reserved(request)


def request_scheduled(request: Any) -> None:
    """Celery's strategy holds a request for its ETA (5.7's ``task_scheduled``; else nothing)."""
    scheduled = getattr(worker_state, "task_scheduled", None)
    if scheduled is not None:
        scheduled(request)


def requests_dropped(requests: Iterable[Any]) -> None:
    """The consumer lost what it held (``Consumer.on_close``): forget these requests."""
    for request in requests:
        if worker_state.requests.get(request.id) is request:
            del worker_state.requests[request.id]
        for bucket in _request_buckets():
            bucket.discard(request)


def node_requests_dropped(hostname: str) -> None:
    """The worker process ``hostname`` is gone: Celery's bookkeeping of its requests with it."""
    requests = [r for r in worker_state.requests.values() if r.hostname == hostname]
    for bucket in _request_buckets():
        requests += [r for r in bucket if getattr(r, "hostname", None) == hostname]
    if requests:
        requests_dropped(requests)


def revoked_at_receipt(request: Any) -> bool:
    """Celery's strategy discards a message whose id is revoked as it receives it.

    ``Request.revoked()`` stores REVOKED, acks and sends ``task_revoked``.
    (Expiry is judged on the virtual clock when the request starts.)
    """
    return request.id in worker_state.revoked and bool(request.revoked())


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


def terminated_info(signum: int) -> ExceptionInfo:
    """What billiard reports for a job whose child ``terminate_job`` killed.

    ``Pool._join_exited_workers`` calls ``job._set_terminated(exitcode)``.
    """
    from billiard.exceptions import Terminated

    try:
        raise Terminated(signum)
    except Terminated:
        return ExceptionInfo()


def signal_number(signum: int | str | None) -> int:
    """The signal Celery's ``Request.terminate`` passes to the pool, as a number."""
    from billiard.common import TERM_SIGNAME
    from celery.platforms import signals

    return int(signals.signum(signum or TERM_SIGNAME))


def child_memory_kb() -> int:
    """The resident memory billiard reads in a child after each task (``mem_rss``), in kB."""
    from billiard.compat import mem_rss

    return int(mem_rss())


def consumer_qos(app: Celery) -> Callable[[int], Any]:
    """What makes the prefetch count a worker's consumer keeps: kombu's own ``QoS``.

    Celery's ``Tasks`` bootstep sets ``basic.qos`` to the initial count
    (concurrency times ``worker_prefetch_multiplier``; 0 means no limit) and
    wraps it in ``kombu.common.QoS``, capped by ``worker_eta_task_limit`` where
    the installed Celery has that setting (5.5 and later, with a kombu whose
    QoS takes ``max_prefetch``). Its strategy raises the count by one for each
    message held for its ETA (``increment_eventually``) and lowers it when the
    ETA comes (``decrement_eventually``). The setting is read once; each new
    connection of the consumer calls the returned function for a fresh count.
    """
    from celery.app.defaults import NAMESPACES
    from kombu.common import QoS

    def applied(prefetch_count: int) -> None:
        """``basic.qos``: the emulated consumer reads ``QoS.value`` itself."""

    known = "eta_task_limit" in NAMESPACES["worker"]
    limit = app.conf.get("worker_eta_task_limit") if known else None
    if limit is not None:
        return lambda initial: QoS(applied, initial, max_prefetch=limit)
    return lambda initial: QoS(applied, initial)


def prefetch_disabled(app: Celery, profile: str) -> bool:
    """``worker_disable_prefetch``: whether the consumer takes only what a free child can run.

    Read where the installed Celery has the setting (5.5 and later), and, as
    its ``Tasks`` bootstep applies it, on Redis only (it warns and ignores the
    setting on other brokers): ``can_consume`` then also requires fewer
    reserved requests (those waiting and those running) than the pool has
    processes.
    """
    from celery.app.defaults import NAMESPACES

    if "disable_prefetch" not in NAMESPACES["worker"] or profile != "redis":
        return False
    return bool(app.conf.get("worker_disable_prefetch"))


#: Celery's poller for a chord on a backend without native chord support.
CHORD_UNLOCK = "celery.chord_unlock"


def chord_unlock_waits_forever(request: Any, app: Celery) -> bool:
    """Whether a held ``celery.chord_unlock`` request polls a header that is not ready, for good.

    Celery's fallback (``celery.app.builtins.add_unlock_chord_task``) gets the
    header's results as ``result`` (each ``AsyncResult.as_tuple()``) and
    retries every ``interval`` with ``max_retries`` (``None``: forever) until
    ``GroupResult.ready()``; the caller knows nothing else can make it ready.
    """
    if request.name != CHORD_UNLOCK:
        return False
    kwargs = request.kwargs or {}
    if kwargs.get("max_retries") is not None:
        return False
    from celery.result import result_from_tuple

    try:
        header = [result_from_tuple(item, app=app) for item in kwargs.get("result") or ()]
        return not all(result.ready() for result in header)
    except Exception:  # a form this reading does not know: let it poll as before
        return False
