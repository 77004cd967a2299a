"""Fault kinds and the fault-spec grammar.

A spec is text a user can type on the command line, in a marker or in code, and
the replay string a failure prints::

    spec   := [TASK ":"] step (";" step)*  |  [TASK ":"] "redeliver" ["*" K]
            |  [TASK ":"] publish
    step   := KIND "@" N  |  "exit(" CODE ")@" N  |  "raise(" DOTTED ")@" N
            |  "rollout" ["(" GRACE ["," DELAY] ")"] "@" N
            |  "overlap" ["(" SCHEDULE ")"]  |  "ack_lost"  |  "ok"
    publish := "publish_refused" ["(" K ")"] ["@" P]  |  "publish_twice" ["@" P]
            |  "publish_lost" ["@" P]

Step *i* applies to delivery *i* of the message it is bound to; ``@N`` is the
side-effect boundary: after N side effects of that delivery completed (``@0``:
before the first one).

A publish fault happens to a publish, not to a delivery, so it stands alone
(no ``;``) and its ``@P`` counts publishes, not side effects: the P-th publish
the spec applies to (``@1``, the default: the next one). It applies to the
publishes of the task id it is bound to (``run()``'s signature, a retry being
a publish of the same id), or else to every publish of a task matching
``TASK:`` (any task but Celery's own without it), from the test's own
``.delay()`` as from a task's child publishes, counted from when it was armed.
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .errors import FaultSpecError
from .vocabulary import FaultKind

#: Step kinds that fire at a side-effect boundary, with the help text for each.
BOUNDARY_KINDS: Final[dict[FaultKind, str]] = {
    "sigkill": "the child running the task is killed by SIGKILL",
    "sigterm": "the child running the task is killed by SIGTERM",
    "exit": "the task calls sys.exit(CODE)",
    "power_loss": "the whole worker dies; its connection drops",
    "raise": "the next side effect raises the exception instead of running",
    "timeout": "the hard time limit is hit",
    "soft_timeout": "the soft time limit is hit (SoftTimeLimitExceeded in the task)",
    "warm_shutdown": "the worker is asked to stop: the task finishes, held messages go back",
    "cold_shutdown": "the worker stops at once: the running task is cancelled and cut off",
    "rollout": "a deploy: SIGTERM to the worker (Celery's warm shutdown, or cold with "
    "REMAP_SIGTERM=SIGQUIT), SIGKILL after GRACE virtual seconds (rollout(GRACE), 30 by "
    "default), a replacement worker consuming DELAY seconds after the SIGTERM "
    "(rollout(GRACE,DELAY), 0 by default)",
    "broker_restart": "the worker's connection to the broker drops and comes back: the "
    "broker takes back what it held unacked, Celery's consumer restarts",
}
#: A rollout's termination grace when the spec names none: Kubernetes' default.
DEFAULT_GRACE: Final[int] = 30
#: Step kinds without a boundary.
PLAIN_KINDS: Final[dict[FaultKind, str]] = {
    "ack_lost": "the task completes but its ack never reaches the broker",
    "ok": "this delivery runs without a fault",
    "overlap": "a second copy is delivered while this one runs; the two interleave at "
    "side-effect boundaries (overlap(SCHEDULE) replays one interleaving: each character "
    "names the execution that runs next at each choice, 1 and 2 the two copies, 3 and on "
    "other executions running at once)",
}
#: Fault kinds that happen to a publish (a whole spec of their own, ``@P`` = the P-th publish).
PUBLISH_KINDS: Final[dict[FaultKind, str]] = {
    "publish_refused": "the broker refuses the publish: the transport raises a connection "
    "error on every attempt (publish_refused(K): on the first K attempts only), kombu retries "
    "as the app's task_publish_retry_policy says, and the caller of .delay() gets kombu's "
    "OperationalError once the retries are spent (nothing is queued)",
    "publish_twice": "the broker queues the publish but its confirm is lost: the connection "
    "drops after the message is queued, kombu's retry publishes it again, and two messages "
    "carry the same task id (with retry=False the caller gets the error, one copy queued)",
    "publish_lost": "the publish returns as if it succeeded but the broker never queues the "
    "message (no publisher confirms): the task is lost",
}
#: How a schedule names the executions running at once, in the order they took a label
#: (the first label no running execution holds): one character each.
SCHEDULE_LABELS: Final[str] = "123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

#: Celery's internal tasks (``celery.chord_unlock``...): a spec binds to them only by name.
INTERNAL_PREFIX: Final[str] = "celery."

VALID_FORMS: Final[str] = (
    "sigkill@N, sigterm@N, exit(CODE)@N, power_loss@N, raise(dotted.Exception)@N, "
    "timeout@N, soft_timeout@N, warm_shutdown@N, cold_shutdown@N, "
    "rollout(GRACE)@N, rollout(GRACE,DELAY)@N, broker_restart@N, ack_lost, ok, "
    "overlap, overlap(SCHEDULE), "
    "redeliver*K, publish_refused[(K)][@P], publish_twice[@P], publish_lost[@P]; "
    "steps for successive deliveries joined by ';', optionally prefixed by TASK_NAME:"
)

#: A task name in front of a spec: ASCII, and may itself hold colons (``low:send``).
_TASK_NAME = re.compile(r"[A-Za-z_][\w.\-:]*(?<!:)", re.ASCII)
#: Where the first step starts at the latest: the task prefix ends at the last ':' before.
_STEP_START = re.compile(r"[(@;*]")
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
#: Numbers in a spec (boundaries, exit codes, redelivery counts) have at most this many digits.
MAX_DIGITS: Final[int] = 6
#: Bad input is echoed in errors up to this many characters.
ECHO_LIMIT: Final[int] = 80
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

    kind: FaultKind
    at: int | None = None
    code: int | None = None
    exception: str | None = None
    schedule: str | None = None  # overlap: which execution runs at each choice (its label)
    grace: int | None = None  # rollout: virtual seconds from SIGTERM to SIGKILL
    delay: int | None = None  # rollout: virtual seconds from SIGTERM to the replacement
    times: int | None = None  # publish_refused(K): how many attempts are refused (None: all)

    def __str__(self) -> str:
        if self.kind == "exit":
            head = f"exit({self.code})"
        elif self.kind == "raise":
            head = f"raise({self.exception})"
        elif self.schedule:
            head = f"{self.kind}({self.schedule})"
        elif self.kind == "rollout":
            head = (
                f"rollout({self.grace})"
                if not self.delay
                else (f"rollout({self.grace},{self.delay})")
            )
        elif self.times is not None:
            head = f"{self.kind}({self.times})"
        else:
            head = self.kind
        return head if self.at is None else f"{head}@{self.at}"

    @property
    def publish_number(self) -> int:
        """A publish fault's P: the P-th publish it applies to (the next one by default)."""
        return self.at if self.at is not None else 1

    def exception_class(self) -> type[BaseException]:
        """The class ``raise(...)`` names, imported now."""
        if self.exception is None:
            raise FaultSpecError(f"step {self} raises nothing")
        return resolve_exception(self.exception, spec=str(self))

    def check_time_limits(self, task_name: str, hard: float | None, soft: float | None) -> None:
        """Refuse a time-limit fault on a task Celery would never stop for time."""
        if self.kind == "timeout" and not hard:
            which, option = "hard", "time_limit"
        elif self.kind == "soft_timeout" and not soft:
            which, option = "soft", "soft_time_limit"
        else:
            return
        raise FaultSpecError(
            f"{self} cannot fire on task {task_name}: it has no {which} time limit "
            f"({option} on the task, task_{option} in the app's settings, or "
            f"apply_async({option}=...)), so a worker never stops it for time; set one, "
            f"or use sigkill@{self.at}"
        )

    def injected_exception(self, before: str) -> BaseException:
        """The exception ``raise(...)`` throws in place of the side effect ``before``."""
        return build_exception(
            self.exception_class(),
            f"injected by celery_faults: {self} before {before}",
            spec=str(self),
        )


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
        if self.publish is not None:
            return None  # it happens to a publish, never to a delivery
        if 1 <= delivery <= len(self.steps):
            return self.steps[delivery - 1]
        return None

    @property
    def publish(self) -> Step | None:
        """The publish fault this spec is, if it is one."""
        if len(self.steps) == 1 and self.steps[0].kind in PUBLISH_KINDS:
            return self.steps[0]
        return None

    def matches(self, task_name: str) -> bool:
        """Whether the spec targets ``task_name``; Celery's own ``celery.*`` tasks only by name."""
        if self.task is None:
            return not task_name.startswith(INTERNAL_PREFIX)
        return self.task == task_name

    def import_exceptions(self) -> None:
        """Import every class a ``raise(...)`` step names; :class:`FaultSpecError` if one fails.

        Done when a spec is armed, and by the plugin at collection, so a typo in a
        marker or ``--celery-faults`` is a usage error rather than a failure mid-task.
        """
        for step in self.steps:
            if step.kind == "raise":
                step.injected_exception(before="a side effect")  # can it be built at all?

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
            f"{_cut(repr(text))}; valid forms: {VALID_FORMS}"
        )
    source = text
    task: str | None = None
    step_start = _STEP_START.search(text)
    colon = text.rfind(":", 0, step_start.start() if step_start else len(text))
    if colon >= 0:
        task = text[:colon].strip()
        if not _TASK_NAME.fullmatch(task):
            raise FaultSpecError(
                f"invalid fault spec {shown(source)}: {shown(task)} before the last ':' is "
                f"not a task name (letters, digits, '_', '.', '-', ':'); "
                f"valid forms: {VALID_FORMS}"
            )
        text = text[colon + 1 :]
    tokens = [token.strip() for token in text.split(";")]
    if not any(tokens):
        raise FaultSpecError(f"empty fault spec {shown(source)}; valid forms: {VALID_FORMS}")

    redeliver = _REDELIVER.match(tokens[0])
    if redeliver:
        if len(tokens) > 1:
            raise FaultSpecError(
                f"invalid fault spec {shown(source)}: 'redeliver' applies to every delivery "
                f"and cannot be chained with ';'; valid forms: {VALID_FORMS}"
            )
        times = _natural(redeliver.group("times") or "1", token=tokens[0], source=source)
        if times < 1:
            raise FaultSpecError(
                f"invalid fault spec {shown(source)}: in {shown(tokens[0])} the count must be "
                f"at least 1; valid forms: {VALID_FORMS}"
            )
        return FaultSpec(task=task, redeliver=times)
    steps = tuple(_parse_step(token, source) for token in tokens)
    if len(steps) > 1 and any(step.kind in PUBLISH_KINDS for step in steps):
        raise FaultSpecError(
            f"invalid fault spec {shown(source)}: a publish fault (publish_refused, "
            f"publish_twice, publish_lost) happens to a publish, not a delivery, and cannot "
            f"be chained with ';' (arm it as a spec of its own); valid forms: {VALID_FORMS}"
        )
    return FaultSpec(steps=steps, task=task)


def _parse_step(token: str, source: str) -> Step:
    def bad(problem: str) -> FaultSpecError:
        return FaultSpecError(
            f"invalid fault spec {shown(source)}: {problem}; valid forms: {VALID_FORMS}"
        )

    echo = shown(token)

    if not token:
        raise bad("an empty step between ';'")
    if token.startswith("redeliver"):
        raise bad(f"{echo} cannot be chained with other steps")
    match = _STEP.match(token)
    if not match:
        raise bad(f"cannot read {echo}")
    kind, arg, at_text = match.group("kind", "arg", "at")
    if kind == "overlap" and at_text is None:
        if arg is None:
            return Step("overlap")
        schedule = arg.strip()
        if not schedule or schedule.strip(SCHEDULE_LABELS):
            raise bad(
                f"{token!r}: a schedule names the execution to run at each choice, one "
                f"character each (1-9, a-z, A-Z; 1 and 2 the two copies), as in overlap(1212)"
            )
        return Step("overlap", schedule=schedule)
    if kind in PUBLISH_KINDS:
        return _publish_step(kind, arg, at_text, token=token, source=source, bad=bad)
    if kind in PLAIN_KINDS:
        if arg is not None or at_text is not None:
            raise bad(f"{echo}: {shown(kind)} takes no argument and no @N")
        return Step(kind)
    if kind not in BOUNDARY_KINDS:
        raise bad(f"unknown fault {shown(kind)} in {echo}")
    if at_text is None:
        named = arg.strip() if arg and _DOTTED.match(arg.strip()) else "ConnectionError"
        example = f"raise({named})" if kind == "raise" else kind
        raise bad(f"{echo} needs a side-effect boundary, as in {example}@0")
    at = _natural(at_text, token=token, source=source)
    if kind == "exit":
        code = _natural(arg if arg is not None else "1", token=token, source=source)
        if code > 255:
            raise bad(f"{echo}: an exit code is 0 to 255")
        return Step(kind, at=at, code=code)
    if kind == "raise":
        if not arg or not _DOTTED.match(arg.strip()):
            raise bad(f"{echo} needs an exception, as in raise(requests.ConnectionError)@1")
        return Step(kind, at=at, exception=arg.strip())
    if kind == "rollout":
        parts = [part.strip() for part in (arg or str(DEFAULT_GRACE)).split(",")]
        if len(parts) > 2:
            raise bad(f"{echo}: a rollout takes a grace and a delay, as in rollout(30,5)@{at}")
        grace, *delay = (_natural(part, token=token, source=source) for part in parts)
        return Step(kind, at=at, grace=grace, delay=delay[0] if delay else 0)
    if arg is not None:
        raise bad(f"{echo}: {shown(kind)} takes no argument")
    return Step(kind, at=at)


def _publish_step(
    kind: FaultKind,
    arg: str | None,
    at_text: str | None,
    *,
    token: str,
    source: str,
    bad: Callable[[str], FaultSpecError],
) -> Step:
    echo = shown(token)
    times: int | None = None
    if arg is not None:
        if kind != "publish_refused":
            raise bad(f"{echo}: {shown(kind)} takes no argument")
        times = _natural(arg, token=token, source=source)
        if times < 1:
            raise bad(f"{echo}: the number of refused attempts must be at least 1")
    at: int | None = None
    if at_text is not None:
        at = _natural(at_text, token=token, source=source)
        if at < 1:
            raise bad(f"{echo}: @P counts publishes from 1 (the next publish is @1)")
    return Step(kind, at=at, times=times)


def _natural(text: str, *, token: str, source: str) -> int:
    text = text.strip()
    if not _DIGITS.fullmatch(text):  # ASCII digits only: '²' and '١' are not numbers here
        problem = "is not a whole number >= 0"
    elif len(text.lstrip("0")) > MAX_DIGITS:
        problem = f"is too large (at most {MAX_DIGITS} digits)"
    else:
        return int(text)
    raise FaultSpecError(
        f"invalid fault spec {shown(source)}: {shown(text)} in {shown(token)} {problem}; "
        f"valid forms: {VALID_FORMS}"
    )


def shown(text: str) -> str:
    """``repr(text)``, cut short when long: an error echoes bad input, not 300 KB of it."""
    if len(text) <= ECHO_LIMIT:
        return repr(text)
    return f"{text[: ECHO_LIMIT - 20]!r}... ({len(text)} characters)"


def _cut(text: str) -> str:
    if len(text) <= ECHO_LIMIT:
        return text
    return f"{text[: ECHO_LIMIT - 20]}... ({len(text)} characters)"


def build_exception(cls: type[BaseException], message: str, *, spec: str) -> BaseException:
    """An instance of ``cls`` carrying ``message``, built the way its constructor asks.

    Most exceptions take a message. Some need more, such as SQLAlchemy's
    ``OperationalError(statement, params, orig)``: the message goes in the first
    required argument and the other required positional arguments are ``None``
    (what a driver leaves out when it has nothing to say). A class that still
    cannot be built is refused naming it, when the spec is armed.
    """
    try:
        return cls(message)
    except TypeError as exc:
        first_error = exc
    try:
        parameters = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in parameters if p.default is p.empty and p.kind in positional]
    if len(required) > 1 and not any(
        p.default is p.empty and p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters
    ):
        try:
            return cls(message, *[None] * (len(required) - 1))
        except Exception as exc:  # the constructor's own complaint, shown below
            first_error = exc  # type: ignore[assignment]
    name = f"{cls.__module__}.{cls.__qualname__}"
    raise FaultSpecError(
        f"invalid fault spec {shown(spec)}: cannot build {name} for raise(...) "
        f"({type(first_error).__name__}: {first_error}); name an exception whose "
        f"constructor takes a message, or a subclass of yours that builds it; "
        f"valid forms: {VALID_FORMS}"
    ) from None


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
            f"invalid fault spec {shown(spec)}: cannot import {shown(dotted)} ({exc}); "
            f"valid forms: {VALID_FORMS}"
        ) from None
    if not (isinstance(found, type) and issubclass(found, BaseException)):
        raise FaultSpecError(
            f"invalid fault spec {shown(spec)}: {shown(dotted)} is not an exception class; "
            f"valid forms: {VALID_FORMS}"
        )
    return found
