"""The pytest side of exploring: ``--celery-faults-explore=N`` and the failure database's ini.

Imported by the plugin in every suite, so it imports pytest alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

DATABASE_INI = "celery_faults_explore_db"
DEFAULT_DIRECTORY = ".celery-faults"


@dataclass
class ExploreDefaults:
    """What the plugin sets for every test: the suite-wide budget, the database, the test id.

    ``reports`` gathers the summary of each ``explore()`` of the test (for the HTML page).
    """

    budget: int | None = None
    database: str | Path | None = None
    key: str | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)


#: Each test's ExploreDefaults, by node id: what its explore() calls found.
explored_key: pytest.StashKey[dict[str, ExploreDefaults]] = pytest.StashKey()


def _budget(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise pytest.UsageError(
            f"--celery-faults-explore={text!r}: expected a whole number of runs >= 1"
        )
    return value


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-faults")
    group.addoption(
        "--celery-faults-explore",
        action="store",
        default=None,
        metavar="N",
        dest="celery_faults_explore",
        type=_budget,
        help="the budget of celery_faults.explore(): runs searched per call, in every test "
        "that does not set budget= itself. Default: 100.",
    )
    group.addoption(
        "--celery-faults-html",
        action="store",
        default=None,
        metavar="PATH",
        dest="celery_faults_html",
        help="write one self-contained HTML page to PATH: per test, the sweep as a matrix "
        "(fault kind by boundary, each cell coloured by its class, a click shows its "
        "replay), explore()'s counts per task, the gate's per-spec counts. Default: none.",
    )
    parser.addini(
        DATABASE_INI,
        help="the directory where explore() saves failing schedules per test (replayed "
        f"first next time; fit to commit or to cache in CI). Default: {DEFAULT_DIRECTORY}",
        default=DEFAULT_DIRECTORY,
    )


def explore_defaults(request: pytest.FixtureRequest) -> ExploreDefaults:
    """The budget, database and key explore() uses in this test."""
    config = request.config
    directory = config.getini(DATABASE_INI) or DEFAULT_DIRECTORY
    defaults = ExploreDefaults(
        budget=config.getoption("celery_faults_explore", default=None),
        database=Path(config.rootpath, directory),
        key=request.node.nodeid,
    )
    config.stash.setdefault(explored_key, {})[request.node.nodeid] = defaults
    return defaults


def configure(config: pytest.Config) -> None:
    """With ``--celery-faults-html``, the page is written when the session finishes.

    Under xdist each worker hands its explore() summaries to the controller,
    which merges them and writes the one page.
    """
    if not config.getoption("celery_faults_html", default=None):
        return
    if hasattr(config, "workerinput"):
        config.pluginmanager.register(WorkerHooks(config), "celery-faults-html-worker")
        return
    config.pluginmanager.register(HtmlHooks(config), "celery-faults-html")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistMerge(config), "celery-faults-html-xdist")


def _explored(config: pytest.Config) -> dict[str, list[dict[str, Any]]]:
    every = config.stash.get(explored_key, {})
    return {nodeid: every[nodeid].reports for nodeid in sorted(every) if every[nodeid].reports}


class WorkerHooks:
    """On an xdist worker: its tests' explore() summaries go to the controller."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        import json

        output = self.config.workeroutput  # type: ignore[attr-defined]
        output["celery_faults_explored"] = json.dumps(_explored(self.config))


class XdistMerge:
    """On the controller: each worker's summaries join the controller's, by node id."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        import json

        data = getattr(node, "workeroutput", {}).get("celery_faults_explored")
        if not data:
            return
        every = self.config.stash.setdefault(explored_key, {})
        for nodeid, reports in json.loads(data).items():
            every.setdefault(nodeid, ExploreDefaults(key=nodeid)).reports.extend(reports)


class HtmlHooks:
    """Writes the HTML page on the controller (xdist workers' records are merged by then)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        import json

        from ..plugin import report_key
        from .report_html import render

        config = self.config
        report = config.stash.get(report_key, None)
        if report is None:
            return
        path = str(config.getoption("celery_faults_html"))
        specs = list(config.getoption("celery_faults_specs", default=[]) or [])
        gate = {spec: report.fired_in(spec) for spec in specs}
        page = render(json.loads(report.to_json()), _explored(config), gate)
        try:
            Path(path).write_text(page, encoding="utf-8")
        except OSError as exc:  # say so, do not crash: the run's results stand
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(
                    f"ERROR: --celery-faults-html={path!r}: the page could not be written "
                    f"({exc.strerror or exc})"
                )
            if session.exitstatus == pytest.ExitCode.OK:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
