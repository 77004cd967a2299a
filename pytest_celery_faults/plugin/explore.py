"""The pytest side of exploring: ``--celery-faults-explore=N`` and the failure database's ini.

Imported by the plugin in every suite, so it imports pytest alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ..explore.defaults import ExploreDefaults

DATABASE_INI = "celery_faults_explore_db"
DEFAULT_DIRECTORY = ".celery-faults"
#: The marker that splits a test's explore() into shards pytest-xdist can spread.
SHARDS = "explore_shards"
SHARD_PARAMETER = "_celery_faults_explore_shard"
MAX_SHARDS = 1000
SHARDS_MARKER = (
    f"{SHARDS}(n): run the test n times, each explore() of it searching its own seed range "
    f"(seed + shard) with its share of the budget; the cases spread over pytest-xdist "
    f"workers, ids like test_x[explore-1/n] (n from 1 to {MAX_SHARDS})."
)


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
    callspec = getattr(request.node, "callspec", None)
    shard = callspec.params.get(SHARD_PARAMETER) if callspec is not None else None
    defaults = ExploreDefaults(
        budget=config.getoption("celery_faults_explore", default=None),
        database=Path(config.rootpath, directory),
        key=request.node.nodeid,
        shard=shard,
    )
    config.stash.setdefault(explored_key, {})[request.node.nodeid] = defaults
    return defaults


def configure(config: pytest.Config) -> None:
    """With ``--celery-faults-html``, the page is written when the session finishes.

    Under xdist each worker hands its explore() summaries to the controller,
    which merges them and writes the one page.
    """
    config.addinivalue_line("markers", SHARDS_MARKER)
    config.pluginmanager.register(ShardHooks(), "celery-faults-explore-shards")
    if not config.getoption("celery_faults_html", default=None):
        return
    if hasattr(config, "workerinput"):
        config.pluginmanager.register(WorkerHooks(config), "celery-faults-html-worker")
        return
    config.pluginmanager.register(HtmlHooks(config), "celery-faults-html")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistMerge(config), "celery-faults-html-xdist")


class ShardHooks:
    """``@pytest.mark.explore_shards(n)``: one test case per shard, each its own seed range."""

    @pytest.hookimpl
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        marker = metafunc.definition.get_closest_marker(SHARDS)
        if marker is None:
            return
        count = marker.args[0] if len(marker.args) == 1 and not marker.kwargs else None
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SHARDS:
            given = [*map(repr, marker.args), *(f"{k}={v!r}" for k, v in marker.kwargs.items())]
            shown = ", ".join(given)
            raise ValueError(
                f"{metafunc.definition.nodeid}: @pytest.mark.{SHARDS}({shown}): expected one "
                f"whole number of shards from 1 to {MAX_SHARDS}, as in {SHARDS}(4)"
            )
        metafunc.fixturenames.append(SHARD_PARAMETER)
        shards = [(index, count) for index in range(count)]
        ids = [f"explore-{index + 1}/{count}" for index in range(count)]
        metafunc.parametrize(SHARD_PARAMETER, shards, ids=ids)


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

        from ..explore.report_html import render
        from .stash import report_key

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
