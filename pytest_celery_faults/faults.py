"""Fault kinds and the fault-spec grammar.

A spec is text a user can type on the command line, in a marker or in code, and
the replay string a failure prints::

    spec   := [TASK ":"] step (";" step)*  |  [TASK ":"] "redeliver" ["*" K]
    step   := KIND "@" N  |  "exit(" CODE ")@" N  |  "raise(" DOTTED ")@" N
            |  "ack_lost"  |  "ok"

Step *i* applies to delivery *i* of the message it is bound to; ``@N`` is the
side-effect boundary: after N side effects of that delivery completed (``@0``:
before the first one).
"""

from __future__ import annotations

import builtins
import importlib
import re
from dataclasses import dataclass, field
from typing import Final

from .errors import FaultSpecError

#: Step kinds that fire at a side-effect boundary, with the help text for each.
BOUNDARY_KINDS: Final[dict[str, str]] = {
    "sigkill": "the child running the task is killed by SIGKILL",
    "sigterm": "the child running the task is killed by SIGTERM",
    "exit": "the task calls sys.exit(CODE)",
    "power_loss": "the whole worker dies; its connection drops",
    "raise": "the next side effect raises the exception instead of running",
    "timeout": "the hard time limit is hit",
    "soft_timeout": "the soft time limit is hit (SoftTimeLimitExceeded in the task)",
    "warm_shutdown": "the worker is asked to stop: the task finishes, held messages go back",
    "cold_shutdown": "the worker stops at once: the running task is cancelled and cut off",
}
#: Step kinds without a boundary.
PLAIN_KINDS: Final[dict[str, str]] = {
    "ack_lost": "the task completes but its ack never reaches the broker",
    "ok": "this delivery runs without a fault",
    "overlap": "a second copy is delivered while this one runs; the two interleave at "
    "side-effect boundaries (overlap(SCHEDULE) replays one interleaving: 1 and 2 name "
    "the copy that runs next at each choice)",
}
#: Kinds that kill the process running the task.
CHILD_DEATHS: Final[frozenset[str]] = frozenset({"sigkill", "sigterm", "timeout"})

VALID_FORMS: Final[str] = (
    "sigkill@N, sigterm@N, exit(CODE)@N, power_loss@N, raise(dotted.Exception)@N, "
    "timeout@N, soft_timeout@N, warm_shutdown@N, cold_shutdown@N, ack_lost, ok, "
    "overlap, overlap(SCHEDULE), "
    "redeliver*K; steps for successive deliveries joined by ';', "
    "optionally prefixed by TASK_NAME:"
)

_TASK_PREFIX = re.compile(r"^\s*([A-Za-z_][\w.\-]*)\s*:(?!:)")
_STEP = re.compile(
    r"""^(?P<kind>[a-z_]+)
        (?:\((?P<arg>[^()]*)\))?
        (?:@(?P<at>[^@]*))?$""",
    re.VERBOSE,
)
_REDELIVER = re.compile(r"^redeliver(?:\*(?P<times>[^*]*))?$")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class Step:
    """What happens to one delivery of a message."""

    kind: str
    at: int | None = None
    code: int | None = None
    exception: str | None = None
    schedule: str | None = None  # overlap: which copy runs at each choice, "1" or "2"

    def __str__(self) -> str:
        if self.kind == "exit":
            head = f"exit({self.code})"
        elif self.kind == "raise":
            head = f"raise({self.exception})"
        elif self.schedule:
            head = f"{self.kind}({self.schedule})"
        else:
            head = self.kind
        return head if self.at is None else f"{head}@{self.at}"

    @property
    def kills_child(self) -> bool:
        return self.kind in CHILD_DEATHS or self.kind == "exit"

    def exception_class(self) -> type[BaseException]:
        """The class ``raise(...)`` names, imported now."""
        if self.exception is None:
            raise FaultSpecError(f"step {self} raises nothing")
        return resolve_exception(self.exception, spec=str(self))


@dataclass(frozen=True)
class FaultSpec:
    """A parsed fault spec: steps for successive deliveries, or a redelivery count."""

    steps: tuple[Step, ...] = ()
    task: str | None = None
    redeliver: int = 0

    def __str__(self) -> str:
        body = (
            ("redeliver" if self.redeliver == 1 else f"redeliver*{self.redeliver}")
            if self.redeliver
            else ";".join(str(step) for step in self.steps)
        )
        return f"{self.task}:{body}" if self.task else body

    def step_for(self, delivery: int) -> Step | None:
        """The step for delivery number ``delivery`` (1-based), if the spec has one."""
        if 1 <= delivery <= len(self.steps):
            return self.steps[delivery - 1]
        return None

    def matches(self, task_name: str) -> bool:
        return self.task is None or self.task == task_name

    def import_exceptions(self) -> None:
        """Import every class a ``raise(...)`` step names; :class:`FaultSpecError` if one fails.

        Done when a spec is armed, and by the plugin at collection, so a typo in a
        marker or ``--celery-faults`` is a usage error rather than a failure mid-task.
        """
        for step in self.steps:
            if step.kind == "raise":
                step.exception_class()

    @property
    def fault_count(self) -> int:
        """How many faults the spec injects (``ok`` steps are not faults)."""
        if self.redeliver:
            return self.redeliver
        return sum(step.kind != "ok" for step in self.steps)


def parse_spec(text: str | FaultSpec) -> FaultSpec:
    """Parse ``text`` into a :class:`FaultSpec`; :class:`FaultSpecError` names the bad token."""
    if isinstance(text, FaultSpec):
        return text
    if not isinstance(text, str):
        raise FaultSpecError(
            f"a fault spec is a string or a FaultSpec, not {type(text).__name__} "
            f"{text!r}; valid forms: {VALID_FORMS}"
        )
    source = text
    task: str | None = None
    prefix = _TASK_PREFIX.match(text)
    if prefix:
        task = prefix.group(1)
        text = text[prefix.end() :]
    tokens = [token.strip() for token in text.split(";")]
    if not any(tokens):
        raise FaultSpecError(f"empty fault spec {source!r}; valid forms: {VALID_FORMS}")

    redeliver = _REDELIVER.match(tokens[0])
    if redeliver:
        if len(tokens) > 1:
            raise FaultSpecError(
                f"invalid fault spec {source!r}: 'redeliver' applies to every delivery "
                f"and cannot be chained with ';'; valid forms: {VALID_FORMS}"
            )
        times = _natural(redeliver.group("times") or "1", token=tokens[0], source=source)
        if times < 1:
            raise FaultSpecError(
                f"invalid fault spec {source!r}: in {tokens[0]!r} the count must be "
                f"at least 1; valid forms: {VALID_FORMS}"
            )
        return FaultSpec(task=task, redeliver=times)
    return FaultSpec(steps=tuple(_parse_step(token, source) for token in tokens), task=task)


def _parse_step(token: str, source: str) -> Step:
    def bad(problem: str) -> FaultSpecError:
        return FaultSpecError(
            f"invalid fault spec {source!r}: {problem}; valid forms: {VALID_FORMS}"
        )

    if not token:
        raise bad("an empty step between ';'")
    if token.startswith("redeliver"):
        raise bad(f"{token!r} cannot be chained with other steps")
    match = _STEP.match(token)
    if not match:
        raise bad(f"cannot read {token!r}")
    kind, arg, at_text = match.group("kind", "arg", "at")
    if kind == "overlap" and at_text is None:
        if arg is None:
            return Step(kind)
        schedule = arg.strip()
        if not schedule or schedule.strip("12"):
            raise bad(f"{token!r}: a schedule is a string of 1s and 2s, as in overlap(1212)")
        return Step(kind, schedule=schedule)
    if kind in PLAIN_KINDS:
        if arg is not None or at_text is not None:
            raise bad(f"{token!r}: {kind!r} takes no argument and no @N")
        return Step(kind)
    if kind not in BOUNDARY_KINDS:
        raise bad(f"unknown fault {kind!r} in {token!r}")
    if at_text is None:
        named = arg.strip() if arg and _DOTTED.match(arg.strip()) else "ConnectionError"
        example = f"raise({named})" if kind == "raise" else kind
        raise bad(f"{token!r} needs a side-effect boundary, as in {example}@0")
    at = _natural(at_text, token=token, source=source)
    if kind == "exit":
        code = _natural(arg if arg is not None else "1", token=token, source=source)
        return Step(kind, at=at, code=code)
    if kind == "raise":
        if not arg or not _DOTTED.match(arg.strip()):
            raise bad(f"{token!r} needs an exception, as in raise(requests.ConnectionError)@1")
        return Step(kind, at=at, exception=arg.strip())
    if arg is not None:
        raise bad(f"{token!r}: {kind!r} takes no argument")
    return Step(kind, at=at)


def _natural(text: str, *, token: str, source: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise FaultSpecError(
            f"invalid fault spec {source!r}: {text!r} in {token!r} is not a whole "
            f"number >= 0; valid forms: {VALID_FORMS}"
        )
    return int(text)


def resolve_exception(dotted: str, *, spec: str) -> type[BaseException]:
    """Import the exception class ``dotted`` names (a builtin name works alone)."""
    module_name, _, attr = dotted.rpartition(".")
    try:
        found = (
            getattr(builtins, attr)
            if not module_name
            else getattr(importlib.import_module(module_name), attr)
        )
    except (ImportError, AttributeError) as exc:
        raise FaultSpecError(
            f"invalid fault spec {spec!r}: cannot import {dotted!r} ({exc}); "
            f"valid forms: {VALID_FORMS}"
        ) from None
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise FaultSpecError(
            f"invalid fault spec {spec!r}: {dotted!r} is not an exception class; "
            f"valid forms: {VALID_FORMS}"
        )
    return found


@dataclass
class ArmedSpec:
    """A spec armed in a harness, the message it is bound to, and the steps that fired."""

    spec: FaultSpec
    explicit: bool = True  # asked for by the test itself (not suite-wide)
    task_id: str | None = None  # bound to this task id (its first matching message)
    fired: list[tuple[str, int, Step]] = field(default_factory=list)
    replays: int = 0

    @property
    def unfired_steps(self) -> list[tuple[int, Step]]:
        done = {(delivery, str(step)) for _, delivery, step in self.fired}
        return [
            (number, step)
            for number, step in enumerate(self.spec.steps, start=1)
            if step.kind != "ok" and (number, str(step)) not in done
        ]

    @property
    def has_fired(self) -> bool:
        if self.spec.redeliver:
            return self.replays > 0
        return not self.unfired_steps


class FaultPlan:
    """Which armed spec applies to which message and delivery.

    A step spec binds to the first message published after it was armed whose
    task matches (or to the task id it was armed for); step *i* then applies to
    the *i*-th delivery of that task id, whichever message carries it (a retry
    is a new message with the same id). A ``redeliver`` spec applies to every
    matching message.
    """

    def __init__(self) -> None:
        self.armed: list[ArmedSpec] = []
        self.deliveries: dict[str, int] = {}
        self._waiting: list[ArmedSpec] = []  # step specs not bound to a task id yet
        self._redelivering: list[ArmedSpec] = []
        self._bound: dict[str, list[ArmedSpec]] = {}

    def clear(self) -> None:
        """Disarm everything: a fresh scenario."""
        self.armed.clear()
        self.deliveries.clear()
        self._waiting.clear()
        self._redelivering.clear()
        self._bound.clear()

    def arm(
        self, spec: FaultSpec | str, *, task_id: str | None = None, explicit: bool = True
    ) -> ArmedSpec:
        parsed = parse_spec(spec)
        parsed.import_exceptions()  # refuse an unimportable exception now, not mid-task
        armed = ArmedSpec(parsed, explicit=explicit)
        self.armed.append(armed)
        if parsed.redeliver:
            self._redelivering.append(armed)
        elif task_id is not None:
            self.bind(armed, task_id)
        else:
            self._waiting.append(armed)
        return armed

    def disarm(self, armed: ArmedSpec) -> None:
        """Take back a spec armed earlier (a suite-wide one that a test's own specs replace)."""
        for held in (self.armed, self._waiting, self._redelivering, *self._bound.values()):
            held[:] = [other for other in held if other is not armed]

    def bind(self, armed: ArmedSpec, task_id: str) -> None:
        """Tie a step spec to ``task_id``."""
        if armed in self._waiting:
            self._waiting.remove(armed)
        armed.task_id = task_id
        self._bound.setdefault(task_id, []).append(armed)

    def replays_for(self, task_id: str, task_name: str) -> int:
        """Bind waiting step specs to a newly published message; its redelivery count."""
        if self._waiting and task_id not in self.deliveries:
            for armed in [a for a in self._waiting if a.spec.matches(task_name)]:
                self.bind(armed, task_id)
        self.deliveries.setdefault(task_id, 0)
        return max(
            (a.spec.redeliver for a in self._redelivering if a.spec.matches(task_name)),
            default=0,
        )

    def next_delivery(self, task_id: str, task_name: str) -> tuple[int, Step | None]:
        """Count a delivery of ``task_id``; the step that applies to it."""
        number = self.deliveries.get(task_id, 0) + 1
        self.deliveries[task_id] = number
        for armed in self._bound.get(task_id, ()):
            step = armed.spec.step_for(number)
            if step is not None and step.kind != "ok":
                return number, step
        return number, None

    def fired(self, task_id: str, delivery: int, step: Step) -> None:
        for armed in self._bound.get(task_id, ()):
            if armed.spec.step_for(delivery) == step:
                armed.fired.append((task_id, delivery, step))
                return

    def replayed(self, task_name: str) -> None:
        for armed in self._redelivering:
            if armed.spec.matches(task_name):
                armed.replays += 1

    def unfired(self, *, explicit_only: bool = True) -> list[ArmedSpec]:
        return [
            armed
            for armed in self.armed
            if (armed.explicit or not explicit_only) and not armed.has_fired
        ]
