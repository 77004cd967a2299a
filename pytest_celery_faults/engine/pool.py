"""The pool through which Celery's own ``Request`` runs tasks: billiard's contract.

The consumer (:mod:`.consumer`) hands an execution over with
:meth:`InProcessPool.execute`; Celery's ``Request.execute_using_pool`` then
calls :meth:`InProcessPool.apply_async`. The pool keeps billiard's contract:
it calls ``accept_callback`` when the child takes the job (Celery acks early
there), then ``callback`` with the trace's result, or ``error_callback`` with
what billiard would report: the ``SystemExit`` a child raised, a
``WorkerLostError`` for a child killed by a signal, ``TimeLimitExceeded``
(followed by the timeout callback) for a hard time limit. Every ack, reject,
requeue and stored state is therefore Celery's own decision for the
installed version.

The children are this process: each execution runs on a stack of its own (a
pooled thread, :mod:`.scheduler`), never on the test's thread, so it sees
none of the test's context variables or thread-locals, as a worker child
would not. An execution that nothing can interrupt (no kill armed, no hard
time limit, no other execution that could run beside it) runs to its end at
once, before the worker's next step.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from celery import Celery

from .. import _celery_internals as internals
from ..errors import raised_by_the_plugin
from ..grammar import Step
from ..vocabulary import CHILD_KILLED, EXITED, RAISED, RETURNED, Ending
from .child import (
    CHILD_LEAVES,
    FROZEN_ENDING,
    ChildExecution,
    ChildGone,
    ChildRunning,
    describe_signal,
)
from .clock import VirtualClock
from .effects import EffectLog
from .execution import ExecutionRecord
from .interruptions import stops_the_test_run
from .scheduler import BLOCKED_SECONDS, ExecutionDiscarded, Scheduler


class Parent(Protocol):
    """The worker process, as its pool sees it: where the pool reports what its children did."""

    @property
    def app(self) -> Celery: ...
    @property
    def hostname(self) -> str: ...
    @property
    def clock(self) -> VirtualClock: ...
    @property
    def scheduler(self) -> Scheduler: ...
    @property
    def effects(self) -> EffectLog: ...
    @property
    def concurrency(self) -> int: ...
    @property
    def max_tasks_per_child(self) -> int | None: ...
    @property
    def max_memory_per_child(self) -> int | None: ...
    @property
    def callback_errors(self) -> list[BaseException]: ...
    @property
    def on_record(self) -> Callable[[ExecutionRecord], None]: ...

    def next_pid(self) -> int: ...

    def note(self, execution: ChildExecution, text: str) -> None: ...

    def could_be_cut_off_or_overlap(
        self, execution: ChildExecution, hard_limit: float | None
    ) -> bool: ...

    def job_ended(self, job: Job) -> None: ...

    def lose_power(self, *, graceful: bool, cause: Job) -> None: ...


class _AppliedJob:
    """What ``pool.apply_async`` returns; Celery keeps a weak reference to it."""

    def __init__(self, job: int) -> None:
        self.job = job

    def terminate(self, signum: int | None = None) -> None:
        """Nothing to do: the in-process child is frozen or finished when Celery asks."""


@dataclass
class Job:
    """One ``apply_async`` call: the execution and billiard's callbacks for it."""

    number: int
    execution: ChildExecution
    target: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    callback: Callable[..., Any] | None
    error_callback: Callable[..., Any] | None
    timeout_callback: Callable[..., Any] | None
    soft_timeout: float | None
    timeout: float | None
    child: Child
    timers: list[Any] = field(default_factory=list)
    timed_out: bool = False  # the hard limit passed: the parent has its result already
    terminated_by: int | None = None  # the signal ``terminate_job`` sent its child


@dataclass
class Child:
    """One pool child: its pid, the signal handlers its tasks installed, the tasks it ran.

    ``tasks`` is billiard's ``completed``; ``handlers`` what tasks set with
    ``signal.signal`` in this child (a fresh child has billiard's own).
    ``own_thread``: its executions run on a thread of its own (``carrier``),
    started fresh for it: so a child that replaced a recycled one starts with
    no thread-locals or context variables, and keeps its own from task to task.
    """

    pid: int
    handlers: dict[int, Any] = field(default_factory=dict)
    tasks: int = 0
    busy: bool = False
    own_thread: bool = False
    carrier: Any = None


class InProcessPool:
    """A pool with billiard's ``apply_async`` contract whose children are this process."""

    def __init__(self, worker: Parent) -> None:
        self.worker = worker
        self._jobs = itertools.count()
        self.limit = worker.concurrency
        self.running: dict[int, Job] = {}
        self.children: list[Child] = []
        self.cancelling = False  # a cold shutdown's Request.cancel: the worker handles the kill
        self.terminated_by = "remote control"  # who asks terminate_job, in the timeline
        self._handed: ChildExecution | None = None  # what the consumer handed over, for its job

    def execute(self, request: Any, execution: ChildExecution) -> None:
        """The consumer hands ``execution`` over: Celery's ``request`` submits it as a job.

        ``Request.execute_using_pool`` calls :meth:`apply_async` (or refuses,
        raising: a revoked or expired request), which takes the execution.
        """
        self._handed = execution
        try:
            request.execute_using_pool(self)
        finally:
            self._handed = None

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
        worker = self.worker
        execution, self._handed = self._handed, None
        if execution is None:  # pragma: no cover - only the worker submits jobs
            raise RuntimeError("InProcessPool.apply_async called outside InProcessPool.execute")
        # billiard's Pool.apply_async: a job without limits gets the pool's, which the
        # worker sets from task_soft_time_limit / task_time_limit.
        conf = worker.app.conf
        soft_timeout = soft_timeout or conf.task_soft_time_limit
        timeout = timeout or conf.task_time_limit
        if args:  # the child gets its own copy of the request dict, as if pickled
            args = (args[0], args[1], dict(args[2]), *args[3:])
        child = self._free_child()
        child.busy = True
        job = Job(
            next(self._jobs), execution, target, args, kwargs or {},
            callback, error_callback, timeout_callback, soft_timeout, timeout, child,
        )  # fmt: skip
        execution.soft_timeout = lambda: self._safely(
            timeout_callback, soft=True, timeout=soft_timeout
        )
        execution.hard_timeout = lambda: self._hard_hit_now(job)
        if accept_callback is not None:
            accept_callback(child.pid, time.monotonic())
        execution.handlers = child.handlers  # what earlier tasks installed in this child
        self.running[job.number] = job
        self._arm_time_limits(job)
        if child.own_thread and child.carrier is None:
            child.carrier = worker.scheduler.own_carrier()
        # Every execution runs on a child's thread of its own, never the test's: a
        # worker child has none of the test's context variables or thread-locals.
        execution.stack = stack = worker.scheduler.spawn(
            lambda: self._run_child(job),
            owner=job,
            on_done=lambda stack: self._finish(job, *stack.result),
            on_frozen=lambda stack: self._frozen(job, stack.frozen_by),
            before_discard=lambda: worker.effects.execution_discarded(execution),
            on_blocked=lambda stack: worker.note(
                execution,
                f"execution {stack.label} blocked for {BLOCKED_SECONDS:g}s of real time inside "
                f"a call (on a lock another execution holds?): the others run on meanwhile, a "
                f"schedule forced by real time",
            ),
            carrier=child.carrier,  # a recycled child's own thread, else a pooled one
        )
        if not worker.could_be_cut_off_or_overlap(execution, timeout):
            worker.scheduler.run_alone(stack, worker.clock)  # it ends before the next step
        return _AppliedJob(job.number)

    def _free_child(self) -> Child:
        for child in self.children:
            if not child.busy:
                return child
        child = Child(self.worker.next_pid())
        self.children.append(child)
        return child

    def replace_child(self, job: Job) -> None:
        """The pool starts a fresh child in place of the one that ran ``job``."""
        child = job.child
        child.pid = self.worker.next_pid()
        child.handlers = {}  # billiard's own, as the fresh child installs them
        child.tasks = 0
        if child.carrier is not None:
            self.worker.scheduler.retire(child.carrier)
            child.carrier = None

    def retire_children(self) -> None:
        """The worker process is gone, and its children with it."""
        for child in self.children:
            if child.carrier is not None:
                self.worker.scheduler.retire(child.carrier)
        self.children.clear()

    def _completed(self, job: Job) -> None:
        """billiard's child workloop after a task: recycle at its limits (``EX_RECYCLE``).

        ``worker_max_tasks_per_child`` counts the tasks the child completed;
        ``worker_max_memory_per_child`` compares billiard's own reading of the
        child's resident memory (kB), and the child is this process.
        """
        child = job.child
        child.tasks += 1
        worker = self.worker
        why = ""
        if worker.max_tasks_per_child and child.tasks >= worker.max_tasks_per_child:
            why = f"worker_max_tasks_per_child={worker.max_tasks_per_child}"
        elif worker.max_memory_per_child:
            used = internals.child_memory_kb()
            if used > worker.max_memory_per_child:
                why = f"{used} kB > worker_max_memory_per_child={worker.max_memory_per_child}"
        if why:
            worker.note(job.execution, f"child recycled after {child.tasks} task(s) ({why})")
            self.replace_child(job)
            child.own_thread = True

    def _arm_time_limits(self, job: Job) -> None:
        clock = self.worker.clock
        now = clock.time()
        if job.soft_timeout:
            job.timers.append(clock.call_at(now + job.soft_timeout, lambda: self._soft_hit(job)))
        if job.timeout:
            job.timers.append(clock.call_at(now + job.timeout, lambda: self._hard_hit(job)))

    def _soft_hit(self, job: Job) -> None:
        """billiard's ``on_soft_timeout``: tell the parent, then signal the child."""
        if job.number not in self.running:
            return
        self.worker.note(job.execution, f"soft time limit ({job.soft_timeout:g}s) exceeded")
        self._safely(job.timeout_callback, soft=True, timeout=job.soft_timeout)
        job.execution.interrupt(internals.SoftTimeLimitExceeded())

    def _hard_hit(self, job: Job, *, fault: bool = False) -> None:
        """billiard's ``on_hard_timeout``, then ``_trywaitkill``: SIGTERM, a grace, SIGKILL.

        The job fails with ``TimeLimitExceeded`` and the timeout callback runs
        at once. Then the child gets SIGTERM where it waits: its handler runs
        (billiard's raises ``SystemExit``, so ``finally`` blocks and
        ``__exit__`` run), and what still runs once the grace has passed on the
        virtual clock is killed: frozen where it stands.
        """
        execution = job.execution
        if job.number not in self.running or execution.stack is None or job.timed_out:
            return
        if not fault:
            self.worker.note(execution, f"hard time limit ({job.timeout:g}s) exceeded")
        job.timed_out = True
        limit = job.timeout or job.soft_timeout
        self._safely(job.error_callback, internals.time_limit_info(limit))
        self._safely(job.timeout_callback, soft=False, timeout=limit)
        execution.interrupt(lambda: execution.receive(signal.SIGTERM))
        clock = self.worker.clock
        grace_over = clock.time() + internals.HARD_TIMEOUT_TERM_GRACE
        job.timers.append(clock.call_at(grace_over, lambda: self._kill_after_grace(job)))

    def _hard_hit_now(self, job: Job) -> None:
        """A ``timeout@N`` fault: the hard limit passes now, the parent reacts next."""
        clock = self.worker.clock
        clock.call_at(clock.time(), lambda: self._hard_hit(job, fault=True))

    def _kill_after_grace(self, job: Job) -> None:
        """``_trywaitkill``'s SIGKILL: the child did not end within the grace."""
        stack = job.execution.stack
        if job.number not in self.running or stack is None:
            return
        job.execution.dead = True
        self.worker.scheduler.freeze_where(lambda candidate: candidate is stack, None)
        self._frozen(job, Step("timeout"))

    def _run_child(self, job: Job) -> tuple[bool, Any, int | None]:
        """The child's side: run the trace; how it ended, as billiard's workloop sees it.

        The third item is how the child died without reporting (billiard's
        status: an exit code, or minus a signal), ``None`` while it lives.
        """
        worker = self.worker
        execution = job.execution
        record = execution.record
        how: Ending = ""
        try:
            with ChildRunning(worker.effects, worker.app, worker.hostname, execution):
                try:
                    worker.effects.execution_started(execution)
                    execution.start()
                    value = job.target(*job.args, **job.kwargs)
                except ExecutionDiscarded:
                    raise
                except BaseException as exc:  # billiard's workloop reports what the job raised
                    died = execution.died_status()
                    if died is not None:  # unwinding from the child's death: no result
                        how = record.ended = (
                            execution.gone.ending if execution.gone else CHILD_KILLED
                        )
                        return False, None, died
                    if stops_the_test_run(exc):
                        raise
                    how = record.ended = EXITED if isinstance(exc, CHILD_LEAVES) else RAISED
                    return False, internals.job_error_info(exc, job.number), None
            if execution.gone is not None:  # the task swallowed its own death: still dead
                how = record.ended = execution.gone.ending
                return False, None, execution.gone.status
            how = record.ended = RETURNED
            return True, value, None
        finally:
            if how:
                worker.effects.execution_ended(execution, how)

    def _finish(self, job: Job, success: bool, value: Any, died: int | None) -> None:
        """The parent's side of a job that ended by itself: billiard's result handler."""
        worker = self.worker
        if job.number not in self.running:
            return  # cut off while it was blocked (power loss, a hard limit): reported then
        self._settled(job)
        # The child's end comes before the parent's reaction.
        worker.on_record(job.execution.record)
        if job.timed_out:
            # billiard set the job's result at the limit, and kills the child after
            # the grace whatever it did meanwhile: its own end is not heard.
            self.replace_child(job)
        elif died is not None:
            self.replace_child(job)
            self._died(job, died)
        elif success:
            self._completed(job)
            self._safely(job.callback, value)
        else:
            if issubclass(value.type, (*CHILD_LEAVES, internals.WorkerLostError)):
                self.replace_child(job)  # the child left (.exception is billiard's wrapper)
            else:
                self._completed(job)
            self._safely(job.error_callback, value)
        worker.job_ended(job)

    def _frozen(self, job: Job, why: Step | ChildGone) -> None:
        """The parent's side of a kill: the child is gone, its stack frozen."""
        worker = self.worker
        kind = why.kind if isinstance(why, Step) else "gone"
        if kind in ("power_loss", "cold_shutdown"):
            worker.lose_power(graceful=kind == "cold_shutdown", cause=job)
            return
        record = job.execution.record
        self._settled(job)
        record.ended = why.ending if isinstance(why, ChildGone) else FROZEN_ENDING[kind]
        worker.on_record(record)
        if job.execution.started:  # watchers hear of the executions they saw start
            worker.effects.execution_ended(job.execution, record.ended)
        self.replace_child(job)
        if kind == "timeout":
            pass  # the parent reacted at the limit (_hard_hit), before the grace
        else:
            self._died(job, why.status if isinstance(why, ChildGone) else -signal.SIGKILL)
        worker.job_ended(job)

    def _died(self, job: Job, status: int) -> None:
        """The parent hears its child died (``status``: an exit code, or minus a signal)."""
        if job.terminated_by is not None:  # billiard: the job's child was terminate_job's
            self._safely(job.error_callback, internals.terminated_info(job.terminated_by))
            return
        self._safely(job.error_callback, internals.child_gone_info(status, job.number))

    def _settled(self, job: Job) -> None:
        self.running.pop(job.number, None)
        job.child.busy = False
        for timer in job.timers:
            self.worker.clock.cancel(timer)

    def _safely(self, callback: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> None:
        # billiard's ApplyResult.safe_apply_callback logs and swallows callback errors.
        if callback is None:
            return
        try:
            callback(*args, **kwargs)
        except Exception as exc:
            self.worker.callback_errors.append(exc)
            # Celery's callbacks (ack, reject, store) run on the plugin's broker and
            # backend here: an error raised in the plugin's code is the emulation's.
            if raised_by_the_plugin(exc):
                self.worker.effects.plugin_failed(None, exc, "in a pool callback")

    # The pool API Celery's requests may call.
    def terminate_job(self, pid: int, signum: int | None = None) -> None:
        """Celery asks to kill the child ``pid`` (``Request.terminate`` or ``.cancel``).

        A cold shutdown's ``Request.cancel`` comes from
        :meth:`.consumer.EmulatedWorker.lose_power`, which freezes the children itself.
        A remote-control ``revoke(terminate=True)`` signals the child running
        the job, as billiard's ``terminate_job`` does: the child takes it as any
        signal (:meth:`ChildExecution.receive`: a handler its tasks installed,
        billiard's SIGTERM handler that unwinds it, or the default action);
        SIGKILL ends it where it stands. If it dies, the parent hears
        billiard's ``Terminated``.
        """
        if self.cancelling:
            return
        job = next((job for job in self.running.values() if job.child.pid == pid), None)
        if job is None or job.terminated_by is not None:
            return  # billiard: no such process (it ended meanwhile)
        number = job.terminated_by = internals.signal_number(signum)
        execution = job.execution
        self.worker.note(
            execution, f"child terminated by {self.terminated_by} ({describe_signal(number)})"
        )
        if self.worker.effects.execution is execution:
            execution.signalled = number  # the execution revoked itself: see take_signal
            return
        stack = execution.stack
        if stack is None:  # pragma: no cover - every execution runs on a stack
            raise RuntimeError(f"terminate_job: {execution.task_id} runs without a stack")
        if number != signal.SIGKILL:  # it lands where the execution waits, as a hard limit's
            execution.signalled = number  # or as it starts, if it has not run yet
            execution.interrupt(execution.take_signal)
            return
        execution.dead = True
        self.worker.scheduler.freeze_where(lambda candidate: candidate is stack, None)
        clock = self.worker.clock  # the parent hears of the death after the handler returned
        clock.call_at(clock.time(), lambda: self._frozen(job, Step("sigkill")))
