"""A worker's consumer as Celery builds it: strategy, request bookkeeping, qos, prefetch, shutdown.

Keyed by release where Celery and kombu differ: ``scheduled_requests`` and
``task_scheduled`` (Celery 5.7), ``worker_eta_task_limit`` and
``worker_disable_prefetch`` (5.5+), the cold shutdown's cancel (5.5, 5.6+,
none before), the Redis restore cadence options (kombu 5.7). Each is read from
the installed code, never from a version number.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery
from celery.utils import time as celery_time
from celery.worker import state as worker_state
from celery.worker.request import create_request_cls


def request_class_for(task: Any, pool: Any, hostname: str, app: Celery) -> type[Any]:
    """The ``Request`` class Celery's default strategy builds for ``task``."""
    from celery.utils.imports import symbol_by_name

    base = symbol_by_name(task.Request)
    return create_request_cls(base, task, pool, hostname, None, app=app)  # type: ignore[no-any-return]


class _RefusingConsumer:
    """What Celery's ``Consumer`` reads of itself when it refuses a message."""

    connection_errors: tuple[type[BaseException], ...] = ()
    event_dispatcher = None

    def __init__(self, app: Celery) -> None:
        self.app = app


def refuse_unregistered(app: Celery, message: Any) -> None:
    """Celery's answer to a message for a task the worker does not know.

    ``Consumer.on_unknown_task``: it logs the error, rejects the message, stores
    FAILURE with ``NotRegistered`` and sends ``task_unknown``.
    """
    from celery.worker.consumer.consumer import Consumer

    name = message.headers.get("task")
    Consumer.on_unknown_task(_RefusingConsumer(app), None, message, KeyError(name))


def refuse_undecodable(app: Celery, message: Any, exc: Exception) -> str:
    """Celery's answer to a message its strategy could not turn into a request.

    As ``on_task_received`` sorts them: a ``DecodeError`` goes to
    ``Consumer.on_decode_error`` (logged, acked), an invalid message or a
    refused serializer (``ContentDisallowed``) to ``on_invalid_task`` (logged,
    rejected, ``task_rejected`` sent). What the broker was told: ``acked`` or
    ``rejected``.
    """
    from celery.worker.consumer.consumer import Consumer
    from kombu.exceptions import DecodeError

    consumer = _RefusingConsumer(app)
    if isinstance(exc, DecodeError):
        Consumer.on_decode_error(consumer, message, exc)
        return "acked"
    Consumer.on_invalid_task(consumer, None, message, exc)
    return "rejected"


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


def _request_buckets() -> list[Any]:
    return [getattr(worker_state, name) for name in _REQUEST_SETS]


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
