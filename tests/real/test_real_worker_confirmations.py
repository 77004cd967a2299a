"""What a real worker does where the execution model has to agree, and the emulation too.

Each test asserts the real behaviour, then runs the same task through the
emulation (state under a key of its own) and asserts the same verdict: a kill
freezes the task (its ``finally`` never runs), a declared soft time limit
interrupts a sleep, and two duplicates in flight at once both act.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
import realapp
from celery import group

from pytest_celery_faults import CeleryFaults, Outcome
from pytest_celery_faults.real.runner import RealBrokerRunner
from pytest_celery_faults.real.waiting import polls

pytestmark = pytest.mark.real_broker


def emulated(
    signature: object, *specs: str, inspect: Callable[[], object] = lambda: None
) -> tuple[list[Outcome], object]:
    """The same signature through the emulated worker: what it published, and ``inspect()``.

    ``inspect()`` reads the world before the harness ends: a frozen stack is
    discarded at its exit, and then its untracked ``finally`` code runs.
    """
    with CeleryFaults(realapp.app) as faults:
        faults.track("realapp.effect")
        faults.run(signature, *specs)
        return faults.outcomes(), inspect()


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
    twin = f"{key}:emulated"
    [outcome], lock = emulated(
        realapp.locked_charge.s(twin), "sigkill@1", inspect=lambda: store.get(f"{twin}:lock")
    )
    assert store.lrange(f"{twin}:log", 0, -1) == ["charged", "skipped"], outcome.story
    assert lock == "held"
    assert (outcome.executions, outcome.state, outcome.result) == (2, "SUCCESS", "skipped")


def test_a_declared_soft_time_limit_interrupts_a_sleeping_body(
    runner: RealBrokerRunner,
) -> None:
    real = runner.run("realapp.sleepy", timeout=20)  # the body sleeps 3 s of real time
    assert (real.state, real.executions) == ("FAILURE", 1), real.timeline()
    assert real.exception is not None
    assert real.exception.startswith("SoftTimeLimitExceeded"), real.exception
    [outcome], _ = emulated(realapp.sleepy.s())
    assert (outcome.state, outcome.executions) == ("FAILURE", 1), outcome.story
    assert type(outcome.exception).__name__ == "SoftTimeLimitExceeded"


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
    twin = f"{key}:emulated"
    realapp.app.conf.worker_concurrency = 2
    try:
        outcomes, _ = emulated(
            group(realapp.check_then_charge.si(twin), realapp.check_then_charge.si(twin))
        )
    finally:
        realapp.app.conf.worker_concurrency = None
    assert [(o.state, o.result) for o in outcomes] == [("SUCCESS", "charged")] * 2
    assert realapp.state().get(f"{twin}:charges") == "2"


@pytest.fixture(scope="module", params=["rabbitmq", "redis"])
def controlled(
    request: pytest.FixtureRequest, make_runner: Callable[..., RealBrokerRunner]
) -> Iterator[RealBrokerRunner]:
    """A real worker that listens to ``app.control`` (addressed to its node only)."""
    with make_runner(request.param, remote_control=True) as real:
        yield real


def _until(condition: Callable[[], bool], timeout: float = 20.0) -> bool:
    return any(condition() for _ in polls(timeout))


def _listening(real: RealBrokerRunner) -> None:
    """The worker is up and its mailbox subscribed (Redis drops a broadcast sent before)."""
    if real.worker is None:
        real.start_worker()
    control = real.client.control
    assert _until(lambda: bool(control.ping(destination=[real.node_name], timeout=0.5)))


def test_a_task_revoked_before_it_runs_is_skipped_as_revoked(
    controlled: RealBrokerRunner,
) -> None:
    signature = controlled.client.signature("realapp.early")
    signature.freeze()
    _listening(controlled)
    replies = controlled.client.control.revoke(
        signature.id, destination=[controlled.node_name], reply=True, timeout=10
    )
    assert replies and controlled.node_name in replies[0], replies  # the worker has it now
    [real] = controlled.run_signature(signature, timeout=30)
    assert (real.state, real.executions) == ("REVOKED", 0), real.timeline()
    assert real.deliveries == []  # no side effect ran
    with CeleryFaults(realapp.app) as faults:
        faults.track("realapp.effect")
        twin = realapp.early.s()
        twin.freeze()
        realapp.app.control.revoke(twin.id)
        outcome = faults.run(twin)
        effects = list(faults.effects)
    assert (outcome.state, outcome.executions, outcome.acked) == ("REVOKED", 0, True)
    assert effects == []


@pytest.mark.parametrize(
    ("how", "log"),
    [
        ("SIGKILL", ["started"]),  # killed where it stands
        ("SIGTERM", ["started", "cleanup"]),  # billiard's handler raises SystemExit: it unwinds
    ],
)
def test_revoke_with_terminate_kills_the_child_running_the_task(
    controlled: RealBrokerRunner, key: str, how: str, log: list[str]
) -> None:
    _listening(controlled)
    store = realapp.state()
    result = controlled.client.signature("realapp.cleaned_up", args=(key,)).apply_async(
        queue=controlled.queue
    )
    assert _until(lambda: "started" in store.lrange(f"{key}:log", 0, -1))
    controlled.client.control.revoke(
        result.id, terminate=True, signal=how, destination=[controlled.node_name], reply=True
    )
    assert _until(lambda: result.state == "REVOKED"), result.state
    store.set(f"{key}:stop", "yes")  # a child that was not killed would finish now
    for _ in polls(2.0):  # what the child still writes, it writes within this
        pass
    assert store.lrange(f"{key}:log", 0, -1) == log
    twin = f"{key}:emulated"
    realapp.app.conf.worker_concurrency = 2
    try:
        with CeleryFaults(realapp.app, seed=1) as faults:
            target = realapp.cleaned_up.delay(twin)
            realapp.terminator.delay(target.id, how)
            faults.drain()
            outcome = faults.outcome(target.id)
            emulated_log = store.lrange(f"{twin}:log", 0, -1)
    finally:
        realapp.app.conf.worker_concurrency = None
    assert emulated_log == log
    assert outcome.state == "REVOKED"
