"""What a task does to its own process ends its emulated child, never the test session.

Pytester runs in a subprocess: before the fix, ``os._exit`` in a task ended
the whole session (exit code 0, no report), so the outer run must survive it.
"""

from __future__ import annotations

import pytest
from celery import Celery

from pytest_celery_faults import CeleryFaults

APP_MODULE = """
import os, signal
from celery import Celery

app = Celery("proj", set_as_current=False)
cleaned = []


def body(how):
    try:
        if how == "os._exit(0)":
            os._exit(0)
        if how == "os._exit(3)":
            os._exit(3)
        if how == "os.kill(SIGTERM)":
            os.kill(os.getpid(), signal.SIGTERM)
        if how == "os.kill(SIGKILL)":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "raise_signal(SIGTERM)":
            signal.raise_signal(signal.SIGTERM)
        if how == "raise_signal(SIGHUP)":
            signal.raise_signal(signal.SIGHUP)
        if how == "os.abort()":
            os.abort()
        if how == "raise_signal(SIGINT)":
            signal.raise_signal(signal.SIGINT)  # ignored in a prefork child
        return "survived"
    finally:
        cleaned.append(how)


@app.task(name="proj.dies", shared=False)
def dies(how):
    return body(how)


@app.task(name="proj.dies_on_own_stack", shared=False, time_limit=60)
def dies_on_own_stack(how):
    return body(how)
"""

#: How each call ends the child, as billiard reports it (Celery 5.7, billiard 4.3;
#: the texts are billiard 4.2's too), and whether the task's ``finally`` runs in it.
CASES = {
    "os._exit(0)": ("exit", "exitcode 0", False),
    "os._exit(3)": ("exit", "exitcode 3", False),
    "os.kill(SIGTERM)": ("child killed", "signal 15 (SIGTERM)", True),
    "os.kill(SIGKILL)": ("child killed", "signal 9 (SIGKILL)", False),
    "raise_signal(SIGTERM)": ("child killed", "signal 15 (SIGTERM)", True),
    "raise_signal(SIGHUP)": ("child killed", "exitcode 70", True),
    "os.abort()": ("child killed", "signal 6 (SIGABRT)", False),
}

TESTS = f"""
import re
import pytest
import proj

CASES = {CASES!r}


@pytest.mark.parametrize("task", [proj.dies, proj.dies_on_own_stack], ids=["inline", "stack"])
@pytest.mark.parametrize("how", sorted(CASES))
def test_dies(celery_faults, task, how):
    proj.cleaned.clear()
    ended, status, unwinds = CASES[how]
    outcome = celery_faults.run(task.s(how))
    assert (outcome.ended, outcome.state) == (ended, "FAILURE"), outcome.story
    assert type(outcome.exception).__name__ == "WorkerLostError"
    assert re.fullmatch(
        rf"Worker exited prematurely: {{re.escape(status)}} Job: \\d+\\.", str(outcome.exception)
    ), outcome.exception
    if task is proj.dies_on_own_stack:  # a death freezes; an inline one can only unwind
        assert proj.cleaned == ([how] if unwinds else [])


def test_an_ignored_signal_does_nothing(celery_faults):
    outcome = celery_faults.run(proj.dies.s("raise_signal(SIGINT)"))
    assert (outcome.state, outcome.result) == ("SUCCESS", "survived")


def test_the_session_goes_on():
    pass
"""


def test_a_task_that_ends_its_own_process_ends_only_its_child(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(proj=APP_MODULE, test_it=TESTS)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2 * len(CASES) + 2)
    assert result.ret == pytest.ExitCode.OK


def test_outside_a_task_the_calls_are_the_real_ones(pytester: pytest.Pytester) -> None:
    """The test's own thread keeps the real functions, during a drain too."""
    pytester.makepyfile(proj=APP_MODULE)
    pytester.makepyfile(
        test_it="""
        import os, signal
        import proj

        def test_own_exit(celery_faults):
            assert celery_faults.run(proj.dies.s("none")).result == "survived"
            os.kill(os.getpid(), 0)  # the real one: checks that the process exists
            os._exit(7)
        """
    )
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    assert result.ret == 7


# -- what a task may do in a prefork child: install signal handlers (#19.6) ------------

HANDLERS = """
import signal
import pytest
from celery import Celery

app = Celery("proj", set_as_current=False)
log = []


def on_term(signum, frame):
    log.append("on_term")
    raise SystemExit(3)


def installs(name):
    previous = signal.signal(signal.SIGTERM, on_term)
    log.append(getattr(previous, "__name__", repr(previous)))
    log.append("installed")


def work():
    log.append("work")


@app.task(name="proj.graceful", shared=False, time_limit=60)  # a stack of its own
def graceful():
    installs("graceful")
    work()
    return "done"


@app.task(name="proj.graceful_inline", shared=False)
def graceful_inline():
    installs("graceful_inline")
    return "done"


@app.task(name="proj.handler_now", shared=False)
def handler_now():
    handler = signal.getsignal(signal.SIGTERM)
    return getattr(handler, "__name__", repr(handler))


@pytest.fixture(autouse=True)
def _fresh_log():
    log.clear()
"""

HANDLER_TESTS = r"""
import re
import signal
import proj


def test_a_sigterm_fault_runs_the_handler_the_task_installed(celery_faults):
    celery_faults.track("proj.work")
    outcome = celery_faults.run(proj.graceful.s(), "sigterm@1")
    assert proj.log == ["_shutdown_cleanup", "installed", "work", "on_term"]
    assert (outcome.ended, outcome.state) == ("exit", "FAILURE"), outcome.story
    # billiard 4.3 reports the SystemExit (Celery words it); 4.2's child exits with it.
    assert re.fullmatch(
        r"Worker exited prematurely: exitcode 3( Job: \d+)?\.", str(outcome.exception)
    ), outcome.exception
    # The child that ran it is gone, and its handler with it.
    assert celery_faults.run(proj.handler_now.s()).result == "_shutdown_cleanup"


def test_a_handler_stays_in_the_child_for_its_next_task(celery_faults):
    assert celery_faults.run(proj.graceful_inline.s()).result == "done"
    assert celery_faults.run(proj.handler_now.s()).result == "on_term"


def test_the_test_process_keeps_its_own_handlers(celery_faults):
    def own(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, own)
    try:
        celery_faults.run(proj.graceful_inline.s())  # inline: on the test's own thread
        assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, before)
"""


def test_signal_handlers_a_task_installs_live_in_its_child(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(proj=HANDLERS, test_it=HANDLER_TESTS)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_signalling_the_workers_main_process_is_refused_in_one_line(app: Celery) -> None:
    """In a worker the parent is Celery's main process; here it is whatever started pytest."""
    import os
    import signal

    @app.task(shared=False)
    def restarts_the_worker() -> None:
        os.kill(os.getppid(), signal.SIGCONT)  # harmless if it went through

    with CeleryFaults(app) as faults:
        outcome = faults.run(restarts_the_worker.s())
    assert (outcome.state, type(outcome.exception)) == ("FAILURE", RuntimeError)
    message = str(outcome.exception)
    assert "\n" not in message
    assert message.startswith("celery_faults: the task called os.kill(")
    assert "signal the worker's main process" in message
