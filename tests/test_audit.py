"""The audit: risky task settings found, each proven by a scenario the audit runs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from celery import Celery

from pytest_celery_faults.session.audit import RULE_IDS, Suppression, audit_app

#: One task per rule, and one safe task; the broker is Redis with a short visibility timeout.
RISKY = """
from celery import Celery

app = Celery("proj", set_as_current=False, broker="redis://127.0.0.1:1/0")
app.conf.broker_transport_options = {"visibility_timeout": 60}


@app.task(name="proj.late", shared=False, acks_late=True, time_limit=30)
def late(order_id):
    pass


@app.task(name="proj.early", shared=False, time_limit=30)
def early(order_id):
    pass


@app.task(name="proj.long", shared=False, acks_late=True, reject_on_worker_lost=True)
def long(order_id):
    pass


@app.task(
    name="proj.slow_retry", shared=False, acks_late=True, reject_on_worker_lost=True,
    time_limit=30, default_retry_delay=120,
)
def slow_retry(order_id):
    pass


@app.task(
    name="proj.safe", shared=False, acks_late=True, reject_on_worker_lost=True, time_limit=30
)
def safe(order_id):
    pass
"""

SAFE_TASK = RISKY[RISKY.index('@app.task(\n    name="proj.safe"') :]

SUITE = """
def test_nothing_to_do_with_celery():
    assert True
"""


@pytest.fixture
def risky(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(proj=RISKY, test_suite=SUITE)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    return pytester


def test_each_rule_is_found_on_its_task_with_its_proof(risky: pytest.Pytester) -> None:
    result = risky.runpytest_subprocess("--celery-faults-audit", "-p", "no:randomly")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*celery-faults audit*",
            "CF002 early-ack-loses-on-crash: proj.early (*proj.py:12): early ack*"
            "proof: --celery-faults='proj.early:sigkill@0'",
            "CF001 acks-late-without-reject-on-worker-lost: proj.late (*proj.py:7)*"
            "proof: --celery-faults='proj.late:sigkill@0'",
            "CF003 runs-beyond-visibility-timeout: proj.long *no time limit*"
            "proof: --celery-faults='proj.long:overlap'",
            "CF004 retry-delay-beyond-redelivery: proj.slow_retry *120 s beyond*"
            "visibility_timeout of 60 s*proof: --celery-faults='proj.slow_retry:ok' "
            "(published with countdown=120)",
            "audit: 5 task(s), 4 finding(s), 0 suppressed, 0 not reproduced",
        ]
    )
    assert "proj.safe" not in result.stdout.str()


def test_a_safe_app_passes_the_audit(pytester: pytest.Pytester) -> None:
    safe_only = RISKY.split('@app.task(name="proj.late"')[0] + SAFE_TASK
    pytester.makepyfile(proj=safe_only, test_suite=SUITE)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    result = pytester.runpytest_subprocess("--celery-faults-audit", "-p", "no:randomly")
    result.stdout.fnmatch_lines(["audit: 1 task(s), 0 finding(s), 0 suppressed, 0 not reproduced"])
    assert result.ret == pytest.ExitCode.OK


def test_suppressions_need_a_reason_and_name_a_rule(risky: pytest.Pytester) -> None:
    risky.makeini(
        "[pytest]\ncelery_faults_app = proj:app\n"
        "celery_faults_audit_suppress =\n"
        "    CF002:proj.early fire-and-forget notification, losing one is fine\n"
        "    CF001 every late task here is guarded by an outbox\n"
        "    CF003:proj.long the task has its own lock\n"
        "    CF004:proj.slow_retry retries are rare\n"
    )
    result = risky.runpytest_subprocess("--celery-faults-audit", "-p", "no:randomly")
    result.stdout.fnmatch_lines(["audit: 5 task(s), 0 finding(s), 4 suppressed, 0 not reproduced"])
    assert result.ret == pytest.ExitCode.OK
    risky.makeini("[pytest]\ncelery_faults_app = proj:app\ncelery_faults_audit_suppress = CF002\n")
    result = risky.runpytest_subprocess("--celery-faults-audit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*'CF002': give a reason after the rule*"])
    risky.makeini(
        "[pytest]\ncelery_faults_app = proj:app\ncelery_faults_audit_suppress = CF9 why\n"
    )
    result = risky.runpytest_subprocess("--celery-faults-audit")
    result.stderr.fnmatch_lines(["*unknown rule 'CF9' (rules: CF001, CF002, CF003, CF004)*"])


def test_the_findings_go_to_the_json_report_and_sarif(risky: pytest.Pytester) -> None:
    result = risky.runpytest_subprocess(
        "--celery-faults-audit",
        "--celery-faults-report=report.json",
        "--celery-faults-sarif=audit.sarif",
        "-p",
        "no:randomly",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    audit = json.loads((risky.path / "report.json").read_text())["audit"]
    assert [(f["rule"], f["task"]) for f in audit["findings"]] == [
        ("CF002", "proj.early"),
        ("CF001", "proj.late"),
        ("CF003", "proj.long"),
        ("CF004", "proj.slow_retry"),
    ]
    sarif = json.loads((risky.path / "audit.sarif").read_text())
    (run,) = sarif["runs"]
    assert sarif["version"] == "2.1.0"
    assert {rule["id"] for rule in run["tool"]["driver"]["rules"]} == RULE_IDS
    first = run["results"][0]
    assert first["ruleId"] == "CF002"
    assert first["locations"][0]["physicalLocation"] == {
        "artifactLocation": {"uri": "proj.py"},
        "region": {"startLine": 12},
    }


def test_the_audit_needs_the_app_ini(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest_subprocess("--celery-faults-audit")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--celery-faults-audit needs the celery_faults_app ini option*"])


# -- the core, without pytest ------------------------------------------------------


def make_app(**late_options: Any) -> Celery:
    app = Celery("audited", set_as_current=False)

    @app.task(name="audited.job", acks_late=True, shared=False, **late_options)
    def job(order_id: int) -> None:
        pass

    return app


def findings(app: Celery, **options: Any) -> list[tuple[str, str]]:
    """The findings on this module's task (``@shared_task``s of other tests join every app)."""
    report = audit_app(app, **options)
    return [(f.rule.id, f.task) for f in report.findings if f.task.startswith("audited.")]


def test_a_task_may_suppress_a_rule_on_itself_with_a_reason() -> None:
    report = audit_app(make_app(celery_faults_suppress={"CF001": "an outbox replays it"}))
    assert [f for f in report.findings if f.task == "audited.job"] == []
    assert report.suppressed == [("CF001", "audited.job", "an outbox replays it")]
    with pytest.raises(ValueError, match=r"celery_faults_suppress\['CF001'\] needs a reason"):
        audit_app(make_app(celery_faults_suppress={"CF001": " "}))


def test_a_rule_whose_proof_does_not_reproduce_is_not_reported() -> None:
    from pytest_celery_faults.session import audit

    never = audit.Rule(
        "CF001",
        "never-shown",
        "warning",
        lambda settings: "a risk on paper",
        lambda settings: audit.Proof(f"{settings.task}:ok", lambda outcome: outcome.lost),
    )
    report = audit_app(make_app(reject_on_worker_lost=True), rules=[never])
    assert report.findings == []
    assert ("CF001", "audited.job") in report.unproven


def test_the_task_settings_win_over_the_app_settings() -> None:
    app = make_app(reject_on_worker_lost=True)
    app.conf.task_reject_on_worker_lost = False
    assert findings(app) == []
    app = make_app()
    app.conf.task_reject_on_worker_lost = True
    assert findings(app) == []
    app = make_app()
    assert findings(app) == [("CF001", "audited.job")]
    assert Suppression.parse("CF001:audited.job why not").task == "audited.job"
