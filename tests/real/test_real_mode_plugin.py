"""--celery-faults-broker: every run() is checked against a real worker."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults.real.compare import check_against_real
from pytest_celery_faults.real.runner import RealOutcome

pytestmark = pytest.mark.real_broker

APP = """
from celery import Celery

app = Celery("proj", set_as_current=False)


def effect():
    pass


@app.task(name="proj.job", acks_late=True, reject_on_worker_lost=True, shared=False)
def job():
    effect()
    effect()
    return "ok"
"""


def test_runs_are_checked_on_a_real_worker(pytester: pytest.Pytester, runner: Any) -> None:
    pytester.makepyfile(proj=APP)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    pytester.makepyfile(
        test_it="""
        import proj

        def test_job(celery_faults):
            celery_faults.track("proj.effect")
            outcome = celery_faults.run(proj.job.s(), "sigkill@1")
            assert (outcome.executions, outcome.state) == (2, "SUCCESS")
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:randomly", f"--celery-faults-broker={runner.broker_url}"
    )
    result.assert_outcomes(passed=1)


def test_an_unreachable_broker_is_named(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(proj=APP)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    pytester.makepyfile(
        test_it="""
        import proj

        def test_job(celery_faults):
            celery_faults.run(proj.job.s())
        """
    )
    url = "amqp://guest:guest@127.0.0.1:1//"
    result = pytester.runpytest("-p", "no:randomly", f"--celery-faults-broker={url}")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*--celery-faults-broker: the broker at {url} does not answer*"])


class DisagreeingRunner:
    """Stands in for a real worker that ran the task twice."""

    broker_url = "amqp://example//"

    def run(self, task: str, args: Any, kwargs: Any, spec: str | None) -> RealOutcome:
        return RealOutcome("id", 2, "SUCCESS", None, [False, True], False, 0)


def test_a_disagreement_shows_both_sides(app: Celery) -> None:
    @app.task(name="tests.once", shared=False)
    def once() -> str:
        return "ok"

    with CeleryFaults(app) as faults:
        emulated = faults.run(once.s())
    with pytest.raises(AssertionError) as raised:
        check_against_real(DisagreeingRunner(), once.s(), (), emulated)  # type: ignore[arg-type]
    message = str(raised.value)
    assert "the real worker on amqp://example// disagrees with the emulation" in message
    assert "real:     {'executions': 2, 'state': 'SUCCESS'" in message
    assert "emulated: {'executions': 1, 'state': 'SUCCESS'" in message
