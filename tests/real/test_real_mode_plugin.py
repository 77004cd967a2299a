"""--celery-faults-broker: every run() is checked against a real worker."""

from __future__ import annotations

import sys
from typing import Any

import pytest
from celery import Celery

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults.real.compare import check
from pytest_celery_faults.real.runner import (
    BrokerUnreachable,
    DeliveryView,
    RealOutcome,
    check_reachable,
)

pytestmark = pytest.mark.real_broker

APP = """
import os

from celery import Celery

app = Celery("proj", set_as_current=False)
app.conf.task_create_missing_queues = False


def effect():
    pass


@app.task(name="proj.job", reject_on_worker_lost=True, shared=False)
def job():
    effect()
    effect()
    return "ok"


@app.task(name="proj.quiet", acks_late=True, ignore_result=True, shared=False)
def quiet():
    effect()


LOCK = os.path.join(os.path.dirname(__file__), "lock")


@app.task(name="proj.locked", shared=False)
def locked():
    if os.path.exists(LOCK):
        return "skipped"
    open(LOCK, "w").close()
    return "done"
"""


def run_with_broker(
    pytester: pytest.Pytester, url: str, test: str, *options: str
) -> pytest.RunResult:
    pytester.makepyfile(proj=APP)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    pytester.makepyfile(test_it=test)
    return pytester.runpytest_subprocess(
        "-p", "no:randomly", f"--celery-faults-broker={url}", *options
    )


@pytest.mark.parametrize("runner", ["rabbitmq"], indirect=True)
def test_runs_are_checked_on_a_real_worker(pytester: pytest.Pytester, runner: Any) -> None:
    result = run_with_broker(
        pytester,
        runner.broker_url,
        """
        import proj

        def test_job(celery_faults):
            celery_faults.track("proj.effect")
            proj.job.acks_late = True
            outcome = celery_faults.run(proj.job.s(), "sigkill@1")
            assert (outcome.executions, outcome.state) == (2, "SUCCESS")
        """,
    )
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("runner", ["rabbitmq"], indirect=True)
def test_marker_specs_the_tests_settings_and_ignored_results_reach_the_worker(
    pytester: pytest.Pytester, runner: Any
) -> None:
    """Without the monkeypatched acks_late on the worker, the real task would be lost."""
    result = run_with_broker(
        pytester,
        runner.broker_url,
        """
        import pytest
        import proj

        @pytest.mark.celery_faults("sigkill@1")
        def test_job(celery_faults, monkeypatch):
            celery_faults.track("proj.effect")
            monkeypatch.setattr(proj.job, "acks_late", True)
            outcome = celery_faults.run(proj.job.s())
            assert (outcome.executions, outcome.state) == (2, "SUCCESS")

        def test_quiet(celery_faults):
            celery_faults.track("proj.effect")
            outcome = celery_faults.run(proj.quiet.s(), "ack_lost")
            assert (outcome.executions, outcome.state) == (2, "PENDING")
        """,
    )
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize("runner", ["redis"], indirect=True)
def test_suite_wide_specs_reach_the_worker(pytester: pytest.Pytester, runner: Any) -> None:
    """Without the redelivery on the real broker, the real task would run once."""
    result = run_with_broker(
        pytester,
        runner.broker_url,
        """
        import proj

        def test_job(celery_faults):
            celery_faults.track("proj.effect")
            outcome = celery_faults.run(proj.job.s())
            assert (outcome.executions, outcome.faults) == (2, ["redeliver"])
        """,
        "--celery-faults=proj.job:redeliver",
    )
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("runner", ["redis"], indirect=True)
def test_a_fault_a_real_worker_cannot_have_is_refused_in_one_line(
    pytester: pytest.Pytester, runner: Any
) -> None:
    result = run_with_broker(
        pytester,
        runner.broker_url,
        """
        import proj

        def test_job(celery_faults):
            celery_faults.run(proj.job.s(), "timeout@1")

        def test_cold(celery_faults):
            celery_faults.run(proj.job.s(), "proj.job:cold_shutdown@2")

        def test_warm(celery_faults):
            celery_faults.run(proj.quiet.s(), "warm_shutdown@1")
        """,
    )
    result.assert_outcomes(failed=3)
    result.stdout.fnmatch_lines(
        [
            "E *RealModeRefused: real-broker mode cannot run this: timeout@1: a real worker "
            "only times a task out under its time_limit, and proj.job has none "
            "(set time_limit= on the task or task_time_limit)",
            "E *RealModeRefused: real-broker mode cannot run this: proj.job:cold_shutdown@2: "
            "a real worker's cold shutdown (SIGQUIT to its main process) did not reliably cut *",
            "E *RealModeRefused: real-broker mode cannot run this: warm_shutdown@1: whether "
            "proj.quiet's late ack gets out during a real warm shutdown is a race (measured "
            "both ways on Celery 5.7), so a real worker cannot check the emulation there",
        ]
    )
    result.stdout.no_fnmatch_line("*disagrees*")


ISOLATED = """
import os

import pytest

import proj


@pytest.fixture
def celery_faults_real_isolation():
    def save():
        existed = os.path.exists(proj.LOCK)

        def restore():
            if not existed and os.path.exists(proj.LOCK):
                os.remove(proj.LOCK)

        return restore

    return save if os.environ.get("ISOLATE") else None


def test_locked(celery_faults):
    outcome = celery_faults.run(proj.locked.s())
    assert outcome.result == "done"
"""


@pytest.mark.parametrize("runner", ["rabbitmq"], indirect=True)
@pytest.mark.parametrize("isolate", [True, False], ids=["isolated", "shared-state"])
def test_the_real_run_and_the_emulated_run_do_not_see_each_others_state(
    pytester: pytest.Pytester, runner: Any, monkeypatch: pytest.MonkeyPatch, isolate: bool
) -> None:
    monkeypatch.setenv("ISOLATE", "1" if isolate else "")
    result = run_with_broker(pytester, runner.broker_url, ISOLATED)
    if isolate:
        result.assert_outcomes(passed=1)
    else:  # the lock the real run took sends the emulated run down another path
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "*result: real 'done', emulated 'skipped'",
                "*(the emulated run started from the state the real run left: if the task "
                "reads external state, say how to put it back with the "
                "celery_faults_real_isolation fixture)",
            ]
        )


def test_an_unreachable_broker_is_named(pytester: pytest.Pytester) -> None:
    url = "amqp://guest:guest@127.0.0.1:1//"
    result = run_with_broker(
        pytester,
        url,
        """
        import proj

        def test_job(celery_faults):
            celery_faults.run(proj.job.s())
        """,
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*--celery-faults-broker: the broker at {url} does not answer*"])


def test_a_missing_client_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis now fails
    with pytest.raises(BrokerUnreachable) as raised:
        check_reachable("redis://127.0.0.1:6379/0")
    assert str(raised.value) == (
        "redis://127.0.0.1:6379/0 needs the 'redis' client library: "
        "pip install 'pytest-celery-faults[redis]'"
    )


class Runner:
    broker_url = "amqp://example//"


def test_a_disagreement_names_each_difference(app: Celery) -> None:
    @app.task(name="tests.once", shared=False)
    def once() -> str:
        return "ok"

    with CeleryFaults(app) as faults:
        emulated = faults.run(once.s(), "redeliver")
        real = RealOutcome(
            emulated.task_id,
            1,
            "SUCCESS",
            None,
            [False],
            False,
            result="ok",
            deliveries=[DeliveryView(True, [])],
            name="tests.once",
        )
        with pytest.raises(AssertionError) as raised:
            check(Runner(), faults, [real], [emulated], ["redeliver"])  # type: ignore[arg-type]
    message = str(raised.value)
    assert message.startswith(
        "the real worker on amqp://example// disagrees with the emulation under 'redeliver':\n"
        f"  tests.once[{emulated.task_id}]:\n"
        "    executions: real 1, emulated 2\n"
        "    did not fire on the real worker: redeliver\n"
        "    deliveries: real [(True, [])], emulated [(True, []), (True, [])]\n"
        "  real records:\n"
    ), message


@pytest.mark.parametrize("runner", ["rabbitmq"], indirect=True)
def test_every_scenario_of_assert_idempotent_is_compared_on_the_real_worker(
    pytester: pytest.Pytester, runner: Any
) -> None:
    """Only the fault-free run was compared: the scenarios ran copies the worker never saw."""
    result = run_with_broker(
        pytester,
        runner.broker_url,
        """
        import os

        import proj


        def reset():
            if os.path.exists(proj.LOCK):
                os.remove(proj.LOCK)


        def test_compared(celery_faults, _celery_faults_real_runner):
            celery_faults.track("proj.effect")
            proj.job.acks_late = True
            before = _celery_faults_real_runner.scenarios
            scenarios = celery_faults.assert_idempotent(
                proj.job.s(), lambda: 0, specs=["sigkill@1", "redeliver"]
            )
            assert [s.verdict for s in scenarios] == ["ok", "ok"]
            assert _celery_faults_real_runner.scenarios - before == 3  # the baseline and each

        def test_the_world_is_reset_between_the_real_and_the_emulated_run(
            celery_faults, _celery_faults_real_runner
        ):
            reset()
            before = _celery_faults_real_runner.scenarios
            scenarios = celery_faults.assert_idempotent(
                proj.locked.s(), lambda: os.path.exists(proj.LOCK), reset, specs=["redeliver"]
            )
            assert [s.outcome.result for s in scenarios] == ["done"]
            assert _celery_faults_real_runner.scenarios - before == 2

        def test_a_sweep_refuses_up_front_what_a_real_worker_cannot_run(
            celery_faults, _celery_faults_real_runner
        ):
            import pytest
            from pytest_celery_faults.real.plan import RealModeRefused

            before = _celery_faults_real_runner.scenarios
            with pytest.raises(RealModeRefused) as cold:
                celery_faults.sweep(proj.job.s(), lambda: 0)
            with pytest.raises(RealModeRefused) as overlap:
                celery_faults.sweep(proj.job.s(), lambda: 0, hows=("sigkill", "overlap"))
            assert _celery_faults_real_runner.scenarios == before  # nothing ran
            assert str(cold.value).startswith(
                "real-broker mode cannot run this: cold_shutdown@0: a real worker's cold "
                "shutdown (SIGQUIT to its main process) did not reliably cut off"
            )
            assert str(overlap.value) == (
                "real-broker mode cannot run this: overlap: a real worker cannot be made to "
                "take a second copy of a message while the first runs, nor to interleave the "
                "two at chosen side effects; the emulation alone covers it"
            )
        """,
    )
    result.assert_outcomes(passed=3)
