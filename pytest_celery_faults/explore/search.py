"""The search: every choice of a run drawn through Hypothesis, so its engine finds and shrinks.

This is the one module that imports Hypothesis. A run asks its
:class:`DrawSource` for each choice as it reaches it (the messages to publish,
each message's fault as it is published, which execution runs next at each
switch point, a stall after a side effect), and the source draws it from
Hypothesis's ``data``. Hypothesis's shrinker then works on those draws: every
draw shrinks towards 0, and 0 always means the simpler run (a signature left
out, no fault, boundary 0, the first execution runs on, no stall), so a shrunk
choice sequence is a schedule with fewer messages, fewer faults, earlier
boundaries and fewer switches.

Swarm testing: each run first draws which kinds of fault it may use at all, so
runs differ in their mix, and rare combinations come up (Groce et al., 2012).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from ..grammar import BOUNDARY_KINDS, PUBLISH_KINDS, FaultSpec, Step, parse_spec
from .runner import RunResult
from .schedule import MessageRef

#: What the worker and the broker do to a correct publish: the default mix.
DEFAULT_KINDS: Final[tuple[str, ...]] = (
    "sigkill",
    "exit(1)",
    "power_loss",
    "ack_lost",
    "redeliver",
    "overlap",
    "interleave",
    "pause",
)
#: Kinds a test may add (``kinds=[...]``): raised exceptions, time limits, shutdowns,
#: deploys and broker restarts, and publisher faults (a message's publish is refused,
#: queued twice, or lost: drawn for the message as it is published).
OPTIONAL_KINDS: Final[tuple[str, ...]] = (
    "sigterm",
    "timeout",
    "soft_timeout",
    "warm_shutdown",
    "cold_shutdown",
    "raise(EXCEPTION)",
    "rollout(GRACE)",
    "broker_restart",
    "publish_refused(K)",
    "publish_twice",
    "publish_lost",
)
#: How long a stall lasts, virtual seconds: a slow call, a long GC, past Redis's visibility.
PAUSES: Final[tuple[int, ...]] = (5, 60, 3601)
#: Messages past those the fault-free run published that get a fault drawn (copies, children).
MARGIN: Final[int] = 2
#: Deliveries of one message a drawn spec has steps for.
MAX_STEPS: Final[int] = 2


@dataclass(frozen=True)
class Kind:
    """One kind of choice a run may make: a fault step, a redelivery, or a feature."""

    name: str
    step: Step | None = None  # a template: its boundary is drawn

    @classmethod
    def parse(cls, text: str) -> Kind:
        if text in ("redeliver", "interleave", "pause"):
            return cls(text)
        head = text.partition("(")[0]
        spec = parse_spec(f"{text}@0" if head in BOUNDARY_KINDS and "@" not in text else text)
        if spec.publish is not None and spec.publish.at is not None:
            raise ValueError(
                f"kinds: {text!r}: a publish fault is drawn for each message's own publish; "
                f"name it without @P, as in {spec.publish.kind!r}"
            )
        if spec.task is not None or spec.redeliver or len(spec.steps) != 1:
            raise ValueError(
                f"kinds: {text!r} is not a fault kind; expected one of "
                f"{', '.join(DEFAULT_KINDS + OPTIONAL_KINDS)}"
            )
        return cls(text, spec.steps[0])


def parse_kinds(kinds: Sequence[str] | None) -> tuple[Kind, ...]:
    if isinstance(kinds, str):
        raise TypeError(f"kinds={kinds!r}: expected a list of fault kinds, such as [{kinds!r}]")
    chosen = DEFAULT_KINDS if kinds is None else tuple(kinds)
    if not chosen:
        raise ValueError("kinds=[]: expected at least one fault kind")
    parsed: list[Kind] = []
    for text in chosen:
        if not isinstance(text, str):
            raise TypeError(f"kinds: {text!r} is not a fault kind name")
        try:
            parsed.append(Kind.parse(text))
        except Exception as exc:
            raise ValueError(f"kinds: {text!r}: {exc}") from None
    return tuple(parsed)


class DrawSource:
    """A run's choices drawn from Hypothesis's ``data`` as the run reaches them."""

    def __init__(self, data: Any, kinds: tuple[Kind, ...], reach: dict[str, int]) -> None:
        from hypothesis import strategies as st

        self._st = st
        self.data = data
        #: Hypothesis stopped the run at a draw: draws inside a task body must not raise
        #: there (the body would catch it), so the run goes on with 0s and it is raised after.
        self.aborted: BaseException | None = None
        self.reach = reach
        # Swarm: which kinds this run may use (shrinks towards none).
        # The interleaving is drawn last: the shrinker, which tries the earliest draws
        # first, then keeps a switch of executions rather than a fault.
        ordered = sorted(kinds, key=lambda kind: kind.name == "interleave")
        mix = data.draw(st.tuples(*(st.booleans() for _ in ordered)))
        on = [kind for kind, drawn in zip(ordered, mix, strict=True) if drawn]
        self.faults = [kind for kind in on if kind.name not in ("interleave", "pause")]
        self.interleaving = any(kind.name == "interleave" for kind in on)
        self.pausing = any(kind.name == "pause" for kind in on)
        self._faults: list[FaultSpec | None] = []
        self._pauses: list[tuple[int, int]] = []
        #: Inside one composite draw (``prepare``): its ``draw``, much cheaper than
        #: ``data.draw`` per choice; the choices and their shrinking are the same.
        self._inner: Any = None

    def _int(self, top: int) -> int:
        """A draw in ``0..top``; 0 once Hypothesis has stopped this run (see :attr:`aborted`)."""
        if self.aborted is not None:
            return 0
        try:
            draw = self._inner if self._inner is not None else self.data.draw
            return int(draw(self._st.integers(0, top)))
        except BaseException as stop:  # its own stop (a shrink's shorter run): raised later
            self.aborted = stop
            return 0

    def messages(self, count: int) -> tuple[int, ...] | None:
        # Each signature is published unless drawn out (3 in 4 kept; shrinks towards out).
        # None kept stands for all of them: a run that publishes nothing tests nothing.
        kept = self.data.draw(self._st.tuples(*(self._st.integers(0, 3) for _ in range(count))))
        return tuple(n for n, keep in enumerate(kept, start=1) if keep) or None

    def prepare(self, order: Sequence[str]) -> None:
        """Draw each message's fault and stall up front, on the test's thread.

        ``order``: the task names the fault-free run published, in order (a
        message published from a task body is published on the execution's
        thread, where Hypothesis cannot draw). A few more than it published
        are drawn for the copies and children a fault adds.
        """
        names = [*order, *([""] * MARGIN)]
        most = max(self.reach.values(), default=2)

        def plan(draw: Any) -> None:
            self._inner = draw
            try:
                self._faults = [self._fault(self.reach.get(name, most)) for name in names]
                self._pauses = [self._pause(self.reach.get(name, most)) for name in names]
            finally:
                self._inner = None

        try:
            self.data.draw(self._st.composite(plan)())
        except BaseException as stop:  # as in _int: raised once the run is over
            self.aborted = self.aborted or stop

    def _fault(self, reach: int) -> FaultSpec | None:
        if not self.faults:
            return None
        steps: list[Step] = []
        for _ in range(MAX_STEPS):
            which = self._int(len(self.faults))
            if not which:
                break
            kind = self.faults[which - 1]
            if kind.step is None:  # redeliver: every delivery of it, once more
                return FaultSpec(redeliver=1) if not steps else FaultSpec(tuple(steps))
            template = kind.step
            if template.kind in PUBLISH_KINDS:  # its publish, alone: no delivery steps
                return FaultSpec((template,)) if not steps else FaultSpec(tuple(steps))
            if template.at is not None:
                at = self._int(reach)
                template = replace(template, at=at)  # a rollout keeps its grace and delay
            steps.append(template)
            if template.kind in ("overlap", "ack_lost") or not self._int(1):
                break
        return FaultSpec(tuple(steps)) if steps else None

    def _pause(self, reach: int) -> tuple[int, int]:
        if not self.pausing or not reach or not self._int(1):
            return (0, 0)
        return (1 + self._int(reach - 1), PAUSES[self._int(len(PAUSES) - 1)])

    def fault(self, ref: MessageRef, overall: int) -> FaultSpec | None:
        return self._faults[overall - 1] if overall <= len(self._faults) else None

    def pause(self, ref: MessageRef, overall: int, delivery: int, at: int) -> int:
        if delivery != 1 or overall > len(self._pauses):
            return 0
        where, seconds = self._pauses[overall - 1]
        return seconds if where == at else 0

    def choose(self, options: int) -> int:
        return self._int(options - 1) if self.interleaving else 0

    @property
    def interleave(self) -> str | None:
        return None  # drawn at each choice


class _Found(Exception):
    """A run broke something: Hypothesis shrinks the choices that led to it."""


@dataclass
class SearchResult:
    runs: int  # runs of the generate phase (the budget's)
    found_at: int | None  # which run first failed
    shrink_runs: int
    smallest: RunResult | None


def search(
    run: Callable[[DrawSource], RunResult],
    *,
    kinds: tuple[Kind, ...],
    reach: dict[str, int],
    budget: int,
    seed: int,
) -> SearchResult:
    """Up to ``budget`` runs drawn from ``seed``; the smallest failing one, shrunk."""
    try:
        from hypothesis import HealthCheck, Phase, Verbosity, given, settings
        from hypothesis import seed as seeded
        from hypothesis import strategies as st
    except ImportError:
        raise ImportError(
            "explore() searches with Hypothesis: pip install 'pytest-celery-faults[explore]' "
            "(replaying a schedule needs no Hypothesis)"
        ) from None
    failures: list[RunResult] = []
    counter = {"runs": 0, "found_at": 0, "after": 0}

    def probe(data: Any) -> None:
        result = run(DrawSource(data, kinds, reach))  # raises when Hypothesis stops it
        counter["after" if failures else "runs"] += 1
        if result.failed:
            if not failures:
                counter["found_at"] = counter["runs"]
            failures.append(result)
            raise _Found()

    explored: Callable[[], None] = seeded(seed)(
        settings(
            max_examples=budget,
            database=None,  # the failure database keeps replay strings instead (.database)
            deadline=None,
            derandomize=False,
            phases=(Phase.generate, Phase.shrink),
            suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet,
            report_multiple_bugs=False,
            print_blob=False,
        )(given(st.data())(probe))
    )
    with contextlib.suppress(_Found):  # the smallest failing run is the last one kept
        explored()
    return SearchResult(
        runs=counter["runs"],
        found_at=counter["found_at"] or None,
        shrink_runs=counter["after"],
        smallest=failures[-1] if failures else None,
    )
