"""The plugin's report: each test's record and verdict, the summary, the JSON file, xdist.

Every test that ran tasks under the plugin (the harness or the eager gate)
leaves a record in the session's
:class:`~pytest_celery_faults.session.report.SessionReport`; the controller
merges the xdist workers' records, fails a ``--celery-faults`` gate that proved
nothing, prints the summary and writes ``--celery-faults-report``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

from .markers import SWEEP_FIXTURE
from .stash import gate_key, harness_key, report_error_key, report_key, verdict_key

if TYPE_CHECKING:
    from ..session.report import SessionReport


def judge_report(
    item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport
) -> pytest.TestReport:
    """Fill the test's report: the verdict, the eager gate's record, a sweep case beyond reach.

    A :class:`~pytest_celery_faults.errors.ConfigError` reads as one line; a
    ``fault_sweep`` case past the side effects the task reached is skipped.
    """
    if call.excinfo is not None and report.failed:
        from ..errors import ConfigError

        if call.excinfo.errisinstance(ConfigError):  # a setting: one line, not our frames
            report.longrepr = f"celery_faults: {call.excinfo.value}"
    if report.when != "call":
        return report
    item.stash[verdict_key] = report.outcome
    gate = item.stash.get(gate_key, None)
    if gate is not None and gate.tally.calls:
        from ..session.report import record_gate

        item.config.stash[report_key].add(record_gate(item.nodeid, gate, report.outcome))
        if report.failed:  # the test's own assertion failed: say what the worker did
            report.sections.append(("celery-faults: what the eager gate ran", gate.story()))
    case = getattr(getattr(item, "callspec", None), "params", {}).get(SWEEP_FIXTURE)
    harness = item.stash.get(harness_key, None)
    if case is not None and harness is not None and report.passed and harness.unfired():
        reached = max((record.effects for record in harness.records), default=0)
        report.outcome = "skipped"
        report.longrepr = (
            str(item.path),
            item.location[1] or 0,
            f"Skipped: {case} is beyond the {reached} side effect(s) the task reached; "
            f"nothing to test",
        )
        item.stash[verdict_key] = "skipped"
    return report


def write_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """The ``celery-faults`` section of the terminal summary; none when the plugin did nothing."""
    report = config.stash.get(report_key, None)
    specs = config.getoption("celery_faults_specs", default=[]) or []
    written = config.stash.get(report_error_key, None)
    if report is None or not (report.records or specs or written):
        return
    from ..session.summary import summary_lines

    terminalreporter.section("celery-faults")
    allow = bool(config.getoption("celery_faults_allow_unfired", default=False))
    ran = exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)  # not cut short
    for line in summary_lines(report, specs if ran else [], allow_unfired=allow):
        terminalreporter.write_line(line)
    if written:
        terminalreporter.write_line(f"ERROR: {written}")


def finish_session(session: pytest.Session) -> None:
    """Sum up the session: judge the gate's specs and write the JSON report (on the controller)."""
    config = session.config
    path = config.getoption("celery_faults_report", default=None)
    report = config.stash.get(report_key, None)
    if report is None:
        return
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller sums up and writes the file
        config.workeroutput["celery_faults_report"] = report.to_json()  # type: ignore[attr-defined]
        return
    fail_unfired_gate(session, report)
    if not path:
        return
    try:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(report.to_json())
    except OSError as exc:  # a disk that filled up during the run: say so, do not crash
        config.stash[report_error_key] = (
            f"--celery-faults-report={path!r}: the report could not be written "
            f"({exc.strerror or exc}); the run's results above stand, the file is missing"
        )
        if session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def fail_unfired_gate(session: pytest.Session, report: SessionReport) -> None:
    """A ``--celery-faults`` spec that fired in no test fails the session (unless allowed).

    Judged on the controller, after every xdist worker's records were merged.
    The summary names each such spec; a session already failing keeps its status.
    """
    config = session.config
    specs = config.getoption("celery_faults_specs", default=[]) or []
    if not specs or config.getoption("collectonly", default=False):
        return
    if config.getoption("celery_faults_allow_unfired", default=False):
        return
    if report.unfired_gate(specs) and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


class XdistHooks:
    """Merge the workers' records into the controller's report (registered when xdist runs)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        import json

        from ..session.report import TestRecord

        data = getattr(node, "workeroutput", {}).get("celery_faults_report")
        if not data:
            return
        report = self.config.stash[report_key]
        document = json.loads(data)
        report.exempt.update(document["exempt"])
        for nodeid, test in document["tests"].items():
            record = TestRecord.from_json(nodeid, test)
            report.add(record)
        report.records.sort(key=lambda record: record.nodeid)
