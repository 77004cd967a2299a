"""What an exploration found: counts per task, and the smallest failing schedule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .checker import TaskCounts
from .runner import RunResult


@dataclass
class ExploreReport:
    """The result of :func:`~pytest_celery_faults.explore.explore`; ``str()`` is its summary.

    The text depends on the seed and the code under test only (no task ids,
    no wall-clock time), so the same seed gives the same report byte for byte.
    """

    seed: int
    budget: int
    runs: int = 0  # runs searched (the budget's), besides the fault-free ones
    found_at: int | None = None  # the run that first failed
    shrink_runs: int = 0
    replayed: list[str] = field(default_factory=list)  # from the failure database
    failure: RunResult | None = None
    counts: dict[str, TaskCounts] = field(default_factory=dict)
    #: Wall-clock seconds the exploration took (not in the text: it varies).
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def replay(self) -> str | None:
        """The smallest failing schedule as a replay string, if one failed."""
        return str(self.failure.schedule) if self.failure is not None else None

    def summary(self) -> str:
        lines = [f"explore (seed {self.seed}, budget {self.budget}): {self.runs} runs"]
        if self.replayed:
            lines.append(f"  replayed first from the failure database: {len(self.replayed)}")
        if self.failure is not None:
            where = (
                f"found at run {self.found_at}, shrunk in {self.shrink_runs} runs"
                if self.found_at is not None
                else "a saved schedule from the failure database fails again"
            )
            lines.append(f"  FAILED ({where}): {self.failure.problem}")
            lines.append(f"  replay: {self.replay}")
        else:
            lines.append("  no failing schedule")
        lines.append("  per task:")
        for name in sorted(self.counts):
            lines.append(f"    {name}: {self.counts[name].line()}")
        return "\n".join(lines)

    def __str__(self) -> str:
        text = self.summary()
        if self.failure is not None:
            text += "\ntimeline of the smallest failing schedule:\n" + self.failure.timeline
        return text

    def to_json(self) -> dict[str, Any]:
        """What the HTML page shows of it (no wall-clock time: the same seed, the same bytes)."""
        failure = self.failure
        return {
            "seed": self.seed,
            "budget": self.budget,
            "runs": self.runs,
            "found_at": self.found_at,
            "shrink_runs": self.shrink_runs,
            "replayed": list(self.replayed),
            "replay": self.replay,
            "problem": failure.problem if failure is not None else None,
            "timeline": failure.timeline if failure is not None else None,
            "counts": {
                name: {"published": counts.published, **counts.fates}
                for name, counts in sorted(self.counts.items())
            },
        }

    def assert_ok(self) -> None:
        """Fail with the smallest failing schedule, its replay string and its timeline."""
        __tracebackhide__ = True
        if self.failure is not None:
            raise AssertionError(str(self))
