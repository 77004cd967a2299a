"""Deployments as faults: a rollout's SIGTERM, grace and SIGKILL, and a broker restart."""

from __future__ import annotations

import functools
import time
from typing import Any

import pytest
from celery import Celery
from celery.apps import worker as worker_app
from celery.worker.worker import WorkController

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults.errors import FaultSpecError
from pytest_celery_faults.grammar import Step, parse_spec
from pytest_celery_faults.real.plan import refusal

calls: list[Any] = []


def side_effect(value: Any) -> None:
    calls.append(value)


@pytest.fixture(autouse=True)
def _clear_calls() -> None:
    calls.clear()


def slow_task(app: Celery, seconds: float = 60, **options: Any) -> Any:
    """A task that takes ``seconds`` of virtual time between its two side effects."""

    @app.task(name="tests.slow", shared=False, **options)
    def slow(x: int) -> int:
        side_effect(("start", x))
        time.sleep(seconds)  # virtual: the harness's clock
        side_effect(("end", x))
        return x

    return slow


# -- the grammar -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "step", "shown"),
    [
        ("rollout(30)@1", Step("rollout", at=1, grace=30, delay=0), "rollout(30)@1"),
        ("rollout@0", Step("rollout", at=0, grace=30, delay=0), "rollout(30)@0"),
        ("rollout(30, 5)@2", Step("rollout", at=2, grace=30, delay=5), "rollout(30,5)@2"),
        ("broker_restart@1", Step("broker_restart", at=1), "broker_restart@1"),
    ],
)
def test_deployment_specs_parse_and_print_back(text: str, step: Step, shown: str) -> None:
    spec = parse_spec(text)
    assert spec.steps == (step,)
    assert str(spec) == shown
    assert parse_spec(shown) == spec


@pytest.mark.parametrize("text", ["rollout(30)", "rollout(1,2,3)@1", "rollout(x)@1"])
def test_bad_deployment_specs_are_refused(text: str) -> None:
    with pytest.raises(FaultSpecError, match="valid forms"):
        parse_spec(text)


# -- rollouts --------------------------------------------------------------------


def test_a_rollout_kills_a_task_longer_than_the_grace_and_the_new_worker_runs_it_again(
    app: Celery,
) -> None:
    task = slow_task(app, acks_late=True, reject_on_worker_lost=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "rollout(30)@1")
        delivered_to = [e.detail for e in faults.ledger.for_task(outcome.task_id)]
    assert (outcome.state, outcome.deliveries, outcome.executions) == ("SUCCESS", 2, 2)
    assert calls == [("start", 1), ("start", 1), ("end", 1)]
    timeline = str(outcome.timeline)
    assert "rollout: SIGTERM to celery@faults-1: warm shutdown" in timeline
    assert "replacement worker started: celery@faults-2" in timeline
    assert "+  30.000s    grace over: SIGKILL to celery@faults-1 after 30s" in timeline
    assert "delivered to celery@faults-2#1 (redelivered=True)" in timeline
    assert delivered_to  # the ledger saw it


def test_a_rollout_under_early_ack_loses_the_task(app: Celery) -> None:
    task = slow_task(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "rollout(30)@1")
        assert faults.clock.elapsed == 30  # nothing was left to wait for after the kill
    assert (outcome.lost, outcome.deliveries, outcome.acked) == (True, 1, True)
    assert calls == [("start", 1)]


def test_a_task_that_ends_within_the_grace_is_acked_once_and_not_rerun(app: Celery) -> None:
    task = slow_task(app, seconds=10, acks_late=True, reject_on_worker_lost=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "rollout(30)@1")
        kinds = faults.ledger.kinds(outcome.task_id)
        assert faults.clock.elapsed == 10  # the grace's SIGKILL never came
    assert (outcome.state, outcome.deliveries, kinds.count("acked")) == ("SUCCESS", 1, 1)
    assert calls == [("start", 1), ("end", 1)]
    assert "celery@faults-1 exited within the grace" in str(outcome.timeline)
    assert "SIGKILL" not in str(outcome.timeline).replace("SIGKILL in 30s", "")


@pytest.mark.parametrize("profile", ["rabbitmq", "redis"])
def test_a_prefetched_message_comes_back_to_the_new_worker(app: Celery, profile: str) -> None:
    app.conf.worker_prefetch_multiplier = 4
    # long enough for the two to run one after the other within it once back
    app.conf.broker_transport_options = {"visibility_timeout": 130}
    task = slow_task(app, acks_late=True, reject_on_worker_lost=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.side_effect")
        faults.inject("tests.slow:rollout(30)@1")
        first, second = task.delay(1), task.delay(2)
        faults.drain()
        one, two = faults.outcome(first.id), faults.outcome(second.id)
        consumers = [e.consumer for e in faults.ledger.for_task(second.id) if e.consumer]
    assert (one.state, one.deliveries) == ("SUCCESS", 2)
    # the second message was prefetched by the old worker, held unacked until the kill
    assert (two.state, two.deliveries) == ("SUCCESS", 2)
    assert consumers[0].startswith("celery@faults-1")
    assert consumers[-1].startswith("celery@faults-2")
    if profile == "redis":  # a crash, not a clean close: back after the visibility timeout
        assert "visibility_timeout=130s passed" in str(two.timeline)
    else:
        assert "back in the queue: connection lost" in str(two.timeline)


def test_a_replacement_delay_keeps_the_queue_waiting(app: Celery) -> None:
    task = slow_task(app, seconds=5)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        faults.inject("tests.slow:rollout(30,50)@1")
        first, second = task.delay(1), task.delay(2)
        faults.drain()
        waited = faults.outcome(second.id)
    # the old worker finished its task and left at 5 s; nothing consumed until 50 s
    assert "+  50.000s    replacement worker started" in str(faults.outcome(first.id).timeline)
    assert "+  50.000s  delivered to celery@faults-2#1" in str(waited.timeline)
    assert waited.state == "SUCCESS"


@pytest.mark.skipif(
    not hasattr(WorkController, "wait_for_soft_shutdown"),
    reason="Celery 5.5+: earlier releases have no soft shutdown to wait for",
)
def test_with_remap_sigterm_a_rollout_is_a_cold_shutdown_after_the_soft_one(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What REMAP_SIGTERM=SIGQUIT makes celery.apps.worker install for SIGTERM.
    cold = functools.partial(worker_app._shutdown_handler, sig="SIGTERM", how="Cold")
    monkeypatch.setattr(worker_app, "install_worker_term_handler", cold)
    app.conf.worker_soft_shutdown_timeout = 10
    task = slow_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "rollout(30)@1")
    timeline = str(outcome.timeline)
    assert "cold shutdown (REMAP_SIGTERM=SIGQUIT) after a soft shutdown of 10s" in timeline
    assert "+  10.000s    cold shutdown: celery@faults-1 cancels its running tasks" in timeline
    assert "grace over" not in timeline
    # Celery's own cancel requeues the acks_late message; the new worker runs it again
    assert (outcome.state, outcome.deliveries) == ("SUCCESS", 2)


def test_a_sweep_over_rollouts_replays_each_scenario_from_the_original_worker(
    app: Celery,
) -> None:
    task = slow_task(app, acks_late=True, reject_on_worker_lost=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        report = faults.sweep(task.s(1), observe=lambda: None, hows=("rollout(30)",))
        specs = [scenario.spec for scenario in report.scenarios]
        assert "rollout(30)@1" in specs
        again = faults.run(task.s(2), "rollout(30)@1")
    # the scenarios before left no replacement behind: the same worker names again
    assert "SIGTERM to celery@faults-1" in str(again.timeline)
    assert "replacement worker started: celery@faults-2" in str(again.timeline)
    assert calls.count(("start", 2)) == 2


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("rollout(30)@1", "a rollout needs a second real worker"),
        ("broker_restart@1", "restarting the real broker"),
    ],
)
def test_real_broker_mode_refuses_deployments_up_front(app: Celery, spec: str, why: str) -> None:
    task = slow_task(app, acks_late=True)
    refused = refusal(app, task.s(1), [spec])
    assert refused is not None and refused.startswith(f"{spec}: {why}")


def test_the_gate_plays_a_rollout_over_a_suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        proj="""
import time
from celery import Celery

app = Celery("proj", set_as_current=False)
rows = []


def write(row):
    rows.append(row)


@app.task(name="proj.slow", acks_late=True, reject_on_worker_lost=True, shared=False)
def slow(n):
    write(n)
    time.sleep(60)  # virtual: the harness clock
""",
        test_suite="""
import proj


def test_slow(celery_faults):
    proj.rows.clear()
    celery_faults.track("proj.write")
    proj.slow.delay(1)
    celery_faults.drain()
    assert proj.rows == [1]
""",
    )
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    result = pytester.runpytest("-p", "no:randomly", "--celery-faults=rollout(30)@1")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert [[]1, 1[]] == [[]1[]]*", "*rollout(30)@1*"])


# -- broker restarts -------------------------------------------------------------


def two_effects(app: Celery, **options: Any) -> Any:
    @app.task(name="tests.two", shared=False, **options)
    def two(x: int) -> int:
        side_effect(("first", x))
        side_effect(("second", x))
        return x

    return two


def test_a_broker_restart_on_rabbitmq_requeues_a_running_late_ack_task_at_once(
    app: Celery,
) -> None:
    task = two_effects(app, acks_late=True)
    with CeleryFaults(app, profile="rabbitmq") as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "broker_restart@1")
        kinds = [event.kind for event in faults.ledger.events]
        assert faults.clock.elapsed == 0
    # the running task went on to its end; its late ack went to the dead channel,
    # and the broker had already given the message to the reconnected consumer
    assert calls == [("first", 1), ("second", 1), ("first", 1), ("second", 1)]
    assert (outcome.state, outcome.deliveries) == ("SUCCESS", 2)
    assert "ack_ignored" in kinds
    timeline = str(outcome.timeline)
    assert "broker restart: celery@faults-1's connection to rabbitmq drops" in timeline
    assert "delivered to celery@faults-1#2 (redelivered=True)" in timeline


def test_a_broker_restart_on_redis_leaves_the_message_to_the_visibility_timeout(
    app: Celery,
) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 100}
    task = two_effects(app, acks_late=True)
    with CeleryFaults(app, profile="redis") as faults:
        faults.track(f"{__name__}.side_effect")
        faults.inject("tests.two:broker_restart@1")
        first, prefetched = task.delay(1), task.delay(2)
        faults.drain()
        one, two = faults.outcome(first.id), faults.outcome(prefetched.id)
    # the running task's late ack still reaches Redis (kombu's client reconnects):
    # it ran once; the prefetched message was orphaned with the old connection and
    # came back only after the visibility timeout
    assert (one.state, one.deliveries) == ("SUCCESS", 1)
    assert "waits for visibility_timeout=100s" in str(two.timeline)
    assert "+ 100.000s  delivered to celery@faults-1#2 (redelivered=True)" in str(two.timeline)
    assert calls == [("first", 1), ("second", 1), ("first", 2), ("second", 2)]


def test_a_broker_restart_leaves_an_early_acked_task_alone(app: Celery) -> None:
    task = two_effects(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "broker_restart@1")
    assert (outcome.state, outcome.deliveries, outcome.acked) == ("SUCCESS", 1, True)
    assert calls == [("first", 1), ("second", 1)]


@pytest.mark.parametrize("profile", ["rabbitmq", "redis"])
def test_celery_cancels_late_ack_tasks_on_connection_loss_when_told_to(
    app: Celery, profile: str
) -> None:
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
    task = two_effects(app, acks_late=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "broker_restart@1")
        elapsed = faults.clock.elapsed
    # Celery's Request.cancel: SIGTERM to the child, which unwinds; the message is back
    assert calls == [("first", 1), ("first", 1), ("second", 1)]
    assert (outcome.state, outcome.deliveries) == ("SUCCESS", 2)
    assert "child terminated by Celery (worker_cancel_long_running_tasks_on_connection_loss)" in (
        str(outcome.timeline)
    )
    assert elapsed == (0 if profile == "rabbitmq" else 3600)


def test_a_message_waiting_on_its_eta_goes_back_when_the_old_worker_exits(app: Celery) -> None:
    task = slow_task(app, seconds=10, acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        faults.inject("tests.slow:rollout(30)@1")
        first = task.delay(1)
        later = task.apply_async((2,), countdown=100)
        faults.drain()
        held = faults.outcome(later.id)
    assert faults.outcome(first.id).deliveries == 1
    # held by the old worker for its ETA, back when it exited (10 s), run at its ETA
    timeline = str(held.timeline)
    assert "+  10.000s  delivered to celery@faults-2#1 (redelivered=True)" in timeline
    assert "+ 110.000s    side effect 2" in timeline
    assert (held.state, held.deliveries) == ("SUCCESS", 2)


def test_assert_idempotent_takes_rollout_specs(app: Celery) -> None:
    task = slow_task(app, acks_late=True, reject_on_worker_lost=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        with pytest.raises(AssertionError, match=r"rollout\(30\)@1"):
            faults.assert_idempotent(
                task.s(1), observe=lambda: list(calls), reset=calls.clear, specs=["rollout(30)@1"]
            )


@pytest.mark.skipif(
    not hasattr(WorkController, "wait_for_soft_shutdown"),
    reason="Celery 5.5+: earlier releases have no soft shutdown to wait for",
)
def test_a_soft_shutdown_longer_than_the_grace_ends_in_sigkill(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    cold = functools.partial(worker_app._shutdown_handler, sig="SIGTERM", how="Cold")
    monkeypatch.setattr(worker_app, "install_worker_term_handler", cold)
    app.conf.worker_soft_shutdown_timeout = 60
    task = slow_task(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.side_effect")
        outcome = faults.run(task.s(1), "rollout(30)@1")
    timeline = str(outcome.timeline)
    assert "+  30.000s    grace over: SIGKILL" in timeline
    assert "cold shutdown: " not in timeline
    assert (outcome.lost, calls) == (True, [("start", 1)])
