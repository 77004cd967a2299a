"""The app while a harness holds it: broker, backend, clock, settings, process state.

Celery caches its broker connection pool, producer pool, result backend and
tracers on the app, and keeps the current app, the node name and
``task_join_will_block`` process- or thread-wide; each is swapped here for the
harness's and put back on exit. Where Celery releases read settings
differently (5.3 to 5.6 try a namespace's prefixed key first, 5.7 the changes),
the takeover writes every spelling.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from celery import Celery
from celery import _state as celery_state
from celery._state import _set_current_app, get_current_app
from celery.app import trace as celery_trace
from celery.utils import time as celery_time
from kombu.connection import Connection, ConnectionPool
from kombu.exceptions import ConnectionLimitExceeded

from ..errors import BrokerPoolExhaustedError


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


class CountedConnectionPool(ConnectionPool):
    """kombu's connection pool for the app, counting, and never waiting for a connection.

    kombu's ``acquire(block=True)`` (what Celery's ``connection_or_acquire``
    asks for) waits until another thread releases a connection. In the
    emulation one execution runs at a time, so nothing could ever release one
    meanwhile: a pool with every connection taken is a leak, and waiting would
    hang the test. It raises :class:`BrokerPoolExhaustedError` instead, saying so.
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
            raise BrokerPoolExhaustedError(
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
        _forget_control_producers(app)  # remote control publishes through the harness's pool
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
        _forget_control_producers(app)  # not the harness's closed pool, after it
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
            _unguard_run(task)
            task.__trace__ = saved.get(name)


#: The run methods Celery's tracer may call: ``run``, and under ``autoretry_for``
#: the task's own, which Celery's retrying ``run`` calls (``_orig_run``).
_RUNS = ("run", "_orig_run")
_ABSENT = object()


def guard_run(task: Any, guard: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Put ``guard`` around the ``run`` Celery's tracer calls, for the harness's life.

    ``build_tracer`` takes ``task.run`` (or the task, whose ``__call__`` calls
    it) when it builds the tracer it caches on the task: the cache is dropped
    so that the next trace goes through the guard. :func:`fresh_tracers` takes
    the guards off at the harness's exit.
    """
    if "_celery_faults_guarded" in vars(task):
        return
    originals = {name: vars(task).get(name, _ABSENT) for name in _RUNS}
    for name in _RUNS:
        if name == "run" or originals[name] is not _ABSENT:
            setattr(task, name, guard(getattr(task, name)))
    task._celery_faults_guarded = originals
    task.__trace__ = None


def _unguard_run(task: Any) -> None:
    originals = vars(task).pop("_celery_faults_guarded", None)
    if originals is None:
        return
    for name, original in originals.items():
        if original is _ABSENT:
            vars(task).pop(name, None)
        else:
            setattr(task, name, original)


def _forget_control_producers(app: Celery) -> None:
    """Make ``app.control`` read the app's producer pool again on its next use.

    kombu's ``Mailbox.producer_pool`` is a cached property: the first
    ``revoke()`` or ``inspect()`` keeps the pool of that moment for the app's
    life. Under a harness that would be the harness's pool, closed when it
    stops (the next use raises "Acquire on closed pool"); before it, a pool to
    the app's real broker. Celery itself forgets it after a fork the same way.
    """
    control = app.__dict__.get("control")
    mailbox = getattr(control, "mailbox", None)
    if mailbox is not None:
        mailbox.__dict__.pop("producer_pool", None)


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
