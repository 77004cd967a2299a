"""A library of ``@shared_task``s: ``celery:current_app`` works, a non-app is refused."""

from __future__ import annotations

import pytest

LIBRARY = """
from celery import shared_task

@shared_task(acks_late=True, reject_on_worker_lost=True)
def add(x, y):
    return x + y
"""


def test_current_app_resolves_to_the_app_behind_the_proxy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(sharedlib=LIBRARY)
    pytester.makeini(
        "[pytest]\ncelery_faults_app = celery:current_app\n"
        "addopts = -p no:randomly\ntimeout = 30\n"
    )
    pytester.makepyfile(
        """
        from celery import current_app
        import sharedlib

        def test_add_survives_a_crash(celery_faults):
            assert celery_faults.app is current_app._get_current_object()
            outcome = celery_faults.run(sharedlib.add.s(2, 3), "sigkill@0")
            assert (outcome.result, outcome.executions) == (5, 1)
            assert outcome.deliveries == 2
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


def test_the_readme_recipe_an_app_of_the_tests_own(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(sharedlib=LIBRARY)
    pytester.makeconftest(
        """
        import pytest
        from celery import Celery

        @pytest.fixture
        def celery_faults_app():
            return Celery("mylib-tests", set_as_current=True)
        """
    )
    pytester.makeini("[pytest]\naddopts = -p no:randomly\ntimeout = 30\n")
    pytester.makepyfile(
        """
        import sharedlib

        def test_add_is_redelivered(celery_faults):
            assert celery_faults.app.main == "mylib-tests"
            outcome = celery_faults.run(sharedlib.add.s(2, 3), "redeliver")
            assert (outcome.result, outcome.executions) == (5, 2)
        """
    )
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)


def test_something_else_is_refused_in_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(sharedlib="from celery import shared_task as app\n")
    pytester.makeini("[pytest]\ncelery_faults_app = sharedlib:app\n")
    pytester.makepyfile("def test_it(celery_faults):\n    pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    assert [line for line in result.stderr.lines if line.strip()] == [
        "ERROR: celery_faults_app = 'sharedlib:app' is a function, not a Celery app"
    ]


def test_the_harness_resolves_a_proxy_passed_to_it() -> None:
    from celery import Celery, current_app

    from pytest_celery_faults import CeleryFaults

    previous = current_app._get_current_object()
    app = Celery("proxied", set_as_current=True)
    try:
        assert CeleryFaults(current_app).app is app
    finally:
        previous.set_current()
        app.close()


def test_no_drain_outlives_the_time_limit_when_the_task_swallows_it(
    pytester: pytest.Pytester,
) -> None:
    # The task would swallow pytest-timeout's exception (as a RecursionError raised
    # inside the limit's handler once did) and then fail slowly, retrying forever:
    # the drain would go on for its 1000 executions well past the limit. The task
    # runs on a child's thread, never the test's, so the limit is raised in the test
    # (where the harness waits) and says where the task was; the drain stops there.
    pytester.makepyfile(
        """
        import pytest
        from celery import Celery
        # Imported here, not inside the 1 s limit (setup counts), which a loaded machine
        # would spend importing: the test is about the drain stopping.
        import celery.backends.redis  # noqa: F401
        import pytest_celery_faults.harness  # noqa: F401

        app = Celery("spin", set_as_current=False)
        state = {"spun": False}

        @app.task(shared=False, autoretry_for=(RuntimeError,), max_retries=None,
                  default_retry_delay=0)
        def spin():
            if not state["spun"]:
                state["spun"] = True
                try:
                    while True:
                        pass
                except BaseException:
                    pass
            sum(range(300_000))  # a slow failure
            raise RuntimeError("again")

        @pytest.fixture
        def celery_faults_app():
            return app

        @pytest.mark.timeout(2, func_only=True)  # the setup takes its own time
        def test_spins(celery_faults):
            celery_faults.run(spin.s())
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E * Failed: Timeout *>2.0s*",  # pytest-timeout 2.2 and 2.4 word it apart
            "E * celery_faults: task *spin[[]*[]] (delivery 1) was running before its "
            "first side effect when the test was stopped",
        ]
    )
