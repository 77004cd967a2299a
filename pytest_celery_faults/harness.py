"""The harness: the object a test holds. It knows nothing of pytest.

::

    with CeleryFaults(app) as faults:
        faults.track("proj.payments.charge_card")
        outcome = faults.run(charge.s(order_id=1), "sigkill@1")
        assert outcome.deliveries == 2

While it is active the app publishes to a broker of its own, stores results in
memory, runs tasks through the emulated worker, and reads the time from a
virtual clock; on exit every change is undone.
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
from collections.abc import Callable, Iterable, Sequence
from time import monotonic as real_monotonic
from types import TracebackType
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, signals

from . import _celery_internals as internals
from .engine.broker import (
    TRANSPORT_OPTION,
    BoundProducerPool,
    BrokerEvent,
    BrokerProfile,
    Delivery,
    InMemoryBroker,
    Ledger,
    register_transport,
)
from .engine.clock import TimeInBodies, VirtualClock
from .engine.effects import (
    Effect,
    EffectLog,
    Patch,
    TrackedRequestsMock,
    resolve_target,
    tracking_wrapper,
)
from .engine.history import LOSSES, NOT_IDEMPOTENT, History
from .engine.outcome import Outcome, Timeline, safe_repr
from .engine.process_calls import ProcessCallsInBodies
from .engine.replay import PublishedMessage
from .engine.results import InMemoryResultBackend
from .engine.scheduler import Scheduler, current_stack
from .engine.worker import (
    EmulatedWorker,
    ExecutionRecord,
    check_worker_settings,
    check_workers,
    where_it_hung,
    worker_concurrency,
)
from .errors import (
    DrainError,
    EmulationError,
    HarnessMisuseError,
    RefusedError,
    TimeLimitPassed,
    UnfiredFaultError,
)
from .grammar import ArmedSpec, FaultPlan, FaultSpec, Step, parse_spec
from .integrations import django_configured
from .verdicts import idempotency
from .verdicts.checks import Checks
from .verdicts.idempotency import Scenario, SweepReport

if TYPE_CHECKING:
    from pathlib import Path

    from .explore.report import ExploreReport

#: A drain that runs more executions than this has not converged (a task that requeues forever).
DEFAULT_MAX_EXECUTIONS = 1000
#: A drain that has to move the virtual clock further than this has not converged either.
DEFAULT_HORIZON = 365 * 24 * 3600.0


class CeleryFaults:
    """Fault-injection harness around one Celery app. A context manager."""

    def __init__(
        self,
        app: Celery,
        *,
        profile: str = "rabbitmq",
        workers: int = 1,
        seed: int | None = None,
        max_executions: int = DEFAULT_MAX_EXECUTIONS,
        check_unfired: bool = True,
        stack_suite_wide: bool = False,
    ) -> None:
        app = internals.app_behind_proxy(app)  # celery.current_app: the app behind it
        if not isinstance(app, Celery):
            raise TypeError(f"CeleryFaults(app={app!r}): expected a Celery app")
        check_workers(workers)
        if (
            not isinstance(max_executions, int)
            or isinstance(max_executions, bool)
            or max_executions < 1
        ):
            raise ValueError(f"max_executions={max_executions!r}: expected a whole number >= 1")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed={seed!r}: expected a whole number or None")
        self.app = app
        self.profile_name = profile
        BrokerProfile.named(profile)  # refuse an unknown profile before anything starts
        self.worker_count = workers
        self.seed = seed
        self.max_executions = max_executions
        self.check_unfired = check_unfired
        #: Whether specs the test arms itself run with the suite-wide ones or replace them.
        self.stack_suite_wide = stack_suite_wide
        #: A ``time.monotonic()`` instant (the test's time limit) past which drains stop.
        self.deadline: float | None = None
        self.active = False
        #: The thread that started the harness: the one that drives it.
        self._driver: threading.Thread | None = None
        #: A refused use (from a task, from another thread): the driver raises it too.
        self._misuse: HarnessMisuseError | None = None
        self._draining = 0  # drains in progress (a task waiting for a result drains inside one)
        #: explore()'s suite-wide budget, failure database and test id (the plugin sets it).
        self.explore_defaults: Any = None

    # -- life cycle -------------------------------------------------------------

    def __enter__(self) -> CeleryFaults:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if exc_type is None and self.check_unfired:
            self.assert_all_fired()

    def start(self) -> None:
        """Take the app over; a failure half-way undoes what was done and is raised."""
        if self.active:
            raise RuntimeError("this CeleryFaults harness is already active")
        register_transport()
        with contextlib.ExitStack() as undo:  # popped when start() succeeds: stop() undoes it
            self._start(undo)
            self.active = True
            undo.callback(setattr, self, "active", False)
            undo.callback(self._run_on_stop)  # what integrations attached below put back
            self._attach_integrations()
            undo.pop_all()

    def _attach_integrations(self) -> None:
        """With Django configured, executions get a worker process's connections by themselves.

        What ``worker_connections()`` gives (counting writes stays opt-in); a
        configuration it cannot serve is refused here, in one line.
        """
        self.django_connections: Any = None  # the WorkerConnections attached, if any
        if django_configured():
            from .integrations.django import worker_connections

            worker_connections(self)

    def _run_on_stop(self) -> None:
        hooks, self._on_stop[:] = list(self._on_stop), []
        for undo in reversed(hooks):
            undo()

    def _start(self, undo: contextlib.ExitStack) -> None:
        """What ``start()`` does, each step pushing its undo on ``undo`` as soon as it is done."""
        app = self.app
        check_worker_settings(app)  # before anything is changed: a refusal leaves nothing behind
        self._driver = threading.current_thread()
        self._misuse = None
        self.clock = VirtualClock()
        self.profile = BrokerProfile.named(
            self.profile_name, app.conf.broker_transport_options or {}
        )
        self.broker = InMemoryBroker(self.clock, self.profile)
        undo.callback(self.broker.close)
        self.ledger: Ledger = self.broker.ledger
        self.effects = EffectLog(self.clock)
        self.plan = FaultPlan()
        #: Every scenario's choices start from this seed (drawn once when none is given).
        self._scenario_seed = (
            self.seed if self.seed is not None else random.SystemRandom().getrandbits(64)
        )
        self.random = random.Random(self._scenario_seed)
        self.scheduler = Scheduler(self.random)
        self.body_time = TimeInBodies(self.clock, self.effects.sleep)
        undo.callback(self.body_time.close)
        self.process_calls = ProcessCallsInBodies(lambda: self.effects.execution)
        self._patches: list[Patch] = []
        self._on_stop: list[Callable[[], None]] = []
        self.tracked: list[str] = []  # the dotted targets tracked, for real-broker mode
        self._calls: dict[str, int] = {}  # tracked label -> calls seen, over every scenario
        #: Real-broker mode's check of every run() (:class:`.real.compare.RealComparison`),
        #: while installed: scenarios then go through run(), never a copy, so each is compared.
        self.comparison: Any = None
        self.suite_wide: list[str | FaultSpec] = []
        #: Suite-wide specs that fired in a scenario since ended by reset() (the plan forgets).
        self._suite_wide_fired: set[str] = set()
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
        self.ledger.observers.append(self._on_ledger_event)
        self.effects.observers.append(self._on_effect)
        self._installed = internals.installed_app_state(
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
        self._tracers = internals.fresh_tracers(app)
        self._code_summaries = internals.code_summaries_cached()
        self.jitter = random.Random(self._jitter_seed)
        self._jitter = internals.jitter_drawn_from(self.jitter)
        undo.enter_context(self._installed)
        undo.enter_context(self._tracers)
        undo.enter_context(self._code_summaries)
        self._caches = [
            self._jitter,
            internals.producer_pool_replaced(app, BoundProducerPool(app.pool)),
            internals.default_settings_snapshot(app),
            internals.caret_anchors_cached(),
        ]
        for cache in self._caches:
            undo.enter_context(cache)
        self.warnings: list[str] = []
        self.checks = Checks(app, self._warn)
        self.checks.start()
        undo.callback(self.checks.stop)
        signals.task_prerun.connect(self._on_prerun, weak=False)
        undo.callback(signals.task_prerun.disconnect, self._on_prerun)
        signals.task_postrun.connect(self._on_postrun, weak=False)
        undo.callback(signals.task_postrun.disconnect, self._on_postrun)
        self.effects.observers.append(self.checks.effect)
        self.http = TrackedRequestsMock(self.effects)
        self.http.start()
        undo.callback(self.http.reset)
        undo.callback(self.http.stop, allow_assert=False)
        self.concurrent = self.worker_count * worker_concurrency(app) > 1
        self.workers: list[EmulatedWorker] = []
        for index in range(1, self.worker_count + 1):
            self.workers.append(self._new_worker(index))
            undo.callback(self.workers[-1].close)
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
        if not self.active:
            return
        self.active = False
        for label, calls in self._calls.items():
            if not calls:
                self._warn(
                    f"track({label!r}) counted no call: nothing in the test called it, so it "
                    f"proved nothing (does the code reach the same work another way, e.g. "
                    f"Session.begin() rather than Session.commit()?)"
                )
        request_ids: set[str] = set().union(*(worker.request_ids for worker in self.workers))
        steps: list[Callable[[], object]] = [
            self._discard_frozen,
            self.scheduler.close,
            lambda: signals.task_prerun.disconnect(self._on_prerun),
            lambda: signals.task_postrun.disconnect(self._on_postrun),
            self.checks.stop,
            lambda: self.http.stop(allow_assert=False),
            self.http.reset,
            *reversed(self._on_stop),
            self._on_stop.clear,
            *(patch.undo for patch in reversed(self._patches)),
            self._patches.clear,
            *(worker.close for worker in self.workers),
            lambda: internals.forget_worker_state(request_ids),
            *(_exiter(cache) for cache in reversed(self._caches)),
            _exiter(self._code_summaries),
            _exiter(self._tracers),
            _exiter(self._installed),
            self.body_time.close,
            self.process_calls.close,
            self.broker.close,
        ]
        failures: list[BaseException] = []
        for step in steps:
            try:
                step()
            except BaseException as failure:  # the next steps run all the same
                failures.append(failure)
        if self._misuse is not None:
            failures.append(self._misuse)  # refused where it was swallowed: the test fails
            self._misuse = None
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise BaseExceptionGroup(
                f"celery_faults: {len(failures)} steps of restoring the app failed", failures
            )

    def on_stop(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` when the harness stops (integrations put back what they changed)."""
        self._require_active()
        self._on_stop.append(undo)

    def reset(self, *, suite_wide: bool = True) -> None:
        """Start a fresh scenario in place: empty broker, results, effects, plan and clock.

        What the test set up stays: tracked callables, the HTTP mock's
        registered responses (their call history is cleared), the app.
        Suite-wide specs (``--celery-faults``) are armed again unless
        ``suite_wide=False`` (scenarios that choose their own faults).
        """
        self._require_driver("reset")
        self._discard_frozen()
        request_ids: set[str] = set()
        for worker in self.workers:
            request_ids |= worker.request_ids
            worker.request_ids.clear()
            worker.restart(fresh_scenario=True)
        internals.forget_worker_state(request_ids)
        self.broker.reset()
        self.clock.reset()
        self.backend.clear()
        self.effects.clear()
        self._suite_wide_fired |= self._fired_now()
        self.plan.clear()
        self.history.clear()
        self.http.calls.reset()
        # Every random source starts again from the seed, as in a fresh harness: a
        # scenario's interleavings, worker order and retry delays replay exactly.
        self.random.seed(self._scenario_seed)
        self.jitter.seed(self._jitter_seed)
        if suite_wide:
            for spec in self.suite_wide:
                self.plan.arm(spec, explicit=False)

    @property
    def _jitter_seed(self) -> str:
        """``retry_jitter``'s draws come from the seed, apart from the worker order's."""
        return f"{self._scenario_seed}:retry_jitter"

    def _new_worker(self, index: int) -> EmulatedWorker:
        return EmulatedWorker(
            app=self.app,
            broker=self.broker,
            clock=self.clock,
            effects=self.effects,
            plan=self.plan,
            scheduler=self.scheduler,
            index=index,
            concurrent=self.concurrent,
            on_record=self._on_record,
            on_fired=self._on_fired,
            on_note=lambda task_id, text: self.history.note(task_id, text, depth=1),
            after_delivery=self._after_delivery,
        )

    def _signal_after_broadcast(self) -> None:
        """A task's own revoke(terminate=True) reaches it once the broadcast is out."""
        execution = self.effects.execution
        if execution is not None:
            execution.take_signal()

    def _channel_closed(self, consumer: str) -> None:
        for worker in self.workers:
            if worker.consumer == consumer:
                worker.channel_lost()

    def _discard_frozen(self) -> None:
        """The scenario is over: drop the stacks of killed executions (see :mod:`.scheduler`)."""
        if not self.scheduler.stacks:
            self.scheduler.forget()
            return
        with self.body_time, self.process_calls, internals.worker_process_state():  # as _drain
            hung = self.scheduler.discard_all()
        if hung:
            names = ", ".join(repr(stack.owner.execution.task_name) for stack in hung)
            self._warn(
                f"the frozen execution(s) of {names} did not unwind within "
                "seconds when discarded (a loop that catches BaseException?)"
            )

    # -- arming and running -----------------------------------------------------

    def inject(self, *specs: str | FaultSpec) -> list[ArmedSpec]:
        """Arm faults for the messages published from now on."""
        self._require_active()
        if specs:
            self._own_specs()
        return [self.plan.arm(spec) for spec in specs]

    def arm_suite_wide(self, spec: str | FaultSpec) -> ArmedSpec:
        """Arm a spec the test did not ask for (``--celery-faults``); it never fails unfired."""
        self._require_active()
        self.suite_wide.append(spec)
        return self.plan.arm(spec, explicit=False)

    def _own_specs(self) -> None:
        """The test arms specs of its own: the suite-wide ones step aside, unless stacked."""
        if self.stack_suite_wide or not self.suite_wide:
            return
        for armed in [armed for armed in self.plan.armed if not armed.explicit]:
            self.plan.disarm(armed)
        self.suite_wide.clear()

    def _disarm_own(self) -> None:
        """Take back every spec armed for the test itself (scenarios cut short leave theirs)."""
        for armed in [armed for armed in self.plan.armed if armed.explicit]:
            self.plan.disarm(armed)

    def run(self, signature: Any, *specs: str | FaultSpec) -> Outcome:
        """Publish ``signature`` with ``specs`` bound to it, drain, return its outcome.

        For a plain signature the specs bind to its task id. For a chain, group
        or chord they bind to the first matching message the canvas publishes,
        and the outcome returned is that of the canvas's frozen (last) task.
        """
        self._require_driver("run")
        refuse_foreign(self.app, signature)
        frozen = signature.freeze()
        plain = getattr(signature, "subtask_type", None) is None
        self._arm_for(frozen.id if plain else None, signature.task, specs)
        signature.apply_async()
        self._drain()
        while getattr(frozen, "results", None):  # a group: its last task stands for it
            frozen = frozen.results[-1]
        return self.outcome(frozen.id)

    def _run_copy(self, published: PublishedMessage, *specs: str | FaultSpec) -> Outcome:
        """``run()`` of the signature ``published`` was recorded from, sending a copy of it.

        What sweeps and ``assert_idempotent`` do after the fault-free run (see
        :mod:`.replay`): the same message under a fresh task id, through the
        same publish signals, broker and worker.
        """
        self._require_driver("run")
        if self.comparison is not None:
            raise RuntimeError(
                "a copy cannot stand in for run() when real-broker mode compares it"
            )
        task_id = published.task_id_for_copy()
        self._arm_for(task_id, published.task_name, specs)
        published.publish_copy(task_id)
        self._drain()
        return self.outcome(task_id)

    def _arm_for(
        self, task_id: str | None, task_name: str, specs: Sequence[str | FaultSpec]
    ) -> None:
        """Arm ``specs`` for a run: bound to ``task_id`` (a plain signature's), where they can."""
        if specs:
            self._own_specs()
        for spec in specs:
            parsed = parse_spec(spec)
            bind_here = task_id is not None and not parsed.redeliver
            bind_here = bind_here and parsed.task in (None, task_name)
            self.plan.arm(parsed, task_id=task_id if bind_here else None)

    def drain(self) -> list[Outcome]:
        """Run the workers until nothing is ready or pending, moving the virtual clock.

        Returns the outcomes of the task ids delivered meanwhile, in delivery order.
        """
        self._require_driver("drain")
        first_event = len(self.ledger)
        self._drain()
        touched: dict[str, None] = {}
        for event in self.ledger.events[first_event:]:
            if event.kind == "delivered":
                touched.setdefault(event.task_id)
        return [self.outcome(task_id) for task_id in touched]

    def _drain(self) -> None:
        # What holds process-wide while the worker side runs: virtual time, a child's state.
        self._draining += 1
        try:
            with self.body_time, self.process_calls, internals.worker_process_state():
                self._run_until_quiet()
        finally:
            self._draining -= 1
        misuse = self._misuse
        if misuse is not None and not self._draining:
            # Refused inside a task, whatever the task did with the refusal: the test fails.
            self._misuse = None
            raise misuse
        if not self._draining:  # a task's result.get() drains inside the outer drain
            self._raise_plugin_failures()

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
            stack = self.scheduler.interrupted
            if stack is not None:
                interruption.add_note(where_it_hung(stack.owner.execution, self.effects))
            raise

    def _step_scheduler(self) -> bool:
        try:
            return self.scheduler.step()
        except BaseException as interruption:
            stack = self.scheduler.interrupted
            if stack is not None:
                interruption.add_note(where_it_hung(stack.owner.execution, self.effects))
            raise

    def _check_deadline(self) -> None:
        # The real clock: time.monotonic reads the virtual one while the worker side runs.
        if self.deadline is not None and real_monotonic() > self.deadline:
            raise TimeLimitPassed(
                "celery_faults: the test's time limit passed while drain() was running; "
                "stopped (the code under test may have swallowed the limit's own exception)"
            )

    def _drain_for_result(self) -> None:
        self._require_active()
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
        self._drain()

    def _live_workers(self) -> list[EmulatedWorker]:
        live = [worker for worker in self.workers if worker.alive]
        if live:
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

    # -- side effects -----------------------------------------------------------

    def track(
        self, target: str | tuple[Any, str], name: str | None = None, *, duration: float = 0.0
    ) -> str:
        """Count each call of ``target`` as a side effect; returns the name effects carry.

        ``duration``: virtual seconds each call takes (a slow API), during which
        time limits, visibility timeouts and other executions can act.
        """
        self._require_active()
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
        self._patches.append(patch)
        self._calls.setdefault(label, 0)
        return label

    def _publish_through(self, label: str, publish: Callable[[], Any]) -> Any:
        if self.effects.execution is None:
            return publish()
        return self.effects.perform("publish", label, publish)

    # -- outcomes ---------------------------------------------------------------

    def outcome(self, task_id: str) -> Outcome:
        """The fate of ``task_id`` so far."""
        return self.history.outcome(task_id)

    def outcomes(self) -> list[Outcome]:
        """Every task id the broker has seen, in publish order."""
        return self.history.outcomes()

    @property
    def records(self) -> list[ExecutionRecord]:
        """What happened to each delivery in the workers, in order."""
        return self.history.records

    @property
    def timeline(self) -> Timeline:
        return self.history.timeline

    # -- idempotency ------------------------------------------------------------

    def assert_idempotent(
        self,
        signature: Any,
        observe: Callable[[], Any],
        reset: Callable[[], Any] | None = None,
        specs: Iterable[str | FaultSpec] | None = None,
    ) -> list[Scenario]:
        """Run ``signature`` fault-free, then under each spec from a fresh state.

        Each scenario gets a class (``duplicated``, ``diverged``, ``lost``,
        ``partial``, ``ok``). Fails (``AssertionError``) on duplicated and
        diverged ones, showing the spec to replay, the class, the difference
        and the timeline; lost and partial ones are named (in the failure and
        the session summary) but fail only :meth:`assert_no_loss`. Default
        specs: redelivery, a lost ack, and sigkill, exit and power loss at
        every side-effect boundary the fault-free run reached. ``"overlap"``
        among ``specs`` stands for every interleaving of two copies running at
        once, each a scenario replayable as ``overlap(SCHEDULE)``. The harness
        is reset before and after.
        """
        __tracebackhide__ = True
        return idempotency.check(self, signature, observe, reset, _listed(specs), NOT_IDEMPOTENT)

    def assert_no_loss(
        self,
        signature: Any,
        observe: Callable[[], Any],
        reset: Callable[[], Any] | None = None,
        specs: Iterable[str | FaultSpec] | None = None,
    ) -> list[Scenario]:
        """As :meth:`assert_idempotent`, failing on lost and partial scenarios instead."""
        __tracebackhide__ = True
        return idempotency.check(self, signature, observe, reset, _listed(specs), LOSSES)

    def sweep(
        self,
        signature: Any,
        observe: Callable[[], Any],
        reset: Callable[[], Any] | None = None,
        hows: Sequence[str] = idempotency.SWEEP_KINDS,
        pairs: bool = True,
    ) -> SweepReport:
        """Every fault kind at every boundary, and every pair over two deliveries.

        ``"overlap"`` among ``hows`` adds every interleaving of two overlapping copies.
        """
        if isinstance(hows, str):
            raise TypeError(f"hows={hows!r}: expected a list of fault kinds, such as [{hows!r}]")
        return idempotency.sweep(self, signature, observe, reset, hows, pairs)

    def explore(
        self,
        workload: Any,
        observe: Callable[[], Any],
        reset: Callable[[], Any] | None = None,
        invariant: Callable[[Any], Any] | None = None,
        *,
        budget: int | None = None,
        seed: int | None = None,
        kinds: Sequence[str] | None = None,
        replay: str | None = None,
        database: str | Path | None = None,
        key: str | None = None,
    ) -> ExploreReport:
        """Run ``workload`` (a function that publishes, or signatures) under drawn schedules.

        Each run starts from a fresh state, draws its faults, overlaps,
        interleavings and stalls from ``seed`` (``kinds`` sets the mix), and is
        checked: ``observe()`` against the fault-free run, ``invariant``, each
        message's fate. The report's ``assert_ok()`` fails with the smallest
        failing schedule (shrunk by Hypothesis) as a replay string, which
        ``replay=`` runs again. See :mod:`.explore`.
        """
        from .explore.explorer import explore

        return explore(
            self,
            workload,
            observe,
            reset,
            invariant,
            budget=budget,
            seed=seed,
            kinds=kinds,
            replay=replay,
            database=database,
            key=key,
        )

    # -- unfired specs ----------------------------------------------------------

    def _fired_now(self) -> set[str]:
        return {str(a.spec) for a in self.plan.armed if not a.explicit and a.has_fired}

    def suite_wide_fired(self) -> set[str]:
        """The suite-wide specs (one spelling each) that fired in any scenario of this harness."""
        return self._suite_wide_fired | self._fired_now()

    def unfired(self, *, explicit_only: bool = True) -> list[ArmedSpec]:
        return self.plan.unfired(explicit_only=explicit_only)

    def assert_all_fired(self) -> None:
        """Fail when a fault the test asked for never fired: it proved nothing."""
        __tracebackhide__ = True
        missing = self.unfired()
        if not missing:
            return
        lines = []
        for armed in missing:
            if armed.spec.redeliver:
                why = "no message matching it completed, so nothing was redelivered"
            elif armed.task_id is None:
                target = f"task {armed.spec.task!r}" if armed.spec.task else "any task"
                why = f"no message for {target} was published after it was armed"
            else:
                deliveries = self.plan.deliveries.get(armed.task_id, 0)
                effects = self.history.reached(armed.task_id)
                steps = ", ".join(f"{step} (delivery {n})" for n, step in armed.unfired_steps)
                why = (
                    f"{steps} never fired: the task was delivered {deliveries} time(s) "
                    f"and reached at most {effects} side effect(s) in a delivery"
                )
            lines.append(f"  {armed.spec}: {why}")
        raise UnfiredFaultError(
            "celery_faults: fault spec(s) never fired, so the test proved nothing about them:\n"
            + "\n".join(lines)
            + "\n(opt out with @pytest.mark.celery_faults(..., allow_unfired=True)"
            " or CeleryFaults(check_unfired=False))"
        )

    # -- bookkeeping ------------------------------------------------------------

    def _require_active(self) -> None:
        if not self.active:
            raise RuntimeError("the CeleryFaults harness is not active (use it as `with`)")

    def _require_driver(self, what: str) -> None:
        """``what()`` drives the worker: only from the test's code, on the harness's thread."""
        self._require_active()
        execution = self.effects.execution
        here = threading.current_thread()
        if execution is not None or current_stack() is not None:
            task = f"{execution.task_name}[{execution.task_id}]" if execution else "a task"
            problem = (
                f"celery_faults: {what}() called from inside the task {task} while the "
                f"emulated worker runs it; the harness drives the worker from the test: "
                f"call it from the test, after run() or drain() returns"
            )
        elif here is not self._driver:
            driver = self._driver.name if self._driver is not None else "?"
            problem = (
                f"celery_faults: {what}() called from the thread {here.name!r}, but this "
                f"harness is driven from the thread that started it ({driver!r}); one "
                f"harness runs on one thread (start a harness in each thread instead)"
            )
        else:
            return
        refused = HarnessMisuseError(problem)
        if self._misuse is None:
            self._misuse = refused
        raise refused

    def _on_prerun(self, task_id: str | None = None, **_: Any) -> None:
        # An execution is a run of the body; a deduplicated redelivery has none.
        execution = self.effects.execution
        if execution is not None and execution.task_id == task_id:
            execution.body_starts()

    def _on_postrun(self, task_id: str | None = None, state: str = "", **_: Any) -> None:
        execution = self.effects.execution
        if execution is not None and execution.task_id == task_id:
            self.history.traced(task_id, state)

    def _warn(self, problem: str) -> None:
        """A check found ``problem`` in the code under test (reported once)."""
        if problem not in self.warnings:
            self.warnings.append(problem)

    def _on_publish(self, message: Any) -> None:
        task_id, name = message.task_id, message.task_name
        self.history.published(task_id, name, int(message.headers.get("retries") or 0))
        message.replays_left = self.plan.replays_for(task_id, name)
        if self.effects.execution is None:  # a body's publish is taken once it is recorded
            self._consume_now()

    def _after_delivery(self, delivery: Delivery) -> None:
        message = delivery.message
        if message.replays_left > 0 and delivery.settlement == "ack":
            if self._retried_since(message):
                return  # a retry took its place: the final message is the one redelivered
            message.replays_left -= 1
            self.plan.replayed(message.task_name)
            self.history.redelivered(message.task_id)
            self.broker.replay(message)

    def _retried_since(self, message: Any) -> bool:
        retries = int(message.headers.get("retries") or 0)
        return self.history.retries.get(message.task_id, 0) > retries

    def _on_record(self, record: ExecutionRecord) -> None:
        self.history.recorded(record)

    def _on_fired(self, record: ExecutionRecord, step: Step) -> None:
        self.plan.fired(record.task_id, record.delivery, step)
        self.history.fired(record, step)

    def _on_effect(self, effect: Effect) -> None:
        if effect.kind == "call" and effect.label in self._calls:
            self._calls[effect.label] += 1
        self.history.on_effect(effect)
        if effect.kind == "publish" and effect.task_id is not None:
            self._consume_now()  # after the effect's line, before a fault after it fires

    def _on_ledger_event(self, event: BrokerEvent) -> None:
        self.history.on_ledger_event(event)

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"<CeleryFaults {self.app.main or 'app'} {state} profile={self.profile_name}>"


def refuse_foreign(app: Celery, signature: Any) -> None:
    """``run()`` takes a signature of the harness's app; anything else would never run here."""
    if isinstance(signature, Task):
        raise TypeError(
            f"run() takes a signature such as {signature.name}.s(...), not the task "
            f"{signature.name} itself"
        )
    if not (callable(getattr(signature, "freeze", None)) and hasattr(signature, "apply_async")):
        shown = repr(signature)
        shown = shown if len(shown) <= 80 else shown[:60] + "..."
        raise TypeError(
            f"run() takes a signature such as task.s(...), not {type(signature).__name__} {shown}"
        )
    owner = signature.app
    if owner is not app:
        raise ValueError(
            f"run(): {signature!r} belongs to the app {owner.main!r}, not the harness's app "
            f"{app.main!r}: it would publish to that app's broker and never run here "
            f"(build it from this app's task, or with app.signature(name))"
        )


def _exiter(context: Any) -> Callable[[], object]:
    """A step that leaves ``context`` (a context manager entered by ``start()``)."""
    return lambda: context.__exit__(None, None, None)


def _short(value: Any) -> str:
    """``repr(value)`` cut to a line: an error names the object, not its 10,000 items."""
    text = safe_repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _listed(specs: Iterable[str | FaultSpec] | None) -> Iterable[str | FaultSpec] | None:
    """``specs`` as given, refusing one bare string (it would be read one letter at a time)."""
    if isinstance(specs, str):
        raise TypeError(f"specs={specs!r}: expected a list of fault specs, such as [{specs!r}]")
    return specs
