"""The in-memory broker: queues, unacked deliveries, profiles, and the ledger.

One :class:`InMemoryBroker` per harness; nothing here is shared between tests.
Celery publishes to it through real kombu (the :class:`Transport` registered
under the ``celery-faults://`` scheme), so serialization, headers and routing
are kombu's own. The emulated worker takes deliveries from it and acks or
rejects them through real ``kombu.Message`` objects.

The broker holds no fault logic; it only knows what a broker knows: which
messages are ready, which are delivered and not yet acked, and what happens to
those when a consumer's connection drops (the profile).
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from amqp.exceptions import ConnectionError as TransportConnectionError  # type: ignore[import-untyped]
from kombu.connection import Connection
from kombu.messaging import Producer
from kombu.transport import TRANSPORT_ALIASES, virtual

from .._celery_internals import redis_restore_cadence
from ..errors import ConfigError
from ..vocabulary import LedgerEventKind, Settlement
from .clock import VirtualClock

#: What the ledger says of an ack or a reject for a delivery the broker already took back.
_IGNORED: dict[Settlement, LedgerEventKind] = {"ack": "ack_ignored", "reject": "reject_ignored"}

SCHEME = "celery-faults"
TRANSPORT_OPTION = "celery_faults_broker"
#: kombu's mailbox names end so (``%s.pidbox``, ``reply.%s.pidbox``, their queues too).
CONTROL_SUFFIX = ".pidbox"


def is_control(name: str) -> bool:
    """Whether an exchange or queue carries remote control (kombu's pidbox), not tasks."""
    return name.endswith(CONTROL_SUFFIX)


#: What the broker does with one publish attempt (a publish fault decides it: see
#: :mod:`.publishing`): queue it, refuse it, lose it, or queue it and lose the confirm.
PublishFate = Literal["", "refuse", "lose", "twice"]


class PublishRefused(TransportConnectionError, ConnectionError):  # type: ignore[misc]
    """The broker refused a publish, or dropped the connection before confirming it.

    A connection error as kombu's virtual transports declare them
    (``Transport.connection_errors``), so ``Connection.ensure`` retries the
    publish per the retry policy, and a builtin ``ConnectionError`` for code
    that catches that.
    """


RestorePolicy = Literal["on_disconnect", "after_visibility_timeout", "in_restore_sweeps"]
#: RabbitMQ's default ``consumer_timeout`` (since 3.8.15), in seconds.
RABBITMQ_CONSUMER_TIMEOUT = 1800.0


@dataclass(frozen=True)
class BrokerProfile:
    """How a broker treats unacked messages.

    ``rabbitmq`` returns a consumer's unacked messages to the queue as soon as
    its connection drops, each at its original place in the queue, and closes
    the channel of a consumer that holds a delivery unacked longer than
    ``consumer_timeout`` (RabbitMQ's default, 30 minutes): its unacked messages
    come back and its late ack is refused. ``sqs`` makes a message visible
    again ``visibility_timeout`` seconds after its delivery, whatever the
    consumer does, so a message held longer than that (an ETA, a long task) is
    delivered again. ``redis`` has no timer of its own: kombu's consumers
    restore the messages whose ``visibility_timeout`` has passed in *restore
    sweeps*, one when a consumer's connection comes up and then one every
    ``restore_sweep_period`` seconds (``unacked_restore_interval`` times
    ``unacked_restore_throttle``: 100 s by default). A restored message keeps
    its delivery tag there (kombu restores the payload as it was), so whichever
    copy acks first settles the message.
    """

    name: str
    restore: RestorePolicy
    visibility_timeout: float | None = None
    consumer_timeout: float | None = None
    tags_survive_restore: bool = False
    restore_sweep_period: float | None = None

    @classmethod
    def named(cls, name: str, transport_options: dict[str, Any] | None = None) -> BrokerProfile:
        options = transport_options or {}
        if name == "rabbitmq":
            return cls(name, "on_disconnect", consumer_timeout=RABBITMQ_CONSUMER_TIMEOUT)
        if name == "redis":
            timeout = _visibility_timeout(options, 3600.0)
            interval, throttle = redis_restore_cadence(options)
            return cls(
                name,
                "in_restore_sweeps",
                timeout,
                tags_survive_restore=True,
                restore_sweep_period=interval * throttle,
            )
        if name == "sqs":
            timeout = _visibility_timeout(options, 1800.0)
            return cls(name, "after_visibility_timeout", timeout)
        raise ValueError(
            f"unknown broker profile {name!r}; expected one of 'rabbitmq', 'redis', 'sqs'"
        )


def _visibility_timeout(options: dict[str, Any], default: float) -> float:
    """``broker_transport_options['visibility_timeout']``, a number as kombu needs it."""
    value = options.get("visibility_timeout", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ConfigError(
            f"broker_transport_options['visibility_timeout']={value!r}: expected a finite "
            f"number of seconds >= 0 (kombu computes with it as a number)"
        )
    return float(value)


@dataclass
class StoredMessage:
    """A message as the broker holds it: the raw kombu payload and where it goes."""

    number: int
    queue: str
    payload: dict[str, Any]
    task_id: str
    task_name: str
    deliveries: int = 0
    redeliveries_left: int = 0
    tag: str | None = None  # the delivery tag it carries, where a broker keeps it

    @property
    def headers(self) -> dict[str, Any]:
        return self.payload.get("headers") or {}


@dataclass
class Delivery:
    """One delivery of a stored message to a consumer, unacked until it is settled."""

    tag: str
    message: StoredMessage
    consumer: str
    number: int
    redelivered: bool
    delivered_at: float
    settled: bool = False
    settlement: Settlement = ""  # "ack", "reject" or "restore", once settled
    timer: Any = None


class BrokerEvent(NamedTuple):
    """One line of the ledger (immutable; a tuple, built several times per delivery)."""

    time: float
    kind: LedgerEventKind
    task_id: str
    task_name: str
    message: int
    delivery: int | None = None
    consumer: str | None = None
    detail: str = ""


@dataclass
class Ledger:
    """Every broker event, in order: published, delivered, acked, rejected, restored, ..."""

    events: list[BrokerEvent] = field(default_factory=list)
    observers: list[Callable[[BrokerEvent], None]] = field(default_factory=list)
    _by_task: dict[str, list[BrokerEvent]] = field(default_factory=dict, repr=False)

    def record(self, event: BrokerEvent) -> None:
        self.events.append(event)
        self._by_task.setdefault(event.task_id, []).append(event)
        for observe in self.observers:
            observe(event)

    def for_task(self, task_id: str) -> list[BrokerEvent]:
        return list(self._by_task.get(task_id, ()))

    def clear(self) -> None:
        self.events.clear()
        self._by_task.clear()

    def kinds(self, task_id: str | None = None) -> list[str]:
        return [e.kind for e in self.events if task_id is None or e.task_id == task_id]

    def __iter__(self) -> Any:
        return iter(self.events)

    def __len__(self) -> int:
        return len(self.events)


class InMemoryBroker:
    """Queues and unacked deliveries for one harness, on a virtual clock."""

    _registry: weakref.WeakValueDictionary[str, InMemoryBroker] = weakref.WeakValueDictionary()
    _ids = itertools.count(1)

    def __init__(self, clock: VirtualClock, profile: BrokerProfile | None = None) -> None:
        self.clock = clock
        self.profile = profile or BrokerProfile.named("rabbitmq")
        self.ledger = Ledger()
        self.queues: dict[str, deque[StoredMessage]] = {}
        self.unacked: dict[str, Delivery] = {}
        self.exchange_state = virtual.BrokerState()
        self.name = f"broker-{next(self._ids)}"
        #: Wraps every publish (the harness makes each one a side effect).
        self.publish_through: (
            Callable[[str, Callable[[], StoredMessage]], StoredMessage] | None
        ) = None
        self.after_publish: list[Callable[[StoredMessage], None]] = []
        #: Decides each publish attempt's fate, and says why (a publish fault is armed).
        self.publish_fault: Callable[[str, dict[str, Any]], tuple[PublishFate, str]] | None = None
        self._numbers = itertools.count(1)
        self._dropped_acks: dict[str, Callable[[], None]] = {}
        self._held: dict[str, int] = {}  # task id -> copies ready or unacked here
        self._tags = itertools.count(1)
        #: The tags kombu's ``basic_publish`` stamps on a message (ours replace them on delivery).
        self.publish_tags = itertools.count(1)
        self.closed = False
        #: Told the consumer tag whose channel the broker closed (``consumer_timeout``).
        self.channel_closed: list[Callable[[str], None]] = []
        #: Redis: consumer -> the instant its restore sweeps count from (its connection's start).
        self._sweepers: dict[str, float] = {}
        self._swept_at: float | None = None
        self._sweep_timer: Any = None
        #: Remote control: reply queues, and each live worker's mailbox by node name.
        self.control_queues: dict[str, deque[dict[str, Any]]] = {}
        self.mailboxes: dict[str, Callable[[dict[str, Any]], None]] = {}
        #: Called once every mailbox has handled a broadcast.
        self.after_broadcast: list[Callable[[], None]] = []
        InMemoryBroker._registry[self.name] = self

    @property
    def url(self) -> str:
        return f"{SCHEME}://{self.name}"

    def connection(self) -> Connection:
        """A kombu connection to this broker.

        The broker itself travels in ``transport_options`` (kept by
        ``Connection.clone()``, so by every pooled connection), so the
        transport finds it however its module was imported; the name in the
        URL is the fallback for connections Celery makes on its own.
        """
        return Connection(self.url, transport_options={TRANSPORT_OPTION: self})

    @classmethod
    def by_name(cls, name: str) -> InMemoryBroker:
        try:
            return cls._registry[name]
        except KeyError:
            raise LookupError(
                f"no in-memory broker {name!r} is active: the app published to "
                f"{SCHEME}://{name} outside the celery_faults harness that owns it"
            ) from None

    # -- publishing -------------------------------------------------------------

    def publish(self, queue: str, payload: dict[str, Any]) -> StoredMessage:
        """Store a message published to ``queue``, through :attr:`publish_through` if set."""
        if self.closed:
            raise ConnectionError(f"{self.url} is closed: its harness has ended")
        fate, why = self.publish_fault(queue, payload) if self.publish_fault else ("", "")
        if fate == "refuse":
            refused = self._unqueued(queue, payload)
            self._record("publish_refused", refused, detail=why)
            raise PublishRefused(
                f"celery_faults: {self.url} refused the publish of "
                f"{refused.task_name}[{refused.task_id}] to {queue!r} ({why})"
            )
        store = self._store if fate != "lose" else self._lose
        if self.publish_through is None:
            message = store(queue, payload, why)
        else:
            headers = payload.get("headers") or {}
            label = f"{headers.get('task', '?')} to {queue!r}"
            message = self.publish_through(label, lambda: store(queue, payload, why))
        if fate == "twice":
            self._record("confirm_lost", message, detail=why)
            raise PublishRefused(
                f"celery_faults: the connection to {self.url} dropped before the broker "
                f"confirmed the publish of {message.task_name}[{message.task_id}] ({why})"
            )
        return message

    def _unqueued(self, queue: str, payload: dict[str, Any]) -> StoredMessage:
        """A message as published, numbered, that no queue holds."""
        headers = payload.get("headers") or {}
        return StoredMessage(
            number=next(self._numbers),
            queue=queue,
            payload=payload,
            task_id=str(headers.get("id", "?")),
            task_name=str(headers.get("task", "?")),
        )

    def _lose(self, queue: str, payload: dict[str, Any], why: str = "") -> StoredMessage:
        """The publish returns, but no queue holds the message (no publisher confirms)."""
        message = self._unqueued(queue, payload)
        self._record("publish_lost", message, detail=why)
        return message

    def _store(self, queue: str, payload: dict[str, Any], why: str = "") -> StoredMessage:
        message = self._unqueued(queue, payload)
        self.queues.setdefault(queue, deque()).append(message)
        self._hold(message.task_id, 1)
        self._record("published", message, detail=f"to {queue!r}")
        for after in self.after_publish:
            after(message)
        return message

    def declare(self, queue: str) -> None:
        self.queues.setdefault(queue, deque())

    def ready_count(self, queue: str | None = None) -> int:
        if queue is not None:
            return len(self.queues.get(queue, ()))
        return sum(len(q) for q in self.queues.values())

    def holds(self, task_id: str) -> bool:
        """Whether a copy of a message for ``task_id`` is ready or unacked here."""
        return self._held.get(task_id, 0) > 0

    def _hold(self, task_id: str, change: int) -> None:
        self._held[task_id] = self._held.get(task_id, 0) + change

    def take(self, queue: str) -> StoredMessage | None:
        """Remove the next ready message of ``queue`` without tracking it (``basic_get``)."""
        ready = self.queues.get(queue)
        if not ready:
            return None
        message = ready.popleft()
        self._hold(message.task_id, -1)
        return message

    def purge(self, queue: str) -> int:
        ready = self.queues.get(queue)
        if not ready:
            return 0
        count = len(ready)
        for message in ready:
            self._hold(message.task_id, -1)
        ready.clear()
        return count

    def delete(self, queue: str) -> None:
        self.purge(queue)
        self.queues.pop(queue, None)

    # -- remote control ---------------------------------------------------------

    def broadcast(self, payload: dict[str, Any]) -> None:
        """A control message to the mailbox exchange: each live worker handles it now.

        No task queue, ledger line or side effect: control travels apart from
        tasks, as on a real broker. Whatever a worker replies is in the reply
        queue when this returns, so the client's wait ends without a real second.
        """
        if self.closed:
            raise ConnectionError(f"{self.url} is closed: its harness has ended")
        for handle in list(self.mailboxes.values()):
            handle(dict(payload))
        for after in self.after_broadcast:
            after()

    def put_control(self, queue: str, payload: dict[str, Any]) -> None:
        self.control_queues.setdefault(queue, deque()).append(payload)

    def take_control(self, queue: str) -> dict[str, Any] | None:
        waiting = self.control_queues.get(queue)
        return waiting.popleft() if waiting else None

    # -- consuming --------------------------------------------------------------

    def fetch(self, queues: Iterable[str], consumer: str) -> Delivery | None:
        """Deliver the next ready message of ``queues`` to ``consumer``, unacked."""
        for queue in queues:
            ready = self.queues.get(queue)
            if ready:
                return self._deliver(ready.popleft(), consumer)
        return None

    def deliver_copy(self, message: StoredMessage, consumer: str) -> Delivery:
        """Deliver ``message`` once more while an earlier delivery is still unacked.

        What a duplicate publish, or a visibility timeout passing under a long
        task, puts in a consumer's hands: two copies in flight at once.
        """
        self._hold(message.task_id, 1)
        return self._deliver(message, consumer, fresh_tag=True)

    def _deliver(
        self, message: StoredMessage, consumer: str, *, fresh_tag: bool = False
    ) -> Delivery:
        message.deliveries += 1
        redelivered = message.deliveries > 1
        tag = message.tag
        if tag is None or fresh_tag or not self.profile.tags_survive_restore:
            tag = message.tag = f"{self.name}.{next(self._tags)}"
        delivery = Delivery(
            tag=tag,
            message=message,
            consumer=consumer,
            number=message.deliveries,
            redelivered=redelivered,
            delivered_at=self.clock.time(),
        )
        self.unacked[delivery.tag] = delivery
        self._record(
            "delivered", message, delivery, detail="redelivered=True" if redelivered else ""
        )
        timeout = self.profile.visibility_timeout
        if self.profile.restore == "in_restore_sweeps":
            if self._sweep_timer is None:
                self._schedule_sweep()
        elif self.profile.restore == "after_visibility_timeout" and timeout is not None:
            delivery.timer = self.clock.call_at(
                delivery.delivered_at + timeout,
                lambda: self._visibility_expired(delivery),
            )
        elif self.profile.consumer_timeout is not None:
            delivery.timer = self.clock.call_at(
                delivery.delivered_at + self.profile.consumer_timeout,
                lambda: self._consumer_timed_out(delivery),
            )
        return delivery

    def unacked_by(self, consumer: str) -> int:
        """How many deliveries ``consumer`` holds unacked: what a prefetch count limits."""
        return sum(delivery.consumer == consumer for delivery in self.unacked.values())

    def kombu_payload(self, delivery: Delivery) -> dict[str, Any]:
        """The raw payload kombu's virtual ``Message`` is built from, for this delivery."""
        payload = dict(delivery.message.payload)
        properties = dict(payload.get("properties") or {})
        info = dict(properties.get("delivery_info") or {})
        info["redelivered"] = delivery.redelivered
        properties["delivery_info"] = info
        properties["delivery_tag"] = delivery.tag
        payload["properties"] = properties
        return payload

    # -- settling ---------------------------------------------------------------

    def drop_ack(self, tag: str, on_lost: Callable[[], None]) -> None:
        """The ack for ``tag`` will be lost on its way; ``on_lost`` runs when it is sent."""
        self._dropped_acks[tag] = on_lost

    def ack(self, tag: str) -> None:
        on_lost = self._dropped_acks.pop(tag, None)
        if on_lost is not None:
            on_lost()
            self.lose_ack(tag)
            return
        delivery = self._settle(tag, "ack")
        if delivery is not None:
            self._record("acked", delivery.message, delivery)

    def reject(self, tag: str, requeue: bool) -> None:
        delivery = self._settle(tag, "reject")
        if delivery is None:
            return
        if requeue:
            self._record("rejected", delivery.message, delivery, detail="requeue")
            self._restore(delivery.message, reason="requeued", last=self.profile.name == "redis")
        else:
            self._record("rejected", delivery.message, delivery, detail="drop")

    def lose_ack(self, tag: str) -> None:
        """The consumer acked ``tag`` but the ack never reached the broker."""
        delivery = self.unacked.get(tag)
        if delivery is not None:
            self._record("ack_lost", delivery.message, delivery)

    def redeliver(self, message: StoredMessage) -> None:
        """Put a delivered message back, as a broker redelivering it would."""
        self._restore(message, reason="to be delivered again")

    def connection_lost(self, consumer: str, *, graceful: bool = False) -> None:
        """``consumer``'s connection dropped: what happens to its unacked messages.

        RabbitMQ returns them at once. Redis returns them at once only on a
        graceful close (kombu's ``restore_at_shutdown``); after a crash they
        wait out the visibility timeout since their delivery, and then a
        restore sweep of a consumer still (or again) connected.
        """
        self._sweepers.pop(consumer, None)
        held = [d for d in self.unacked.values() if d.consumer == consumer]
        immediate = graceful or self.profile.restore == "on_disconnect"
        for delivery in held:
            if immediate:
                self._settle(delivery.tag, "restore")
                self._restore(delivery.message, reason="connection lost", delivery=delivery)
            else:
                delivery.consumer = ""  # orphaned until its visibility timeout
                self._record(
                    "orphaned",
                    delivery.message,
                    delivery,
                    detail=f"waits for visibility_timeout={self.profile.visibility_timeout:g}s",
                )
        if self.profile.restore == "in_restore_sweeps":
            self._schedule_sweep()

    def consumer_started(self, consumer: str) -> None:
        """``consumer``'s connection is up. On Redis, kombu sweeps at once, then periodically."""
        if self.profile.restore != "in_restore_sweeps":
            return
        self._sweepers[consumer] = self.clock.time()
        self._sweep()

    def _sweep(self) -> None:
        """kombu's ``QoS.restore_visible``: restore what was delivered a visibility timeout ago.

        Newest delivery first, each pushed where the consumer takes next, so the
        oldest is delivered first again.
        """
        self._sweep_timer = None
        now = self._swept_at = self.clock.time()
        timeout = self.profile.visibility_timeout or 0.0
        visible = [d for d in self.unacked.values() if d.delivered_at + timeout <= now]
        visible.sort(key=lambda delivery: delivery.delivered_at)  # ties: in delivery order
        for delivery in reversed(visible):
            self._settle(delivery.tag, "restore")
            self._restore(
                delivery.message,
                reason=f"visibility_timeout={timeout:g}s passed, restore sweep",
                delivery=delivery,
            )
        self._schedule_sweep()

    def _schedule_sweep(self) -> None:
        """Set the one timer for the next sweep that will find something to restore."""
        if self._sweep_timer is not None:
            self.clock.cancel(self._sweep_timer)
            self._sweep_timer = None
        period = self.profile.restore_sweep_period
        if not self._sweepers or not self.unacked or not period:
            return
        timeout = self.profile.visibility_timeout or 0.0
        visible_at = min(d.delivered_at for d in self.unacked.values()) + timeout
        now = self.clock.time()
        earliest = max(visible_at, now)
        due: float | None = None
        for started in self._sweepers.values():
            moment = started + math.ceil(max(earliest - started, 0.0) / period) * period
            if moment <= now and self._swept_at == now:
                moment += period  # this instant's sweep has run
            due = moment if due is None else min(due, moment)
        if due is not None:
            self._sweep_timer = self.clock.call_at(due, self._sweep)

    def _consumer_timed_out(self, delivery: Delivery) -> None:
        """RabbitMQ closes the channel of a consumer that held a delivery too long."""
        if delivery.settled or self.closed:
            return
        consumer = delivery.consumer
        self._record(
            "channel_closed",
            delivery.message,
            delivery,
            detail=f"unacked for consumer_timeout={self.profile.consumer_timeout:g}s "
            "(PRECONDITION_FAILED)",
        )
        self.connection_lost(consumer)
        for observe in self.channel_closed:
            observe(consumer)

    def _visibility_expired(self, delivery: Delivery) -> None:
        if delivery.settled or self.closed:
            return
        self._settle(delivery.tag, "restore")
        self._restore(
            delivery.message,
            reason=f"visibility_timeout={self.profile.visibility_timeout:g}s passed",
            delivery=delivery,
        )

    def _settle(self, tag: str, how: Settlement) -> Delivery | None:
        delivery = self.unacked.pop(tag, None)
        if delivery is None:
            self._record_stale(tag, how)
            return None
        delivery.settled = True
        delivery.settlement = how
        self._hold(delivery.message.task_id, -1)
        if delivery.timer is not None:
            self.clock.cancel(delivery.timer)
        if self._sweep_timer is not None and not self.unacked:
            self.clock.cancel(self._sweep_timer)
            self._sweep_timer = None
        return delivery

    def _record_stale(self, tag: str, how: Settlement) -> None:
        # An ack or reject for a delivery the broker already took back (its
        # visibility timeout passed, or its connection dropped): ignored, as
        # Redis ignores it. Recorded, because it explains a duplicate.
        name, _, _ = tag.rpartition(".")
        if name != self.name or how not in _IGNORED:
            return
        self.ledger.record(
            BrokerEvent(self.clock.time(), _IGNORED[how], "?", "?", 0, detail=f"tag {tag}")
        )

    def _restore(
        self,
        message: StoredMessage,
        *,
        reason: str,
        delivery: Delivery | None = None,
        last: bool = False,
    ) -> None:
        """Put ``message`` back in its queue: where the broker puts a message it takes back.

        RabbitMQ: at its original place among the messages waiting. Redis and
        SQS: next in line (kombu pushes it to the end the consumer pops from),
        or ``last`` for a Redis reject with requeue (kombu pushes it to the other end).
        """
        ready = self.queues.setdefault(message.queue, deque())
        if last:
            ready.append(message)
        elif self.profile.restore == "on_disconnect":
            place = next(
                (i for i, waiting in enumerate(ready) if waiting.number > message.number),
                len(ready),
            )
            ready.insert(place, message)
        else:
            ready.appendleft(message)
        self._hold(message.task_id, 1)
        self._record("restored", message, delivery, detail=reason)

    def _record(
        self,
        kind: LedgerEventKind,
        message: StoredMessage,
        delivery: Delivery | None = None,
        detail: str = "",
    ) -> None:
        self.ledger.record(
            BrokerEvent(
                time=self.clock.time(),
                kind=kind,
                task_id=message.task_id,
                task_name=message.task_name,
                message=message.number,
                delivery=delivery.number if delivery else None,
                consumer=(delivery.consumer or None) if delivery else None,
                detail=detail,
            )
        )

    def reset(self) -> None:
        """Empty every queue, forget every delivery and event: a fresh scenario."""
        for delivery in self.unacked.values():
            if delivery.timer is not None:
                self.clock.cancel(delivery.timer)
        self.queues.clear()
        self.unacked.clear()
        self.ledger.clear()
        self._held.clear()
        self._dropped_acks.clear()
        self.control_queues.clear()
        # The clock goes back to its start with the workers' connections.
        self._sweepers = dict.fromkeys(self._sweepers, self.clock.start)
        self._swept_at = self._sweep_timer = None

    def close(self) -> None:
        self.closed = True
        for delivery in self.unacked.values():
            if delivery.timer is not None:
                self.clock.cancel(delivery.timer)
        InMemoryBroker._registry.pop(self.name, None)


# -- the kombu transport ---------------------------------------------------------


class Channel(virtual.Channel):
    """A kombu virtual channel whose queues live in an :class:`InMemoryBroker`."""

    body_encoding = None  # type: ignore[assignment]  # bytes stay bytes: no base64 round trip
    do_restore = False
    supports_fanout = True  # the mailbox's broadcasts: see _put_fanout

    def _next_delivery_tag(self) -> str:
        # kombu stamps a uuid4 on each published message; a counter is as unique
        # here and much cheaper. It never starts with the broker's name, so an ack
        # of a message taken by ``basic_get`` goes to kombu's own QoS, as before.
        return f"published.{next(self.broker.publish_tags)}"

    @property
    def broker(self) -> InMemoryBroker:
        return self.connection.broker  # type: ignore[no-any-return]

    def _has_queue(self, queue: str, **kwargs: Any) -> bool:
        if is_control(queue):
            return queue in self.broker.control_queues
        return queue in self.broker.queues

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        if is_control(queue):
            self.broker.control_queues.setdefault(queue, deque())
        else:
            self.broker.declare(queue)

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        if is_control(queue):
            self.broker.put_control(queue, message)
        else:
            self.broker.publish(queue, message)

    def _put_fanout(
        self, exchange: str, message: dict[str, Any], routing_key: str, **_: Any
    ) -> None:
        if is_control(exchange):
            self.broker.broadcast(message)
            return
        bound = self._lookup(exchange, routing_key)  # type: ignore[no-untyped-call]
        for queue in bound:  # another fanout exchange: each queue bound to it
            self._put(queue, dict(message))

    def _queue_bind(self, *args: Any) -> None:
        """Bindings live in kombu's exchange table (shared through the broker's state)."""

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        if is_control(queue):
            payload = self.broker.take_control(queue)
            if payload is None:
                raise virtual.Empty()
            return payload
        stored = self.broker.take(queue)
        if stored is None:
            raise virtual.Empty()
        return stored.payload

    def _size(self, queue: str) -> int:
        if is_control(queue):
            return len(self.broker.control_queues.get(queue, ()))
        return self.broker.ready_count(queue)

    def _purge(self, queue: str) -> int:
        if is_control(queue):
            waiting = self.broker.control_queues.get(queue)
            count = len(waiting or ())
            if waiting:
                waiting.clear()
            return count
        return self.broker.purge(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        if is_control(queue):
            self.broker.control_queues.pop(queue, None)
        else:
            self.broker.delete(queue)

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        if delivery_tag in self.broker.unacked or str(delivery_tag).startswith(self.broker.name):
            self.broker.ack(delivery_tag)
        else:
            super().basic_ack(delivery_tag, multiple)  # type: ignore[no-untyped-call]

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if delivery_tag in self.broker.unacked or str(delivery_tag).startswith(self.broker.name):
            self.broker.reject(delivery_tag, requeue)
        else:
            super().basic_reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]


class BoundProducer(Producer):
    """kombu's ``Producer``, bound to one channel until a publish raises.

    ``maybe_declare`` reads kombu's declared-entities cache (the very check
    ``kombu.common.maybe_declare`` makes) before kombu binds a copy of the
    entity to the channel only to find it there; a miss declares as kombu does.
    """

    pool: BoundProducerPool

    def maybe_declare(self, entity: Any, retry: bool = False, **retry_policy: Any) -> Any:
        if (
            entity
            and entity.can_cache_declaration
            and hash(entity) in self.channel.connection.client.declared_entities
        ):
            return False
        return super().maybe_declare(entity, retry, **retry_policy)  # type: ignore[no-untyped-call]

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # kombu replaces (closes) the pooled connection of a producer that
        # raised; the next publish then binds a new producer, as kombu's pool would.
        # A producer already replaced (a killed execution left its ``with`` only
        # when discarded, after another had replaced it) has nothing left to give
        # back, and must not close the connection that now serves the next one.
        if exc_type is None or self is not self.pool.bound:
            return
        super().__exit__(exc_type, exc, tb)
        self.pool.forget(self)


class BoundProducerPool:
    """A producer pool of one producer that stays bound, as ``app.amqp.producer_pool``.

    kombu's ``ProducerPool`` unbinds a producer on release and binds it to a
    channel again on the next acquire (a new channel, the exchange revived);
    publishing is the same on one channel kept for the harness's life. Every
    publish still goes through ``Task.apply_async`` and ``Producer.publish``.
    """

    def __init__(self, connections: Any) -> None:
        self.connections = connections  # Celery reads connections.connection.transport
        self.limit = connections.limit
        self._connection: Connection | None = None
        self._producer: BoundProducer | None = None

    def acquire(self, block: bool = False, timeout: float | None = None) -> BoundProducer:
        producer = self._producer
        if producer is None:
            self._connection = self.connections.acquire(block=True, timeout=timeout)
            producer = BoundProducer(self._connection)  # type: ignore[no-untyped-call]
            producer.pool = self
            self._producer = producer
        return producer  # its release() (on leaving ``with``) does nothing: it stays bound

    @property
    def bound(self) -> BoundProducer | None:
        """The producer every publish uses until one raises."""
        return self._producer

    def forget(self, producer: BoundProducer) -> None:
        """``producer``'s connection was replaced in its pool: bind a new one next time.

        The replaced connection goes back to the connection pool, as kombu's
        ``ProducerPool.release`` gives it back after ``Producer.__exit__``
        replaced it; kept, every fault at a publish would leak one, and after
        ``broker_pool_limit`` of them no publish could get a connection.
        """
        if producer is not self._producer:
            return
        connection = self._connection
        self._producer = self._connection = None
        if connection is not None:
            connection.release()

    def release(self, resource: Any) -> None:
        """Nothing to give back: the one producer stays bound."""

    def force_close_all(self) -> None:
        if self._connection is not None:
            self._connection.release()
        self._producer = self._connection = None


class Transport(virtual.Transport):
    """``celery-faults://NAME``: the kombu transport for the broker named NAME."""

    Channel = Channel
    #: Set on instances for the rabbitmq profile only (kombu asks ``hasattr``).
    recoverable_connection_errors: tuple[type[BaseException], ...]
    driver_type = driver_name = SCHEME
    implements = virtual.Transport.implements.extend(
        exchange_type=frozenset(["direct", "topic", "fanout"])
    )

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)  # type: ignore[no-untyped-call]
        given = client.transport_options.get(TRANSPORT_OPTION)
        self.broker = given if given is not None else InMemoryBroker.by_name(client.hostname)
        self.state = self.broker.exchange_state
        if self.broker.profile.name == "rabbitmq":
            # As py-amqp's transport: kombu's ensure() tells recoverable connection
            # errors apart, so a publish is retried up to the retry policy's
            # max_retries. Redis's and SQS's transports do not: kombu gives up when
            # the error comes back after one reconnection.
            self.recoverable_connection_errors = self.connection_errors

    def driver_version(self) -> str:
        return "in-memory"

    def drain_events(self, connection: Any, timeout: Any = None, **kwargs: Any) -> Any:
        """Deliver one waiting message, or time out at once.

        Only the mailbox's client drains here (``inspect()``, ``ping()``); the
        workers answered while the broadcast was published, so a reply that is
        not here now never comes: waiting out ``timeout`` would change nothing.
        """
        cycle = self.cycle
        if cycle is None:
            raise TimeoutError()
        try:
            return cycle.get(self._deliver, timeout=timeout)
        except virtual.Empty:
            raise TimeoutError() from None


def _transport_class() -> type[Transport]:
    return Transport


def register_transport() -> None:
    """Make ``celery-faults://`` a kombu transport: this module's, however it was imported."""
    TRANSPORT_ALIASES[SCHEME] = _transport_class  # type: ignore[assignment]
