"""pytest wiring: options, ini, markers, fixtures. The work happens in the core modules.

This module is imported by every pytest session where the plugin is installed,
so it imports neither Celery nor the harness at module level.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celery import Celery

    from .harness import CeleryFaults

APP_INI = "celery_faults_app"

MARKERS = (
    "celery_faults(*specs, profile='rabbitmq', workers=1, seed=None, allow_unfired=False): "
    "arm fault specs (e.g. 'sigkill@1', 'tasks.charge:power_loss@0', 'redeliver*2') for "
    "every message this test publishes; choose the broker profile and the worker count.",
    "redeliver(times=1): every message in the test is delivered `times` more times after "
    "it completes (the at-least-once check).",
    "crash_after(n, how='sigkill', task=None): the child running the (first matching) task "
    "dies after n side effects; how is sigkill, sigterm, exit or power_loss.",
)


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
        help="seed for every choice the plugin makes (worker order with workers>1). "
        "Default: 0.",
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
    specs = config.getoption("celery_faults_specs", default=[]) or []
    if specs:
        from .errors import FaultSpecError
        from .faults import parse_spec

        for spec in specs:
            try:
                parse_spec(spec)
            except FaultSpecError as exc:
                raise pytest.UsageError(f"--celery-faults: {exc}") from None


def pytest_report_header(config: pytest.Config) -> str | None:
    specs = config.getoption("celery_faults_specs", default=[]) or []
    seed = _seed(config)
    if not specs and config.getoption("celery_faults_seed") is None:
        return None
    shown = " ".join(f"--celery-faults={spec!r}" for spec in specs)
    return f"celery-faults: {shown} --celery-faults-seed={seed}".replace("  ", " ")


def _seed(config: pytest.Config) -> int:
    seed = config.getoption("celery_faults_seed", default=None)
    return 0 if seed is None else int(seed)


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
    hows = {"sigkill": "sigkill", "sigterm": "sigterm", "exit": "exit(1)", "power_loss": "power_loss"}
    if how not in hows:
        raise ValueError(f"how={how!r}: expected one of {', '.join(map(repr, hows))}")
    spec = f"{hows[how]}@{n}"
    return f"{task}:{spec}" if task else spec


def marker_settings(item: pytest.Item) -> MarkerSettings:
    """Read and validate the plugin's markers on ``item``; errors name the marker."""
    from .faults import parse_spec

    settings = MarkerSettings()
    try:
        closest = item.get_closest_marker("celery_faults")
        for mark in reversed(list(item.iter_markers("celery_faults"))):
            specs, _ = _celery_faults_marker(*mark.args, **mark.kwargs)
            settings.specs.extend(specs)
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
        for spec in settings.specs:
            parse_spec(spec)
        from .broker import BrokerProfile

        BrokerProfile.named(settings.profile)
        if not isinstance(settings.workers, int) or settings.workers < 1:
            raise ValueError(f"workers={settings.workers!r}: expected a whole number >= 1")
    except (TypeError, ValueError) as exc:
        raise MarkerError(f"{item.nodeid}: bad celery-faults marker: {exc}") from None
    return settings


class MarkerError(Exception):
    """A plugin marker with bad arguments (reported as a collection error)."""


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    errors = []
    for item in items:
        if any(
            item.get_closest_marker(name) for name in ("celery_faults", "redeliver", "crash_after")
        ):
            try:
                marker_settings(item)
            except MarkerError as exc:
                errors.append(str(exc))
    if errors:
        raise pytest.UsageError("\n".join(errors))


@pytest.fixture
def celery_faults_app(request: pytest.FixtureRequest) -> Celery:
    """The Celery app under test, from the ``celery_faults_app`` ini option."""
    value = request.config.getini(APP_INI)
    if not value:
        raise pytest.UsageError(
            f"celery_faults needs the app under test: set `{APP_INI} = \"proj.celery:app\"` "
            f"in [tool.pytest.ini_options] (or pytest.ini), or override the "
            f"`{APP_INI}` fixture in a conftest.py"
        )
    return load_app(str(value))


def load_app(dotted: str) -> Celery:
    module_name, sep, attribute = dotted.partition(":")
    if not sep:
        module_name, _, attribute = dotted.rpartition(".")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError, ValueError) as exc:
        raise pytest.UsageError(
            f"{APP_INI} = {dotted!r}: cannot load it ({exc}); expected 'module:attribute'"
        ) from None
    from celery import Celery

    if not isinstance(found, Celery):
        raise pytest.UsageError(
            f"{APP_INI} = {dotted!r} is a {type(found).__name__}, not a Celery app"
        )
    return found


@pytest.fixture
def celery_faults(request: pytest.FixtureRequest, celery_faults_app: Celery) -> Iterator[CeleryFaults]:
    """The fault-injection harness for this test, active for its whole duration."""
    from .harness import CeleryFaults

    settings = marker_settings(request.node)
    config = request.config
    seed = settings.seed if settings.seed is not None else _seed(config)
    harness = CeleryFaults(
        celery_faults_app,
        profile=settings.profile,
        workers=settings.workers,
        seed=seed,
        check_unfired=not settings.allow_unfired,
    )
    harness.start()
    try:
        harness.inject(*settings.specs)
        for spec in config.getoption("celery_faults_specs", default=[]) or []:
            harness.arm_suite_wide(spec)
        yield harness
    finally:
        harness.stop()
    if not settings.allow_unfired:
        harness.assert_all_fired()
