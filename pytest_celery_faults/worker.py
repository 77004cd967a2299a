"""The emulated worker, and the pool through which Celery's own ``Request`` runs tasks.

A message becomes the ``Request`` class Celery's default strategy builds for
its task, and runs through ``Request.execute_using_pool`` on
:class:`InProcessPool`. The pool keeps billiard's contract: it calls
``accept_callback`` when the child takes the job (Celery acks early there),
then ``callback`` with the trace's result, or ``error_callback`` with what
billiard would report: the ``SystemExit`` a child raised, a ``WorkerLostError``
for a child killed by a signal, ``TimeLimitExceeded`` (followed by the timeout
callback) for a hard time limit. Every ack, reject, requeue and stored state is
therefore Celery's own decision for the installed version.

The child runs in this process. A fault that kills it unwinds the task with
:class:`ChildKilled`; from then on the child can perform no side effect and
store no result, as a dead process cannot.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from celery import Celery

from . import _celery_internals as internals
from .broker import Delivery, InMemoryBroker
from .clock import VirtualClock
from .effects import Effect, EffectLog
from .faults import FaultPlan, Step

SIGNALS = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM}
#: How an execution can end before the task did: the process running it went away.
CUT_SHORT = frozenset({"child killed", "exit", "power lost", "cold shutdown"})


class ChildKilled(BaseException):
    """The child process running the task is gone (signal or hard time limit)."""

    def __init__(self, step: Step) -> None:
        super().__init__(str(step))
        self.step = step


class TerminatedBySignal(SystemExit):
    """What billiard's ``_shutdown_cleanup`` raises in a child that got SIGTERM.

    The child unwinds (``finally`` blocks run, and may perform side effects),
    reports no result, and dies; the pool then reports ``signal 15 (SIGTERM)``.
    Measured on a real prefork worker (Celery 5.7, billiard 4.3.2).
    """

    def __init__(self, step: Step) -> None:
        super().__init__(-(256 - signal.SIGTERM))
        self.step = step


class PowerLost(BaseException):
    """The whole worker is gone: nothing more runs, acks or stores.

    ``graceful`` when it went by a cold shutdown, which still closes its broker
    connection properly (Redis then restores unacked messages at once).
    """

    def __init__(self, step: Step, *, graceful: bool = False) -> None:
        super().__init__(str(step))
        self.step = step
        self.graceful = graceful


@dataclass
class ExecutionRecord:
    """What happened to one delivery in the worker, for outcomes and timelines."""

    task_id: str
    task_name: str
    delivery: int
    worker: str
    step: Step | None
    started: bool = False
    fired: Step | None = None
    fired_after: int | None = None
    ended: str = ""  # "returned", "raised", "child killed", "exit", "power lost"
    effects: int = 0


@dataclass
class ChildExecution:
    """One task run in the child: counts side effects and fires the delivery's fault."""

    task_id: str
    task_name: str
    delivery: int
    step: Step | None
    record: ExecutionRecord
    on_fired: Callable[[ChildExecution, Step], None]
    soft_timeout: Callable[[], None]
    shutdown: Callable[[str], None]
    effect_count: int = 0
    dead: bool = False
    started: bool = False

    def start(self) -> None:
        """The child took the job: a fault at boundary 0 fires now, before the body."""
        self.started = True
        step = self.step
        if step is not None and step.at == 0 and step.kind != "raise":
            self._fire(step)

    def body_starts(self) -> None:
        """Celery's task_prerun: the task's body is about to run (an execution)."""
        self.record.started = True

    def before_effect(self, kind: str, label: str) -> None:
        if self.dead:
            raise ChildKilled(self.record.fired or Step("sigkill", 0))
        step = self.step
        if step is not None and step.kind == "raise" and step.at == self.effect_count:
            self._mark(step)
            raise step.exception_class()(f"injected by celery_faults: {step} before {label}")

    def after_effect(self, effect: Effect) -> None:
        self.record.effects = self.effect_count
        step = self.step
        if step is not None and step.kind != "raise" and step.at == self.effect_count:
            self._fire(step)

    def _mark(self, step: Step) -> None:
        self.step = None  # a step fires once
        self.record.fired = step
        self.record.fired_after = self.effect_count
        self.on_fired(self, step)

    def _fire(self, step: Step) -> None:
        self._mark(step)
        kind = step.kind
        if kind == "exit":
            sys.exit(step.code)
        if kind == "power_loss":
            self.dead = True
            raise PowerLost(step)
        if kind == "soft_timeout":
            self.soft_timeout()
            raise internals.SoftTimeLimitExceeded()
        if kind == "sigterm":
            raise TerminatedBySignal(step)
        if kind in ("sigkill", "timeout"):
            self.dead = True
            raise ChildKilled(step)
        if kind == "warm_shutdown":
            self.shutdown("warm")  # the running task goes on to its end
            return
        if kind == "cold_shutdown":
            self.shutdown("cold")
            self.dead = True
            raise PowerLost(step, graceful=True)
        raise AssertionError(f"fault kind {kind!r} does not fire at a boundary")


def where_it_hung(execution: ChildExecution, effects: EffectLog) -> str:
    """Which task was running, and after which side effect, when the run was stopped."""
    done = [e for e in effects.for_task(execution.task_id) if e.delivery == execution.delivery]
    place = (
        f"after side effect {done[-1].index} ({done[-1]})"
        if done
        else "before its first side effect"
    )
    return (
        f"celery_faults: task {execution.task_name}[{execution.task_id}] (delivery "
        f"{execution.delivery}) was running {place} when the test was stopped"
    )


class _AppliedJob:
    """What ``pool.apply_async`` returns; Celery keeps a weak reference to it."""

    def __init__(self, job: int) -> None:
        self.job = job

    def terminate(self, signum: int | None = None) -> None:
        """Nothing to do: the in-process child has already finished when Celery asks."""


class InProcessPool:
    """A pool with billiard's ``apply_async`` contract whose child is this process."""

    def __init__(self, worker: EmulatedWorker) -> None:
        self.worker = worker
        self._jobs = itertools.count()
        self.limit = 1
        self.terminated: list[tuple[int, int | None]] = []

    def apply_async(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[[int, float], Any] | None = None,
        timeout_callback: Callable[..., Any] | None = None,
        error_callback: Callable[..., Any] | None = None,
        soft_timeout: float | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> _AppliedJob:
        job = next(self._jobs)
        worker = self.worker
        execution = worker.preparing
        if execution is None:  # pragma: no cover - only the worker submits jobs
            raise RuntimeError("InProcessPool.apply_async called outside the emulated worker")
        worker.preparing = None

        def soft_limit() -> None:
            if timeout_callback is not None:
                timeout_callback(soft=True, timeout=soft_timeout)

        execution.soft_timeout = soft_limit
        if accept_callback is not None:
            accept_callback(worker.child_pid, monotonic())
        if args:  # the child gets its own copy of the request dict, as if pickled
            args = (args[0], args[1], dict(args[2]), *args[3:])
        success, value, killed = self._run_child(execution, target, args, kwargs or {})
        worker.on_record(execution.record)  # the child's end comes before the parent's reaction
        if killed is not None:
            worker.replace_child()
            if killed.kind == "timeout":
                # billiard's TimeoutHandler.on_hard_timeout: error first, then the timeout.
                limit = timeout or soft_timeout
                self._safely(error_callback, internals.time_limit_info(limit))
                if timeout_callback is not None:
                    self._safely(timeout_callback, soft=False, timeout=limit)
            else:
                info = internals.child_death_info(SIGNALS[killed.kind], job)
                self._safely(error_callback, info)
        elif success:
            self._safely(callback, value)
        else:
            if issubclass(value.type, SystemExit):  # .exception is billiard's wrapper
                worker.replace_child()
                value = internals.billiard_reports_exit_as(value, job)
            self._safely(error_callback, value)
        return _AppliedJob(job)

    def _run_child(
        self,
        execution: ChildExecution,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> tuple[bool, Any, Step | None]:
        worker = self.worker
        record = execution.record
        try:
            with worker.running(execution):
                try:
                    worker.effects.execution_started(execution)
                    execution.start()
                    value = target(*args, **kwargs)
                except (ChildKilled, TerminatedBySignal) as death:
                    record.ended = "child killed"
                    return False, None, death.step
                except PowerLost as gone:
                    record.ended = "cold shutdown" if gone.graceful else "power lost"
                    raise
                except (Exception, SystemExit) as exc:  # billiard's workloop reports job errors
                    record.ended = "exit" if isinstance(exc, SystemExit) else "raised"
                    if execution.dead:
                        return False, None, record.fired
                    return False, internals.current_exception_info(), None
            if execution.dead:  # the task swallowed its own death; the process is gone anyway
                fired = record.fired
                if fired is not None and fired.kind in ("power_loss", "cold_shutdown"):
                    graceful = fired.kind == "cold_shutdown"
                    record.ended = "cold shutdown" if graceful else "power lost"
                    raise PowerLost(fired, graceful=graceful)
                record.ended = "child killed"
                return False, None, record.fired
            record.ended = "returned"
            return True, value, None
        finally:
            if record.ended:
                worker.effects.execution_ended(execution, record.ended)

    def _safely(self, callback: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> None:
        # billiard's ApplyResult.safe_apply_callback logs and swallows callback errors.
        if callback is None:
            return
        try:
            callback(*args, **kwargs)
        except (PowerLost, ChildKilled):
            raise
        except Exception as exc:
            self.worker.callback_errors.append(exc)

    # The pool API Celery's requests may call.
    def terminate_job(self, pid: int, signum: int | None = None) -> None:
        """Celery asks to kill the child ``pid`` (a cold shutdown's ``Request.cancel``)."""
        self.terminated.append((pid, signum))


@dataclass(order=True)
class _Scheduled:
    eta: float
    order: int
    request: Any = field(compare=False)


class EmulatedWorker:
    """One Celery worker with concurrency 1, consuming from an in-memory broker."""

    def __init__(
        self,
        *,
        app: Celery,
        broker: InMemoryBroker,
        clock: VirtualClock,
        effects: EffectLog,
        plan: FaultPlan,
        index: int,
        on_record: Callable[[ExecutionRecord], None],
        on_fired: Callable[[ExecutionRecord, Step], None],
        after_delivery: Callable[[Delivery], None],
    ) -> None:
        self.app = app
        self.broker = broker
        self.clock = clock
        self.effects = effects
        self.plan = plan
        self.index = index
        self.generation = 1
        self.hostname = f"celery@faults-{index}"
        self.consumer = f"{self.hostname}#{self.generation}"
        self.on_record = on_record
        self.on_fired = on_fired
        self.after_delivery = after_delivery
        self.alive = True
        self.pool = InProcessPool(self)
        self.reserved: deque[Any] = deque()
        self.scheduled: list[_Scheduled] = []
        self.preparing: ChildExecution | None = None
        self.callback_errors: list[BaseException] = []
        self.request_ids: set[str] = set()
        self._order = itertools.count()
        self._children = itertools.count(1)
        self.child_pid = self._next_pid()
        self._request_classes: dict[str, type[Any]] = {}
        self.connection = broker.connection()
        self.channel = self.connection.default_channel
        self.accept = internals.accept_content(app)
        multiplier = app.conf.worker_prefetch_multiplier
        self.prefetch_limit = max(1, int(multiplier)) if multiplier else 0
        self.broken_connection = False
        self.stop_requested = False

    def _next_pid(self) -> int:
        return 10_000 * self.index + 100 * self.generation + next(self._children)

    def replace_child(self) -> None:
        """The pool starts a fresh child after one died."""
        self.child_pid = self._next_pid()

    # -- taking messages --------------------------------------------------------

    def wants_more(self) -> bool:
        return self.alive and (not self.prefetch_limit or len(self.reserved) < self.prefetch_limit)

    def fetch(self) -> bool:
        """Take one ready message from the broker; ``False`` when there was none."""
        delivery = self.broker.fetch(list(self.broker.queues), self.consumer)
        if delivery is None:
            return False
        self._receive(delivery)
        return True

    def _receive(self, delivery: Delivery) -> None:
        message = self.channel.Message(self.broker.kombu_payload(delivery), channel=self.channel)
        message.accept = self.accept
        name = delivery.message.task_name
        task = self.app.tasks.get(name)
        if task is None:
            self.broker.reject(delivery.tag, requeue=False)
            return
        try:
            request_class = self._request_classes[name]
        except KeyError:
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
            self.broker.reject(delivery.tag, requeue=False)
            self.callback_errors.append(exc)
            return
        request._celery_faults_delivery = delivery
        self.request_ids.add(request.id)
        eta = request.eta
        if eta is not None:
            due = eta.timestamp()
            if due > self.clock.time():
                heapq.heappush(self.scheduled, _Scheduled(due, next(self._order), request))
                return
        self.reserved.append(request)

    def release_due(self) -> None:
        """Move ETA requests whose time has come to the reserved queue."""
        now = self.clock.time()
        while self.scheduled and self.scheduled[0].eta <= now:
            self.reserved.append(heapq.heappop(self.scheduled).request)

    def next_eta(self) -> float | None:
        return self.scheduled[0].eta if self.scheduled else None

    # -- running ----------------------------------------------------------------

    def run_next(self) -> bool:
        """Run one reserved request; ``False`` when none is reserved."""
        if not self.reserved or not self.alive:
            return False
        request = self.reserved.popleft()
        delivery: Delivery = request._celery_faults_delivery
        if internals.expire_on_virtual_clock(request, self.clock.time()):
            return True
        task_id, name = delivery.message.task_id, delivery.message.task_name
        number, step = self.plan.next_delivery(task_id, name)
        record = ExecutionRecord(task_id, name, number, self.consumer, step)
        execution = ChildExecution(
            task_id=task_id,
            task_name=name,
            delivery=number,
            step=step,
            record=record,
            on_fired=lambda ex, fired: self.on_fired(ex.record, fired),
            soft_timeout=lambda: None,
            shutdown=self._shutdown,
        )
        if step is not None and step.kind == "ack_lost":
            self.broker.drop_ack(delivery.tag, self._ack_lost)
            self.on_fired(record, step)
            record.fired = step
        self.preparing = execution
        try:
            request.execute_using_pool(self.pool)
        except PowerLost as gone:
            self.on_record(record)
            self.die(graceful=gone.graceful)
            return True
        except Exception as exc:  # TaskRevokedError and friends: Celery's own refusal
            self.callback_errors.append(exc)
            self.on_record(record)
        finally:
            self.preparing = None
        self.after_delivery(delivery)
        if self.stop_requested:
            self.die(graceful=True)
        elif self.broken_connection:
            self.reconnect()
        return True

    @contextlib.contextmanager
    def running(self, execution: ChildExecution) -> Iterator[None]:
        previous = self.effects.execution
        self.effects.execution = execution
        try:
            with internals.current_app_set_to(self.app):
                yield
        except (ChildKilled, PowerLost, Exception, SystemExit):
            raise
        except BaseException as interruption:
            # Not the task's: the test run itself is being stopped (pytest-timeout's
            # time limit, Ctrl-C). A real child would not see it; let it through,
            # saying where the task was.
            interruption.add_note(where_it_hung(execution, self.effects))
            raise
        finally:
            self.effects.execution = previous

    # -- dying and reconnecting -------------------------------------------------

    def _ack_lost(self) -> None:
        self.broken_connection = True

    def _shutdown(self, how: str) -> None:
        """The worker was told to stop (``warm``) or to stop now (``cold``)."""
        if how == "warm":
            self.stop_requested = True
            return
        # Cold: the consumer cancels its running requests, from the main process.
        running, self.effects.execution = self.effects.execution, None
        try:
            internals.cancel_active_requests(self.pool)
        finally:
            self.effects.execution = running

    def reconnect(self) -> None:
        """The connection dropped (a lost ack): the broker takes back what we held."""
        self.broken_connection = False
        self._drop_held()
        self.broker.connection_lost(self.consumer)
        self.generation += 1
        self.consumer = f"{self.hostname}#{self.generation}"

    def restart(self) -> None:
        """The supervisor starts the worker again: a new process with a new connection.

        The Python object is reused (its request classes stay valid: they are
        bound to this worker's pool and hostname), its state starts empty.
        """
        self.generation += 1
        self.consumer = f"{self.hostname}#{self.generation}"
        self.child_pid = self._next_pid()
        self.alive = True
        self.stop_requested = self.broken_connection = False
        self._drop_held()

    def die(self, *, graceful: bool = False) -> None:
        """The worker and its children are gone; its connection drops (closed, if graceful)."""
        self.alive = False
        self._drop_held()
        self.broker.connection_lost(self.consumer, graceful=graceful)

    def _drop_held(self) -> None:
        self.reserved.clear()
        self.scheduled.clear()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.release()

    def __repr__(self) -> str:
        state = "alive" if self.alive else "dead"
        return f"<EmulatedWorker {self.consumer} {state} reserved={len(self.reserved)}>"
