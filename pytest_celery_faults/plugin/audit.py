"""``--celery-faults-audit``: the pytest side of the audit (see :mod:`.audit`).

Registered by the plugin's ``pytest_configure`` when the option is given. The audit runs when the
session finishes, so every task the tests imported is registered; its findings
go to the terminal summary, the JSON report and, with
``--celery-faults-sarif=PATH``, a SARIF file; a finding left unsuppressed fails
the session.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from ..session.audit import AuditReport, Suppression

from .options import APP_INI

SUPPRESS_INI = "celery_faults_audit_suppress"


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-faults")
    group.addoption(
        "--celery-faults-audit",
        action="store_true",
        default=False,
        dest="celery_faults_audit",
        help="check every task of the celery_faults_app app for risky settings (acks_late "
        "without reject_on_worker_lost, runs or retries beyond the broker's visibility "
        "timeout, early ack); each finding is proven by a fault scenario the audit runs, "
        "and fails the session unless suppressed. Default: off.",
    )
    group.addoption(
        "--celery-faults-sarif",
        action="store",
        default=None,
        metavar="PATH",
        dest="celery_faults_sarif",
        help="with --celery-faults-audit, write the findings as SARIF 2.1.0 to PATH. "
        "Default: none.",
    )
    parser.addini(
        SUPPRESS_INI,
        type="linelist",
        default=[],
        help="audit findings to suppress, one per line: 'RULE[:TASK] REASON' "
        "(e.g. 'CF002:proj.tasks.ping only reads'). Default: none.",
    )


class AuditHooks:
    """Runs the audit once, at the end of the session, on the controller."""

    def __init__(self, config: pytest.Config, suppressions: list[Suppression]) -> None:
        self.config = config
        self.suppressions = suppressions
        self.report: AuditReport | None = None
        self.error: str | None = None

    @classmethod
    def configure(cls, config: pytest.Config) -> None:
        if not config.getoption("celery_faults_audit", default=False):
            if config.getoption("celery_faults_sarif", default=None):
                raise pytest.UsageError("--celery-faults-sarif needs --celery-faults-audit")
            return
        if hasattr(config, "workerinput"):  # an xdist worker: the controller audits
            return
        if not config.getini(APP_INI):
            raise pytest.UsageError(
                f"--celery-faults-audit needs the {APP_INI} ini option (the app to audit, "
                f"as 'module:attribute')"
            )
        from ..session.audit import Suppression

        try:
            suppressions = [Suppression.parse(line) for line in config.getini(SUPPRESS_INI)]
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        config.pluginmanager.register(cls(config, suppressions), "celery-faults-audit")

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from ..apps import load_app
        from ..session.audit import audit_app, profile_of

        try:
            app = load_app(str(self.config.getini(APP_INI)))
            self.report = audit_app(app, profile_of(app), self.suppressions)
        except ValueError as exc:
            self.error = str(exc)
            session.exitstatus = pytest.ExitCode.USAGE_ERROR
            return
        from .stash import report_key

        session_report = self.config.stash.get(report_key, None)
        if session_report is not None:
            session_report.audit = self.report.to_json()
        sarif = self.config.getoption("celery_faults_sarif", default=None)
        if sarif:
            with open(sarif, "w", encoding="utf-8") as handle:
                handle.write(self.report.to_sarif(root=str(self.config.rootpath)))
        if self.report.findings and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.section("celery-faults audit")
        if self.error is not None:
            terminalreporter.write_line(f"audit: {self.error}")
            return
        if self.report is not None:
            for line in self.report.summary_lines():
                terminalreporter.write_line(line)
