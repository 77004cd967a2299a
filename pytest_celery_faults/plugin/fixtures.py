"""The plugin's fixtures: the app under test, the harness, and real-broker mode's worker."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from .explore import explore_defaults
from .markers import marker_settings, suite_specs
from .options import APP_INI, real_broker_url, session_seed
from .stash import harness_key, report_key, verdict_key
from .timeouts import deadline

if TYPE_CHECKING:
    from celery import Celery

    from ..harness import CeleryFaults


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


@pytest.fixture(scope="session")
def _celery_faults_real_runner(request: pytest.FixtureRequest) -> Iterator[Any]:
    """One real worker for the session, started on first use (real-broker mode)."""
    from ..real.runner import BrokerUnreachable, RealBrokerRunner

    url = real_broker_url(request.config)
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
    broker_url = real_broker_url(config)
    profile = settings.profile
    if broker_url:
        from ..real.runner import profile_for

        profile = profile_for(broker_url)
    harness = CeleryFaults(
        celery_faults_app,
        profile=profile,
        workers=settings.workers,
        seed=settings.seed if settings.seed is not None else session_seed(config),
        check_unfired=not settings.allow_unfired,
    )
    harness.deadline = deadline(request.node)
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
            for spec in suite_specs(request.node):
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
