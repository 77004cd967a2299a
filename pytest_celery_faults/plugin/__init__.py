"""pytest wiring: options, ini, markers, fixtures, report. The work happens in the core.

This module is imported by every pytest session where the plugin is installed,
so it imports neither Celery nor the harness at module level.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celery import Celery

    from ..harness import CeleryFaults
    from ..session.gate import EagerGate
    from ..session.report import SessionReport

APP_INI = "celery_faults_app"
BROKER_INI = "celery_faults_broker"
SWEEP_FIXTURE = "_celery_faults_sweep_case"
#: The time limit of a harness test when pytest-timeout has none configured.
DEFAULT_TIMEOUT = 300.0
SWEEP_HOWS = ("sigkill", "sigterm", "exit", "power_loss")
EXEMPT = "celery_faults_exempt"
#: A fault_sweep makes one test case per kind and boundary; more boundaries than this is a typo.
MAX_SWEEP_EFFECTS = 100

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
    "test_x[power_loss@1] (max_effects at most 100); cases beyond the task's side effects "
    "are skipped.",
    f"{EXEMPT}(reason): the suite-wide --celery-faults specs leave this test alone, "
    "harness and eager gate alike; the reason is printed in the summary.",
)

report_key: pytest.StashKey[SessionReport] = pytest.StashKey()
verdict_key: pytest.StashKey[str] = pytest.StashKey()
harness_key: pytest.StashKey[CeleryFaults] = pytest.StashKey()
gate_key: pytest.StashKey[EagerGate] = pytest.StashKey()
#: Why the JSON report could not be written at the end of the session, for the summary.
report_error_key: pytest.StashKey[str] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("celery-faults", "fault injection for Celery tasks")
    group.addoption(
        "--celery-faults",
        action="append",
        default=[],
        metavar="SPEC",
        dest="celery_faults_specs",
        help="run every test that runs tasks under SPEC (repeatable): tests that use "
        "the celery_faults harness, and tests that run tasks eagerly (task_always_eager, "
        ".apply(), celery.contrib.pytest's celery_worker), which then go through the "
        "emulated worker. E.g. --celery-faults='redeliver*1' as an idempotency gate. "
        "Default: none.",
    )
    group.addoption(
        "--celery-faults-stack",
        action="store_true",
        default=False,
        dest="celery_faults_stack",
        help="a test that arms fault specs of its own (markers, run(), inject()) also "
        "runs under the --celery-faults specs. Default: its own specs replace them.",
    )
    group.addoption(
        "--celery-faults-allow-unfired",
        action="store_true",
        default=False,
        dest="celery_faults_allow_unfired",
        help="a --celery-faults spec that fired in no test of the session does not fail "
        "the session (it is still named in the summary). Default: it fails the session, "
        "since a gate that proved nothing is not green.",
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
    from .audit import add_options as add_audit_options

    add_audit_options(parser)
    from ..explore.options import add_options as add_explore_options

    add_explore_options(parser)
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
    check_report_path(config)
    check_broker_url(config)
    from .audit import AuditHooks

    AuditHooks.configure(config)
    from ..explore.options import configure as configure_explore

    configure_explore(config)
    from ..session.report import SessionReport

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
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed={seed!r}: expected a whole number or None")
    if not isinstance(allow_unfired, bool):
        raise ValueError(f"allow_unfired={allow_unfired!r}: expected True or False")
    if not isinstance(profile, str):
        raise ValueError(f"profile={profile!r}: expected one of 'rabbitmq', 'redis', 'sqs'")
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
) -> tuple[tuple[str, ...], int]:
    """The sweep's kinds and last boundary, validated (the cases are built once, elsewhere)."""
    if not isinstance(max_effects, int) or isinstance(max_effects, bool) or max_effects < 0:
        raise ValueError(f"max_effects={max_effects!r}: expected a whole number >= 0")
    if max_effects > MAX_SWEEP_EFFECTS:
        raise ValueError(
            f"max_effects={max_effects!r}: expected at most {MAX_SWEEP_EFFECTS} "
            f"(each kind at each boundary is a test case of its own)"
        )
    if isinstance(hows, str) or not isinstance(hows, tuple | list) or not hows:
        raise ValueError(f"hows={hows!r}: expected a non-empty tuple of fault kinds")
    from ..grammar import BOUNDARY_KINDS

    for how in hows:
        if how not in BOUNDARY_KINDS or how == "raise":
            raise ValueError(f"hows: {how!r} is not a fault kind with a boundary")
    return tuple(hows), max_effects


def marker_settings(item: pytest.Item) -> MarkerSettings:
    """Read and validate the plugin's markers on ``item``; errors name the marker."""
    from ..engine.broker import BrokerProfile
    from ..engine.worker import check_workers
    from ..grammar import parse_spec

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
        check_workers(settings.workers)
    except (TypeError, ValueError) as exc:
        raise MarkerError(f"{item.nodeid}: bad celery-faults marker: {exc}") from None
    return settings


class MarkerError(Exception):
    """A plugin marker with bad arguments (reported as a usage error at collection)."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    sweep = metafunc.definition.get_closest_marker("fault_sweep")
    if sweep is None or SWEEP_FIXTURE not in metafunc.fixturenames:
        return
    from ..verdicts.idempotency import boundary_specs

    try:
        hows, max_effects = _fault_sweep_marker(*sweep.args, **sweep.kwargs)
    except (TypeError, ValueError):
        return  # pytest_collection_modifyitems reports it, with every other bad marker
    specs = boundary_specs(hows, max_effects)
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
        exempt = item.get_closest_marker(EXEMPT)
        if exempt is not None and not _exempt_reason(exempt):
            errors.append(
                f"{item.nodeid}: bad celery-faults marker: {EXEMPT} needs a reason, "
                f"e.g. @pytest.mark.{EXEMPT}(reason='talks to the real SMTP server')"
            )
    if errors:
        raise pytest.UsageError("\n".join(errors))
    check_app_setting(config, items)


def check_app_setting(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A missing or bad ``celery_faults_app`` is one usage error, not an ERROR per test.

    Checked after collection (the app's module may live beside the tests). A
    value given is always checked, whether or not a test uses it (a suite
    that runs only through the eager gate would carry a typo unseen); a
    missing one is an error only when a collected test uses this plugin's
    ``celery_faults_app`` fixture rather than a conftest's override.
    """
    value = config.getini(APP_INI)
    if value:
        load_app(str(value))
    elif any(_uses_ini_app(item) for item in items):
        raise pytest.UsageError(_MISSING_APP)


def _uses_ini_app(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)
    definitions: Any = getattr(info, "name2fixturedefs", {}).get(APP_INI)
    return bool(definitions) and getattr(definitions[-1].func, "__module__", "") == __name__


def _exempt_reason(mark: pytest.Mark) -> str:
    reason = mark.kwargs.get("reason", mark.args[0] if mark.args else "")
    return reason.strip() if isinstance(reason, str) else ""


def check_option_specs(config: pytest.Config, *, import_exceptions: bool) -> None:
    """A bad ``--celery-faults`` value is a usage error naming the problem.

    ``pytest_configure`` parses the specs; the exception classes a ``raise(...)``
    names are imported after collection, since one may live in the project under
    test, importable only once collection has set up sys.path.
    """
    from ..errors import FaultSpecError
    from ..grammar import parse_spec

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
    A limit the user set, ``0`` ("no timeout") included, is theirs to keep.
    """
    if not config.pluginmanager.hasplugin("timeout") or _session_timeout(config) is not None:
        return
    for item in items:
        uses_harness = "celery_faults" in getattr(item, "fixturenames", ())
        if uses_harness and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


def _session_timeout(config: pytest.Config) -> Any:
    """pytest-timeout's session setting, read in its order: command line, environment, ini.

    The first source that is set wins, even with ``0`` (which means no timeout);
    ``None`` when none is set.
    """
    value: Any = config.getoption("timeout", default=None)
    if value is None:
        value = os.environ.get("PYTEST_TIMEOUT")
    if value is None and config.pluginmanager.hasplugin("timeout"):
        value = config.getini("timeout") or None
    return value


def _deadline(item: pytest.Item) -> float | None:
    """When the test's time limit (pytest-timeout's, as it reads it) runs out, on ``monotonic``."""
    import time

    marker = item.get_closest_marker("timeout")
    value: Any = None
    if marker is not None:
        value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
    if value is None:
        value = _session_timeout(item.config)
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
        raise pytest.UsageError(_MISSING_APP)
    return load_app(str(value))


_MISSING_APP = (
    f'celery_faults needs the app under test: set `{APP_INI} = "proj.celery:app"` '
    f"in [tool.pytest.ini_options] (or pytest.ini), or override the "
    f"`{APP_INI}` fixture in a conftest.py"
)


def load_app(dotted: str) -> Celery:
    """The app the ini option names; a usage error naming the option when it cannot."""
    from ..apps import load_app as load

    module, sep, attribute = dotted.partition(":")
    if not sep:
        module, _, attribute = dotted.rpartition(".")
    if not module.strip() or not attribute.strip():
        raise pytest.UsageError(
            f"{APP_INI} = {dotted!r}: expected 'module:attribute', such as proj.celery:app"
        )
    try:
        return load(dotted)
    except ValueError as exc:
        raise pytest.UsageError(f"{APP_INI} = {exc}") from None
    except (Exception, SystemExit) as exc:  # the module fails to import (or exits): one line
        from ..engine.outcome import safe_repr

        try:
            detail = f": {exc}" if str(exc) else ""
        except Exception:
            detail = f" {safe_repr(exc)}"
        raise pytest.UsageError(
            f"{APP_INI} = {dotted!r}: importing it raised {type(exc).__name__}{detail}"
        ) from None


def check_report_path(config: pytest.Config) -> None:
    """``--celery-faults-report`` must be writable where it points, known before the run."""
    path = config.getoption("celery_faults_report", default=None)
    if not path or hasattr(config, "workerinput"):
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise pytest.UsageError(f"--celery-faults-report={path!r} is a directory, not a file")
    if not os.path.isdir(folder):
        raise pytest.UsageError(
            f"--celery-faults-report={path!r}: the directory {folder!r} does not exist"
        )
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise pytest.UsageError(
            f"--celery-faults-report={path!r}: cannot write there ({exc.strerror or exc}); "
            f"choose a writable path"
        ) from None
    if not existed:
        os.remove(path)  # the report is written at the end; leave nothing behind before then


def check_broker_url(config: pytest.Config) -> None:
    """A real-broker URL of a kind real mode cannot use is a usage error at start."""
    url = _broker_url(config)
    if not url:
        return
    from ..real.runner import profile_for

    where = (
        "--celery-faults-broker"
        if config.getoption("celery_faults_broker", default=None)
        else f"the {BROKER_INI} ini option"
    )
    try:
        profile_for(url)
    except ValueError as exc:
        raise pytest.UsageError(f"{where}: {exc}") from None


def _broker_url(config: pytest.Config) -> str | None:
    url = config.getoption("celery_faults_broker", default=None) or config.getini(BROKER_INI)
    return str(url) if url else None


@pytest.fixture(scope="session")
def _celery_faults_real_runner(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One real worker for the session, started on first use (real-broker mode)."""
    from ..real.runner import BrokerUnreachable, RealBrokerRunner

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
def celery_faults_real_isolation() -> Callable[[], Callable[[], object]] | None:
    """Real-broker mode runs each scenario twice: on the real worker, then emulated.

    Override this fixture to return a callable that saves the state your tasks
    change (database rows, Redis keys) and returns another that puts it back;
    it is called before the real run and its result after it, so the emulated
    run starts from the same state. Default: ``None`` (nothing is saved).
    """
    return None


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
    from ..errors import CeleryFaultsWarning, ConfigError, RefusedError
    from ..harness import CeleryFaults
    from ..session.report import record_harness

    settings = marker_settings(request.node)
    config = request.config
    broker_url = _broker_url(config)
    profile = settings.profile
    if broker_url:
        from ..real.runner import profile_for

        profile = profile_for(broker_url)
    harness = CeleryFaults(
        celery_faults_app,
        profile=profile,
        workers=settings.workers,
        seed=settings.seed if settings.seed is not None else _seed(config),
        check_unfired=not settings.allow_unfired,
    )
    harness.deadline = _deadline(request.node)
    from ..explore.options import explore_defaults

    harness.explore_defaults = explore_defaults(request)
    specs = list(settings.specs)
    if _celery_faults_sweep_case is not None:
        specs.append(_celery_faults_sweep_case)
    stack = bool(config.getoption("celery_faults_stack", default=False))
    harness.stack_suite_wide = stack
    comparison = None  # real-broker mode: every run() also on a real worker
    refused = None
    try:
        harness.start()
    except RefusedError as exc:
        refused = str(exc)
    except ConfigError as exc:  # the app's settings: one line, not the harness's frames
        refused = f"celery_faults: {exc}"
    if refused is not None:  # what to change is in its one line: no traceback
        pytest.fail(refused, pytrace=False)
    try:
        harness.inject(*specs)
        if not specs or stack:
            for spec in _suite_specs(request.node):
                harness.arm_suite_wide(spec)
        request.node.stash[harness_key] = harness
        if broker_url:
            from ..real.compare import RealComparison

            runner = request.getfixturevalue("_celery_faults_real_runner")
            isolation = request.getfixturevalue("celery_faults_real_isolation")
            comparison = RealComparison(harness, runner, isolation)
        yield harness
    finally:
        if comparison is not None:
            comparison.uninstall()
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


def _suite_specs(item: pytest.Item) -> list[str]:
    """The ``--celery-faults`` specs for ``item``; none when it is exempt (noted in the report)."""
    specs = list(item.config.getoption("celery_faults_specs", default=[]) or [])
    exempt = item.get_closest_marker(EXEMPT)
    if specs and exempt is not None:
        item.config.stash[report_key].exempt[item.nodeid] = _exempt_reason(exempt)
        return []
    return specs


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """The eager gate: with ``--celery-faults``, eager task runs go through the emulated worker."""
    names = getattr(item, "fixturenames", ())
    specs = [] if "celery_faults" in names else _suite_specs(item)
    if not specs:
        return (yield)
    suite_wide = specs
    own = marker_settings(item).specs
    if own:
        stack = item.config.getoption("celery_faults_stack", default=False)
        specs = [*own, *specs] if stack else own
    from ..session.gate import EagerGate

    gate = EagerGate(
        specs,
        suite_wide=[spec for spec in suite_wide if spec in specs],
        seed=_seed(item.config),
        profile=marker_settings(item).profile,
        catch_async="celery_worker" in names,
    )
    item.stash[gate_key] = gate
    with gate.open():
        return (yield)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    report = config.stash.get(report_key, None)
    specs = config.getoption("celery_faults_specs", default=[]) or []
    written = config.stash.get(report_error_key, None)
    if report is None or not (report.records or specs or written):
        return
    terminalreporter.section("celery-faults")
    allow = bool(config.getoption("celery_faults_allow_unfired", default=False))
    ran = exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)  # not cut short
    for line in report.summary_lines(specs if ran else [], allow_unfired=allow):
        terminalreporter.write_line(line)
    if written:
        terminalreporter.write_line(f"ERROR: {written}")


def pytest_sessionfinish(session: pytest.Session) -> None:
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
