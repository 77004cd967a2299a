"""Publisher faults: a publish refused, delivered twice, or lost after the caller moved on."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.exceptions import OperationalError

from pytest_celery_faults import CeleryFaults, FaultSpecError, UnfiredFaultError
from pytest_celery_faults.engine.broker import PublishRefused, Transport
from pytest_celery_faults.grammar import parse_spec
from pytest_celery_faults.real.plan import refusal

charges: list[int] = []


def charge(amount: int) -> None:
    charges.append(amount)


@pytest.fixture(autouse=True)
def _clear() -> None:
    charges.clear()


def make_tasks(app: Celery) -> tuple[Any, Any]:
    @app.task(name="pubfaults.charge", shared=False)
    def charge_task(amount: int) -> int:
        charge(amount)
        return amount

    @app.task(name="pubfaults.checkout", shared=False)
    def checkout(amount: int) -> str:
        charge_task.delay(amount)
        charge_task.delay(amount + 1)
        return "checked out"

    return charge_task, checkout


def refused_attempts(faults: CeleryFaults) -> int:
    return faults.ledger.kinds().count("publish_refused")


# -- publish_refused: kombu's retry path, the app's retry policy -----------------


def test_a_refused_publish_raises_operational_error_after_the_retry_policy(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app) as faults:
        faults.inject("publish_refused")
        with pytest.raises(OperationalError, match="refused the publish of pubfaults.charge"):
            charge_task.delay(5)
        # Celery's default policy: max_retries=3, so kombu tries 4 times, then raises.
        assert refused_attempts(faults) == 4
        assert faults.broker.ready_count() == 0
        assert faults.drain() == []
        (outcome,) = faults.outcomes()
    assert (outcome.ended, outcome.lost, outcome.deliveries) == ("publish refused", True, 0)
    assert "FAULT publish_refused: the broker refuses the publish" in str(outcome.timeline)
    assert charges == []


def test_a_publish_refused_fewer_times_than_the_retries_gets_through(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app) as faults:
        faults.inject("publish_refused(3)")
        result = charge_task.delay(5)  # the 4th attempt, kombu's third retry, is queued
        faults.drain()
        outcome = faults.outcome(result.id)
    assert (outcome.state, outcome.lost, outcome.deliveries) == ("SUCCESS", False, 1), (
        f"{outcome.story}\n{outcome.exception!r}"
    )
    assert faults.ledger.kinds(result.id)[:4] == ["publish_refused"] * 3 + ["published"]
    assert "kombu's retry publishes it at last (attempt 4)" in str(outcome.timeline)
    assert charges == [5]


def test_the_apps_retry_policy_decides(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0}
    with CeleryFaults(app) as faults:
        faults.inject("publish_refused(2)")
        with pytest.raises(OperationalError):
            charge_task.delay(1)
        assert refused_attempts(faults) == 2
    with CeleryFaults(app) as faults:
        faults.inject("publish_refused(1)")
        charge_task.delay(2)
        faults.drain()
    assert charges == [2]


def test_without_retry_the_first_refusal_reaches_the_caller(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app) as faults:
        faults.inject("publish_refused(1)")
        with pytest.raises(OperationalError) as raised:
            charge_task.apply_async((1,), retry=False)
        assert refused_attempts(faults) == 1
    assert isinstance(raised.value.__cause__ or raised.value.__context__, PublishRefused)
    # The transport's own connection errors include it: kombu retries it as a real one.
    assert issubclass(PublishRefused, Transport.connection_errors)
    assert issubclass(PublishRefused, ConnectionError)


def test_on_redis_kombu_gives_up_after_one_reconnection(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app, profile="redis") as faults:
        faults.inject("publish_refused(2)")
        with pytest.raises(OperationalError):
            charge_task.delay(1)  # kombu's Redis transport cannot tell errors apart
        assert refused_attempts(faults) == 2
    with CeleryFaults(app, profile="redis") as faults:
        faults.inject("publish_refused(1)")
        charge_task.delay(1)
        assert faults.broker.ready_count() == 1


# -- publish_twice: the confirm lost, the retry publishes again -------------------


def test_publish_twice_queues_two_messages_with_one_task_id(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app) as faults:
        faults.inject("publish_twice")
        result = charge_task.delay(7)  # the caller sees one successful publish
        faults.drain()
        outcome = faults.outcome(result.id)
    kinds = faults.ledger.kinds(result.id)
    assert kinds[:3] == ["published", "confirm_lost", "published"]
    assert (outcome.deliveries, outcome.executions) == (2, 2)
    assert charges == [7, 7]


def test_publish_twice_without_retry_raises_with_the_message_queued(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app) as faults:
        faults.inject("publish_twice")
        with pytest.raises(OperationalError, match="dropped before the broker confirmed"):
            charge_task.apply_async((3,), retry=False)
        faults.drain()
    assert charges == [3]  # the caller was told it failed; the task ran all the same


def test_publish_twice_is_a_duplicate_for_a_task_that_is_not_idempotent(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app) as faults, pytest.raises(AssertionError, match="duplicated") as raised:
        faults.assert_idempotent(
            charge_task.s(4),
            observe=lambda: list(charges),
            reset=charges.clear,
            specs=["publish_twice"],
        )
    assert "'publish_twice'" in str(raised.value)


# -- publish_lost: the caller thinks it succeeded ----------------------------------


def test_publish_lost_returns_and_the_task_is_lost(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app) as faults:
        outcome = faults.run(charge_task.s(9), "publish_lost")
    assert (outcome.ended, outcome.lost, outcome.deliveries, outcome.state) == (
        "publish lost",
        True,
        0,
        "PENDING",
    )
    assert "publish lost" in outcome.summary() and ", lost," in outcome.summary()
    assert "but the broker never queued it (publish_lost: no publisher confirms)" in str(
        outcome.timeline
    )
    assert charges == []


def test_assert_no_loss_fails_naming_a_lost_publish(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app) as faults, pytest.raises(AssertionError) as raised:
        faults.assert_no_loss(
            charge_task.s(2),
            observe=lambda: list(charges),
            reset=charges.clear,
            specs=["publish_lost"],
        )
    message = str(raised.value)
    assert "pubfaults.charge can be lost" in message
    assert "'publish_lost'" in message
    assert "its publish was lost: the broker never queued it" in message


PARTIAL_CHILD = r"partial: pubfaults\.charge\[\w+\] never completed"


def test_a_childs_lost_publish_is_counted_against_its_parent(app: Celery) -> None:
    _, checkout = make_tasks(app)
    with CeleryFaults(app) as faults:
        outcome = faults.run(checkout.s(10), "pubfaults.charge:publish_lost@2")
        lost = [o for o in faults.outcomes() if o.lost]
    assert outcome.result == "checked out"
    assert [(o.name, o.ended) for o in lost] == [("pubfaults.charge", "publish lost")]
    assert charges == [10]  # the first child ran; the second publish (@2) was lost
    with CeleryFaults(app) as faults, pytest.raises(AssertionError, match=PARTIAL_CHILD) as raised:
        faults.assert_no_loss(
            checkout.s(10),
            observe=lambda: sorted(charges),
            reset=charges.clear,
            specs=["pubfaults.charge:publish_lost"],
        )
    assert "its publish was lost: the broker never queued it" in str(raised.value)


def test_a_publish_fault_that_never_fired_fails_at_exit(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with (
        pytest.raises(UnfiredFaultError, match=r"publish_lost@3: it applies to publish 3"),
        CeleryFaults(app) as faults,
    ):
        faults.inject("pubfaults.charge:publish_lost@3")
        charge_task.delay(1)
        charge_task.delay(2)
        faults.drain()


# -- the grammar, real-broker mode ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("publish_lost;sigkill@1", "cannot be chained with ';'"),
        ("publish_lost(2)", "'publish_lost' takes no argument"),
        ("publish_refused(0)", "the number of refused attempts must be at least 1"),
        ("publish_twice@0", "@P counts publishes from 1"),
    ],
)
def test_bad_publish_specs_name_the_problem(text: str, problem: str) -> None:
    with pytest.raises(FaultSpecError, match=problem.replace("(", r"\(")):
        parse_spec(text)


@pytest.mark.parametrize(
    "text", ["publish_lost", "t:publish_refused(3)@2", "publish_twice@4", "publish_refused"]
)
def test_publish_specs_round_trip(text: str) -> None:
    parsed = parse_spec(text)
    assert str(parsed) == text
    assert parsed.publish is not None and parsed.step_for(1) is None


def test_real_broker_mode_refuses_publish_faults_up_front(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    why = refusal(app, charge_task.s(1), ["publish_lost"])
    assert why is not None and why.startswith("publish_lost: a real broker cannot be told")


def test_inside_a_task_a_refused_child_publish_fails_the_parent(app: Celery) -> None:
    _, checkout = make_tasks(app)
    with CeleryFaults(app) as faults:
        outcome = faults.run(checkout.s(1), "pubfaults.charge:publish_refused")
    assert (outcome.state, type(outcome.exception).__name__) == ("FAILURE", "OperationalError")
    assert charges == []
    with CeleryFaults(app) as faults:
        outcome = faults.run(checkout.s(1), "pubfaults.charge:publish_refused(2)@2")
    assert outcome.result == "checked out"  # kombu's third attempt got the second child out
    assert charges == [1, 2]


def test_refused_publishes_leave_no_connection_behind(app: Celery) -> None:
    charge_task, _ = make_tasks(app)
    with CeleryFaults(app) as faults:
        for _ in range(3 * (app.conf.broker_pool_limit or 10)):
            faults.inject("publish_refused")
            with pytest.raises(OperationalError):
                charge_task.delay(1)
        charge_task.delay(2)  # the pool still has a connection to give
        faults.drain()
    assert charges == [2]


def test_with_run_at_p_counts_the_publishes_of_its_task_id(app: Celery) -> None:
    @app.task(
        name="pubfaults.flaky", bind=True, shared=False, max_retries=1, default_retry_delay=5
    )
    def flaky(self: Any) -> str:
        if not self.request.retries:
            raise self.retry()
        return "done"

    with CeleryFaults(app) as faults:
        outcome = faults.run(flaky.s(), "publish_lost@2")  # its retry's publish
    assert (outcome.ended, outcome.lost, outcome.deliveries) == ("publish lost", True, 1)
