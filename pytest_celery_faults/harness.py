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

import random
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

from celery import Celery, signals

from . import _celery_internals as internals
from . import idempotency
from .broker import (
    TRANSPORT_OPTION,
    BrokerEvent,
    BrokerProfile,
    Delivery,
    InMemoryBroker,
    Ledger,
    register_transport,
)
from .checks import Checks
from .clock import VirtualClock
from .effects import (
    Effect,
    EffectLog,
    Patch,
    TrackedRequestsMock,
    resolve_target,
    tracking_wrapper,
)
from .errors import DrainError, UnfiredFaultError
from .faults import ArmedSpec, FaultPlan, FaultSpec, Step, parse_spec
from .idempotency import Scenario, SweepReport
from .outcome import Outcome, Timeline, TimelineEntry
from .results import InMemoryResultBackend
from .worker import CUT_SHORT, EmulatedWorker, ExecutionRecord

#: A drain that runs more executions than this has not converged (a task that requeues forever).
DEFAULT_MAX_EXECUTIONS = 1000
#: A drain that has to move the virtual clock further than this has not converged either.
DEFAULT_HORIZON = 365 * 24 * 3600.0

_LEDGER_TEXT = {
    "published": "published {name}[{short}] {detail}",
    "delivered": "delivered to {consumer}{redelivered}",
    "acked": "acked",
    "rejected": "rejected ({detail})",
    "restored": "back in the queue: {detail}",
    "ack_lost": "the ack never reached the broker",
    "orphaned": "unacked on a dead connection; {detail}",
}


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
    ) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers={workers!r}: expected a whole number >= 1")
        self.app = app
        self.profile_name = profile
        BrokerProfile.named(profile)  # refuse an unknown profile before anything starts
        self.worker_count = workers
        self.seed = seed
        self.max_executions = max_executions
        self.check_unfired = check_unfired
        self.active = False

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
        if self.active:
            raise RuntimeError("this CeleryFaults harness is already active")
        register_transport()
        app = self.app
        self.clock = VirtualClock()
        self.profile = BrokerProfile.named(
            self.profile_name, app.conf.broker_transport_options or {}
        )
        self.broker = InMemoryBroker(self.clock, self.profile)
        self.ledger: Ledger = self.broker.ledger
        self.effects = EffectLog(self.clock)
        self.plan = FaultPlan()
        self.timeline = Timeline()
        self.records: list[ExecutionRecord] = []
        self._records_by_task: dict[str, list[ExecutionRecord]] = {}
        self.random = random.Random(self.seed)
        self._retries: dict[str, int] = {}
        self._faults: dict[str, list[str]] = {}  # task id -> the faults that hit it
        self._messages: dict[str, int] = {}
        self._patches: list[Patch] = []
        self.tracked: list[str] = []  # the dotted targets tracked, for real-broker mode
        #: Called after each run() with the signature, its specs and the emulated outcome.
        self.after_run: list[Callable[[Any, tuple[str | FaultSpec, ...], Outcome], None]] = []
        self.suite_wide: list[str | FaultSpec] = []
        self.backend = InMemoryResultBackend(
            app=app,
            on_wait=self._drain_for_result,
            refuse_writes=lambda: (
                self.effects.execution is not None and self.effects.execution.dead
            ),
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
        self._installed.__enter__()
        self._tracers.__enter__()
        self._code_summaries.__enter__()
        self.warnings: list[str] = []
        self.checks = Checks(app, self._warn)
        self.checks.start()
        signals.task_prerun.connect(self._on_prerun, weak=False)
        self.effects.observers.append(self.checks.effect)
        self.http = TrackedRequestsMock(self.effects)
        self.http.start()
        self.workers = [self._new_worker(index) for index in range(1, self.worker_count + 1)]
        self.active = True

    def stop(self) -> None:
        """Undo everything ``start()`` did, in the reverse order.

        Every step runs even when another fails, so a failure never leaves the
        app on the dead in-memory broker or billiard patched. Then the failure
        is raised; several are raised together as an exception group.
        """
        if not self.active:
            return
        self.active = False
        request_ids: set[str] = set().union(*(worker.request_ids for worker in self.workers))
        steps: list[Callable[[], object]] = [
            lambda: signals.task_prerun.disconnect(self._on_prerun),
            self.checks.stop,
            lambda: self.http.stop(allow_assert=False),
            self.http.reset,
            *(patch.undo for patch in reversed(self._patches)),
            self._patches.clear,
            *(worker.close for worker in self.workers),
            lambda: internals.forget_worker_state(request_ids),
            lambda: self._code_summaries.__exit__(None, None, None),
            lambda: self._tracers.__exit__(None, None, None),
            lambda: self._installed.__exit__(None, None, None),
            self.broker.close,
        ]
        failures: list[BaseException] = []
        for step in steps:
            try:
                step()
            except BaseException as failure:  # the next steps run all the same
                failures.append(failure)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise BaseExceptionGroup(
                f"celery_faults: {len(failures)} steps of restoring the app failed", failures
            )

    def reset(self, *, suite_wide: bool = True) -> None:
        """Start a fresh scenario in place: empty broker, results, effects, plan and clock.

        What the test set up stays: tracked callables, the HTTP mock's
        registered responses (their call history is cleared), the app.
        Suite-wide specs (``--celery-faults``) are armed again unless
        ``suite_wide=False`` (scenarios that choose their own faults).
        """
        self._require_active()
        request_ids: set[str] = set()
        for worker in self.workers:
            request_ids |= worker.request_ids
            worker.request_ids.clear()
            worker.restart()
        internals.forget_worker_state(request_ids)
        self.broker.reset()
        self.clock.reset()
        self.backend.clear()
        self.effects.clear()
        self.plan.clear()
        self.timeline.clear()
        self.records.clear()
        self._records_by_task.clear()
        self._retries.clear()
        self._faults.clear()
        self._messages.clear()
        self.http.calls.reset()
        if suite_wide:
            for spec in self.suite_wide:
                self.plan.arm(spec, explicit=False)

    def _new_worker(self, index: int) -> EmulatedWorker:
        return EmulatedWorker(
            app=self.app,
            broker=self.broker,
            clock=self.clock,
            effects=self.effects,
            plan=self.plan,
            index=index,
            on_record=self._on_record,
            on_fired=self._on_fired,
            after_delivery=self._after_delivery,
        )

    # -- arming and running -----------------------------------------------------

    def inject(self, *specs: str | FaultSpec) -> list[ArmedSpec]:
        """Arm faults for the messages published from now on."""
        self._require_active()
        return [self.plan.arm(spec) for spec in specs]

    def arm_suite_wide(self, spec: str | FaultSpec) -> ArmedSpec:
        """Arm a spec the test did not ask for (``--celery-faults``); it never fails unfired."""
        self._require_active()
        self.suite_wide.append(spec)
        return self.plan.arm(spec, explicit=False)

    def run(self, signature: Any, *specs: str | FaultSpec) -> Outcome:
        """Publish ``signature`` with ``specs`` bound to it, drain, return its outcome.

        For a plain signature the specs bind to its task id. For a chain, group
        or chord they bind to the first matching message the canvas publishes,
        and the outcome returned is that of the canvas's frozen (last) task.
        """
        self._require_active()
        frozen = signature.freeze()
        plain = getattr(signature, "subtask_type", None) is None
        for spec in specs:
            parsed = parse_spec(spec)
            bind_here = plain and not parsed.redeliver and parsed.task in (None, signature.task)
            self.plan.arm(parsed, task_id=frozen.id if bind_here else None)
        original = signature.clone() if self.after_run else signature
        signature.apply_async()
        self._drain()
        while getattr(frozen, "results", None):  # a group: its last task stands for it
            frozen = frozen.results[-1]
        outcome = self.outcome(frozen.id)
        for hook in self.after_run:
            hook(original, specs, outcome)
        return outcome

    def drain(self) -> list[Outcome]:
        """Run the workers until nothing is ready or pending, moving the virtual clock.

        Returns the outcomes of the task ids delivered meanwhile, in delivery order.
        """
        self._require_active()
        first_event = len(self.ledger)
        self._drain()
        touched: dict[str, None] = {}
        for event in self.ledger.events[first_event:]:
            if event.kind == "delivered":
                touched.setdefault(event.task_id)
        return [self.outcome(task_id) for task_id in touched]

    def _drain(self) -> None:
        first_delivery = len(self.ledger)
        executions = 0
        while True:
            live = self._live_workers()
            self._fill(live)
            for worker in live:
                worker.release_due()
            if len(live) > 1:
                live = list(live)
                self.random.shuffle(live)  # which worker runs first: the seed's choice
            if any(worker.run_next() for worker in live):
                executions += 1
                if executions > self.max_executions:
                    raise DrainError(self._no_quiet_message(executions, first_delivery))
                continue
            due = self._next_due()
            if due is None:
                break
            if due - self.clock.start > DEFAULT_HORIZON:
                raise DrainError(
                    f"drain() would move the virtual clock {due - self.clock.start:.0f}s ahead "
                    f"(more than {DEFAULT_HORIZON:.0f}s); something is scheduled forever"
                )
            self.clock.advance_to(due)

    def _drain_for_result(self) -> None:
        self._require_active()
        self._drain()

    def _live_workers(self) -> list[EmulatedWorker]:
        live = [worker for worker in self.workers if worker.alive]
        if live:
            return live
        # Every worker is gone: the supervisor starts them again.
        for worker in self.workers:
            worker.restart()
        return list(self.workers)

    def _fill(self, live: Sequence[EmulatedWorker]) -> None:
        """Deliver ready messages round-robin to workers with room for them."""
        progress = True
        while progress:
            progress = False
            for worker in live:
                if worker.wants_more() and worker.fetch():
                    progress = True

    def _next_due(self) -> float | None:
        candidates = [self.clock.next_due()]
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

    def track(self, target: str | tuple[Any, str], name: str | None = None) -> str:
        """Count each call of ``target`` as a side effect; returns the name effects carry."""
        self._require_active()
        owner, attribute, default_name = resolve_target(target)
        label = name or default_name
        if isinstance(target, str):
            self.tracked.append(target)
        self._patches.append(
            Patch(owner, attribute, tracking_wrapper(self.effects, owner, attribute, label))
        )
        return label

    def _publish_through(self, label: str, publish: Callable[[], Any]) -> Any:
        if self.effects.execution is None:
            return publish()
        return self.effects.perform("publish", label, publish)

    # -- outcomes ---------------------------------------------------------------

    def outcome(self, task_id: str) -> Outcome:
        """The fate of ``task_id`` so far."""
        events = self.ledger.for_task(task_id)
        records = self._records_by_task.get(task_id, [])
        name = events[0].task_name if events else (records[0].task_name if records else "?")
        settles = [e for e in events if e.kind in ("acked", "rejected", "restored", "ack_lost")]
        rejects = [e for e in events if e.kind == "rejected"]
        meta = self.backend.get_task_meta(task_id, cache=False)
        state = meta.get("status", "PENDING")
        value = meta.get("result")
        exception = value if isinstance(value, BaseException) else None
        if exception is not None:
            exception = internals.unpickled_exception(exception)
        held = self.broker.holds(task_id)
        last = records[-1] if records else None
        cut_short = last is not None and last.ended in CUT_SHORT
        return Outcome(
            task_id=task_id,
            name=name,
            deliveries=sum(e.kind == "delivered" for e in events),
            executions=sum(record.started for record in records),
            acked=bool(settles) and settles[-1].kind == "acked",
            rejected=rejects[-1].detail if rejects else None,
            lost=bool(records) and not held and cut_short,
            state=state,
            result=value if state == "SUCCESS" else None,
            exception=exception,
            retries=self._retries.get(task_id, 0),
            timeline=self.timeline.for_task(task_id),
            faults=list(self._faults.get(task_id, ())),
        )

    def outcomes(self) -> list[Outcome]:
        """Every task id the broker has seen, in publish order."""
        return [self.outcome(task_id) for task_id in self._messages]

    # -- idempotency ------------------------------------------------------------

    def assert_idempotent(
        self,
        signature: Any,
        observe: Callable[[], Any],
        reset: Callable[[], Any] | None = None,
        specs: Iterable[str | FaultSpec] | None = None,
    ) -> list[Scenario]:
        """Run ``signature`` fault-free, then under each spec from a fresh state.

        Fails (``AssertionError``) when ``observe()`` differs from the
        fault-free run or the task's fate does, showing the spec to replay,
        the difference and the timeline. Default specs: redelivery, a lost
        ack, and sigkill, exit and power loss at every side-effect boundary
        the fault-free run reached. The harness is reset before and after.
        """
        __tracebackhide__ = True
        return idempotency.assert_idempotent(self, signature, observe, reset, specs)

    def sweep(
        self,
        signature: Any,
        observe: Callable[[], Any],
        reset: Callable[[], Any] | None = None,
        hows: Sequence[str] = idempotency.SWEEP_KINDS,
        pairs: bool = True,
    ) -> SweepReport:
        """Every fault kind at every boundary, and every pair over two deliveries."""
        return idempotency.sweep(self, signature, observe, reset, hows, pairs)

    # -- unfired specs ----------------------------------------------------------

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
                effects = max(
                    (r.effects for r in self._records_by_task.get(armed.task_id, ())), default=0
                )
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

    def _on_prerun(self, task_id: str | None = None, **_: Any) -> None:
        # An execution is a run of the body; a deduplicated redelivery has none.
        execution = self.effects.execution
        if execution is not None and execution.task_id == task_id:
            execution.body_starts()

    def _warn(self, problem: str) -> None:
        """A check found ``problem`` in the code under test (reported once)."""
        if problem not in self.warnings:
            self.warnings.append(problem)

    def _on_publish(self, message: Any) -> None:
        task_id, name = message.task_id, message.task_name
        self._messages.setdefault(task_id, 0)
        self._messages[task_id] += 1
        retries = message.headers.get("retries") or 0
        self._retries[task_id] = max(self._retries.get(task_id, 0), int(retries))
        message.replays_left = self.plan.replays_for(task_id, name)

    def _after_delivery(self, delivery: Delivery) -> None:
        message = delivery.message
        if message.replays_left > 0 and delivery.settlement == "ack":
            message.replays_left -= 1
            self.plan.replayed(message.task_name)
            self._faults.setdefault(message.task_id, []).append("redeliver")
            self._note(message.task_id, "FAULT redeliver: the broker delivers it again", depth=1)
            self.broker.replay(message)

    def _on_record(self, record: ExecutionRecord) -> None:
        self.records.append(record)
        self._records_by_task.setdefault(record.task_id, []).append(record)
        if record.ended in CUT_SHORT:
            self._note(record.task_id, f"{record.ended} ({record.worker})", depth=1)

    def _on_fired(self, record: ExecutionRecord, step: Step) -> None:
        self.plan.fired(record.task_id, record.delivery, step)
        self._faults.setdefault(record.task_id, []).append(str(step))
        after = f" after {record.effects} side effect(s)" if step.at is not None else ""
        self._note(record.task_id, f"FAULT {step}{after}", depth=1)

    def _on_effect(self, effect: Effect) -> None:
        if effect.task_id is not None:
            self._note(effect.task_id, lambda: f"side effect {effect.index}: {effect}", depth=1)

    def _on_ledger_event(self, event: BrokerEvent) -> None:
        self.timeline.add(
            TimelineEntry(
                event.time - self.clock.start,
                lambda: _ledger_text(event),
                event.task_id,
                depth=0,
            )
        )

    def _note(self, task_id: str, text: str | Callable[[], str], depth: int) -> None:
        self.timeline.add(TimelineEntry(self.clock.elapsed, text, task_id, depth))

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"<CeleryFaults {self.app.main or 'app'} {state} profile={self.profile_name}>"


def _ledger_text(event: BrokerEvent) -> str:
    template = _LEDGER_TEXT.get(event.kind)
    if template is None:
        return f"{event.kind} {event.detail}".rstrip()
    return template.format(
        name=event.task_name,
        short=event.task_id[:8],
        detail=event.detail,
        consumer=event.consumer or "?",
        redelivered=" (redelivered=True)" if event.detail else "",
    ).rstrip()
