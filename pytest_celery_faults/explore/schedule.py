"""A fault schedule over a whole workload, and its replay string.

One run of :func:`~pytest_celery_faults.explore.explore` is described by a
:class:`Schedule`: which messages the workload publishes (when it is a list of
signatures), the fault spec each message gets, the interleaving of the
executions that run at once, and where an execution stalls on the virtual
clock. Its text is the replay string a failure prints::

    schedule := item (" | " item)*
    item     := TASK "#" K ":" SPEC          the K-th message of TASK gets SPEC
              | SPEC                          (a plain spec: the first message it matches)
              | "messages(" I ("," I)* ")"    only these of the workload's signatures
              | "interleave(" LABELS ")"      the scheduler's choices, as overlap(...) names them
              | "pause(" TASK "#" K "." D "@" N "+" SECONDS ")"
                                              delivery D stalls SECONDS after N side effects

A schedule of one message (``tasks.add:sigkill@1``) is a spec ``run()`` takes too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from ..errors import FaultSpecError
from ..grammar import SCHEDULE_LABELS, FaultSpec, parse_spec, shown

SEPARATOR: Final[str] = " | "

_REF = re.compile(r"^(?P<task>[A-Za-z_][\w.\-:]*?)#(?P<k>[0-9]{1,6}):(?P<spec>.+)$", re.ASCII)
_MESSAGES = re.compile(r"^messages\((?P<items>[0-9, ]*)\)$")
_INTERLEAVE = re.compile(r"^interleave\((?P<labels>[^()]*)\)$")
_PAUSE = re.compile(
    r"^pause\((?P<task>[A-Za-z_][\w.\-:]*?)#(?P<k>[0-9]{1,6})\.(?P<d>[0-9]{1,6})"
    r"@(?P<at>[0-9]{1,6})\+(?P<seconds>[0-9]{1,9})\)$",
    re.ASCII,
)

VALID_ITEMS: Final[str] = (
    "TASK#K:SPEC, a plain fault spec, messages(1,3), interleave(LABELS), "
    "pause(TASK#K.D@N+SECONDS); joined by ' | '"
)


@dataclass(frozen=True, order=True)
class MessageRef:
    """The ``k``-th message (task id) of task ``task`` the run published (1-based)."""

    task: str
    k: int

    def __str__(self) -> str:
        return f"{self.task}#{self.k}"


@dataclass(frozen=True, order=True)
class Pause:
    """Delivery ``delivery`` of ``ref`` stalls ``seconds`` virtual seconds after ``at`` effects."""

    ref: MessageRef
    delivery: int
    at: int
    seconds: int

    def __str__(self) -> str:
        return f"pause({self.ref}.{self.delivery}@{self.at}+{self.seconds})"


@dataclass(frozen=True)
class Schedule:
    """Everything one run of a workload under faults is made of; ``str()`` is its replay."""

    faults: tuple[tuple[MessageRef, FaultSpec], ...] = ()
    #: Spec for the first message published, whatever its task (a plain spec with no TASK:).
    first: FaultSpec | None = None
    interleave: str = ""
    pauses: tuple[Pause, ...] = ()
    #: The workload's signatures published (1-based), when the workload is a list; None: all.
    messages: tuple[int, ...] | None = None
    _by_ref: dict[MessageRef, FaultSpec] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._by_ref.update(self.faults)

    def fault_for(self, ref: MessageRef, overall: int) -> FaultSpec | None:
        """The spec for the message ``ref`` (the ``overall``-th message published)."""
        if overall == 1 and self.first is not None:
            return self.first
        return self._by_ref.get(ref)

    @property
    def fault_free(self) -> bool:
        return not (self.faults or self.first or self.interleave or self.pauses)

    def __str__(self) -> str:
        items: list[str] = []
        if self.messages is not None:
            items.append(f"messages({','.join(str(i) for i in self.messages)})")
        if self.first is not None:
            items.append(str(self.first))
        only_first = len(self.faults) == 1 and self.faults[0][0].k == 1
        for ref, spec in self.faults:
            body = str(FaultSpec(steps=spec.steps, redeliver=spec.redeliver))
            items.append(f"{ref.task}:{body}" if only_first else f"{ref}:{body}")
        if self.interleave:
            items.append(f"interleave({self.interleave})")
        items += [str(pause) for pause in self.pauses]
        return SEPARATOR.join(items) if items else "ok"


def parse_schedule(text: str | Schedule) -> Schedule:
    """Read a replay string; :class:`FaultSpecError` names the bad item and the valid forms."""
    if isinstance(text, Schedule):
        return text
    if not isinstance(text, str):
        raise FaultSpecError(
            f"a schedule is a replay string, not {type(text).__name__}; valid items: {VALID_ITEMS}"
        )
    faults: dict[MessageRef, FaultSpec] = {}
    first: FaultSpec | None = None
    interleave = ""
    pauses: list[Pause] = []
    messages: tuple[int, ...] | None = None
    items = [item.strip() for item in text.split("|")]
    if items == ["ok"]:
        return Schedule()
    for item in items:
        if not item:
            raise FaultSpecError(
                f"invalid schedule {shown(text)}: an empty item; valid items: {VALID_ITEMS}"
            )
        if match := _MESSAGES.match(item):
            numbers = [part.strip() for part in match.group("items").split(",")]
            if not all(number.isdigit() and int(number) >= 1 for number in numbers):
                raise FaultSpecError(
                    f"invalid schedule {shown(text)}: {shown(item)} lists signatures by their "
                    f"number, 1 and up, as in messages(1,3)"
                )
            messages = tuple(sorted({int(number) for number in numbers}))
        elif match := _INTERLEAVE.match(item):
            interleave = match.group("labels").strip()
            if interleave.strip(SCHEDULE_LABELS):
                raise FaultSpecError(
                    f"invalid schedule {shown(text)}: {shown(item)} names executions by one "
                    f"character each (1-9, a-z, A-Z), as in interleave(1212)"
                )
        elif match := _PAUSE.match(item):
            ref = MessageRef(match.group("task"), int(match.group("k")))
            pauses.append(
                Pause(
                    ref, int(match.group("d")), int(match.group("at")), int(match.group("seconds"))
                )
            )
        elif match := _REF.match(item):
            ref = MessageRef(match.group("task"), int(match.group("k")))
            spec = parse_spec(match.group("spec"))
            if spec.task is not None or ref.k < 1:
                raise FaultSpecError(
                    f"invalid schedule {shown(text)}: {shown(item)} names the message twice; "
                    f"valid items: {VALID_ITEMS}"
                )
            faults[ref] = spec
        else:
            spec = parse_spec(item)
            if spec.task is None:
                first = spec
            else:
                faults[MessageRef(spec.task, 1)] = FaultSpec(spec.steps, redeliver=spec.redeliver)
    return Schedule(
        faults=tuple(sorted(faults.items())),
        first=first,
        interleave=interleave,
        pauses=tuple(sorted(pauses)),
        messages=messages,
    )
