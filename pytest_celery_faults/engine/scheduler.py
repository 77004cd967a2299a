"""The scheduler: executions on stacks of their own, exactly one running at a time.

An execution that could be cut off (a kill armed for it, a hard time limit) or
overlap another (several workers, a worker's concurrency, a duplicate copy)
runs on a :class:`Stack`: a thread of its own. Only one thread ever runs: a
baton passes between the harness and one stack, and a stack gives it back only
at a side-effect boundary or a virtual-time wait (``time.sleep``, an effect that
takes time). Which stack runs next is the scheduler's choice alone: an explicit
schedule (a replay string), else the seed. So a run is deterministic, and every
interleaving of two small executions can be enumerated.

A stack's thread is a carrier from the scheduler's pool. When its execution
ends (returned or raised), the carrier waits for the next one, as a worker
child runs task after task and keeps its thread-locals: a thread costs several
times a hand-over to start and join, and with a hard time limit every
execution runs on a stack. A killed execution's carrier ends once discarded,
as the killed child's process did: the next execution gets a fresh thread, so
nothing the killed one left in a thread-local (a ``scoped_session``, a cached
client) reaches it. A child that replaced a recycled one (``worker_max_tasks_per_child``)
has a carrier of its own (:meth:`Scheduler.own_carrier`), never lent to another
child and ended with it. The pool's threads end when the harness stops.

Why threads, not greenlets: threads are in the standard library (no C
extension to install on every Python and Celery the plugin supports), and what
a worker process keeps per process is per thread for free: Celery's current app
and task stack, Django's database connections. time-machine and ``responses``
patch process-wide, so they hold on every stack.

An execution can block where no switch point is: inside a database driver
waiting for a row or write lock that a parked execution holds (it parked at
its COMMIT), or on a lock another execution took. Held to one runner, both
would wait forever (or until the driver gives up and raises). So when the
running stack neither gives the baton back within :data:`BLOCKED_SECONDS` of
real time nor uses the CPU meanwhile, while another execution could run, it
is taken as blocked: the others run on (the holder commits, the lock is
released), and the blocked one rejoins at its next switch point, before the
scheduler makes its next choice whenever it comes free in time. That part of
the schedule follows real time, not the seed alone: the timeline says so.

A kill freezes: the stack parks where it stands and is never resumed while the
scenario lasts, so no ``finally``, ``__exit__`` or handler of the task runs,
and locks it took stay taken. CPython cannot drop a thread's frames without
unwinding them, so when the scenario ends (``reset()``, the harness's exit) a
frozen stack is discarded: :class:`ExecutionDiscarded` is raised where it
parked, after the test's assertions, and while it unwinds every tracked side
effect is refused and no result is stored.
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .clock import VirtualClock

from .. import speedups
from ..grammar import SCHEDULE_LABELS as LABELS

#: How long (real seconds) a discarded stack may take to unwind before it is abandoned.
DISCARD_SECONDS = 5.0
#: How often (real seconds) the harness's thread wakes while a stack runs, for signals.
SIGNAL_POLL_SECONDS = 0.05
#: How long (real seconds) a running stack may go without a switch point, using no CPU,
#: while another could run, before it is taken as blocked on what another holds.
BLOCKED_SECONDS = 0.25
#: The share of that time a stack may spend on the CPU and still count as waiting.
BLOCKED_CPU_SHARE = 0.05
# The real clocks: time.monotonic follows the virtual clock while the worker side runs.
_real_monotonic = time.monotonic
_clock_gettime = getattr(time, "clock_gettime", None)
_cpu_clock_of = getattr(time, "pthread_getcpuclockid", None)

State = Literal["runnable", "running", "sleeping", "frozen", "done"]


_here = threading.local()


class ExecutionDiscarded(BaseException):
    """The scenario is over: this frozen (or abandoned) execution's stack is dropped."""


class ScheduleError(RuntimeError):
    """A replayed schedule names an execution that is not there to run."""


class _Signal:
    """A binary semaphore on a bare lock: a hand-over costs a C call, not a ``Condition``.

    ``release`` sets it (setting it twice is once), ``acquire`` waits for it and clears it.
    """

    __slots__ = ("_lock", "acquire")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self.acquire = self._lock.acquire

    def release(self) -> None:
        try:  # noqa: SIM105 - on every hand-over: suppress() costs a context manager
            self._lock.release()
        except RuntimeError:  # already set
            pass


def current_stack() -> Stack | None:
    """The stack running on this thread, if this thread is an execution's."""
    return getattr(_here, "stack", None)


def run_unless_discarded(run: Callable[..., Any]) -> Callable[..., Any]:
    """A task's ``run`` whose ending is not the task's once its stack is being discarded.

    A discarded stack unwinds through the task's ``finally`` and ``__exit__``
    code, after the scenario, where the world may be closed (pytest-django blocks
    the database after the test): what that code raises, or returns having
    swallowed the discard, must not reach Celery's tracer as the task's failure
    or result (``on_failure``, "raised unexpected", callbacks), since a killed
    child runs nothing more.
    """

    @functools.wraps(run)
    def run_in_a_child(*args: Any, **kwargs: Any) -> Any:
        try:
            value = run(*args, **kwargs)
        except ExecutionDiscarded:
            raise
        except BaseException as unwound:
            if _discarding():
                raise ExecutionDiscarded() from unwound
            raise
        if _discarding():
            raise ExecutionDiscarded()
        return value

    return run_in_a_child


def _discarding() -> bool:
    stack = current_stack()
    return stack is not None and stack.discarding


class Stack:
    """One execution's thread, parked whenever it does not hold the baton."""

    def __init__(
        self,
        scheduler: Scheduler,
        body: Callable[[], Any],
        *,
        label: str,
        owner: Any,
        on_done: Callable[[Stack], None],
        on_frozen: Callable[[Stack], None],
        before_discard: Callable[[], None] | None = None,
        on_blocked: Callable[[Stack], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.on_blocked = on_blocked
        self.before_discard = before_discard
        self.body = body
        self.label = label  # what a schedule string names it by (see Scheduler.spawn)
        self.owner = owner  # the worker whose child runs it
        self.on_done = on_done
        self.on_frozen = on_frozen
        self.state: State = "runnable"
        self.result: Any = None
        self.wake_at: float | None = None
        self.frozen_by: Any = None
        #: Raised (or called: a signal's handler) where it parked, when resumed.
        self.pending: BaseException | Callable[[], None] | None = None
        self.escaped: BaseException | None = None  # not the task's: re-raised by the harness
        self.discarding = False
        # Taken as blocked where no switch point is: it runs on its own until it gives
        # the baton back (``_back``), and is not scheduled before that.
        self.blocked = False
        self.cut_off = False  # blocked when its process died: nothing waits for it
        self._go = _Signal()
        self._back = _Signal()  # released each time it gives the baton back
        self.carrier: _Carrier | None = None  # the thread it runs on, from the scheduler's pool

    # -- on the stack's own thread ---------------------------------------------

    def _main(self) -> None:
        self._go.acquire()
        try:
            if self.discarding:
                return
            self.result = self.body()
        except ExecutionDiscarded:
            pass
        except BaseException as escaped:  # the run is being stopped: the harness re-raises it
            self.escaped = escaped
        finally:
            self.state = "done"
            if self.carrier is not None:
                self.scheduler._idle(self.carrier, reusable=not (self.discarding or self.cut_off))
            self._back.release()

    def _park(self) -> None:
        """Give the baton back and wait for it; raise what was left for us meanwhile."""
        self._back.release()
        self._go.acquire()
        if self.discarding:
            if self.before_discard is not None:
                self.before_discard()
            raise ExecutionDiscarded()
        pending, self.pending = self.pending, None
        if isinstance(pending, BaseException):
            raise pending
        if pending is not None:
            pending()

    def switch_point(self) -> None:
        """A side-effect boundary: another execution may run here."""
        if self.discarding:
            raise ExecutionDiscarded()
        scheduler = self.scheduler
        if not self.blocked and scheduler.speedups:
            stacks = scheduler.stacks  # alone, nothing else could run: no scan of the others
            if len(stacks) == 1 and stacks[0] is self:
                return
        if self.blocked or scheduler.others_runnable(self):
            self.state = "runnable"  # a blocked one rejoins: it waits for the baton here
            self._park()

    def sleep_until(self, moment: float) -> None:
        """Wait on the virtual clock; others run meanwhile, the clock moves when none can."""
        if self.discarding:
            raise ExecutionDiscarded()
        self.state = "sleeping"
        self.wake_at = moment
        self._park()

    def freeze(self, why: Any) -> None:
        """Killed: park for good. Returns never; raises :class:`ExecutionDiscarded` at the end."""
        self.state = "frozen"
        self.frozen_by = why
        self._park()
        raise ExecutionDiscarded()  # pragma: no cover - only discarding resumes a frozen stack

    # -- from the harness's side -----------------------------------------------

    @property
    def ended(self) -> bool:
        """Its body returned or unwound (set on its own thread, so read it fresh)."""
        return self.state == "done"

    def interrupt(self, exc: BaseException | Callable[[], None]) -> None:
        """Raise ``exc`` in the stack where it parked, or call it there (a signal's handler)."""
        self.pending = exc
        if self.state == "sleeping":
            self.state = "runnable"
            self.wake_at = None

    def __repr__(self) -> str:
        return f"<Stack {self.label} {self.state}>"


class _Carrier:
    """A pooled thread: runs one stack at a time, then waits for the next.

    It is a worker child's main thread: its executions run in a context of its
    own (``contextvars``), fresh when the carrier starts, kept from one of its
    executions to the next as a child process keeps its own, never the test's.
    """

    def __init__(self) -> None:
        self.stack: Stack | None = None
        self.owned = False  # a child's own thread: never lent to another child
        self.context = contextvars.Context()
        self._assigned = _Signal()
        self.thread = threading.Thread(target=self._loop, name="celery-faults idle", daemon=True)
        self.thread.start()

    def carry(self, stack: Stack) -> None:
        stack.carrier = self
        self.stack = stack
        self.thread.name = f"celery-faults {stack.label}"
        self._assigned.release()

    def end(self) -> None:
        self.stack = None
        self._assigned.release()

    def _loop(self) -> None:
        try:
            while True:
                self._assigned.acquire()
                stack = self.stack
                if stack is None:
                    return
                _here.stack = stack
                try:
                    self.context.run(stack._main)
                finally:
                    _here.stack = None
        except ExecutionDiscarded:
            pass  # raised into a stack cut off mid-run, arriving after it ended


class Scheduler:
    """Starts stacks, chooses which one runs next, and discards them at the end."""

    def __init__(self, rng: random.Random) -> None:
        self.random = rng
        #: Read once, as the harness starts (see :mod:`..speedups`).
        self.speedups = speedups.enabled()
        self.stacks: list[Stack] = []
        self.schedule: deque[str] = deque()
        self.replaying = False  # a schedule was given: past its end, the first option runs
        self.choices: list[tuple[str, tuple[str, ...]]] = []  # (chosen, options) per choice
        self.running: Stack | None = None
        self.interrupted: Stack | None = None  # running when the test run was stopped
        self.forced = 0  # stacks taken as blocked: the schedule followed real time there
        self._carriers: list[_Carrier] = []  # idle, ready to carry a stack
        self._owned: list[_Carrier] = []  # children's own threads (recycled children)
        self._carriers_lock = threading.Lock()

    def spawn(
        self,
        body: Callable[[], Any],
        *,
        owner: Any,
        on_done: Callable[[Stack], None],
        on_frozen: Callable[[Stack], None],
        before_discard: Callable[[], None] | None = None,
        on_blocked: Callable[[Stack], None] | None = None,
        carrier: _Carrier | None = None,
    ) -> Stack:
        """A stack for ``body``, labelled with the first label no other live stack holds.

        It runs on ``carrier`` (a child's own thread, idle) if given, else on a pooled one.

        Labels name executions in schedules (``overlap(SCHEDULE)``, the choices
        made), so no two stacks that can run hold the same one (a child task's
        first delivery and its parent's were both "1", and the interleavings
        that told them apart were never explored). The first free one is taken
        again when its stack ended or froze (a frozen stack never runs again):
        the same run gives the same labels, and overlapping copies of a message
        run as "1" and "2" as before.
        """
        stack = Stack(
            self,
            body,
            label=self._free_label(),
            owner=owner,
            on_done=on_done,
            on_frozen=on_frozen,
            before_discard=before_discard,
            on_blocked=on_blocked,
        )
        self.stacks.append(stack)
        if carrier is None:
            with self._carriers_lock:
                carrier = self._carriers.pop() if self._carriers else None
        (carrier or _Carrier()).carry(stack)
        return stack

    def own_carrier(self) -> _Carrier:
        """A fresh thread kept for one child: it carries that child's executions only.

        A recycled worker child is a new process: what the old one kept in
        thread-locals (a ``scoped_session``, a cached client) is not there.
        """
        carrier = _Carrier()
        carrier.owned = True
        with self._carriers_lock:
            self._owned.append(carrier)
        return carrier

    def retire(self, carrier: _Carrier) -> None:
        """The child that owned ``carrier`` is gone: its idle thread ends."""
        with self._carriers_lock:
            if carrier not in self._owned:
                return  # already ended (its execution was killed)
            self._owned.remove(carrier)
            idle = carrier.stack is None or carrier.stack.state == "done"
        if idle:
            carrier.end()
            carrier.thread.join(timeout=DISCARD_SECONDS)

    def _free_label(self) -> str:
        taken = {stack.label for stack in self.stacks if stack.state not in ("frozen", "done")}
        for label in LABELS:
            if label not in taken:
                return label
        raise ScheduleError(
            f"more than {len(LABELS)} executions run at once; a schedule names at most "
            f"{len(LABELS)} (lower worker_concurrency or the number of workers)"
        )

    def _idle(self, carrier: _Carrier, *, reusable: bool) -> None:
        """On the carrier's thread, its stack done: back to the pool, or ended."""
        carrier.thread.name = "celery-faults idle"
        with self._carriers_lock:
            if reusable and carrier.owned:
                return  # waits for its child's next execution
            if reusable:
                self._carriers.append(carrier)
            else:
                if carrier in self._owned:
                    self._owned.remove(carrier)
                carrier.end()

    def close(self) -> None:
        """End the pool's idle threads (the harness stops); a hung stack's is a daemon."""
        with self._carriers_lock:
            idle, self._carriers = self._carriers, []
            idle += [c for c in self._owned if c.stack is None or c.stack.state == "done"]
            self._owned = []
        for carrier in idle:
            carrier.end()
        for carrier in idle:
            carrier.thread.join(timeout=DISCARD_SECONDS)

    def follow(self, schedule: Iterable[str]) -> None:
        """Make the next choices these labels, in order (a replayed interleaving).

        Past its end the first option runs at every choice, so a schedule
        prefix names one interleaving exactly.
        """
        self.schedule.extend(schedule)
        self.replaying = True

    def runnable(self) -> list[Stack]:
        return [stack for stack in self.stacks if stack.state == "runnable" and not stack.blocked]

    def others_runnable(self, stack: Stack) -> bool:
        """On a stack's thread: another could run here (a blocked one may rejoin here)."""
        return any(
            other is not stack
            and ((other.blocked and not other.cut_off) or other.state == "runnable")
            for other in self.stacks
        )

    def next_wake(self) -> float | None:
        times = [
            s.wake_at
            for s in self.stacks
            if s.state == "sleeping" and s.wake_at is not None and not s.blocked
        ]
        return min(times) if times else None

    def wake(self, now: float) -> None:
        for stack in self.stacks:
            if (
                stack.state == "sleeping"
                and stack.wake_at is not None
                and stack.wake_at <= now
                and not stack.blocked
            ):
                stack.state = "runnable"
                stack.wake_at = None

    @property
    def any_blocked(self) -> bool:
        """A blocked stack is still to rejoin (one cut off while blocked is not waited for)."""
        return any(stack.blocked and not stack.cut_off for stack in self.stacks)

    def step(self) -> bool:
        """Run one runnable stack until it gives the baton back; ``False`` if none could run."""
        if self.any_blocked:
            self._let_blocked_rejoin(bounded=True)
        candidates = self.runnable()
        if not candidates:
            return False
        stack = self._choose(candidates)
        self._resume(stack)
        self._settle(stack)
        return True

    def run_alone(self, stack: Stack, clock: VirtualClock) -> None:
        """Run ``stack`` to its end now: nothing can cut it off or run beside it.

        The virtual clock moves from here while it sleeps (a timer due on the
        way, such as a soft time limit, fires at its instant), so an execution
        alone ends before the worker takes its next step, as it did inline.
        """
        while True:
            if stack.state == "runnable":
                self._resume(stack)
            if stack.state == "sleeping" and stack.wake_at is not None:
                due = clock.next_due()
                wake = stack.wake_at
                clock.advance_to(wake if due is None or due > wake else due)
                self.wake(clock.time())
                continue
            if stack.state in ("done", "frozen"):
                self._settle(stack)
                return

    def _settle(self, stack: Stack) -> None:
        """The harness's side of a stack that gave the baton back ended or frozen."""
        if stack.state == "done":
            self.stacks.remove(stack)
            if stack.escaped is not None:
                raise stack.escaped
            if stack.result is not None:  # else cut off while blocked: the worker reacted then
                stack.on_done(stack)
        elif stack.state == "frozen":
            stack.on_frozen(stack)

    def wait_for_blocked(self) -> None:
        """Nothing else can run or come due: wait (in real time) until a blocked stack rejoins."""
        self._let_blocked_rejoin(bounded=False)

    def _let_blocked_rejoin(self, *, bounded: bool) -> None:
        """Blocked stacks that came free reach their next switch point before the next choice.

        Bounded: wait while any of them uses the CPU (it runs), and give up once
        they all stay idle :data:`BLOCKED_SECONDS` (still blocked: the others go on).
        """
        watch = _Progress([stack for stack in self.stacks if stack.blocked])
        while True:
            blocked = [stack for stack in self.stacks if stack.blocked]
            if not blocked:
                return
            came = [stack for stack in blocked if stack._back.acquire(blocking=False)]
            if not came and blocked[0]._back.acquire(timeout=SIGNAL_POLL_SECONDS / 5):
                came = [blocked[0]]
            for stack in came:
                stack.blocked = False
                self._settle(stack)
            if came or not self.any_blocked or (bounded and watch.idle_for(BLOCKED_SECONDS)):
                return

    def _choose(self, candidates: list[Stack]) -> Stack:
        if len(candidates) == 1:
            return candidates[0]
        labels = tuple(stack.label for stack in candidates)
        if self.schedule:
            wanted = self.schedule.popleft()
            chosen = next((s for s in candidates if s.label == wanted), None)
            if chosen is None:
                raise ScheduleError(
                    f"the schedule asks for execution {wanted!r} to run next, but only "
                    f"{', '.join(labels)} can run here: the task took another path"
                )
        elif self.replaying:
            chosen = candidates[0]
        else:
            chosen = candidates[self.random.randrange(len(candidates))]
        self.choices.append((chosen.label, labels))
        return chosen

    def _resume(self, stack: Stack) -> None:
        self.running = stack
        stack.state = "running"
        stack._go.release()
        watch: _Progress | None = None
        try:
            # Woken now and then: a signal for the test (pytest-timeout's SIGALRM,
            # Ctrl-C) may land on the stack's thread, and Python runs its handler only
            # when this, the main thread, runs again.
            while not stack._back.acquire(timeout=SIGNAL_POLL_SECONDS):
                if watch is None:
                    watch = _Progress([stack], since=_real_monotonic() - SIGNAL_POLL_SECONDS)
                elif watch.idle_for(BLOCKED_SECONDS) and self._others_could_run(stack):
                    # Waiting inside a call, most likely on what a parked execution
                    # holds: it goes on alone, and the others run meanwhile.
                    stack.blocked = True
                    self.forced += 1
                    if stack.on_blocked is not None:
                        stack.on_blocked(stack)
                    return
        except BaseException:
            # The test run itself is being stopped (pytest-timeout, Ctrl-C) while the
            # stack runs: it can be told to stop at its next boundary, no sooner.
            stack.discarding = True
            self.interrupted = stack
            raise
        finally:
            self.running = None

    def _others_could_run(self, stack: Stack) -> bool:
        return any(
            other is not stack and not other.blocked and other.state in ("runnable", "sleeping")
            for other in self.stacks
        )

    def freeze_where(self, predicate: Callable[[Stack], bool], why: Any) -> list[Stack]:
        """Freeze parked stacks (a worker lost power under them); they never run again.

        A blocked stack is not parked: it is cut off at its next boundary (its
        execution is dead by then), and its end is not reported again.
        """
        frozen = []
        for stack in self.stacks:
            if stack.blocked and predicate(stack):
                stack.cut_off = True
                continue
            if stack.state in ("runnable", "sleeping") and predicate(stack):
                stack.state = "frozen"
                stack.frozen_by = why
                stack.wake_at = None
                frozen.append(stack)
        return frozen

    def discard_all(self) -> list[Stack]:
        """Drop every stack still parked: unwound now, effects refused; those that hang."""
        hung = []
        # Blocked ones last: what they wait on may be a lock a parked one still holds.
        for stack in sorted(self.stacks, key=lambda stack: stack.blocked):
            stack.discarding = True
            carrier = stack.carrier
            if stack.blocked and stack._back.acquire(blocking=False):
                stack.blocked = False  # it rejoined: parked (or ended) like the others
            if carrier is None or stack.state == "done":
                continue
            if (stack.state == "running" or stack.blocked) and carrier.thread.ident is not None:
                # Cut off mid-run (the test run was stopped in it, or it is blocked): it
                # would never reach a boundary if it spins, so raise in it wherever it is.
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(carrier.thread.ident), ctypes.py_object(ExecutionDiscarded)
                )
            stack._go.release()
            while stack._back.acquire(timeout=DISCARD_SECONDS):
                if stack.ended:
                    carrier.thread.join(timeout=DISCARD_SECONDS)  # it ends: a discarded child's
                    break
                stack._go.release()  # it parked on its way down: on with the unwinding
            if carrier.thread.is_alive():
                hung.append(stack)
        self.forget()
        return hung

    def forget(self) -> None:
        """A fresh scenario: no stacks, no schedule, no choices made."""
        self.stacks.clear()
        self.schedule.clear()
        self.replaying = False
        self.choices.clear()
        self.interrupted = None
        self.forced = 0

    def __repr__(self) -> str:
        return f"<Scheduler {self.stacks!r}>"


class _Progress:
    """Whether stacks' threads stayed idle (off the CPU) for a stretch of real time."""

    def __init__(self, stacks: list[Stack], since: float | None = None) -> None:
        self.stacks = stacks
        self.since = _real_monotonic() if since is None else since
        self.cpu = self._cpu()

    def _cpu(self) -> float | None:
        if _clock_gettime is None or _cpu_clock_of is None:
            return None
        total = 0.0
        for stack in self.stacks:
            carrier = stack.carrier
            ident = carrier.thread.ident if carrier is not None else None
            if ident is None:
                continue
            try:
                total += _clock_gettime(_cpu_clock_of(ident))
            except (OSError, OverflowError):  # the thread ended meanwhile
                continue
        return total

    def idle_for(self, seconds: float) -> bool:
        """True once ``seconds`` passed with (almost) no CPU used; a busy stretch starts anew."""
        elapsed = _real_monotonic() - self.since
        if elapsed < seconds:
            return False
        cpu = self._cpu()
        if cpu is None or self.cpu is None or cpu - self.cpu <= BLOCKED_CPU_SHARE * elapsed:
            return True
        self.since, self.cpu = _real_monotonic(), cpu  # it computes: not blocked
        return False


def every_schedule(run: Callable[[str], list[tuple[str, tuple[str, ...]]]]) -> list[str]:
    """Every interleaving, by running ``run(prefix)`` once per schedule; the schedules run.

    ``run`` replays a schedule prefix (the first option runs at every choice
    past it) and returns the choices its run made, as ``(chosen, options)``.
    Each alternative at each choice past the prefix is a new prefix to run,
    so every path through the choices runs exactly once (a stateless search
    of the schedule tree). A run without any choice is one schedule: ``""``.
    """
    done: list[str] = []
    prefixes = [""]
    while prefixes:
        prefix = prefixes.pop()
        choices = run(prefix)
        made = "".join(chosen for chosen, _ in choices)
        if not made.startswith(prefix):
            raise ScheduleError(f"replaying {prefix!r} made the choices {made!r} instead")
        done.append(made)
        for position in range(len(prefix), len(choices)):
            chosen, options = choices[position]
            prefixes.extend(
                made[:position] + option for option in reversed(options) if option != chosen
            )
    return done
