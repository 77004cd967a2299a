"""Remote control (``app.control``) answered by the emulated workers, with Celery's handlers."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from celery import Celery
from recording import World

from pytest_celery_faults import CeleryFaults


@pytest.fixture
def no_polling_pause(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """kombu's virtual transport sleeps between polls while a client waits for replies."""
    from kombu.transport.virtual import base

    slept: list[float] = []
    monkeypatch.setattr(base, "sleep", slept.append)
    return slept


def test_ping_and_inspect_are_answered_by_each_worker_without_waiting(
    app: Celery, no_polling_pause: list[float]
) -> None:
    with CeleryFaults(app, workers=2):
        pongs = app.control.ping()
        inspect = app.control.inspect()
        answers = (inspect.active(), inspect.reserved(), inspect.scheduled(), inspect.revoked())
        one = app.control.inspect(destination=["celery@faults-2"]).ping()
    assert sorted(pongs, key=str) == [
        {"celery@faults-1": {"ok": "pong"}},
        {"celery@faults-2": {"ok": "pong"}},
    ]
    for answer in answers:
        assert answer == {"celery@faults-1": [], "celery@faults-2": []}
    assert one == {"celery@faults-2": {"ok": "pong"}}
    assert no_polling_pause == []  # no reply was waited for: each was there already


def test_remote_control_works_in_the_next_harness_and_after_the_last(app: Celery) -> None:
    # kombu's Mailbox keeps the producer pool of its first use: the harness's, closed at
    # its stop. The next harness on the app (the next test) must get a pool that works,
    # and the app after it its own again (it raised "Acquire on closed pool").
    with CeleryFaults(app):
        app.control.ping()
        harness_pool = app.control.mailbox.producer_pool
    with CeleryFaults(app):
        assert app.control.ping() == [{"celery@faults-1": {"ok": "pong"}}]
        assert app.control.mailbox.producer_pool is not harness_pool
    assert app.control.mailbox.producer_pool is app.amqp.producer_pool  # the app's own


def test_a_task_revoked_before_it_runs_is_skipped_as_revoked(app: Celery, world: World) -> None:
    @app.task(name="tests.charge", shared=False)
    def charge() -> None:
        world.touch("charged")

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        result = charge.delay()
        app.control.revoke(result.id)
        revoked = app.control.inspect().revoked()
        [outcome] = faults.drain()
    assert revoked == {"celery@faults-1": [result.id]}
    assert (outcome.state, outcome.executions, outcome.acked) == ("REVOKED", 0, True)
    assert repr(outcome.exception) == "TaskRevokedError('revoked')"
    assert "revoked: celery@faults-1 discards it on receipt" in str(outcome.timeline)
    assert world.log == []


def test_inspect_from_a_task_sees_itself_active_and_the_rest_held(app: Celery) -> None:
    seen: dict[str, Any] = {}

    @app.task(name="tests.guard", bind=True, shared=False)
    def guard(self: Any) -> None:
        inspect = app.control.inspect()
        seen["active"] = [r["id"] for r in inspect.active()["celery@faults-1"]]
        seen["reserved"] = [r["id"] for r in inspect.reserved()["celery@faults-1"]]
        seen["scheduled"] = [s["request"]["id"] for s in inspect.scheduled()["celery@faults-1"]]

    @app.task(name="tests.other", shared=False)
    def other() -> None:
        pass

    with CeleryFaults(app) as faults:
        running = guard.delay()
        waiting = other.delay()
        later = other.apply_async(countdown=60)
        faults.drain()
        after = app.control.inspect().active()
    assert seen == {"active": [running.id], "reserved": [waiting.id], "scheduled": [later.id]}
    assert after == {"celery@faults-1": []}


def _worker_pair(app: Celery, how: str, world: World) -> tuple[Any, Any]:
    app.conf.worker_concurrency = 2

    @app.task(name="tests.long", shared=False)
    def long() -> None:
        try:
            for step in range(3):
                world.touch(f"step {step}")
                time.sleep(10)  # virtual
        finally:
            world.touch("cleanup")

    @app.task(name="tests.stopper", shared=False)
    def stopper(task_id: str) -> None:
        time.sleep(5)  # virtual: the long task sleeps in its first 10 s meanwhile
        app.control.revoke(task_id, terminate=True, signal=how)

    return long, stopper


@pytest.mark.parametrize(
    ("how", "log"),
    [
        ("SIGKILL", ["step 0"]),  # killed where it stands: nothing more runs
        ("SIGTERM", ["step 0", "cleanup"]),  # billiard's handler raises SystemExit: it unwinds
    ],
)
def test_revoke_with_terminate_kills_the_child_running_the_task(
    app: Celery, how: str, log: list[str], world: World
) -> None:
    long, stopper = _worker_pair(app, how, world)
    with CeleryFaults(app, seed=1) as faults:
        faults.track((world, "touch"))
        target = long.delay()
        stopper.delay(target.id)
        faults.drain()
        outcome = faults.outcome(target.id)
    assert world.log == log
    assert (outcome.state, outcome.acked, outcome.deliveries) == ("REVOKED", True, 1)
    assert repr(outcome.exception) == "TaskRevokedError('terminated')"
    assert f"child terminated by remote control ({how})" in str(outcome.timeline)


def test_a_task_that_terminates_itself_unwinds_on_sigterm(app: Celery, world: World) -> None:
    @app.task(name="tests.quitter", bind=True, shared=False)
    def quitter(self: Any) -> None:
        try:
            world.touch("before")
            app.control.revoke(self.request.id, terminate=True)
            world.touch("after")  # the signal lands first
        finally:
            world.touch("cleanup")

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        outcome = faults.run(quitter.s())
    assert world.log == ["before", "cleanup"]
    assert (outcome.state, outcome.acked) == ("REVOKED", True)


@pytest.mark.parametrize(("state_db", "ran"), [(False, True), (True, False)])
def test_revoked_ids_live_in_the_worker_memory_unless_worker_state_db_keeps_them(
    app: Celery, tmp_path: Any, state_db: bool, ran: bool, world: World
) -> None:
    app.conf.worker_prefetch_multiplier = 1  # the second message stays in the broker
    if state_db:
        app.conf.worker_state_db = str(tmp_path / "worker.state")

    @app.task(name="tests.first", shared=False)
    def first() -> None:
        world.touch("first")

    @app.task(name="tests.second", shared=False)
    def second() -> None:
        world.touch("second")

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        faults.inject("tests.first:warm_shutdown@0")  # the worker stops cleanly, then restarts
        first.delay()
        result = second.delay()
        app.control.revoke(result.id)
        faults.drain()
        outcome = faults.outcome(result.id)
    assert ("second" in world.log) is ran
    assert outcome.state == ("SUCCESS" if ran else "REVOKED")


def test_a_revoked_id_is_known_only_to_the_workers_that_got_the_broadcast(
    app: Celery, world: World
) -> None:
    @app.task(name="tests.noop", shared=False)
    def noop() -> None:
        world.touch("ran")

    with CeleryFaults(app, workers=2) as faults:
        faults.track((world, "touch"))
        faults.workers[1].die()  # celery@faults-2 is down when the revoke goes out
        app.control.revoke("some-task-id")
        faults.workers[1].restart()
        revoked = app.control.inspect().revoked()
    assert revoked == {"celery@faults-1": ["some-task-id"], "celery@faults-2": []}


def test_shutdown_stops_the_worker_warmly(app: Celery) -> None:
    with CeleryFaults(app) as faults:
        app.control.shutdown()
        alive = faults.workers[0].alive
        pongs = app.control.ping()
    assert (alive, pongs) == (False, [])


# -- recycling: worker_max_tasks_per_child, worker_max_memory_per_child ---------------

_child_local = threading.local()


def _counting_task(app: Celery) -> Any:
    @app.task(name="tests.count", shared=False)
    def count() -> int:
        """How many tasks this child ran before, as a thread-local counter says."""
        _child_local.runs = getattr(_child_local, "runs", 0) + 1
        return int(_child_local.runs)

    return count


def test_a_child_is_recycled_after_worker_max_tasks_per_child_tasks(app: Celery) -> None:
    app.conf.worker_max_tasks_per_child = 2
    count = _counting_task(app)
    _child_local.runs = 100  # what the test's thread holds: no child has any of it
    with CeleryFaults(app) as faults:
        runs = [faults.run(count.s()).result for _ in range(5)]
        timeline = str(faults.timeline)
    assert runs == [1, 2, 1, 2, 1]  # a thread-local kept by a child, empty in its successor
    assert timeline.count("child recycled after 2 task(s) (worker_max_tasks_per_child=2)") == 2


def test_each_of_several_children_is_recycled_on_its_own_count(app: Celery) -> None:
    app.conf.worker_max_tasks_per_child = 1
    app.conf.worker_concurrency = 2
    count = _counting_task(app)
    with CeleryFaults(app, seed=4) as faults:
        results = [count.delay() for _ in range(4)]
        faults.drain()
        runs = [faults.outcome(result.id).result for result in results]
    assert runs == [1, 1, 1, 1]


def test_a_child_over_worker_max_memory_per_child_is_recycled(app: Celery) -> None:
    app.conf.worker_max_memory_per_child = 1  # kB: any process is over it
    count = _counting_task(app)
    with CeleryFaults(app) as faults:
        runs = [faults.run(count.s()).result for _ in range(3)]
        timeline = str(faults.timeline)
    assert runs[1:] == [1, 1]
    assert "kB > worker_max_memory_per_child=1)" in timeline


@pytest.mark.parametrize("value", ["2", -1, 2.5, True])
def test_a_bad_per_child_limit_is_refused_in_one_line(app: Celery, value: Any) -> None:
    app.conf.worker_max_tasks_per_child = value
    with pytest.raises(ValueError) as refused:
        CeleryFaults(app).start()
    assert str(refused.value) == (
        f"worker_max_tasks_per_child={value!r}: expected a whole number >= 1, or None for no limit"
    )
    assert app.conf.broker_url == "memory://"  # nothing was changed


def test_the_rate_limit_command_spaces_starts_from_then_on(app: Celery) -> None:
    @app.task(name="tests.tick", shared=False)
    def tick() -> None:
        pass

    with CeleryFaults(app) as faults:
        replies = app.control.rate_limit("tests.tick", "6/m", reply=True)
        results = [tick.delay() for _ in range(3)]
        faults.drain()
        elapsed = faults.clock.elapsed
    assert replies == [{"celery@faults-1": {"ok": "new rate limit set successfully"}}]
    assert [faults.outcome(r.id).state for r in results] == ["SUCCESS"] * 3
    assert elapsed == 20.0  # one start every 10 virtual seconds


def test_a_worker_that_lost_power_lists_none_of_its_dead_tasks_as_active(
    app: Celery, world: World
) -> None:
    @app.task(name="tests.look", bind=True, acks_late=True, shared=False)
    def look(self: Any) -> list[str]:
        world.touch("looked")
        return [r["id"] for r in app.control.inspect().active()["celery@faults-1"]]

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        outcome = faults.run(look.s(), "power_loss@1")
    assert outcome.deliveries == 2
    assert outcome.result == [outcome.task_id]  # the redelivery, not also the dead copy


def test_a_task_alone_that_kills_its_own_child_is_frozen_too(app: Celery, world: World) -> None:
    """Every execution runs on a child's thread: one alone is frozen as one beside others."""

    @app.task(name="tests.self_kill", bind=True, shared=False)
    def self_kill(self: Any) -> None:
        try:
            app.control.revoke(self.request.id, terminate=True, signal="SIGKILL")
        except BaseException:  # nothing reaches the task: its child is gone
            world.touch("swallowed")
        world.touch("after")

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        outcome = faults.run(self_kill.s())
        log = list(world.log)
    assert log == []
    assert (outcome.state, outcome.acked, outcome.executions) == ("REVOKED", True, 1)


def test_a_remote_sigterm_runs_the_handler_a_task_installed_in_its_child(
    app: Celery, world: World
) -> None:
    import signal

    app.conf.worker_concurrency = 2

    @app.task(name="tests.installs", shared=False)
    def installs() -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: world.touch("handled"))

    @app.task(name="tests.waits", shared=False)
    def waits() -> str:
        time.sleep(10)  # virtual
        world.touch("went on")
        return "done"

    @app.task(name="tests.terminates", shared=False)
    def terminates(task_id: str) -> None:
        time.sleep(1)  # virtual
        app.control.revoke(task_id, terminate=True)

    with CeleryFaults(app, seed=1) as faults:
        faults.track((world, "touch"))
        faults.run(installs.s())
        target = waits.delay()
        terminates.delay(target.id)
        faults.drain()
        log = list(world.log)
    assert "handled" in log
    assert "went on" in log  # the handler returned: the child goes on


def test_a_task_on_a_stack_of_its_own_that_kills_its_child_is_frozen(
    app: Celery, world: World
) -> None:
    app.conf.worker_concurrency = 2  # every execution on a stack of its own

    @app.task(name="tests.self_kill", bind=True, shared=False)
    def self_kill(self: Any) -> None:
        try:
            world.touch("before")
            app.control.revoke(self.request.id, terminate=True, signal="SIGKILL")
            world.touch("after")
        finally:
            world.touch("cleanup")

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        outcome = faults.run(self_kill.s())
        log = list(world.log)
    assert log == ["before"]
    assert (outcome.state, outcome.acked, outcome.executions) == ("REVOKED", True, 1)


def test_terminating_a_task_accepted_but_not_yet_run_ends_it_before_its_body(
    app: Celery, world: World
) -> None:
    @app.task(name="tests.watcher", shared=False)
    def watcher(task_id: str) -> None:
        app.control.revoke(task_id, terminate=True)

    @app.task(name="tests.plain", shared=False)
    def plain() -> None:
        world.touch("ran")

    with CeleryFaults(app, workers=2, seed=2) as faults:
        faults.track((world, "touch"))
        target = plain.s().freeze()
        watcher.delay(target.id)
        plain.apply_async(task_id=target.id)
        faults.drain()
        outcome = faults.outcome(target.id)
    # seed 2: the watcher runs first, while its twin worker's child holds the job
    assert "child terminated by remote control (SIGTERM)" in str(outcome.timeline)
    assert (outcome.state, world.log) == ("REVOKED", [])
