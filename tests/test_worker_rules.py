"""The worker's own rules: where a real prefork worker behaves one way, so does the harness."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery import Celery
from recording import World

from pytest_celery_faults import CeleryFaults, FaultSpecError


class StatementFailed(Exception):
    """Built like SQLAlchemy's ``OperationalError(statement, params, orig)``."""

    def __init__(self, statement: str, params: Any, orig: BaseException | None) -> None:
        super().__init__(statement, params, orig)
        self.statement, self.params, self.orig = statement, params, orig


class NeedsKeyword(Exception):
    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


def test_raise_builds_an_exception_whose_constructor_needs_more_than_a_message(
    app: Celery,
    world: World,
) -> None:
    @app.task(name="tests.query", shared=False, autoretry_for=(StatementFailed,))
    def query() -> str:
        world.touch("select")
        return "rows"

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        outcome = faults.run(query.s(), f"raise({__name__}.StatementFailed)@0")
    # The injected error is the one the task retries on: it was built, not a TypeError.
    assert (outcome.state, outcome.result, outcome.retries) == ("SUCCESS", "rows", 1)
    assert world.log == ["select"]


def test_raise_refuses_an_exception_it_cannot_build_when_armed(app: Celery) -> None:
    with CeleryFaults(app, check_unfired=False) as faults:
        with pytest.raises(FaultSpecError) as raised:
            faults.inject(f"raise({__name__}.NeedsKeyword)@0")
        assert faults.plan.armed == []
    message = str(raised.value)
    assert message.startswith(
        f"invalid fault spec 'raise({__name__}.NeedsKeyword)@0': cannot build "
        f"{__name__}.NeedsKeyword for raise(...) (TypeError: "
    )
    assert "missing 1 required keyword-only argument: 'code'" in message
    assert "\n" not in message


# -- what a prefork child sets up -------------------------------------------------


def test_result_get_inside_a_task_raises_as_in_a_worker(app: Celery) -> None:
    from celery._state import task_join_will_block

    @app.task(name="tests.child", shared=False)
    def child() -> int:
        return 1

    @app.task(name="tests.parent", shared=False)
    def parent() -> int:
        return int(child.delay().get())

    with CeleryFaults(app) as faults:
        outcome = faults.run(parent.s())
        assert child.delay().get() == 1  # the test itself may wait on results
    assert outcome.state == "FAILURE"
    assert type(outcome.exception) is RuntimeError
    assert str(outcome.exception).startswith("Never call result.get() within a task!\n")
    assert task_join_will_block() is False  # set only while an execution runs


def test_request_hostname_is_the_worker_node_name(app: Celery) -> None:
    @app.task(name="tests.where", bind=True, shared=False)
    def where(self: Any) -> str:
        return str(self.request.hostname)

    with CeleryFaults(app, workers=2, seed=3) as faults:
        outcome = faults.run(where.s())
    consumer = faults.ledger.for_task(outcome.task_id)[1].consumer
    assert outcome.result in ("celery@faults-1", "celery@faults-2")
    assert consumer is not None and consumer.startswith(f"{outcome.result}#")


def test_an_expired_message_is_revoked_as_expired(app: Celery, world: World) -> None:
    from celery import signals

    @app.task(name="tests.late", shared=False)
    def late() -> None:
        world.touch("ran")

    revoked: list[dict[str, Any]] = []

    def on_revoked(**kwargs: Any) -> None:
        revoked.append({key: kwargs[key] for key in ("expired", "terminated", "signum")})

    signals.task_revoked.connect(on_revoked, weak=False)
    try:
        with CeleryFaults(app) as faults:
            result = late.apply_async(countdown=120, expires=60)
            [outcome] = faults.drain()
    finally:
        signals.task_revoked.disconnect(on_revoked)
    assert outcome.task_id == result.id
    assert (outcome.state, outcome.executions, outcome.acked) == ("REVOKED", 0, True)
    assert repr(outcome.exception) == "TaskRevokedError('expired')"
    assert revoked == [{"expired": True, "terminated": False, "signum": None}]
    assert world.log == []


# -- time limits --------------------------------------------------------------------


def test_timeout_on_a_task_without_a_hard_limit_is_refused(app: Celery, world: World) -> None:
    @app.task(name="tests.unlimited", shared=False, soft_time_limit=5)
    def unlimited() -> None:
        world.touch("work")

    with CeleryFaults(app, check_unfired=False) as faults:
        faults.track((world, "touch"))
        with pytest.raises(FaultSpecError) as raised:
            faults.run(unlimited.s(), "timeout@1")
    assert str(raised.value) == (
        "timeout@1 cannot fire on task tests.unlimited: it has no hard time limit "
        "(time_limit on the task, task_time_limit in the app's settings, or "
        "apply_async(time_limit=...)), so a worker never stops it for time; set one, "
        "or use sigkill@1"
    )


def test_timeout_uses_the_limit_from_the_app_settings(app: Celery, world: World) -> None:
    app.conf.task_time_limit = 30

    @app.task(name="tests.limited", shared=False)
    def limited() -> None:
        world.touch("work")

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        outcome = faults.run(limited.s(), "timeout@1")
    assert outcome.state == "FAILURE"
    assert repr(outcome.exception) == "TimeLimitExceeded(30)"


def test_soft_timeout_at_zero_fires_inside_the_body_where_it_can_be_caught(
    app: Celery,
    world: World,
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    @app.task(name="tests.careful", shared=False, soft_time_limit=5)
    def careful() -> str:
        try:
            world.touch("work")
        except SoftTimeLimitExceeded:
            return "stopped cleanly"
        return "done"

    with CeleryFaults(app) as faults:
        faults.track((world, "touch"))
        outcome = faults.run(careful.s(), "soft_timeout@0")
    assert (outcome.state, outcome.result) == ("SUCCESS", "stopped cleanly")
    assert world.log == []


# -- the app's configuration --------------------------------------------------------


def test_a_task_that_changes_the_app_configuration_does_not_leak_it(app: Celery) -> None:
    app.conf.result_expires = 60

    @app.task(name="tests.reconfigure", shared=False)
    def reconfigure() -> None:
        app.conf.result_expires = 5
        app.conf.update(task_acks_late=True, my_own_setting="x")

    app.finalize()
    before = dict(app.conf.changes)
    with CeleryFaults(app) as faults:
        faults.run(reconfigure.s())
        assert app.conf.task_acks_late is True
    assert dict(app.conf.changes) == before
    assert app.conf.task_acks_late is False and app.conf.result_expires == 60


def test_a_second_harness_on_the_same_app_is_refused_in_one_line(app: Celery) -> None:
    @app.task(name="tests.one", shared=False)
    def one() -> int:
        return 1

    with CeleryFaults(app) as outer:
        with pytest.raises(RuntimeError) as raised:
            CeleryFaults(app).start()
        assert outer.run(one.s()).result == 1  # the first harness still holds the app
    assert str(raised.value) == (
        f"celery_faults: the app {app.main!r} already runs under another active harness; "
        "stop that one first (two harnesses on one app cannot overlap)"
    )
    with CeleryFaults(app) as after:  # and once it is stopped, the app is free again
        assert after.run(one.s()).result == 1


# -- the seed -----------------------------------------------------------------------


def test_retry_jitter_draws_from_the_seed(app: Celery) -> None:
    import random

    @app.task(
        name="tests.flaky",
        shared=False,
        autoretry_for=(ConnectionError,),
        max_retries=3,
        retry_backoff=1000,
        retry_backoff_max=100_000,
        retry_jitter=True,
    )
    def flaky() -> None:
        raise ConnectionError("down")

    def delays(seed: int, global_seed: int) -> float:
        random.seed(global_seed)  # what the rest of the test suite did to `random`
        with CeleryFaults(app, seed=seed) as faults:
            outcome = faults.run(flaky.s())
            assert outcome.retries == 3
            return faults.clock.elapsed

    assert delays(1, global_seed=10) == delays(1, global_seed=20)
    assert delays(1, global_seed=10) != delays(2, global_seed=10)


def test_events_at_one_virtual_instant_order_the_same_whatever_the_wall_clock(
    app: Celery, monkeypatch: pytest.MonkeyPatch, world: World
) -> None:
    """A countdown equal to Redis's visibility timeout: the restore and the ETA meet."""
    from types import SimpleNamespace

    from pytest_celery_faults.engine import clock

    app.conf.broker_transport_options = {"visibility_timeout": 10}

    @app.task(name="tests.at_ten", shared=False, acks_late=True)
    def at_ten() -> None:
        world.touch("ran")

    def fate(wall_clock: float) -> tuple[int, list[str]]:
        wall = SimpleNamespace(time=lambda: wall_clock, monotonic=time.monotonic, sleep=time.sleep)
        monkeypatch.setattr(clock, "time", wall)
        with CeleryFaults(app, profile="redis") as faults:
            result = at_ten.apply_async(countdown=10)
            faults.drain()
            outcome = faults.outcome(result.id)
        story = [str(entry).replace(outcome.task_id[:8], "ID") for entry in outcome.timeline]
        return outcome.executions, story

    # the microsecond a datetime keeps of the start rounds down in one, up in the other
    assert fate(1_700_000_000.0000004) == fate(1_700_000_000.0000006) == fate(1_700_000_000.5)


# -- a task's own BaseException, and the test run's interruptions ---------------------

BASE_EXCEPTION_PROJECT = """
import signal
# Ctrl-C comes from outside the task: signal.raise_signal in a task signals its
# emulated child, so the real function is bound before the harness patches it.
from signal import raise_signal as ctrl_c_from_outside

import pytest
from celery import Celery

app = Celery("proj", set_as_current=False)


@app.task(name="proj.ctrl_c", shared=False)
def ctrl_c():
    raise KeyboardInterrupt("from the task")


@app.task(name="proj.generator_exit", shared=False)
def generator_exit():
    raise GeneratorExit("from the task")


@app.task(name="proj.skips", shared=False)
def skips():
    pytest.skip(reason="from the task")


@app.task(name="proj.fails", shared=False)
def fails():
    pytest.fail("from the task")


@app.task(name="proj.interrupted", shared=False)
def interrupted():
    ctrl_c_from_outside(signal.SIGINT)  # what Ctrl-C on the test run does
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(proj=BASE_EXCEPTION_PROJECT)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    return pytester


def test_a_base_exception_raised_by_a_task_ends_failure_as_in_a_worker(
    project: pytest.Pytester,
) -> None:
    """Measured on a prefork worker (Celery 5.7, billiard 4.3.2, Redis); billiard 4.2 read.

    billiard 4.2's workloop catches only ``Exception``: anything else the task
    raises ends the child with exit code 0 and no result (``Worker.__call__``,
    ``_do_exit``), and the pool reports the job's worker lost.
    """
    project.makepyfile(
        test_it="""
        from importlib.metadata import version

        import proj

        ESCAPES = version("billiard").startswith("4.2.")

        def lost(job):
            return f"WorkerLostError('Worker exited prematurely: exitcode 0 Job: {job}.')"

        def fate(celery_faults, task):
            outcome = celery_faults.run(task.s())
            return outcome.state, repr(outcome.exception)

        def test_keyboard_interrupt(celery_faults):
            assert fate(celery_faults, proj.ctrl_c) == (
                "FAILURE",
                lost(0) if ESCAPES
                else "WorkerLostError('Worker exited prematurely: KeyboardInterrupt.')",
            )

        def test_generator_exit(celery_faults):
            assert fate(celery_faults, proj.generator_exit) == (
                "FAILURE", lost(0) if ESCAPES else "GeneratorExit('from the task')"
            )

        def test_pytest_outcomes_do_not_pickle_back_to_the_worker(celery_faults):
            for job, task in enumerate((proj.skips, proj.fails)):
                outcome = celery_faults.run(task.s())
                assert outcome.state == "FAILURE"
                if ESCAPES:
                    assert repr(outcome.exception) == lost(job)
                    continue
                assert type(outcome.exception).__name__ == "MaybeEncodingError"
                assert "attribute lookup" in str(outcome.exception)

        def test_the_session_goes_on():
            pass
        """
    )
    project.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=4)


def test_ctrl_c_during_a_task_still_stops_the_test_run(project: pytest.Pytester) -> None:
    project.makepyfile(
        # A test run started as a shell's background job ignores SIGINT (Ctrl-C cannot
        # stop it, and a raised SIGINT does nothing): this run takes Python's default,
        # as a run in a terminal has it, wherever the suite itself was started.
        test_it="import signal\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n\n"
        "def test_interrupted(celery_faults):\n"
        "    celery_faults.run(__import__('proj').interrupted.s())\n\n"
        "def test_never_reached():\n    pass\n"
    )
    result = project.runpytest_subprocess("-p", "no:randomly")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["*KeyboardInterrupt*"])
    # nothing passed, not even the test after it (the last line may count warnings:
    # Celery 5.3 warns about utcnow on Python 3.12)
    assert " passed" not in result.stdout.lines[-1], result.stdout.lines[-1]


def test_one_seed_gives_the_same_report_byte_for_byte(pytester: pytest.Pytester) -> None:
    """Jitter, a restore meeting an ETA, and a chord's poller: all from the seed."""
    pytester.makepyfile(
        proj="""
        from celery import Celery, chord

        app = Celery("proj", set_as_current=False)
        app.conf.broker_transport_options = {"visibility_timeout": 10}


        @app.task(name="proj.flaky", shared=False, autoretry_for=(ConnectionError,),
                  max_retries=2, retry_backoff=1000, retry_jitter=True)
        def flaky(attempts=[]):
            attempts.append(1)
            if len(attempts) % 3:
                raise ConnectionError("down")


        @app.task(name="proj.at_ten", shared=False, acks_late=True)
        def at_ten():
            return 10


        @app.task(name="proj.add", shared=False)
        def add(x, y):
            return x + y


        @app.task(name="proj.total", shared=False)
        def total(xs):
            return sum(xs)
        """
    )
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    pytester.makepyfile(
        test_it="""
        import pytest
        import proj

        def test_jitter(celery_faults):
            celery_faults.run(proj.flaky.s())

        @pytest.mark.celery_faults(profile="redis")
        def test_restore_meets_eta(celery_faults):
            proj.at_ten.apply_async(countdown=10)
            celery_faults.drain()

        def test_chord(celery_faults):
            celery_faults.run(proj.chord([proj.add.s(1, 1), proj.add.s(2, 2)], proj.total.s()))
        """
    )
    reports = []
    for run in (1, 2):
        path = pytester.path / f"report{run}.json"
        result = pytester.runpytest_subprocess(
            "-p", "no:randomly", "--celery-faults-seed=7", f"--celery-faults-report={path}"
        )
        result.assert_outcomes(passed=3)
        reports.append(path.read_bytes())
    assert reports[0] == reports[1]
    assert b'"warnings": []' in reports[0] and b"celery.chord_unlock" in reports[0]
