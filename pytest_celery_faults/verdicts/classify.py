"""The failure class of a faulted scenario, judged against its fault-free run.

A verdict reads the evidence a scenario's history kept
(:class:`~pytest_celery_faults.engine.history.Evidence`): the effects of
each delivery, the task's fate as the worker saw it and the ``observe()``
difference:

- ``duplicated``: the task ran again and repeated side effects, changing the world;
- ``diverged``: it ran again (or ended otherwise) and the world differs for another reason;
- ``lost``: it never completed and nothing ran it again;
- ``partial``: lost after some of its side effects, leaving the world half done;
- ``ended_otherwise``: its process went away and nothing ran it again, but only
  after its work was done: its result was stored (SUCCESS), or every side effect
  of the fault-free run had completed and ``observe()`` matches it. The task
  ended otherwise and the world is whole, so no assertion fails on it;
- ``ok``: the world and the task's fate are those of the fault-free run.

Loss is judged on the world and on what was stored, not on how the process ended.
"""

from __future__ import annotations

from typing import Final

from ..engine.history import Evidence, History, Judged
from ..engine.outcome import Outcome, safe_repr
from ..vocabulary import (
    CHILD_KILLED,
    COLD_SHUTDOWN,
    DIVERGED,
    DUPLICATED,
    ENDED_OTHERWISE,
    EXITED,
    FINISHED,
    LOST,
    OK,
    PARTIAL,
    POWER_LOST,
    PUBLISH_LOST,
    PUBLISH_REFUSED,
    Ending,
    Verdict,
)

#: The classes ``assert_idempotent`` fails on, and those ``assert_no_loss`` fails on.
NOT_IDEMPOTENT: Final[tuple[Verdict, ...]] = (DUPLICATED, DIVERGED)
LOSSES: Final[tuple[Verdict, ...]] = (LOST, PARTIAL)
#: The classes named in failures and summaries that no assertion fails on.
NAMED_ONLY: Final[tuple[Verdict, ...]] = (ENDED_OTHERWISE,)
#: Every class, worst first (the order reports list them in).
CLASSES: Final[tuple[Verdict, ...]] = (DUPLICATED, DIVERGED, PARTIAL, LOST, ENDED_OTHERWISE, OK)

#: How the last execution of a lost task ended, in plain words.
_SAW: Final[dict[Ending, str]] = {
    CHILD_KILLED: "its child process was killed",
    EXITED: "its child process exited",
    POWER_LOST: "the worker lost power",
    COLD_SHUTDOWN: "the worker was shut down cold",
    PUBLISH_LOST: "its publish was lost: the broker never queued it",
    PUBLISH_REFUSED: "the broker refused its publish",
}


def judge(history: History, spec: str, baseline: Evidence, faulted: Evidence) -> Judged:
    """Class ``faulted`` against the fault-free ``baseline``; remembered in ``history.judged``."""
    verdict, problem = classify(baseline, faulted)
    judged = Judged(faulted.outcome.name, spec, verdict, problem)
    history.judged.append(judged)
    return judged


def classify(baseline: Evidence, faulted: Evidence) -> tuple[Verdict, str]:
    """The failure class of a faulted run, and what happened in plain words."""
    outcome = faulted.outcome
    world_differs = faulted.observed != baseline.observed
    lost = outcome if outcome.lost else next(iter(faulted.lost_members), None)
    if lost is not None:
        saw = _SAW.get(lost.ended, f"the worker saw: {lost.ended}")
        who, then = "the task", ""
        if lost is not outcome:  # a member of the canvas (or a child it published)
            who = f"{lost.name}[{lost.task_id[:8]}]"
            then = _then(baseline.outcome.name, outcome)
        if not world_differs:
            done = _work_done(baseline, faulted)
            if done:
                whose = "" if lost is outcome else f" ({who})"
                return ENDED_OTHERWISE, (
                    f"ended otherwise: {saw}{whose} {done} and nothing ran it again, but "
                    f"nothing was lost: observe() matches the fault-free run"
                )
        if faulted.effect_count and world_differs:
            done = ", ".join(f"{label} x{n}" for label, n in sorted(faulted.effects.items()))
            if lost is not outcome:
                return PARTIAL, (
                    f"partial: {who} never completed and nothing ran it again ({saw}){then}; "
                    f"the {faulted.effect_count} side effect(s) done ({done}) leave the "
                    f"world half done"
                )
            return PARTIAL, (
                f"partial: the task was lost after {faulted.effect_count} side effect(s) "
                f"({done}) and nothing ran it again ({saw}), leaving the world half done"
            )
        return LOST, (
            f"lost: {who} never completed and nothing ran it again ({saw}; "
            f"the broker holds no copy){then}"
        )
    runs = f"the task ran {outcome.executions} time(s) over {outcome.deliveries} deliveries"
    if world_differs:
        repeated = {
            label: n for label, n in faulted.effects.items() if n > baseline.effects[label]
        }
        if outcome.executions > 1 and repeated:
            extra = ", ".join(
                f"{label} x{n} where the fault-free run had {baseline.effects[label]}"
                f"{_by(label, baseline, faulted)}"
                for label, n in sorted(repeated.items())
            )
            return DUPLICATED, (
                f"duplicated: {runs} and repeated side effects ({extra}), changing what "
                f"observe() sees"
            )
        why = (
            "no tracked side effect was repeated"
            if faulted.effects or baseline.effects
            else "no side effect is tracked, so repeats cannot be told apart"
        )
        return DIVERGED, f"diverged: {runs} and observe() differs from the fault-free run ({why})"
    if outcome.ended != baseline.outcome.ended and baseline.outcome.ended in FINISHED:
        shown = f" ({safe_repr(outcome.exception)})" if outcome.exception is not None else ""
        return DIVERGED, (
            f"diverged: {runs} and the worker saw it end {outcome.ended or 'never run'!r}"
            f"{shown} where the fault-free run {baseline.outcome.ended}"
        )
    return OK, f"ok: {runs}; the world and the task's fate match the fault-free run"


def _by(label: str, baseline: Evidence, faulted: Evidence) -> str:
    """Which task repeated a side effect, when another did it (a child it published)."""
    doers = sorted(
        task or "the test"
        for (done, task), n in faulted.effects_by_task.items()
        if done == label and n > baseline.effects_by_task[(done, task)]
    )
    if doers == [faulted.outcome.name]:
        return ""
    return f", by {', '.join(doers)}" if doers else ""


def _then(name: str, outcome: Outcome) -> str:
    """What became of the task a run stands for after another of its messages was lost."""
    if outcome.ended:
        return f", and {name} {outcome.ended}"
    failed = f", {type(outcome.exception).__name__}" if outcome.exception is not None else ""
    return f", so {name} never ran (state {outcome.state}{failed})"


def _work_done(baseline: Evidence, faulted: Evidence) -> str:
    """When a lost task had done its work already, in words (empty when it had not).

    Done means its result was stored (a child lost in ``on_success``, a
    ``task_postrun`` receiver or ``process_cleanup``: Celery keeps the SUCCESS),
    or every side effect of the fault-free run had completed.
    """
    if faulted.outcome.state == "SUCCESS":
        return "after its result was stored (SUCCESS)"
    if baseline.effect_count and all(
        faulted.effects[label] >= n for label, n in baseline.effects.items()
    ):
        state = faulted.outcome.state
        return f"after its last side effect ({faulted.effect_count} done, state {state})"
    return ""
