"""What a real worker does where the execution model has to agree (the real side only).

Each test asserts the real behaviour; the emulation is compared with it once
the new execution engine (issue 9) runs bodies on stacks of their own.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import realapp
from celery import group

from pytest_celery_faults.real.runner import RealBrokerRunner

pytestmark = pytest.mark.real_broker


@pytest.fixture
def key() -> Iterator[str]:
    """A state key of its own, removed after the test."""
    name = f"confirm-{uuid.uuid4().hex[:8]}"
    yield name
    store = realapp.state()
    store.delete(*store.keys(f"{name}:*") or [f"{name}:none"])
    store.close()


def test_a_lock_released_in_finally_stays_held_after_sigkill_and_the_redelivery_skips(
    runner: RealBrokerRunner, key: str
) -> None:
    real = runner.run("realapp.locked_charge", (key,), spec="sigkill@1")
    store = realapp.state()
    assert store.lrange(f"{key}:log", 0, -1) == ["charged", "skipped"], real.timeline()
    assert store.get(f"{key}:lock") == "held"  # the finally never ran in the killed child
    assert (real.executions, real.redelivered, real.state, real.result) == (
        2,
        [False, True],
        "SUCCESS",
        "skipped",
    )


def test_a_declared_soft_time_limit_interrupts_a_sleeping_body(
    runner: RealBrokerRunner,
) -> None:
    real = runner.run("realapp.sleepy", timeout=20)  # the body sleeps 3 s of real time
    assert (real.state, real.executions) == ("FAILURE", 1), real.timeline()
    assert real.exception is not None
    assert real.exception.startswith("SoftTimeLimitExceeded"), real.exception


@pytest.fixture(scope="module")
def two_children(make_runner: Callable[..., RealBrokerRunner]) -> Iterator[RealBrokerRunner]:
    """A real worker with concurrency 2 (RabbitMQ)."""
    with make_runner("rabbitmq", concurrency=2) as real:
        yield real


def test_two_concurrent_duplicates_of_a_check_then_act_charge_both_charge(
    two_children: RealBrokerRunner, key: str
) -> None:
    duplicates = group(realapp.check_then_charge.si(key), realapp.check_then_charge.si(key))
    duplicates.freeze()
    reals = two_children.run_signature(duplicates, timeout=30)
    assert [(real.state, real.result) for real in reals] == [("SUCCESS", "charged")] * 2
    assert realapp.state().get(f"{key}:charges") == "2"
