"""Messages a worker cannot take: Celery's consumer says why, and so does the harness.

A serializer the app does not accept, or a task the worker has not registered:
Celery's own ``Consumer`` callbacks log the refusal and settle the message
(rejected; an unregistered task also stores FAILURE with ``NotRegistered``).
"""

from __future__ import annotations

import pytest
from celery import Celery
from celery.signals import task_rejected, task_unknown

from pytest_celery_faults import CeleryFaults


def test_a_serializer_the_app_refuses_is_logged_rejected_and_named_in_the_timeline(
    app: Celery, celery_error_log: list[str]
) -> None:
    app.conf.accept_content = ["json"]

    @app.task(name="tests.pickled", serializer="pickle", shared=False)
    def pickled(value: object) -> object:
        return value

    rejected: list[object] = []

    def on_rejected(message: object = None, **_: object) -> None:
        rejected.append(message)

    task_rejected.connect(on_rejected, weak=False)
    try:
        with CeleryFaults(app) as faults:
            outcome = faults.run(pickled.s(1))
            timeline = str(outcome.timeline)
    finally:
        task_rejected.disconnect(on_rejected)
    assert (outcome.executions, outcome.state, outcome.rejected) == (0, "PENDING", "drop")
    assert "rejected (drop)" in timeline
    assert "cannot take it (rejected): ContentDisallowed: Refusing to deserialize" in timeline
    assert any(line.startswith("Received invalid task message") for line in celery_error_log)
    assert len(rejected) == 1


def test_an_unregistered_task_fails_as_not_registered(
    app: Celery, celery_error_log: list[str]
) -> None:
    unknown: list[str] = []

    def on_unknown(name: str = "", **_: object) -> None:
        unknown.append(name)

    task_unknown.connect(on_unknown, weak=False)
    try:
        with CeleryFaults(app) as faults:
            outcome = faults.run(app.signature("tests.nobody_has_it", args=(1,)))
            timeline = str(outcome.timeline)
    finally:
        task_unknown.disconnect(on_unknown)
    assert (outcome.executions, outcome.state) == (0, "FAILURE")
    assert type(outcome.exception).__name__ == "NotRegistered"
    assert "has no task named 'tests.nobody_has_it' (NotRegistered)" in timeline
    assert any(
        line.startswith("Received unregistered task of type 'tests.nobody_has_it'")
        for line in celery_error_log
    )
    assert unknown == ["tests.nobody_has_it"]


def test_the_gate_names_the_refusal_in_a_failing_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        proj="""
        from celery import Celery

        app = Celery("proj", set_as_current=False)
        app.conf.accept_content = ["json"]


        @app.task(name="proj.pickled", serializer="pickle", shared=False)
        def pickled(value):
            return value
        """,
        test_it="""
        from proj import pickled

        def test_it():
            assert pickled.apply(args=(1,)).get() == 1
        """,
    )
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "--celery-faults=redeliver")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*cannot take it (rejected): ContentDisallowed*"])
