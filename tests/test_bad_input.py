"""Bad input to the plugin: each is one line naming the value, at start, never a traceback."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import pytest

APP_MODULE = """
from celery import Celery

app = Celery("badinput", set_as_current=False)
not_an_app = 3


@app.task(name="badinput.noop", shared=False)
def noop():
    return 1
"""

THREE_TESTS = """
def test_a(celery_faults):
    pass

def test_b(celery_faults):
    pass

def test_c(celery_faults_app):
    pass
"""


def error_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.stderr.lines if line.strip()]


def assert_one_usage_error(result: pytest.RunResult, line: str) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stdout.str()
    assert error_lines(result) == [f"ERROR: {line}"]
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert "passed" not in result.stdout.str()  # refused before anything ran


@pytest.mark.parametrize(
    ("value", "line"),
    [
        (
            "badapp",
            "celery_faults_app = 'badapp': expected 'module:attribute', such as proj.celery:app",
        ),
        (
            ":app",
            "celery_faults_app = ':app': expected 'module:attribute', such as proj.celery:app",
        ),
        (
            "badinput_proj:",
            "celery_faults_app = 'badinput_proj:': expected 'module:attribute', "
            "such as proj.celery:app",
        ),
        (
            "no_such_module:app",
            "celery_faults_app = 'no_such_module:app': cannot load it (No module named "
            "'no_such_module'); expected 'module:attribute'",
        ),
        (
            "badinput_proj:missing",
            "celery_faults_app = 'badinput_proj:missing': cannot load it (module "
            "'badinput_proj' has no attribute 'missing'); expected 'module:attribute'",
        ),
        (
            "badinput_proj:not_an_app",
            "celery_faults_app = 'badinput_proj:not_an_app' is a int, not a Celery app",
        ),
        (
            "badinput_proj:noop",
            "celery_faults_app = 'badinput_proj:noop' is the Celery task 'badinput.noop', not a "
            "Celery app: name the app its module defines (such as proj.celery:app)",
        ),
        (
            "badinput_broken:app",
            "celery_faults_app = 'badinput_broken:app': importing it raised "
            "RuntimeError: the settings module is missing",
        ),
        (
            "badinput_exits:app",
            "celery_faults_app = 'badinput_exits:app': importing it raised "
            "SystemExit: DJANGO_SETTINGS_MODULE is not set",
        ),
    ],
)
def test_a_bad_app_setting_is_one_usage_error_for_the_whole_run(
    pytester: pytest.Pytester, value: str, line: str
) -> None:
    pytester.makepyfile(
        badinput_proj=APP_MODULE,
        badinput_broken="raise RuntimeError('the settings module is missing')\n",
        badinput_exits="import sys\nsys.exit('DJANGO_SETTINGS_MODULE is not set')\n",
        test_it=THREE_TESTS,
    )
    pytester.makeini(f"[pytest]\ncelery_faults_app = {value}\n")
    assert_one_usage_error(pytester.runpytest("-p", "no:randomly"), line)


@pytest.mark.parametrize("options", [(), ("--celery-faults=redeliver*1",)])
def test_a_bad_app_setting_is_refused_when_no_test_uses_the_fixture(
    pytester: pytest.Pytester, options: tuple[str, ...]
) -> None:
    pytester.makepyfile(
        badinput_proj=APP_MODULE,
        test_it="import badinput_proj\n\ndef test_eager():\n    badinput_proj.noop.delay()\n",
    )
    pytester.makeini("[pytest]\ncelery_faults_app = badinput_proj:nope\n")
    assert_one_usage_error(
        pytester.runpytest("-p", "no:randomly", *options),
        "celery_faults_app = 'badinput_proj:nope': cannot load it (module "
        "'badinput_proj' has no attribute 'nope'); expected 'module:attribute'",
    )


def test_a_missing_app_setting_is_one_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it=THREE_TESTS)
    assert_one_usage_error(
        pytester.runpytest("-p", "no:randomly"),
        "celery_faults needs the app under test: set `celery_faults_app = "
        '"proj.celery:app"` in [tool.pytest.ini_options] (or pytest.ini), or override the '
        "`celery_faults_app` fixture in a conftest.py",
    )


def test_an_overridden_app_fixture_needs_no_setting(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(badinput_proj=APP_MODULE, test_it=THREE_TESTS)
    pytester.makeconftest(
        "import pytest, badinput_proj\n\n"
        "@pytest.fixture\ndef celery_faults_app():\n    return badinput_proj.app\n"
    )
    pytester.runpytest("-p", "no:randomly").assert_outcomes(passed=3)


def test_a_report_path_in_a_missing_directory_is_refused_at_start(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_it="def test_x():\n    pass\n")
    missing = pytester.path / "no" / "such"
    result = pytester.runpytest(f"--celery-faults-report={missing}/report.json")
    assert_one_usage_error(
        result,
        f"--celery-faults-report='{missing}/report.json': the directory '{missing}' does "
        "not exist",
    )


def test_a_report_path_that_is_a_directory_is_refused_at_start(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_it="def test_x():\n    pass\n")
    result = pytester.runpytest(f"--celery-faults-report={pytester.path}")
    assert_one_usage_error(
        result, f"--celery-faults-report='{pytester.path}' is a directory, not a file"
    )


def _sysfs_refuses() -> bool:
    try:
        with open("/sys/celery-faults-probe.json", "a"):
            pass
    except OSError:
        return True
    os.remove("/sys/celery-faults-probe.json")
    return False


@pytest.mark.skipif(
    not _sysfs_refuses(), reason="needs a directory nobody may create files in (sysfs)"
)
def test_a_report_path_that_cannot_be_written_is_refused_at_start(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_it="def test_x():\n    pass\n")
    result = pytester.runpytest("--celery-faults-report=/sys/celery-faults.json")
    assert_one_usage_error(
        result,
        "--celery-faults-report='/sys/celery-faults.json': cannot write there "
        "(Permission denied); choose a writable path",
    )


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (a full disk)")
def test_a_report_that_cannot_be_written_at_the_end_is_reported_not_raised(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_it="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:randomly", "--celery-faults-report=/dev/full")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "ERROR: --celery-faults-report='/dev/full': the report could not be written (No "
            "space left on device); the run's results above stand, the file is missing",
        ]
    )
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    ("args", "ini", "line"),
    [
        (
            ["--celery-faults-broker=foo://x"],
            "",
            "--celery-faults-broker: real-broker mode supports amqp:// and redis:// URLs, "
            "not 'foo://x'",
        ),
        (
            [],
            "celery_faults_broker = kafka://k:9092\n",
            "the celery_faults_broker ini option: real-broker mode supports amqp:// and "
            "redis:// URLs, not 'kafka://k:9092'",
        ),
    ],
    ids=["option", "ini"],
)
def test_a_broker_url_real_mode_cannot_use_is_refused_at_start(
    pytester: pytest.Pytester, args: list[str], ini: str, line: str
) -> None:
    pytester.makepyfile(test_it="def test_x():\n    pass\n")
    pytester.makeini(f"[pytest]\n{ini}")
    assert_one_usage_error(pytester.runpytest(*args), line)


# -- the harness in code ----------------------------------------------------------


def test_run_refuses_what_is_not_a_signature_of_its_app() -> None:
    from celery import Celery

    from pytest_celery_faults import CeleryFaults

    app = Celery("mine", set_as_current=False)
    other = Celery("theirs", set_as_current=False)

    @app.task(name="mine.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @other.task(name="theirs.add", shared=False)
    def other_add(x: int, y: int) -> int:
        return x + y

    with CeleryFaults(app) as faults:
        with pytest.raises(TypeError) as none:
            faults.run(None)
        with pytest.raises(TypeError) as task:
            faults.run(add)
        with pytest.raises(ValueError) as foreign:
            faults.run(other_add.s(1, 2))
        assert faults.ledger.events == []  # nothing was published anywhere
        assert faults.run(app.signature("mine.add", args=(1, 2))).result == 3
    assert str(none.value) == "run() takes a signature such as task.s(...), not NoneType None"
    assert str(task.value) == (
        "run() takes a signature such as mine.add.s(...), not the task mine.add itself"
    )
    assert str(foreign.value) == (
        "run(): theirs.add(1, 2) belongs to the app 'theirs', not the harness's app 'mine': "
        "it would publish to that app's broker and never run here (build it from this "
        "app's task, or with app.signature(name))"
    )


def test_a_signature_of_another_app_with_the_same_name_says_which() -> None:
    from celery import Celery

    from pytest_celery_faults import CeleryFaults

    app = Celery("mine", set_as_current=False)
    twin = Celery("mine", set_as_current=False)  # a conftest's app, say
    with CeleryFaults(app) as faults, pytest.raises(ValueError) as foreign:
        faults.run(twin.signature("mine.add", args=(1, 2)))
    assert str(foreign.value).startswith(
        "run(): mine.add(1, 2) belongs to another app also named 'mine', not the harness's: "
    )
    assert "celery_faults_app = celery:current_app" in str(foreign.value)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"seed": "abc"}, "seed='abc': expected a whole number or None"),
        ({"seed": [1]}, "seed=[1]: expected a whole number or None"),
        ({"max_executions": 0}, "max_executions=0: expected a whole number >= 1"),
        ({"max_executions": "x"}, "max_executions='x': expected a whole number >= 1"),
        ({"workers": True}, "workers=True: expected a whole number >= 1"),
        (
            {"workers": 10**6},
            "workers=1000000: at most 1,000 emulated workers (each is a consumer in this "
            "process); a handful shows every interleaving",
        ),
    ],
)
def test_harness_options_are_checked_where_they_enter(
    options: dict[str, object], error: str
) -> None:
    from celery import Celery

    from pytest_celery_faults import CeleryFaults

    with pytest.raises(ValueError) as raised:
        CeleryFaults(Celery("mine", set_as_current=False), **options)  # type: ignore[arg-type]
    assert str(raised.value) == error


def test_a_harness_needs_an_app() -> None:
    from pytest_celery_faults import CeleryFaults

    with pytest.raises(TypeError) as raised:
        CeleryFaults(None)  # type: ignore[arg-type]
    assert str(raised.value) == "CeleryFaults(app=None): expected a Celery app"


def test_a_marker_asking_for_a_million_workers_is_a_collection_error(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        badinput_proj=APP_MODULE,
        test_it="import pytest\n\n@pytest.mark.celery_faults(workers=10**6)\n"
        "def test_x(celery_faults):\n    pass\n",
    )
    pytester.makeini("[pytest]\ncelery_faults_app = badinput_proj:app\n")
    assert_one_usage_error(
        pytester.runpytest("-p", "no:randomly"),
        "test_it.py::test_x: bad celery-faults marker: workers=1000000: at most 1,000 "
        "emulated workers (each is a consumer in this process); a handful shows every "
        "interleaving",
    )


@pytest.mark.parametrize("value", ["'abc'", "None", "-1", "float('nan')", "[30]"])
def test_a_visibility_timeout_that_is_not_seconds_is_one_line(
    pytester: pytest.Pytester, value: str
) -> None:
    pytester.makepyfile(
        badinput_proj=APP_MODULE
        + f"\napp.conf.broker_transport_options = {{'visibility_timeout': {value}}}\n",
        test_it="import pytest\n\n@pytest.mark.celery_faults(profile='redis')\n"
        "def test_x(celery_faults):\n    pass\n",
    )
    pytester.makeini("[pytest]\ncelery_faults_app = badinput_proj:app\n")
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(errors=1)
    shown = repr(eval(value))  # noqa: S307 - the test's own literal
    result.stdout.fnmatch_lines(
        [
            "*ERROR at setup of test_x*",
            f"celery_faults: broker_transport_options['visibility_timeout']={shown}: "
            "expected a finite number of seconds >= 0 (kombu computes with it as a number)",
            "*= short test summary info =*",
        ]
    )
    assert "Traceback" not in result.stdout.str()
    assert "badinput_proj.py" not in result.stdout.str()


def test_a_bad_visibility_timeout_under_the_gate_is_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        badinput_proj=APP_MODULE
        + "\napp.conf.task_always_eager = True\n"
        + "app.conf.broker_transport_options = {'visibility_timeout': '30'}\n",
        test_it="import pytest, badinput_proj\n\n@pytest.mark.celery_faults(profile='sqs')\n"
        "def test_x():\n    badinput_proj.noop.delay()\n",
    )
    result = pytester.runpytest("-p", "no:randomly", "--celery-faults=redeliver")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_x _*",
            "celery_faults: broker_transport_options['visibility_timeout']='30': expected a "
            "finite number of seconds >= 0 (kombu computes with it as a number)",
            "*= celery-faults =*",
        ]
    )


@pytest.mark.parametrize("duration", [math.nan, math.inf, -1, "1"])
def test_track_refuses_a_duration_that_is_not_seconds(duration: object) -> None:
    from celery import Celery

    from pytest_celery_faults import CeleryFaults

    with CeleryFaults(Celery("mine", set_as_current=False)) as faults:
        with pytest.raises(ValueError) as raised:
            faults.track("os.path.join", duration=duration)  # type: ignore[arg-type]
        assert faults.tracked == []
    assert str(raised.value) == (
        f"track('os.path.join', duration={duration!r}): expected a finite number of seconds >= 0"
    )


SOME_LIST: list[int] = []


def test_track_refuses_a_method_of_a_built_in_object_in_one_line() -> None:
    from celery import Celery

    from pytest_celery_faults import CeleryFaults

    with CeleryFaults(Celery("mine", set_as_current=False)) as faults:
        with pytest.raises(TypeError) as raised:
            faults.track(f"{__name__}.SOME_LIST.append")
        assert faults.tracked == []
    assert str(raised.value) == (
        f"track('{__name__}.SOME_LIST.append'): cannot replace 'append' on list [] ('list' "
        "object attribute 'append' is read-only); track a function of your own that the task "
        "calls (a built-in object's methods cannot be replaced)"
    )


@pytest.mark.parametrize("method", ["assert_idempotent", "assert_no_loss", "sweep"])
def test_observe_and_reset_must_be_callables(method: str) -> None:
    from celery import Celery

    from pytest_celery_faults import CeleryFaults

    app = Celery("mine", set_as_current=False)

    @app.task(name="mine.noop", shared=False)
    def noop() -> None:
        return None

    with CeleryFaults(app) as faults:
        call = getattr(faults, method)
        with pytest.raises(TypeError) as observe:
            call(noop.s(), observe=3)
        with pytest.raises(TypeError) as reset:
            call(noop.s(), observe=list, reset="db.flush")
        assert faults.ledger.events == []  # refused before anything ran
    assert str(observe.value) == (
        "observe=3: expected a function that returns what the task changes, such as "
        "lambda: dict(db.rows)"
    )
    assert str(reset.value) == (
        "reset='db.flush': expected a function that puts the world back, or None"
    )


BAD_TASKS = """
from celery import Celery

app = Celery("badtasks", set_as_current=False)
app.conf.task_always_eager = True


class BadRepr(Exception):
    def __repr__(self):
        raise RuntimeError("repr is broken")

    __str__ = __repr__


class Fatal(BaseException):
    pass


@app.task(name="badtasks.bad_repr", shared=False)
def bad_repr():
    raise BadRepr()


@app.task(name="badtasks.fatal", shared=False)
def fatal():
    raise Fatal("boom")
"""


def test_a_task_exception_whose_repr_raises_is_reported_under_the_gate(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        badtasks=BAD_TASKS,
        test_it="import badtasks\n\ndef test_x():\n"
        "    assert badtasks.bad_repr.apply().state == 'FAILURE'\n\n"
        "def test_y():\n    assert badtasks.bad_repr.apply().state == 'SUCCESS'\n",
    )
    result = pytester.runpytest(
        "-p", "no:randomly", "--celery-faults=redeliver", "--celery-faults-report=r.json"
    )
    result.assert_outcomes(passed=1, failed=1)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(
        ["badtasks.bad_repr*: raised, state=FAILURE (<BadRepr (its repr raised RuntimeError)>)*"]
    )
    report = (pytester.path / "r.json").read_text()
    assert '"exception": "<BadRepr (its repr raised RuntimeError)>"' in report


def test_the_gate_gives_a_task_s_base_exception_the_worker_s_state(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        badtasks=BAD_TASKS,
        test_it="import badtasks\n\ndef test_x():\n"
        "    result = badtasks.fatal.apply()\n"
        "    assert result.state == 'FAILURE'\n"
        "    assert isinstance(result.result, BaseException)  # billiard 4.3: Fatal; 4.2: lost\n",
    )
    result = pytester.runpytest("-p", "no:randomly", "--celery-faults=redeliver")
    result.assert_outcomes(passed=1)


def test_the_summary_says_each_warning_once(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        badinput_proj=APP_MODULE
        + "\n\n@app.task(name='badinput.fetch', shared=False)\ndef fetch():\n"
        "    import requests\n    return requests.get('http://example.invalid/').status_code\n",
        test_it="import pytest, badinput_proj\n\n@pytest.mark.parametrize('n', range(3))\n"
        "def test_x(n, celery_faults):\n"
        "    celery_faults.http.get('http://example.invalid/', status=200)\n"
        "    assert celery_faults.run(badinput_proj.fetch.s()).result == 200\n",
    )
    pytester.makeini("[pytest]\ncelery_faults_app = badinput_proj:app\n")
    result = pytester.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=3)
    summary = result.stdout.str().split("= celery-faults =")[1]
    assert summary.count("HTTP GET http://example.invalid/ without a connect") == 1
    result.stdout.fnmatch_lines(
        [
            "warning: task badinput.fetch: HTTP GET http://example.invalid/ without a connect "
            "and read timeout; * (in 3 tests: test_it.py::test_x[[]0[]] and 2 more)"
        ]
    )


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (
            lambda faults: faults.track(("x",)),
            "track(('x',)): expected (object, 'attribute') or a dotted path such as "
            "'proj.mail.send'",
        ),
        (
            lambda faults: faults.track("os.path.join", name=3),
            "track('os.path.join', name=3): expected a non-empty string",
        ),
        (
            lambda faults: faults.assert_idempotent(None, observe=list, specs="sigkill@1"),
            "specs='sigkill@1': expected a list of fault specs, such as ['sigkill@1']",
        ),
        (
            lambda faults: faults.sweep(None, observe=list, hows="sigkill"),
            "hows='sigkill': expected a list of fault kinds, such as ['sigkill']",
        ),
    ],
    ids=["track-tuple", "track-name", "specs-string", "hows-string"],
)
def test_harness_arguments_of_the_wrong_shape_are_one_line(
    call: Callable[[Any], object], error: str
) -> None:
    from celery import Celery

    from pytest_celery_faults import CeleryFaults

    with CeleryFaults(Celery("mine", set_as_current=False)) as faults:
        with pytest.raises((TypeError, ValueError)) as raised:
            call(faults)
        assert faults.tracked == []
        assert faults.ledger.events == []
    assert str(raised.value) == error
