"""The execution model: kills freeze, executions overlap, time inside a body is virtual.

Each test here gave the opposite verdict when a kill unwound the task, when
executions ran one after another, and when only ``app.now()`` was virtual.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from celery import signals as celery_signals
from celery.exceptions import SoftTimeLimitExceeded

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults.engine.scheduler import BLOCKED_SECONDS, every_schedule

#: The world the tasks below change: a lock table, charges made, cleanups run.
locks: dict[str, str] = {}
charges: list[Any] = []
cleanups: list[str] = []
paid: set[Any] = set()


def take_lock(key: str) -> bool:
    """Redis ``SET key value NX``: true when the lock was free."""
    if key in locks:
        return False
    locks[key] = "held"
    return True


def release_lock(key: str) -> None:
    locks.pop(key, None)


def charge(order: Any) -> None:
    charges.append(order)


@pytest.fixture(autouse=True)
def _fresh_world() -> None:
    vars(per_child).clear()
    locks.clear()
    charges.clear()
    cleanups.clear()
    paid.clear()


@contextlib.contextmanager
def tracked(app: Celery, **options: Any) -> Iterator[CeleryFaults]:
    """A harness that counts the lock, unlock and charge calls as side effects."""
    with CeleryFaults(app, **options) as faults:
        for name in ("take_lock", "release_lock", "charge"):
            faults.track(f"{__name__}.{name}")
        yield faults


def lock_guarded(app: Celery, **options: Any) -> Any:
    """Check-then-act inside a Redis-style ``SET NX`` lock released in ``finally``."""

    @app.task(name="orders.locked_charge", shared=False, **options)
    def locked_charge(order: int) -> str:
        if not take_lock(f"lock:{order}"):
            return "skipped"
        try:
            if order in paid:
                return "already paid"
            charge(order)
            paid.add(order)
            return "charged"
        finally:
            release_lock(f"lock:{order}")

    return locked_charge


def check_then_act(app: Celery, **options: Any) -> Any:
    @app.task(name="orders.charge_once", shared=False, **options)
    def charge_once(order: int) -> str:
        if order in paid:
            return "already paid"
        charge(order)
        paid.add(order)
        return "charged"

    return charge_once


# -- kills freeze -------------------------------------------------------------------


@pytest.mark.parametrize("kill", ["sigkill@2", "power_loss@2", "cold_shutdown@2"])
def test_a_kill_runs_no_finally_so_the_lock_stays_held(app: Celery, kill: str) -> None:
    task = lock_guarded(app, acks_late=True, reject_on_worker_lost=True)
    with tracked(app) as faults:
        outcome = faults.run(task.s(1), kill)
        held_during_scenario = dict(locks)
    assert held_during_scenario == {"lock:1": "held"}
    assert charges == [1]
    assert outcome.deliveries == 2
    assert outcome.result == "skipped"  # the redelivery found the dead child's lock
    labels = [effect.label for effect in faults.effects]
    assert f"{__name__}.release_lock" not in labels[:2]


def test_a_kill_runs_no_except_base_exception_and_no_exit(app: Celery) -> None:
    class Guard:
        def __enter__(self) -> Guard:
            return self

        def __exit__(self, *exc_info: object) -> None:
            cleanups.append("__exit__")

    @app.task(name="orders.guarded", shared=False, acks_late=True)
    def guarded(order: int) -> None:
        with Guard():
            try:
                charge(order)
                charge(order + 1)
            except BaseException:
                cleanups.append("except BaseException")
                raise

    with tracked(app) as faults:
        outcome = faults.run(guarded.s(1), "sigkill@1")
        during = list(cleanups)
    assert during == []
    assert charges == [1]
    assert outcome.lost  # acks_late without reject_on_worker_lost: Celery acks it
    # Discarded at the harness's exit: it unwinds then, after the test's assertions.
    assert cleanups == ["except BaseException", "__exit__"]


def test_a_discarded_stack_performs_no_tracked_effect(app: Celery) -> None:
    task = lock_guarded(app, acks_late=True)
    with tracked(app) as faults:
        faults.run(task.s(1), "sigkill@2")
        count = len(faults.effects)
    assert count == 2
    assert len(faults.effects) == 2  # release_lock in its finally was refused
    assert locks == {"lock:1": "held"}


@pytest.mark.parametrize("cleanup", ["raises", "swallows"])
def test_a_discarded_stack_that_fails_or_returns_while_unwinding_is_not_the_tasks_ending(
    app: Celery, cleanup: str, celery_error_log: list[str]
) -> None:
    # A real SIGKILL runs nothing more in the child: no on_failure, no callback, no
    # "raised unexpected" in the log, even when the unwinding meets a closed world
    # (pytest-django blocks the database after the test) or swallows the discard.
    # (The worker's main process stores WorkerLostError and calls errbacks: Celery's.)
    class Recording(app.Task):  # type: ignore[name-defined,misc]
        def on_failure(self, *args: Any, **kwargs: Any) -> None:
            cleanups.append("on_failure")

        def on_success(self, *args: Any, **kwargs: Any) -> None:
            cleanups.append("on_success")

    @app.task(name="orders.after", shared=False)
    def after(*args: Any) -> None:
        cleanups.append("linked task ran")

    @app.task(name="orders.unwinding", base=Recording, shared=False, acks_late=True)
    def unwinding(order: int) -> str:
        try:
            charge(order)
        except BaseException:
            if cleanup == "raises":
                raise RuntimeError("Database access not allowed") from None
            return "swallowed"
        return "charged"

    failures: list[object] = []

    def on_task_failure(sender: object = None, **_: object) -> None:
        failures.append(sender)

    celery_signals.task_failure.connect(on_task_failure, weak=False)
    try:
        with tracked(app) as faults:
            signature = unwinding.s(1)
            signature.link(after.s())
            outcome = faults.run(signature, "sigkill@1")
            during, failures_during = list(cleanups), list(failures)
        tasks_run = [outcome.name for outcome in faults.outcomes()]
    finally:
        celery_signals.task_failure.disconnect(on_task_failure)
    assert outcome.lost and during == []
    assert cleanups == []
    assert failures == failures_during  # the main process sends one (WorkerLostError)
    assert tasks_run == ["orders.unwinding"]
    assert not any("raised unexpected" in line for line in celery_error_log), celery_error_log


def test_reset_discards_frozen_stacks_before_the_next_scenario(app: Celery) -> None:
    task = lock_guarded(app, acks_late=True)
    with tracked(app) as faults:
        faults.run(task.s(1), "sigkill@2")
        assert len(faults.scheduler.stacks) == 1
        faults.reset()
        assert faults.scheduler.stacks == []
        locks.clear()
        outcome = faults.run(task.s(1))
    assert outcome.result == "charged"


#: What a worker child keeps per process, kept per thread here: a scoped_session, a client.
per_child = threading.local()


def child_state_task(app: Celery, **options: Any) -> Any:
    """A task with a hard limit (every execution runs on a stack) reading its child's state."""

    @app.task(name="orders.child_state", shared=False, time_limit=60, **options)
    def child_state() -> tuple[int, str]:
        found = getattr(per_child, "session", "none")
        per_child.session = "opened"
        charge(threading.get_ident())
        return threading.get_ident(), found

    return child_state


def test_an_execution_that_ends_hands_its_thread_to_the_next_as_a_child_does(
    app: Celery,
) -> None:
    task = child_state_task(app)
    with tracked(app) as faults:
        seen = []
        for _ in range(3):
            faults.reset()
            seen.append(faults.run(task.s()).result)
        carriers = [t for t in threading.enumerate() if t.name.startswith("celery-faults")]
    assert {ident for ident, _ in seen} != {threading.get_ident()}
    assert len({ident for ident, _ in seen}) == 1  # one child thread, reused
    assert [found for _, found in seen] == ["none", "opened", "opened"]
    assert len(carriers) == 1


def test_a_killed_execution_s_thread_state_reaches_no_later_execution(app: Celery) -> None:
    task = child_state_task(app, acks_late=True)  # a kill acks it: no redelivery
    with tracked(app) as faults:
        killed = faults.run(task.s(), "sigkill@1")
        faults.reset()  # discards the frozen stack: its thread ends with it
        after = faults.run(task.s())
    assert (killed.deliveries, killed.ended) == (1, "child killed")
    assert after.result[1] == "none"  # a fresh child: the killed one's session is gone


#: What a test sets for itself: a worker child has none of it.
test_context: contextvars.ContextVar[str] = contextvars.ContextVar("test_context", default="unset")
test_local = threading.local()


def context_reader(app: Celery) -> Any:
    @app.task(name="orders.read_context", shared=False, acks_late=True, reject_on_worker_lost=True)
    def read_context() -> tuple[str, str]:
        seen = (test_context.get(), getattr(test_local, "value", "unset"))
        charge(seen)
        return seen

    return read_context


@pytest.mark.parametrize("fault", [None, "sigkill@1", "power_loss@1", "exit(1)@1"])
def test_an_execution_sees_none_of_the_test_s_context(app: Celery, fault: str | None) -> None:
    task = context_reader(app)
    token = test_context.set("the test's")
    test_local.value = "the test's"
    try:
        with tracked(app) as faults:
            outcome = faults.run(task.s(), *([fault] if fault else []))
    finally:
        test_context.reset(token)
        del test_local.value
    assert outcome.result == ["unset", "unset"]  # a tuple, through JSON
    assert charges == [("unset", "unset")] * outcome.executions  # the same fault-free or not


def test_context_an_execution_sets_stays_out_of_the_test(app: Celery) -> None:
    """The app's own per-task setup (a prerun receiver) provides context, in the child only."""

    @app.task(name="orders.in_context", shared=False)
    def in_context() -> str:
        return test_context.get()

    def set_up(**_: Any) -> None:
        test_context.set("the task's")
        test_local.value = "the task's"

    celery_signals.task_prerun.connect(set_up, weak=False)
    try:
        with tracked(app) as faults:
            outcome = faults.run(in_context.s())
    finally:
        celery_signals.task_prerun.disconnect(set_up)
    assert outcome.result == "the task's"
    assert (test_context.get(), getattr(test_local, "value", "unset")) == ("unset", "unset")


@pytest.mark.parametrize("fault", ["sigterm@2", "exit(1)@2"])
def test_sigterm_and_exit_still_unwind(app: Celery, fault: str) -> None:
    task = lock_guarded(app, acks_late=True, reject_on_worker_lost=True)
    with tracked(app) as faults:
        outcome = faults.run(task.s(1), fault)
    assert locks == {}  # its finally ran on the way down, so the redelivery took the lock
    assert outcome.result == "charged"
    assert charges == [1, 1]  # killed between the charge and paid.add: charged again


# -- time inside bodies -----------------------------------------------------------


def test_a_declared_soft_time_limit_fires_during_a_long_sleep(app: Celery) -> None:  # virtual
    @app.task(name="reports.slow", shared=False, soft_time_limit=2)
    def slow() -> str:
        time.sleep(5)  # virtual: the clock moves, the test does not wait
        return "done"

    with CeleryFaults(app) as faults:
        outcome = faults.run(slow.s())
    assert outcome.state == "FAILURE"
    assert isinstance(outcome.exception, SoftTimeLimitExceeded)
    assert faults.clock.elapsed == 2.0
    assert "soft time limit (2s) exceeded" in str(outcome.timeline)


def test_a_task_can_catch_its_soft_time_limit_and_clean_up(app: Celery) -> None:
    @app.task(name="reports.careful", shared=False)
    def careful() -> str:
        try:
            time.sleep(60)  # virtual
        except SoftTimeLimitExceeded:
            cleanups.append("saved partial work")
            return "partial"
        return "complete"

    app.conf.task_soft_time_limit = 30
    with CeleryFaults(app) as faults:
        outcome = faults.run(careful.s())
    assert (outcome.state, outcome.result) == ("SUCCESS", "partial")
    assert cleanups == ["saved partial work"]
    assert faults.clock.elapsed == 30.0


@pytest.mark.parametrize(
    ("cleanup_takes", "done_after"),
    [(0.0, ["lock released"]), (0.05, ["lock released"]), (0.5, [])],
)
def test_a_hard_time_limit_is_sigterm_then_sigkill_after_billiards_grace(
    app: Celery, cleanup_takes: float, done_after: list[str]
) -> None:
    """billiard's ``_trywaitkill``: SIGTERM unwinds the task, SIGKILL 0.1 s later."""

    @app.task(name="reports.stuck", shared=False, time_limit=3)
    def stuck() -> None:
        take_lock("report")
        try:
            time.sleep(10)  # virtual
        finally:
            time.sleep(cleanup_takes)  # virtual: the cleanup's own time
            release_lock("report")
            cleanups.append("lock released")

    with CeleryFaults(app) as faults:
        outcome = faults.run(stuck.s())
        during = list(cleanups)
        held = dict(locks)
    assert during == done_after
    assert held == ({} if done_after else {"report": "held"})
    assert outcome.state == "FAILURE"
    assert type(outcome.exception).__name__ == "TimeLimitExceeded"
    assert outcome.ended == "child killed"
    assert faults.clock.elapsed == pytest.approx(3.0 + min(cleanup_takes, 0.1))


def test_a_sigterm_handler_that_swallows_the_hard_limit_is_killed_after_the_grace(
    app: Celery,
) -> None:
    import signal

    @app.task(name="reports.stubborn", shared=False, time_limit=3)
    def stubborn() -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: cleanups.append("ignored TERM"))
        time.sleep(10)  # virtual: returns after the handler, then sleeps on
        cleanups.append("finished")

    with CeleryFaults(app) as faults:
        outcome = faults.run(stubborn.s())
        during = list(cleanups)
    assert during == ["ignored TERM"]
    assert (outcome.state, outcome.ended) == ("FAILURE", "child killed")
    assert type(outcome.exception).__name__ == "TimeLimitExceeded"


def test_a_timeout_fault_unwinds_within_the_grace_too(app: Celery) -> None:
    @app.task(name="reports.limited", shared=False, time_limit=30)
    def limited() -> None:
        take_lock("report")
        try:
            charge(1)
            charge(2)
        finally:
            release_lock("report")

    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.charge")
        outcome = faults.run(limited.s(), "timeout@1")
        held = dict(locks)  # before the harness ends (then a frozen stack unwinds)
    assert charges == [1]
    assert held == {}
    assert (outcome.state, outcome.ended) == ("FAILURE", "child killed")
    assert type(outcome.exception).__name__ == "TimeLimitExceeded"


def test_a_tracked_effect_can_take_time(app: Celery) -> None:
    @app.task(name="orders.slow_api", shared=False, soft_time_limit=5)
    def slow_api(order: int) -> None:
        charge(order)
        charge(order + 1)

    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.charge", duration=3)
        outcome = faults.run(slow_api.s(1))
    assert isinstance(outcome.exception, SoftTimeLimitExceeded)
    assert charges == [1]  # the second call was under way when the limit hit
    assert faults.clock.elapsed == 5.0


def test_clocks_in_a_body_read_the_virtual_clock(app: Celery) -> None:
    @app.task(name="clocks.read", shared=False)
    def read() -> list[float]:
        before = (time.time(), time.monotonic(), datetime.datetime.now(datetime.UTC))
        time.sleep(90)  # virtual
        after = (time.time(), time.monotonic(), datetime.datetime.now(datetime.UTC))
        return [
            after[0] - before[0],
            after[1] - before[1],
            (after[2] - before[2]).total_seconds(),
        ]

    with CeleryFaults(app) as faults:
        start = faults.clock.time()
        outcome = faults.run(read.s())
    assert outcome.result == pytest.approx([90.0, 90.0, 90.0], abs=1e-6)
    assert faults.clock.time() == start + 90.0


def test_an_eta_computed_in_a_body_lands_on_the_virtual_clock(app: Celery) -> None:
    @app.task(name="mail.send", shared=False)
    def send() -> float:
        return time.time()

    @app.task(name="mail.schedule", shared=False)
    def schedule() -> None:
        time.sleep(100)  # virtual
        eta = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60)
        send.apply_async(eta=eta)

    with CeleryFaults(app) as faults:
        faults.run(schedule.s())
        sent = [o for o in faults.outcomes() if o.name == "mail.send"]
    assert sent[0].result == pytest.approx(faults.clock.start + 160.0, abs=1e-3)


def test_a_visibility_timeout_passes_under_a_long_task(app: Celery) -> None:
    # kombu's restore sweeps come every 100 s by default: the first run outlasts one
    app.conf.broker_transport_options = {"visibility_timeout": 10}
    app.conf.worker_concurrency = 2

    @app.task(name="orders.slow_charge", bind=True, shared=False, acks_late=True)
    def slow_charge(self: Any, order: int) -> None:
        if not self.request.delivery_info.get("redelivered"):
            time.sleep(150)  # virtual: the first run is slow, the copy is not
        charge(order)

    with tracked(app, profile="redis") as faults:
        outcome = faults.run(slow_charge.s(1))
    assert charges == [1, 1]  # the restored copy ran beside the first: charged twice
    assert outcome.deliveries == 2
    kinds = faults.ledger.kinds(outcome.task_id)
    assert kinds[:4] == ["published", "delivered", "restored", "delivered"]


def test_rabbitmq_consumer_timeout_brings_a_late_ack_back(app: Celery) -> None:
    @app.task(name="reports.very_slow", bind=True, shared=False, acks_late=True)
    def very_slow(self: Any, order: int) -> None:
        charge(order)
        if not self.request.delivery_info.get("redelivered"):
            time.sleep(2000)  # virtual: longer than RabbitMQ's 30-minute consumer_timeout

    with tracked(app) as faults:
        outcome = faults.run(very_slow.s(1))
    assert outcome.deliveries == 2
    assert charges == [1, 1]
    assert "channel_closed" in faults.ledger.kinds(outcome.task_id)
    assert "consumer_timeout=1800s" in str(outcome.timeline)


def test_rate_limit_spaces_starts_on_the_virtual_clock(app: Celery) -> None:
    @app.task(name="mail.limited", shared=False, rate_limit="6/m")
    def limited() -> float:
        return time.time()

    with CeleryFaults(app) as faults:
        for _ in range(3):
            limited.delay()
        outcomes = faults.drain()
    starts = sorted(o.result - faults.clock.start for o in outcomes)
    assert starts == pytest.approx([0.0, 10.0, 20.0])


# -- overlapping executions ---------------------------------------------------------


def test_overlapping_copies_of_a_check_then_act_charge_twice(app: Celery) -> None:
    task = check_then_act(app, acks_late=True)
    with tracked(app) as faults:
        outcome = faults.run(task.s(7), "overlap(12)")
        choices = list(faults.scheduler.choices)
    assert charges == [7, 7]
    assert outcome.executions == 2
    assert choices[:2] == [("1", ("1", "2")), ("2", ("1", "2"))]
    assert {chosen for chosen, _ in choices[2:]} <= {"1"}  # past the schedule: the first


def test_a_schedule_that_runs_one_copy_first_charges_once(app: Celery) -> None:
    task = check_then_act(app, acks_late=True)
    with tracked(app) as faults:
        faults.run(task.s(7), "overlap(11)")
    assert charges == [7]


def explore(app: Celery, task: Any) -> dict[str, list[Any]]:
    """Every interleaving of two overlapping copies: the charges each schedule made."""
    results: dict[str, list[Any]] = {}
    with tracked(app) as faults:

        def run(prefix: str) -> list[tuple[str, tuple[str, ...]]]:
            faults.reset()
            charges.clear()
            paid.clear()
            locks.clear()
            faults.run(task.s(7), f"overlap({prefix})" if prefix else "overlap(1)")
            choices = list(faults.scheduler.choices)
            results["".join(chosen for chosen, _ in choices)] = list(charges)
            return choices

        schedules = every_schedule(run)
    assert sorted(schedules) == sorted(results)
    return results


def test_every_interleaving_finds_the_double_charge(app: Celery) -> None:
    results = explore(app, check_then_act(app, acks_late=True))
    doubled = sorted(schedule for schedule, made in results.items() if made == [7, 7])
    assert doubled  # at least one interleaving charges twice
    assert all(made in ([7], [7, 7]) for made in results.values())
    assert len(results) == 6  # two effects each: both start, then one choice per boundary


def test_every_interleaving_of_a_lock_guarded_charge_charges_once(app: Celery) -> None:
    results = explore(app, lock_guarded(app, acks_late=True))
    assert len(results) > 1
    assert all(made == [7] for made in results.values()), results


def test_a_copy_blocked_on_a_lock_a_parked_copy_holds_lets_it_run_on(app: Celery) -> None:
    # Copy 1 takes the lock and parks at its charge; copy 2 then waits on the lock, where
    # no switch point is. Held to one runner, both would wait forever.
    guard = threading.Lock()

    @app.task(name="orders.charge_under_lock", shared=False, acks_late=True)
    def charge_under_lock(order: int) -> str:
        with guard:
            if order in paid:
                return "already paid"
            charge(order)
            paid.add(order)
            return "charged"

    with tracked(app) as faults:
        outcome = faults.run(charge_under_lock.s(1), "overlap(12)")
        endings = [record.ended for record in faults.records]
    assert charges == [1]
    assert endings == ["returned", "returned"]
    assert "execution 2 blocked" in outcome.story


def test_a_blocked_copy_whose_worker_lost_power_is_not_waited_for(app: Celery) -> None:
    # Copy 2 takes the lock and parks at its charge; copy 1 waits on the lock; copy 2
    # runs on, charges, and the worker loses power under both. The frozen holder keeps
    # the lock while the scenario lasts, so copy 1 cannot come free: it died with its
    # worker, and the drain does not wait for it.
    guard = threading.Lock()

    @app.task(name="orders.charge_under_lock", shared=False)  # early ack: no redelivery
    def charge_under_lock(order: int) -> str:
        with guard:
            charge(order)
            return "charged"

    with tracked(app) as faults:
        outcome = faults.run(charge_under_lock.s(1), "overlap(2);power_loss@1")
        endings = [record.ended for record in faults.records]
    assert "execution 1 blocked" in outcome.story
    assert endings == ["power lost", "power lost"]
    assert outcome.lost
    assert charges == [1]  # discarded at the harness's exit, the blocked copy charges nothing


def test_a_copy_that_computes_past_the_bound_is_not_taken_as_blocked(app: Celery) -> None:
    @app.task(name="orders.charge_slowly", shared=False, acks_late=True)
    def charge_slowly(order: int) -> None:
        start = time.perf_counter()  # real time: the body's time.monotonic is virtual
        while time.perf_counter() - start < 2 * BLOCKED_SECONDS:
            sum(range(1000))  # on the CPU all along, between two switch points
        charge(order)

    with tracked(app) as faults:
        outcome = faults.run(charge_slowly.s(1), "overlap(12)")
    assert "blocked" not in outcome.story
    assert charges == [1, 1]


def test_a_worker_with_concurrency_two_overlaps_duplicate_publishes(app: Celery) -> None:
    app.conf.worker_concurrency = 2
    task = check_then_act(app, acks_late=True)
    doubled = []
    for seed in range(8):
        charges.clear()
        paid.clear()
        with tracked(app, seed=seed) as faults:
            task.apply_async((7,), task_id="same-order")
            task.apply_async((7,), task_id="same-order")
            faults.drain()
        doubled.append(len(charges) == 2)
    assert any(doubled)  # some seeds interleave the two copies' check and act
    assert not all(doubled)  # and some run one after the other


def test_the_same_seed_gives_the_same_interleaving(app: Celery) -> None:
    app.conf.worker_concurrency = 2
    task = check_then_act(app, acks_late=True)

    def charged(seed: int) -> list[Any]:
        charges.clear()
        paid.clear()
        with tracked(app, seed=seed) as faults:
            for order in (1, 2, 3, 1):
                task.delay(order)
            faults.drain()
        return list(charges)

    runs = {seed: charged(seed) for seed in range(6)}
    assert all(charged(seed) == made for seed, made in runs.items())
    assert len({tuple(made) for made in runs.values()}) > 1  # the seed does choose


# -- through the plugin ---------------------------------------------------------------


def test_a_stopped_test_says_where_a_task_on_its_own_stack_hung(
    pytester: pytest.Pytester,
) -> None:
    # A time limit gives the task a stack of its own. Its body raises SIGALRM,
    # which runs pytest-timeout's handler in the test's thread at once (no real
    # time passes), then spins: only being discarded can stop it.
    pytester.makepyfile(
        proj="""
        import os, signal
        from os import kill as alarm_from_outside  # os.kill in a task signals its child
        from celery import Celery

        app = Celery("proj", set_as_current=False)

        def fetch(n):
            return n

        @app.task(name="proj.spin", shared=False, time_limit=600)
        def spin():
            fetch(1)
            alarm_from_outside(os.getpid(), signal.SIGALRM)
            while True:
                pass
        """
    )
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\ntimeout = 300\n")
    pytester.makepyfile(
        test_it="""
        import threading
        import proj

        def test_spin(celery_faults):
            celery_faults.track("proj.fetch")
            celery_faults.run(proj.spin.s())

        def test_no_stack_left():
            assert [t.name for t in threading.enumerate() if "celery-faults" in t.name] == []
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--timeout-method=signal")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*Failed: Timeout*>300.0s*",  # pytest-timeout 2.2 and 2.4 word it differently
            "*celery_faults: task proj.spin[[]*[]] (delivery 1) was running after side effect "
            "1 (call proj.fetch) when the test was stopped*",
        ]
    )


def test_markers_reach_the_new_model(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        proj="""
        from celery import Celery

        app = Celery("proj", set_as_current=False)
        locks, charges, paid = {}, [], set()

        def take_lock(key):
            return locks.setdefault(key, "held") == "held" and key not in paid

        def charge(order):
            charges.append(order)

        @app.task(name="proj.charge_once", acks_late=True, shared=False)
        def charge_once(order):
            if order in paid:
                return "already paid"
            charge(order)
            paid.add(order)
        """
    )
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    pytester.makepyfile(
        test_it="""
        import pytest
        import proj

        @pytest.mark.celery_faults("overlap(12)")
        def test_interleaved_copies_charge_once(celery_faults):
            celery_faults.track("proj.charge")
            celery_faults.run(proj.charge_once.s(7))
            assert proj.charges == [7], "charged twice"
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*AssertionError: charged twice*"])


def reset_world() -> None:
    charges.clear()
    paid.clear()
    locks.clear()


def test_assert_idempotent_explores_every_interleaving(app: Celery) -> None:
    task = check_then_act(app, acks_late=True)
    with tracked(app) as faults, pytest.raises(AssertionError) as failure:
        faults.assert_idempotent(
            task.s(7), observe=lambda: list(charges), reset=reset_world, specs=["overlap"]
        )
    message = str(failure.value)
    assert "duplicated" in message
    assert "replay: celery_faults.run(signature, 'overlap(12" in message


def test_a_lock_guarded_task_passes_every_interleaving(app: Celery) -> None:
    task = lock_guarded(app, acks_late=True)
    with tracked(app) as faults:
        scenarios = faults.assert_idempotent(
            task.s(7), observe=lambda: list(charges), reset=reset_world, specs=["overlap"]
        )
    assert len(scenarios) > 1
    assert {scenario.verdict for scenario in scenarios} == {"ok"}
    assert all(scenario.spec.startswith("overlap(") for scenario in scenarios)


def test_a_replay_string_reproduces_its_interleaving(app: Celery) -> None:
    task = check_then_act(app, acks_late=True)
    with tracked(app) as faults:
        report = faults.sweep(
            task.s(7), observe=lambda: list(charges), reset=reset_world, hows=["overlap"]
        )
        failing = [s for s in report.scenarios if s.verdict == "duplicated"]
        assert failing
        for scenario in failing:
            faults.reset()
            reset_world()
            faults.run(task.s(7), scenario.replay)
            assert charges == [7, 7], scenario.replay


def test_a_frozen_stack_leaves_no_worker_state_on_the_test_thread(app: Celery) -> None:
    task = lock_guarded(app, acks_late=True, reject_on_worker_lost=True)
    with tracked(app) as faults:
        outcome = faults.run(task.s(1), "sigkill@2")
        assert faults.scheduler.stacks  # the killed child is still frozen here
        # result.get() is the test's, not a task's: Celery's join guard is off again
        assert task.AsyncResult(outcome.task_id).get(timeout=1) == "skipped"


class _RefusingWatcher:
    """An execution watcher (an integration) that refuses the second execution."""

    def __init__(self) -> None:
        self.seen = 0

    def started(self, execution: Any) -> None:
        self.seen += 1
        if self.seen == 2:
            raise RuntimeError("celery_faults: the integration cannot serve this execution")

    def ended(self, execution: Any, how: str) -> None:
        pass


def test_an_error_of_the_plugin_inside_an_execution_fails_instead_of_passing(
    app: Celery,
) -> None:
    from pytest_celery_faults import EmulationError

    @app.task(name="shop.pay", shared=False, acks_late=True)
    def pay(order: int) -> None:
        if order not in paid:
            paid.add(order)
            charge(order)

    with tracked(app) as faults:
        faults.effects.watchers.append(_RefusingWatcher())
        with pytest.raises(EmulationError) as failed:
            faults.assert_idempotent(pay.s(1), lambda: sorted(paid), paid.clear, ["redeliver"])
    message = str(failed.value)
    assert "\n" not in message
    assert message.startswith("celery_faults: the plugin failed inside shop.pay[")
    assert message.endswith(
        "(delivery 1) as it started, not the task: RuntimeError: the integration cannot "
        "serve this execution"
    )


def test_a_refusal_the_task_swallows_still_fails_the_test(app: Celery) -> None:
    from pytest_celery_faults import EmulationError

    @app.task(name="shop.total", shared=False)
    def total() -> int:
        return 3

    @app.task(name="shop.report", shared=False)
    def report() -> str:
        try:
            total.delay().get(disable_sync_subtasks=False)
        except Exception:  # the task's own blanket except hides the refusal
            return "swallowed"
        return "waited"

    with CeleryFaults(app) as faults, pytest.raises(EmulationError) as failed:
        faults.run(report.s(), "overlap")
    assert "as it waited for a result, not the task: RuntimeError: a task waited for a result" in (
        str(failed.value)
    )


# -- asyncio and time.sleep's own errors inside a body (#19.6) -------------------------


@pytest.mark.timeout(30)  # before: the loop's timer never came due on the virtual clock
@pytest.mark.parametrize("own_stack", [False, True], ids=["inline", "stack"])
def test_asyncio_sleeps_in_a_body_run_on_the_virtual_clock(app: Celery, own_stack: bool) -> None:
    import asyncio

    @app.task(shared=False, time_limit=60 if own_stack else None)
    def waits() -> list[float]:
        async def main() -> list[float]:
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.sleep(0.5)  # virtual
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.sleep(30), timeout=2)  # virtual
            return [loop.time() - started, time.time()]

        return asyncio.run(main())

    with CeleryFaults(app) as faults:
        real = time.monotonic()
        outcome = faults.run(waits.s())
        assert outcome.state == "SUCCESS", outcome.story
        waited, wall = outcome.result
        assert waited == pytest.approx(2.5)
        assert wall == pytest.approx(faults.clock.start + 2.5)
        assert faults.clock.elapsed == pytest.approx(2.5)
        assert time.monotonic() - real < 2.5  # no real waiting


@pytest.mark.timeout(30)  # before: NaN spun until the time limit, infinity returned
@pytest.mark.parametrize(
    ("seconds", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), OverflowError),
        (1e10, OverflowError),
        (-1, ValueError),
        ("1", TypeError),
    ],
)
def test_time_sleep_raises_pythons_own_errors_in_a_body(
    app: Celery, seconds: Any, error: type[Exception]
) -> None:
    @app.task(shared=False)
    def naps(seconds: Any) -> None:
        time.sleep(seconds)  # virtual: in the body, refused at once

    with CeleryFaults(app) as faults:
        outcome = faults.run(naps.s(seconds))
    assert (outcome.state, type(outcome.exception)) == ("FAILURE", error), outcome.story
    with pytest.raises(error) as raised:
        time.sleep(seconds)  # the real one raises at once: no wait, real or virtual
    assert str(outcome.exception) == str(raised.value)


def test_only_an_error_raised_in_the_plugin_s_code_is_its_own() -> None:
    """A Celery callback failing on what a task gave it fails so on a real worker too (logged)."""
    from kombu.exceptions import EncodeError
    from kombu.serialization import dumps

    from pytest_celery_faults import parse_spec
    from pytest_celery_faults.errors import raised_by_the_plugin

    with pytest.raises(EncodeError) as celery_side:
        dumps(object(), serializer="json")
    with pytest.raises(ValueError) as ours:
        parse_spec("sigkill@x")
    assert not raised_by_the_plugin(celery_side.value)
    assert raised_by_the_plugin(ours.value)
