"""Bad input to the plugin: each is one line naming the value, at start, never a traceback."""

from __future__ import annotations

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
    ],
)
def test_a_bad_app_setting_is_one_usage_error_for_the_whole_run(
    pytester: pytest.Pytester, value: str, line: str
) -> None:
    pytester.makepyfile(
        badinput_proj=APP_MODULE,
        badinput_broken="raise RuntimeError('the settings module is missing')\n",
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


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"seed": "abc"}, "seed='abc': expected a whole number or None"),
        ({"seed": [1]}, "seed=[1]: expected a whole number or None"),
        ({"max_executions": 0}, "max_executions=0: expected a whole number >= 1"),
        ({"max_executions": "x"}, "max_executions='x': expected a whole number >= 1"),
        ({"workers": True}, "workers=True: expected a whole number >= 1"),
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
