"""The plugin as users meet it: pytester runs of small test files."""

from __future__ import annotations

import subprocess
import sys

import pytest

APP_MODULE = """
from celery import Celery

app = Celery("proj", set_as_current=False)
sent = []


def send_email(to):
    sent.append(to)


@app.task(name="proj.notify", shared=False)
def notify(to):
    send_email(to)
    send_email(to + ".copy")
    return len(sent)
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(proj=APP_MODULE)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    return pytester


def test_fixture_runs_a_task_through_the_emulated_worker(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_it="""
        import proj

        def test_notify(celery_faults):
            proj.sent.clear()
            celery_faults.track("proj.send_email")
            outcome = celery_faults.run(proj.notify.s("a@x"), "sigkill@1")
            assert outcome.state == "FAILURE" and outcome.lost
            assert proj.sent == ["a@x"]
        """
    )
    project.runpytest("-p", "no:randomly").assert_outcomes(passed=1)


def test_bad_command_line_spec_is_a_usage_error(project: pytest.Pytester) -> None:
    project.makepyfile(test_it="def test_x():\n    pass\n")
    result = project.runpytest("--celery-faults=sigkil@1")
    result.stderr.fnmatch_lines(
        ["*--celery-faults: invalid fault spec 'sigkil@1': unknown fault 'sigkil'*valid forms:*"]
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR


def test_bad_marker_argument_fails_collection_naming_it(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_it="""
        import pytest

        @pytest.mark.crash_after(2, how="sigkil")
        def test_x(celery_faults):
            pass
        """
    )
    result = project.runpytest()
    result.stderr.fnmatch_lines(["*bad celery-faults marker: how='sigkil': expected one of*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "Traceback" not in result.stderr.str()


def test_unfired_marker_spec_errors_at_teardown(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_it="""
        import pytest, proj

        @pytest.mark.crash_after(5)
        def test_x(celery_faults):
            celery_faults.track("proj.send_email")
            celery_faults.run(proj.notify.s("a@x"))

        @pytest.mark.crash_after(5)
        @pytest.mark.celery_faults(allow_unfired=True)
        def test_opted_out(celery_faults):
            celery_faults.track("proj.send_email")
            celery_faults.run(proj.notify.s("a@x"))
        """
    )
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*sigkill@5: sigkill@5 (delivery 1) never fired: the task was delivered 1 time(s)*"]
    )


def test_redeliver_marker_delivers_every_message_again(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_it="""
        import pytest, proj

        @pytest.mark.redeliver(times=2)
        def test_x(celery_faults):
            proj.sent.clear()
            celery_faults.track("proj.send_email")
            proj.notify.delay("a@x")
            [outcome] = celery_faults.drain()
            assert outcome.deliveries == 3
            assert proj.sent.count("a@x") == 3
        """
    )
    project.runpytest("-p", "no:randomly").assert_outcomes(passed=1)


def test_markers_are_documented(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.celery_faults(*specs, profile='rabbitmq'*",
            "@pytest.mark.redeliver(times=1)*",
            "@pytest.mark.crash_after(n, how='sigkill', task=None)*",
        ]
    )


def test_importing_the_entry_point_imports_neither_celery_nor_the_harness() -> None:
    # every pytest session where the plugin is installed imports its pytest11 module
    probe = (
        "import sys, pytest_celery_faults.plugin; "
        "print('celery' in sys.modules, 'pytest_celery_faults.harness' in sys.modules)"
    )
    printed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert printed.strip() == "False False"


def test_the_timeout_marker_wins_over_every_session_setting(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pytest-timeout's precedence, as plugin/timeouts.py documents it: the marker first
    monkeypatch.setenv("PYTEST_TIMEOUT", "50")
    project.makeini("[pytest]\ncelery_faults_app = proj:app\ntimeout = 120\n")
    project.makepyfile(
        test_it="""
        import time

        import pytest


        @pytest.mark.timeout(9)
        def test_x(celery_faults):
            assert 0 < celery_faults.deadline - time.monotonic() <= 9


        @pytest.mark.timeout(method="thread")
        def test_no_limit_in_the_marker(celery_faults):
            assert 9 < celery_faults.deadline - time.monotonic() <= 100
        """
    )
    project.runpytest("-p", "no:randomly", "--timeout=100").assert_outcomes(passed=2)
