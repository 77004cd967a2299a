"""The harness: the object a test holds. It knows nothing of pytest.

::

    with CeleryFaults(app) as faults:
        faults.track("proj.payments.charge_card")
        outcome = faults.run(charge.s(order_id=1), "sigkill@1")
        assert outcome.deliveries == 2

While it is active the app publishes to a broker of its own, stores results in
memory, runs tasks through the emulated worker, and reads the time from a
virtual clock; on exit every change is undone. :class:`CeleryFaults` is a small
façade: the :class:`~.engine.core.Engine` it starts does the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, overload

from celery import Celery, Task

from . import _celery_internals as internals
from .engine.broker import BrokerProfile, InMemoryBroker, Ledger
from .engine.checks import Checks
from .engine.clock import VirtualClock
from .engine.consumer import EmulatedWorker
from .engine.copies import PublishedMessage
from .engine.core import DEFAULT_MAX_EXECUTIONS, Engine, check_settings
from .engine.effects import EffectLog, TrackedRequestsMock
from .engine.execution import ExecutionRecord
from .engine.history import History
from .engine.outcome import Outcome, Timeline
from .engine.plan import ArmedSpec, FaultPlan, unfired_message
from .engine.results import InMemoryResultBackend
from .engine.scheduler import Scheduler
from .errors import UnfiredFaultError
from .grammar import FaultSpec
from .integrations import django_configured
from .verdicts import idempotency
from .verdicts.classify import LOSSES, NOT_IDEMPOTENT
from .verdicts.idempotency import Scenario, SweepReport

if TYPE_CHECKING:
    from pathlib import Path

    from .explore.report import ExploreReport

T = TypeVar("T")


class RunObserver(Protocol):
    """Told of every ``run()`` (real-broker mode runs each on a real worker too, and compares)."""

    def before_run(self, signature: Any, specs: Sequence[str | FaultSpec]) -> None: ...

    def after_run(
        self, signature: Any, specs: Sequence[str | FaultSpec], outcome: Outcome
    ) -> None: ...


class _Held(Generic[T]):
    """A read-only view of what the started engine holds under the same name.

    It stays readable after ``stop()`` (the report reads the warnings then);
    before ``start()`` it is an error that says so.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, harness: None, owner: type) -> _Held[T]: ...

    @overload
    def __get__(self, harness: CeleryFaults, owner: type | None = None) -> T: ...

    def __get__(self, harness: CeleryFaults | None, owner: type | None = None) -> T | _Held[T]:
        if harness is None:
            return self
        return cast(T, getattr(harness._live(), self.name))

    def __set__(self, harness: CeleryFaults, value: T) -> None:
        raise AttributeError(
            f"CeleryFaults.{self.name} is read-only: the harness's engine owns it"
        )


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
        check_settings(workers=workers, max_executions=max_executions, seed=seed)
        BrokerProfile.named(profile)  # refuse an unknown profile before anything starts
        self.app = app
        self.profile_name = profile
        self.worker_count = workers
        self.seed = seed
        self.max_executions = max_executions
        self.check_unfired = check_unfired
        #: Whether specs the test arms itself run with the suite-wide ones or replace them.
        self.stack_suite_wide = stack_suite_wide
        #: A ``time.monotonic()`` instant (the test's time limit) past which drains stop.
        self.deadline: float | None = None
        #: explore()'s suite-wide budget, failure database and test id (the plugin sets it).
        self.explore_defaults: Any = None
        #: Real-broker mode's check of every run() (see :meth:`observe_runs`), or ``None``.
        self.comparison: Any = None
        self.suite_wide: list[str | FaultSpec] = []
        #: Suite-wide specs that fired in a scenario since ended by reset() (the plan forgets).
        self._suite_wide_fired: set[str] = set()
        self.django_connections: Any = None  # the WorkerConnections attached, if any
        self._engine: Engine | None = None

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

    @property
    def active(self) -> bool:
        return self._engine is not None and self._engine.active

    def start(self) -> None:
        """Take the app over; a failure half-way undoes what was done and is raised."""
        if self.active:
            raise RuntimeError("this CeleryFaults harness is already active")
        self.suite_wide, self._suite_wide_fired, self.django_connections = [], set(), None
        self._engine = Engine(
            self.app,
            profile=self.profile_name,
            workers=self.worker_count,
            seed=self.seed,
            max_executions=self.max_executions,
            deadline=lambda: self.deadline,
        )
        try:
            self._engine.start(then=self._attach_integrations)
        except BaseException:
            self._engine = None
            raise

    def _attach_integrations(self) -> None:
        """With Django configured, executions get a worker process's connections by themselves.

        What ``worker_connections()`` gives (counting writes stays opt-in); a
        configuration it cannot serve is refused here, in one line.
        """
        if django_configured():
            from .integrations.django import worker_connections

            worker_connections(self)

    def stop(self) -> None:
        """Undo everything ``start()`` did; a failure is raised once every step ran."""
        if self.active:
            self._live().stop()

    def on_stop(self, undo: Callable[[], None]) -> None:
        """Call ``undo`` when the harness stops (integrations put back what they changed)."""
        self._require_active().on_stop.append(undo)

    def observe_runs(self, observer: RunObserver) -> Callable[[], None]:
        """Tell ``observer`` of every ``run()`` from now on; returns what stops it."""
        self.comparison = observer

        def forget() -> None:
            if self.comparison is observer:
                self.comparison = None

        return forget

    def reset(self, *, suite_wide: bool = True) -> None:
        """Start a fresh scenario in place: empty broker, results, effects, plan and clock.

        What the test set up stays: tracked callables, the HTTP mock's
        registered responses (their call history is cleared), the app.
        Suite-wide specs (``--celery-faults``) are armed again unless
        ``suite_wide=False`` (scenarios that choose their own faults).
        """
        engine = self._driven("reset")
        self._suite_wide_fired |= self._fired_now()
        engine.reset()
        if suite_wide:
            for spec in self.suite_wide:
                engine.plan.arm(spec, explicit=False)

    # -- arming and running -----------------------------------------------------

    def inject(self, *specs: str | FaultSpec) -> list[ArmedSpec]:
        """Arm faults for the messages published from now on."""
        engine = self._require_active()
        if specs:
            self._own_specs()
        return [engine.plan.arm(spec) for spec in specs]

    def run(self, signature: Any, *specs: str | FaultSpec) -> Outcome:
        """Publish ``signature`` with ``specs`` bound to it, drain, return its outcome.

        For a plain signature the specs bind to its task id. For a chain, group
        or chord they bind to the first matching message the canvas publishes,
        and the outcome returned is that of the canvas's frozen (last) task.
        """
        engine = self._driven("run")
        refuse_foreign(self.app, signature)
        observer: RunObserver | None = self.comparison
        if observer is not None:
            observer.before_run(signature, specs)
        frozen = signature.freeze()
        plain = getattr(signature, "subtask_type", None) is None
        self._arm_for(engine, frozen.id if plain else None, signature.task, specs)
        signature.apply_async()
        engine.drain()
        while getattr(frozen, "results", None):  # a group: its last task stands for it
            frozen = frozen.results[-1]
        outcome = self.outcome(frozen.id)
        if observer is not None:
            observer.after_run(signature, specs, outcome)
        return outcome

    def _run_copy(self, published: PublishedMessage, *specs: str | FaultSpec) -> Outcome:
        """``run()`` of the signature ``published`` was recorded from, sending a copy of it.

        What sweeps and ``assert_idempotent`` do after the fault-free run (see
        :mod:`.engine.copies`): the same message under a fresh task id, through the
        same publish signals, broker and worker.
        """
        engine = self._driven("run")
        if self.comparison is not None:
            raise RuntimeError(
                "a copy cannot stand in for run() when real-broker mode compares it"
            )
        task_id = published.task_id_for_copy()
        self._arm_for(engine, task_id, published.task_name, specs)
        published.publish_copy(task_id)
        engine.drain()
        return self.outcome(task_id)

    def _arm_for(
        self, engine: Engine, task_id: str | None, task_name: str, specs: Sequence[str | FaultSpec]
    ) -> None:
        if specs:
            self._own_specs()
        engine.arm_for(task_id, task_name, specs)

    def drain(self) -> list[Outcome]:
        """Run the workers until nothing is ready or pending, moving the virtual clock.

        Returns the outcomes of the task ids delivered meanwhile, in delivery order.
        """
        return [self.outcome(task_id) for task_id in self._driven("drain").drain_delivered()]

    def track(
        self, target: str | tuple[Any, str], name: str | None = None, *, duration: float = 0.0
    ) -> str:
        """Count each call of ``target`` as a side effect; returns the name effects carry.

        ``duration``: virtual seconds each call takes (a slow API), during which
        time limits, visibility timeouts and other executions can act.
        """
        return self._require_active().track(target, name, duration)

    # -- suite-wide specs (``--celery-faults``) ---------------------------------

    def arm_suite_wide(self, spec: str | FaultSpec) -> ArmedSpec:
        """Arm a spec the test did not ask for (``--celery-faults``); it never fails unfired."""
        engine = self._require_active()
        self.suite_wide.append(spec)
        return engine.plan.arm(spec, explicit=False)

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

    def _fired_now(self) -> set[str]:
        return {str(a.spec) for a in self.plan.armed if not a.explicit and a.has_fired}

    def suite_wide_fired(self) -> set[str]:
        """The suite-wide specs (one spelling each) that fired in any scenario of this harness."""
        return self._suite_wide_fired | self._fired_now()

    # -- outcomes and verdicts --------------------------------------------------

    def outcome(self, task_id: str) -> Outcome:
        """The fate of ``task_id`` so far."""
        return self.history.outcome(task_id)

    def outcomes(self) -> list[Outcome]:
        """Every task id the broker has seen, in publish order."""
        return self.history.outcomes()

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
        once, each a scenario copyable as ``overlap(SCHEDULE)``. The harness
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

    def unfired(self, *, explicit_only: bool = True) -> list[ArmedSpec]:
        return self.plan.unfired(explicit_only=explicit_only)

    def assert_all_fired(self) -> None:
        """Fail when a fault the test asked for never fired: it proved nothing."""
        __tracebackhide__ = True
        missing = self.unfired()
        if missing:
            raise UnfiredFaultError(unfired_message(missing, self.plan, self.history.reached))

    # -- what the engine holds, read-only ---------------------------------------

    def _live(self) -> Engine:
        """The engine started last (still readable after ``stop()``)."""
        if self._engine is None:
            raise RuntimeError(
                "the CeleryFaults harness has not started: use it as `with CeleryFaults(app)`"
                " or call start() first"
            )
        return self._engine

    def _require_active(self) -> Engine:
        if self._engine is None or not self._engine.active:
            raise RuntimeError("the CeleryFaults harness is not active (use it as `with`)")
        return self._engine

    def _driven(self, what: str) -> Engine:
        """``what()`` drives the worker: only from the test's code, on the harness's thread."""
        engine = self._require_active()
        engine.require_driver(what)
        return engine

    #: The side effects executed, with task id and delivery number.
    effects = _Held[EffectLog]()
    #: The broker's event log.
    ledger = _Held[Ledger]()
    clock = _Held[VirtualClock]()
    #: A ``responses.RequestsMock``: every HTTP request through ``requests`` is an effect.
    http = _Held[TrackedRequestsMock]()
    #: What the checks found in the code under test, each once.
    warnings = _Held[list[str]]()
    history = _Held[History]()
    plan = _Held[FaultPlan]()
    broker = _Held[InMemoryBroker]()
    backend = _Held[InMemoryResultBackend]()
    scheduler = _Held[Scheduler]()
    workers = _Held[list[EmulatedWorker]]()
    checks = _Held[Checks]()
    #: Whether executions can overlap (several workers, or a pool of several children).
    concurrent = _Held[bool]()
    #: The dotted targets tracked (real-broker mode tracks them in its worker too).
    tracked = _Held[list[str]]()

    @property
    def records(self) -> list[ExecutionRecord]:
        """What happened to each delivery in the workers, in order."""
        return self.history.records

    @property
    def timeline(self) -> Timeline:
        return self.history.timeline

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
        if owner.main == app.main:  # two instances, one name: the names cannot tell them apart
            raise ValueError(
                f"run(): {signature!r} belongs to another app also named {owner.main!r}, not "
                f"the harness's: it would publish to that app's broker and never run here "
                f"(a @shared_task's signature takes the app current when it is built, such "
                f"as one a conftest makes current; celery_faults_app = celery:current_app "
                f"names that one)"
            )
        raise ValueError(
            f"run(): {signature!r} belongs to the app {owner.main!r}, not the harness's app "
            f"{app.main!r}: it would publish to that app's broker and never run here "
            f"(build it from this app's task, or with app.signature(name))"
        )


def _listed(specs: Iterable[str | FaultSpec] | None) -> Iterable[str | FaultSpec] | None:
    """``specs`` as given, refusing one bare string (it would be read one letter at a time)."""
    if isinstance(specs, str):
        raise TypeError(f"specs={specs!r}: expected a list of fault specs, such as [{specs!r}]")
    return specs
