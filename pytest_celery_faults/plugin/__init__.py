"""The pytest11 entry point: the plugin's hooks, top to bottom; the work is in the modules beside.

- :mod:`.options`: the command-line options and ini settings, each checked at start;
- :mod:`.markers`: the markers, validated at collection, and the ``fault_sweep`` cases;
- :mod:`.timeouts`: the one place that reads pytest-timeout's settings;
- :mod:`.fixtures`: ``celery_faults``, ``celery_faults_app`` and real-broker mode's worker;
- :mod:`.gate_hooks`: the eager gate of a test that runs tasks eagerly;
- :mod:`.report_hooks`: each test's record, the summary, the JSON report, xdist;
- :mod:`.audit`: ``--celery-faults-audit``;
- :mod:`.explore`: ``--celery-faults-explore``, ``--celery-faults-html``, ``explore_shards``.

This module is imported by every pytest session where the plugin is installed,
so neither it nor those modules import Celery or the harness at module level.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from .audit import AuditHooks
from .audit import add_options as add_audit_options
from .explore import add_options as add_explore_options
from .explore import configure as configure_explore
from .fixtures import (
    _celery_faults_real_runner,
    _celery_faults_sweep_case,
    celery_faults,
    celery_faults_app,
    celery_faults_real_isolation,
    check_app_setting,
)
from .gate_hooks import eager_gate
from .markers import MARKERS, check_markers, parametrize_sweep
from .options import (
    add_ini,
    add_options,
    check_broker_url,
    check_option_specs,
    check_report_path,
    session_seed,
)
from .report_hooks import XdistHooks, finish_session, judge_report, write_summary
from .stash import report_key
from .timeouts import limit_hung_tasks

#: The fixtures pytest registers from this module (it collects them by name from here).
FIXTURES = (
    celery_faults,
    celery_faults_app,
    celery_faults_real_isolation,
    _celery_faults_real_runner,
    _celery_faults_sweep_case,
)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)
    add_audit_options(parser)  # ``pytest --help`` lists its ini setting before the others
    add_explore_options(parser)
    add_ini(parser)


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    check_option_specs(config, import_exceptions=False)
    check_report_path(config)
    check_broker_url(config)
    AuditHooks.configure(config)
    configure_explore(config)
    from ..session.report import SessionReport

    config.stash[report_key] = SessionReport(seed=session_seed(config))
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(XdistHooks(config), "celery-faults-xdist")


def pytest_report_header(config: pytest.Config) -> str:
    specs = config.getoption("celery_faults_specs", default=[]) or []
    shown = "".join(f" --celery-faults={spec!r}" for spec in specs)
    return f"celery-faults:{shown} --celery-faults-seed={session_seed(config)}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize_sweep(metafunc)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    limit_hung_tasks(config, items)
    if items:
        check_option_specs(config, import_exceptions=True)
    check_markers(items)
    check_app_setting(config, items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """The eager gate: with ``--celery-faults``, eager task runs go through the emulated worker."""
    gate = eager_gate(item)
    if gate is None:
        return (yield)
    with gate.open():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    return judge_report(item, call, report)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    write_summary(terminalreporter, exitstatus, config)


def pytest_sessionfinish(session: pytest.Session) -> None:
    finish_session(session)
