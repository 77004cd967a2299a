"""The harness's own life cycle: what it holds, what it refuses, what it undoes."""

from __future__ import annotations

import re
import threading
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults.errors import BrokerPoolExhaustedError, HarnessMisuseError

APP_MODULE = """
from celery import Celery

app = Celery("proj", set_as_current=False)
"""

#: Every way an execution can end at the boundary right after a publish.
ENDINGS_AFTER_A_PUBLISH = (
    "sigkill@1",
    "power_loss@1",
    "sigterm@1",
    "exit(1)@1",
    "timeout@1",
    "cold_shutdown@1",
    "raise(ConnectionError)@0",  # the publish itself raises
    "raise(ConnectionError)@1",
    "soft_timeout@1",
    "warm_shutdown@1",
    "sigkill@1;power_loss@2",
    "ack_lost",
    "redeliver",
    "overlap",
)


def _publishing_tasks(app: Celery) -> tuple[object, object]:
    @app.task(acks_late=True, reject_on_worker_lost=True, shared=False)
    def ship(order: int) -> int:
        return order

    @app.task(acks_late=True, reject_on_worker_lost=True, shared=False)
    def checkout(order: int) -> int:
        ship.delay(order)
        ship.delay(order + 1)
        return order

    return ship, checkout


def test_faults_after_a_publish_leak_no_broker_connection(app: Celery) -> None:
    # Each fault right after a publish used to keep one pooled connection: after
    # broker_pool_limit (10) of them the next publish waited forever. (#19.4) Each
    # ending runs more times than the pool has connections.
    _, checkout = _publishing_tasks(app)
    app.conf.task_time_limit = 60
    app.conf.task_soft_time_limit = 30
    scenarios = len(ENDINGS_AFTER_A_PUBLISH) * (app.pool.limit + 1)
    with CeleryFaults(app) as faults:
        pool = app.pool
        for scenario in range(scenarios):
            spec = ENDINGS_AFTER_A_PUBLISH[scenario % len(ENDINGS_AFTER_A_PUBLISH)]
            faults.reset()
            faults.run(checkout.s(scenario), spec)  # type: ignore[attr-defined]
            held = pool.acquired - pool.released
            assert held <= 1, f"{held} connections held after scenario {scenario} ({spec})"
    assert pool.acquired == pool.released
    # each fault at a publish replaced the producer's connection
    assert pool.acquired > scenarios // 2


def test_an_exhausted_broker_pool_is_an_error_naming_the_leak_not_a_hang(app: Celery) -> None:
    # kombu waits for a connection another thread gives back; one execution runs at
    # a time here, so it would wait forever. (#19.4)
    _, checkout = _publishing_tasks(app)
    with CeleryFaults(app) as faults:
        leaked = [app.pool.acquire(block=True) for _ in range(app.pool.limit)]
        with pytest.raises(BrokerPoolExhaustedError, match=r"all 10 connections .* leaks"):
            faults.run(checkout.s(1))  # type: ignore[attr-defined]
        for connection in leaked:
            connection.release()
        assert faults.run(checkout.s(2)).state == "SUCCESS"  # type: ignore[attr-defined]


SHOP = """
from celery import Celery

app = Celery("lifecycle_shop", set_as_current=False)
shipped = []


def ship(order):
    shipped.append(order)


@app.task(
    name="lifecycle_shop.checkout", shared=False, acks_late=True, reject_on_worker_lost=True
)
def checkout(order):
    if order not in shipped:  # guarded: a redelivery after the work does nothing
        ship(order)
"""

#: observe() that raises in the first scenario whose fault has not fired (yet).
INTERRUPTED = """
import pytest, lifecycle_shop as shop


def observe(celery_faults):
    if celery_faults.unfired():
        raise RuntimeError("observe() broke")
    return list(shop.shipped)


def test_sweep(celery_faults):
    celery_faults.track("lifecycle_shop.ship")
    celery_faults.sweep(
        shop.checkout.s(1), lambda: observe(celery_faults), reset=shop.shipped.clear
    )


def test_assert_idempotent(celery_faults):
    celery_faults.track("lifecycle_shop.ship")
    celery_faults.assert_idempotent(
        shop.checkout.s(1),
        lambda: observe(celery_faults),
        reset=shop.shipped.clear,
        specs=["sigkill@5"],
    )
"""


@pytest.fixture
def shop(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(lifecycle_shop=SHOP)
    pytester.makeini("[pytest]\ncelery_faults_app = lifecycle_shop:app\n")
    return pytester


def test_an_interrupted_sweep_leaves_no_spec_armed_to_blame_the_test(
    shop: pytest.Pytester,
) -> None:
    # The scenario's spec stayed armed: teardown added UnfiredFaultError to the
    # test's own failure, blaming the test for a fault the sweep chose. (#19.13)
    shop.makepyfile(test_it=INTERRUPTED)
    result = shop.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=2, errors=0)
    result.stdout.fnmatch_lines(["*RuntimeError: observe() broke*"])
    assert "never fired" not in result.stdout.str()


DEADLINE = """
import time


def test_deadline(celery_faults, request):
    marker = request.node.get_closest_marker("timeout")
    limit = None if marker is None else marker.args[0]
    left = None if celery_faults.deadline is None else celery_faults.deadline - time.monotonic()
    print(f"LIMIT {limit} LEFT {left}")
    assert {expected}
"""


@pytest.mark.parametrize(
    ("args", "ini", "env", "expected"),
    [
        # --timeout=0 means no timeout (pytest-timeout's own docs), whatever else is set.
        (["--timeout=0"], "", None, "limit is None and left is None"),
        (["--timeout=0"], "timeout = 120", None, "left is None"),
        (["--timeout=0"], "", "5", "limit is None and left is None"),
        # pytest-timeout's order: command line, then PYTEST_TIMEOUT, then the ini file.
        (["--timeout=7"], "timeout = 120", "50", "0 < left <= 7"),
        ([], "timeout = 120", "50", "0 < left <= 50"),
        ([], "timeout = 120", "0", "left is None"),
        ([], "timeout = 120", None, "50 < left <= 120"),
        ([], "", None, "limit == 300 and 200 < left <= 300"),  # the plugin's own default
    ],
)
def test_time_limit_read_as_pytest_timeout_reads_it(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    ini: str,
    env: str | None,
    expected: str,
) -> None:
    # --timeout=0 was read as "not set": the plugin added its own 300 s limit, or
    # took the ini file's or PYTEST_TIMEOUT's instead. (#19.15)
    pytester.makepyfile(proj=APP_MODULE)
    pytester.makeini(f"[pytest]\ncelery_faults_app = proj:app\n{ini}\n")
    pytester.makepyfile(test_it=DEADLINE.replace("{expected}", expected))
    if env is None:
        monkeypatch.delenv("PYTEST_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("PYTEST_TIMEOUT", env)
    result = pytester.runpytest("-p", "no:randomly", "-s", *args)
    result.assert_outcomes(passed=1)


def _calling_the_harness(app: Celery, holder: dict[str, Any], method: str) -> Any:
    """A task whose body calls the harness (a test's closure reaching it)."""
    sent: list[int] = []
    world = SimpleNamespace(ship=sent.append)

    @app.task(acks_late=True, reject_on_worker_lost=True, shared=False)
    def meddle(n: int) -> None:
        world.ship(n)
        faults = holder["faults"]
        if method == "run":
            faults.run(meddle.s(n + 1))
        else:
            getattr(faults, method)()

    holder["sent"], holder["world"] = sent, world
    return meddle


@pytest.mark.parametrize(
    ("method", "concurrency", "spec"),
    [
        ("run", 1, None),
        ("drain", 1, None),
        ("reset", 1, None),
        ("drain", 2, None),  # on a stack of its own
        ("run", 1, "sigkill@1"),  # the redelivery of a killed task
    ],
)
def test_the_harness_refuses_to_be_driven_from_inside_a_task(
    app: Celery, method: str, concurrency: int, spec: str | None
) -> None:
    # A drain inside a task ran the worker again from inside it: 17,521 deliveries,
    # or 731 of a killed task. The task fails, and so does the test. (#19.12)
    holder: dict[str, Any] = {}
    meddle = _calling_the_harness(app, holder, method)
    app.conf.worker_concurrency = concurrency
    with CeleryFaults(app, check_unfired=False) as faults:
        holder["faults"] = faults
        if spec is not None:
            faults.track((holder["world"], "ship"))
        with pytest.raises(HarnessMisuseError) as raised:
            faults.run(meddle.s(1), *([spec] if spec else []))
        message = str(raised.value)
        assert "\n" not in message
        assert f"{method}() called from inside the task " in message
        assert "call it from the test" in message
        assert len(holder["sent"]) == (2 if spec else 1)
        assert faults.run(app.signature("celery.backend_cleanup")).state == "SUCCESS"


def test_the_harness_refuses_a_second_thread(app: Celery) -> None:
    # Two threads driving one harness interleave the worker's steps; the thread
    # is refused, and if it swallows the refusal, the test still fails. (#19.12)
    holder: dict[str, Any] = {}
    errors: list[BaseException] = []

    def elsewhere() -> None:
        try:
            holder["faults"].drain()
        except HarnessMisuseError as refused:
            errors.append(refused)

    with pytest.raises(HarnessMisuseError, match="from the thread 'other'"):  # noqa: SIM117
        with CeleryFaults(app) as faults:
            holder["faults"] = faults
            thread = threading.Thread(target=elsewhere, name="other")
            thread.start()
            thread.join()
            [refused] = errors
            assert "\n" not in str(refused)
            assert "drain() called from the thread 'other'" in str(refused)
            assert "the thread that started it" in str(refused)


def _parent_and_child(app: Celery) -> tuple[Any, list[str]]:
    """A task that publishes a child between side effects, on a worker with two children.

    Each side effect takes a virtual second, so the parent and its child run at
    once, and which one goes on at each boundary is the scheduler's choice.
    """
    app.conf.worker_concurrency = 2
    world: list[str] = []
    steps = SimpleNamespace(step=world.append)

    @app.task(acks_late=True, reject_on_worker_lost=True, shared=False, name="lc.child")
    def child(n: int) -> None:
        steps.step(f"x{n}")
        steps.step(f"y{n}")

    @app.task(acks_late=True, reject_on_worker_lost=True, shared=False, name="lc.parent")
    def parent(n: int) -> None:
        child.delay(n)
        steps.step("a")
        steps.step("b")

    app.conf.update(lc_steps=steps)
    return parent, world


_IDS = re.compile(r"[0-9a-f]{8}(?:-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})?")


def _told(text: str) -> str:
    """A story without task ids (each run makes its own), the counters that go on over
    a harness's life (a consumer's connection, a pool's job number, a delivery tag),
    and an overlap's schedule (the spec that replays it names it)."""
    seen: dict[str, str] = {}
    text = re.sub(r"#\d+|Job: \d+|broker-\d+\.\d+", "#n", text)
    text = re.sub(r"overlap\([^)]*\)", "overlap", text)
    return _IDS.sub(lambda found: seen.setdefault(found[0][:8], f"<id{len(seen)}>"), text)


def _fresh_run(app: Celery, parent: Any, world: list[str], spec: str) -> tuple[Any, ...]:
    """``run(signature, spec)`` in a fresh harness: outcome, world, timeline, choices."""
    world.clear()
    with CeleryFaults(app, seed=7, check_unfired=False) as fresh:
        fresh.track((app.conf.lc_steps, "step"), duration=1.0)
        outcome = fresh.run(parent.s(1), spec)
        choices = list(fresh.scheduler.choices)
        return _told(outcome.summary()), list(world), _told(str(fresh.timeline)), choices


def test_each_scenario_of_a_concurrent_sweep_replays_exactly(app: Celery) -> None:
    # The scheduler's and the workers' random choices went on from one scenario to
    # the next, so a scenario's replay string, run on its own, took other
    # interleavings (17 of 27 scenarios with worker_concurrency=2). (#19.14)
    parent, world = _parent_and_child(app)
    with CeleryFaults(app, seed=7) as faults:
        faults.track((app.conf.lc_steps, "step"), duration=1.0)
        report = faults.sweep(
            parent.s(1), lambda: list(world), reset=world.clear, hows=("sigkill", "power_loss")
        )
        assert len(report.scenarios) > 20
        in_the_sweep = {}
        for scenario in report.scenarios:  # again in the same harness, one after another
            faults.reset()
            world.clear()
            faults.run(parent.s(1), scenario.replay)
            in_the_sweep[scenario.replay] = _told(str(faults.timeline))
        faults.reset()
    differ = []
    for scenario in report.scenarios:
        summary, observed, timeline, _ = _fresh_run(app, parent, world, scenario.replay)
        swept = (_told(scenario.outcome.summary()), scenario.observed)
        if (summary, observed) != swept or timeline != in_the_sweep[scenario.replay]:
            differ.append(scenario.replay)
    assert not differ, f"{len(differ)} of {len(report.scenarios)} replayed otherwise: {differ}"


def test_executions_running_at_once_have_labels_of_their_own(app: Celery) -> None:
    # A child task's first delivery ran as "1" beside its parent's "1": a choice
    # between them could not be named, every_schedule never explored the other,
    # and overlap(SCHEDULE) was ambiguous. (#19.14)
    parent, world = _parent_and_child(app)
    _, _, timeline, choices = _fresh_run(app, parent, world, "overlap")
    assert any(len(options) > 2 for _, options in choices)  # both copies and the child
    assert all(len(set(options)) == len(options) for _, options in choices), choices
    schedule = "".join(chosen for chosen, _ in choices)
    assert "3" in schedule
    _, _, replayed, again = _fresh_run(app, parent, world, f"overlap({schedule})")
    assert again == choices
    assert replayed == timeline


def test_nothing_public_exists_only_after_start_and_views_refuse_before_it(app: Celery) -> None:
    # The engine holds what start() wires; the harness shows it read-only. (#23)
    @app.task(shared=False)
    def noop() -> None:
        pass

    faults = CeleryFaults(app)
    public = {name for name in vars(faults) if not name.startswith("_")}
    with pytest.raises(RuntimeError, match=r"has not started: use it as `with CeleryFaults"):
        faults.effects  # noqa: B018
    with faults:
        faults.run(noop.s())  # type: ignore[attr-defined]
        assert {name for name in vars(faults) if not name.startswith("_")} == public
        with pytest.raises(AttributeError, match="read-only"):
            faults.clock = None
    assert faults.warnings == []  # still readable after stop(): the report reads it then
    assert len(faults.records) == 1


def test_a_run_observer_is_told_of_each_run_in_order(app: Celery) -> None:
    # Real-broker mode registers an observer; nothing replaces run() on the instance. (#23)
    @app.task(acks_late=True, reject_on_worker_lost=True, shared=False)
    def add(x: int) -> int:
        return x + 1

    seen: list[tuple[str, ...]] = []

    class Observer:
        def before_run(self, signature: Any, specs: Any) -> None:
            seen.append(("before", signature.task, *specs))

        def after_run(self, signature: Any, specs: Any, outcome: Any) -> None:
            seen.append(("after", outcome.state, str(outcome.deliveries), *specs))

    with CeleryFaults(app) as faults:
        forget = faults.observe_runs(Observer())
        assert faults.run(add.s(1), "sigkill@0").state == "SUCCESS"  # type: ignore[attr-defined]
        forget()
        faults.run(add.s(2))  # type: ignore[attr-defined]
        assert "run" not in vars(faults)
    assert seen == [("before", add.name, "sigkill@0"), ("after", "SUCCESS", "2", "sigkill@0")]
