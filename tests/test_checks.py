"""The checks: each one warns, and fails the test under --celery-faults-strict."""

from __future__ import annotations

from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText

import pytest

from pytest_celery_faults.engine.checks import round_trip_problem

APP = """
import functools
import requests
from celery import Celery

app = Celery("proj", set_as_current=False)


@app.task(name="proj.fetch", shared=False)
def fetch():
    return requests.get("https://api.example/items").status_code


@app.task(name="proj.fetch_bounded", shared=False)
def fetch_bounded():
    return requests.get("https://api.example/items", timeout=(3, 10)).status_code


@app.task(name="proj.fetch_half", shared=False)
def fetch_half():
    return requests.get("https://api.example/items", timeout=(3, None)).status_code


@app.task(name="proj.pair", shared=False)
def pair(point):
    return tuple(point)


def logged(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*args, **kwargs)
    return wrapper


@logged
@app.task(name="proj.hidden", shared=False)
def hidden():
    return 1


@app.task(name="proj.unbound_retry", shared=False)
def unbound_retry(self):
    raise self.retry()
"""

TESTS = """
import proj


def test_{name}(celery_faults):
    celery_faults.http.add("GET", "https://api.example/items", json={{}})
    celery_faults.run(proj.{task}.s({args}))
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(proj=APP)
    pytester.makeini(
        "[pytest]\ncelery_faults_app = proj:app\n"
        "filterwarnings = always::pytest_celery_faults.errors.CeleryFaultsWarning\n"
    )
    return pytester


CASES = [
    (
        "fetch",
        "",
        "*task proj.fetch: HTTP GET https://api.example/items without a connect and read timeout*",
    ),
    ("fetch_half", "", "*task proj.fetch_half: HTTP GET * without a read timeout*"),
    (
        "pair",
        "(1, 2)",
        "*task proj.pair: argument 0 (1, 2) (tuple) comes back from the json round trip as "
        "[[]1, 2[]] (list)*",
    ),
    ("fetch_bounded", "", "*proj.hidden is another decorator wrapped around the task*"),
    ("fetch_bounded", "", "*task proj.unbound_retry calls self.retry but is not bound*"),
]


@pytest.mark.parametrize(("task", "args", "line"), CASES)
def test_each_check_warns_then_fails_under_strict(
    project: pytest.Pytester, task: str, args: str, line: str
) -> None:
    project.makepyfile(test_it=TESTS.format(name=task, task=task, args=args))
    warned = project.runpytest("-p", "no:randomly")
    warned.assert_outcomes(passed=1, warnings=warned.parseoutcomes()["warnings"])
    warned.stdout.fnmatch_lines(["*CeleryFaultsWarning*", line])
    strict = project.runpytest("-p", "no:randomly", "--celery-faults-strict")
    strict.assert_outcomes(passed=1, errors=1)
    strict.stdout.fnmatch_lines(["*celery_faults (--celery-faults-strict):*", line])


def test_a_bounded_request_is_not_reported(project: pytest.Pytester) -> None:
    project.makepyfile(test_it=TESTS.format(name="ok", task="fetch_bounded", args=""))
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1)
    assert "HTTP GET" not in result.stdout.str()


def test_a_stopped_test_says_where_the_task_hung(pytester: pytest.Pytester) -> None:
    # pytest-timeout stops a hung test from its SIGALRM handler; here a side effect
    # raises the alarm at once, so the test needs no real time to pass.
    pytester.makepyfile(
        proj="""
        import signal
        from celery import Celery

        app = Celery("proj", set_as_current=False)

        def fetch(n):
            return n

        # pytest-timeout's alarm, from outside the task: signal.raise_signal in a task
        # signals its emulated child, so the real function is bound before the harness.
        from signal import raise_signal as alarm_from_outside

        def hang(n):
            alarm_from_outside(signal.SIGALRM)

        @app.task(name="proj.sync", acks_late=True, shared=False)
        def sync():
            fetch(1)
            hang(2)
        """
    )
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    pytester.makepyfile(
        test_it="""
        import pytest
        import proj

        @pytest.mark.timeout(60, method="signal")
        def test_sync(celery_faults):
            celery_faults.track("proj.fetch")
            celery_faults.run(proj.sync.s())
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Timeout*>60.0s*",  # pytest-timeout 2.2 and 2.4 word it differently
            "*celery_faults: task proj.sync[[]*[]] (delivery 1) was running after side effect "
            "1 (call proj.fetch) when the test was stopped*",
        ]
    )


def test_harness_tests_get_a_time_limit_when_none_is_configured(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(proj="from celery import Celery\napp = Celery('p')\n")
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    pytester.makepyfile(
        test_it="""
        def test_with_harness(celery_faults, request):
            assert request.node.get_closest_marker("timeout").args == (300.0,)

        def test_without(request):
            assert request.node.get_closest_marker("timeout") is None
        """
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=2)


def test_a_task_that_needed_the_test_s_flask_context_says_what_a_child_lacks() -> None:
    from celery import Celery

    from pytest_celery_faults import CeleryFaults

    app = Celery("flaskish", set_as_current=False)

    @app.task(name="flaskish.needs_context", shared=False)
    def needs_context() -> None:
        # what flask.current_app raises with no app context pushed
        raise RuntimeError("Working outside of application context.\n\nThis typically ...")

    @app.task(name="flaskish.other_error", shared=False)
    def other_error() -> None:
        raise RuntimeError("something else")

    with CeleryFaults(app) as faults:
        faults.run(other_error.s())
        assert faults.warnings == []
        faults.run(needs_context.s())
        faults.run(needs_context.s())
    assert faults.warnings == [
        "task flaskish.needs_context ran outside a Flask application context: it runs as in "
        "a worker child, which has none of the test's context; give the task its own, as a "
        "worker needs it too (a Task base class that pushes app.app_context(), set before the "
        "tasks are bound, or a task_prerun receiver)"
    ]


class Lossy:
    """Compares by identity, and loses ``b`` on the way through pickle."""

    def __init__(self) -> None:
        self.a, self.b = 1, 2

    def __getstate__(self) -> dict[str, int]:
        return {"a": self.a}


def an_email() -> MIMEMultipart:
    message = MIMEMultipart()
    message["Subject"] = "figures"
    message.attach(MIMEText("hello"))
    return message


@pytest.mark.parametrize(
    "value",
    [an_email(), [an_email()], {"message": an_email()}, (1, [an_email()])],
    ids=["object", "in-a-list", "in-a-dict", "in-a-tuple"],
)
def test_a_class_without_eq_that_comes_back_whole_through_pickle_is_not_reported(
    value: object,
) -> None:
    # its copy never equals it (identity): the copy's state is what is compared
    assert round_trip_problem(value, "pickle", "argument 0", "proj.send") is None


@pytest.mark.parametrize(
    ("value", "serializer", "comes_back"),
    [
        (Lossy(), "pickle", "(Lossy) comes back from the pickle round trip as"),
        ([(1, 2)], "json", "[(1, 2)] (list) comes back from the json round trip as [[1, 2]]"),
    ],
)
def test_a_value_that_changes_on_the_way_is_still_reported(
    value: object, serializer: str, comes_back: str
) -> None:
    problem = round_trip_problem(value, serializer, "argument 0", "proj.send")
    assert problem is not None and comes_back in problem, problem
