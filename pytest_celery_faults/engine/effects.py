"""Side-effect points: tracked callables, HTTP requests, and task publishes.

Every side effect goes through :meth:`EffectLog.perform`. Outside a task it is
only recorded. Inside a task run by the emulated worker, the running
execution is told before the effect (so ``raise(...)@N`` can replace it, and a
dead child can do nothing more) and after it (so ``sigkill@N`` and its kin fire
at that boundary).

A side effect that may fail is still a side effect: it was attempted. An HTTP
request that ends in a connection error or a read timeout may have reached
the server; a Redis command cut off by a dropped connection may have run.
:func:`perform_attempt` records such a call as an effect (with what it raised
in its detail) and lets faults fire at its boundary, then raises the error to
the task, as the library would.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, NamedTuple, Protocol, TypeVar, get_args

import responses

from .. import speedups
from ..vocabulary import EffectKind, Ending
from .clock import VirtualClock

T = TypeVar("T")


class Effect(NamedTuple):
    """One side effect that completed.

    A named tuple: the compact record of an effect is the effect itself, one
    tuple per call, read through its fields (no object beside it, no text
    until its timeline line is read).
    """

    kind: EffectKind
    label: str
    time: float
    task_id: str | None = None
    task_name: str | None = None
    delivery: int | None = None
    index: int | None = None  # type: ignore[assignment]  # 1-based in its delivery (not tuple.index)
    detail: dict[str, Any] | None = None

    def __str__(self) -> str:
        return f"{self.kind} {self.label}"


#: ``Effect`` built from its fields without the keyword handling of its constructor.
_new_effect = tuple.__new__


class Execution(Protocol):
    """What the emulated worker's child exposes to side-effect points."""

    task_id: str
    task_name: str
    delivery: int
    effect_count: int
    dead: bool

    def body_starts(self) -> None: ...

    def before_effect(self, kind: EffectKind, label: str) -> None: ...

    def after_effect(self, effect: Effect) -> None: ...

    def sleep(self, seconds: float) -> None: ...  # virtual

    def take_signal(self) -> None: ...  # a signal remote control sent it lands now


class ExecutionWatcher(Protocol):
    """Told when an execution starts and how it ended (integrations use it).

    ``started`` is called on the stack that runs the body, just before it.
    ``ended`` is called with how the execution ended (a ``vocabulary.Ending``):
    ``"returned"``, ``"raised"`` or ``"exit"`` on the execution's own stack after it unwound;
    ``"child killed"``, ``"power lost"`` or ``"cold shutdown"`` when it was
    cut off, from the harness's side, while the killed stack stays frozen and
    runs nothing more (a database integration rolls back its open
    transaction there, as the database does for a dead process's connection).
    A watcher may also have ``discarded(execution)``: called on the frozen
    execution's own stack when the scenario ends and it is made to unwind
    (see :mod:`.scheduler`), so it can take away what the dead process no
    longer has (its database connection) before ``finally`` code runs.
    """

    def started(self, execution: Execution) -> None: ...

    def ended(self, execution: Execution, how: Ending) -> None: ...


class EffectLog:
    """The side effects executed during a harness, and the execution they belong to.

    Each execution runs on a stack of its own, in a context of its own
    (:mod:`.scheduler`), so "the execution running here" is a context
    variable: the harness's own context has none, and what the body runs in a
    copy of its context (``asyncio.to_thread``, a task of its event loop) is
    the execution's, as it is the worker child's.
    """

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.effects: list[Effect] = []
        #: Read once, as the harness starts (see :mod:`..speedups`).
        self.speedups = speedups.enabled()
        #: The execution whose body runs in this context (a harness's own variable).
        self._running: ContextVar[Execution | None] = ContextVar(
            "celery_faults_execution", default=None
        )
        #: Called with every effect; :meth:`observe` adds one for some kinds only.
        self.observers: list[Callable[[Effect], None]] = []
        self._observers_of: dict[str, list[Callable[[Effect], None]]] = {
            kind: [] for kind in get_args(EffectKind)
        }
        self.watchers: list[ExecutionWatcher] = []
        #: Errors the plugin itself raised inside executions, one line each, until
        #: the harness raises them (:meth:`take_failures`); resets keep them.
        self.failures: list[str] = []

    @property
    def execution(self) -> Execution | None:
        """The execution whose body runs on this thread, if any."""
        return self._running.get()

    @execution.setter
    def execution(self, execution: Execution | None) -> None:
        self._running.set(execution)

    def sleep(self, seconds: float) -> bool:  # virtual
        """``time.sleep`` while the worker side runs: a task body waits on the virtual clock.

        ``False`` when no task body runs on this thread (the real sleep applies).
        """
        execution = self.execution
        if execution is None:
            return False
        execution.sleep(seconds)  # virtual
        return True

    def execution_started(self, execution: Execution) -> None:
        for watcher in self.watchers:
            try:
                watcher.started(execution)
            except Exception as exc:
                self.plugin_failed(execution, exc, "as it started")
                raise

    def execution_ended(self, execution: Execution, how: Ending) -> None:
        for watcher in self.watchers:
            try:
                watcher.ended(execution, how)
            except Exception as exc:
                self.plugin_failed(execution, exc, f"as it ended ({how})")
                raise

    def execution_discarded(self, execution: Execution) -> None:
        """On a frozen execution's own stack, as the scenario's end makes it unwind."""
        for watcher in self.watchers:
            discarded = getattr(watcher, "discarded", None)
            if discarded is not None:
                try:
                    discarded(execution)
                except Exception as exc:
                    self.plugin_failed(execution, exc, "as its frozen stack was dropped")
                    raise

    def plugin_failed(self, execution: Execution | None, exc: BaseException, where: str) -> None:
        """Remember an error the plugin raised inside an execution (not the task's own)."""
        said = str(exc).removeprefix("celery_faults: ") or "(no message)"
        inside = (
            f"{execution.task_name}[{execution.task_id}] (delivery {execution.delivery})"
            if execution is not None
            else "the emulated worker"
        )
        self.failures.append(
            f"celery_faults: the plugin failed inside {inside} {where}, not the task: "
            f"{type(exc).__name__}: {said}"
        )

    def take_failures(self) -> list[str]:
        """The errors remembered by :meth:`plugin_failed` since the last call."""
        failures, self.failures = self.failures, []
        return failures

    def perform(
        self,
        kind: EffectKind,
        label: str,
        call: Callable[[], T],
        detail: dict[str, Any] | None = None,
        duration: float = 0.0,
    ) -> T:
        """Perform ``call`` as a side effect that takes ``duration`` virtual seconds."""
        execution = self.execution
        if execution is None:
            result = call()
            self._record(Effect(kind, label, self.clock.time(), detail=detail))
            return result
        execution.before_effect(kind, label)
        if duration:
            execution.sleep(duration)  # virtual
        result = call()
        execution.effect_count += 1
        effect = Effect(
            kind,
            label,
            self.clock.time(),
            task_id=execution.task_id,
            task_name=execution.task_name,
            delivery=execution.delivery,
            index=execution.effect_count,
            detail=detail,
        )
        self._record(effect)
        execution.after_effect(effect)
        return result

    def observe(
        self, observer: Callable[[Effect], None], kinds: Iterable[EffectKind] | None = None
    ) -> None:
        """Call ``observer`` with each effect (of ``kinds`` only, if given) after ``observers``."""
        if kinds is None:
            self.observers.append(observer)
            return
        for kind in kinds:
            self._observers_of.setdefault(kind, []).append(observer)

    def _record(self, effect: Effect) -> None:
        self.effects.append(effect)
        for observe in self.observers:
            observe(effect)
        for observe in self._observers_of.get(effect.kind, ()):
            observe(effect)

    def clear(self) -> None:
        self.effects.clear()

    def for_task(self, task_id: str) -> list[Effect]:
        return [effect for effect in self.effects if effect.task_id == task_id]

    def __iter__(self) -> Any:
        return iter(self.effects)

    def __len__(self) -> int:
        return len(self.effects)

    def __getitem__(self, index: int) -> Effect:
        return self.effects[index]

    def labels(self) -> list[str]:
        return [effect.label for effect in self.effects]


def perform_attempt(
    log: EffectLog,
    kind: EffectKind,
    label: str,
    call: Callable[[], T],
    detail: dict[str, Any] | None = None,
    cause: Callable[[Exception], BaseException] | None = None,
) -> T:
    """``log.perform(kind, label, call)``, counting the call even when it raises.

    ``cause`` finds the error to describe in what the call raised (a mock's
    wrapper around the error the code will see); by default its ``__cause__``.
    """
    detail = dict(detail or {})
    failed: list[Exception] = []

    def attempt() -> T | None:
        try:
            return call()
        except Exception as exc:
            error = cause(exc) if cause is not None else exc.__cause__ or exc
            detail["raised"] = f"{type(error).__name__}: {error}"
            failed.append(exc)
            return None

    result = log.perform(kind, label, attempt, detail=detail)
    if failed:
        raise failed[0]
    return result  # type: ignore[return-value]


class TrackedRequestsMock(responses.RequestsMock):
    """``responses.RequestsMock`` whose every request is a side effect."""

    def __init__(self, log: EffectLog, **kwargs: Any) -> None:
        kwargs.setdefault("assert_all_requests_are_fired", False)
        super().__init__(**kwargs)
        self.effect_log = log

    def _on_request(self, adapter: Any, request: Any, **kwargs: Any) -> Any:
        label = f"{request.method} {request.url}"
        detail = {"timeout": kwargs.get("timeout")}
        parent = super()._on_request
        return perform_attempt(
            self.effect_log, "http", label, lambda: parent(adapter, request, **kwargs), detail
        )


class Patch:
    """One attribute replaced for the life of a harness; :meth:`undo` puts it back."""

    def __init__(self, owner: Any, attribute: str, replacement: Any) -> None:
        self.owner = owner
        self.attribute = attribute
        self._had_own = attribute in getattr(owner, "__dict__", {})
        self._original = owner.__dict__[attribute] if self._had_own else None
        setattr(owner, attribute, replacement)

    def undo(self) -> None:
        if self._had_own:
            setattr(self.owner, self.attribute, self._original)
        else:
            delattr(self.owner, self.attribute)


def resolve_target(target: str | tuple[Any, str]) -> tuple[Any, str, str]:
    """``"pkg.mod.func"``, ``"pkg.mod.Class.meth"`` or ``(obj, "attr")`` -> owner, attr, name."""
    if isinstance(target, tuple):
        if len(target) != 2 or not isinstance(target[1], str):
            raise ValueError(
                f"track({target!r}): expected (object, 'attribute') or a dotted path such as "
                f"'proj.mail.send'"
            )
        owner, attribute = target
        if not hasattr(owner, attribute):
            raise AttributeError(f"track({target!r}): {owner!r} has no attribute {attribute!r}")
        owner_name = getattr(owner, "__name__", type(owner).__name__)
        return owner, attribute, f"{owner_name}.{attribute}"
    if not isinstance(target, str) or "." not in target:
        raise ValueError(
            f"track() takes a dotted path such as 'proj.mail.send' or (object, 'attribute'), "
            f"not {target!r}"
        )
    parts = target.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for part in parts[split:-1]:
                found = getattr(found, part)
        except AttributeError:
            break
        if hasattr(found, parts[-1]):
            return found, parts[-1], target
        break
    raise AttributeError(f"track({target!r}): cannot import or find {target!r}")


def tracking_wrapper(
    log: EffectLog, owner: Any, attribute: str, name: str, duration: float = 0.0
) -> Any:
    """A replacement for ``owner.attribute`` that performs each call as a side effect.

    Each call takes ``duration`` seconds of virtual time before it happens (a
    slow API: time limits and visibility timeouts can pass during it).
    """
    raw = owner.__dict__.get(attribute) if hasattr(owner, "__dict__") else None
    if isinstance(raw, staticmethod | classmethod):
        function = raw.__func__
        return type(raw)(functools.wraps(function)(tracked_call(log, name, function, duration)))
    original = getattr(owner, attribute)
    if not callable(original):
        raise TypeError(f"track({name!r}): {original!r} is not callable")
    wrapped = functools.wraps(original)(tracked_call(log, name, original, duration))
    wrapped.__celery_faults_tracked__ = name  # type: ignore[attr-defined]
    return wrapped


def tracked_call(
    log: EffectLog, name: str, function: Callable[..., Any], duration: float = 0.0
) -> Callable[..., Any]:
    """``function``, each call of it performed as the side effect ``name`` in ``log``.

    A speed-up (:mod:`..speedups`) when the call takes no virtual time: what
    :meth:`EffectLog.perform` does, inlined, with no closure per call (a tracked
    call is the hot path of a sweep). With the speed-ups off, it goes through
    :meth:`EffectLog.perform` itself.
    """
    if duration or not log.speedups:

        def performed(*args: Any, **kwargs: Any) -> Any:
            return log.perform("call", name, lambda: function(*args, **kwargs), duration=duration)

        return performed

    current = log._running.get
    effects = log.effects  # the log clears these lists in place: they stay the log's
    observers = log.observers
    call_observers = log._observers_of["call"]
    now = log.clock.time

    def inlined(*args: Any, **kwargs: Any) -> Any:
        execution = current()
        if execution is None:
            result = function(*args, **kwargs)
            log._record(_new_effect(Effect, ("call", name, now(), None, None, None, None, None)))
            return result
        execution.before_effect("call", name)
        result = function(*args, **kwargs) if kwargs else function(*args)
        index = execution.effect_count = execution.effect_count + 1
        effect: Effect = _new_effect(
            Effect,
            (
                "call",
                name,
                now(),
                execution.task_id,
                execution.task_name,
                execution.delivery,
                index,
                None,
            ),
        )
        effects.append(effect)
        for observe in observers:
            observe(effect)
        for observe in call_observers:
            observe(effect)
        execution.after_effect(effect)
        return result

    return inlined
