"""The CI gate, the fault_sweep marker, the JSON report and the terminal summary."""

from __future__ import annotations

import json

import pytest

APP = """
from celery import Celery

app = Celery("proj", set_as_current=False)
ledger = []


def write(row):
    ledger.append(row)


@app.task(name="proj.append_row", acks_late=True, shared=False)
def append_row(n):
    write(n)


@app.task(name="proj.upsert_row", acks_late=True, reject_on_worker_lost=True, shared=False)
def upsert_row(n):
    if n not in ledger:
        write(n)
"""

SUITE = """
import proj


def test_append(celery_faults):
    proj.ledger.clear()
    celery_faults.track("proj.write")
    proj.append_row.delay(1)
    celery_faults.drain()
    assert proj.ledger == [1]


def test_upsert(celery_faults):
    proj.ledger.clear()
    celery_faults.track("proj.write")
    proj.upsert_row.delay(1)
    celery_faults.drain()
    assert proj.ledger == [1]


def test_without_the_harness():
    assert True
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(proj=APP, test_suite=SUITE)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    return pytester


def test_the_suite_is_green_without_the_gate(project: pytest.Pytester) -> None:
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["celery-faults: --celery-faults-seed=0"])


def test_the_gate_catches_the_non_idempotent_task(project: pytest.Pytester) -> None:
    result = project.runpytest("-p", "no:randomly", "--celery-faults=redeliver*1")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [
            "celery-faults: --celery-faults='redeliver*1' --celery-faults-seed=0",
            "*def test_append(celery_faults):*",
            "E       assert [[]1, 1[]] == [[]1[]]",
            "*= celery-faults =*",
            "2 test(s) used the harness, 0 ran tasks eagerly through the gate: 2 task(s) "
            "exercised, 2 message(s), 2 fault(s) injected, 0 scenario(s) classed (seed 0)",
            "FAILED test_suite.py::test_append (replay: pytest 'test_suite.py::test_append' "
            "--celery-faults='redeliver*1')",
        ]
    )


def test_the_report_is_the_same_bytes_for_the_same_seed(project: pytest.Pytester) -> None:
    first = project.path / "first.json"
    second = project.path / "second.json"
    for path in (first, second):
        project.runpytest(
            "-p", "no:randomly", "--celery-faults=redeliver", f"--celery-faults-report={path}"
        )
    assert first.read_bytes() == second.read_bytes()
    document = json.loads(first.read_text())
    append = document["tests"]["test_suite.py::test_append"]
    assert append["verdict"] == "failed"
    assert append["replay"] == ["redeliver"]
    assert [o["deliveries"] for o in append["outcomes"]] == [2]
    assert document["totals"]["failed"] == 1
    assert "test_suite.py::test_without_the_harness" not in document["tests"]


def test_suite_wide_spec_that_never_fires_is_named_in_each_test(project: pytest.Pytester) -> None:
    result = project.runpytest("-p", "no:randomly", "--celery-faults=sigkill@7")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["never fired: sigkill@7 in test_suite.py::test_append"])


def test_a_suite_wide_spec_that_fired_in_no_test_fails_the_session(
    project: pytest.Pytester,
) -> None:
    result = project.runpytest(
        "-p",
        "no:randomly",
        "--celery-faults=proj.upsert_row:redeliver",
        "--celery-faults=sigkill@7",
    )
    result.assert_outcomes(passed=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "--celery-faults='proj.upsert_row:redeliver' fired in 1 of the 2 test(s) that ran "
            "tasks under it",
            "FAILED: --celery-faults='sigkill@7' fired in no test of the session (2 test(s) ran "
            "tasks under it): the gate proved nothing; --celery-faults-allow-unfired accepts this",
        ]
    )


def test_allow_unfired_lets_a_spec_that_fired_nowhere_pass(project: pytest.Pytester) -> None:
    result = project.runpytest(
        "-p", "no:randomly", "--celery-faults=sigkill@7", "--celery-faults-allow-unfired"
    )
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "--celery-faults='sigkill@7' fired in no test of the session "
            "(allowed by --celery-faults-allow-unfired)"
        ]
    )


def test_a_spec_that_fired_nowhere_fails_a_session_that_ran_no_task(
    project: pytest.Pytester,
) -> None:
    result = project.runpytest(
        "-p", "no:randomly", "-k", "without_the_harness", "--celery-faults=redeliver"
    )
    result.assert_outcomes(passed=1, deselected=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        ["FAILED: --celery-faults='redeliver' fired in no test of the session (0 test(s)*"]
    )


def test_a_spec_that_fired_before_a_reset_counts_as_fired(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_suite="""
        import proj

        def test_upsert_then_reset(celery_faults):
            proj.ledger.clear()
            proj.upsert_row.delay(1)
            celery_faults.drain()
            assert proj.ledger == [1]
            celery_faults.reset()  # a fresh scenario: the spec is armed again
        """
    )
    result = project.runpytest("-p", "no:randomly", "--celery-faults=redeliver")
    result.assert_outcomes(passed=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        ["--celery-faults='redeliver' fired in 1 of the 1 test(s) that ran tasks under it"]
    )


def test_xdist_workers_counts_add_up_on_the_controller(project: pytest.Pytester) -> None:
    # One file per worker (--dist=loadfile): the spec fires on one worker only.
    head, append, upsert = SUITE.split("\n\n\n")[:3]
    (project.path / "test_suite.py").unlink()
    project.makepyfile(test_a=f"{head}\n\n\n{append}\n", test_b=f"{head}\n\n\n{upsert}\n")
    args = ("-p", "no:randomly", "-v", "-n", "2", "--dist=loadfile")
    result = project.runpytest(*args, "--celery-faults=proj.upsert_row:redeliver")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines_random(["*[[]gw0[]]*PASSED*", "*[[]gw1[]]*PASSED*"])
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(
        [
            "2 test(s) used the harness*",
            "--celery-faults='proj.upsert_row:redeliver' fired in 1 of the 2 test(s) that ran "
            "tasks under it",
        ]
    )


def test_fault_sweep_parametrizes_and_skips_beyond_the_task(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(proj=APP)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    pytester.makepyfile(
        test_sweep="""
        import pytest, proj

        @pytest.mark.fault_sweep(max_effects=2, hows=("sigkill", "power_loss"))
        def test_upsert(celery_faults):
            proj.ledger.clear()
            celery_faults.track("proj.write")
            outcome = celery_faults.run(proj.upsert_row.s(4))
            assert outcome.state == "SUCCESS"
            assert proj.ledger == [4]
        """
    )
    result = pytester.runpytest("-p", "no:randomly", "-v", "-rs")
    result.assert_outcomes(passed=4, skipped=2)
    result.stdout.fnmatch_lines(
        [
            "*test_upsert[[]sigkill@0[]] PASSED*",
            "*test_upsert[[]sigkill@2[]] SKIPPED*",
            "*test_upsert[[]power_loss@1[]] PASSED*",
            "*sigkill@2 is beyond the 1 side effect(s) the task reached; nothing to test*",
        ]
    )


def test_bad_fault_sweep_arguments_are_usage_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.fault_sweep(hows=("sigkil",))
        def test_x(celery_faults):
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*hows: 'sigkil' is not a fault kind with a boundary*"])
