"""``explore()``: the baseline, the failure database first, then the search (see the package)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .checker import merge
from .database import FailureDatabase
from .defaults import ExploreDefaults
from .report import ExploreReport
from .runner import ReplaySource, Runner, RunResult, Workload
from .schedule import parse_schedule
from .search import DrawSource, Kind, parse_kinds, search

if TYPE_CHECKING:
    from ..harness import CeleryFaults

#: Runs searched when neither the test nor ``--celery-faults-explore`` says.
DEFAULT_BUDGET = 100


def explore(
    harness: CeleryFaults,
    workload: Workload,
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
    """Explore ``workload`` under drawn fault schedules; see :meth:`CeleryFaults.explore`."""
    defaults: ExploreDefaults = getattr(harness, "explore_defaults", None) or ExploreDefaults()
    if budget is None:
        budget = defaults.budget if defaults.budget is not None else DEFAULT_BUDGET
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"explore(budget={budget!r}): expected a whole number >= 1")
    if seed is None:
        seed = harness.seed if harness.seed is not None else 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"explore(seed={seed!r}): expected a whole number")
    if defaults.shard is not None:  # @pytest.mark.explore_shards(n): this case's share
        index, count = defaults.shard
        seed, budget = seed * count + index, -(-budget // count)
    if not callable(workload) and (
        isinstance(workload, str | bytes) or not isinstance(workload, Sequence)
    ):
        raise TypeError(
            f"explore(workload={workload!r}): expected a function that publishes messages, "
            f"or a list of signatures"
        )
    if not callable(observe):
        raise TypeError(f"explore(observe={observe!r}): expected a function")
    parsed_kinds = parse_kinds(kinds)
    schedule = parse_schedule(replay) if replay is not None else None
    directory = database if database is not None else defaults.database
    if key is None and defaults.key is not None:
        # The test's node id; a test's second explore() saves under its own key.
        calls = len(defaults.reports)
        key = defaults.key if not calls else f"{defaults.key}::explore-{calls + 1}"
    failures = FailureDatabase(directory) if directory is not None and key else None

    report = ExploreReport(seed=seed, budget=budget)
    started = time.perf_counter()
    with Runner(harness, workload, observe, reset, invariant) as runner:
        runner.baseline(None)  # the whole workload fault-free: how far each task reaches
        if schedule is not None:
            result = runner.run(ReplaySource(schedule))
            report.runs = 1
            merge(report.counts, result.counts)
            report.failure = result if result.failed else None
            report.found_at = 1 if result.failed else None
        elif not _replay_saved(runner, report, failures, key):
            _search(runner, report, parsed_kinds, failures, key)
    report.seconds = time.perf_counter() - started
    defaults.reports.append(report.to_json())
    return report


def _replay_saved(
    runner: Runner, report: ExploreReport, failures: FailureDatabase | None, key: str | None
) -> bool:
    """Replay the schedules saved for ``key``; whether one fails again (it is the report's)."""
    if failures is None or key is None:
        return False
    for saved in failures.load(key):
        result = runner.run(ReplaySource(parse_schedule(saved)))
        report.replayed.append(saved)
        if result.failed:
            merge(report.counts, result.counts)
            report.failure = result
            return True
        failures.discard(key, saved)  # it passes now: fixed
    return False


def _search(
    runner: Runner,
    report: ExploreReport,
    kinds: tuple[Kind, ...],
    failures: FailureDatabase | None,
    key: str | None,
) -> None:
    searching = [True]  # runs are counted until the first failure (then: shrinking)

    def counted(source: DrawSource) -> RunResult:
        result = runner.run(source)
        if searching[0]:
            merge(report.counts, result.counts)
            searching[0] = not result.failed
        return result

    found = search(
        counted, kinds=kinds, reach=runner.reach, budget=report.budget, seed=report.seed
    )
    report.runs = found.runs
    report.found_at = found.found_at
    report.shrink_runs = found.shrink_runs
    report.failure = found.smallest
    if found.smallest is not None and found.smallest.schedule.pauses:
        switched, runs = interleaving_for_stalls(runner, found.smallest)
        report.shrink_runs += runs
        if switched is not None:
            report.failure = switched
    if report.failure is not None and failures is not None and key is not None:
        failures.save(key, str(report.failure.schedule))


#: Runs spent looking for an interleaving that does what a stall did.
STALL_RUNS = 100


def interleaving_for_stalls(runner: Runner, failing: RunResult) -> tuple[RunResult | None, int]:
    """The same failure without its stalls, by a switch of executions alone, if there is one.

    A stall (``pause``) fails a schedule by letting another execution run
    meanwhile; an interleaving says so with no fault at all, and is the
    smaller schedule. Hypothesis's shrinker rarely gets from one to the other
    (every draw after the stall changes), so the interleavings of the schedule
    without its stalls are tried, fewest switches first, up to
    :data:`STALL_RUNS` runs. Returns the failing run found (or None) and the
    runs spent.
    """
    base = replace(failing.schedule, pauses=(), interleave="")
    prefixes = [""]
    runs = 0
    while prefixes and runs < STALL_RUNS:
        prefixes.sort(key=lambda prefix: (-_switches(prefix), -len(prefix)))
        prefix = prefixes.pop()  # the fewest switches, the shortest
        attempt = runner.run(ReplaySource(replace(base, interleave=prefix)))
        runs += 1
        if attempt.failed:
            return attempt, runs
        made = "".join(chosen for chosen, _ in attempt.choices)
        for position in range(len(prefix), len(attempt.choices)):
            chosen, options = attempt.choices[position]
            prefixes.extend(made[:position] + label for label in options if label != chosen)
    return None, runs


def _switches(labels: str) -> int:
    return sum(1 for a, b in zip(labels, labels[1:], strict=False) if a != b)
