"""The plugin's command-line options and ini settings, each checked where it enters.

A bad value is a usage error at start naming the option and the value, never a
traceback in the middle of the run.
"""

from __future__ import annotations

import os

import pytest

APP_INI = "celery_faults_app"
BROKER_INI = "celery_faults_broker"


def add_options(parser: pytest.Parser) -> None:
    """The command-line options, in the order ``pytest --help`` lists them."""
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


def add_ini(parser: pytest.Parser) -> None:
    """The ini settings."""
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


def session_seed(config: pytest.Config) -> int:
    """``--celery-faults-seed``, ``0`` when it is not given."""
    seed = config.getoption("celery_faults_seed", default=None)
    return 0 if seed is None else int(seed)


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
    url = real_broker_url(config)
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


def real_broker_url(config: pytest.Config) -> str | None:
    """Real-broker mode's URL: ``--celery-faults-broker``, else the ini option; ``None`` if off."""
    url = config.getoption("celery_faults_broker", default=None) or config.getini(BROKER_INI)
    return str(url) if url else None
