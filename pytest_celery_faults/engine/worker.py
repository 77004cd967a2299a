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

The child runs in this process, each execution on a stack of its own (a
pooled thread, :mod:`.scheduler`), never on the test's thread: it sees none
of the test's context variables or thread-locals, as a worker child would
not. A kill (SIGKILL, a hard time limit, power loss, a cold shutdown) freezes
that stack where it stands, so nothing more of the task runs, and the parent
reacts as billiard's would. An execution that nothing can interrupt (no kill
armed, no hard time limit, no other execution that could run beside it) runs
to its end at once, before the worker's next step. ``sys.exit`` and SIGTERM
unwind the task, as billiard's handling does.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.exceptions import CeleryError

from .. import _celery_internals as internals
from ..errors import ConfigError, raised_by_the_plugin
from ..grammar import Step
from .broker import Delivery, InMemoryBroker
from .clock import VirtualClock
from .control import WorkerMailbox
from .effects import Effect, EffectLog
from .interruptions import stops_the_test_run
from .plan import FaultPlan
from .scheduler import BLOCKED_SECONDS, ExecutionDiscarded, Scheduler, Stack

#: What a job raises that makes billiard's child report it and then leave.
CHILD_LEAVES = (SystemExit, KeyboardInterrupt)
#: How an execution can end before the task did: the process running it went away.
CUT_SHORT = frozenset({"child killed", "exit", "power lost", "cold shutdown"})
#: Fault kinds that kill the process running the task without unwinding it.
FREEZING_KINDS = frozenset({"sigkill", "timeout", "power_loss", "cold_shutdown"})
#: How a freezing kind ends an execution's record.
_FROZEN_ENDING = {
    "sigkill": "child killed",
    "timeout": "child killed",
    "power_loss": "power lost",
    "cold_shutdown": "cold shutdown",
}


class TerminatedBySignal(SystemExit):
    """What billiard's ``_shutdown_cleanup`` raises in a child that got ``signum`` (SIGTERM).

    The child unwinds (``finally`` blocks run, and may perform side effects),
    reports no result, and dies; the pool then reports ``signal 15 (SIGTERM)``.
    Measured on a real prefork worker (Celery 5.7, billiard 4.3.2).
    """

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(-(256 - signum))
        self.signum = signum


class ChildGone(BaseException):
    """The child process died under its task at once: ``os._exit``, a fatal signal.

    The execution's stack freezes there: nothing more of it runs, no
    ``finally`` or ``__exit__``, as in a process that is gone.
    """

    def __init__(self, status: int, ending: str) -> None:
        super().__init__(status, ending)
        self.status = status  # what billiard reads: the exit code, or minus the signal
        self.ending = ending  # the record's ending: "exit" or "child killed"


#: Signals whose default action is to do nothing; and those that stop the process.
_IGNORED_BY_DEFAULT = frozenset(
    getattr(signal, name)
    for name in ("SIGCHLD", "SIGURG", "SIGWINCH", "SIGCONT")
    if hasattr(signal, name)
)
_STOPPING = frozenset(
    getattr(signal, name)
    for name in ("SIGSTOP", "SIGTSTP", "SIGTTIN", "SIGTTOU")
    if hasattr(signal, name)
)


def describe_signal(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


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
    ended: str = ""  # "returned", "raised", "child killed", "exit", "power lost", ...
    effects: int = 0


@dataclass
class ChildExecution:
    """One task run in the child: counts side effects and fires the delivery's fault."""

    task_id: str
    task_name: str
    delivery: int
    step: Step | None
    record: ExecutionRecord
    clock: VirtualClock
    on_fired: Callable[[ChildExecution, Step], None]
    request_stop: Callable[[], None]
    broker_delivery: Delivery
    effect_count: int = 0
    dead: bool = False
    started: bool = False
    stack: Stack | None = None  # the child's thread it runs on
    soft_timeout: Callable[[], None] = lambda: None
    hard_timeout: Callable[[], None] = lambda: None  # the pool's reaction to a hard limit, now
    on_note: Callable[[str, str], None] = lambda task_id, text: None
    gone: ChildGone | None = None  # the child died under the task (os._exit, a fatal signal)
    #: The handlers tasks installed with ``signal.signal`` in this child (its pool child's).
    handlers: dict[int, Any] = field(default_factory=dict)
    terminating: int | None = None  # the signal billiard's shutdown handler ran for
    signalled: int | None = None  # a signal ``terminate_job`` sent this execution's child

    def take_signal(self) -> None:
        """The signal a remote-control terminate sent this execution arrives here.

        Sent by the execution itself (it broadcast the ``revoke``), it lands once
        the broadcast is out (every worker has handled it), as a signal lands on
        the process between two of its instructions; sent from elsewhere, where
        the execution waits, or as it starts if it has not run yet. The child's
        handler runs, or the signal's default action (see :meth:`receive`).
        """
        signum, self.signalled = self.signalled, None
        if signum is not None:
            self.receive(signum)

    def start(self) -> None:
        """The child took the job: a fault at boundary 0 fires now, before the body."""
        self.started = True
        self.take_signal()  # terminated before it first ran: it lands before the body
        step = self.step
        if step is not None and step.at == 0 and step.kind not in ("raise", "soft_timeout"):
            self._fire(step)

    def body_starts(self) -> None:
        """Celery's task_prerun: the task's body is about to run (an execution)."""
        self.record.started = True

    def before_effect(self, kind: str, label: str) -> None:
        if self.dead:
            raise ExecutionDiscarded()
        if self.stack is not None:
            self.stack.switch_point()
        step = self.step
        if step is not None and step.kind == "raise" and step.at == self.effect_count:
            self._mark(step)
            raise step.injected_exception(before=label)
        if step is not None and step.kind == "soft_timeout" and step.at == self.effect_count == 0:
            self._fire(step)  # inside the body, where the task can catch it

    def after_effect(self, effect: Effect) -> None:
        self.record.effects = self.effect_count
        step = self.step
        if step is not None and step.kind != "raise" and step.at == self.effect_count:
            self._fire(step)

    def sleep(self, seconds: float) -> None:  # virtual
        """``time.sleep`` in the body: wait on the virtual clock; a time limit may hit."""
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        if self.dead:
            raise ExecutionDiscarded()
        wake = self.clock.time() + seconds
        if self.stack is not None:
            self.stack.sleep_until(wake)
            while self.clock.time() < wake:  # a signal's handler returned: sleep on (PEP 475)
                if self.dead:
                    raise ExecutionDiscarded()
                self.stack.sleep_until(wake)

    def interrupt(self, exc: BaseException | Callable[[], None]) -> None:
        """A signal for the child (a soft time limit): raised where the body waits."""
        if self.stack is not None:
            self.stack.interrupt(exc)

    # -- what the task does to its own process (see :mod:`.process_calls`) ------

    def exit_process(self, code: int) -> None:
        """``os._exit(code)`` in the body: the child is gone, nothing more of it runs."""
        self.on_note(self.task_id, f"the task called os._exit({code})")
        self._gone(code & 0xFF, "exit")

    def abort_process(self) -> None:
        """``os.abort()`` in the body: SIGABRT's default action, no Python handler."""
        self.on_note(self.task_id, "the task called os.abort()")
        self._gone(-signal.SIGABRT, "child killed")

    def signal_process(self, signum: int) -> None:
        """``os.kill(os.getpid(), signum)`` or ``signal.raise_signal(signum)`` in the body."""
        self.on_note(self.task_id, f"the task sent {describe_signal(signum)} to its own process")
        self.receive(signum)

    def set_handler(self, signum: int, handler: Any) -> Any:
        """``signal.signal`` in the body: the handler stays in this child, for later tasks too."""
        previous = self.get_handler(signum)
        if handler is internals.child_initial_handler(signum):
            self.handlers.pop(signum, None)
        else:
            self.handlers[signum] = handler
        return previous

    def get_handler(self, signum: int) -> Any:
        """``signal.getsignal`` in the body: what this child would answer."""
        handler = self.handlers.get(signum)
        return internals.child_initial_handler(signum) if handler is None else handler

    def receive(self, signum: int) -> None:
        """The child gets ``signum``: what a prefork child does with it, on the task's stack.

        A handler the task installed runs (and may return: the child goes on);
        else the child's own: billiard's and Celery's, or the system's default.
        """
        if signum == signal.SIGKILL:
            self._gone(-signum, "child killed")
        handler = self.handlers.get(signum)
        if handler == signal.SIG_IGN:
            return
        if callable(handler):
            handler(signum, sys._getframe(1))
            return
        disposition = "default" if handler == signal.SIG_DFL else None
        disposition = disposition or internals.child_signal_disposition(signum)
        if disposition == "shutdown":
            self.terminating = signum
            raise TerminatedBySignal(signum)
        if disposition == "soft_timeout":
            raise internals.SoftTimeLimitExceeded()
        if disposition == "ignore" or signum in _IGNORED_BY_DEFAULT:
            return
        if signum in _STOPPING:
            raise RuntimeError(
                f"celery_faults: the task stopped its own process with {describe_signal(signum)}; "
                "a stopped worker child is not emulated (it would hang until a time limit)"
            )
        self._gone(-signum, "child killed")

    def died_status(self) -> int | None:
        """How the child running this execution died, as billiard reads it; ``None`` if alive."""
        if self.gone is not None:
            return self.gone.status
        if self.terminating is not None:
            return internals.status_after_shutdown(self.terminating)
        return None

    def _gone(self, status: int, ending: str) -> None:
        gone = self.gone = ChildGone(status, ending)
        self.dead = True
        if self.stack is not None:
            self.stack.freeze(gone)
        raise gone

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
        if kind == "soft_timeout":
            self.soft_timeout()
            raise internals.SoftTimeLimitExceeded()
        if kind == "sigterm":
            self.receive(signal.SIGTERM)
            return  # the task's own handler ran and returned: the child goes on
        if kind == "timeout":
            if self.stack is None:  # pragma: no cover - the worker gives these a stack
                raise RuntimeError(f"{step} fired on an execution without a stack of its own")
            # The hard limit passes here: the parent reacts (its SIGTERM lands where
            # this waits), and whatever still runs after the grace is killed.
            self.hard_timeout()
            self.stack.sleep_until(self.clock.time())
            return
        if kind in FREEZING_KINDS:
            if self.stack is None:  # pragma: no cover - the worker gives these a stack
                raise RuntimeError(f"{step} fired on an execution without a stack of its own")
            self.dead = True
            self.stack.freeze(step)
        if kind == "warm_shutdown":
            self.request_stop()  # the worker takes nothing more; this task goes on to its end
            return
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
        """Nothing to do: the in-process child is frozen or finished when Celery asks."""


@dataclass
class Job:
    """One ``apply_async`` call: the execution and billiard's callbacks for it."""

    number: int
    worker: EmulatedWorker
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

    def __init__(self, worker: EmulatedWorker) -> None:
        self.worker = worker
        self._jobs = itertools.count()
        self.limit = worker.concurrency
        self.running: dict[int, Job] = {}
        self.children: list[Child] = []
        self.cancelling = False  # a cold shutdown's Request.cancel: the worker handles the kill

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
        execution = worker.preparing
        if execution is None:  # pragma: no cover - only the worker submits jobs
            raise RuntimeError("InProcessPool.apply_async called outside the emulated worker")
        worker.preparing = None
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
            next(self._jobs), worker, execution, target, args, kwargs or {},
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
        how = ""
        try:
            with worker.running(execution):
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
                            execution.gone.ending if execution.gone else "child killed"
                        )
                        return False, None, died
                    if stops_the_test_run(exc):
                        raise
                    how = record.ended = "exit" if isinstance(exc, CHILD_LEAVES) else "raised"
                    return False, internals.job_error_info(exc, job.number), None
            if execution.gone is not None:  # the task swallowed its own death: still dead
                how = record.ended = execution.gone.ending
                return False, None, execution.gone.status
            how = record.ended = "returned"
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
        record.ended = why.ending if isinstance(why, ChildGone) else _FROZEN_ENDING[kind]
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
        :meth:`EmulatedWorker.lose_power`, which freezes the children itself.
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
            execution, f"child terminated by remote control ({describe_signal(number)})"
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


@dataclass(order=True)
class _Scheduled:
    eta: float
    order: int
    request: Any = field(compare=False)
    for_eta: bool = field(default=False, compare=False)  # else held by a rate limit


class ChildRunning:
    """The context of a child running one execution (a class: entered on every execution)."""

    __slots__ = ("effects", "execution", "child", "previous")

    def __init__(self, worker: EmulatedWorker, execution: ChildExecution) -> None:
        self.effects = worker.effects
        self.execution = execution
        self.child = internals.in_worker_child(worker.app, worker.hostname)

    def __enter__(self) -> None:
        self.previous = self.effects.execution
        self.effects.execution = self.execution
        self.child.__enter__()

    def __exit__(
        self, kind: type[BaseException] | None, raised: BaseException | None, _: object
    ) -> None:
        self.child.__exit__()
        if raised is not None and not isinstance(
            raised, (ExecutionDiscarded, Exception, SystemExit)
        ):
            # Not the task's: the test run itself is being stopped (pytest-timeout's
            # time limit, Ctrl-C). A real child would not see it; let it through,
            # saying where the task was.
            raised.add_note(where_it_hung(self.execution, self.effects))
        self.effects.execution = self.previous


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
        self.alive = True
        self.concurrency = worker_concurrency(app)
        self.max_tasks_per_child = _per_child_limit(app, "worker_max_tasks_per_child")
        self.max_memory_per_child = _per_child_limit(app, "worker_max_memory_per_child")
        self.extra_slots = 0  # children lent to duplicate copies (``overlap``)
        self.pool = InProcessPool(self)
        self.reserved: deque[Any] = deque()
        self.scheduled: list[_Scheduled] = []
        self.preparing: ChildExecution | None = None
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
            or (step is not None and (step.kind in FREEZING_KINDS or step.kind == "overlap"))
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
        )
        if step is not None and step.kind == "ack_lost":
            self.broker.drop_ack(delivery.tag, lambda: self._ack_lost(record, step))
        if step is not None and step.kind == "overlap":
            self._overlap(delivery, execution, step)
        self.preparing = execution
        try:
            with self.mailbox.holding_revoked():
                request.execute_using_pool(self.pool)
        except Exception as exc:  # TaskRevokedError and friends: Celery's own refusal
            self.callback_errors.append(exc)
            if not isinstance(exc, CeleryError) and raised_by_the_plugin(exc):
                self.effects.plugin_failed(execution, exc, "as the pool took it")
            self.on_record(record)
        finally:
            self.preparing = None
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

    def running(self, execution: ChildExecution) -> ChildRunning:
        """The child's context while it runs a task: its execution, the current app."""
        return ChildRunning(self, execution)

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
        ending = "cold shutdown" if graceful else "power lost"
        jobs = [cause, *(job for job in self.pool.running.values() if job is not cause)]
        self.scheduler.freeze_where(lambda stack: stack.owner in jobs, cause)
        for job in jobs:
            self.pool._settled(job)
            job.execution.dead = True
            job.execution.record.ended = ending
            self.on_record(job.execution.record)
            if job.execution.started:
                self.effects.execution_ended(job.execution, ending)
        self.die(graceful=graceful)

    def channel_lost(self) -> None:
        """The broker closed our channel: Celery's consumer restarts on a new connection.

        Running tasks go on in the pool; what was prefetched went back with the
        channel, and the acks still to come go to a channel that is gone.
        """
        self._drop_held()
        self.generation += 1
        self.consumer = f"{self.hostname}#{self.generation}"
        self.broker.consumer_started(self.consumer)

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
        self.stop_requested = self.broken_connection = False
        self.extra_slots = 0
        self.pool.running.clear()
        self._token_back_at.clear()
        self._drop_held()
        self.broker.consumer_started(self.consumer)

    def die(self, *, graceful: bool = False) -> None:
        """The worker and its children are gone; its connection drops (closed, if graceful)."""
        self.alive = False
        self.mailbox.close(clean=graceful)
        self._drop_held()
        internals.node_requests_dropped(self.hostname)  # the process's memory is gone
        self.broker.connection_lost(self.consumer, graceful=graceful)

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


#: More emulated workers than this is a typo: each is a consumer in this process (1,000 start
#: in about 0.2 s; 10**6 would take minutes and gigabytes before the first task ran).
MAX_WORKERS = 1000


def check_workers(workers: object) -> int:
    """``workers`` as a whole number of emulated workers, or a ``ValueError`` naming it."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"workers={workers!r}: expected a whole number >= 1")
    if workers > MAX_WORKERS:
        raise ConfigError(
            f"workers={workers!r}: at most {MAX_WORKERS:,} emulated workers (each is a "
            f"consumer in this process); a handful shows every interleaving"
        )
    return workers


def worker_concurrency(app: Celery) -> int:
    """The children a worker of ``app`` runs: ``worker_concurrency`` if the app sets it, else 1."""
    configured = app.conf.get("worker_concurrency")
    if configured is None:
        return 1
    if isinstance(configured, bool) or not isinstance(configured, int) or configured < 1:
        raise ConfigError(f"worker_concurrency={configured!r}: expected a whole number >= 1")
    return configured


def _per_child_limit(app: Celery, name: str) -> int | None:
    """``worker_max_tasks_per_child`` or ``worker_max_memory_per_child``: None, or a number."""
    value = app.conf.get(name)
    if value is None or value == 0:
        return None  # billiard: no limit
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}={value!r}: expected a whole number >= 1, or None for no limit")
    return value


def check_worker_settings(app: Celery) -> None:
    """Refuse, before anything starts, worker settings a worker would refuse."""
    worker_concurrency(app)
    for name in ("worker_max_tasks_per_child", "worker_max_memory_per_child"):
        _per_child_limit(app, name)
