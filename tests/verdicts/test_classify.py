"""The failure classes on their own: a faulted run's evidence against the fault-free one."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pytest_celery_faults.engine.history import Evidence
from pytest_celery_faults.engine.outcome import Outcome, Timeline
from pytest_celery_faults.verdicts.classify import classify
from pytest_celery_faults.vocabulary import Ending


def outcome(
    ended: Ending = "returned",
    *,
    executions: int = 1,
    deliveries: int = 1,
    lost: bool = False,
    state: str = "SUCCESS",
    name: str = "shop.charge",
    task_id: str = "0123456789abcdef",
) -> Outcome:
    return Outcome(
        task_id=task_id,
        name=name,
        deliveries=deliveries,
        executions=executions,
        acked=not lost,
        rejected=None,
        lost=lost,
        state=state,
        result=None,
        exception=None,
        retries=0,
        timeline=Timeline(),
        ended=ended,
    )


def evidence(ran: Outcome, observed: Any, **effects: int) -> Evidence:
    return Evidence(ran, observed, Counter(effects))


BASELINE = evidence(outcome(), {"charged": 1}, charge=1)


def test_a_run_that_matches_the_fault_free_one_is_ok() -> None:
    faulted = evidence(outcome(executions=2, deliveries=2), {"charged": 1}, charge=1)
    assert classify(BASELINE, faulted)[0] == "ok"


def test_repeated_side_effects_that_change_the_world_are_duplicated() -> None:
    faulted = evidence(outcome(executions=2, deliveries=2), {"charged": 2}, charge=2)
    verdict, problem = classify(BASELINE, faulted)
    assert verdict == "duplicated"
    assert "charge x2 where the fault-free run had 1" in problem


def test_a_side_effect_a_child_task_repeated_names_the_child() -> None:
    # the parent ran twice (redelivered), and the child it published was too: the
    # repeated e-mail is the child's
    parent = "mail.send_licence_details"
    by_task = Counter({("smtp_send", "mail.send_email"): 1, ("db_write", parent): 1})
    baseline = Evidence(outcome(name=parent), {"sent": 1}, Counter(smtp_send=1, db_write=1))
    baseline.effects_by_task.update(by_task)
    faulted = Evidence(
        outcome(executions=2, deliveries=2, name=parent),
        {"sent": 2},
        Counter(smtp_send=2, db_write=1),
    )
    faulted.effects_by_task.update({("smtp_send", "mail.send_email"): 2, ("db_write", parent): 1})
    verdict, problem = classify(baseline, faulted)
    assert verdict == "duplicated"
    assert "smtp_send x2 where the fault-free run had 1, by mail.send_email)" in problem
    # the task itself repeating it needs no name
    faulted.effects_by_task.clear()
    faulted.effects_by_task.update({("smtp_send", parent): 2, ("db_write", parent): 1})
    baseline.effects_by_task.clear()
    baseline.effects_by_task.update({("smtp_send", parent): 1, ("db_write", parent): 1})
    assert "smtp_send x2 where the fault-free run had 1)" in classify(baseline, faulted)[1]


def test_a_different_world_without_a_repeat_is_diverged() -> None:
    faulted = evidence(outcome(executions=2, deliveries=2), {"charged": 0}, charge=1)
    verdict, problem = classify(BASELINE, faulted)
    assert verdict == "diverged" and "no tracked side effect was repeated" in problem


def test_the_same_world_with_another_ending_is_diverged() -> None:
    faulted = evidence(outcome("raised", state="FAILURE"), {"charged": 1}, charge=1)
    assert classify(BASELINE, faulted)[0] == "diverged"


def test_a_task_cut_off_before_its_work_is_lost() -> None:
    cut = outcome("child killed", lost=True, state="PENDING")
    verdict, problem = classify(BASELINE, evidence(cut, {"charged": 0}))
    assert verdict == "lost" and "its child process was killed" in problem


def test_a_task_cut_off_halfway_is_partial() -> None:
    baseline = evidence(outcome(), {"charged": 1, "mailed": 1}, charge=1, mail=1)
    cut = outcome("power lost", lost=True, state="PENDING")
    verdict, problem = classify(baseline, evidence(cut, {"charged": 1, "mailed": 0}, charge=1))
    assert verdict == "partial" and "the worker lost power" in problem


def test_a_task_cut_off_after_its_work_ended_otherwise() -> None:
    cut = outcome("exit", lost=True, state="PENDING")
    verdict, problem = classify(BASELINE, evidence(cut, {"charged": 1}, charge=1))
    assert verdict == "ended_otherwise" and "after its last side effect" in problem


def test_a_lost_member_of_the_canvas_is_named() -> None:
    member = outcome("child killed", lost=True, state="PENDING", name="shop.mail")
    faulted = Evidence(outcome(), {"charged": 1, "mailed": 0}, Counter(charge=1), (member,))
    baseline = evidence(outcome(), {"charged": 1, "mailed": 1}, charge=1, mail=1)
    verdict, problem = classify(baseline, faulted)
    assert verdict == "partial" and "shop.mail[01234567]" in problem
