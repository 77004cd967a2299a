"""The child side of an execution: one task run in an emulated worker child.

A :class:`ChildExecution` counts the task's side effects and fires the
delivery's fault at its boundary; it is what a prefork child does to its
task when a signal arrives (the task's handler, billiard's, or the default
action). A kill (SIGKILL, a hard time limit, power loss, a cold shutdown)
freezes the execution's stack where it stands, so nothing more of the task
runs; ``sys.exit`` and SIGTERM unwind the task, as billiard's handling does.
The pool (:mod:`.pool`) decides what the parent makes of it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from celery import Celery

from .. import _celery_internals as internals
from ..grammar import Step
from ..vocabulary import (
    CHILD_KILLED,
    COLD_SHUTDOWN,
    EXITED,
    FREEZING_KINDS,
    POWER_LOST,
    EffectKind,
    Ending,
)
from .broker import Delivery
from .clock import VirtualClock
from .effects import Effect, EffectLog
from .execution import ExecutionRecord
from .scheduler import ExecutionDiscarded, Stack

#: What a job raises that makes billiard's child report it and then leave.
CHILD_LEAVES = (SystemExit, KeyboardInterrupt)
#: How a freezing kind ends an execution's record.
FROZEN_ENDING: Final[dict[str, Ending]] = {
    "sigkill": CHILD_KILLED,
    "timeout": CHILD_KILLED,
    "power_loss": POWER_LOST,
    "cold_shutdown": COLD_SHUTDOWN,
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

    def __init__(self, status: int, ending: Ending) -> None:
        super().__init__(status, ending)
        self.status = status  # what billiard reads: the exit code, or minus the signal
        self.ending = ending  # the record's ending: EXITED or CHILD_KILLED


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
    #: A fault on the whole worker (``rollout``, ``broker_restart``): the worker acts on it.
    worker_fault: Callable[[ChildExecution, Step], None] = lambda execution, step: None
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

    def before_effect(self, kind: EffectKind, label: str) -> None:
        if self.dead:
            raise ExecutionDiscarded()
        if self.stack is not None:
            self.stack.switch_point()
        step = self.step
        if step is not None and step.at == self.effect_count:  # a fault at this boundary
            if step.kind == "raise":
                self._mark(step)
                raise step.injected_exception(before=label)
            if step.kind == "soft_timeout" and step.at == 0:
                self._fire(step)  # inside the body, where the task can catch it

    def after_effect(self, effect: Effect) -> None:
        self.record.effects = self.effect_count
        step = self.step
        if step is not None and step.at == self.effect_count and step.kind != "raise":
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
        self._gone(code & 0xFF, EXITED)

    def abort_process(self) -> None:
        """``os.abort()`` in the body: SIGABRT's default action, no Python handler."""
        self.on_note(self.task_id, "the task called os.abort()")
        self._gone(-signal.SIGABRT, CHILD_KILLED)

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
            self._gone(-signum, CHILD_KILLED)
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
        self._gone(-signum, CHILD_KILLED)

    def died_status(self) -> int | None:
        """How the child running this execution died, as billiard reads it; ``None`` if alive."""
        if self.gone is not None:
            return self.gone.status
        if self.terminating is not None:
            return internals.status_after_shutdown(self.terminating)
        return None

    def _gone(self, status: int, ending: Ending) -> None:
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
        if kind in ("rollout", "broker_restart"):
            self.worker_fault(self, step)  # the main process's affair; this task goes on
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


class ChildRunning:
    """The context of a child running one execution (a class: entered on every execution)."""

    __slots__ = ("effects", "execution", "child", "previous")

    def __init__(
        self, effects: EffectLog, app: Celery, hostname: str, execution: ChildExecution
    ) -> None:
        self.effects = effects
        self.execution = execution
        self.child = internals.in_worker_child(app, hostname)

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
