"""The plugin's markers: what each one asks for, validated at collection.

A marker with bad arguments is one usage error naming the test and the marker
(all of them at once), never an error per test at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from ..vocabulary import MARKER_SWEEP_KINDS
from .stash import report_key

SWEEP_FIXTURE = "_celery_faults_sweep_case"
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
    max_effects: int = 5, hows: tuple[str, ...] | list[str] = MARKER_SWEEP_KINDS
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
    from ..engine.settings import check_workers
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


def parametrize_sweep(metafunc: pytest.Metafunc) -> None:
    """A ``fault_sweep`` test becomes one case per fault kind and side-effect boundary."""
    sweep = metafunc.definition.get_closest_marker("fault_sweep")
    if sweep is None or SWEEP_FIXTURE not in metafunc.fixturenames:
        return
    from ..verdicts.idempotency import boundary_specs

    try:
        hows, max_effects = _fault_sweep_marker(*sweep.args, **sweep.kwargs)
    except (TypeError, ValueError):
        return  # check_markers reports it after collection, with every other bad marker
    specs = boundary_specs(hows, max_effects)
    metafunc.parametrize(SWEEP_FIXTURE, specs, ids=specs, indirect=True)


def check_markers(items: list[pytest.Item]) -> None:
    """Every bad plugin marker of the collected tests, in one usage error naming each."""
    errors = []
    names = ("celery_faults", "redeliver", "crash_after", "fault_sweep")
    for item in items:
        if any(item.get_closest_marker(name) for name in names):
            try:
                marker_settings(item)
            except MarkerError as exc:
                errors.append(str(exc))
        exempt = item.get_closest_marker(EXEMPT)
        if exempt is not None and not exempt_reason(exempt):
            errors.append(
                f"{item.nodeid}: bad celery-faults marker: {EXEMPT} needs a reason, "
                f"e.g. @pytest.mark.{EXEMPT}(reason='talks to the real SMTP server')"
            )
    if errors:
        raise pytest.UsageError("\n".join(errors))


def exempt_reason(mark: pytest.Mark) -> str:
    """The reason an exemption marker gives, ``""`` when it gives none."""
    reason = mark.kwargs.get("reason", mark.args[0] if mark.args else "")
    return reason.strip() if isinstance(reason, str) else ""


def suite_specs(item: pytest.Item) -> list[str]:
    """The ``--celery-faults`` specs for ``item``; none when it is exempt (noted in the report)."""
    specs = list(item.config.getoption("celery_faults_specs", default=[]) or [])
    exempt = item.get_closest_marker(EXEMPT)
    if specs and exempt is not None:
        item.config.stash[report_key].exempt[item.nodeid] = exempt_reason(exempt)
        return []
    return specs
