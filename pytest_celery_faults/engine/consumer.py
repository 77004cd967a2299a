"""The consumer of an emulated worker: what it takes from the broker and when it runs it.

One :class:`EmulatedWorker` is one Celery worker process: its consumer
turns each message into the ``Request`` Celery's default strategy builds for
its task, keeps the prefetch count, holds ETA and rate-limited requests on
its timer, and hands a reserved request to its pool (:mod:`.pool`) with an
explicit :meth:`.pool.InProcessPool.execute`. It also owns the process's
life: warm and cold shutdown, a rollout's SIGTERM and SIGKILL, power loss,
a lost connection and a restart, and its remote-control mailbox
(:mod:`.control`).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.exceptions import CeleryError

from .. import _celery_internals as internals
from ..errors import raised_by_the_plugin
from ..grammar import Step
from ..vocabulary import COLD_SHUTDOWN, FREEZING_KINDS, POWER_LOST, Ending
from .broker import Delivery, InMemoryBroker
from .child import ChildExecution
from .clock import VirtualClock
from .control import WorkerMailbox
from .effects import EffectLog
from .execution import ExecutionRecord
from .plan import FaultPlan
from .pool import InProcessPool, Job
from .scheduler import Scheduler, run_unless_discarded
from .settings import per_child_limit, worker_concurrency


@dataclass(order=True)
class _Scheduled:
    eta: float
    order: int
    request: Any = field(compare=False)
    for_eta: bool = field(default=False, compare=False)  # else held by a rate limit


class EmulatedWorker:
    """One Celery worker with ``worker_concurrency`` children, consuming from an in-memory broker.

    Its concurrency is the app's ``worker_concurrency`` when the app sets it,
    else 1 (a real worker's default, the machine's CPU count, would make
    verdicts depend on the machine).
    """

    def __init__(
        self,
        *,
        app: Celery,
        broker: InMemoryBroker,
        clock: VirtualClock,
        effects: EffectLog,
        plan: FaultPlan,
        scheduler: Scheduler,
        index: int,
        concurrent: bool,
        on_record: Callable[[ExecutionRecord], None],
        on_fired: Callable[[ExecutionRecord, Step], None],
        on_note: Callable[[str, str], None],
        after_delivery: Callable[[Delivery], None],
        on_worker_fault: Callable[[EmulatedWorker, ChildExecution, Step], None] = (
            lambda worker, execution, step: None
        ),
    ) -> None:
        self.app = app
        self.broker = broker
        self.clock = clock
        self.effects = effects
        self.plan = plan
        self.scheduler = scheduler
        self.index = index
        self.concurrent = concurrent
        self.generation = 1
        self.hostname = f"celery@faults-{index}"
        self.consumer = f"{self.hostname}#{self.generation}"
        self.on_record = on_record
        self.on_fired = on_fired
        self.on_note = on_note
        self.after_delivery = after_delivery
        self.on_worker_fault = on_worker_fault
        #: A rollout's timers (SIGKILL after the grace, the cold shutdown), cancelled
        #: when the worker is gone before they fire.
        self.shutdown_timers: list[Any] = []
        self.rolled_out_by: str | None = None  # the task whose rollout SIGTERMed the worker
        self.alive = True
        self.concurrency = worker_concurrency(app)
        self.max_tasks_per_child = per_child_limit(app, "worker_max_tasks_per_child")
        self.max_memory_per_child = per_child_limit(app, "worker_max_memory_per_child")
        self.extra_slots = 0  # children lent to duplicate copies (``overlap``)
        self.pool = InProcessPool(self)
        self.reserved: deque[Any] = deque()
        self.scheduled: list[_Scheduled] = []
        self.callback_errors: list[BaseException] = []
        self.request_ids: set[str] = set()
        self._order = itertools.count()
        self._children = itertools.count(1)
        self._request_classes: dict[str, type[Any]] = {}
        self.connection = broker.connection()
        self.channel = self.connection.default_channel
        self.accept = internals.accept_content(app)
        multiplier = app.conf.worker_prefetch_multiplier
        #: basic.qos as the consumer starts: concurrency x multiplier; 0 (multiplier 0): no limit.
        self.initial_prefetch = max(1, int(multiplier)) * self.concurrency if multiplier else 0
        self._fresh_qos = internals.consumer_qos(app)
        self.qos = self._fresh_qos(self.initial_prefetch)
        self.one_per_child = internals.prefetch_disabled(app, broker.profile.name)
        self.broken_connection = False
        self.stop_requested = False
        self.rate_limits_disabled = bool(app.conf.worker_disable_rate_limits)
        self._token_back_at: dict[str, float] = {}  # task name -> when its bucket refills
        self.mailbox = WorkerMailbox(self)
        self.mailbox.open()
        broker.consumer_started(self.consumer)

    def next_pid(self) -> int:
        return 10_000 * self.index + 100 * self.generation + next(self._children)

    def held_for_eta(self) -> list[tuple[float, Any]]:
        """The requests the consumer holds for their ETA, soonest first."""
        return [(s.eta, s.request) for s in sorted(self.scheduled) if s.for_eta]

    def could_be_cut_off_or_overlap(
        self, execution: ChildExecution, hard_limit: float | None
    ) -> bool:
        """Whether the execution could be frozen or overlap another (else it runs alone now)."""
        step = execution.step
        return (
            self.concurrent
            or self.extra_slots > 0
            or bool(hard_limit)
            or (
                step is not None
                and (step.kind in FREEZING_KINDS or step.kind in ("overlap", "rollout"))
            )
        )

    # -- taking messages --------------------------------------------------------

    def wants_more(self) -> bool:
        """Whether the consumer may take another message: its prefetch count has room.

        RabbitMQ's ``basic.qos`` and kombu's Redis ``QoS.can_consume`` count the
        messages delivered to the consumer and not yet acked, whatever the worker
        does with them: waiting, held for an ETA (the count was raised for it),
        running under ``acks_late``. An early ack frees its slot when it is sent.
        """
        if not self.alive or self.stop_requested:
            return False
        if self.one_per_child and len(self.reserved) + len(self.pool.running) >= self.concurrency:
            return False
        limit: int = self.qos.value
        if not limit or len(self.broker.unacked) < limit:  # every consumer's: room for sure
            return True
        return self.broker.unacked_by(self.consumer) < limit

    def fetch(self) -> bool:
        """Take one ready message from the broker; ``False`` when there was none."""
        delivery = self.broker.fetch(list(self.broker.queues), self.consumer)
        if delivery is None:
            return False
        self._receive(delivery)
        return True

    def _receive(self, delivery: Delivery, *, first: bool = False) -> None:
        message = self.channel.Message(self.broker.kombu_payload(delivery), channel=self.channel)
        message.accept = self.accept
        name = delivery.message.task_name
        task = self.app.tasks.get(name)
        if task is None:
            internals.refuse_unregistered(self.app, message)
            self.on_note(
                delivery.message.task_id,
                f"{self.hostname} has no task named {name!r} (NotRegistered)",
            )
            return
        try:
            request_class = self._request_classes[name]
        except KeyError:
            internals.guard_run(task, run_unless_discarded)
            request_class = self._request_classes[name] = internals.request_class_for(
                task, self.pool, self.hostname, self.app
            )
        try:
            request = request_class(
                message,
                on_ack=message.ack_log_error,
                on_reject=message.reject_log_error,
                app=self.app,
                hostname=self.hostname,
                task=task,
                connection_errors=(),
                body=message.body,
                headers=message.headers,
                decoded=False,
                utc=self.app.uses_utc_timezone(),
            )
        except Exception as exc:  # InvalidTaskError, ContentDisallowed, DecodeError
            answer = internals.refuse_undecodable(self.app, message, exc)
            self.callback_errors.append(exc)
            self.on_note(
                delivery.message.task_id,
                f"{self.hostname} cannot take it ({answer}): {type(exc).__name__}: {exc}",
            )
            return
        request._celery_faults_delivery = delivery
        self.request_ids.add(request.id)
        if request.id in self.mailbox.revoked:  # Celery's strategy asks, then revoked() acts
            self.on_note(request.id, f"revoked: {self.hostname} discards it on receipt")
            with self.mailbox.holding_revoked():
                if internals.revoked_at_receipt(request):
                    return
        eta = request.eta
        if eta is not None:
            due = eta.timestamp()
            if due > self.clock.time():
                # Celery's strategy: the timer holds it, and the prefetch count grows by one.
                self.qos.increment_eventually()
                heapq.heappush(
                    self.scheduled, _Scheduled(due, next(self._order), request, for_eta=True)
                )
                internals.request_scheduled(request)
                return
        internals.request_reserved(request)
        if first:
            self.reserved.appendleft(request)
        else:
            self.reserved.append(request)

    def release_due(self) -> None:
        """Move ETA requests whose time has come to the reserved queue."""
        now = self.clock.time()
        while self.scheduled and self.scheduled[0].eta <= now:
            due = heapq.heappop(self.scheduled)
            if due.for_eta:  # Consumer.apply_eta_task: the prefetch count goes back down
                self.qos.decrement_eventually()
            internals.request_reserved(due.request)  # Celery's apply_eta_task
            self.reserved.append(due.request)

    def next_eta(self) -> float | None:
        return self.scheduled[0].eta if self.scheduled else None

    # -- running ----------------------------------------------------------------

    def free_slots(self) -> int:
        if not self.alive or self.stop_requested:
            return 0
        return self.concurrency + self.extra_slots - len(self.pool.running)

    def start_next(self) -> bool:
        """Hand one reserved request to a free child; ``False`` when none can start.

        An inline execution has ended when this returns; one on a stack of its
        own has only started, and runs when the scheduler picks it.
        """
        if not self.reserved or self.free_slots() <= 0:
            return False
        request = self.reserved.popleft()
        delivery: Delivery = request._celery_faults_delivery
        if request.expires is not None:
            with self.mailbox.holding_revoked():
                if internals.expire_on_virtual_clock(request, self.clock.time()):
                    return True
        allowed_at = self._rate_limited_until(request)
        if allowed_at is not None:  # Celery's consumer holds it on its timer until then
            heapq.heappush(self.scheduled, _Scheduled(allowed_at, next(self._order), request))
            return True
        task_id, name = delivery.message.task_id, delivery.message.task_name
        number, step = self.plan.next_delivery(task_id, name)
        if step is not None:
            step.check_time_limits(name, *internals.time_limits_applied(request, self.app))
        record = ExecutionRecord(task_id, name, number, self.consumer, step)
        execution = ChildExecution(
            task_id=task_id,
            task_name=name,
            delivery=number,
            step=step,
            record=record,
            clock=self.clock,
            on_fired=lambda ex, fired: self.on_fired(ex.record, fired),
            request_stop=self.request_stop,
            broker_delivery=delivery,
            on_note=self.on_note,
            worker_fault=lambda ex, fired: self.on_worker_fault(self, ex, fired),
        )
        if step is not None and step.kind == "ack_lost":
            self.broker.drop_ack(delivery.tag, lambda: self._ack_lost(record, step))
        if step is not None and step.kind == "overlap":
            self._overlap(delivery, execution, step)
        try:
            with self.mailbox.holding_revoked():
                self.pool.execute(request, execution)
        except Exception as exc:  # TaskRevokedError and friends: Celery's own refusal
            self.callback_errors.append(exc)
            if not isinstance(exc, CeleryError) and raised_by_the_plugin(exc):
                self.effects.plugin_failed(execution, exc, "as the pool took it")
            self.on_record(record)
        return True

    def reset_rate_limits(self) -> None:
        """A task's ``rate_limit`` changed (remote control): its bucket starts full."""
        self._token_back_at.clear()

    def _rate_limited_until(self, request: Any) -> float | None:
        """When the task's ``rate_limit`` lets ``request`` start, if not now.

        Celery's consumer gives each rate-limited task a token bucket of
        capacity 1 filled at the limit's rate: a start takes the token, the
        next one waits until it is back. Here the bucket reads the virtual clock.
        """
        if self.rate_limits_disabled:
            return None
        per_second = internals.rate_per_second(getattr(request.task, "rate_limit", None))
        if not per_second:
            return None
        now = self.clock.time()
        name = request.task.name
        ready = self._token_back_at.get(name, now)
        if ready > now:
            return ready
        self._token_back_at[name] = now + 1.0 / per_second
        return None

    def _overlap(self, delivery: Delivery, execution: ChildExecution, step: Step) -> None:
        """A second copy of the message arrives while this delivery runs; both run at once."""
        execution.step = None
        self.on_fired(execution.record, step)
        execution.record.fired = step
        self.extra_slots += 1
        copy = self.broker.deliver_copy(delivery.message, self.consumer)
        self._receive(copy, first=True)
        if step.schedule:
            self.scheduler.follow(step.schedule)

    def job_ended(self, job: Job) -> None:
        """The parent has reacted to a job's end (ack, reject, result): what comes next."""
        if self.extra_slots and len(self.pool.running) < self.concurrency + self.extra_slots:
            self.extra_slots -= 1
        self.after_delivery(job.execution.broker_delivery)
        if self.stop_requested and not self.pool.running:
            self.die(graceful=True)
        elif self.broken_connection:
            self.reconnect()

    def note(self, execution: ChildExecution, text: str) -> None:
        self.on_note(execution.task_id, text)

    # -- dying and reconnecting -------------------------------------------------

    def _ack_lost(self, record: ExecutionRecord, step: Step) -> None:
        """The ack was sent and lost (the fault fires then: before the body for an early ack)."""
        self.on_fired(record, step)
        record.fired = step
        self.broken_connection = True

    def request_stop(self) -> None:
        """A warm shutdown: take nothing more, let running tasks finish, then stop."""
        self.stop_requested = True

    def lose_power(self, *, graceful: bool, cause: Job) -> None:
        """The worker dies under its running children (power loss, or a cold shutdown).

        A cold shutdown first lets Celery's consumer cancel the active requests
        (its own decision to store RETRY or not), then closes the connection
        properly; power loss does nothing of the kind.
        """
        if graceful:
            self.pool.cancelling = True
            try:
                internals.cancel_active_requests(self.pool)
            finally:
                self.pool.cancelling = False
        ending: Ending = COLD_SHUTDOWN if graceful else POWER_LOST
        jobs = [cause, *(job for job in self.pool.running.values() if job is not cause)]
        self.scheduler.freeze_where(lambda stack: stack.owner in jobs, cause)
        self._cut_off(jobs, ending)
        self.die(graceful=graceful)

    def _cut_off(self, jobs: list[Job], ending: Ending) -> None:
        """The worker's children are gone under these jobs: each execution ends ``ending``."""
        for job in jobs:
            self.pool._settled(job)
            job.execution.dead = True
            job.execution.record.ended = ending
            self.on_record(job.execution.record)
            if job.execution.started:
                self.effects.execution_ended(job.execution, ending)

    # -- a rollout: SIGTERM, a grace, SIGKILL -----------------------------------

    def sigterm(self, *, grace: float, task_id: str) -> None:
        """A rollout's SIGTERM to the main process: Celery's own shutdown, then SIGKILL.

        SIGTERM starts the shutdown the installed Celery installed for it
        (:func:`.internals.sigterm_shutdown`): warm by default, the consumer
        takes nothing more and running tasks go on to their end; cold with
        ``REMAP_SIGTERM=SIGQUIT``, after the soft shutdown's wait (Celery 5.5+).
        Whatever still runs once ``grace`` virtual seconds have passed is
        SIGKILLed with the whole pod: frozen, and the connection drops uncleanly.
        """
        how = internals.sigterm_shutdown()
        self.rolled_out_by = task_id
        self.stop_requested = True  # either way: the consumer takes nothing more
        now = self.clock.time()
        if how == "warm":
            self.on_note(
                task_id,
                f"rollout: SIGTERM to {self.hostname}: warm shutdown (running tasks finish, "
                f"held messages go back when it exits); SIGKILL in {grace:g}s",
            )
        else:
            running = bool(self.pool.running)
            wait = internals.soft_shutdown_seconds(self.app, tasks_running=running)
            soft = f" after a soft shutdown of {wait:g}s" if wait else ""
            self.on_note(
                task_id,
                f"rollout: SIGTERM to {self.hostname}: cold shutdown (REMAP_SIGTERM=SIGQUIT)"
                f"{soft}; SIGKILL in {grace:g}s",
            )
            if wait < grace:
                self.shutdown_timers.append(
                    self.clock.call_at(now + wait, lambda: self._cold_after_soft(task_id))
                )
        self.shutdown_timers.append(
            self.clock.call_at(now + grace, lambda: self._grace_over(task_id, grace))
        )

    def _cold_after_soft(self, task_id: str) -> None:
        """Celery's ``on_cold_shutdown`` after the soft wait: cancel what runs, exit."""
        if not self.alive:
            return
        self.on_note(task_id, f"cold shutdown: {self.hostname} cancels its running tasks")
        jobs = list(self.pool.running.values())
        if not jobs:
            self.die(graceful=True)
            return
        self.lose_power(graceful=True, cause=jobs[0])

    def _grace_over(self, task_id: str, grace: float) -> None:
        """The termination grace is over: SIGKILL to every process of the pod."""
        if not self.alive:
            return
        jobs = list(self.pool.running.values())
        names = ", ".join(f"{job.execution.task_name}[{job.execution.task_id}]" for job in jobs)
        self.on_note(
            task_id,
            f"grace over: SIGKILL to {self.hostname} after {grace:g}s"
            + (f" (cut off: {names})" if names else ""),
        )
        self.scheduler.freeze_where(lambda stack: stack.owner in jobs, None)
        self._cut_off(jobs, POWER_LOST)
        self.die(graceful=False)

    def channel_lost(self) -> None:
        """The broker closed our channel: Celery's consumer restarts on a new connection.

        Running tasks go on in the pool; what was prefetched went back with the
        channel, and the acks still to come go to a channel that is gone.
        """
        self._drop_held()
        self.generation += 1
        self.consumer = f"{self.hostname}#{self.generation}"
        self.broker.consumer_started(self.consumer)

    def broker_restart(self, execution: ChildExecution) -> None:
        """The broker restarts under the worker: its connection drops, Celery reconnects.

        The broker takes back what the connection held unacked (RabbitMQ at
        once; Redis once the visibility timeout has passed). Celery's consumer
        (``on_connection_error_after_connected``, then ``on_close``) cancels the
        running ``acks_late`` tasks if told to, forgets its reserved and ETA
        requests, and starts again on a new connection; running tasks go on,
        and their late acks go to a channel that is gone.
        """
        self.on_note(
            execution.task_id,
            f"broker restart: {self.hostname}'s connection to {self.broker.profile.name} "
            f"drops; Celery's consumer reconnects, running tasks go on",
        )
        self.broker.connection_lost(self.consumer)
        self.pool.terminated_by = "Celery (worker_cancel_long_running_tasks_on_connection_loss)"
        try:
            internals.cancel_on_connection_loss(self.app, self.pool, self.hostname)
        finally:
            self.pool.terminated_by = "remote control"
        self._drop_held()
        self.generation += 1
        self.consumer = f"{self.hostname}#{self.generation}"
        self.broker.consumer_started(self.consumer)
        execution.take_signal()  # cancelled itself: the SIGTERM lands on its own child now

    def reconnect(self) -> None:
        """The connection dropped (a lost ack): the broker takes back what we held."""
        self.broken_connection = False
        self._drop_held()
        self.broker.connection_lost(self.consumer)
        self.generation += 1
        self.consumer = f"{self.hostname}#{self.generation}"
        self.broker.consumer_started(self.consumer)

    def restart(self, *, fresh_scenario: bool = False) -> None:
        """The supervisor starts the worker again: a new process with a new connection.

        The Python object is reused (its request classes stay valid: they are
        bound to this worker's pool and hostname), its state starts empty but
        for the revoked ids ``worker_state_db`` kept (none in a fresh scenario).
        """
        self.generation += 1
        self.consumer = f"{self.hostname}#{self.generation}"
        self.pool.retire_children()  # fresh children: new pids, billiard's handlers
        self.mailbox.close(clean=False)
        self.mailbox.fresh_process(keep_saved=not fresh_scenario)
        self.mailbox.open()
        self.alive = True
        self.rolled_out_by = None
        self._cancel_shutdown_timers()
        self.stop_requested = self.broken_connection = False
        self.extra_slots = 0
        self.pool.running.clear()
        self._token_back_at.clear()
        self._drop_held()
        self.broker.consumer_started(self.consumer)

    def die(self, *, graceful: bool = False) -> None:
        """The worker and its children are gone; its connection drops (closed, if graceful)."""
        self.alive = False
        if graceful and self.shutdown_timers and self.rolled_out_by is not None:
            self.on_note(self.rolled_out_by, f"{self.hostname} exited within the grace")
        self._cancel_shutdown_timers()
        self.mailbox.close(clean=graceful)
        self._drop_held()
        internals.node_requests_dropped(self.hostname)  # the process's memory is gone
        self.broker.connection_lost(self.consumer, graceful=graceful)

    def _cancel_shutdown_timers(self) -> None:
        timers, self.shutdown_timers = self.shutdown_timers, []
        for timer in timers:
            self.clock.cancel(timer)

    def _drop_held(self) -> None:
        if self.reserved or self.scheduled:
            internals.requests_dropped([*self.reserved, *(s.request for s in self.scheduled)])
        self.reserved.clear()
        self.scheduled.clear()
        # A new consumer (a new connection or channel) starts from the initial count.
        if self.qos.value != self.initial_prefetch:
            self.qos = self._fresh_qos(self.initial_prefetch)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.release()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<EmulatedWorker {self.consumer} {state} reserved={len(self.reserved)}>"
