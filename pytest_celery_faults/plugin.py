"""pytest wiring: options, ini, markers, fixtures, report. The work happens in the core.

This module is imported by every pytest session where the plugin is installed,
so it imports neither Celery nor the harness at module level.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celery import Celery

    from .harness import CeleryFaults
    from .report import SessionReport

APP_INI = "celery_faults_app"
BROKER_INI = "celery_faults_broker"
SWEEP_FIXTURE = "_celery_faults_sweep_case"
#: The time limit of a harness test when pytest-timeout has none configured.
DEFAULT_TIMEOUT = 300.0
SWEEP_HOWS = ("sigkill", "sigterm", "exit", "power_loss")

MARKERS = (
    "celery_faults(*specs, profile='rabbitmq', workers=1, seed=None, allow_unfired=False): "
    "arm fault specs (e.g. 'sigkill@1', 'tasks.charge:power_loss@0', 'redeliver*2') for "
    "the messages this test publishes; choose the broker profile and the worker count.",
    "redeliver(times=1): every message in the test is delivered `times` more times after "
    "it completes (the at-least-once check).",
    "crash_after(n, how='sigkill', task=None): the child running the (first matching) task "
    "dies after n side effects; how is sigkill, sigterm, exit or power_loss.",
    "fault_sweep(max_effects=5, hows=('sigkill', 'sigterm', 'exit', 'power_loss')): run the "
    "test once per fault kind and side-effect boundary 0..max_effects, ids like "
    "test_x[power_loss@1]; cases beyond the task's side effects are skipped.",
)

report_key: pytest.StashKey[SessionReport] = pytest.StashKey()
verdict_key: pytest.StashKey[str] = pytest.StashKey()
harness_key: pytest.StashKey[CeleryFaults] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-faults", "fault injection for Celery tasks")
    group.addoption(
        "--celery-faults",
        action="append",
        default=[],
        metavar="SPEC",
        dest="celery_faults_specs",
        help="run every test that uses the celery_faults harness under SPEC "
        "(repeatable), e.g. --celery-faults='redeliver*1' as an idempotency gate. "
        "Default: none.",
    )
    group.addoption(
        "--celery-faults-seed",
        action="store",
        type=int,
        default=None,
        metavar="N",
        dest="celery_faults_seed",
        help="seed for every choice the plugin makes (worker order with workers>1). Default: 0.",
    )
    group.addoption(
        "--celery-faults-report",
        action="store",
        default=None,
        metavar="PATH",
        dest="celery_faults_report",
        help="write a JSON report (per test: specs, outcomes, verdict, replay specs) to "
        "PATH; the same seed gives the same bytes. Default: no report.",
    )
    group.addoption(
        "--celery-faults-strict",
        action="store_true",
        default=False,
        dest="celery_faults_strict",
        help="the plugin's warnings (HTTP without timeout, serializer round trips, "
        "decorator order, unbound retry) fail the test. Default: they only warn.",
    )
    group.addoption(
        "--celery-faults-broker",
        action="store",
        default=None,
        metavar="URL",
        dest="celery_faults_broker",
        help="real-broker mode: every celery_faults.run() also runs on a real prefork "
        "worker against URL (amqp://... or redis://...) and fails when the outcome differs "
        "from the emulation. Needs the celery_faults_app ini option. Default: off.",
    )
    parser.addini(
        BROKER_INI,
        help="the broker URL for real-broker mode (as --celery-faults-broker). Default: unset.",
        default=None,
    )
    parser.addini(
        APP_INI,
        help="the Celery app under test as 'module:attribute' (e.g. proj.celery:app); "
        "or override the celery_faults_app fixture. Default: unset.",
        default=None,
    )


def pytest_configure(config: pytest.Config) -> None:
    for marker in MARKERS:
        config.addinivalue_line("markers", marker)
    check_option_specs(config, import_exceptions=False)
    from .report import SessionReport

    config.stash[report_key] = SessionReport(seed=_seed(config))
    if config.pluginmanager.hasplugin("xdist") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(XdistHooks(config), "celery-faults-xdist")


def pytest_report_header(config: pytest.Config) -> str:
    specs = config.getoption("celery_faults_specs", default=[]) or []
    shown = "".join(f" --celery-faults={spec!r}" for spec in specs)
    return f"celery-faults:{shown} --celery-faults-seed={_seed(config)}"


def _seed(config: pytest.Config) -> int:
    seed = config.getoption("celery_faults_seed", default=None)
    return 0 if seed is None else int(seed)


# -- markers ---------------------------------------------------------------------


@dataclass
class MarkerSettings:
    """What the markers on one test ask for (the closest marker wins for keywords)."""

    specs: list[str] = field(default_factory=list)
    profile: str = "rabbitmq"
    workers: int = 1
    seed: int | None = None
    allow_unfired: bool = False


def _celery_faults_marker(
    *specs: str,
    profile: str = "rabbitmq",
    workers: int = 1,
    seed: int | None = None,
    allow_unfired: bool = False,
) -> tuple[tuple[str, ...], dict[str, Any]]:
    return specs, {
        "profile": profile,
        "workers": workers,
        "seed": seed,
        "allow_unfired": allow_unfired,
    }


def _redeliver_marker(times: int = 1) -> str:
    if not isinstance(times, int) or isinstance(times, bool) or times < 1:
        raise ValueError(f"times={times!r}: expected a whole number >= 1")
    return "redeliver" if times == 1 else f"redeliver*{times}"


def _crash_after_marker(n: int, how: str = "sigkill", task: str | None = None) -> str:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n={n!r}: expected a whole number >= 0")
    hows = {"sigkill": "sigkill", "sigterm": "sigterm", "exit": "exit(1)"}
    hows["power_loss"] = "power_loss"
    if how not in hows:
        raise ValueError(f"how={how!r}: expected one of {', '.join(map(repr, hows))}")
    spec = f"{hows[how]}@{n}"
    return f"{task}:{spec}" if task else spec


def _fault_sweep_marker(
    max_effects: int = 5, hows: tuple[str, ...] | list[str] = SWEEP_HOWS
) -> list[str]:
    if not isinstance(max_effects, int) or isinstance(max_effects, bool) or max_effects < 0:
        raise ValueError(f"max_effects={max_effects!r}: expected a whole number >= 0")
    if isinstance(hows, str) or not hows:
        raise ValueError(f"hows={hows!r}: expected a non-empty tuple of fault kinds")
    from .faults import BOUNDARY_KINDS
    from .idempotency import boundary_specs

    for how in hows:
        if how not in BOUNDARY_KINDS or how == "raise":
            raise ValueError(f"hows: {how!r} is not a fault kind with a boundary")
    return boundary_specs(hows, max_effects)


def marker_settings(item: pytest.Item) -> MarkerSettings:
    """Read and validate the plugin's markers on ``item``; errors name the marker."""
    from .broker import BrokerProfile
    from .faults import parse_spec

    settings = MarkerSettings()
    try:
        for mark in reversed(list(item.iter_markers("celery_faults"))):
            specs, _ = _celery_faults_marker(*mark.args, **mark.kwargs)
            settings.specs.extend(specs)
        closest = item.get_closest_marker("celery_faults")
        if closest is not None:
            _, options = _celery_faults_marker(*closest.args, **closest.kwargs)
            settings.profile = options["profile"]
            settings.workers = options["workers"]
            settings.seed = options["seed"]
            settings.allow_unfired = bool(options["allow_unfired"])
        redeliver = item.get_closest_marker("redeliver")
        if redeliver is not None:
            settings.specs.append(_redeliver_marker(*redeliver.args, **redeliver.kwargs))
        crash = item.get_closest_marker("crash_after")
        if crash is not None:
            settings.specs.append(_crash_after_marker(*crash.args, **crash.kwargs))
        sweep = item.get_closest_marker("fault_sweep")
        if sweep is not None:
            _fault_sweep_marker(*sweep.args, **sweep.kwargs)
        for spec in settings.specs:
            parse_spec(spec).import_exceptions()
        BrokerProfile.named(settings.profile)
        workers = settings.workers
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers={workers!r}: expected a whole number >= 1")
    except (TypeError, ValueError) as exc:
        raise MarkerError(f"{item.nodeid}: bad celery-faults marker: {exc}") from None
    return settings


class MarkerError(Exception):
    """A plugin marker with bad arguments (reported as a usage error at collection)."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    sweep = metafunc.definition.get_closest_marker("fault_sweep")
    if sweep is None or SWEEP_FIXTURE not in metafunc.fixturenames:
        return
    try:
        specs = _fault_sweep_marker(*sweep.args, **sweep.kwargs)
    except (TypeError, ValueError):
        return  # pytest_collection_modifyitems reports it, with every other bad marker
    metafunc.parametrize(SWEEP_FIXTURE, specs, ids=specs, indirect=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    errors = []
    names = ("celery_faults", "redeliver", "crash_after", "fault_sweep")
    limit_hung_tasks(config, items)
    if items:
        check_option_specs(config, import_exceptions=True)
    for item in items:
        if any(item.get_closest_marker(name) for name in names):
            try:
                marker_settings(item)
            except MarkerError as exc:
                errors.append(str(exc))
    if errors:
        raise pytest.UsageError("\n".join(errors))


def check_option_specs(config: pytest.Config, *, import_exceptions: bool) -> None:
    """A bad ``--celery-faults`` value is a usage error naming the problem.

    ``pytest_configure`` parses the specs; the exception classes a ``raise(...)``
    names are imported after collection, since one may live in the project under
    test, importable only once collection has set up sys.path.
    """
    from .errors import FaultSpecError
    from .faults import parse_spec

    for spec in config.getoption("celery_faults_specs", default=[]) or []:
        try:
            parsed = parse_spec(spec)
            if import_exceptions:
                parsed.import_exceptions()
        except FaultSpecError as exc:
            raise pytest.UsageError(f"--celery-faults: {exc}") from None


def limit_hung_tasks(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every harness test runs under a time limit: pytest-timeout's, else the plugin's.

    When the limit stops a test inside a task, the failure says which task and
    after which side effect it hung (a note on pytest-timeout's exception).
    """
    if not config.pluginmanager.hasplugin("timeout"):
        return
    configured = (
        config.getoption("timeout", default=None)
        or config.getini("timeout")
        or os.environ.get("PYTEST_TIMEOUT")
    )
    if configured:
        return
    for item in items:
        uses_harness = "celery_faults" in getattr(item, "fixturenames", ())
        if uses_harness and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


def _deadline(item: pytest.Item) -> float | None:
    """When the test's time limit (pytest-timeout's, as it reads it) runs out, on ``monotonic``."""
    import time

    marker = item.get_closest_marker("timeout")
    value: Any = None
    if marker is not None:
        value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
    if value is None:
        config = item.config
        value = config.getoption("timeout", default=None) or os.environ.get("PYTEST_TIMEOUT")
        if value is None and config.pluginmanager.hasplugin("timeout"):
            value = config.getini("timeout")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return time.monotonic() + seconds if seconds > 0 else None


# -- fixtures --------------------------------------------------------------------


@pytest.fixture
def celery_faults_app(request: pytest.FixtureRequest) -> Celery:
    """The Celery app under test, from the ``celery_faults_app`` ini option."""
    value = request.config.getini(APP_INI)
    if not value:
        raise pytest.UsageError(
            f'celery_faults needs the app under test: set `{APP_INI} = "proj.celery:app"` '
            f"in [tool.pytest.ini_options] (or pytest.ini), or override the "
            f"`{APP_INI}` fixture in a conftest.py"
        )
    return load_app(str(value))


def load_app(dotted: str) -> Celery:
    """The app the ini option names; a usage error naming the option when it cannot."""
    from .apps import load_app as load

    try:
        return load(dotted)
    except ValueError as exc:
        raise pytest.UsageError(f"{APP_INI} = {exc}") from None


def _broker_url(config: pytest.Config) -> str | None:
    url = config.getoption("celery_faults_broker", default=None) or config.getini(BROKER_INI)
    return str(url) if url else None


@pytest.fixture(scope="session")
def _celery_faults_real_runner(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One real worker for the session, started on first use (real-broker mode)."""
    from .real.runner import BrokerUnreachable, RealBrokerRunner

    url = _broker_url(request.config)
    app_path = request.config.getini(APP_INI)
    if not url:
        raise pytest.UsageError("real-broker mode needs --celery-faults-broker=URL")
    if not app_path:
        raise pytest.UsageError(
            f"--celery-faults-broker needs the `{APP_INI}` ini option: the real worker "
            f"imports the app by that name"
        )
    try:
        with RealBrokerRunner(str(app_path), url) as runner:
            yield runner
    except BrokerUnreachable as exc:
        pytest.fail(f"--celery-faults-broker: {exc}", pytrace=False)


@pytest.fixture
def _celery_faults_sweep_case(request: pytest.FixtureRequest) -> str | None:
    """The spec of this ``fault_sweep`` case, or ``None`` outside a sweep."""
    return getattr(request, "param", None)


@pytest.fixture
def celery_faults(
    request: pytest.FixtureRequest,
    celery_faults_app: Celery,
    _celery_faults_sweep_case: str | None,
) -> Iterator[CeleryFaults]:
    """The fault-injection harness for this test, active for its whole duration."""
    from .errors import CeleryFaultsWarning
    from .harness import CeleryFaults
    from .report import record_harness

    settings = marker_settings(request.node)
    config = request.config
    broker_url = _broker_url(config)
    profile = settings.profile
    if broker_url:
        from .real.runner import profile_for

        profile = profile_for(broker_url)
    harness = CeleryFaults(
        celery_faults_app,
        profile=profile,
        workers=settings.workers,
        seed=settings.seed if settings.seed is not None else _seed(config),
        check_unfired=not settings.allow_unfired,
    )
    harness.deadline = _deadline(request.node)
    specs = list(settings.specs)
    if _celery_faults_sweep_case is not None:
        specs.append(_celery_faults_sweep_case)
    harness.start()
    try:
        harness.inject(*specs)
        for spec in config.getoption("celery_faults_specs", default=[]) or []:
            harness.arm_suite_wide(spec)
        request.node.stash[harness_key] = harness
        if broker_url:
            from functools import partial

            from .real.compare import check_against_real

            runner = request.getfixturevalue("_celery_faults_real_runner")
            runner.track = harness.tracked  # the child tracks what the test tracks
            harness.after_run.append(partial(check_against_real, runner))
        yield harness
    finally:
        harness.stop()
    record = record_harness(request.node.nodeid, harness, specs, list(harness.warnings))
    record.verdict = request.node.stash.get(verdict_key, "passed")
    config.stash[report_key].add(record)
    if harness.warnings and config.getoption("celery_faults_strict"):
        pytest.fail(
            "celery_faults (--celery-faults-strict):\n  " + "\n  ".join(harness.warnings),
            pytrace=False,
        )
    for problem in harness.warnings:
        warnings.warn(CeleryFaultsWarning(problem), stacklevel=1)
    if not settings.allow_unfired and _celery_faults_sweep_case is None:
        harness.assert_all_fired()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when != "call":
        return report
    item.stash[verdict_key] = report.outcome
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


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    report = config.stash.get(report_key, None)
    if report is None or not report.records:
        return
    terminalreporter.section("celery-faults")
    for line in report.summary_lines():
        terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    config = session.config
    path = config.getoption("celery_faults_report", default=None)
    report = config.stash.get(report_key, None)
    if not path or report is None:
        return
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # an xdist worker: the controller writes the file
        config.workeroutput["celery_faults_report"] = report.to_json()  # type: ignore[attr-defined]
        return
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(report.to_json())


class XdistHooks:
    """Merge the workers' records into the controller's report (registered when xdist runs)."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        import json

        from .report import TestRecord

        data = getattr(node, "workeroutput", {}).get("celery_faults_report")
        if not data:
            return
        report = self.config.stash[report_key]
        for nodeid, test in json.loads(data)["tests"].items():
            record = TestRecord(
                nodeid,
                test["specs"],
                test["suite_wide_specs"],
                test["outcomes"],
                test["unfired"],
                test["suite_wide_unfired"],
                test["warnings"],
                test["verdict"],
            )
            report.add(record)
        report.records.sort(key=lambda record: record.nodeid)
