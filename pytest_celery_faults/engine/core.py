"""The engine: what a started harness wires into the app, and the drain loop that runs it.

:class:`Engine` owns the virtual clock, the in-memory broker, the emulated
workers, the scheduler, the armed plan, the history and the result backend.
``start()`` installs them into the app as one :class:`contextlib.ExitStack`,
each step pushing its undo as soon as it is done, so a start that fails
half-way undoes what it did and ``stop()`` undoes the rest in the reverse
order. ``drain()`` runs the workers until nothing is ready or pending, moving
the clock. The callbacks the broker, the workers and the effect log call
(a publish, a delivery settled, a fault fired, a side effect) meet here.

The harness (:class:`pytest_celery_faults.harness.CeleryFaults`) is the façade
a test holds over one engine; nothing here knows pytest.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
from collections.abc import Callable, Sequence
from time import monotonic as real_monotonic
from typing import Any

from celery import Celery, signals

from .. import _celery_internals as internals
from .. import speedups
from ..errors import DrainError, EmulationError, HarnessMisuseError, RefusedError, TimeLimitPassed
from ..grammar import FaultSpec, Step, parse_spec
from .broker import (
    TRANSPORT_OPTION,
    BoundProducerPool,
    BrokerProfile,
    Delivery,
    InMemoryBroker,
    Ledger,
    register_transport,
)
from .checks import Checks
from .child import where_it_hung
from .clock import TimeInBodies, VirtualClock
from .consumer import EmulatedWorker
from .effects import (
    Effect,
    EffectLog,
    Patch,
    TrackedRequestsMock,
    resolve_target,
    tracking_wrapper,
)
from .execution import ExecutionRecord
from .history import History
from .outcome import safe_repr
from .plan import FaultPlan
from .process_calls import ProcessCallsInBodies
from .publishing import PublishFaults
from .results import InMemoryResultBackend
from .scheduler import Scheduler, current_stack
from .settings import check_worker_settings, check_workers, worker_concurrency

#: A drain that runs more executions than this has not converged (a task that requeues forever).
DEFAULT_MAX_EXECUTIONS = 1000
#: A drain that has to move the virtual clock further than this has not converged either.
DEFAULT_HORIZON = 365 * 24 * 3600.0


class SeededRandom(random.Random):
    """A scenario's random source that goes back to its seed only when it was drawn from.

    A speed-up (see :mod:`..speedups`): reseeding a Mersenne Twister costs
    about 30,000 instructions, and most scenarios draw nothing (one worker,
    no retry jitter), so :meth:`restart` skips it when no draw, ``seed`` or
    ``setstate`` changed the state since the last one. Every draw of
    ``random.Random`` goes through ``random()`` or ``getrandbits()`` (or
    ``randbytes()``), each counted here and answered by the base class: the
    same numbers, in the same order.
    """

    def __init__(self, start: int | str) -> None:
        self.start = start
        super().__init__(start)
        self.drawn = False  # as seeded
        #: Read once (see :mod:`..speedups`): with the speed-ups off, every restart reseeds.
        self.skips = speedups.enabled()

    def restart(self) -> None:
        """The state :func:`random.Random` of ``start`` has: a fresh scenario's draws."""
        if self.drawn or not self.skips:
            super().seed(self.start)
            self.drawn = False

    def seed(self, *args: Any, **kwargs: Any) -> None:
        super().seed(*args, **kwargs)
        self.drawn = True

    def setstate(self, state: Any) -> None:
        super().setstate(state)
        self.drawn = True

    def random(self) -> float:
        self.drawn = True
        return super().random()

    def getrandbits(self, k: int, /) -> int:
        self.drawn = True
        return super().getrandbits(k)

    def randbytes(self, n: int) -> bytes:
        self.drawn = True
        return super().randbytes(n)


def check_settings(*, workers: object, max_executions: object, seed: object) -> None:
    """Refuse, naming the value, settings an engine cannot run with (before anything starts)."""
    check_workers(workers)
    if (
        not isinstance(max_executions, int)
        or isinstance(max_executions, bool)
        or max_executions < 1
    ):
        raise ValueError(f"max_executions={max_executions!r}: expected a whole number >= 1")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed={seed!r}: expected a whole number or None")


class Engine:
    """The emulated world of one harness: installed by ``start()``, driven by ``drain()``."""

    def __init__(
        self,
        app: Celery,
        *,
        profile: str,
        workers: int,
        seed: int | None,
        max_executions: int,
        deadline: Callable[[], float | None],
    ) -> None:
        self.app = app
        self.profile_name = profile
        self.worker_count = workers
        self.seed = seed
        self.max_executions = max_executions
        #: A ``time.monotonic()`` instant (the test's time limit) past which drains stop.
        self.deadline = deadline
        self.active = False
        #: The thread that started the engine: the one that drives it.
        self.driver = threading.current_thread()
        #: A refused use (from a task, from another thread): the driver raises it too.
        self.misuse: HarnessMisuseError | None = None
        self._draining = 0  # drains in progress (a task waiting for a result drains inside one)
        #: What ``start()`` installed, undone by ``stop()`` (each step guarded: see ``_guard``).
        self._undo = contextlib.ExitStack()
        self._failures: list[BaseException] = []
        self._request_ids: set[str] = set()
        self.patches: list[Patch] = []
        self.on_stop: list[Callable[[], None]] = []
        self.tracked: list[str] = []  # the dotted targets tracked, for real-broker mode
        self.calls: dict[str, int] = {}  # tracked label -> calls seen, over every scenario
        self.warnings: list[str] = []
        #: The workers a rollout started in place of the ones it stopped (this scenario's).
        self.replacements: list[EmulatedWorker] = []
        self._replacements_due = 0  # rollouts whose replacement has not started yet

    # -- life cycle -------------------------------------------------------------

    def start(self, then: Callable[[], None] = lambda: None) -> None:
        """Take the app over, then call ``then``; a failure half-way undoes what was done."""
        register_transport()
        check_worker_settings(self.app)  # before anything is changed: a refusal leaves nothing
        try:
            self._install()
            self.active = True
            self._undo.callback(setattr, self, "active", False)
            then()
        except BaseException:
            self._undo.close()  # the guarded steps' own failures are dropped: this one is raised
            self._failures.clear()
            raise

    def _guard(self, step: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """Push ``step`` as an undo that runs even when another fails; its failure is kept."""

        def guarded() -> None:
            try:
                step(*args, **kwargs)
            except BaseException as failure:  # the next steps run all the same
                self._failures.append(failure)

        self._undo.callback(guarded)

    def _enter(self, context: Any) -> None:
        context.__enter__()
        self._guard(context.__exit__, None, None, None)

    def _install(self) -> None:
        """Each step pushes its undo once done, in the reverse of ``stop()``'s order."""
        app = self.app
        self.clock = VirtualClock()
        self.profile = BrokerProfile.named(
            self.profile_name, app.conf.broker_transport_options or {}
        )
        self.broker = InMemoryBroker(self.clock, self.profile)
        self._guard(self.broker.close)
        self.ledger: Ledger = self.broker.ledger
        self.effects = EffectLog(self.clock)
        self.plan = FaultPlan()
        #: Every scenario's choices start from this seed (drawn once when none is given).
        self.scenario_seed = (
            self.seed if self.seed is not None else random.SystemRandom().getrandbits(64)
        )
        self.random = SeededRandom(self.scenario_seed)
        self.scheduler = Scheduler(self.random)
        self.process_calls = ProcessCallsInBodies(lambda: self.effects.execution)
        self._guard(self.process_calls.close)
        self.body_time = TimeInBodies(self.clock, self.effects.sleep)
        self._guard(self.body_time.close)
        self.backend = InMemoryResultBackend(
            app=app,
            on_wait=self._drain_for_result,
            refuse_writes=lambda: (
                self.effects.execution is not None and self.effects.execution.dead
            ),
        )
        self.broker.channel_closed.append(self._channel_closed)
        self.broker.after_broadcast.append(self._signal_after_broadcast)
        self.history = History(
            ledger=self.ledger,
            effects=self.effects,
            results=self.backend,
            broker=self.broker,
            elapsed=lambda: self.clock.elapsed,
            start=lambda: self.clock.start,
        )
        self.broker.publish_through = self._publish_through
        self.broker.after_publish.append(self._on_publish)
        self.publish_faults = PublishFaults(self.plan, self.history)
        self.broker.publish_fault = self.publish_faults.fate
        self.ledger.observers.append(self.history.on_ledger_event)
        self.effects.observers.append(self._effect_observer())
        self._enter(
            internals.installed_app_state(
                app,
                broker_url=self.broker.url,
                backend=self.backend,
                connection_factory=self.broker.connection,
                now=self.clock.now,
                conf={
                    "task_always_eager": False,
                    # Connections Celery makes itself find the broker here too.
                    "broker_transport_options": {
                        **(app.conf.broker_transport_options or {}),
                        TRANSPORT_OPTION: self.broker,
                    },
                },
            )
        )
        self._enter(internals.fresh_tracers(app))
        self._enter(internals.code_summaries_cached())
        self.jitter = SeededRandom(self.jitter_seed)
        self._enter(internals.jitter_drawn_from(self.jitter))
        if speedups.enabled():  # one producer per connection, declared once: a speed-up
            self._enter(internals.producer_pool_replaced(app, BoundProducerPool(app.pool)))
        self._enter(internals.default_settings_snapshot(app))
        self._enter(internals.caret_anchors_cached())
        self._guard(lambda: internals.forget_worker_state(self._request_ids))
        self.concurrent = self.worker_count * worker_concurrency(app) > 1
        self.workers: list[EmulatedWorker] = []
        for index in range(1, self.worker_count + 1):
            self.workers.append(self._new_worker(index))
            self._guard(self.workers[-1].close)
        self.original_workers = list(self.workers)
        self._guard(self._discard_replacements, at_stop=True)
        self._guard(self._undo_patches)
        self._guard(self._run_on_stop)
        self.http = TrackedRequestsMock(self.effects)
        self.http.start()
        self._guard(lambda: self.http.reset())
        self._guard(lambda: self.http.stop(allow_assert=False))
        self.checks = Checks(app, self._warn)
        self.checks.start()
        self._guard(lambda: self.checks.stop())
        signals.task_postrun.connect(self._on_postrun, weak=False)
        self._guard(signals.task_postrun.disconnect, self._on_postrun)
        signals.task_prerun.connect(self._on_prerun, weak=False)
        self._guard(signals.task_prerun.disconnect, self._on_prerun)
        self.effects.observe(self.checks.effect, kinds=("http",))  # its only check: HTTP timeouts
        self._guard(lambda: self.scheduler.close())
        self._guard(self.discard_frozen)
        problems = internals.takeover_problems(app, self.broker.url, self.backend)
        if problems:
            raise RefusedError(
                f"celery_faults: cannot take the app {app.main!r} over: after the harness set "
                f"its broker, backend and task_always_eager=False, {'; '.join(problems)}; its "
                f"tasks would not run on the emulated worker (is app.conf a Settings class "
                f"that answers these itself?)"
            )

    def stop(self) -> None:
        """Undo everything ``start()`` did, in the reverse order.

        Every step runs even when another fails, so a failure never leaves the
        app on the dead in-memory broker or billiard patched. Then the failure
        is raised; several are raised together as an exception group.
        """
        for label, calls in self.calls.items():
            if not calls:
                self._warn(
                    f"track({label!r}) counted no call: nothing in the test called it, so it "
                    f"proved nothing (does the code reach the same work another way, e.g. "
                    f"Session.begin() rather than Session.commit()?)"
                )
        self._request_ids = set().union(*(worker.request_ids for worker in self.every_worker()))
        self._undo.close()
        failures, self._failures = self._failures, []
        if self.misuse is not None:
            failures.append(self.misuse)  # refused where it was swallowed: the test fails
            self.misuse = None
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise BaseExceptionGroup(
                f"celery_faults: {len(failures)} steps of restoring the app failed", failures
            )

    def _undo_patches(self) -> None:
        patches, self.patches[:] = list(self.patches), []
        for patch in reversed(patches):
            try:
                patch.undo()
            except BaseException as failure:
                self._failures.append(failure)

    def _run_on_stop(self) -> None:
        hooks, self.on_stop[:] = list(self.on_stop), []
        for undo in reversed(hooks):
            try:
                undo()
            except BaseException as failure:
                self._failures.append(failure)

    def reset(self) -> None:
        """A fresh scenario in place: empty broker, results, effects, plan and clock."""
        self.discard_frozen()
        request_ids: set[str] = set()
        for worker in self.replacements:
            request_ids |= worker.request_ids
        self._discard_replacements()
        for worker in self.workers:
            request_ids |= worker.request_ids
            worker.request_ids.clear()
            worker.restart(fresh_scenario=True)
        internals.forget_worker_state(request_ids)
        self.broker.reset()
        self.clock.reset()
        self.backend.clear()
        self.effects.clear()
        self.plan.clear()
        self.publish_faults.clear()
        self.history.clear()
        self.http.calls.reset()
        # Every random source starts again from the seed, as in a fresh harness: a
        # scenario's interleavings, worker order and retry delays replay exactly.
        self.random.restart()
        self.jitter.restart()

    @property
    def jitter_seed(self) -> str:
        """``retry_jitter``'s draws come from the seed, apart from the worker order's."""
        return f"{self.scenario_seed}:retry_jitter"

    def every_worker(self) -> list[EmulatedWorker]:
        """The workers started with the engine, then the replacements rollouts started."""
        return [*self.original_workers, *self.replacements]

    def _discard_replacements(self, *, at_stop: bool = False) -> None:
        """The scenario is over: the workers are the ones the engine started with again."""
        replacements, self.replacements = self.replacements, []
        self._replacements_due = 0
        self.workers = list(self.original_workers)
        for worker in replacements:
            worker.mailbox.close(clean=False)
            if not at_stop:  # the next scenario's broker knows nothing of it
                self.broker.connection_lost(worker.consumer)
            worker.close()

    def _worker_fault(self, worker: EmulatedWorker, execution: Any, step: Step) -> None:
        """A fault on the whole worker fired at a boundary of ``execution``."""
        if step.kind == "rollout":
            self._rollout(worker, execution.task_id, step)
        elif step.kind == "broker_restart":
            worker.broker_restart(execution)

    def _rollout(self, worker: EmulatedWorker, task_id: str, step: Step) -> None:
        """SIGTERM to ``worker`` (its grace, then SIGKILL) and a replacement after the delay."""
        worker.sigterm(grace=float(step.grace or 0), task_id=task_id)
        self._replacements_due += 1
        start = self.clock.time() + float(step.delay or 0)
        self.clock.call_at(start, lambda: self._start_replacement(worker, task_id))

    def _start_replacement(self, old: EmulatedWorker, task_id: str) -> None:
        """The deploy's new worker is up: a new process, hostname and connection."""
        self._replacements_due -= 1
        index = len(self.every_worker()) + 1
        new = self._new_worker(index, concurrent=True)
        self.replacements.append(new)
        if old in self.workers:
            self.workers[self.workers.index(old)] = new
        else:  # pragma: no cover - a rolled-out worker is in the list until replaced
            self.workers.append(new)
        self.history.note(
            task_id, f"replacement worker started: {new.hostname} consumes from now on", depth=1
        )

    def _new_worker(self, index: int, *, concurrent: bool | None = None) -> EmulatedWorker:
        return EmulatedWorker(
            app=self.app,
            broker=self.broker,
            clock=self.clock,
            effects=self.effects,
            plan=self.plan,
            scheduler=self.scheduler,
            index=index,
            concurrent=self.concurrent if concurrent is None else concurrent,
            on_record=self.history.recorded,
            on_fired=self._on_fired,
            on_note=lambda task_id, text: self.history.note(task_id, text, depth=1),
            after_delivery=self._after_delivery,
            on_worker_fault=self._worker_fault,
        )

    def discard_frozen(self) -> None:
        """The scenario is over: drop the stacks of killed executions (see :mod:`.scheduler`)."""
        if not self.scheduler.stacks:
            self.scheduler.forget()
            return
        with self.body_time, self.process_calls, internals.worker_process_state():  # as drain
            hung = self.scheduler.discard_all()
        if hung:
            names = ", ".join(repr(stack.owner.execution.task_name) for stack in hung)
            self._warn(
                f"the frozen execution(s) of {names} did not unwind within "
                "seconds when discarded (a loop that catches BaseException?)"
            )

    # -- arming, tracking -------------------------------------------------------

    def arm_for(
        self, task_id: str | None, task_name: str, specs: Sequence[str | FaultSpec]
    ) -> None:
        """Arm ``specs`` for a run: bound to ``task_id`` (a plain signature's), where they can."""
        for spec in specs:
            parsed = parse_spec(spec)
            bind_here = task_id is not None and not parsed.redeliver
            bind_here = bind_here and parsed.task in (None, task_name)
            self.plan.arm(parsed, task_id=task_id if bind_here else None)

    def track(self, target: str | tuple[Any, str], name: str | None, duration: float) -> str:
        """Count each call of ``target`` as a side effect; returns the name effects carry."""
        owner, attribute, default_name = resolve_target(target)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(
                f"track({default_name!r}, name={name!r}): expected a non-empty string"
            )
        label = name or default_name
        if (
            isinstance(duration, bool)
            or not isinstance(duration, int | float)
            or not 0 <= duration < math.inf
        ):
            raise ValueError(
                f"track({label!r}, duration={duration!r}): expected a finite number of "
                f"seconds >= 0"
            )
        wrapper = tracking_wrapper(self.effects, owner, attribute, label, float(duration))
        try:
            patch = Patch(owner, attribute, wrapper)
        except (AttributeError, TypeError) as exc:
            raise TypeError(
                f"track({label!r}): cannot replace {attribute!r} on {type(owner).__name__} "
                f"{_short(owner)} ({exc}); track a function of your own that the task calls "
                f"(a built-in object's methods cannot be replaced)"
            ) from None
        if isinstance(target, str):
            self.tracked.append(target)
        self.patches.append(patch)
        self.calls.setdefault(label, 0)
        return label

    # -- the drain loop ---------------------------------------------------------

    def require_driver(self, what: str) -> None:
        """``what()`` drives the worker: only from the test's code, on the engine's thread."""
        execution = self.effects.execution
        here = threading.current_thread()
        if execution is not None or current_stack() is not None:
            task = f"{execution.task_name}[{execution.task_id}]" if execution else "a task"
            problem = (
                f"celery_faults: {what}() called from inside the task {task} while the "
                f"emulated worker runs it; the harness drives the worker from the test: "
                f"call it from the test, after run() or drain() returns"
            )
        elif here is not self.driver:
            problem = (
                f"celery_faults: {what}() called from the thread {here.name!r}, but this "
                f"harness is driven from the thread that started it ({self.driver.name!r}); "
                f"one harness runs on one thread (start a harness in each thread instead)"
            )
        else:
            return
        refused = HarnessMisuseError(problem)
        if self.misuse is None:
            self.misuse = refused
        raise refused

    def drain(self) -> None:
        # What holds process-wide while the worker side runs: virtual time, a child's state.
        self._draining += 1
        try:
            with self.body_time, self.process_calls, internals.worker_process_state():
                self._run_until_quiet()
        finally:
            self._draining -= 1
        misuse = self.misuse
        if misuse is not None and not self._draining:
            # Refused inside a task, whatever the task did with the refusal: the test fails.
            self.misuse = None
            raise misuse
        if not self._draining:  # a task's result.get() drains inside the outer drain
            self._raise_plugin_failures()

    def drain_delivered(self) -> list[str]:
        """``drain()``; the task ids delivered meanwhile, in delivery order."""
        first_event = len(self.ledger)
        self.drain()
        events = self.ledger.events[first_event:]
        return list(dict.fromkeys(e.task_id for e in events if e.kind == "delivered"))

    def _raise_plugin_failures(self) -> None:
        """An error of the plugin's own inside an execution fails the test, never reads as ok."""
        failures = self.effects.take_failures()
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise EmulationError(failures[0] + more)

    def _run_until_quiet(self) -> None:
        """Start deliveries on free children, let the scheduler run stacks, move the clock.

        One start per turn (the worker first is the seed's choice), so workers
        refill between starts as a consumer's prefetch does; stacks run only
        when nothing can start, so executions that could overlap do overlap.
        """
        first_delivery = len(self.ledger)
        executions = 0
        while True:
            self._check_deadline()
            live = self._live_workers()
            self._fill(live)
            for worker in live:
                worker.release_due()
            if len(live) > 1:
                live = list(live)
                self.random.shuffle(live)  # which worker runs first: the seed's choice
            if self._start_next(live):
                executions += 1
                if executions > self.max_executions:
                    raise DrainError(self._no_quiet_message(executions, first_delivery))
                continue
            if self._step_scheduler():
                continue
            due = self._next_due()
            if due is None:
                if self.scheduler.any_blocked:  # it waits on something outside: real time
                    self.scheduler.wait_for_blocked()
                    continue
                break
            if self._only_chords_waiting_forever(live):
                for worker in live:
                    for entry in worker.scheduled:
                        self.history.note(
                            entry.request.id,
                            "a header task will never store its result: Celery's chord_unlock "
                            "would poll forever (the body never runs); the drain stops here",
                            depth=0,
                        )
                break
            if due - self.clock.start > DEFAULT_HORIZON:
                raise DrainError(
                    f"drain() would move the virtual clock {due - self.clock.start:.0f}s ahead "
                    f"(more than {DEFAULT_HORIZON:.0f}s); something is scheduled forever"
                )
            self.clock.advance_to(due)
            self.scheduler.wake(self.clock.time())

    def _only_chords_waiting_forever(self, live: Sequence[EmulatedWorker]) -> bool:
        """Nothing is left but Celery's ``chord_unlock`` polling a header that cannot complete.

        With no execution under way and no other message ready, unacked or held,
        no header task can store a result any more (one was lost): a real
        worker's ``chord_unlock`` retries forever and the body never runs. The
        drain is quiet there (the poll stays scheduled), not a task that
        retries forever.
        """
        if any(s.state in ("runnable", "running", "sleeping") for s in self.scheduler.stacks):
            return False
        if any(worker.reserved for worker in live):
            return False
        held = [entry.request for worker in live for entry in worker.scheduled]
        if not held or not all(internals.chord_unlock_waits_forever(r, self.app) for r in held):
            return False
        queued = [message for queue in self.broker.queues.values() for message in queue]
        unacked = [delivery.message for delivery in self.broker.unacked.values()]
        return all(message.task_name == internals.CHORD_UNLOCK for message in queued + unacked)

    def _start_next(self, live: Sequence[EmulatedWorker]) -> bool:
        """One start on the first worker that can (an execution alone runs to its end)."""
        try:
            return any(worker.start_next() for worker in live)
        except BaseException as interruption:
            self._note_where_it_hung(interruption)
            raise

    def _step_scheduler(self) -> bool:
        try:
            return self.scheduler.step()
        except BaseException as interruption:
            self._note_where_it_hung(interruption)
            raise

    def _note_where_it_hung(self, interruption: BaseException) -> None:
        stack = self.scheduler.interrupted
        if stack is not None:
            interruption.add_note(where_it_hung(stack.owner.execution, self.effects))

    def _check_deadline(self) -> None:
        # The real clock: time.monotonic reads the virtual one while the worker side runs.
        deadline = self.deadline()
        if deadline is not None and real_monotonic() > deadline:
            raise TimeLimitPassed(
                "celery_faults: the test's time limit passed while drain() was running; "
                "stopped (the code under test may have swallowed the limit's own exception)"
            )

    def _drain_for_result(self) -> None:
        if not self.active:
            raise RuntimeError("the CeleryFaults harness is not active (use it as `with`)")
        if current_stack() is not None:
            # A task waits for a result (a chord's join, get(disable_sync_subtasks=False)):
            # only the harness's thread may run the worker side.
            refused = RuntimeError(
                "celery_faults: a task waited for a result that is not ready; the emulated "
                "worker runs other tasks between executions, not from inside one"
            )
            execution = self.effects.execution
            self.effects.plugin_failed(execution, refused, "as it waited for a result")
            raise refused
        self.drain()

    def _live_workers(self) -> list[EmulatedWorker]:
        live = [worker for worker in self.workers if worker.alive]
        if live or self._replacements_due:  # a rollout's replacement comes up on its timer
            return live
        # Every worker is gone: the supervisor starts them again.
        for worker in self.workers:
            worker.restart()
        return list(self.workers)

    def _consume_now(self) -> None:
        """A message was published while the workers run: consumers with room take it now.

        A worker's main process keeps consuming while its children run, so a
        message a body (or a chain, or the parent's callback) publishes is
        fetched at the publish, up to the prefetch count, before anything else
        happens to the execution: a power loss right after it sends it back
        redelivered. Workers are offered it in their order, as ``_fill`` does.
        """
        if self._draining:
            self._fill([worker for worker in self.workers if worker.alive])

    def _fill(self, live: Sequence[EmulatedWorker]) -> None:
        """Deliver ready messages round-robin to workers with room for them."""
        progress = True
        while progress:
            progress = False
            for worker in live:
                if worker.wants_more() and worker.fetch():
                    progress = True

    def _next_due(self) -> float | None:
        candidates = [self.clock.next_due(), self.scheduler.next_wake()]
        candidates += [worker.next_eta() for worker in self._live_workers()]
        present = [moment for moment in candidates if moment is not None]
        return min(present) if present else None

    def _no_quiet_message(self, executions: int, since: int) -> str:
        counts: dict[str, int] = {}
        for event in self.ledger.events[since:]:
            if event.kind == "delivered":
                counts[event.task_name] = counts.get(event.task_name, 0) + 1
        busiest = sorted(counts.items(), key=lambda item: -item[1])[:3]
        names = ", ".join(f"{name} ({count} deliveries)" for name, count in busiest)
        return (
            f"drain() ran {executions - 1} executions without reaching quiet; "
            f"most delivered: {names}. A task that retries or requeues forever? "
            f"(raise the limit with CeleryFaults(max_executions=...))"
        )

    # -- what the broker, the workers, the effect log and Celery's signals call -

    def _warn(self, problem: str) -> None:
        """A check found ``problem`` in the code under test (reported once)."""
        if problem not in self.warnings:
            self.warnings.append(problem)

    def _publish_through(self, label: str, publish: Callable[[], Any]) -> Any:
        if self.effects.execution is None:
            return publish()
        return self.effects.perform("publish", label, publish)

    def _signal_after_broadcast(self) -> None:
        """A task's own revoke(terminate=True) reaches it once the broadcast is out."""
        execution = self.effects.execution
        if execution is not None:
            execution.take_signal()

    def _channel_closed(self, consumer: str) -> None:
        for worker in self.every_worker():
            if worker.consumer == consumer:
                worker.channel_lost()

    def _on_prerun(self, task_id: str | None = None, **_: Any) -> None:
        # An execution is a run of the body; a deduplicated redelivery has none.
        execution = self.effects.execution
        if execution is not None and execution.task_id == task_id:
            execution.body_starts()

    def _on_postrun(self, task_id: str | None = None, state: str = "", **_: Any) -> None:
        execution = self.effects.execution
        if execution is not None and execution.task_id == task_id:
            self.history.traced(task_id, state)

    def _on_publish(self, message: Any) -> None:
        task_id, name = message.task_id, message.task_name
        self.history.published(task_id, name, int(message.headers.get("retries") or 0))
        message.redeliveries_left = self.plan.redeliveries_for(task_id, name)
        if self.effects.execution is None:  # a body's publish is taken once it is recorded
            self._consume_now()

    def _after_delivery(self, delivery: Delivery) -> None:
        message = delivery.message
        if message.redeliveries_left > 0 and delivery.settlement == "ack":
            if self._retried_since(message):
                return  # a retry took its place: the final message is the one redelivered
            message.redeliveries_left -= 1
            self.plan.redelivered(message.task_name)
            self.history.redelivered(message.task_id)
            self.broker.redeliver(message)

    def _retried_since(self, message: Any) -> bool:
        retries = int(message.headers.get("retries") or 0)
        return self.history.retries.get(message.task_id, 0) > retries

    def _on_fired(self, record: ExecutionRecord, step: Step) -> None:
        self.plan.fired(record.task_id, record.delivery, step)
        self.history.fired(record, step)

    def _effect_observer(self) -> Callable[[Effect], None]:
        """:meth:`_on_effect`; a tracked call's done in one frame with the speed-ups on.

        A tracked call is the hot path of a sweep: its count and its own line
        (what :meth:`History.on_effect` appends when it keeps lines unbuilt)
        are done here, reading the effect's fields by position.
        """
        history = self.history
        if not (speedups.enabled() and history.keeps_rows):
            return self._on_effect
        calls = self.calls
        on_effect = self._on_effect

        def observed(effect: Effect) -> None:
            if effect[0] != "call":  # kind
                on_effect(effect)
                return
            label = effect[1]
            if label in calls:
                calls[label] += 1
            if effect[3] is not None:  # task_id: a task's effect has its own timeline line
                history.timeline.lines.append(effect)

        return observed

    def _on_effect(self, effect: Effect) -> None:
        if effect.kind == "call" and effect.label in self.calls:
            self.calls[effect.label] += 1
        self.history.on_effect(effect)
        if effect.kind == "publish" and effect.task_id is not None:
            self._consume_now()  # after the effect's line, before a fault after it fires


def _short(value: Any) -> str:
    """``repr(value)`` cut to a line: an error names the object, not its 10,000 items."""
    text = safe_repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
